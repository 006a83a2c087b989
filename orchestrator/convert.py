"""Domain decision -> protobuf decision (the only place the two meet)."""

from __future__ import annotations

from risk.v1 import decision_pb2 as pb
from riskcascade.core.domain import Action, Counterfactual, Decision, EventType, Outcome, Stage

ACTIONS = {Action.APPROVE: pb.ACTION_APPROVE, Action.REVIEW: pb.ACTION_REVIEW, Action.BLOCK: pb.ACTION_BLOCK}
STAGES = {
    Stage.FAST_MODEL: pb.STAGE_FAST_MODEL,
    Stage.REASONER: pb.STAGE_REASONER,
    Stage.FALLBACK: pb.STAGE_FALLBACK,
}
OUTCOMES = {Outcome.LEGITIMATE: pb.OUTCOME_LEGITIMATE, Outcome.FRAUD: pb.OUTCOME_FRAUD}
EVENT_TYPES = {
    EventType.ORDER: pb.EVENT_TYPE_ORDER,
    EventType.LOGIN: pb.EVENT_TYPE_LOGIN,
    EventType.PAYOUT: pb.EVENT_TYPE_PAYOUT,
    EventType.REVIEW: pb.EVENT_TYPE_REVIEW,
    EventType.PROMO_REDEMPTION: pb.EVENT_TYPE_PROMO_REDEMPTION,
    EventType.ACCOUNT_CHANGE: pb.EVENT_TYPE_ACCOUNT_CHANGE,
}


def decision_to_proto(d: Decision) -> pb.Decision:
    msg = pb.Decision(
        request_id=d.request_id,
        action=ACTIONS[d.action],
        risk_score=d.risk_score,
        decided_by=STAGES[d.decided_by],
        escalated=d.escalated,
        reasons=[pb.ReasonCode(code=r.code, description=r.description, weight=r.weight) for r in d.reasons],
        evidence=[
            pb.Evidence(
                id=e.id, kind=e.kind, similarity=e.similarity,
                outcome=OUTCOMES[e.outcome] if e.outcome is not None else pb.OUTCOME_UNSPECIFIED,
                risk_type=e.risk_type, summary=e.summary,
            )
            for e in d.evidence
        ],
        model_version=d.model_version,
        policy_version=d.policy_version,
        timings=[pb.StageTiming(stage=t.stage, duration_ms=t.duration_ms) for t in d.timings],
        trace_id=d.trace_id,
        degraded=d.degraded,
        degraded_reason=d.degraded_reason,
        degraded_cause=d.degraded_cause.value,
        missing_features=list(d.missing_features),
        fast_score=d.fast_score,
        scorer_provider=d.scorer_provider,
        replayed=d.replayed,
        event_type=EVENT_TYPES[d.event_type],
        reasoning_steps=[
            pb.ReasoningStep(name=s.name, outcome=s.outcome, duration_ms=s.duration_ms) for s in d.reasoning_steps
        ],
        rationale=d.rationale,
        reasoner_backend=d.reasoner_backend,
        state_features=d.state_features,
        counterfactuals=[counterfactual_to_proto(c) for c in d.counterfactuals],
    )
    msg.decided_at.FromDatetime(d.decided_at)
    return msg


def counterfactual_to_proto(c: Counterfactual) -> pb.Counterfactual:
    return pb.Counterfactual(
        target_action=ACTIONS[c.target], threshold=c.threshold, found=c.found, score=c.score,
        original_score=c.original_score, candidates=c.candidates,
        changes=[pb.FeatureChange(feature=f.feature, from_value=f.from_value, to_value=f.to_value, action=f.action,
                                  spoofable=f.spoofable, derived=f.derived) for f in c.changes],
    )
