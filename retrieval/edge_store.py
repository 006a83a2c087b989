"""A LlamaIndex vector store over a Qdrant Edge shard: the real Qdrant engine, in-process, on disk.

qdrant-client and LlamaIndex's ``QdrantVectorStore`` cannot drive Qdrant Edge (it has its own API: ``EdgeShard``,
``Point``, ``QueryRequest``, ``Filter``), so this store translates LlamaIndex's vocabulary to it. It keeps the
payload layout of ``QdrantVectorStore`` (``node_to_metadata_dict``: the node's metadata at the top level, the whole
node as ``_node_content``, ``doc_id`` for delete by ref_doc_id), so the same nodes look the same in both stores
and filters written for one work on the other.

Contract worth knowing before use:

- One process owns a shard folder: Edge holds a lock on its write-ahead log from open until ``close()`` (or until
  the store is garbage-collected). A second open, in this process or another, raises ``EdgeShardLockedError``.
  There is no read-only open: readers take the lock too.
- Point ids are deterministic: a node id that is already a UUID is used as is (as ``QdrantVectorStore`` does, so
  both stores give a node the same point id); any other node id becomes ``uuid5(EDGE_POINT_NAMESPACE, node_id)``.
  Re-adding a node overwrites its point instead of duplicating it.
- Scores are what Qdrant returns for the configured distance: for cosine, the cosine similarity of the normalised
  vectors (float32, so it can stray from [-1, 1] by ~1e-7; a zero vector scores 0 against everything).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import (
    DEFAULT_DOC_ID_KEY,
    metadata_dict_to_node,
    node_to_metadata_dict,
)

EDGE_POINT_NAMESPACE = uuid.UUID("6f1f3a52-8d0e-5c53-9a47-2b1c0e6d7f10")
"""Namespace of the uuid5 point ids made from node ids that are not UUIDs. Changing it orphans existing shards."""

DEFAULT_VECTOR_NAME = "behaviour"

_WAL_LOCKED_MARKERS = ("WouldBlock", "failed to open WAL")
_SCROLL_PAGE = 1024
# Rebuilding a node needs only these two payload keys. Edge converts payloads to Python key by key (~2 µs a key),
# so reading just these instead of every metadata key keeps a query's cost in the engine, not in the conversion.
_NODE_KEYS = qe.PayloadSelector.Include(["_node_content", "_node_type"])


class EdgeShardLockedError(RuntimeError):
    """The shard folder is open in another EdgeShard: another process, or another store in this one."""

    def __init__(self, path: Path, cause: str):
        self.path = path
        super().__init__(
            f"Qdrant Edge shard folder {path} is locked: another process (e.g. a running riskcascade platform or "
            f"an `index` command) or another open store in this process holds it. Qdrant Edge lets one process "
            f"own a shard: stop or close the holder, or point retrieval.edge_path at another folder. ({cause})"
        )


class EdgeShardNotFoundError(FileNotFoundError):
    """No shard at the path and the store was asked not to create one."""


def edge_point_id(node_id: str) -> str:
    """The point id a node is stored under: the node id itself when it is a UUID, else its uuid5."""
    try:
        return str(uuid.UUID(node_id))
    except ValueError:
        return str(uuid.uuid5(EDGE_POINT_NAMESPACE, node_id))


def shard_exists(path: Path) -> bool:
    """Whether ``path`` holds an Edge shard (its config file, written at create, is there)."""
    return (Path(path) / "edge_config.json").is_file()


class QdrantEdgeVectorStore(BasePydanticVectorStore):
    """LlamaIndex vector store over one Qdrant Edge shard with one named dense vector.

    Args:
        path: shard folder; created (with ``dimension``) when it holds no shard yet.
        dimension: vector size. Needed to create a shard; when given for an existing shard it is checked
            against it, and a mismatch raises ``ValueError``.
        distance: ``"cosine"``, ``"dot"`` or ``"euclid"`` (used only when creating).
        vector_name: name of the dense vector.
        keyword_index_fields: payload keys given a keyword index (created if missing, on every open);
            ``doc_id`` is always indexed because delete by ref_doc_id filters on it.
        create_if_missing: False raises ``EdgeShardNotFoundError`` instead of creating a shard.
    """

    stores_text: bool = True
    flat_metadata: bool = False

    path: str
    vector_name: str = DEFAULT_VECTOR_NAME
    dimension: int | None = None
    keyword_index_fields: list[str] = Field(default_factory=list)

    _shard: qe.EdgeShard | None = PrivateAttr(default=None)

    def __init__(
        self,
        path: str | Path,
        dimension: int | None = None,
        *,
        distance: str = "cosine",
        vector_name: str = DEFAULT_VECTOR_NAME,
        keyword_index_fields: Sequence[str] = (),
        create_if_missing: bool = True,
    ) -> None:
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {sorted(_DISTANCES)}, not {distance!r}")
        fields = list(dict.fromkeys([DEFAULT_DOC_ID_KEY, *keyword_index_fields]))
        super().__init__(
            path=str(Path(path)),
            vector_name=vector_name,
            dimension=dimension,
            keyword_index_fields=fields,
        )
        self._shard = _open_shard(Path(path), dimension, _DISTANCES[distance], vector_name, create_if_missing)
        existing = self._shard.info().payload_schema
        for name in fields:
            if name not in existing:
                self._shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))

    @classmethod
    def class_name(cls) -> str:
        return "QdrantEdgeVectorStore"

    @property
    def client(self) -> qe.EdgeShard:
        """The open ``EdgeShard``."""
        return self._open()

    # -- writes -------------------------------------------------------------------------------------------------

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Upsert nodes (each must carry an embedding); returns their node ids."""
        if not nodes:
            return []
        points = []
        for node in nodes:
            embedding = node.get_embedding()  # raises if the node has none
            payload = node_to_metadata_dict(node, remove_text=False, flat_metadata=self.flat_metadata)
            points.append(
                qe.Point(id=edge_point_id(node.node_id), vector={self.vector_name: embedding}, payload=payload)
            )
        self._open().update(qe.UpdateOperation.upsert_points(points))
        return [node.node_id for node in nodes]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node whose source document is ``ref_doc_id``."""
        self._open().update(qe.UpdateOperation.delete_points_by_filter(_doc_id_filter([ref_doc_id])))

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """Delete nodes by id and/or metadata filters (both given: nodes matching both)."""
        must = []
        if node_ids is not None:
            must.append(qe.HasIdCondition({edge_point_id(n) for n in node_ids}))
        if filters is not None and filters.filters:
            must.append(metadata_filters_to_edge(filters))
        if not must:
            return
        self._open().update(qe.UpdateOperation.delete_points_by_filter(qe.Filter(must=must)))

    def clear(self) -> None:
        """Delete every point (the shard and its payload indexes stay)."""
        self._open().update(qe.UpdateOperation.delete_points_by_filter(qe.Filter()))

    # -- reads --------------------------------------------------------------------------------------------------

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Nearest neighbours of ``query.query_embedding`` among points matching the filters.

        Supports ``filters`` (MetadataFilters, nested, AND/OR/NOT), ``doc_ids`` and ``node_ids``. Only the
        default (dense) mode exists here.
        """
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise NotImplementedError(f"QdrantEdgeVectorStore supports only dense queries, not {query.mode.value}")
        if query.query_embedding is None:
            raise ValueError("QdrantEdgeVectorStore.query needs query.query_embedding")
        request = qe.QueryRequest(
            limit=query.similarity_top_k,
            query=qe.Query.Nearest(list(query.query_embedding), using=self.vector_name),
            filter=_query_filter(query),
            with_payload=_NODE_KEYS,
            with_vector=False,
        )
        nodes, similarities, ids = [], [], []
        for point in self._open().query(request):
            node = metadata_dict_to_node(point.payload)
            nodes.append(node)
            similarities.append(point.score)
            ids.append(node.node_id)
        return VectorStoreQueryResult(nodes=nodes, similarities=similarities, ids=ids)

    def get_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
    ) -> list[BaseNode]:
        """Nodes by id and/or metadata filters, with their embeddings (normalised for cosine)."""
        must = []
        if node_ids is not None:
            must.append(qe.HasIdCondition({edge_point_id(n) for n in node_ids}))
        if filters is not None and filters.filters:
            must.append(metadata_filters_to_edge(filters))
        edge_filter = qe.Filter(must=must) if must else None
        shard = self._open()
        nodes: list[BaseNode] = []
        offset = None
        while True:
            records, offset = shard.scroll(
                qe.ScrollRequest(
                    offset=offset, limit=_SCROLL_PAGE, filter=edge_filter, with_payload=_NODE_KEYS, with_vector=True
                )
            )
            for record in records:
                node = metadata_dict_to_node(record.payload)
                node.embedding = (record.vector or {}).get(self.vector_name)
                nodes.append(node)
            if offset is None:
                return nodes

    def count(self) -> int:
        """Exact number of points in the shard."""
        return self._open().count(qe.CountRequest(exact=True))

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write pending changes to the segments (the WAL already makes each update durable)."""
        self._open().flush()

    def optimize(self) -> bool:
        """Run Qdrant's segment optimizers (merging, HNSW build) to completion.

        Holds the GIL for seconds to minutes on large shards: call it from an indexing process, never from a
        serving one. Returns whether anything was optimized.
        """
        return self._open().optimize()

    def close(self) -> None:
        """Flush and close the shard, releasing its folder lock. Idempotent."""
        if self._shard is not None:
            shard, self._shard = self._shard, None
            shard.flush()
            shard.close()

    @property
    def is_open(self) -> bool:
        return self._shard is not None

    def __enter__(self) -> QdrantEdgeVectorStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open(self) -> qe.EdgeShard:
        if self._shard is None:
            raise RuntimeError(f"Qdrant Edge shard {self.path} is closed")
        return self._shard


# -- opening ----------------------------------------------------------------------------------------------------

_DISTANCES = {"cosine": qe.Distance.Cosine, "dot": qe.Distance.Dot, "euclid": qe.Distance.Euclid}


def _open_shard(
    path: Path, dimension: int | None, distance: qe.Distance, vector_name: str, create_if_missing: bool
) -> qe.EdgeShard:
    config = None
    if dimension is not None:
        config = qe.EdgeConfig(vectors={vector_name: qe.EdgeVectorParams(size=dimension, distance=distance)})
    exists = shard_exists(path)
    if not exists and not create_if_missing:
        raise EdgeShardNotFoundError(f"no Qdrant Edge shard at {path}")
    if not exists and config is None:
        raise ValueError(f"no Qdrant Edge shard at {path}, and creating one needs the vector dimension")
    try:
        if exists:
            # With a config, Edge checks it against the segments (and rewrites the stored config): a wrong
            # dimension or vector name fails here instead of at the first upsert.
            return qe.EdgeShard.load(str(path), config)
        path.mkdir(parents=True, exist_ok=True)
        return qe.EdgeShard.create(str(path), config)
    except Exception as exc:  # qdrant_edge raises bare Exception for every engine error
        message = str(exc)
        if any(marker in message for marker in _WAL_LOCKED_MARKERS):
            raise EdgeShardLockedError(path, message) from exc
        if "incompatible" in message.lower():
            raise ValueError(f"Qdrant Edge shard {path} does not match the requested vectors: {message}") from exc
        raise


# -- filters ----------------------------------------------------------------------------------------------------


def _doc_id_filter(doc_ids: list[str]) -> qe.Filter:
    return qe.Filter(must=[qe.FieldCondition(key=DEFAULT_DOC_ID_KEY, match=qe.MatchAny(list(doc_ids)))])


def _query_filter(query: VectorStoreQuery) -> qe.Filter | None:
    must: list[Any] = []
    should: list[Any] = []
    must_not: list[Any] = []
    if query.doc_ids:
        must.append(qe.FieldCondition(key=DEFAULT_DOC_ID_KEY, match=qe.MatchAny(list(query.doc_ids))))
    if query.node_ids:
        must.append(qe.HasIdCondition({edge_point_id(n) for n in query.node_ids}))
    if query.filters is not None and query.filters.filters:
        more_must, should, more_must_not = _clauses(query.filters)
        must += more_must
        must_not += more_must_not
    if not (must or should or must_not):
        return None
    return qe.Filter(must=must or None, should=should or None, must_not=must_not or None)


def metadata_filters_to_edge(filters: MetadataFilters) -> qe.Filter:
    """Translate LlamaIndex MetadataFilters into an Edge ``Filter``, with ``QdrantVectorStore``'s semantics.

    EQ, NE, IN, NIN, GT, GTE, LT, LTE, TEXT_MATCH, IS_EMPTY; nested MetadataFilters; AND → must, OR → should,
    NOT → must_not. NE and NIN use Qdrant's ``except`` match, which (in the Qdrant engine) also matches points
    that lack the key.

    AND and NOT groups nested in an AND are spliced into the outer filter rather than nested as sub-filters:
    Qdrant's planner uses payload indexes only for top-level conditions, and a nested ``Filter`` made an
    indexed event_type match twice as slow as the same match at the top level (slower than no filter at all).
    """
    must, should, must_not = _clauses(filters)
    return qe.Filter(must=must or None, should=should or None, must_not=must_not or None)


def _clauses(filters: MetadataFilters) -> tuple[list[Any], list[Any], list[Any]]:
    """(must, should, must_not) condition lists of one MetadataFilters group."""
    condition = filters.condition or FilterCondition.AND
    conditions: list[Any] = []
    spliced_must: list[Any] = []
    spliced_must_not: list[Any] = []
    for item in filters.filters:
        if isinstance(item, MetadataFilters):
            if not item.filters:
                continue
            inner = item.condition or FilterCondition.AND
            if condition == FilterCondition.AND and inner in (FilterCondition.AND, FilterCondition.NOT):
                inner_must, _, inner_must_not = _clauses(item)
                spliced_must += inner_must
                spliced_must_not += inner_must_not
            else:
                conditions.append(metadata_filters_to_edge(item))
            continue
        conditions.append(_condition(item))
    if condition == FilterCondition.AND:
        return spliced_must + conditions, [], spliced_must_not
    if condition == FilterCondition.OR:
        return [], conditions, []
    if condition == FilterCondition.NOT:
        return [], [], conditions
    raise NotImplementedError(f"filter condition {condition} is not supported")


def _condition(item: MetadataFilter) -> Any:
    key, value, op = item.key, item.value, item.operator or FilterOperator.EQ
    if op == FilterOperator.EQ:
        if isinstance(value, float):
            return qe.FieldCondition(key=key, range=qe.RangeFloat(gte=value, lte=value))
        return qe.FieldCondition(key=key, match=qe.MatchValue(_scalar(key, value)))
    if op == FilterOperator.NE:
        return qe.FieldCondition(key=key, match=qe.MatchExcept([_scalar(key, value)]))
    if op == FilterOperator.IN:
        return qe.FieldCondition(key=key, match=qe.MatchAny(_values(key, value)))
    if op == FilterOperator.NIN:
        return qe.FieldCondition(key=key, match=qe.MatchExcept(_values(key, value)))
    if op in _RANGES:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"filter {key} {op.value} needs a number, got {value!r}")
        return qe.FieldCondition(key=key, range=qe.RangeFloat(**{_RANGES[op]: float(value)}))
    if op in (FilterOperator.TEXT_MATCH, FilterOperator.TEXT_MATCH_INSENSITIVE):
        return qe.FieldCondition(key=key, match=qe.MatchText(str(value)))
    if op == FilterOperator.IS_EMPTY:
        return qe.IsEmptyCondition(key)
    raise NotImplementedError(
        f"filter operator {op.value} is not supported by QdrantEdgeVectorStore "
        "(supported: EQ, NE, IN, NIN, GT, GTE, LT, LTE, TEXT_MATCH, IS_EMPTY)"
    )


_RANGES = {
    FilterOperator.GT: "gt",
    FilterOperator.GTE: "gte",
    FilterOperator.LT: "lt",
    FilterOperator.LTE: "lte",
}


def _scalar(key: str, value: Any) -> str | int:
    if isinstance(value, (str, int)):
        return value
    raise ValueError(f"filter {key}: match needs a string or an integer, got {value!r}")


def _values(key: str, value: Any) -> list[str] | list[int]:
    # A comma-separated string is accepted, as QdrantVectorStore does.
    values = value if isinstance(value, list) else str(value).split(",")
    if all(isinstance(v, str) for v in values) or all(isinstance(v, int) for v in values):
        return list(values)
    raise ValueError(f"filter {key}: in/nin need all strings or all integers, got {value!r}")
