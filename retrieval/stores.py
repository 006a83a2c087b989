"""Open one collection of named dense vectors on the configured backend; the case memory and the policy library
both go through here, so they live side by side on either backend.

- ``edge``: one Qdrant Edge shard per collection, in ``<retrieval.edge_path>/<collection>`` (an Edge shard holds
  exactly one collection).
- ``qdrant``: the collection on a Qdrant server (``qdrant_url``) or in qdrant-client's local folder
  (``qdrant_path``), whose client the collections of one folder share.

Both stores offer the same calls (``add(nodes, named_vectors=)``, ``query(q, vector_name=)``, ``scroll_nodes``,
``count``, ``delete_nodes``) and store the same payload.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

from retrieval.edge_store import EdgeShardNotFoundError, QdrantEdgeVectorStore, shard_exists
from riskcascade.core.config import RetrievalSettings

if TYPE_CHECKING:
    from retrieval.qdrant_store import NamedVectorsQdrantStore

NamedVectorStore = Union[QdrantEdgeVectorStore, "NamedVectorsQdrantStore"]
"""Either backend's store; both have the methods listed in this module's docstring."""

_COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # also a folder name under edge_path


class CollectionNotFoundError(FileNotFoundError):
    """A read-only open found no collection: nothing has been indexed there yet."""


class LegacyEdgeLayoutError(ValueError):
    """``retrieval.edge_path`` is itself a shard, from before it became a folder of one shard per collection."""


@dataclass(frozen=True)
class CollectionLayout:
    """What a collection holds: its named cosine vectors (the first is the default) and its filtered keys."""

    name: str
    vectors: Mapping[str, int]  # vector name -> size
    keyword_fields: tuple[str, ...]
    datetime_fields: tuple[str, ...] = ()
    label: str = "index"  # what error messages call it ("case index", "policy index")
    missing_error: type[CollectionNotFoundError] = field(default=CollectionNotFoundError)

    def __post_init__(self) -> None:
        if not _COLLECTION_NAME.match(self.name):
            raise ValueError(f"collection name {self.name!r} must be letters, digits, '_', '-' or '.'")
        if not self.vectors:
            raise ValueError("a collection needs at least one vector")


@dataclass
class OpenCollection:
    store: NamedVectorStore
    backend: str
    location: str


def edge_shard_path(settings: RetrievalSettings, collection: str) -> Path:
    """The Edge shard folder of ``collection``."""
    return Path(settings.edge_path) / collection


def open_collection(settings: RetrievalSettings, layout: CollectionLayout, read_only: bool) -> OpenCollection:
    """Open (creating unless ``read_only``) ``layout``'s collection on the backend ``settings`` choose.

    Raises ``layout.missing_error`` when ``read_only`` and it does not exist, ``ValueError`` when it exists with
    other vectors, ``LegacyEdgeLayoutError`` when ``edge_path`` is a shard of the old one-shard layout.
    """
    if settings.backend == "edge":
        return _open_edge(settings, layout, read_only)
    if settings.backend == "qdrant":
        return _open_qdrant(settings, layout, read_only)
    raise ValueError(f"unknown retrieval.backend {settings.backend!r}")


def close_store(store: NamedVectorStore) -> None:
    """Release the engine: the Edge shard's folder lock, or the qdrant-client (shared local ones by count)."""
    if isinstance(store, QdrantEdgeVectorStore):
        store.close()
    else:
        from retrieval.qdrant_store import release_client

        release_client(store.client)


def _open_edge(settings: RetrievalSettings, layout: CollectionLayout, read_only: bool) -> OpenCollection:
    root = Path(settings.edge_path)
    if shard_exists(root):
        raise LegacyEdgeLayoutError(
            f"{root} (retrieval.edge_path) is a single Qdrant Edge shard of the old layout; it now holds one shard "
            f"folder per collection. It is a derived index: delete it (rm -r {root}) and run `riskcascade index`."
        )
    path = edge_shard_path(settings, layout.name)
    names = list(layout.vectors)
    try:
        store = QdrantEdgeVectorStore(
            path,
            layout.vectors[names[0]],
            distance="cosine",
            vector_name=names[0],
            extra_vectors={name: layout.vectors[name] for name in names[1:]},
            keyword_index_fields=layout.keyword_fields,
            datetime_index_fields=layout.datetime_fields,
            create_if_missing=not read_only,
        )
    except EdgeShardNotFoundError:
        raise layout.missing_error(
            f"no {layout.label} at {path} (under retrieval.edge_path): build it with the `index` command"
        ) from None
    return OpenCollection(store, "edge", str(path))


def _open_qdrant(settings: RetrievalSettings, layout: CollectionLayout, read_only: bool) -> OpenCollection:
    # Imported here so that processes on the Edge backend do not load qdrant-client.
    from qdrant_client import QdrantClient

    from retrieval.qdrant_store import NamedVectorsQdrantStore, acquire_local_client, ensure_collection, release_client

    if settings.qdrant_url:
        client = QdrantClient(url=settings.qdrant_url, api_key=settings.qdrant_api_key_text())
        location = f"{settings.qdrant_url.rstrip('/')}/collections/{layout.name}"
        server = True
    else:
        path = Path(settings.qdrant_path)  # the settings validator guarantees a url or a path
        if read_only and not path.exists():
            raise layout.missing_error(
                f"no {layout.label} at {path} (retrieval.qdrant_path): build it with the `index` command"
            )
        client = acquire_local_client(path)
        location = f"{path}#{layout.name}"
        server = False
    try:
        exists = ensure_collection(
            client,
            layout.name,
            layout.vectors,
            layout.keyword_fields,
            layout.datetime_fields,
            create=not read_only,
            server=server,
            location=location,
        )
        if not exists:
            raise layout.missing_error(f"no {layout.label} at {location}: build it with the `index` command")
        store = NamedVectorsQdrantStore(
            layout.name, client, list(layout.vectors), batch_size=settings.index_batch_size
        )
    except BaseException:
        release_client(client)
        raise
    return OpenCollection(store, "qdrant", location)

