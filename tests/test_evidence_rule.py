"""The embedded evidence-weighted reasoner: its documented rule, checked case by case."""

import pytest

from retrieval.case_memory import RetrievedCase
from riskcascade.config import ReasonerSettings
from riskcascade.domain import (
    Action, AdjudicatedCase, Entities, EventType, FastScore, Outcome, ReasoningRequest, RiskEvent,
)
from services.reasoning.evidence_rule import EvidenceWeightedReasoner, assess

SETTINGS = ReasonerSettings(prior_weight=2.0, block_at=0.7, approve_at=0.3, min_similarity=0.0, min_cases=3)


def case(i: int, fraud: bool, sim: float, risk_type: str = "collusion") -> RetrievedCase:
    c = AdjudicatedCase(f"c{i}", EventType.ORDER, {"amount": 1.0}, Outcome.FRAUD if fraud else Outcome.LEGITIMATE,
                        risk_type if fraud else "", summary=f"case {i}")
    return RetrievedCase(c, sim)


def request(score: float) -> ReasoningRequest:
    event = RiskEvent("r1", EventType.ORDER, Entities("a1"), {"amount": 1.0})
    return ReasoningRequest(event, FastScore(score, score, (), "m", "CPUExecutionProvider"), budget_ms=100)


def test_posterior_follows_the_documented_formula():
    cases = [case(0, True, 0.9), case(1, True, 0.8), case(2, False, 0.5)]
    a = assess(0.5, cases, SETTINGS)
    fraud_w, legit_w = 0.81 + 0.64, 0.25
    assert a.posterior == pytest.approx((2.0 * 0.5 + fraud_w) / (2.0 + fraud_w + legit_w))
    assert a.confidence == pytest.approx((fraud_w + legit_w) / (fraud_w + legit_w + 2.0))
    assert a.cases_used == 3


def test_fraudulent_neighbours_block_and_cite_their_pattern():
    v = EvidenceWeightedReasoner(SETTINGS).reason(request(0.5), [case(i, True, 0.95) for i in range(10)])
    assert v.action is Action.BLOCK and v.score > 0.7
    assert len(v.evidence) == 10 and all(e.id.startswith("case:c") for e in v.evidence)
    assert any(r.code == "PATTERN:collusion" for r in v.reasons)
    assert "posterior" in v.rationale and v.steps


def test_legitimate_neighbours_approve():
    v = EvidenceWeightedReasoner(SETTINGS).reason(request(0.5), [case(i, False, 0.95) for i in range(10)])
    assert v.action is Action.APPROVE and v.score < 0.3


def test_mixed_evidence_reviews():
    cases = [case(i, i % 2 == 0, 0.9) for i in range(10)]
    assert EvidenceWeightedReasoner(SETTINGS).reason(request(0.5), cases).action is Action.REVIEW


def test_no_or_dissimilar_evidence_has_no_confidence():
    none = EvidenceWeightedReasoner(SETTINGS).reason(request(0.9), [])
    assert none.confidence == 0.0 and none.score == pytest.approx(0.9)
    strict = ReasonerSettings(**{**SETTINGS.model_dump(), "min_similarity": 0.5})
    far = assess(0.5, [case(i, True, 0.2) for i in range(5)], strict)
    assert far.cases_used == 0 and far.confidence == 0.0


def test_few_cases_lower_confidence():
    two = assess(0.5, [case(0, True, 0.9), case(1, True, 0.9)], SETTINGS)
    three = assess(0.5, [case(i, True, 0.9) for i in range(3)], SETTINGS)
    assert two.confidence < three.confidence * (2 / 3) + 1e-9
