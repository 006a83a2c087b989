"""Evidence weighing: the transparent rule behind the default reasoning backend and the reflection check.

Past cases are grouped by kind: the same account's history, graph neighbours (other accounts on a shared
device, IP or payment instrument), similar behaviour, similar narrative. Within a kind each case votes with its
outcome (fraud = 1) and a weight: similarity² for the two similarity kinds (cases below ``min_similarity``
ignored), 1 for the entity kinds. With the fast model's calibrated score p as a prior worth ``prior_weight``
pseudo-cases, each kind k gives a smoothed fraud share

    s_k = (prior_weight·p + Σ fraud weight) / (prior_weight + Σ weight)      (s_k = p when k found nothing)

and the kinds move p in log-odds, each by its trust β_k (``history_weight``, ``neighbour_weight``,
``similar_weight``, ``narrative_weight``):

    logit(posterior) = logit(p) + Σ_k β_k · (logit(s_k) − logit(p))

Confidence is Σ_k β_k · W_k / (W_k + prior_weight) (W_k the kind's total weight), capped at 1, scaled by
n_used / min_cases when fewer than ``min_cases`` cases counted. The action is BLOCK at or above ``block_at``,
APPROVE below ``approve_at``, REVIEW between. The risk type is the one with the most fraud weight.
The trusts were set on the validation split when retrieval had no time bound and the fast model no outcome
features; with time-bound retrieval and outcome features in the fast model no setting lifts the cascade above the
fast model on validation (reports/cascade-valid/README.md), so they stay as they were. Nothing is canned or random.

Any finite input gives a finite answer: a prior outside [0, 1] is read as the nearest bound, a similarity outside
[-1, 1] (a cosine) as the nearest bound, and the posterior's log-odds stay within those of
[``PROBABILITY_FLOOR``, 1 − ``PROBABILITY_FLOOR``], so no trust setting, however large, overflows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from riskcascade.core.config import ReasonerSettings
from riskcascade.core.domain import Action
from services.reasoning.case_file import EvidenceItem, EvidenceKind

PROBABILITY_FLOOR = 1e-6  # keeps log-odds finite for a score of exactly 0 or 1


@dataclass(frozen=True)
class Weighing:
    posterior: float
    confidence: float
    fraud_weight: float
    legit_weight: float
    cases_used: int
    risk_type: str  # "" when no fraud evidence
    weights: dict[str, float]  # evidence id -> weight, for the items that counted

    @property
    def fraud_share(self) -> float:
        total = self.fraud_weight + self.legit_weight
        return self.fraud_weight / total if total > 0 else 0.0


def item_weight(item: EvidenceItem, settings: ReasonerSettings) -> float:
    """The item's weight inside its kind (0 = it does not count)."""
    if item.kind in (EvidenceKind.SIMILAR_CASE, EvidenceKind.NARRATIVE_CASE):
        similarity = _bounded(item.similarity, -1.0, 1.0)  # a cosine; squaring a huge value would overflow
        return max(similarity, 0.0) ** 2 if similarity >= settings.min_similarity else 0.0
    if item.kind in (EvidenceKind.ENTITY_HISTORY, EvidenceKind.NEIGHBOUR_CASE):
        return 1.0
    return 0.0  # policy passages inform the action, not the probability


def kind_trust(kind: str, settings: ReasonerSettings) -> float:
    return {
        EvidenceKind.ENTITY_HISTORY: settings.history_weight,
        EvidenceKind.NEIGHBOUR_CASE: settings.neighbour_weight,
        EvidenceKind.SIMILAR_CASE: settings.similar_weight,
        EvidenceKind.NARRATIVE_CASE: settings.narrative_weight,
    }.get(kind, 0.0)


def _bounded(value: float, low: float, high: float) -> float:
    """``value`` within [low, high]; NaN (no number at all) reads as ``low``."""
    return low if math.isnan(value) else min(max(value, low), high)


def _logit(p: float) -> float:
    p = _bounded(p, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    return math.log(p / (1.0 - p))


LOG_ODDS_LIMIT = _logit(1.0 - PROBABILITY_FLOOR)  # the posterior's log-odds stay within ±this


def _sigmoid(log_odds: float) -> float:
    return 1.0 / (1.0 + math.exp(-_bounded(log_odds, -LOG_ODDS_LIMIT, LOG_ODDS_LIMIT)))


def weigh(prior: float, items: Sequence[EvidenceItem], settings: ReasonerSettings) -> Weighing:
    prior = _bounded(prior, 0.0, 1.0)  # a probability; a score outside [0, 1] reads as the nearest bound
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind -> [fraud weight, total weight]
    fraud_w = legit_w = 0.0
    used = 0
    weights: dict[str, float] = {}
    by_type: dict[str, float] = defaultdict(float)
    for item in items:
        if item.outcome is None:
            continue
        w = item_weight(item, settings)
        if w <= 0 or kind_trust(item.kind, settings) <= 0:
            continue
        used += 1
        weights[item.id] = w
        per_kind[item.kind][1] += w
        if item.is_fraud:
            per_kind[item.kind][0] += w
            fraud_w += w
            if item.risk_type:
                by_type[item.risk_type] += w
        else:
            legit_w += w
    a = settings.prior_weight
    moves: list[float] = []
    confidence = 0.0
    for kind, (fraud, total) in per_kind.items():
        share = (a * prior + fraud) / (a + total)
        trust = kind_trust(kind, settings)
        moves.append(trust * (_logit(share) - _logit(prior)))
        confidence += trust * (total / (total + a))
    move = sum(moves)
    if math.isnan(move):  # huge trusts made moves of +inf and -inf: those kinds cancel out, the rest still count
        move = sum(m for m in moves if math.isfinite(m))
    posterior = _sigmoid(_logit(prior) + move)
    confidence = min(1.0, confidence)
    if settings.min_cases and used < settings.min_cases:
        confidence *= used / settings.min_cases
    risk_type = max(by_type, key=lambda k: (by_type[k], k)) if by_type else ""
    return Weighing(posterior, confidence, fraud_w, legit_w, used, risk_type, weights)


def action_for(posterior: float, settings: ReasonerSettings) -> Action:
    if posterior >= settings.block_at:
        return Action.BLOCK
    if posterior < settings.approve_at:
        return Action.APPROVE
    return Action.REVIEW
