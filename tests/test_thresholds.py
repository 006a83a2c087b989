"""The escalation band rules: the cost rule is checked against brute force, the share rule against training's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskcascade.core.thresholds import (
    RULE_COST,
    BandCosts,
    assess_band,
    band_by_cost,
    band_by_share,
    band_cost,
)

# a few repeated grid values make ties and scores of exactly 0 and 1 common
score = st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0))
labelled = st.lists(st.tuples(score, st.integers(0, 1)), min_size=1, max_size=25)
cost = st.floats(0.01, 100.0)
costs = st.builds(BandCosts, missed_fraud=cost, wrong_block=cost, review=cost)


def unzip(rows: list[tuple[float, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s for s, _ in rows]), np.array([y for _, y in rows])


def brute_force_cost(scores: np.ndarray, labels: np.ndarray, costs: BandCosts) -> float:
    """Lowest cost over every pair of candidate edges, written independently of the module's edge helper."""
    distinct = sorted(set(scores.tolist()))
    edges = [0.0] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])] + [1.0]
    return min(band_cost(scores, labels, (lo, hi), costs) for lo in edges for hi in edges if lo <= hi)


@settings(max_examples=300)
@given(labelled, costs)
def test_cost_band_matches_brute_force(rows, costs):
    scores, labels = unzip(rows)
    low, high = band_by_cost(scores, labels, costs)
    assert 0.0 <= low <= high <= 1.0
    assert band_cost(scores, labels, (low, high), costs) == pytest.approx(
        brute_force_cost(scores, labels, costs), rel=1e-9, abs=1e-9
    )


@given(labelled, costs)
def test_band_is_empty_when_review_costs_more_than_a_mistake(rows, costs):
    dear = BandCosts(costs.missed_fraud, costs.wrong_block, min(costs.missed_fraud, costs.wrong_block) * 1.5)
    low, high = band_by_cost(*unzip(rows), dear)
    assert low == high


@given(labelled, costs, st.floats(0.01, 0.99))
def test_cheaper_review_never_escalates_fewer_events(rows, costs, factor):
    scores, labels = unzip(rows)
    cheaper = BandCosts(costs.missed_fraud, costs.wrong_block, costs.review * factor)
    share = assess_band(RULE_COST, scores, labels, band_by_cost(scores, labels, costs), costs).escalated_share
    cheaper_band = band_by_cost(scores, labels, cheaper)
    assert assess_band(RULE_COST, scores, labels, cheaper_band, cheaper).escalated_share >= share


def test_band_widens_as_review_gets_cheaper():
    rng = np.random.default_rng(3)
    labels = (rng.random(4000) < 0.1).astype(int)
    scores = np.clip(np.where(labels == 1, rng.beta(5, 2, 4000), rng.beta(1, 8, 4000)), 0, 1)
    widths, shares = [], []
    for review in (12.0, 3.0, 1.0, 0.3):
        band = band_by_cost(scores, labels, BandCosts(missed_fraud=20.0, wrong_block=10.0, review=review))
        widths.append(band[1] - band[0])
        shares.append(np.mean((scores >= band[0]) & (scores < band[1])))
    assert widths[0] == 0.0  # review dearer than a wrong block: no band
    assert all(a < b for a, b in zip(widths, widths[1:]))
    assert all(a < b for a, b in zip(shares, shares[1:]))


def test_edges_sit_halfway_between_neighbouring_scores():
    scores = np.array([0.1, 0.2, 0.4, 0.6, 0.8, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    # review cheaper than either mistake: escalate the two mixed middle events and nothing else
    low, high = band_by_cost(scores, labels, BandCosts(missed_fraud=5.0, wrong_block=5.0, review=1.0))
    assert (low, high) == pytest.approx((0.3, 0.7))
    assert band_cost(scores, labels, (low, high), BandCosts(5.0, 5.0, 1.0)) == pytest.approx(2.0)


@pytest.mark.parametrize("field", ["missed_fraud", "wrong_block", "review"])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_costs_name_the_field(field, bad):
    values = {"missed_fraud": 10.0, "wrong_block": 5.0, "review": 1.0, field: bad}
    with pytest.raises(ValueError, match=field):
        BandCosts(**values)


def test_bad_inputs_are_refused():
    ok = BandCosts(10.0, 5.0, 1.0)
    with pytest.raises(ValueError, match="one length"):
        band_by_cost(np.array([0.1, 0.2]), np.array([0]), ok)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        band_by_cost(np.array([0.1, 1.2]), np.array([0, 1]), ok)
    with pytest.raises(ValueError, match="labels"):
        band_by_cost(np.array([0.1, 0.2]), np.array([0, 2]), ok)
    with pytest.raises(ValueError, match="low must not exceed high"):
        band_cost(np.array([0.1]), np.array([0]), (0.6, 0.4), ok)


def test_share_band_holds_the_target_share_closest_to_the_centre():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.beta(0.5, 8, 9000), rng.beta(4, 1, 1000)])
    for share in (0.05, 0.12, 0.3):
        low, high = band_by_share(scores, share)
        inside = (scores >= low) & (scores < high)
        assert inside.mean() == pytest.approx(share, abs=1 / len(scores))
        assert 0.5 - low == pytest.approx(high - 0.5)
        assert np.abs(scores[inside] - 0.5).max() <= np.abs(scores[~inside] - 0.5).min()
    with pytest.raises(ValueError, match="target_share"):
        band_by_share(scores, 1.0)


def test_share_band_is_trainings_rule():
    training = pytest.importorskip("riskcascade.modelling.training")
    assert training.band_by_share is band_by_share  # training chooses its band with this very function
