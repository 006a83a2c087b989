"""The embedded reasoner: a transparent evidence-weighted rule over retrieved adjudicated cases.

The rule (all knobs in ReasonerSettings):
- Each retrieved case with cosine similarity s >= min_similarity gets weight w = max(s, 0)^2, so near
  neighbours dominate and loosely similar ones barely count.
- The fast model's calibrated score p acts as a prior worth ``prior_weight`` pseudo-cases:
      posterior = (prior_weight * p + sum(w_i * y_i)) / (prior_weight + sum(w_i)),  y_i = 1 for fraud cases.
- Action: BLOCK if posterior >= block_at, APPROVE if posterior < approve_at, otherwise REVIEW.
- Confidence is how much of the posterior rests on evidence rather than the prior,
      sum(w) / (sum(w) + prior_weight),
  scaled down by n_used / min_cases when fewer than min_cases cases were usable. The merge step turns a
  low-confidence APPROVE/BLOCK into REVIEW.
Every verdict cites the cases it used, with their outcomes and similarities; nothing is canned or random.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from retrieval.case_memory import RetrievedCase
from riskcascade.config import ReasonerSettings
from riskcascade.domain import Action, Evidence, Outcome, ReasonCode, ReasonerVerdict, ReasoningRequest
from services.reasoning.base import CaseReasoner

STEPS = ("similar_case_retrieval", "evidence_weighing", "verdict")


@dataclass(frozen=True)
class EvidenceAssessment:
    posterior: float
    confidence: float
    fraud_weight: float
    legit_weight: float
    cases_used: int


def assess(prior: float, cases: Sequence[RetrievedCase], settings: ReasonerSettings) -> EvidenceAssessment:
    fraud_w = legit_w = 0.0
    used = 0
    for retrieved in cases:
        if retrieved.similarity < settings.min_similarity:
            continue
        weight = max(retrieved.similarity, 0.0) ** 2
        used += 1
        if retrieved.case.outcome is Outcome.FRAUD:
            fraud_w += weight
        else:
            legit_w += weight
    evidence = fraud_w + legit_w
    posterior = (settings.prior_weight * prior + fraud_w) / (settings.prior_weight + evidence) if (
        settings.prior_weight + evidence
    ) > 0 else prior
    confidence = evidence / (evidence + settings.prior_weight) if evidence > 0 else 0.0
    if settings.min_cases and used < settings.min_cases:
        confidence *= used / settings.min_cases
    return EvidenceAssessment(posterior, confidence, fraud_w, legit_w, used)


def action_for(posterior: float, settings: ReasonerSettings) -> Action:
    if posterior >= settings.block_at:
        return Action.BLOCK
    if posterior < settings.approve_at:
        return Action.APPROVE
    return Action.REVIEW


class EvidenceWeightedReasoner(CaseReasoner):
    def __init__(self, settings: ReasonerSettings):
        self._settings = settings

    def reason(self, request: ReasoningRequest, cases: Sequence[RetrievedCase]) -> ReasonerVerdict:
        s = self._settings
        a = assess(request.fast_score.score, cases, s)
        action = action_for(a.posterior, s)
        fraud_cases = [c for c in cases if c.case.outcome is Outcome.FRAUD and c.similarity >= s.min_similarity]
        types = Counter(c.case.risk_type for c in fraud_cases if c.case.risk_type)
        reasons = [
            ReasonCode(
                "SIMILAR_CASES",
                f"{len(fraud_cases)} of {a.cases_used} similar past cases were fraud "
                f"(similarity-weighted share {a.fraud_weight / max(a.fraud_weight + a.legit_weight, 1e-9):.2f})",
                round(a.posterior - request.fast_score.score, 4),
            )
        ]
        if types:
            risk_type, n = types.most_common(1)[0]
            reasons.append(
                ReasonCode(f"PATTERN:{risk_type}", f"most similar fraud cases were {risk_type} ({n})", 0.0)
            )
        rationale = (
            f"fast score {request.fast_score.score:.3f} as prior (weight {s.prior_weight:g}); "
            f"{a.cases_used} retrieved cases, fraud weight {a.fraud_weight:.2f} vs legitimate {a.legit_weight:.2f}; "
            f"posterior {a.posterior:.3f} -> {action.value} (block >= {s.block_at:g}, approve < {s.approve_at:g})"
        )
        evidence = tuple(
            Evidence(
                id=f"case:{c.case.case_id}",
                kind="similar_case",
                similarity=round(c.similarity, 4),
                outcome=c.case.outcome,
                risk_type=c.case.risk_type,
                summary=c.case.summary,
            )
            for c in cases
        )
        return ReasonerVerdict(
            action=action,
            score=a.posterior,
            confidence=a.confidence,
            rationale=rationale,
            reasons=tuple(reasons),
            evidence=evidence,
            steps=STEPS,
            policy_version=s.policy_version,
        )
