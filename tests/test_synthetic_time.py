"""The synthetic generator is time-true: label arrival times, point-in-time graph features, a time-ordered split,
and realistic temporal structure (bursty fraud clusters and twins, ordinary activity spread over weeks)."""

from __future__ import annotations

import dataclasses
import random
import statistics
from datetime import timedelta

import numpy as np
import pytest

from riskcascade.core.domain import RISK_TYPES
from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
from riskcascade.modelling.synthetic import (
    WINDOW_DAYS,
    WINDOW_START,
    LabelledEvent,
    _simulate,
    _Simulation,
    generate_events,
    split_events,
)
from riskcascade.modelling.synthetic_marketplace import NEW_ACCOUNT_DAYS

N_EVENTS = 3000
SEED = 11
N_SAMPLE = 300  # events whose point-in-time features are recounted by brute force
GRAPH_FEATURES = (
    "device_account_count",
    "ip_account_count",
    "instrument_account_count",
    "shared_entity_count",
    "seller_new_buyer_share",
)


@pytest.fixture(scope="module")
def events() -> list[LabelledEvent]:
    return generate_events(N_EVENTS, SEED)


def _lag_days(e: LabelledEvent) -> float:
    return (e.label_known_at - e.occurred_at) / timedelta(days=1)


# --- Label arrival -------------------------------------------------------------------------------------------


def test_every_label_arrives_after_its_event(events):
    assert all(e.label_known_at is not None and e.label_known_at > e.occurred_at for e in events)
    assert all(e.label_known_at.tzinfo is not None for e in events)


def test_fraud_label_lags_follow_who_notices(events):
    """Victims report takeovers within days, investigations take about a week, chargebacks (collusion) longest."""
    median = {r: statistics.median(_lag_days(e) for e in events if e.risk_type == r) for r in RISK_TYPES}
    assert 0.5 <= median["account_takeover"] <= 3
    assert 5 <= median["collusion"] <= 10
    for investigated in ("promo_abuse", "brushing", "click_farm"):
        assert 3 <= median[investigated] <= 8, investigated
        assert median["account_takeover"] < median[investigated] < median["collusion"], investigated
    assert max(_lag_days(e) for e in events if e.label) <= 45


def test_legitimate_labels_wait_for_the_dispute_window(events):
    lags = [_lag_days(e) for e in events if not e.label]
    assert min(lags) >= 7 and max(lags) <= 14.5
    assert 9 <= statistics.median(lags) <= 11


# --- Point-in-time graph features ----------------------------------------------------------------------------


def _entities(e: LabelledEvent) -> dict[str, str]:
    ids = e.entities
    return {"device": ids.device_id, "ip": ids.ip, "instrument": ids.payment_instrument_id}


def _recount(history: list[LabelledEvent]) -> dict[str, float]:
    """The graph features of history[-1] counted from scratch over ``history`` (nothing else is visible)."""
    e = history[-1]
    account = e.entities.account_id
    accounts_on: dict[tuple[str, str], set[str]] = {}
    for h in history:
        for kind, entity in _entities(h).items():
            if entity:
                accounts_on.setdefault((kind, entity), set()).add(h.entities.account_id)
    own = {(kind, entity) for h in history if h.entities.account_id == account
           for kind, entity in _entities(h).items() if entity}
    instruments = [len(accounts_on[key]) for key in own if key[0] == "instrument"]
    seller = e.entities.seller_id
    orders = [h for h in history if h.event_type.value == "order" and seller and h.entities.seller_id == seller]
    young = sum(h.features["account_age_days"] < NEW_ACCOUNT_DAYS for h in orders)
    return {
        "device_account_count": len(accounts_on.get(("device", e.entities.device_id), ())),
        "ip_account_count": len(accounts_on.get(("ip", e.entities.ip), ())),
        "instrument_account_count": max(instruments, default=0),
        "shared_entity_count": sum(len(accounts_on[key]) > 1 for key in own),
        "seller_new_buyer_share": round(young / len(orders), 4) if orders else 0.0,
    }


def test_graph_features_count_only_events_up_to_the_event(events):
    """Each sampled event's graph features equal a brute-force count over the events at or before it.

    Events come in time order; events in the same second count in that order, so "at or before" is the rows up to
    and including the event's own.
    """
    for i in sorted(random.Random(SEED).sample(range(N_EVENTS), N_SAMPLE)):
        expected = _recount(events[: i + 1])
        assert {name: events[i].features[name] for name in GRAPH_FEATURES} == expected, events[i].case_id


