"""Case memory: past adjudicated cases, found again by behaviour, by narrative, or by a shared entity.

One interface, two engines chosen by ``RetrievalSettings.backend`` (as qdrant-client serves local and remote
through one client), opened by ``retrieval.stores``:

- ``edge``: ``QdrantEdgeVectorStore``, the Qdrant engine in-process, shard ``<edge_path>/<collection>`` (default).
- ``qdrant``: ``NamedVectorsQdrantStore`` (LlamaIndex's ``QdrantVectorStore``) over qdrant-client: a Qdrant server
  when ``qdrant_url`` is set, else qdrant-client's local mode in ``qdrant_path`` (pure Python; for tests and small
  data).

Both receive the same nodes (``case_to_node``) and are queried through the same LlamaIndex retriever
(``CaseRetriever``), so the reasoner sees the same cases and the same similarities from either.

Each case has two vectors: ``behaviour`` (``BehaviourEncoder``: the model's features standardised by the model
card's training scaling; rebuild the index when the card changes) and ``narrative`` (the MiniLM embedding of
``retrieval.narrative.event_narrative``: facts and free text, no outcome; rebuild when the embedder or the
wording changes).

Time: a case's outcome counts from when it became known (``label_known_at``), not from when the case happened.
The three searches take ``known_by``: with it, only cases whose label had arrived by then come back, filtered in
the engine (a datetime range on an indexed key), so ``top_k`` cases still come back whenever that many qualify.

Threads: the engine (an Edge shard, a qdrant-client) is used by one thread at a time; every call below takes the
memory's engine lock around its engine work, so one memory may serve reads and writes from several threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
)
from tqdm import tqdm

from retrieval.behaviour import BehaviourEncoder
from retrieval.case_nodes import (
    ENTITY_FIELDS,
    LABEL_KNOWN_AT,
    OCCURRED_AT,
    case_narrative,
    case_node_id,
    case_to_node,
    node_to_case,
    stored_time,
    time_order_key,
)
from retrieval.stores import CollectionLayout, CollectionNotFoundError, NamedVectorStore, close_store, open_collection
from retrieval.text_vectors import EmbeddingCache, TextEmbedder, open_text_embedder
from riskcascade.core.config import RetrievalSettings
from riskcascade.core.domain import AdjudicatedCase, EventType

__all__ = [
    "BehaviourEncoder",
    "CaseIndexNotFoundError",
    "CaseMemory",
    "CaseMemoryReadOnlyError",
    "CaseRetriever",
    "RetrievedCase",
    "case_node_id",
    "case_to_node",
    "node_to_case",
    "open_case_memory",
]

VECTOR_NAME = "behaviour"
"""Name of the behaviour vector in both backends (the default vector of a case point)."""
NARRATIVE_VECTOR = "narrative"
"""Name of the narrative text vector."""

KEYWORD_FIELDS = ("case_id", "event_type", "outcome", "risk_type", *ENTITY_FIELDS)
"""Payload keys given a keyword index: the ones retrieval filters on."""
DATETIME_FIELDS = (OCCURRED_AT, LABEL_KNOWN_AT)
"""Payload keys given a datetime index: ``cases_with_entity`` orders by ``occurred_at``; ``known_by`` is a range on
``label_known_at``."""
TIE_LOOKAHEAD = 4
"""Neighbours fetched beyond ``top_k``, so that cases tied at the cut are usually seen in one query."""
MAX_TIE_LOOKAHEAD = 64
"""The furthest a search looks for ties. A larger tie (many cases with the same narrative: a data set whose
features the narrative does not describe and that has no free text) is cut where the engine cuts it, and the two
backends may then pick different cases of it; looking through every tied case would cost a query milliseconds per
hundred cases."""


class CaseIndexNotFoundError(CollectionNotFoundError):
    """A read-only case memory was opened where no index has been built."""


class CaseMemoryReadOnlyError(RuntimeError):
    """A write was attempted on a case memory opened read-only."""


@dataclass(frozen=True)
class RetrievedCase:
    case: AdjudicatedCase
    similarity: float  # cosine similarity of the vectors it was found by, in [-1, 1]
    via: str = VECTOR_NAME  # the vector it was found by: "behaviour" or "narrative"


class CaseRetriever(BaseRetriever):
    """LlamaIndex retriever over a case vector store, queried by a precomputed vector.

    It has no embedder: ``query_bundle.embedding`` must hold the query vector for ``vector_name`` (the query string
    is only a label for traces). ``filters`` go to the vector store as they are. ``exclude_case_ids`` are dropped
    after the search, which asks for that many more cases: the result is the same as a ``case_id`` NIN filter,
    but cheaper. Cases with equal similarity come in case id order (see ``_retrieve``), so both backends give the
    same list. On Qdrant Edge with 50k cases, an event_type-filtered query took ~0.7 ms and ~2 ms once any
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
        vector_name: str | None = None,
    ):
        if similarity_top_k < 1:
            raise ValueError("similarity_top_k must be at least 1")
        if isinstance(exclude_case_ids, str):
            raise TypeError("exclude_case_ids must be a sequence of case ids, not one string")
        self._vector_store = vector_store
        self._top_k = similarity_top_k
        self._filters = filters
        self._exclude = frozenset(exclude_case_ids)
        self._vector_name = vector_name
        super().__init__(callback_manager=callback_manager)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if query_bundle.embedding is None:
            raise ValueError("CaseRetriever needs query_bundle.embedding: the query vector of the event")
        lookahead = TIE_LOOKAHEAD
        while True:
            limit = self._top_k + len(self._exclude) + lookahead
            result = self._vector_store.query(
                VectorStoreQuery(
                    query_embedding=list(query_bundle.embedding),
                    similarity_top_k=limit,
                    filters=self._filters,
                    query_str=query_bundle.query_str,
                ),
                **({} if self._vector_name is None else {"vector_name": self._vector_name}),
            )
            scores = [float(score) for score in result.similarities or []]
            hits = [
                (node, score)
                for node, score in zip(result.nodes or [], scores)
                if node.metadata.get("case_id") not in self._exclude
            ]
            hits.sort(key=lambda hit: (-hit[1], hit[0].metadata.get("case_id", "")))
            # Equal vectors (same narrative, same features) score exactly alike, and the engines pick among tied
            # points differently. Done when every point tied with the last kept one was seen: then ties are
            # broken by case id, the same on both backends. Otherwise look further, up to a bound.
            if len(scores) < limit or (len(hits) >= self._top_k and scores[-1] < hits[self._top_k - 1][1]):
                break
            if lookahead >= MAX_TIE_LOOKAHEAD:
                break
            lookahead = min(lookahead * TIE_LOOKAHEAD, MAX_TIE_LOOKAHEAD)
        return [NodeWithScore(node=node, score=min(1.0, max(-1.0, score))) for node, score in hits[: self._top_k]]


