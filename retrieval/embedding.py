"""Text embeddings for retrieval: all-MiniLM-L6-v2 served with onnxruntime, ``tokenizers`` and numpy (no torch).

The model is exported once at set-up by ``retrieval/embedding_export.py`` (``make embedding``, a prerequisite of
``make install``) into an artefact folder: ``model.onnx`` (BERT's token embeddings), ``tokenizer.json`` and
``manifest.json`` (dimension, max_length, pooling, quantization, and reference embeddings of probe texts computed
with the original torch model). Here we tokenize, truncate to ``max_length``, run the session on the CPU, and do
sentence-transformers' mean pooling and L2 normalisation in numpy, so vectors match the original model's
(cosine >= the manifest's ``parity_min``; tests/test_embedding.py checks it).

``OnnxMiniLMEmbedding`` is a LlamaIndex ``BaseEmbedding``; ``embed`` gives the same vectors as a numpy matrix.
A text gets the same vector alone or in any batch (the export rejects quantizations where it would not), so query
and index vectors are comparable however they were batched.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# Tokenizing takes ~50 us a text; a rayon pool per process would only compete with onnxruntime for the cores (measured
# no faster on a batch of 32 here) and warns after a fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding  # noqa: E402
from pydantic import Field, PrivateAttr  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

EMBEDDING_DIR = Path("var/embedding")
"""Where ``make embedding`` writes the artefact (relative to the repository root)."""

BUILD_TARGET = "make embedding"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class EmbeddingArtifactNotFoundError(FileNotFoundError):
    """The exported embedding model is not there: it is built by ``make embedding``."""


@dataclass(frozen=True)
class EmbeddingProbe:
    """A fixed text with its embedding by the original torch model (for parity checks without torch)."""

    text: str
    tokens: int  # token count after truncation, [CLS] and [SEP] included
    embedding: tuple[float, ...]


@dataclass(frozen=True)
class EmbeddingManifest:
    model: str
    source_package: str
    source_version: str
    dimension: int
    max_length: int  # tokens, [CLS] and [SEP] included; longer texts are truncated
    quantization: str
    parity_min: float  # least cosine against torch over the probes, measured at export
    parity_floor: float  # least cosine the export accepts for any probe
    onnx_file: str
    onnx_output: str
    tokenizer_file: str
    probes: tuple[EmbeddingProbe, ...]

    @classmethod
    def load(cls, artifact_dir: Path) -> EmbeddingManifest:
        path = Path(artifact_dir) / MANIFEST_FILE
        if not path.is_file():
            raise EmbeddingArtifactNotFoundError(
                f"no embedding model at {Path(artifact_dir).resolve()} ({MANIFEST_FILE} missing): "
                f"run `{BUILD_TARGET}` in the repository root to export it (once, ~1 min)"
            )
        raw = json.loads(path.read_text())
        if raw.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path}: format {raw.get('format')!r}, expected {MANIFEST_FORMAT}: run `{BUILD_TARGET}`")
        if (raw["pooling"], raw["normalization"]) != ("mean", "l2"):
            raise ValueError(f"{path}: pooling {raw['pooling']!r} / {raw['normalization']!r}, expected mean / l2")
        quantization = raw["quantization"]
        return cls(
            model=raw["model"],
            source_package=raw["source"]["package"],
            source_version=raw["source"]["version"],
            dimension=int(raw["dimension"]),
            max_length=int(raw["max_length"]),
            quantization=quantization["scheme"],
            parity_min=float(quantization["parity_min"]),
            parity_floor=float(quantization["parity_floor"]),
            onnx_file=raw["onnx"]["file"],
            onnx_output=raw["onnx"]["output"],
            tokenizer_file=raw["tokenizer"]["file"],
            probes=tuple(
                EmbeddingProbe(text=p["text"], tokens=int(p["tokens"]), embedding=tuple(p["embedding"]))
                for p in raw["probes"]
            ),
        )


def mean_pool_normalise(token_embeddings: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize: average the real tokens' vectors, scale to unit length."""
    mask = attention_mask[..., None].astype(np.float32)
    pooled = (token_embeddings * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class OnnxMiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit length) from the exported ONNX artefact, on the CPU.

    Queries and documents are embedded the same way (the model takes no instruction prefix). Texts longer than
    ``max_length`` tokens are truncated, as sentence-transformers does.
    """

    artifact_dir: Path = Field(default=EMBEDDING_DIR, description="folder written by `make embedding`")
    intra_op_threads: int = Field(default=1, ge=1, description="onnxruntime intra-op threads for the session")

    _manifest: EmbeddingManifest = PrivateAttr()
    _session: ort.InferenceSession = PrivateAttr()
    _tokenizer: Tokenizer = PrivateAttr()
    _inputs: tuple[str, ...] = PrivateAttr()
    _pad_id: int = PrivateAttr()

    def __init__(
        self,
        artifact_dir: Path | str = EMBEDDING_DIR,
        intra_op_threads: int = 1,
        embed_batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        manifest = EmbeddingManifest.load(Path(artifact_dir))
        super().__init__(
            artifact_dir=Path(artifact_dir),
            intra_op_threads=intra_op_threads,
            embed_batch_size=embed_batch_size,
            model_name=manifest.model,
            **kwargs,
        )
        self._manifest = manifest
        tokenizer = Tokenizer.from_file(str(self.artifact_dir / manifest.tokenizer_file))
        tokenizer.enable_truncation(max_length=manifest.max_length)
        self._pad_id = (tokenizer.padding or {}).get("pad_id", 0)
        tokenizer.no_padding()  # padded per batch in _run, after sorting by length
        self._tokenizer = tokenizer
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Spinning worker threads starve everything else on a small shared machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(self.artifact_dir / manifest.onnx_file), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._inputs = tuple(i.name for i in self._session.get_inputs())
        if unknown := set(self._inputs) - set(INPUT_NAMES):
            raise ValueError(f"{manifest.onnx_file} wants inputs {sorted(unknown)} that we cannot feed")
        width = self._session.get_outputs()[0].shape[-1]
        if width != manifest.dimension:
            raise ValueError(f"{manifest.onnx_file} outputs {width}-d vectors, the manifest says {manifest.dimension}")

    @classmethod
    def class_name(cls) -> str:
        return "OnnxMiniLMEmbedding"

    @property
    def manifest(self) -> EmbeddingManifest:
        return self._manifest

    @property
    def dimension(self) -> int:
        return self._manifest.dimension

    def token_count(self, text: str) -> int:
        """Tokens the model sees for ``text`` after truncation, [CLS] and [SEP] included."""
        return len(self._tokenizer.encode(text).ids)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length embeddings, one float32 row per text, in order; ``embed_batch_size`` texts per session run.

        Texts are batched by token count, so a batch pads little; results do not depend on the batching.
        """
        encodings = self._tokenizer.encode_batch(list(texts))
        out = np.empty((len(encodings), self.dimension), dtype=np.float32)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), self.embed_batch_size):
            rows = order[start : start + self.embed_batch_size]
            out[rows] = self._run([encodings[i].ids for i in rows])
        return out

    def _run(self, token_ids: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in token_ids)
        input_ids = np.full((len(token_ids), width), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}
        (hidden,) = self._session.run([self._manifest.onnx_output], {name: feed[name] for name in self._inputs})
        return mean_pool_normalise(hidden, attention_mask)

    def _get_query_embedding(self, query: str) -> Embedding:
        return self.embed([query])[0].tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self.embed([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self.embed(texts).tolist()

    # onnxruntime releases the GIL while it runs: off the event loop, a batch does not stall other requests.
    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