def test_graph_features_do_not_see_the_future(events):
    """Counting over all events, later ones included, gives other values for many events: the old leak."""
    later_differs = {name: 0 for name in GRAPH_FEATURES}
    for i in random.Random(SEED + 1).sample(range(N_EVENTS), N_SAMPLE // 3):
        all_time = _recount(events[: i] + events[i + 1 :] + [events[i]])
        for name in GRAPH_FEATURES:
            later_differs[name] += events[i].features[name] != all_time[name]
    assert all(count > 0 for count in later_differs.values()), later_differs


# --- Time split ----------------------------------------------------------------------------------------------


def test_split_trains_on_the_past_and_tests_on_the_future(events):
    parts = split_events(events, seed=3)
    assert list(parts) == ["train", "valid", "test"]
    assert [e.case_id for part in parts.values() for e in part] == [e.case_id for e in events]
    assert len(parts["valid"]) == len(parts["test"]) == round(0.15 * N_EVENTS)
    assert max(e.occurred_at for e in parts["train"]) <= min(e.occurred_at for e in parts["valid"])
    assert max(e.occurred_at for e in parts["valid"]) <= min(e.occurred_at for e in parts["test"])
    for name, part in parts.items():
        assert {e.label for e in part} == {0, 1}, name
    assert split_events(events, seed=4) == parts  # the seed plays no part


def test_split_orders_by_time_whatever_the_input_order(events):
    """Events in the same second keep their input order, so compare the times of each part."""
    shuffled = events[:]
    random.Random(SEED).shuffle(shuffled)
    times = {name: [e.occurred_at for e in part] for name, part in split_events(events, seed=3).items()}
    assert {name: [e.occurred_at for e in part] for name, part in split_events(shuffled, seed=3).items()} == times


def test_split_refuses_a_part_without_both_labels(events):
    """All of the data set, so that train and valid hold fraud (it comes in bursts: a short head may hold none)."""
    n_test = round(0.15 * N_EVENTS)
    no_late_fraud = events[:-n_test] + [dataclasses.replace(e, label=0, risk_type="") for e in events[-n_test:]]
    with pytest.raises(ValueError, match="test part"):
        split_events(no_late_fraud, seed=3)


@pytest.mark.parametrize(("valid_share", "test_share"), [(0.0, 0.2), (0.5, 0.5), (0.2, 1.0)])
def test_split_refuses_shares_that_leave_no_part(events, valid_share, test_share):
    with pytest.raises(ValueError, match="valid_share and test_share"):
        split_events(events, seed=3, valid_share=valid_share, test_share=test_share)


def test_synthetic_dataset_declares_event_and_label_times(events):
    parts = split_events(events, seed=3)
    dataset = synthetic_dataset(parts)
    assert (dataset.spec.time_column, dataset.spec.label_time_column) == ("occurred_at", "label_known_at")
    rows = [e for part in parts.values() for e in part]
    assert dataset.times.tolist() == [e.occurred_at.timestamp() for e in rows]
    assert dataset.label_times.tolist() == [e.label_known_at.timestamp() for e in rows]


# --- Temporal structure: bursty clusters, spread-out ordinary life ------------------------------------------------
# Cluster-level checks need the generator's own record of which cluster made each event (``_simulate``) and enough
# clusters of every pattern, so they run on the production size.

N_LARGE = 60000
HOUR = 3600
DAY = 24 * HOUR
PLAIN_SPAN_HOURS = {  # documented range of the median first-to-last span of a plain cluster (module docstring)
    "account_takeover": (10 / 60, 24),
    "collusion": (3 * 24, 14 * 24),
    "promo_abuse": (10 / 60, 5),
    "brushing": (24, 5 * 24),
    "click_farm": (4, 48),
}


@pytest.fixture(scope="module")
def sim() -> _Simulation:
    return _simulate(N_LARGE, SEED)


def _by_group(key: np.ndarray, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group with two or more events: its first-to-last span and the median gap between consecutive events
    (seconds)."""
    order = np.lexsort((seconds, key))
    key, seconds = key[order], seconds[order]
    spans, gaps = [], []
    for group in np.split(seconds, np.flatnonzero(np.diff(key)) + 1):
        if len(group) >= 2:
            spans.append(group[-1] - group[0])
            gaps.append(np.median(np.diff(group)))
    return np.array(spans, dtype=float), np.array(gaps, dtype=float)


def _clusters(sim: _Simulation, pattern: str, fraud: bool, sophisticated: bool) -> tuple[np.ndarray, np.ndarray]:
    risk_type = np.array(sim.risk_type)
    mask = (sim.pattern == pattern) & ((risk_type != "") == fraud) & (sim.sophisticated == sophisticated)
    return _by_group(sim.cluster[mask], sim.seconds[mask])


def _ordinary_account_spans(sim: _Simulation) -> np.ndarray:
    ordinary = sim.cluster < 0
    return _by_group(sim.entity["account"][ordinary], sim.seconds[ordinary])[0]


def test_ordinary_accounts_spread_their_events_over_weeks(sim):
    spans = _ordinary_account_spans(sim)
    assert len(spans) > 5000
    assert np.median(spans) >= 10 * DAY
    days = np.bincount(sim.seconds[sim.cluster < 0] // DAY, minlength=WINDOW_DAYS)
    assert len(days) == WINDOW_DAYS and days.min() >= 0.85 * days.mean() and days.max() <= 1.15 * days.mean()


@pytest.mark.parametrize("risk_type", RISK_TYPES)
def test_plain_fraud_clusters_act_in_short_bursts(sim, risk_type):
    """Median span within the documented range, and much shorter than an ordinary account's activity."""
    spans, _ = _clusters(sim, risk_type, fraud=True, sophisticated=False)
    assert len(spans) >= 5
    low, high = PLAIN_SPAN_HOURS[risk_type]
    assert low <= np.median(spans) / HOUR <= high
    assert np.median(spans) <= 0.5 * np.median(_ordinary_account_spans(sim))


@pytest.mark.parametrize("risk_type", RISK_TYPES)
def test_sophisticated_clusters_are_slower(sim, risk_type):
    """Sophisticated clusters spread over longer periods at a far slower pace: velocity alone misses them."""
    plain_spans, plain_gaps = _clusters(sim, risk_type, fraud=True, sophisticated=False)
    pro_spans, pro_gaps = _clusters(sim, risk_type, fraud=True, sophisticated=True)
    assert len(pro_spans) >= 5
    assert np.median(pro_spans) > np.median(plain_spans)
    assert np.median(pro_gaps) >= 5 * np.median(plain_gaps)


@pytest.mark.parametrize("risk_type", RISK_TYPES)
def test_legitimate_twins_burst_too(sim, risk_type):
    """Twins pace like sophisticated fraud, and a share of them bursts like plain fraud: a burst is no proof."""
    plain_spans, _ = _clusters(sim, risk_type, fraud=True, sophisticated=False)
    pro_spans, _ = _clusters(sim, risk_type, fraud=True, sophisticated=True)
    twin_spans, _ = _clusters(sim, risk_type, fraud=False, sophisticated=True)
    assert len(twin_spans) >= 10
    assert 0.5 <= np.median(twin_spans) / np.median(pro_spans) <= 2
    assert np.mean(twin_spans <= PLAIN_SPAN_HOURS[risk_type][1] * HOUR) >= 0.1


def test_burst_events_are_seconds_to_minutes_apart(sim):
    """A farm's phones fire in sequence and a promo batch's accounts redeem one after another."""
    for risk_type, most_seconds in (("click_farm", 60), ("promo_abuse", 120)):
        _, gaps = _clusters(sim, risk_type, fraud=True, sophisticated=False)
        assert np.median(gaps) <= most_seconds, risk_type


def _events_in_previous_hour(key: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """For each event, the events with the same key in [t - 1 h, t), as the entity state's 1 h window counts them."""
    order = np.lexsort((seconds, key))
    stamp = key[order] * (2 * WINDOW_DAYS * DAY) + seconds[order]  # sorted: keys apart, times within a key
    out = np.empty(len(key), dtype=np.int64)
    out[order] = np.searchsorted(stamp, stamp) - np.searchsorted(stamp, stamp - HOUR)
    return np.where(key >= 0, out, 0)


def test_device_velocity_is_a_signal_but_not_proof(sim):
    fraud = np.array(sim.risk_type) != ""
    busy = _events_in_previous_hour(sim.entity["device"], sim.seconds) >= 5
    assert busy.sum() >= 200
    assert fraud[busy].mean() >= 4 * fraud.mean()
    legit_busy = busy & ~fraud
    assert legit_busy.sum() >= 0.1 * busy.sum()
    assert (legit_busy & (sim.cluster >= 0)).sum() > 0  # twins among them, not only shared computers


def test_night_profile_survives_the_bursts(sim):
    """Plain takeover crews strike at night far more often than ordinary users (``hour_of_day`` keeps its signal)."""
    night = sim.feature["hour_of_day"] < 6
    takeover = (np.array(sim.risk_type) == "account_takeover") & ~sim.sophisticated
    assert night[takeover].mean() >= 2 * night[sim.cluster < 0].mean()


def test_hour_of_day_is_the_utc_hour_and_every_event_is_inside_the_window(events, sim):
    end = WINDOW_START + timedelta(days=WINDOW_DAYS)
    assert all(WINDOW_START <= e.occurred_at < end and e.features["hour_of_day"] == e.occurred_at.hour for e in events)
    assert sim.seconds.min() >= 0 and sim.seconds.max() < WINDOW_DAYS * DAY
    assert np.array_equal(sim.feature["hour_of_day"], sim.seconds % DAY // HOUR)


def test_every_risk_type_reaches_each_part_of_the_time_split(sim):
    """Bursty clusters still spread over the window: each part of the time split sees every pattern."""
    order = np.argsort(sim.seconds, kind="stable")
    risk_type = np.array(sim.risk_type)[order]
    n_valid = n_test = round(0.15 * N_LARGE)
    parts = np.split(risk_type, [N_LARGE - n_valid - n_test, N_LARGE - n_test])
    for part in parts:
        assert set(part) == {"", *RISK_TYPES}
        assert 0.07 <= np.mean(part != "") <= 0.13


def test_times_are_deterministic(sim):
    again = _simulate(N_LARGE, SEED)
    assert np.array_equal(again.seconds, sim.seconds) and np.array_equal(again.cluster, sim.cluster)
    assert not np.array_equal(_simulate(N_LARGE, SEED + 1).seconds, sim.seconds)
