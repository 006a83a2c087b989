"""Retrieval for the reasoner: adjudicated cases and written policies in Qdrant (Edge in-process, or a server /
local mode), one collection each on the same backend.

- ``retrieval.case_memory``: ``CaseMemory`` (``similar_cases``, ``similar_narratives``, ``cases_with_entity``),
  ``open_case_memory``, ``CaseRetriever``; ``retrieval.behaviour``: ``BehaviourEncoder``; ``retrieval.case_nodes``:
  cases as LlamaIndex nodes.
- ``retrieval.narrative``: ``event_narrative``, the outcome-free text a case and a query are both embedded by.
- ``retrieval.policy_library``: ``PolicyLibrary`` (``search``, ``documents``, ``allowed_actions``),
  ``open_policy_library``; ``retrieval.policy_documents``: parsing and chunking of ``retrieval/policies/*.md``.
- ``retrieval.stores``: opens a collection on the configured backend (``edge_store.QdrantEdgeVectorStore``, one
  Edge shard per collection; ``qdrant_store.NamedVectorsQdrantStore`` over qdrant-client).
- ``retrieval.text_vectors``: the text embedder interface and the indexing cache; ``retrieval.embedding``: MiniLM.
- ``retrieval.indexing``: ``build_case_index``, ``build_policy_index``, behind the ``index`` command.
- ``retrieval.benchmark``: ``python -m retrieval.benchmark`` prints indexing and query figures.

Imports nothing from ``orchestrator`` or ``services``.
"""
