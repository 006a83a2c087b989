"""A LlamaIndex vector store over a Qdrant Edge shard: the real Qdrant engine, in-process, on disk.

qdrant-client and LlamaIndex's ``QdrantVectorStore`` cannot drive Qdrant Edge (it has its own API: ``EdgeShard``,
``Point``, ``QueryRequest``, ``Filter``), so this store translates LlamaIndex's vocabulary to it. It keeps the
payload layout of ``QdrantVectorStore`` (``node_to_metadata_dict``: the node's metadata at the top level, the whole
node as ``_node_content``, ``doc_id`` for delete by ref_doc_id), so the same nodes look the same in both stores
and filters written for one work on the other.

Contract worth knowing before use:

- One shard is one collection. A point may hold several named dense vectors: ``vector_name`` is the default one
  (a node's ``embedding``, and what ``query`` searches unless told otherwise); ``extra_vectors`` are passed to
  ``add`` as ``named_vectors`` and searched with ``query(..., vector_name=...)``.
- One process owns a shard folder: Edge holds a lock on its write-ahead log from open until ``close()`` (or until
  the store is garbage-collected). A second open, in this process or another, raises ``EdgeShardLockedError``.
  There is no read-only open: readers take the lock too.
- Point ids are deterministic: a node id that is already a UUID is used as is (as ``QdrantVectorStore`` does, so
  both stores give a node the same point id); any other node id becomes ``uuid5(EDGE_POINT_NAMESPACE, node_id)``.
  Re-adding a node overwrites its point (all of its vectors) instead of duplicating it.
- Scores are what Qdrant returns for the configured distance: for cosine, the cosine similarity of the normalised
  vectors (float32, so it can stray from [-1, 1] by ~1e-7; a zero vector scores 0 against everything).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
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

from retrieval.edge_filters import (
    EDGE_POINT_NAMESPACE,
    doc_id_filter,
    edge_point_id,
    metadata_filters_to_edge,
    query_filter,
)

__all__ = [
    "EDGE_POINT_NAMESPACE",
    "EdgeShardLockedError",
    "EdgeShardNotFoundError",
    "QdrantEdgeVectorStore",
    "edge_point_id",
    "metadata_filters_to_edge",
    "shard_exists",
]

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


def shard_exists(path: Path) -> bool:
    """Whether ``path`` holds an Edge shard (its config file, written at create, is there)."""
    return (Path(path) / "edge_config.json").is_file()


class QdrantEdgeVectorStore(BasePydanticVectorStore):
    """LlamaIndex vector store over one Qdrant Edge shard with one or more named dense vectors.

    Args:
        path: shard folder; created (with ``dimension``) when it holds no shard yet.
        dimension: size of the default vector. Needed to create a shard; when given for an existing shard the
            vectors are checked against it, and a mismatch raises ``ValueError``.
        distance: ``"cosine"``, ``"dot"`` or ``"euclid"``, for every vector (used only when creating).
        vector_name: name of the default dense vector (the nodes' ``embedding``).
        extra_vectors: further named dense vectors and their sizes (needs ``dimension``).
        keyword_index_fields: payload keys given a keyword index (created if missing, on every open);
            ``doc_id`` is always indexed because delete by ref_doc_id filters on it.
        datetime_index_fields: payload keys (RFC 3339 strings) given a datetime index, which ``scroll_nodes``
            needs to order by them.
        create_if_missing: False raises ``EdgeShardNotFoundError`` instead of creating a shard.
    """

    stores_text: bool = True
    flat_metadata: bool = False

    path: str
    vector_name: str = DEFAULT_VECTOR_NAME
    dimension: int | None = None
    extra_vectors: dict[str, int] = Field(default_factory=dict)
    keyword_index_fields: list[str] = Field(default_factory=list)
    datetime_index_fields: list[str] = Field(default_factory=list)

    _shard: qe.EdgeShard | None = PrivateAttr(default=None)

    def __init__(
        self,
        path: str | Path,
        dimension: int | None = None,
        *,
        distance: str = "cosine",
        vector_name: str = DEFAULT_VECTOR_NAME,
        extra_vectors: Mapping[str, int] | None = None,
        keyword_index_fields: Sequence[str] = (),
        datetime_index_fields: Sequence[str] = (),
        create_if_missing: bool = True,
    ) -> None:
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {sorted(_DISTANCES)}, not {distance!r}")
        extra = dict(extra_vectors or {})
        if extra and dimension is None:
            raise ValueError("extra_vectors need the default vector's dimension too")
        if vector_name in extra:
            raise ValueError(f"vector {vector_name!r} is both the default and an extra vector")
        fields = list(dict.fromkeys([DEFAULT_DOC_ID_KEY, *keyword_index_fields]))
        super().__init__(
            path=str(Path(path)),
            vector_name=vector_name,
            dimension=dimension,
            extra_vectors=extra,
            keyword_index_fields=fields,
            datetime_index_fields=list(datetime_index_fields),
        )
        sizes = {vector_name: dimension, **extra} if dimension is not None else None
        self._shard = _open_shard(Path(path), sizes, _DISTANCES[distance], create_if_missing)
        existing = self._shard.info().payload_schema
        wanted = [(name, qe.PayloadSchemaType.Keyword) for name in fields]
        wanted += [(name, qe.PayloadSchemaType.Datetime) for name in datetime_index_fields]
        for name, schema in wanted:
            if name not in existing:
                self._shard.update(qe.UpdateOperation.create_field_index(name, schema))

    @classmethod
    def class_name(cls) -> str:
        return "QdrantEdgeVectorStore"

    @property
    def client(self) -> qe.EdgeShard:
        """The open ``EdgeShard``."""
        return self._open()

    @property
    def vector_names(self) -> tuple[str, ...]:
        """The default vector's name, then the extra vectors'."""
        return (self.vector_name, *self.extra_vectors)

    # -- writes -------------------------------------------------------------------------------------------------

    def add(
        self,
        nodes: Sequence[BaseNode],
        named_vectors: Sequence[Mapping[str, Sequence[float]]] | None = None,
        **add_kwargs: Any,
    ) -> list[str]:
        """Upsert nodes (each must carry its default vector as ``embedding``); returns their node ids.

        ``named_vectors``, one mapping per node, adds the extra vectors (a point may lack some: it is then not
        found by searches of those vectors).
        """
        if not nodes:
            return []
        extras = _named_vectors_per_node(nodes, named_vectors, self.vector_names)
        points = []
        for node, extra in zip(nodes, extras):
            embedding = node.get_embedding()  # raises if the node has none
            payload = node_to_metadata_dict(node, remove_text=False, flat_metadata=self.flat_metadata)
            vectors = {self.vector_name: embedding, **{k: list(v) for k, v in extra.items()}}
            points.append(qe.Point(id=edge_point_id(node.node_id), vector=vectors, payload=payload))
        self._open().update(qe.UpdateOperation.upsert_points(points))
        return [node.node_id for node in nodes]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node whose source document is ``ref_doc_id``."""
        self._open().update(qe.UpdateOperation.delete_points_by_filter(doc_id_filter([ref_doc_id])))

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """Delete nodes by id and/or metadata filters (both given: nodes matching both)."""
        edge_filter = _ids_and_filters(node_ids, filters)
        if edge_filter is None:
            return
        self._open().update(qe.UpdateOperation.delete_points_by_filter(edge_filter))

    def clear(self) -> None:
        """Delete every point (the shard and its payload indexes stay)."""
        self._open().update(qe.UpdateOperation.delete_points_by_filter(qe.Filter()))

    # -- reads --------------------------------------------------------------------------------------------------

    def query(
        self, query: VectorStoreQuery, vector_name: str | None = None, **kwargs: Any
    ) -> VectorStoreQueryResult:
        """Nearest neighbours of ``query.query_embedding`` by ``vector_name`` (default: the default vector).

        Supports ``filters`` (MetadataFilters, nested, AND/OR/NOT), ``doc_ids`` and ``node_ids``. Only the
        default (dense) mode exists here.
        """
        if query.mode != VectorStoreQueryMode.DEFAULT:
            raise NotImplementedError(f"QdrantEdgeVectorStore supports only dense queries, not {query.mode.value}")
        if query.query_embedding is None:
            raise ValueError("QdrantEdgeVectorStore.query needs query.query_embedding")
        using = self._vector(vector_name)
        request = qe.QueryRequest(
            limit=query.similarity_top_k,
            query=qe.Query.Nearest(list(query.query_embedding), using=using),
            filter=query_filter(query),
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
        """Nodes by id and/or metadata filters, with their default vector (normalised for cosine)."""
        edge_filter = _ids_and_filters(node_ids, filters)
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

    def scroll_nodes(
        self,
        filters: MetadataFilters | None = None,
        limit: int | None = None,
        order_by: str | None = None,
        descending: bool = True,
    ) -> list[BaseNode]:
        """Nodes matching ``filters``, without vectors: at most ``limit`` (None: all).

        With ``order_by`` (a key with a datetime index) they come sorted by it and points lacking it are left
        out; ``limit`` is then required, since Qdrant cannot page an ordered scroll. Ties come in no set order.
        """
        edge_filter = metadata_filters_to_edge(filters) if filters is not None and filters.filters else None
        shard = self._open()
        if order_by is not None:
            if limit is None:
                raise ValueError("scroll_nodes with order_by needs a limit")
            direction = qe.Direction.Desc if descending else qe.Direction.Asc
            records, _ = shard.scroll(
                qe.ScrollRequest(
                    limit=limit,
                    filter=edge_filter,
                    with_payload=_NODE_KEYS,
                    with_vector=False,
                    order_by=qe.OrderBy(order_by, direction=direction),
                )
            )
            return [metadata_dict_to_node(record.payload) for record in records]
        nodes: list[BaseNode] = []
        offset = None
        while limit is None or len(nodes) < limit:
            page = _SCROLL_PAGE if limit is None else min(_SCROLL_PAGE, limit - len(nodes))
            records, offset = shard.scroll(
                qe.ScrollRequest(offset=offset, limit=page, filter=edge_filter, with_payload=_NODE_KEYS)
            )
            nodes += [metadata_dict_to_node(record.payload) for record in records]
            if offset is None:
                break
        return nodes

    def count(self, filters: MetadataFilters | None = None) -> int:
        """Exact number of points in the shard (matching ``filters`` when given)."""
        edge_filter = metadata_filters_to_edge(filters) if filters is not None and filters.filters else None
        return self._open().count(qe.CountRequest(filter=edge_filter, exact=True))

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

    def _vector(self, vector_name: str | None) -> str:
        if vector_name is None:
            return self.vector_name
        if vector_name not in self.vector_names:
            raise ValueError(f"shard {self.path} has no vector {vector_name!r} (it has {list(self.vector_names)})")
        return vector_name


def _named_vectors_per_node(
    nodes: Sequence[BaseNode],
    named_vectors: Sequence[Mapping[str, Sequence[float]]] | None,
    known: Sequence[str],
) -> Sequence[Mapping[str, Sequence[float]]]:
    """``named_vectors`` checked against the nodes and the store's vector names (empty mappings when None)."""
    if named_vectors is None:
        return [{}] * len(nodes)
    if len(named_vectors) != len(nodes):
        raise ValueError(f"{len(named_vectors)} named-vector mappings for {len(nodes)} nodes")
    extra = set(known[1:])
    for vectors in named_vectors:
        if unknown := set(vectors) - extra:
            raise ValueError(f"unknown extra vectors {sorted(unknown)}; the store has {sorted(extra)}")
    return named_vectors


def _ids_and_filters(node_ids: list[str] | None, filters: MetadataFilters | None) -> qe.Filter | None:
    must: list[Any] = []
    if node_ids is not None:
        must.append(qe.HasIdCondition({edge_point_id(n) for n in node_ids}))
    if filters is not None and filters.filters:
        must.append(metadata_filters_to_edge(filters))
    return qe.Filter(must=must) if must else None


# -- opening ----------------------------------------------------------------------------------------------------

_DISTANCES = {"cosine": qe.Distance.Cosine, "dot": qe.Distance.Dot, "euclid": qe.Distance.Euclid}


def _open_shard(
    path: Path, sizes: Mapping[str, int] | None, distance: qe.Distance, create_if_missing: bool
) -> qe.EdgeShard:
    config = None
    if sizes is not None:
        config = qe.EdgeConfig(
            vectors={name: qe.EdgeVectorParams(size=size, distance=distance) for name, size in sizes.items()}
        )
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