class CaseMemory:
    """Adjudicated cases behind one interface, whichever store holds them. Open with ``open_case_memory``."""

    def __init__(
        self,
        vector_store: NamedVectorStore,
        encoder: BehaviourEncoder,
        *,
        embedder: TextEmbedder,
        backend: str,
        location: str,
        read_only: bool = False,
        narrative_cache_entries: int = RetrievalSettings().embedding_cache_entries,
    ):
        self.vector_store = vector_store
        self.encoder = encoder
        self.embedder = embedder
        self.backend = backend
        self.location = location
        self.read_only = read_only
        # its counters say how many narratives were embedded / reused
        self.narratives = EmbeddingCache(embedder, narrative_cache_entries)
        self._closed = False
        # The engine serves one thread at a time; writers also share the narrative cache, so they queue on their
        # own lock first (embedding a batch then does not hold up readers). Always ``_writes`` before ``_engine``.
        self._engine = threading.Lock()
        self._writes = threading.Lock()

    # -- writes -------------------------------------------------------------------------------------------------

    def add_cases(self, cases: Iterable[AdjudicatedCase], batch_size: int, progress: bool = False) -> int:
        """Write cases in batches, with both vectors; returns how many were written.

        Idempotent: a case's point id derives from its case id, so writing a case again replaces it (the count
        does not grow). The return value counts writes, not new cases. Identical narratives are embedded once.
        Safe to call from any thread: a case written is found by the next search that starts after it returns.
        """
        if self.read_only:
            raise CaseMemoryReadOnlyError(f"case memory at {self.location} was opened read-only")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        total = len(cases) if isinstance(cases, Sequence) else None
        written = 0
        with self._writes, tqdm(
            total=total, unit="case", desc=f"indexing cases ({self.backend})", disable=not progress
        ) as bar:
            for batch in _batches(cases, batch_size):
                behaviour = self.encoder.encode_many([case.features for case in batch])
                narratives = [case_narrative(case) for case in batch]
                narrative_vectors = self.narratives.embed(narratives)
                nodes = [case_to_node(c, v, n) for c, v, n in zip(batch, behaviour, narratives)]
                with self._engine:
                    self.vector_store.add(nodes, named_vectors=[{NARRATIVE_VECTOR: v} for v in narrative_vectors])
                written += len(batch)
                bar.update(len(batch))
        return written

    # -- reads --------------------------------------------------------------------------------------------------

    def count(self) -> int:
        """Exact number of cases stored."""
        with self._engine:
            return self.vector_store.count()

    def retriever(
        self,
        top_k: int,
        filters: MetadataFilters | None = None,
        exclude_case_ids: Sequence[str] = (),
        vector_name: str = VECTOR_NAME,
    ) -> CaseRetriever:
        """A LlamaIndex retriever over this memory's store. It does not take the engine lock: use it from one
        thread, or go through ``similar_cases`` / ``similar_narratives``, which do."""
        return CaseRetriever(
            self.vector_store,
            similarity_top_k=top_k,
            filters=filters,
            exclude_case_ids=exclude_case_ids,
            vector_name=vector_name,
        )

    def similar_cases(
        self,
        features: Mapping[str, float],
        top_k: int,
        exclude_case_ids: Sequence[str] = (),
        event_type: EventType | None = None,
        known_by: datetime | None = None,
    ) -> list[RetrievedCase]:
        """The ``top_k`` stored cases whose behaviour is most similar to ``features``, most similar first.

        ``exclude_case_ids`` are never returned (e.g. the event's own case); ``event_type`` keeps only cases of
        that type; ``known_by`` keeps only cases whose label was known by then (``label_known_at`` set and not
        later; a naive time is UTC). ``top_k`` cases come back whenever that many match.
        """
        label = f"adjudicated cases behaving like this {_type_label(event_type)} event"
        bundle = QueryBundle(query_str=label, embedding=self.encoder.encode(features))
        retriever = self.retriever(top_k, _case_filters(event_type, known_by), exclude_case_ids)
        with self._engine:
            hits = retriever.retrieve(bundle)
        return [RetrievedCase(case=node_to_case(hit.node), similarity=float(hit.score)) for hit in hits]

    def similar_narratives(
        self,
        text: str,
        top_k: int,
        exclude_case_ids: Sequence[str] = (),
        event_type: EventType | None = None,
        known_by: datetime | None = None,
    ) -> list[RetrievedCase]:
        """The ``top_k`` stored cases whose narrative reads most like ``text``, most similar first (``via`` is
        "narrative"). Build ``text`` with ``retrieval.narrative.event_narrative`` so it is worded as the stored
        narratives are. ``top_k`` 0 returns nothing; the rest is as ``similar_cases``.
        """
        if top_k == 0:
            return []
        label = f"adjudicated cases told like this {_type_label(event_type)} event"
        bundle = QueryBundle(query_str=label, embedding=self.embedder.embed([text])[0].tolist())
        retriever = self.retriever(top_k, _case_filters(event_type, known_by), exclude_case_ids, NARRATIVE_VECTOR)
        with self._engine:
            hits = retriever.retrieve(bundle)
        return [
            RetrievedCase(case=node_to_case(hit.node), similarity=float(hit.score), via=NARRATIVE_VECTOR)
            for hit in hits
        ]

    def cases_with_entity(
        self,
        field: str,
        value: str,
        limit: int,
        exclude_case_ids: Sequence[str] = (),
        other_than_account: str | None = None,
        known_by: datetime | None = None,
    ) -> list[AdjudicatedCase]:
        """Past cases whose ``field`` (an ``Entities`` field) is ``value``: most recent first, at most ``limit``.

        A payload-filter query, no vector. Cases without ``occurred_at`` come after the dated ones; ties are broken
        by case id, so both backends give the same list. An empty ``value`` (no such entity) matches nothing.
        ``other_than_account`` leaves out that account's own cases, in the engine, so a graph neighbour query
        (the other accounts on this device) gets ``limit`` neighbours however busy the account itself is.
        ``known_by`` keeps only cases whose label was known by then, also in the engine (as ``similar_cases``).
        """
        if field not in ENTITY_FIELDS:
            raise ValueError(f"cases_with_entity: field {field!r} is not one of {', '.join(ENTITY_FIELDS)}")
        if limit < 0:
            raise ValueError("limit must not be negative")
        if isinstance(exclude_case_ids, str):
            raise TypeError("exclude_case_ids must be a sequence of case ids, not one string")
        if limit == 0 or not value:
            return []
        exclude = frozenset(exclude_case_ids)
        wanted = limit + len(exclude)
        entity = [MetadataFilter(key=field, value=value)]
        if other_than_account:
            entity.append(MetadataFilter(key="account_id", value=other_than_account, operator=FilterOperator.NE))
        if known_by is not None:
            entity.append(_known_by_filter(known_by))
        with self._engine:
            nodes = self._entity_nodes(entity, wanted)
        cases = sorted((node_to_case(n) for n in nodes), key=lambda c: c.case_id)
        cases.sort(key=_recency, reverse=True)  # stable, also reversed: equal times stay in case id order
        return [c for c in cases if c.case_id not in exclude][:limit]

    def _entity_nodes(self, entity: list[MetadataFilter], wanted: int) -> list[BaseNode]:
        """The ``wanted`` most recent nodes matching ``entity``, every node tied at the cut, then undated ones if
        the dated ones fall short (the engine part of ``cases_with_entity``)."""
        store = self.vector_store
        dated = store.scroll_nodes(MetadataFilters(filters=entity), limit=wanted, order_by=OCCURRED_AT)
        if len(dated) == wanted:
            # The engine cut the list at ``wanted`` wherever ties fell: take every case at the last instant instead,
            # so the tie-break below (by case id) decides, identically on both backends.
            # "At that instant" is a datetime range, which the datetime index serves (a keyword match on the
            # string made the engine read the payload of every case of the entity: 1.8 ms instead of 0.04 ms).
            boundary = dated[-1].metadata[OCCURRED_AT]
            tied = MetadataFilters(
                filters=[
                    *entity,
                    MetadataFilter(key=OCCURRED_AT, value=boundary, operator=FilterOperator.GTE),
                    MetadataFilter(key=OCCURRED_AT, value=boundary, operator=FilterOperator.LTE),
                ]
            )
            instant = time_order_key(datetime.fromisoformat(boundary))
            newer = [n for n in dated if time_order_key(datetime.fromisoformat(n.metadata[OCCURRED_AT])) != instant]
            return newer + store.scroll_nodes(tied)
        undated = MetadataFilters(
            filters=[*entity, MetadataFilter(key=OCCURRED_AT, value=None, operator=FilterOperator.IS_EMPTY)]
        )
        return dated + store.scroll_nodes(undated)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the engine (the Edge shard's folder lock; qdrant-client's local folder lock). Idempotent."""
        with self._writes, self._engine:
            if self._closed:
                return
            self._closed = True
            close_store(self.vector_store)

    def __enter__(self) -> CaseMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _batches(items: Iterable[AdjudicatedCase], size: int) -> Iterator[list[AdjudicatedCase]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _recency(case: AdjudicatedCase) -> tuple[bool, datetime]:
    """Sort key, descending: dated cases before undated ones, newer before older."""
    if case.occurred_at is None:
        return (False, _EARLIEST)
    return (True, time_order_key(case.occurred_at))


_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)


def _case_filters(event_type: EventType | None, known_by: datetime | None) -> MetadataFilters | None:
    """The similarity searches' filters, all at the top level of one AND (where Qdrant's planner uses indexes)."""
    filters = []
    if event_type is not None:
        filters.append(MetadataFilter(key="event_type", value=EventType(event_type).value))
    if known_by is not None:
        filters.append(_known_by_filter(known_by))
    return MetadataFilters(filters=filters) if filters else None


def _known_by_filter(known_by: datetime) -> MetadataFilter:
    """Cases whose label had arrived by ``known_by``: a datetime range on ``label_known_at``, which leaves out
    cases without one (an unknown arrival is not known). A naive ``known_by`` is UTC, as stored times are read."""
    return MetadataFilter(key=LABEL_KNOWN_AT, value=stored_time(time_order_key(known_by)), operator=FilterOperator.LTE)


def _type_label(event_type: EventType | None) -> str:
    return EventType(event_type).value if event_type is not None else "any"


# -- opening ----------------------------------------------------------------------------------------------------


def case_layout(settings: RetrievalSettings, encoder: BehaviourEncoder, embedder: TextEmbedder) -> CollectionLayout:
    """The case collection: behaviour and narrative vectors, keyword and datetime indexes."""
    return CollectionLayout(
        name=settings.collection,
        vectors={VECTOR_NAME: encoder.dimension, NARRATIVE_VECTOR: embedder.dimension},
        keyword_fields=KEYWORD_FIELDS,
        datetime_fields=DATETIME_FIELDS,
        label="case index",
        missing_error=CaseIndexNotFoundError,
    )


def open_case_memory(
    settings: RetrievalSettings,
    encoder: BehaviourEncoder,
    read_only: bool = False,
    embedder: TextEmbedder | None = None,
) -> CaseMemory:
    """Open (creating unless ``read_only``) the case memory that ``settings`` describe.

    ``embedder`` embeds narratives (default: MiniLM from ``settings.embedding_dir``). ``read_only`` refuses writes
    and raises ``CaseIndexNotFoundError`` instead of creating a missing index. It does not share the index: an
    Edge shard and a qdrant-client local folder are owned by one process at a time (only a Qdrant server serves
    many readers).
    """
    embedder = embedder if embedder is not None else open_text_embedder(settings)
    opened = open_collection(settings, case_layout(settings, encoder, embedder), read_only)
    return CaseMemory(
        opened.store,
        encoder,
        embedder=embedder,
        backend=opened.backend,
        location=opened.location,
        read_only=read_only,
        narrative_cache_entries=settings.embedding_cache_entries,
    )
