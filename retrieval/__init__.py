"""Case memory for the reasoner: adjudicated cases in Qdrant (Edge in-process, or a server / local mode).

- ``retrieval.case_memory``: ``BehaviourEncoder``, ``CaseMemory``, ``CaseRetriever``, ``open_case_memory``.
- ``retrieval.edge_store``: ``QdrantEdgeVectorStore``, a LlamaIndex vector store over a Qdrant Edge shard.
- ``retrieval.indexing``: ``build_case_index``, behind the ``index`` command.
- ``retrieval.benchmark``: ``python -m retrieval.benchmark`` prints indexing and query figures.

Imports nothing from ``orchestrator`` or ``services``.
"""
