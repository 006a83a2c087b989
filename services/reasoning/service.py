"""The reasoning service assembled from settings: case memory, policy library, task agents, LLM, workflow.

Used by the Ray Serve deployment and, in-process, by ``riskcascade eval --cascade``; one construction path, so
the evaluation measures what is served.
"""

from __future__ import annotations

from retrieval.case_memory import BehaviourEncoder, CaseMemory, open_case_memory
from retrieval.policy_library import PolicyLibrary, open_policy_library
from riskcascade.config import Settings
from riskcascade.domain import ReasonerVerdict, ReasoningRequest
from riskcascade.model_card import load_model_card
from services.reasoning.agents import PolicyAgent, SimilarCaseAgent, StructuredDataAgent
from services.reasoning.llm import make_llm
from services.reasoning.workflow import CaseReviewConfig, CaseReviewWorkflow


class ReasoningService:
    def __init__(self, memory: CaseMemory, library: PolicyLibrary, workflow: CaseReviewWorkflow, backend: str):
        self.memory = memory
        self.library = library
        self.workflow = workflow
        self.backend = backend

    async def review(self, request: ReasoningRequest, carrier: dict[str, str] | None = None) -> ReasonerVerdict:
        return await self.workflow.review(request, carrier or {})

    def close(self) -> None:
        self.memory.close()
        self.library.close()


def open_reasoning_service(config: Settings, read_only: bool = True) -> ReasoningService:
    r = config.retrieval
    encoder = BehaviourEncoder.from_model_card(load_model_card(config.model.dir))
    memory = open_case_memory(r, encoder, read_only=read_only)
    try:
        library = open_policy_library(r, read_only=read_only, embedder=memory.embedder)
    except BaseException:
        memory.close()
        raise
    workflow = CaseReviewWorkflow(
        structured=StructuredDataAgent(memory, r.entity_history_limit, config.reasoner.neighbour_links),
        similar=SimilarCaseAgent(memory, r.top_k, r.narrative_top_k),
        policy=PolicyAgent(library, r.policy_top_k),
        llm=make_llm(config.llm, config.reasoner),
        config=CaseReviewConfig(config.llm, config.reasoner, config.reflection, config.llm.backend),
        timeout=None,  # each step is bounded itself: retrieval is milliseconds, the LLM call has its timeout
    )
    return ReasoningService(memory, library, workflow, config.llm.backend)
