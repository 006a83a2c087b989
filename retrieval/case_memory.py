"""Case memory: past adjudicated cases, found again by how similar their behaviour is to a new event's.

One interface, two engines chosen by ``RetrievalSettings.backend`` (as qdrant-client serves local and remote
through one client):

- ``edge``: ``QdrantEdgeVectorStore``, the Qdrant engine in-process over a shard folder (the default).
- ``qdrant``: LlamaIndex's ``QdrantVectorStore`` over qdrant-client: a Qdrant server when ``qdrant_url`` is set,
  else qdrant-client's local mode in ``qdrant_path`` (pure Python; for tests and small data).

Both receive the same nodes (``case_to_node``) and are queried through the same LlamaIndex retriever
(``CaseRetriever``), so the reasoner sees the same cases and the same similarities from either.

A case is embedded by its behaviour, not its text: ``BehaviourEncoder`` standardises the model's features with
the training mean and standard deviation recorded in the model card. Vectors built with one model card's scaling
are only comparable with queries encoded by the same scaling: rebuild the index when the card changes.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import BaseNode, NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)
from tqdm import tqdm

from retrieval.edge_store import EdgeShardNotFoundError, QdrantEdgeVectorStore
from riskcascade.config import RetrievalSettings
from riskcascade.domain import AdjudicatedCase, Entities, EventType, Outcome
from riskcascade.model_card import ModelCard

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

VECTOR_NAME = "behaviour"
"""Name of the dense vector in both backends."""

CASE_NAMESPACE = uuid.UUID("0b5c1d7e-3f55-5a8e-b1a4-6c2d9e8f7a31")
"""Namespace of case node ids (uuid5 of the case id). Changing it orphans every existing index."""

KEYWORD_FIELDS = (
    "case_id",
    "event_type",
    "outcome",
    "risk_type",
    "account_id",
    "seller_id",
    "device_id",
    "ip",
    "payment_instrument_id",
)
"""Payload keys given a keyword index: the ones retrieval filters on."""

_ENTITY_FIELDS = ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id")
_NOT_FOR_PROMPTS = ["features"]  # long and numeric: kept out of the text an LLM or text embedder sees


class CaseIndexNotFoundError(FileNotFoundError):
    """A read-only case memory was opened where no index has been built."""


class CaseMemoryReadOnlyError(RuntimeError):
    """A write was attempted on a case memory opened read-only."""


# -- behaviour vectors ------------------------------------------------------------------------------------------


class BehaviourEncoder:
    """Features → behaviour vector: z-scores by the training scaling, in the model's feature order.

    A missing or NaN feature encodes as 0 (its training mean); z-scores are clipped to ±``clip`` so one extreme
    value cannot dominate the cosine; a feature whose training standard deviation is 0 (or not finite) encodes
    as 0 (it carried no variation to compare). Features not in the model are ignored.
    """

    clip = 8.0

    def __init__(self, feature_names: Sequence[str], mean: Sequence[float], std: Sequence[float]):
        if not (len(feature_names) == len(mean) == len(std)):
            raise ValueError(
                f"feature scaling does not match the features: {len(feature_names)} names, "
                f"{len(mean)} means, {len(std)} standard deviations"
            )
        if len(set(feature_names)) != len(feature_names):
            raise ValueError("feature names must be unique")
        if not feature_names:
            raise ValueError("a behaviour vector needs at least one feature")
        self._names = tuple(feature_names)
        self._mean = np.asarray(mean, dtype=np.float64)
        std_arr = np.asarray(std, dtype=np.float64)
        self._informative = np.isfinite(std_arr) & (std_arr > 0) & np.isfinite(self._mean)
        self._std = np.where(self._informative, std_arr, 1.0)
        self._mean = np.where(self._informative, self._mean, 0.0)

    @classmethod
    def from_model_card(cls, card: ModelCard) -> BehaviourEncoder:
        scaling = card.feature_scaling
        return cls(card.feature_names, scaling.mean, scaling.std)

    @property
    def dimension(self) -> int:
        return len(self._names)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def encode(self, features: Mapping[str, float]) -> list[float]:
        return self.encode_many([features])[0].tolist()

    def encode_many(self, rows: Sequence[Mapping[str, float]]) -> np.ndarray:
        """One vector per row, as a (rows, dimension) float64 array."""
        raw = np.array(
            [[_as_float(row.get(name)) for name in self._names] for row in rows], dtype=np.float64
        ).reshape(len(rows), self.dimension)
        z = (raw - self._mean) / self._std
        z = np.where(np.isnan(z) | ~self._informative, 0.0, z)
        return np.clip(z, -self.clip, self.clip)


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


# -- cases as nodes ---------------------------------------------------------------------------------------------


def case_node_id(case_id: str) -> str:
    """The node id (and Qdrant point id, in both backends) of a case: uuid5 of its case id.

    Qdrant accepts only unsigned integers and UUIDs as point ids and ``QdrantVectorStore`` uses the node id as the
    point id, so the case id itself (``case-00042``) cannot be the node id; it is kept in the metadata and as the
    node's source document (``ref_doc_id``), so ``vector_store.delete(case_id)`` removes a case in both backends.
    """
    return str(uuid.uuid5(CASE_NAMESPACE, case_id))


def case_to_node(case: AdjudicatedCase, embedding: Sequence[float]) -> TextNode:
    """The node stored for a case: its summary as text, its behaviour vector, the rest as metadata.

    Non-finite feature values are stored as null (JSON has no NaN) and come back as NaN.
    """
    entities = case.entities
    metadata: dict[str, Any] = {
        "case_id": case.case_id,
        "event_type": case.event_type.value,
        "outcome": case.outcome.value,
        "risk_type": case.risk_type,
        **{name: (getattr(entities, name) if entities is not None else None) for name in _ENTITY_FIELDS},
        "occurred_at": case.occurred_at.isoformat() if case.occurred_at is not None else None,
        "features": {
            name: (float(value) if value is not None and math.isfinite(value) else None)
            for name, value in case.features.items()
        },
    }
    return TextNode(
        id_=case_node_id(case.case_id),
        text=case.summary,
        embedding=[float(x) for x in embedding],
        metadata=metadata,
        excluded_embed_metadata_keys=list(_NOT_FOR_PROMPTS),
        excluded_llm_metadata_keys=list(_NOT_FOR_PROMPTS),
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=case.case_id)},
    )


def node_to_case(node: BaseNode) -> AdjudicatedCase:
    """Rebuild the case a node was made from (``case_to_node``'s inverse)."""
    meta = node.metadata
    entities = None
    if meta.get("account_id") is not None:
        entities = Entities(**{name: meta.get(name) or "" for name in _ENTITY_FIELDS})
    occurred_at = meta.get("occurred_at")
    return AdjudicatedCase(
        case_id=meta["case_id"],
        event_type=EventType(meta["event_type"]),
        features={k: (math.nan if v is None else float(v)) for k, v in (meta.get("features") or {}).items()},
        outcome=Outcome(meta["outcome"]),
        risk_type=meta.get("risk_type") or "",
        entities=entities,
        occurred_at=datetime.fromisoformat(occurred_at) if occurred_at else None,
        summary=node.get_content(),
    )


# -- retrieval --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievedCase:
    case: AdjudicatedCase
    similarity: float  # cosine similarity of the behaviour vectors, in [-1, 1]


class CaseRetriever(BaseRetriever):
    """LlamaIndex retriever over a case vector store, queried by behaviour vector.

    It has no text embedder: ``query_bundle.embedding`` must hold the behaviour vector (the query string is
    only a label for traces). ``filters`` go to the vector store as they are. ``exclude_case_ids`` are dropped
    after the search, which asks for that many more cases: the result is the same as a ``case_id`` NIN filter,
    but cheaper. On Qdrant Edge with 50k cases, an event_type-filtered query took ~0.7 ms and ~2 ms once any
    in-engine exclusion was added (``except``, ``must_not`` and ``has_id`` alike).

    Scores are cosine similarities clipped to [-1, 1]: Qdrant's engine computes them in float32 and
    qdrant-client's local mode in float64, and either can overshoot 1 by ~1e-7.
    """

    def __init__(
        self,
        vector_store: BasePydanticVectorStore,
        similarity_top_k: int,
        filters: MetadataFilters | None = None,
        exclude_case_ids: Sequence[str] = (),
        callback_manager: CallbackManager | None = None,
    ):
        if similarity_top_k < 1:
            raise ValueError("similarity_top_k must be at least 1")
        if isinstance(exclude_case_ids, str):
            raise TypeError("exclude_case_ids must be a sequence of case ids, not one string")
        self._vector_store = vector_store
        self._top_k = similarity_top_k
        self._filters = filters
        self._exclude = frozenset(exclude_case_ids)
        super().__init__(callback_manager=callback_manager)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if query_bundle.embedding is None:
            raise ValueError("CaseRetriever needs query_bundle.embedding: the behaviour vector of the event")
        result = self._vector_store.query(
            VectorStoreQuery(
                query_embedding=list(query_bundle.embedding),
                similarity_top_k=self._top_k + len(self._exclude),
                filters=self._filters,
                query_str=query_bundle.query_str,
            )
        )
        hits = [
            NodeWithScore(node=node, score=min(1.0, max(-1.0, float(score))))
            for node, score in zip(result.nodes or [], result.similarities or [])
            if node.metadata.get("case_id") not in self._exclude
        ]
        return hits[: self._top_k]


class CaseMemory:
    """Adjudicated cases behind one interface, whichever vector store holds them. Open with ``open_case_memory``."""

    def __init__(
        self,
        vector_store: BasePydanticVectorStore,
        encoder: BehaviourEncoder,
        *,
        backend: str,
        location: str,
        read_only: bool = False,
    ):
        self.vector_store = vector_store
        self.encoder = encoder
        self.backend = backend
        self.location = location
        self.read_only = read_only
        self._closed = False

    def add_cases(self, cases: Iterable[AdjudicatedCase], batch_size: int, progress: bool = False) -> int:
        """Write cases in batches; returns how many were written.

        Idempotent: a case's point id derives from its case id, so writing a case again replaces it (the count
        does not grow). The return value counts writes, not new cases.
        """
        if self.read_only:
            raise CaseMemoryReadOnlyError(f"case memory at {self.location} was opened read-only")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        total = len(cases) if isinstance(cases, Sequence) else None
        written = 0
        with tqdm(total=total, unit="case", desc=f"indexing cases ({self.backend})", disable=not progress) as bar:
            for batch in _batches(cases, batch_size):
                vectors = self.encoder.encode_many([case.features for case in batch])
                self.vector_store.add([case_to_node(case, vector) for case, vector in zip(batch, vectors)])
                written += len(batch)
                bar.update(len(batch))
        return written

    def count(self) -> int:
        """Exact number of cases stored."""
        store = self.vector_store
        if isinstance(store, QdrantEdgeVectorStore):
            return store.count()
        return store.client.count(collection_name=store.collection_name, exact=True).count

    def retriever(
        self, top_k: int, filters: MetadataFilters | None = None, exclude_case_ids: Sequence[str] = ()
    ) -> CaseRetriever:
        return CaseRetriever(
            self.vector_store, similarity_top_k=top_k, filters=filters, exclude_case_ids=exclude_case_ids
        )

    def similar_cases(
        self,
        features: Mapping[str, float],
        top_k: int,
        exclude_case_ids: Sequence[str] = (),
        event_type: EventType | None = None,
    ) -> list[RetrievedCase]:
        """The ``top_k`` stored cases whose behaviour is most similar to ``features``, most similar first.

        ``exclude_case_ids`` are never returned (e.g. the event's own case); ``event_type`` keeps only cases of
        that type. ``top_k`` cases come back whenever that many match.
        """
        filters = None
        if event_type is not None:
            filters = MetadataFilters(filters=[MetadataFilter(key="event_type", value=EventType(event_type).value)])
        label = f"adjudicated cases behaving like this {EventType(event_type).value if event_type else 'any'} event"
        bundle = QueryBundle(query_str=label, embedding=self.encoder.encode(features))
        hits = self.retriever(top_k, filters, exclude_case_ids).retrieve(bundle)
        return [RetrievedCase(case=node_to_case(hit.node), similarity=float(hit.score)) for hit in hits]

    def close(self) -> None:
        """Release the engine (the Edge shard's folder lock; qdrant-client's local folder lock). Idempotent."""
        if self._closed:
            return
        self._closed = True
        store = self.vector_store
        if isinstance(store, QdrantEdgeVectorStore):
            store.close()
        else:
            store.client.close()

    def __enter__(self) -> CaseMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _batches(items: Iterable[AdjudicatedCase], size: int) -> Iterator[list[AdjudicatedCase]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


# -- opening ----------------------------------------------------------------------------------------------------


def open_case_memory(
    settings: RetrievalSettings, encoder: BehaviourEncoder, read_only: bool = False
) -> CaseMemory:
    """Open (creating unless ``read_only``) the case memory that ``settings`` describe.

    ``read_only`` refuses writes and raises ``CaseIndexNotFoundError`` instead of creating a missing index. It
    does not share the index: an Edge shard and a qdrant-client local folder are owned by one open store at a
    time (only a Qdrant server serves many readers).
    """
    if settings.backend == "edge":
        path = Path(settings.edge_path)
        try:
            store = QdrantEdgeVectorStore(
                path,
                encoder.dimension,
                distance="cosine",
                vector_name=VECTOR_NAME,
                keyword_index_fields=KEYWORD_FIELDS,
                create_if_missing=not read_only,
            )
        except EdgeShardNotFoundError:
            raise CaseIndexNotFoundError(
                f"no case index at {path} (retrieval.edge_path): build it with the `index` command"
            ) from None
        return CaseMemory(store, encoder, backend="edge", location=str(path), read_only=read_only)
    if settings.backend == "qdrant":
        return _open_qdrant(settings, encoder, read_only)
    raise ValueError(f"unknown retrieval.backend {settings.backend!r}")


def _open_qdrant(settings: RetrievalSettings, encoder: BehaviourEncoder, read_only: bool) -> CaseMemory:
    # Imported here so that processes on the Edge backend do not load qdrant-client.
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    if settings.qdrant_url:
        client = QdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key)
        location = f"{settings.qdrant_url.rstrip('/')}/collections/{settings.collection}"
        server = True
    else:
        path = Path(settings.qdrant_path)  # the settings validator guarantees a url or a path
        if read_only and not path.exists():
            raise CaseIndexNotFoundError(
                f"no case index at {path} (retrieval.qdrant_path): build it with the `index` command"
            )
        client = QdrantClient(path=str(path))
        location = f"{path}#{settings.collection}"
        server = False
    try:
        _ensure_collection(client, settings.collection, encoder.dimension, read_only, server, location)
        # The collection exists with a named vector, so QdrantVectorStore detects it and never creates one.
        store = QdrantVectorStore(
            collection_name=settings.collection,
            client=client,
            batch_size=settings.index_batch_size,
            dense_vector_name=VECTOR_NAME,
        )
    except BaseException:
        client.close()
        raise
    return CaseMemory(store, encoder, backend="qdrant", location=location, read_only=read_only)


def _ensure_collection(
    client: QdrantClient, collection: str, dimension: int, read_only: bool, server: bool, location: str
) -> None:
    from qdrant_client import models

    if not client.collection_exists(collection):
        if read_only:
            raise CaseIndexNotFoundError(f"no case index at {location}: build it with the `index` command")
        client.create_collection(
            collection,
            vectors_config={VECTOR_NAME: models.VectorParams(size=dimension, distance=models.Distance.COSINE)},
        )
    info = client.get_collection(collection)
    vectors = info.config.params.vectors
    params = vectors.get(VECTOR_NAME) if isinstance(vectors, dict) else None
    if params is None or params.size != dimension or params.distance != models.Distance.COSINE:
        raise ValueError(
            f"collection {location} does not hold {dimension}-d cosine vectors named {VECTOR_NAME!r} "
            f"(it has {vectors}): it was built for other features or by another tool; use another collection"
        )
    # Local mode ignores payload indexes (and warns); a server uses them for filtered search.
    if server and not read_only:
        for name in ("doc_id", *KEYWORD_FIELDS):
            if name not in (info.payload_schema or {}):
                client.create_payload_index(collection, name, models.PayloadSchemaType.KEYWORD)
