"""Ray Serve deployment of the reasoner: retrieval of similar cases, then the configured CaseReasoner."""

from __future__ import annotations

from typing import Any

from ray import serve

from retrieval.case_memory import BehaviourEncoder, open_case_memory
from riskcascade.config import settings_from_wire
from riskcascade.domain import ReasonerVerdict, ReasoningRequest
from riskcascade.model_card import load_model_card
from riskcascade.telemetry import configure_tracing, span
from services.reasoning.evidence_rule import EvidenceWeightedReasoner


@serve.deployment(name="Reasoner")
class Reasoner:
    def __init__(self, settings: dict[str, Any]):
        config = settings_from_wire(settings)
        configure_tracing(config.tracing, "reasoner")
        encoder = BehaviourEncoder.from_model_card(load_model_card(config.model.dir))
        self._backend = config.retrieval.backend
        self._memory = open_case_memory(config.retrieval, encoder, read_only=True)
        self._top_k = config.retrieval.top_k
        self._reasoner = EvidenceWeightedReasoner(config.reasoner)

    async def reason(self, request: ReasoningRequest) -> ReasonerVerdict:
        event = request.event
        with span("reasoner.reason", carrier=request.trace_carrier, request_id=event.request_id) as current:
            with span("retrieval.similar_cases", backend=self._backend, top_k=self._top_k):
                cases = self._memory.similar_cases(event.features, self._top_k)
            with span("reasoner.evidence_rule", cases=len(cases)):
                verdict = self._reasoner.reason(request, cases)
            current.set_attribute("reasoner.action", verdict.action.value)
            return verdict

    def __del__(self) -> None:
        memory = getattr(self, "_memory", None)
        if memory is not None:
            memory.close()
