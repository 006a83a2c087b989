"""Ray Serve deployment of the reasoner: a thin shell around the case review workflow and its case memory."""

from __future__ import annotations

import time
from typing import Any

from ray import serve
from ray.serve import metrics

from riskcascade.core.config import Settings, settings_from_wire
from riskcascade.core.domain import AdjudicatedCase, ReasonerVerdict, ReasoningRequest, reasoner_fell_back
from riskcascade.core.telemetry import configure_tracing, inject_context, span
from services.reasoning.service import ReasoningService, open_reasoning_service


@serve.deployment(name="Reasoner")
class Reasoner:
    def __init__(self, settings: dict[str, Any]):
        config: Settings = settings_from_wire(settings)
        configure_tracing(config.tracing, "reasoner")
        # Read-write: while the platform runs, this replica is the one process that holds the case index, so
        # feedback (add_case) is written here and the next review can find it.
        self._service: ReasoningService = open_reasoning_service(config, read_only=False)
        self._reviews = metrics.Counter(
            "riskcascade_reasoner_reviews", description="Cases reviewed, by the verdict's action and backend, and "
            "whether the review fell back", tag_keys=("action", "backend", "fallback"),
        )
        self._review_seconds = metrics.Histogram(
            "riskcascade_reasoner_review_seconds", description="Time of one case review (retrieval, agents, model)",
            boundaries=[ms / 1000.0 for ms in config.metrics.latency_buckets_ms],
        )

    async def reason(self, request: ReasoningRequest) -> ReasonerVerdict:
        event = request.event
        with span("reasoner.reason", carrier=request.trace_carrier, request_id=event.request_id) as current:
            started = time.perf_counter()
            verdict = await self._service.review(request, inject_context())
            self._reviews.inc(tags={"action": verdict.action.value, "backend": verdict.backend,
                                    "fallback": str(reasoner_fell_back(verdict.reasons)).lower()})
            self._review_seconds.observe(time.perf_counter() - started)
            current.set_attribute("reasoner.action", verdict.action.value)
            current.set_attribute("reasoner.backend", verdict.backend)
            return verdict

    async def ping(self, _: object = None) -> bool:
        """Liveness for the orchestrator's stage probe: answered on the replica's loop, no retrieval."""
        return True

    async def add_case(self, case: AdjudicatedCase) -> int:
        """Take one adjudicated case into the case memory (idempotent by case id; see
        ``ReasoningService.add_case``). Returns how many cases the memory holds after the write."""
        with span("reasoner.add_case", case_id=case.case_id) as current:
            count = await self._service.add_case(case)
            current.set_attribute("case_memory.count", count)
            return count

    def __del__(self) -> None:
        service = getattr(self, "_service", None)
        if service is not None:
            service.close()
