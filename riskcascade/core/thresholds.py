"""Choosing the escalation band of the cascade (plain numpy).

A calibrated score below ``low`` is approved, one at or above ``high`` is blocked, and one in ``[low, high)`` is
escalated to the slower reasoner for review. Two rules choose the band on validation data:

- ``band_by_share`` sends a fixed share of traffic to review, centred on the least decisive score. It needs no
  labels and keeps the reasoner's load predictable, but says nothing about what mistakes cost.
- ``band_by_cost`` minimises the total cost of missed fraud, wrongly blocked customers and reviews on labelled
  data, so the band reflects the business's prices rather than a chosen share.

``assess_band`` prices any band under given costs, so the two rules can be compared on the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

BAND_CENTRE = 0.5  # the share rule centres the band on the least decisive calibrated score
SCORE_FLOOR = 0.0  # lowest candidate threshold: nothing is approved
SCORE_CEILING = 1.0  # highest candidate threshold: every score below 1 is approved (a score of 1 never is)
RULE_SHARE = "share"
RULE_COST = "cost"


@dataclass(frozen=True)
class BandCosts:
    """What one decision costs, in any single currency unit; only the ratios between the three matter.

    When ``review`` is at least ``min(missed_fraud, wrong_block)`` escalating never pays (blocking or approving
    every event in a band is no dearer than reviewing it), and ``band_by_cost`` returns an empty band.
    """

    missed_fraud: float  # approving one fraudulent event
    wrong_block: float  # blocking one legitimate event
    review: float  # escalating one event to the reasoner, whatever its label

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"BandCosts.{field.name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class BandChoice:
    """A band, the rule that chose it, and what it costs on the data it was assessed on."""

    rule: str  # RULE_SHARE or RULE_COST
    low: float
    high: float
    cost_per_event: float  # total cost under the given BandCosts divided by the number of events
    escalated_share: float  # share of events with low <= score < high


def band_by_share(scores: np.ndarray, target_share: float, centre: float = BAND_CENTRE) -> tuple[float, float]:
    """The narrowest band [low, high) symmetric about ``centre`` holding ``target_share`` of ``scores``.

    The events escalated are exactly the ``target_share`` whose calibrated score is closest to ``centre``: the
    least decisive ones, whichever side they fall. Symmetry in score (rather than in rank) matters on skewed
    data: with 10% fraud most scores sit near 0, and a rank-centred band would reach up into confident blocks
    while leaving out scores of 0.3. The edge is put halfway between the last event inside and the first
    outside, so a re-run on the same scores gives the same share.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 < target_share < 1:
        raise ValueError(f"target_share must be in (0, 1), got {target_share}")
    distance = np.sort(np.abs(scores - centre))
    inside = max(1, round(target_share * len(scores)))
    if inside >= len(scores):
        return 0.0, 1.0
    half_width = (distance[inside - 1] + distance[inside]) / 2
    return float(max(0.0, centre - half_width)), float(min(1.0, centre + half_width))


def band_by_cost(scores: np.ndarray, labels: np.ndarray, costs: BandCosts) -> tuple[float, float]:
    """The band [low, high) with the lowest total cost on ``scores`` and ``labels``; ``low == high`` if none pays.

    Candidate edges are 0, 1 and the midpoints between consecutive distinct scores (as in ``band_by_share``, so
    an edge sits on an event only where a score is exactly 0 or 1). The search is exact and O(n log n): with ``N(t)``
    the events scoring below t, the cost splits as ``approve_side(low) + block_side(high)`` where::

        approve_side(t) = missed_fraud * frauds below t - review * N(t)
        block_side(t)   = wrong_block * legits at or above t + review * N(t)

    so the best pair under ``low <= high`` is, for each ``high``, the running minimum of ``approve_side`` over
    the candidates up to it. Taking each side's unconstrained optimum separately would be wrong when review is
    dear: the two optima can cross, and the running minimum then lands on an empty band at the best single
    threshold. Among equal-cost bands the lowest ``high`` wins, then the highest ``low`` under it.
    """
    scores, labels = _checked(scores, labels)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    edges = _candidate_edges(sorted_scores)
    below = np.searchsorted(sorted_scores, edges, side="left")  # events scoring < edge, exact at any edge
    frauds_below = np.concatenate(([0], np.cumsum(labels[order])))[below]
    legits_at_or_above = (len(labels) - labels.sum()) - (below - frauds_below)

    approve_side = costs.missed_fraud * frauds_below - costs.review * below
    block_side = costs.wrong_block * legits_at_or_above + costs.review * below
    best_approve = np.minimum.accumulate(approve_side)
    # latest candidate up to each position that attains the running minimum: the highest low among ties
    attains = np.where(approve_side == best_approve, np.arange(len(edges)), 0)
    best_low_at = np.maximum.accumulate(attains)
    high_at = int(np.argmin(best_approve + block_side))
    return float(edges[best_low_at[high_at]]), float(edges[high_at])


def band_cost(scores: np.ndarray, labels: np.ndarray, band: tuple[float, float], costs: BandCosts) -> float:
    """Total cost of deciding ``scores`` with ``band``: missed frauds, wrongly blocked legits and reviews."""
    scores, labels = _checked(scores, labels)
    low, high = band
    if low > high:
        raise ValueError(f"band low must not exceed high, got ({low}, {high})")
    fraud = labels == 1
    missed = np.sum(fraud & (scores < low))
    wrongly_blocked = np.sum(~fraud & (scores >= high))
    reviewed = np.sum((scores >= low) & (scores < high))
    return float(costs.missed_fraud * missed + costs.wrong_block * wrongly_blocked + costs.review * reviewed)


def assess_band(
    rule: str, scores: np.ndarray, labels: np.ndarray, band: tuple[float, float], costs: BandCosts
) -> BandChoice:
    """``band`` with its cost per event and escalated share on this data, for comparing rules side by side."""
    scores, labels = _checked(scores, labels)
    low, high = band
    return BandChoice(
        rule=rule,
        low=low,
        high=high,
        cost_per_event=band_cost(scores, labels, band, costs) / len(scores),
        escalated_share=float(np.mean((scores >= low) & (scores < high))),
    )


def _candidate_edges(sorted_scores: np.ndarray) -> np.ndarray:
    """0, the midpoints between consecutive distinct scores, and 1: every distinct way to cut the data."""
    distinct = np.unique(sorted_scores)
    midpoints = (distinct[:-1] + distinct[1:]) / 2
    return np.concatenate(([SCORE_FLOOR], midpoints, [SCORE_CEILING]))


def _checked(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 in [0, 1] and labels as int64 0/1 of the same non-zero length, or ValueError."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape or len(scores) == 0:
        shapes = f"{scores.shape} and {labels.shape}"
        raise ValueError(f"scores and labels must be non-empty 1-d arrays of one length, got {shapes}")
    if not np.all((scores >= SCORE_FLOOR) & (scores <= SCORE_CEILING)):
        raise ValueError("scores must be calibrated probabilities in [0, 1]")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (legitimate) or 1 (fraud)")
    return scores, labels.astype(np.int64)
