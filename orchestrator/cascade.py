"""The cascade: fast model, escalation policy, reasoner, merge. Async orchestration with no Ray or gRPC import.

Stages are reached through the small FastStage / ReasoningStage protocols (orchestrator/stages.py adapts Ray
Serve handles to them). Every stage call is bounded by the caller's remaining deadline, less a reserve for
merging and persisting, and a stage that fails or runs out of time becomes an explicit degraded decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from orchestrator.merge import MergedVerdict, MergeRules, fast_model_failed, merge
from orchestrator.policy import EscalationPolicy, Route
from riskcascade.domain import (
    Decision,
    FastScore,
    ReasonerVerdict,
    ReasoningRequest,
    RiskEvent,
    ScoreRequest,
    StageTiming,
)
from riskcascade.telemetry import current_trace_id, span


class StageError(Exception):
    """A stage failed or ran out of time; the message says which and why."""


class FastStage(Protocol):
    async def score(self, request: ScoreRequest, timeout_s: float) -> FastScore: ...


class ReasoningStage(Protocol):
    async def reason(self, request: ReasoningRequest, timeout_s: float) -> ReasonerVerdict: ...


@dataclass(frozen=True)
class CascadeVersions:
    model_version: str
    policy_version: str
    feature_names: tuple[str, ...]


class Cascade:
    def __init__(
        self,
        scorer: FastStage,
        reasoner: ReasoningStage,
        policy: EscalationPolicy,
        rules: MergeRules,
        versions: CascadeVersions,
        reserve_ms: float,
    ):
        self._scorer = scorer
        self._reasoner = reasoner
        self._policy = policy
        self._rules = rules
        self._versions = versions
        self._reserve_s = reserve_ms / 1000.0
        self.escalations_in_flight = 0

    async def decide(self, event: RiskEvent, deadline: float) -> Decision:
        """Decide ``event``; ``deadline`` is the caller's deadline on the time.monotonic() clock."""
        started = time.monotonic()
        timings: list[StageTiming] = []
        missing = tuple(name for name in self._versions.feature_names if name not in event.features)
        fast: FastScore | None = None
        t = time.monotonic()
        try:
            fast = await self._scorer.score(
                ScoreRequest.of(event.request_id, event.event_type, event.entities, event.features,
                                occurred_at=event.occurred_at),
                self._budget_s(deadline),
            )
        except StageError as exc:
            merged = fast_model_failed(self._rules, event.event_type, str(exc))
        timings.append(StageTiming("fast_model", _ms_since(t)))

        if fast is not None:
            routing = self._policy.route(
                fast.score, (deadline - time.monotonic()) * 1000.0, self.escalations_in_flight
            )
            verdict, error = None, ""
            if routing.route is Route.ESCALATE:
                verdict, error = await self._escalate(event, fast, deadline, timings)
            t = time.monotonic()
            with span("cascade.merge", route=routing.route.value):
                merged = merge(self._rules, fast, routing, verdict, error)
            timings.append(StageTiming("merge", _ms_since(t)))

        timings.append(StageTiming("cascade_total", _ms_since(started)))
        return self._decision(event, merged, fast, missing, timings)

    async def _escalate(
        self, event: RiskEvent, fast: FastScore, deadline: float, timings: list[StageTiming]
    ) -> tuple[ReasonerVerdict | None, str]:
        self.escalations_in_flight += 1
        t = time.monotonic()
        try:
            budget_s = self._budget_s(deadline)
            verdict = await self._reasoner.reason(
                ReasoningRequest(event=event, fast_score=fast, budget_ms=budget_s * 1000.0), budget_s
            )
            return verdict, ""
        except StageError as exc:
            return None, str(exc)
        finally:
            self.escalations_in_flight -= 1
            timings.append(StageTiming("reasoner", _ms_since(t)))

    def _budget_s(self, deadline: float) -> float:
        return max(0.0, deadline - time.monotonic() - self._reserve_s)

    def _decision(
        self,
        event: RiskEvent,
        merged: MergedVerdict,
        fast: FastScore | None,
        missing: tuple[str, ...],
        timings: list[StageTiming],
    ) -> Decision:
        policy_version = self._versions.policy_version
        if merged.policy_version:
            policy_version = f"{policy_version}+{merged.policy_version}"
        return Decision(
            request_id=event.request_id,
            event_type=event.event_type,
            action=merged.action,
            risk_score=merged.risk_score,
            decided_by=merged.decided_by,
            escalated=merged.escalated,
            reasons=merged.reasons,
            evidence=merged.evidence,
            model_version=fast.model_version if fast else self._versions.model_version,
            policy_version=policy_version,
            timings=tuple(timings),
            trace_id=current_trace_id(),
            degraded=merged.degraded,
            degraded_reason=merged.degraded_reason,
            decided_at=datetime.now(timezone.utc),
            missing_features=missing,
            fast_score=fast.score if fast else 0.0,
            scorer_provider=fast.provider if fast else "",
            reasoning_steps=merged.reasoning_steps,
            rationale=merged.rationale,
            reasoner_backend=merged.reasoner_backend,
            state_features=dict(fast.state_features) if fast else {},
        )


def _ms_since(t: float) -> float:
    return round((time.monotonic() - t) * 1000.0, 3)
