"""Merge rules: how the stages' outputs become one decision. Plain logic, no Ray or gRPC.

The rules, in order:
1. Fast model failed (error or timeout): the per-event-type failure action decides (fail open for orders,
   logins and reviews; closed, i.e. REVIEW, for payouts, promos and account changes), ``degraded`` is set with
   the reason, and the score is 0 because none was computed. Stage = FALLBACK.
2. Score outside the band: APPROVE below, BLOCK at or above; the fast model decided. Stage = FAST_MODEL.
3. Uncertain but not escalated (HOLD: no deadline or escalation budget left): the undecided action (REVIEW),
   ``degraded`` with the reason. Stage = FALLBACK.
4. Escalated and the reasoner failed or ran out of time: the undecided action (REVIEW), ``degraded`` with
   the reason. Stage = FALLBACK.
5. Escalated and answered: the reasoner's action, unless its confidence is below ``min_reasoner_confidence``,
   which turns it into REVIEW (a low-confidence verdict must not approve or block on its own). The merged
   score is ``fast_weight * fast + (1 - fast_weight) * reasoner``. Reasons are the reasoner's then the fast
   model's; evidence is the reasoner's. Stage = REASONER.
"""

from __future__ import annotations

from dataclasses import dataclass

from riskcascade.core.config import MergeSettings
from riskcascade.core.domain import (
    Action,
    DegradedCause,
    EventType,
    FastScore,
    ReasonCode,
    ReasonerVerdict,
    ReasoningStep,
    Stage,
)
from riskcascade.core.policy import Route, RoutingDecision


@dataclass(frozen=True)
class MergeRules:
    fast_weight: float
    min_reasoner_confidence: float
    failure_action: dict[EventType, Action]
    undecided_action: Action

    @classmethod
    def from_settings(cls, settings: MergeSettings) -> MergeRules:
        return cls(settings.fast_weight, settings.min_reasoner_confidence, dict(settings.failure_action),
                   settings.undecided_action)


@dataclass(frozen=True)
class MergedVerdict:
    """The merged outcome, before timings, trace id and versions are stamped on it."""

    action: Action
    risk_score: float
    decided_by: Stage
    escalated: bool
    reasons: tuple[ReasonCode, ...]
    evidence: tuple
    degraded: bool
    degraded_reason: str
    policy_version: str = ""
    reasoning_steps: tuple[ReasoningStep, ...] = ()
    rationale: str = ""
    reasoner_backend: str = ""
    degraded_cause: DegradedCause = DegradedCause.NONE


def fast_model_failed(rules: MergeRules, event_type: EventType, why: str) -> MergedVerdict:
    action = rules.failure_action.get(event_type, rules.undecided_action)
    return MergedVerdict(
        action=action,
        risk_score=0.0,
        decided_by=Stage.FALLBACK,
        escalated=False,
        reasons=(ReasonCode("FAST_MODEL_UNAVAILABLE", f"fast model unavailable: {why}", 0.0),),
        evidence=(),
        degraded=True,
        degraded_reason=f"fast model failed: {why}; failure policy for {event_type.value}: {action.value}",
        degraded_cause=DegradedCause.FAST_MODEL_FAILED,
    )


def merge(
    rules: MergeRules,
    fast: FastScore,
    routing: RoutingDecision,
    verdict: ReasonerVerdict | None = None,
    reasoner_error: str = "",
) -> MergedVerdict:
    """Merge the fast score, its routing and (when escalated) the reasoner's verdict or failure."""
    if routing.route is Route.APPROVE or routing.route is Route.BLOCK:
        action = Action.APPROVE if routing.route is Route.APPROVE else Action.BLOCK
        return MergedVerdict(action, fast.score, Stage.FAST_MODEL, False, fast.reasons, (), False, "")
    if routing.route is Route.HOLD:
        return MergedVerdict(
            rules.undecided_action, fast.score, Stage.FALLBACK, False, fast.reasons, (), True, routing.reason,
            degraded_cause=routing.cause,
        )
    if verdict is None:
        why = reasoner_error or "reasoner returned no verdict"
        return MergedVerdict(
            rules.undecided_action, fast.score, Stage.FALLBACK, True, fast.reasons, (), True,
            f"escalated but reasoner failed: {why}", degraded_cause=DegradedCause.REASONER_FAILED,
        )
    action = verdict.action
    reasons = verdict.reasons + fast.reasons
    if verdict.confidence < rules.min_reasoner_confidence and action is not Action.REVIEW:
        reasons = (
            ReasonCode(
                "REASONER_LOW_CONFIDENCE",
                f"reasoner suggested {action.value} with confidence {verdict.confidence:.2f} "
                f"< {rules.min_reasoner_confidence:.2f}; sent to review",
                0.0,
            ),
        ) + reasons
        action = Action.REVIEW
    score = rules.fast_weight * fast.score + (1.0 - rules.fast_weight) * verdict.score
    return MergedVerdict(
        action=action,
        risk_score=min(1.0, max(0.0, score)),
        decided_by=Stage.REASONER,
        escalated=True,
        reasons=reasons,
        evidence=verdict.evidence,
        degraded=False,
        degraded_reason="",
        policy_version=verdict.policy_version,
        reasoning_steps=verdict.steps,
        rationale=verdict.rationale,
        reasoner_backend=verdict.backend,
    )
