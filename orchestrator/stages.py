"""Adapters from Ray Serve deployment handles to the cascade's stage protocols.

Each call carries W3C trace context explicitly (Serve does not propagate ours), is bounded by the time the
cascade allows, is cancelled on timeout, and turns any failure into a StageError naming the stage.
"""

from __future__ import annotations

import asyncio
import dataclasses

from ray.serve.handle import DeploymentHandle

from orchestrator.batching import BatchTimeout, MicroBatcher
from orchestrator.cascade import NoTimeLeft, StageError
from riskcascade.core.config import BatchingSettings
from riskcascade.core.domain import (
    AdjudicatedCase,
    FastScore,
    LabelRecord,
    ReasonerVerdict,
    ReasoningRequest,
    ScoreRequest,
    ScorerInfo,
)
from riskcascade.core.telemetry import inject_context, span


async def _call(stage: str, method, argument, timeout_s: float):
    if timeout_s <= 0:
        raise NoTimeLeft(f"{stage}: no time left before the deadline")
    response = method.remote(argument)
    try:
        return await asyncio.wait_for(response, timeout=timeout_s)
    except asyncio.TimeoutError:
        response.cancel()
        raise StageError(f"{stage}: no answer within {timeout_s * 1000:.0f} ms") from None
    except asyncio.CancelledError:
        response.cancel()
        raise
    except Exception as exc:  # noqa: BLE001 - any replica/transport failure is a failed stage, said as such
        raise StageError(f"{stage}: {type(exc).__name__}: {exc}") from exc


class ServeScorerStage:
    """The fast model behind a handle. With ``batching.coalesce`` concurrent score calls share one
    ``score_many`` handle call (orchestrator/batching.py); otherwise each makes its own ``score`` call."""

    def __init__(self, handle: DeploymentHandle, batching: BatchingSettings | None = None):
        self._handle = handle
        batching = batching or BatchingSettings()
        self.batcher: MicroBatcher[ScoreRequest, FastScore] | None = None
        if batching.coalesce:
            self.batcher = MicroBatcher(self._score_many, batching.max_batch_size, batching.max_batches_in_flight)

    async def score(self, request: ScoreRequest, timeout_s: float) -> FastScore:
        with span("stage.fast_model", request_id=request.request_id):
            request = dataclasses.replace(request, trace_carrier=inject_context())
            if self.batcher is None:
                return await _call("fast model", self._handle.score, request, timeout_s)
            if timeout_s <= 0:
                raise NoTimeLeft("fast model: no time left before the deadline")
            try:
                return await self.batcher.submit(request, timeout_s)
            except BatchTimeout:
                raise StageError(f"fast model: no answer within {timeout_s * 1000:.0f} ms") from None

    async def _score_many(self, requests: list[ScoreRequest], timeout_s: float) -> list[FastScore]:
        # the batch span continues the first call's trace and links the others'; the replica continues it
        with span("stage.fast_model_batch", links=[r.trace_carrier for r in requests[1:]], batch_size=len(requests)):
            first = dataclasses.replace(requests[0], trace_carrier=inject_context())
            return await _call("fast model", self._handle.score_many, [first, *requests[1:]], timeout_s)

    async def info(self, timeout_s: float, version: str | None = None) -> ScorerInfo:
        """The scorer's description of ``version`` (default: the one it serves requests naming none)."""
        return await asyncio.wait_for(self._handle.info.remote(version), timeout=timeout_s)

    async def ping(self, timeout_s: float) -> bool:
        return await _call("fast model ping", self._handle.ping, None, timeout_s)

    async def record_labels(self, labels: list[LabelRecord], timeout_s: float) -> int:
        with span("stage.record_labels", labels=len(labels)):
            return await _call("entity state", self._handle.record_labels, labels, timeout_s)


class ServeReasonerStage:
    def __init__(self, handle: DeploymentHandle):
        self._handle = handle

    async def reason(self, request: ReasoningRequest, timeout_s: float) -> ReasonerVerdict:
        with span("stage.reasoner", request_id=request.event.request_id, budget_ms=request.budget_ms):
            request = dataclasses.replace(request, trace_carrier=inject_context())
            return await _call("reasoner", self._handle.reason, request, timeout_s)

    async def ping(self, timeout_s: float) -> bool:
        return await _call("reasoner ping", self._handle.ping, None, timeout_s)

    async def add_case(self, case: AdjudicatedCase, timeout_s: float) -> int:
        with span("stage.add_case", case_id=case.case_id):
            return await _call("case memory", self._handle.add_case, case, timeout_s)
