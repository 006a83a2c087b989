"""The cascade: fast model, escalation policy, reasoner, merge. Async orchestration with no Ray or gRPC import.

Stages are reached through the small FastStage / ReasoningStage protocols (orchestrator/stages.py adapts Ray
Serve handles to them). The fast model is asked first and always gets its time: the caller's remaining deadline
less a reserve for merging and persisting, but never less than the event type's minimum (``fast_model_min_ms``)
and never more than ``scorer_timeout_ms``. An answer that comes after the caller's deadline is still a real
decision: it is stored, and the caller's retry gets it. The reasoner gets what is left less the reserve. Each
stage sits behind a circuit breaker: once a stage has failed ``breaker_failures`` times in a row, calls to it
fail at once (no waiting out a dead replica) until a probe gets through. A stage that fails, runs out of time or
has its circuit open becomes an explicit degraded decision (the failure policy of the event type).

Escalations are bounded twice: ``max_in_flight`` across all callers, and ``max_per_call`` for one call (a
DecideBatch shares one CallBudget among its items), so one large batch cannot take the reasoner from everyone.
The first is an EscalationBudget: this process's count (LocalEscalationBudget, the default), or one budget shared
by several orchestrators (orchestrator/shared_limits.py), whose slots are leases an escalation may not outlive.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Protocol

from orchestrator.breaker import CircuitBreaker
from orchestrator.models import ModelSelection, ServingModel, Shadow
from riskcascade.core.domain import (
    Action,
    Decision,
    EventType,
    FastScore,
    ReasonerVerdict,
    ReasoningRequest,
    RiskEvent,
    ScoreRequest,
    ShadowDecision,
    StageTiming,
)
from riskcascade.core.merge import MergedVerdict, MergeRules, fast_model_failed, merge
from riskcascade.core.policy import Route, RoutingDecision
from riskcascade.core.shadow import shadow_decision
from riskcascade.core.telemetry import current_trace_id, span


class StageError(Exception):
    """A stage failed or ran out of time; the message says which and why."""


class NoTimeLeft(StageError):
    """The caller's deadline left no time to call the stage (says nothing about the stage's health)."""


class FastStage(Protocol):
    async def score(self, request: ScoreRequest, timeout_s: float) -> FastScore: ...


class ReasoningStage(Protocol):
    async def reason(self, request: ReasoningRequest, timeout_s: float) -> ReasonerVerdict: ...


@dataclass(frozen=True)
class StageLimits:
    """Time limits of the stages (from ResilienceSettings), in seconds."""

    fast_model_min_s: Mapping[EventType, float]
    scorer_timeout_s: float

    @classmethod
    def from_settings(cls, settings) -> "StageLimits":  # noqa: ANN001 - riskcascade.core.config.ResilienceSettings
        return cls({k: v / 1000.0 for k, v in settings.fast_model_min_ms.items()}, settings.scorer_timeout_ms / 1000.0)


class CallBudget:
    """Escalations one call may still start (a DecideBatch shares one among its items)."""

    def __init__(self, escalations: int):
        self.escalations_left = escalations


@dataclass(frozen=True)
class EscalationSlot:
    """Leave to run one escalation. ``token`` names a shared slot ("" for one counted in this process only);
    ``max_s`` is how long the escalation may run at most (a shared slot is a lease that then ends)."""

    token: str = ""
    max_s: float = math.inf


@dataclass(frozen=True)
class Busy:
    """No slot: ``in_flight`` escalations were running (as counted where the budget lives)."""

    in_flight: int


class EscalationBudget(Protocol):
    """Escalations running at once across all callers (``escalation.max_in_flight``)."""

    @property
    def in_flight(self) -> int:
        """Escalations this process runs now (what routing sees before asking for a slot)."""
        ...

    async def acquire(self) -> EscalationSlot | Busy:
        """A slot, or Busy. Bounded in time: never waits long, whatever backs the budget."""
        ...

    def release(self, slot: EscalationSlot) -> None:
        """Give a slot back; never waits (a remote release runs in the background)."""
        ...


class LocalEscalationBudget:
    """The budget counted in this process. ``limit`` None: the escalation policy's ``max_in_flight`` alone bounds
    it (routing checks ``in_flight`` against it with no await in between, so the check and the count agree)."""

    def __init__(self, limit: int | None = None):
        self._limit = limit
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def take(self) -> EscalationSlot | Busy:
        if self._limit is not None and self._in_flight >= self._limit:
            return Busy(self._in_flight)
        self._in_flight += 1
        return EscalationSlot()

    async def acquire(self) -> EscalationSlot | Busy:
        return self.take()

    def release(self, slot: EscalationSlot) -> None:
        self._in_flight -= 1


class Cascade:
    def __init__(
        self,
        scorer: FastStage,
        reasoner: ReasoningStage,
        models: ModelSelection,
        rules: MergeRules,
        policy_version: str,
        reserve_ms: float,
        limits: StageLimits,
        scorer_breaker: CircuitBreaker,
        reasoner_breaker: CircuitBreaker,
        max_escalations_per_call: int,
        escalation_budget: EscalationBudget | None = None,
    ):
        self._scorer = scorer
        self._reasoner = reasoner
        self.models = models
        self._rules = rules
        self._policy_version = policy_version
        self._reserve_s = reserve_ms / 1000.0
        self._limits = limits
        self.scorer_breaker = scorer_breaker
        self.reasoner_breaker = reasoner_breaker
        self.max_escalations_per_call = max_escalations_per_call
        self.escalation_budget: EscalationBudget = escalation_budget or LocalEscalationBudget()

    @property
    def escalations_in_flight(self) -> int:
        """Escalations this process runs now."""
        return self.escalation_budget.in_flight

    async def decide(self, event: RiskEvent, deadline: float, call: CallBudget | None = None,
                     model: ServingModel | None = None, explain: bool = False) -> Decision:
        """Decide ``event``; ``deadline`` is the caller's deadline on the time.monotonic() clock; ``call`` is the
        escalation budget of the call it belongs to (a new one per event when None); ``model`` the version the
        caller validated the event for (default: the live one, read once here); ``explain``: ask the scorer for
        counterfactuals against this version's band, kept on a REVIEW or BLOCK (the fast model's flips)."""
        started = time.monotonic()
        model = model if model is not None else self.models.live
        shadow = self.models.shadow  # read once too: a shadow set or ended meanwhile does not half apply
        call = call if call is not None else CallBudget(self.max_escalations_per_call)
        timings: list[StageTiming] = []
        missing = tuple(name for name in model.info.feature_names if name not in event.features)
        fast: FastScore | None = None
        t = time.monotonic()
        try:
            request = ScoreRequest.of(event.request_id, event.event_type, event.entities, event.features,
                                      occurred_at=event.occurred_at, model_version=model.version, text=event.text,
                                      shadow_version=shadow.model.version if shadow is not None else "",
                                      counterfactual_band=(model.policy.band_low, model.policy.band_high)
                                      if explain else None)
            fast = await self._guarded(
                self.scorer_breaker, "fast model", self._scorer.score, request, self._fast_budget_s(event, deadline)
            )
        except StageError as exc:
            merged = fast_model_failed(self._rules, event.event_type, str(exc))
        timings.append(StageTiming("fast_model", _ms_since(t)))

        if fast is not None:
            routing, slot = await self._route(model, fast, deadline, call)
            verdict, error = None, ""
            if slot is not None:
                verdict, error = await self._escalate(event, fast, deadline, timings, slot)
            t = time.monotonic()
            with span("cascade.merge", route=routing.route.value):
                merged = merge(self._rules, fast, routing, verdict, error)
            timings.append(StageTiming("merge", _ms_since(t)))

        timings.append(StageTiming("cascade_total", _ms_since(started)))
        decision = self._decision(event, merged, fast, missing, timings, model)
        if shadow is not None and fast is not None:
            decision = replace(decision, shadow=self._shadow(shadow, model, fast, merged))
        return decision

    def _shadow(self, shadow: Shadow, model: ServingModel, fast: FastScore, live: MergedVerdict
                ) -> ShadowDecision | None:
        """The candidate's decision on the score its version gave (the live score when it is the live version);
        None when the scorer did not score it (a shadow set while the call was out)."""
        if shadow.model.version == model.version:
            score = fast.score
        elif fast.shadow_version == shadow.model.version and fast.shadow_score is not None:
            score = fast.shadow_score
        else:
            return None
        return shadow_decision(shadow.model.version, shadow.policy_version, score, shadow.model.policy,
                               live.escalated, live.action, self._rules.undecided_action)

    async def _route(self, model: ServingModel, fast: FastScore, deadline: float, call: CallBudget
                     ) -> tuple[RoutingDecision, EscalationSlot | None]:
        """The policy's route, and the escalation slot when it escalates. The call's budget is taken before the
        slot is asked for (items of one batch may ask at once) and given back when the budget has no slot."""
        remaining_ms = (deadline - time.monotonic()) * 1000.0
        routing = model.policy.route(fast.score, remaining_ms, self.escalations_in_flight, call.escalations_left)
        if routing.route is not Route.ESCALATE:
            return routing, None
        call.escalations_left -= 1
        slot = await self.escalation_budget.acquire()
        if isinstance(slot, EscalationSlot):
            return routing, slot
        call.escalations_left += 1
        # the budget is full: the policy words it (at least its own limit, whatever count the budget saw)
        busy = max(slot.in_flight, model.policy.max_in_flight)
        return model.policy.route(fast.score, remaining_ms, busy, call.escalations_left), None

    async def _escalate(
        self, event: RiskEvent, fast: FastScore, deadline: float, timings: list[StageTiming], slot: EscalationSlot
    ) -> tuple[ReasonerVerdict | None, str]:
        t = time.monotonic()
        try:
            budget_s = min(self._budget_s(deadline), slot.max_s)
            verdict = await self._guarded(
                self.reasoner_breaker, "reasoner", self._reasoner.reason,
                ReasoningRequest(event=event, fast_score=fast, budget_ms=budget_s * 1000.0), budget_s,
            )
            return verdict, ""
        except StageError as exc:
            return None, str(exc)
        finally:
            self.escalation_budget.release(slot)
            timings.append(StageTiming("reasoner", _ms_since(t)))

    def _budget_s(self, deadline: float) -> float:
        return max(0.0, deadline - time.monotonic() - self._reserve_s)

    def _fast_budget_s(self, event: RiskEvent, deadline: float) -> float:
        least = self._limits.fast_model_min_s.get(event.event_type, 0.0)
        return min(self._limits.scorer_timeout_s, max(self._budget_s(deadline), least))

    @staticmethod
    async def _guarded(breaker: CircuitBreaker, stage: str, call, request, timeout_s: float):  # noqa: ANN001
        """One stage call through its circuit breaker: refused at once while the circuit is open."""
        permit = breaker.allow()
        if permit is None:
            raise StageError(
                f"{stage}: circuit open after repeated failures (last: {breaker.last_error or 'unknown'}); "
                f"next probe in {breaker.retry_in_s() * 1000:.0f} ms"
            )
        try:
            result = await call(request, timeout_s)
        except NoTimeLeft:
            breaker.release(permit)  # the caller's deadline, not the stage, is at fault
            raise
        except StageError as exc:
            breaker.failure(str(exc), permit)
            raise
        except (asyncio.CancelledError, Exception):
            breaker.release(permit)
            raise
        breaker.success(permit)
        return result

    def _decision(
        self,
        event: RiskEvent,
        merged: MergedVerdict,
        fast: FastScore | None,
        missing: tuple[str, ...],
        timings: list[StageTiming],
        model: ServingModel,
    ) -> Decision:
        policy_version = self._policy_version
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
            model_version=fast.model_version if fast else model.version,
            policy_version=policy_version,
            timings=tuple(timings),
            trace_id=current_trace_id(),
            degraded=merged.degraded,
            degraded_reason=merged.degraded_reason,
            degraded_cause=merged.degraded_cause,
            decided_at=datetime.now(timezone.utc),
            missing_features=missing,
            fast_score=fast.score if fast else 0.0,
            scorer_provider=fast.provider if fast else "",
            reasoning_steps=merged.reasoning_steps,
            rationale=merged.rationale,
            reasoner_backend=merged.reasoner_backend,
            state_features=dict(fast.state_features) if fast else {},
            # the fast model's flips, for a decision that is not an approval (the reasoner may have approved)
            counterfactuals=fast.counterfactuals if fast and merged.action is not Action.APPROVE else (),
        )


def _ms_since(t: float) -> float:
    return round((time.monotonic() - t) * 1000.0, 3)
