"""qdrant-client's side of a collection with several named dense vectors (a Qdrant server, or local mode).

``NamedVectorsQdrantStore`` is LlamaIndex's ``QdrantVectorStore`` taught what ``QdrantEdgeVectorStore`` does:
``add(nodes, named_vectors=...)`` writes every named vector of a point in one upsert (``QdrantVectorStore.add``
writes only its own vector, and an upsert replaces the whole point), ``query(..., vector_name=...)`` searches
another vector, ``scroll_nodes`` lists nodes by filter (ordered by a datetime key if asked) and ``count`` counts
them. Payloads are ``node_to_metadata_dict``'s, as in ``QdrantVectorStore`` and the Edge store, so the same nodes
are stored the same way on either backend.

qdrant-client's local mode locks its folder for one client, so collections in one local folder (the case memory
and the policy library) share one client here: ``acquire_local_client`` counts its users and closes it after the
last ``release_client``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import DEFAULT_DOC_ID_KEY, node_to_metadata_dict
from llama_index.vector_stores.qdrant import QdrantVectorStore
from qdrant_client import QdrantClient, models

_SCROLL_PAGE = 1024
_TIME_RANGES = {FilterOperator.GT: "gt", FilterOperator.GTE: "gte", FilterOperator.LT: "lt", FilterOperator.LTE: "lte"}


class NamedVectorsQdrantStore(QdrantVectorStore):
    """``QdrantVectorStore`` over a collection whose points hold several named dense vectors.

    ``dense_vector_name`` is the default vector (a node's ``embedding``); the collection must already exist with
    every vector in ``vector_names`` (see ``ensure_collection``).
    """

    _vector_names: tuple[str, ...] = PrivateAttr(default=())

    def __init__(self, collection_name: str, client: QdrantClient, vector_names: Sequence[str], **kwargs: Any):
        super().__init__(
            collection_name=collection_name, client=client, dense_vector_name=vector_names[0], **kwargs
        )
        self._vector_names = tuple(vector_names)

    @classmethod
    def class_name(cls) -> str:
        return "NamedVectorsQdrantStore"

    @property
    def vector_names(self) -> tuple[str, ...]:
        return self._vector_names

    def add(
        self,
        nodes: Sequence[BaseNode],
        named_vectors: Sequence[Mapping[str, Sequence[float]]] | None = None,
        **add_kwargs: Any,
    ) -> list[str]:
        """Upsert nodes (each must carry its default vector as ``embedding``), with their extra named vectors."""
        if not nodes:
            return []
        if named_vectors is None:
            named_vectors = [{}] * len(nodes)
        if len(named_vectors) != len(nodes):
            raise ValueError(f"{len(named_vectors)} named-vector mappings for {len(nodes)} nodes")
        extra = set(self._vector_names[1:])
        points = []
        for node, vectors in zip(nodes, named_vectors):
            if unknown := set(vectors) - extra:
                raise ValueError(f"unknown extra vectors {sorted(unknown)}; the collection has {sorted(extra)}")
            points.append(
                models.PointStruct(
                    id=node.node_id,
                    vector={self.dense_vector_name: node.get_embedding(), **{k: list(v) for k, v in vectors.items()}},
                    payload=node_to_metadata_dict(node, remove_text=False, flat_metadata=self.flat_metadata),
                )
            )
        self._client.upload_points(
            collection_name=self.collection_name,
            points=points,
            batch_size=self.batch_size,
            parallel=self.parallel,
            max_retries=self.max_retries,
            wait=True,
        )
        return [node.node_id for node in nodes]

    def query(
        self, query: VectorStoreQuery, vector_name: str | None = None, **kwargs: Any
    ) -> VectorStoreQueryResult:
        """``QdrantVectorStore.query`` over ``vector_name`` (default: the default vector)."""
        if vector_name is None or vector_name == self.dense_vector_name:
            return super().query(query, **kwargs)
        if vector_name not in self._vector_names:
            raise ValueError(
                f"collection {self.collection_name} has no vector {vector_name!r} (it has {list(self._vector_names)})"
            )
        if query.query_embedding is None:
            raise ValueError("query needs query.query_embedding")
        response = self._client.query_points(
            collection_name=self.collection_name,
            query=list(query.query_embedding),
            using=vector_name,
            limit=query.similarity_top_k,
            query_filter=self._build_query_filter(query),
        )
        return self.parse_to_query_result(response.points)

    def scroll_nodes(
        self,
        filters: MetadataFilters | None = None,
        limit: int | None = None,
        order_by: str | None = None,
        descending: bool = True,
    ) -> list[BaseNode]:
        """Nodes matching ``filters``, without vectors; see ``QdrantEdgeVectorStore.scroll_nodes``."""
        scroll_filter = self._build_subfilter(filters) if filters is not None and filters.filters else None
        if order_by is not None:
            if limit is None:
                raise ValueError("scroll_nodes with order_by needs a limit")
            direction = models.Direction.DESC if descending else models.Direction.ASC
            records, _ = self._client.scroll(
                self.collection_name,
                scroll_filter=scroll_filter,
                limit=limit,
                order_by=models.OrderBy(key=order_by, direction=direction),
                with_payload=True,
            )
            return self.parse_to_query_result(records).nodes
        nodes: list[BaseNode] = []
        offset = None
        while limit is None or len(nodes) < limit:
            page = _SCROLL_PAGE if limit is None else min(_SCROLL_PAGE, limit - len(nodes))
            records, offset = self._client.scroll(
                self.collection_name, scroll_filter=scroll_filter, limit=page, offset=offset, with_payload=True
            )
            nodes += self.parse_to_query_result(records).nodes
            if offset is None:
                break
        return nodes

    def _build_subfilter(self, filters: MetadataFilters) -> models.Filter:
        """``QdrantVectorStore``'s translation, plus what the Edge store also accepts: a range (GT, GTE, LT, LTE)
        with a string value is a time, a ``DatetimeRange`` (``QdrantVectorStore`` would reject it as no number)."""
        times = [
            f for f in filters.filters
            if isinstance(f, MetadataFilter) and f.operator in _TIME_RANGES and isinstance(f.value, str)
        ]
        if not times:
            return super()._build_subfilter(filters)
        if filters.condition not in (None, FilterCondition.AND):
            raise NotImplementedError("time ranges are supported in AND filters only")
        rest = [f for f in filters.filters if all(f is not t for t in times)]
        built = super()._build_subfilter(MetadataFilters(filters=rest)) if rest else models.Filter()
        built.must = list(built.must or []) + [
            models.FieldCondition(key=t.key, range=models.DatetimeRange(**{_TIME_RANGES[t.operator]: t.value}))
            for t in times
        ]
        return built

    def count(self, filters: MetadataFilters | None = None) -> int:
        """Exact number of points (matching ``filters`` when given)."""
        count_filter = self._build_subfilter(filters) if filters is not None and filters.filters else None
        return self._client.count(self.collection_name, count_filter=count_filter, exact=True).count


# -- collections ------------------------------------------------------------------------------------------------


def ensure_collection(
    client: QdrantClient,
    collection: str,
    vectors: Mapping[str, int],
    keyword_fields: Sequence[str],
    datetime_fields: Sequence[str],
    *,
    create: bool,
    server: bool,
    location: str,
) -> bool:
    """Check (creating it when ``create``) that ``collection`` holds the cosine ``vectors`` (name → size).

    Returns False when it does not exist and ``create`` is False. Raises ``ValueError`` naming the difference
    when it exists with other vectors. On a server, payload indexes are created for the filtered keys (local
    mode ignores them, and warns).
    """
    if not client.collection_exists(collection):
        if not create:
            return False
        client.create_collection(
            collection,
            vectors_config={
                name: models.VectorParams(size=size, distance=models.Distance.COSINE) for name, size in vectors.items()
            },
        )
    info = client.get_collection(collection)
    have = info.config.params.vectors
    for name, size in vectors.items():
        params = have.get(name) if isinstance(have, dict) else None
        if params is None or params.size != size or params.distance != models.Distance.COSINE:
            raise ValueError(
                f"collection {location} does not hold {size}-d cosine vectors named {name!r} (it has {have}): it "
                "was built for other features, by an older version or by another tool; delete it and re-index, "
                "or use another collection"
            )
    if server and create:
        schema = info.payload_schema or {}
        wanted = [(name, models.PayloadSchemaType.KEYWORD) for name in (DEFAULT_DOC_ID_KEY, *keyword_fields)]
        wanted += [(name, models.PayloadSchemaType.DATETIME) for name in datetime_fields]
        for name, kind in wanted:
            if name not in schema:
                client.create_payload_index(collection, name, kind)
    return True


# -- clients ----------------------------------------------------------------------------------------------------

_local_lock = threading.Lock()
_local_clients: dict[Path, tuple[QdrantClient, int]] = {}


def acquire_local_client(path: Path) -> QdrantClient:
    """The one local-mode client of ``path`` in this process (opened on first use); pair with ``release_client``."""
    key = Path(path).resolve()
    with _local_lock:
        client, users = _local_clients.get(key, (None, 0))
        if client is None:
            client = QdrantClient(path=str(key))
        _local_clients[key] = (client, users + 1)
        return client


def release_client(client: QdrantClient) -> None:
    """Close ``client``, or (a shared local one) drop one user and close it after the last. Once per acquire."""
    with _local_lock:
        for key, (shared, users) in list(_local_clients.items()):
            if shared is client:
                if users > 1:
                    _local_clients[key] = (shared, users - 1)
                    return
                del _local_clients[key]
                break
    client.close()
