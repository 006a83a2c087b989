"""Build the case index: write adjudicated cases into the configured case memory (the ``index`` command)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from retrieval.case_memory import BehaviourEncoder, open_case_memory
from retrieval.edge_store import QdrantEdgeVectorStore
from riskcascade.config import RetrievalSettings
from riskcascade.domain import AdjudicatedCase


@dataclass(frozen=True)
class IndexReport:
    added: int  # cases written in this run (re-written cases included)
    new: int  # cases that were not in the index before this run
    total: int  # cases in the index afterwards
    seconds: float
    backend: str
    location: str


def build_case_index(
    settings: RetrievalSettings,
    cases: Iterable[AdjudicatedCase],
    encoder: BehaviourEncoder,
    progress: bool = True,
) -> IndexReport:
    """Write ``cases`` into the case memory ``settings`` describe, creating it if needed.

    Idempotent: a case is stored under an id derived from its case id, so re-running with the same cases leaves
    the same total. On Edge it then runs the shard's optimizers. Takes the index's lock for the duration (an
    Edge shard or a qdrant-client local folder cannot be indexed while a running platform has it open).
    """
    started = time.perf_counter()
    with open_case_memory(settings, encoder) as memory:
        before = memory.count()
        added = memory.add_cases(cases, batch_size=settings.index_batch_size, progress=progress)
        if isinstance(memory.vector_store, QdrantEdgeVectorStore):
            # Edge runs no optimizer on its own. Run it here, in the indexing process, because it holds the GIL
            # while it works: it merges segments and, once the vectors outgrow Qdrant's indexing threshold
            # (~10 MB: about 125k 20-d cases), builds HNSW. Below that it returns at once and search stays exact.
            memory.vector_store.optimize()
        total = memory.count()
        backend, location = memory.backend, memory.location
    return IndexReport(
        added=added,
        new=total - before,
        total=total,
        seconds=time.perf_counter() - started,
        backend=backend,
        location=location,
    )
