"""Escalation policy and merge rules: plain logic, property-tested."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from riskcascade.core.domain import Action, EventType, FastScore, ReasonCode, ReasonerVerdict, Stage
from riskcascade.core.merge import MergeRules, fast_model_failed, merge
from riskcascade.core.policy import EscalationPolicy, Route

POLICY = EscalationPolicy(band_low=0.2, band_high=0.8, min_reasoner_budget_ms=50, max_in_flight=4)
RULES = MergeRules(
    fast_weight=0.5,
    min_reasoner_confidence=0.5,
    failure_action={EventType.ORDER: Action.APPROVE, EventType.PAYOUT: Action.REVIEW},
    undecided_action=Action.REVIEW,
)
scores = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def fast(score: float) -> FastScore:
    return FastScore(score, score, (ReasonCode("RISK_UP:x", "x", 0.1),), "m1", "CPUExecutionProvider")


def verdict(action: Action, score: float, confidence: float) -> ReasonerVerdict:
    return ReasonerVerdict(action, score, confidence, "r", (ReasonCode("SIMILAR_CASES", "s", 0.2),), (), ("a",), "p1")


@given(scores, st.floats(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=10))
def test_route_follows_band_and_budget(score, remaining_ms, in_flight):
    r = POLICY.route(score, remaining_ms, in_flight).route
    if score < 0.2:
        assert r is Route.APPROVE
    elif score >= 0.8:
        assert r is Route.BLOCK
    elif remaining_ms < 50 or in_flight >= 4:
        assert r is Route.HOLD
    else:
        assert r is Route.ESCALATE


def test_hold_says_why():
    assert "deadline" in POLICY.route(0.5, 10, 0).reason
    assert "budget exhausted" in POLICY.route(0.5, 1000, 4).reason


def test_band_must_be_ordered():
    with pytest.raises(ValueError, match="band_low <= band_high"):
        EscalationPolicy(band_low=0.9, band_high=0.1, min_reasoner_budget_ms=0, max_in_flight=1)


@given(scores)
def test_outside_band_fast_model_decides(score):
    routing = POLICY.route(score, 1000, 0)
    if routing.route not in (Route.APPROVE, Route.BLOCK):
        return
    m = merge(RULES, fast(score), routing)
    assert m.decided_by is Stage.FAST_MODEL and not m.escalated and not m.degraded
    assert m.action is (Action.APPROVE if score < 0.2 else Action.BLOCK)
    assert m.risk_score == score


@given(scores, st.sampled_from(list(Action)), scores, st.floats(min_value=0, max_value=1))
def test_escalated_merge(fast_score, action, reasoner_score, confidence):
    routing = POLICY.route(0.5, 1000, 0)
    m = merge(RULES, fast(fast_score), routing, verdict(action, reasoner_score, confidence))
    assert m.decided_by is Stage.REASONER and m.escalated and not m.degraded
    assert 0.0 <= m.risk_score <= 1.0
    assert m.risk_score == pytest.approx(0.5 * fast_score + 0.5 * reasoner_score)
    if confidence < 0.5:
        assert m.action is Action.REVIEW  # a low-confidence verdict never approves or blocks alone
    else:
        assert m.action is action
    assert m.reasons[-1].code == "RISK_UP:x"  # fast model's reasons are kept after the reasoner's


def test_reasoner_failure_is_degraded_review():
    m = merge(RULES, fast(0.5), POLICY.route(0.5, 1000, 0), None, "reasoner: no answer within 40 ms")
    assert m.action is Action.REVIEW and m.degraded and m.escalated and m.decided_by is Stage.FALLBACK
    assert "no answer within 40 ms" in m.degraded_reason


def test_hold_is_degraded_review():
    m = merge(RULES, fast(0.5), POLICY.route(0.5, 1000, 4))
    assert m.action is Action.REVIEW and m.degraded and not m.escalated
    assert "budget exhausted" in m.degraded_reason


def test_fast_model_failure_follows_per_event_type_policy():
    open_ = fast_model_failed(RULES, EventType.ORDER, "timeout")
    closed = fast_model_failed(RULES, EventType.PAYOUT, "timeout")
    unlisted = fast_model_failed(RULES, EventType.LOGIN, "timeout")
    assert (open_.action, closed.action, unlisted.action) == (Action.APPROVE, Action.REVIEW, Action.REVIEW)
    assert open_.degraded and "fail" in open_.degraded_reason and open_.decided_by is Stage.FALLBACK
