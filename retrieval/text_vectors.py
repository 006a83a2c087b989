"""Text vectors: the embedder interface the case memory and the policy library use, and a cache that embeds each
distinct text once (the case memory's narratives, the fast model's text model)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from riskcascade.core.config import RetrievalSettings

MANIFEST_DIGEST_CHARS = 16  # 64 bits of the manifest's SHA-256: plenty to tell exports apart


@runtime_checkable
class TextEmbedder(Protocol):
    """What retrieval needs of a text embedder (``retrieval.embedding.OnnxMiniLMEmbedding`` is one)."""

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length vectors, one float32 row per text, in order; a text's vector does not depend on the batch."""
        ...


def open_text_embedder(settings: RetrievalSettings) -> TextEmbedder:
    """The configured text embedder: MiniLM from ``settings.embedding_dir`` on ``embedding_threads`` threads."""
    from retrieval.embedding import OnnxMiniLMEmbedding  # loads onnxruntime: only when a text embedder is wanted

    return OnnxMiniLMEmbedding(settings.embedding_dir, settings.embedding_threads)


class EmbeddingCache:
    """Embeds texts, each distinct text once: repeated texts (and texts seen in earlier calls) reuse the vector.

    Valid because the embedder gives a text the same vector whatever batch it comes in.
    """

    def __init__(self, embedder: TextEmbedder, max_entries: int = RetrievalSettings().embedding_cache_entries):
        """Keeps at most ``max_entries`` texts (``retrieval.embedding_cache_entries``); past it the least recently
        used go first: results stay the same, only texts not seen lately may be embedded again."""
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.embedder = embedder
        self.max_entries = max_entries
        self.embedded = 0  # texts sent to the embedder
        self.reused = 0  # texts answered from the cache (or from an identical text in the same call)
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One float32 row per text, in order."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            self._vectors.update(zip(missing, self.embedder.embed(missing)))
        self.embedded += len(missing)
        self.reused += len(texts) - len(missing)
        out = np.empty((len(texts), self.embedder.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self._vectors[text]
            self._vectors.move_to_end(text)
        while len(self._vectors) > self.max_entries:
            self._vectors.popitem(last=False)
        return out


def embedder_identity(embedding_dir: Path) -> str:
    """Names the exported embedder: its model and a digest of its manifest (which records the export's checksums
    and probe vectors), so a re-export or another model reads as a different embedder."""
    from retrieval.embedding import MANIFEST_FILE, EmbeddingManifest

    manifest = EmbeddingManifest.load(Path(embedding_dir))  # raises, naming `make embedding`, when missing
    digest = hashlib.sha256((Path(embedding_dir) / MANIFEST_FILE).read_bytes()).hexdigest()
    return f"{manifest.model}@{digest[:MANIFEST_DIGEST_CHARS]}"
