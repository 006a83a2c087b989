"""The reasoning service assembled from settings: case memory, policy library, task agents, LLM, workflow.

Used by the Ray Serve deployment and, in-process, by ``riskcascade eval --cascade``; one construction path, so
the evaluation measures what is served.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone

from retrieval.case_memory import BehaviourEncoder, CaseMemory, CaseMemoryReadOnlyError, open_case_memory
from retrieval.narrative import feature_facts
from retrieval.policy_library import PolicyLibrary, open_policy_library
from riskcascade.core.config import Settings
from riskcascade.core.domain import AdjudicatedCase, Outcome, ReasonerVerdict, ReasoningRequest
from riskcascade.core.model_card import load_model_card
from riskcascade.core.model_registry import live_model_dir
from services.reasoning.agents import PolicyAgent, SimilarCaseAgent, StructuredDataAgent
from services.reasoning.llm import make_llm
from services.reasoning.workflow import CaseReviewConfig, CaseReviewWorkflow


class ReasoningService:
    """Reviews escalated cases and takes adjudicated ones back into its case memory.

    Reads (the workflow's case agents) and writes (``add_case``) share the case memory, which lets one thread at a
    time into its engine; writes run in the service's single writer thread, so neither blocks the event loop.
    """

    def __init__(self, memory: CaseMemory, library: PolicyLibrary, workflow: CaseReviewWorkflow, backend: str):
        self.memory = memory
        self.library = library
        self.workflow = workflow
        self.backend = backend
        # One writer: writes are applied in the order they were made, and at most one holds the engine.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="case-memory-writer")

    async def review(self, request: ReasoningRequest, carrier: dict[str, str] | None = None) -> ReasonerVerdict:
        return await self.workflow.review(request, carrier or {})

    async def add_case(self, case: AdjudicatedCase) -> int:
        """Write one adjudicated case into the case memory now; returns how many cases it holds afterwards.

        The next review that starts after this returns can retrieve the case (as of its ``label_known_at``; a case
        without one is stamped with the time it arrived here, when its label became known to the platform).
        Idempotent by case id: writing a case again, e.g. with a changed outcome, replaces it and the count does
        not grow. Runs in the writer thread; concurrent calls queue there in call order (as many as the replica
        admits: Ray Serve's ``max_ongoing_requests`` bounds them). Raises ``CaseMemoryReadOnlyError`` when the
        service was opened read-only.
        """
        if self.memory.read_only:
            raise CaseMemoryReadOnlyError(f"case memory at {self.memory.location} was opened read-only")
        if case.label_known_at is None:
            case = replace(case, label_known_at=datetime.now(timezone.utc))
        if not case.summary:  # feedback arrives without one: the same display line the indexed cases have
            case = replace(case, summary=case_summary(case))
        return await asyncio.get_running_loop().run_in_executor(self._writer, self._write, case)

    def _write(self, case: AdjudicatedCase) -> int:
        self.memory.add_cases([case], batch_size=1)
        return self.memory.count()

    def close(self) -> None:
        """Finish the writes and reviews' calls already made, then release the indexes."""
        self._writer.shutdown(wait=True)
        self.workflow.close()
        self.memory.close()
        self.library.close()


def case_summary(case: AdjudicatedCase) -> str:
    """One plain-language line: the event's facts with exact numbers, then the verdict."""
    verdict = f"fraud ({case.risk_type})" if case.outcome is Outcome.FRAUD and case.risk_type else case.outcome.value
    return ", ".join(feature_facts(case.event_type, case.features, precise=True)) + f"; {verdict}"


def open_reasoning_service(config: Settings, read_only: bool = True) -> ReasoningService:
    """The service ``config`` describes. ``read_only`` (the default, as ``eval --cascade`` opens it) refuses
    ``add_case``; the served reasoner opens it read-write, being the one process that holds the case index while
    the platform runs. The policy index is opened read-only either way: the reasoner never writes policies, and a
    missing one is an error (build it with the ``index`` command), not an empty index to create.
    """
    r = config.retrieval
    encoder = BehaviourEncoder.from_model_card(load_model_card(live_model_dir(config.model.dir)))
    memory = open_case_memory(r, encoder, read_only=read_only)
    try:
        library = open_policy_library(r, read_only=True, embedder=memory.embedder)
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
