"""Ray Serve deployment of the reasoner: a thin shell around the case review workflow."""

from __future__ import annotations

from typing import Any

from ray import serve

from riskcascade.config import Settings, settings_from_wire
from riskcascade.domain import ReasonerVerdict, ReasoningRequest
from riskcascade.telemetry import configure_tracing, inject_context, span
from services.reasoning.service import ReasoningService, open_reasoning_service


@serve.deployment(name="Reasoner")
class Reasoner:
    def __init__(self, settings: dict[str, Any]):
        config: Settings = settings_from_wire(settings)
        configure_tracing(config.tracing, "reasoner")
        self._service: ReasoningService = open_reasoning_service(config)

    async def reason(self, request: ReasoningRequest) -> ReasonerVerdict:
        event = request.event
        with span("reasoner.reason", carrier=request.trace_carrier, request_id=event.request_id) as current:
            verdict = await self._service.review(request, inject_context())
            current.set_attribute("reasoner.action", verdict.action.value)
            current.set_attribute("reasoner.backend", verdict.backend)
            return verdict

    def __del__(self) -> None:
        service = getattr(self, "_service", None)
        if service is not None:
            service.close()
