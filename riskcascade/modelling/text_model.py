"""The text model: a BERT-style encoder on the event's free text with a trained head, whose fraud probability is a
feature of the fast model (``text_risk``) and so, through TreeSHAP, one of its reason codes.

The encoder is all-MiniLM-L6-v2, the one the case memory embeds with (``retrieval.embedding``: ONNX, ``tokenizers``
and numpy, no torch). Each configured field of the event's text map (``training.text_model.fields``) is embedded on
its own (a 384-d unit vector; zeros for an empty field) and the vectors are put side by side; the head is an
L2-regularised logistic regression on that, saved as plain numbers (``text_model.json``) and applied with numpy. An
event with no text in any field gets no score (NaN: the trees learned where a missing score goes). Field by field,
because notes and messages come from far fewer distinct strings each than their pairs do: each is encoded once and
remembered, and the head weighs the fields apart.

Point in time (``fit_text_model``). The head learns from labels, so the column the trees are trained on must not
hold what the event could not have known:

- a time-ordered data set: the train rows are cut into ``time_blocks`` blocks by time and the valid rows follow as
  one more block; each block is scored by a head fitted on the rows before it whose labels had arrived by the
  block's start (the first block, with nothing before it, gets no score). The head that is saved, and scores the
  test rows and live traffic, is fitted on the train and valid rows whose labels had arrived when the test period
  starts (without label times: every train and valid label);
- a data set without times: out-of-fold scores over ``time_blocks`` folds of the train rows, and the saved head,
  fitted on every train label, for the others.

Serving (``TextRiskScorer``) embeds each distinct field text of a batch once, in batches of similar length, and
remembers the vectors of recent ones (``model.text_cache_entries``): pasted scripts and templated notes repeat, so
most events of a busy batch cost dictionary lookups.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

from retrieval.embedding import OnnxMiniLMEmbedding
from retrieval.text_vectors import EmbeddingCache, embedder_identity

TEXT_FEATURE = "text_risk"
TEXT_MODEL_FILE = "text_model.json"
TEXT_MODEL_FORMAT = 2


def text_description(fields: Sequence[str]) -> str:
    return f"Text model's fraud probability for the event's free text ({', '.join(fields)})"


def field_texts(text: Mapping[str, str], fields: Sequence[str]) -> tuple[str, ...]:
    """What the text model reads of an event's text map: each field's value, stripped ("" when absent), in
    ``fields`` order."""
    return tuple(str(text.get(f, "") or "").strip() for f in fields)


def represent(encoder: EmbeddingCache, rows: Sequence[tuple[str, ...]]) -> np.ndarray:
    """The head's input for each row of field texts: the fields' unit embeddings side by side, zeros for an empty
    field (float32 [rows, fields * dimension])."""
    width = encoder.embedder.dimension
    n_fields = len(rows[0]) if rows else 0
    out = np.zeros((len(rows), n_fields * width), dtype=np.float32)
    for k in range(n_fields):
        filled = [i for i, row in enumerate(rows) if row[k]]
        if filled:
            out[filled, k * width:(k + 1) * width] = encoder.embed([rows[i][k] for i in filled])
    return out


@functools.lru_cache(maxsize=4)
def shared_encoder(embedding_dir: Path, threads: int = 1, batch_size: int = 32,
                   cache_entries: int = 100_000) -> EmbeddingCache:
    """One MiniLM session with its cache per artefact folder and settings, for the whole process: a retrain, a
    distillation round or a test re-fitting the same data set embeds nothing twice, and the model versions a scorer
    replica keeps (live, the one it replaced, a shadow) share one session and one cache (vectors depend on the
    encoder alone, which every version checks it was fitted on)."""
    return EmbeddingCache(OnnxMiniLMEmbedding(embedding_dir, intra_op_threads=threads, embed_batch_size=batch_size),
                          cache_entries)


@dataclass
class TextHead:
    """The trained head: P(fraud | text) = sigmoid(embedding . weights + bias)."""

    fields: tuple[str, ...]
    weights: np.ndarray  # float64 [fields * dimension]
    bias: float
    encoder: str  # retrieval.text_vectors.embedder_identity of the encoder it was fitted on
    training: dict[str, Any] = field(default_factory=dict)

    def probability(self, embeddings: np.ndarray) -> np.ndarray:
        return _probability(embeddings, self.weights, self.bias)

    def save(self, folder: Path) -> None:
        body = {"format": TEXT_MODEL_FORMAT, "feature": TEXT_FEATURE, "fields": list(self.fields),
                "encoder": self.encoder, "bias": self.bias, "weights": self.weights.tolist(),
                "training": self.training}
        (Path(folder) / TEXT_MODEL_FILE).write_text(json.dumps(body, indent=1))

    @classmethod
    def load(cls, folder: Path) -> TextHead:
        body = json.loads((Path(folder) / TEXT_MODEL_FILE).read_text())
        if body.get("format") != TEXT_MODEL_FORMAT:
            raise ValueError(f"{folder}/{TEXT_MODEL_FILE}: format {body.get('format')!r}, expected {TEXT_MODEL_FORMAT}")
        return cls(fields=tuple(body["fields"]), weights=np.asarray(body["weights"], dtype=np.float64),
                   bias=float(body["bias"]), encoder=body["encoder"], training=body.get("training", {}))


class TextRiskScorer:
    """A model version's text head on the encoder it was fitted on: events' text maps in, ``text_risk`` out."""

    def __init__(self, head: TextHead, embedding_dir: Path, threads: int = 1, batch_size: int = 32,
                 cache_entries: int = 20_000):
        """``cache_entries``: distinct field texts whose vectors are remembered (1.5 KB each)."""
        found = embedder_identity(embedding_dir)
        if found != head.encoder:
            raise ValueError(f"the text model was fitted on {head.encoder}, but {embedding_dir} holds {found}: "
                             "retrain, or export that encoder")
        self.head = head
        self.encoder = shared_encoder(Path(embedding_dir).resolve(), threads, batch_size, cache_entries)

    def score(self, texts: Sequence[Mapping[str, str]]) -> np.ndarray:
        """``text_risk`` per event (float64; NaN where the fields hold no text)."""
        rows = [field_texts(t, self.head.fields) for t in texts]
        out = np.full(len(rows), np.nan)
        present = [i for i, row in enumerate(rows) if any(row)]
        if present:
            out[present] = self.head.probability(represent(self.encoder, [rows[i] for i in present]))
        return out


# --- Training ----------------------------------------------------------------------------------------------------


def _fit(vectors: np.ndarray, ids: np.ndarray, labels: np.ndarray, regularization: float,
         seed: int) -> tuple[np.ndarray, float]:
    """The head on rows given as distinct-text ids into ``vectors`` with their labels: each distinct (text, label)
    pair once, weighted by how often it occurs (the same fit as one row per event, on far fewer rows)."""
    pairs, counts = np.unique(ids.astype(np.int64) * 2 + labels.astype(np.int64), return_counts=True)
    head = LogisticRegression(C=regularization, max_iter=1000, random_state=seed)
    head.fit(vectors[pairs // 2].astype(np.float64), pairs % 2, sample_weight=counts.astype(np.float64))
    return head.coef_[0].astype(np.float64), float(head.intercept_[0])


def _enough(labels: np.ndarray, least: int) -> bool:
    return int((labels == 1).sum()) >= least and int((labels == 0).sum()) >= least


@dataclass
class TextFit:
    head: TextHead
    feature: np.ndarray  # text_risk of every row of the data set, as the trees train on it (NaN: no score)
    scored_rows: dict[str, int]  # per split, rows with a score


def fit_text_model(
    texts: list[tuple[str, ...]], labels: np.ndarray, split: np.ndarray, times: np.ndarray | None,
    label_times: np.ndarray | None, cut: float | None, fields: Sequence[str], encoder: EmbeddingCache,
    encoder_identity: str, time_blocks: int, regularization: float, min_class_labels: int, seed: int,
) -> TextFit | None:
    """Fit the head and the point-in-time ``text_risk`` column (module docstring); None when the train rows hold too
    few labelled texts of either class (``min_class_labels``).

    ``texts``: each row's field texts (``field_texts``); ``labels``: 1 / 0 / -1 unlabelled; ``cut``: when the model is
    fitted (the test period's start), labels arriving later are not used by the saved head (None: every label)."""
    n = len(texts)
    has_text = np.array([any(t) for t in texts])
    index: dict[tuple[str, ...], int] = {}
    ids = np.array([index.setdefault(t, len(index)) for t in texts], dtype=np.int64)
    vectors = represent(encoder, list(index))  # one row per distinct combination of field texts

    def fit(rows: np.ndarray) -> tuple[np.ndarray, float]:
        return _fit(vectors, ids[rows], labels[rows], regularization, seed)

    def probability(rows: np.ndarray, head: tuple[np.ndarray, float]) -> np.ndarray:
        return _probability(vectors, *head)[ids[rows]]

    usable = has_text & (labels >= 0)
    fitting = np.isin(split, ("train", "valid")) if times is not None else split == "train"
    final_rows = usable & fitting
    if cut is not None and label_times is not None:
        final_rows &= label_times <= cut
    if not _enough(labels[final_rows], min_class_labels):
        return None
    feature = np.full(n, np.nan)
    final = fit(final_rows)
    held = ~fitting
    feature[held] = probability(held, final)

    train_rows = np.flatnonzero(split == "train")
    blocks_scored = 0
    if times is not None:
        ordered = train_rows[np.argsort(times[train_rows], kind="stable")]
        blocks = [b for b in np.array_split(ordered, time_blocks) if len(b)]
        valid_rows = np.flatnonzero(split == "valid")
        if len(valid_rows):
            blocks.append(valid_rows)
        for block in blocks[1:]:
            start = float(times[block].min())
            rows = usable & fitting & (times < start)
            if label_times is not None:
                rows &= label_times <= start
            if _enough(labels[rows], min_class_labels):
                feature[block] = probability(block, fit(rows))
                blocks_scored += 1
        protocol = (f"forward-chained: the train rows in {time_blocks} time blocks and the valid rows as one more, "
                    "each scored by a head fitted on earlier rows whose labels had arrived by the block's start; the "
                    "first block unscored. Test and serving: the head fitted on train and valid labels known at the "
                    "cut")
    else:
        folds = np.array_split(np.random.default_rng(seed).permutation(train_rows), time_blocks)
        for fold in folds:
            rows = usable & fitting
            rows[fold] = False
            if _enough(labels[rows], min_class_labels):
                feature[fold] = probability(fold, fit(rows))
                blocks_scored += 1
        protocol = (f"out-of-fold over {time_blocks} folds of the train rows (no times); others: the head fitted on "
                    "every train label")
    feature[~has_text] = np.nan
    head = TextHead(
        fields=tuple(fields), weights=final[0], bias=final[1], encoder=encoder_identity,
        training={"protocol": protocol, "fitted_on_labels": int(final_rows.sum()),
                  "fraud_labels": int(labels[final_rows].sum()), "blocks_scored": blocks_scored,
                  "regularization": regularization,
                  "distinct_texts": {f: len({t[k] for t in index} - {""}) for k, f in enumerate(fields)}},
    )
    scored = {name: int((~np.isnan(feature) & (split == name)).sum()) for name in ("train", "valid", "test")}
    return TextFit(head=head, feature=feature, scored_rows=scored)


def _probability(vectors: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(vectors.astype(np.float64) @ weights + bias)))
