"""The policy library: the written risk policies, chunked and embedded in Qdrant, searched by meaning.

It lives beside the case memory on the same backend (``retrieval.stores``): an Edge shard
``<edge_path>/<policy_collection>``, or the collection ``policy_collection`` on the Qdrant server / local folder.
A chunk (``retrieval.policy_documents.chunk_policy``) is one point: its MiniLM vector ``text`` and its fields as
payload. Point ids derive from chunk ids, so re-ingesting is idempotent, and a changed document's chunks that no
longer exist are removed.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml
from llama_index.core.schema import BaseNode, NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters, VectorStoreQuery
from tqdm import tqdm

from retrieval.policy_documents import (
    ACTIONS_BY_SEVERITY,
    OVERVIEW_SECTION,
    PolicyChunk,
    PolicyDocument,
    PolicyFormatError,
    TokenBudget,
    chunk_policy,
    load_policy_documents,
    parse_policy,
    parse_policy_text,
)
from retrieval.stores import CollectionLayout, CollectionNotFoundError, NamedVectorStore, close_store, open_collection
from retrieval.text_vectors import TextEmbedder, open_text_embedder
from riskcascade.core.config import RetrievalSettings

__all__ = [
    "ACTIONS_BY_SEVERITY",
    "PolicyChunk",
    "PolicyDocument",
    "PolicyFormatError",
    "PolicyIndexNotFoundError",
    "PolicyLibrary",
    "PolicyPassage",
    "chunk_policy",
    "load_policy_documents",
    "open_policy_library",
    "parse_policy",
]

POLICY_VECTOR = "text"
"""Name of the chunk text vector in both backends."""
POLICY_NAMESPACE = uuid.UUID("8d3e0c4b-2a71-5f96-9b0e-41c7d5a2e6f3")
"""Namespace of chunk point ids (uuid5 of the chunk id). Changing it orphans every existing policy index."""
KEYWORD_FIELDS = ("chunk_id", "policy_id", "risk_type", "section", "rule_ids")
"""Payload keys given a keyword index (``rule_ids`` is a list: a match finds any of its ids)."""
_NOT_FOR_PROMPTS = ["text", "allowed_actions", "position", "source", "part"]


class PolicyIndexNotFoundError(CollectionNotFoundError):
    """A read-only policy library was opened where no policies have been indexed."""


class PolicyLibraryReadOnlyError(RuntimeError):
    """A write was attempted on a policy library opened read-only."""


@dataclass(frozen=True)
class PolicyPassage(PolicyChunk):
    """A chunk found by ``PolicyLibrary.search``, with its cosine similarity to the query, in [-1, 1]."""

    similarity: float


def chunk_point_id(chunk_id: str) -> str:
    """The node and point id of a chunk (Qdrant takes only UUIDs and integers as point ids)."""
    return str(uuid.uuid5(POLICY_NAMESPACE, chunk_id))


def chunk_to_node(chunk: PolicyChunk, position: int, embedding: Sequence[float]) -> TextNode:
    """The node stored for a chunk: its text, its vector, its fields (and its position in the document)."""
    metadata = {**asdict(chunk), "position": position}
    metadata["rule_ids"], metadata["allowed_actions"] = list(chunk.rule_ids), list(chunk.allowed_actions)
    return TextNode(
        id_=chunk_point_id(chunk.chunk_id),
        text=chunk.text,
        embedding=[float(x) for x in embedding],
        metadata=metadata,
        excluded_embed_metadata_keys=list(_NOT_FOR_PROMPTS),
        excluded_llm_metadata_keys=list(_NOT_FOR_PROMPTS),
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=chunk.policy_id)},
    )


def node_to_chunk(node: BaseNode) -> PolicyChunk:
    meta = node.metadata
    values = {f.name: meta[f.name] for f in fields(PolicyChunk)}
    values["rule_ids"], values["allowed_actions"] = tuple(meta["rule_ids"]), tuple(meta["allowed_actions"])
    return PolicyChunk(**values)


class PolicyLibrary:
    """Policy chunks behind one interface, whichever store holds them. Open with ``open_policy_library``."""

    def __init__(
        self,
        vector_store: NamedVectorStore,
        embedder: TextEmbedder,
        budget: TokenBudget,
        *,
        backend: str,
        location: str,
        read_only: bool = False,
    ):
        self.vector_store = vector_store
        self.embedder = embedder
        self.budget = budget
        self.backend = backend
        self.location = location
        self.read_only = read_only
        self._closed = False

    def add_documents(self, docs: Sequence[PolicyDocument], progress: bool = False, prune: bool = False) -> int:
        """Chunk, embed and write ``docs``; returns the number of chunks written.

        Idempotent: a chunk's point id derives from its chunk id. Chunks a document had before and no longer has
        are removed after the new ones are written. ``prune`` also removes the chunks of every policy not in
        ``docs`` (``build_policy_index`` prunes, so the index mirrors the policy folder).
        """
        if self.read_only:
            raise PolicyLibraryReadOnlyError(f"policy library at {self.location} was opened read-only")
        chunks = [(chunk, position) for doc in docs for position, chunk in enumerate(chunk_policy(doc, self.budget))]
        ids = [chunk.chunk_id for chunk, _ in chunks]
        if len(set(ids)) != len(ids):
            raise PolicyFormatError("two documents share a policy_id: their chunk ids collide")
        with tqdm(total=len(chunks), unit="chunk", desc=f"indexing policies ({self.backend})",
                  disable=not progress) as bar:
            vectors = self.embedder.embed([chunk.embedding_text for chunk, _ in chunks]) if chunks else []
            nodes = [chunk_to_node(chunk, position, vector) for (chunk, position), vector in zip(chunks, vectors)]
            self.vector_store.add(nodes)
            bar.update(len(nodes))
        policy_ids = list(dict.fromkeys(chunk.policy_id for chunk, _ in chunks))
        scope = None if prune else MetadataFilters(
            filters=[MetadataFilter(key="policy_id", value=policy_ids, operator=FilterOperator.IN)]
        )
        if prune or policy_ids:
            kept = {node.node_id for node in nodes}
            stale = [n.node_id for n in self.vector_store.scroll_nodes(scope) if n.node_id not in kept]
            if stale:
                self.vector_store.delete_nodes(node_ids=stale)
        return len(nodes)

    def search(self, query: str, top_k: int, risk_types: Sequence[str] | None = None) -> list[PolicyPassage]:
        """The ``top_k`` chunks that read most like ``query``, most similar first; ``risk_types`` keeps only
        chunks of those risk types (an empty sequence: nothing)."""
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        if isinstance(risk_types, str):
            raise TypeError("risk_types must be a sequence of risk types, not one string")
        filters = None
        if risk_types is not None:
            if not risk_types:
                return []
            filters = MetadataFilters(
                filters=[MetadataFilter(key="risk_type", value=list(risk_types), operator=FilterOperator.IN)]
            )
        vector = self.embedder.embed([query])[0].tolist()
        result = self.vector_store.query(
            VectorStoreQuery(query_embedding=vector, similarity_top_k=top_k, filters=filters, query_str=query)
        )
        return [
            PolicyPassage(**asdict(node_to_chunk(node)), similarity=min(1.0, max(-1.0, float(score))))
            for node, score in zip(result.nodes or [], result.similarities or [])
        ]

    def chunks(self) -> list[PolicyChunk]:
        """Every stored chunk, by policy id then position in the document."""
        return _in_order(self.vector_store.scroll_nodes())

    def chunks_with_rules(self, rule_ids: Sequence[str]) -> list[PolicyChunk]:
        """The chunks defining any of ``rule_ids`` (e.g. to check and quote the rules a verdict cites), in order;
        an id no policy defines finds nothing."""
        if isinstance(rule_ids, str):
            raise TypeError("rule_ids must be a sequence of rule ids, not one string")
        if not rule_ids:
            return []
        wanted = MetadataFilters(
            filters=[MetadataFilter(key="rule_ids", value=list(rule_ids), operator=FilterOperator.IN)]
        )
        return _in_order(self.vector_store.scroll_nodes(wanted))

    def documents(self) -> dict[str, PolicyDocument]:
        """The indexed policies by risk type, rebuilt from their chunks (the text as indexed, not the files)."""
        by_policy: dict[str, list[PolicyChunk]] = {}
        for chunk in self.chunks():
            by_policy.setdefault(chunk.policy_id, []).append(chunk)
        return {parts[0].risk_type: _rebuild(parts) for parts in by_policy.values()}

    def allowed_actions(self) -> dict[str, tuple[str, ...]]:
        """Actions each risk type's policy allows, from the index (cheap: one scroll of a few dozen chunks)."""
        return {chunk.risk_type: chunk.allowed_actions for chunk in self.chunks()}

    def count(self) -> int:
        """Exact number of chunks stored."""
        return self.vector_store.count()

    def close(self) -> None:
        """Release the engine (as ``CaseMemory.close``). Idempotent."""
        if not self._closed:
            self._closed = True
            close_store(self.vector_store)

    def __enter__(self) -> PolicyLibrary:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _in_order(nodes: list[BaseNode]) -> list[PolicyChunk]:
    nodes = sorted(nodes, key=lambda n: (n.metadata["policy_id"], n.metadata["position"]))
    return [node_to_chunk(n) for n in nodes]


def _rebuild(parts: list[PolicyChunk]) -> PolicyDocument:
    """A document from its chunks in order: front matter from their fields, sections from their texts."""
    first = parts[0]
    front = {
        "policy_id": first.policy_id,
        "risk_type": first.risk_type,
        "version": first.version,
        "title": first.title,
        "allowed_actions": list(first.allowed_actions),
    }
    body = f"# {first.title}\n"
    section = None
    for chunk in parts:
        if chunk.section != section:
            section = chunk.section
            if section != OVERVIEW_SECTION:
                body += f"\n## {section}\n"
        body += f"\n{chunk.text}\n"
    return parse_policy_text(f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n{body}", Path(first.source))


def policy_layout(settings: RetrievalSettings, embedder: TextEmbedder) -> CollectionLayout:
    return CollectionLayout(
        name=settings.policy_collection,
        vectors={POLICY_VECTOR: embedder.dimension},
        keyword_fields=KEYWORD_FIELDS,
        label="policy index",
        missing_error=PolicyIndexNotFoundError,
    )


def open_policy_library(
    settings: RetrievalSettings, read_only: bool = False, embedder: TextEmbedder | None = None
) -> PolicyLibrary:
    """Open (creating unless ``read_only``) the policy library on the backend ``settings`` choose.

    ``embedder`` defaults to MiniLM from ``settings.embedding_dir``; chunks are sized by that artefact's tokenizer.
    ``read_only`` refuses writes and raises ``PolicyIndexNotFoundError`` when nothing was indexed.
    """
    embedder = embedder if embedder is not None else open_text_embedder(settings)
    budget = TokenBudget.of_artifact(settings.embedding_dir)
    opened = open_collection(settings, policy_layout(settings, embedder), read_only)
    return PolicyLibrary(
        opened.store, embedder, budget, backend=opened.backend, location=opened.location, read_only=read_only
    )
