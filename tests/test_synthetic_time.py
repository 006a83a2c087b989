"""The synthetic generator is time-true: label arrival times, point-in-time graph features, a time-ordered split."""

from __future__ import annotations

import dataclasses
import random
import statistics
from datetime import timedelta

import pytest

from riskcascade.datasets.synthetic_source import synthetic_dataset
from riskcascade.domain import RISK_TYPES
from riskcascade.synthetic import LabelledEvent, generate_events, split_events
from riskcascade.synthetic_marketplace import NEW_ACCOUNT_DAYS

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
    head = events[:400]
    no_late_fraud = head[:340] + [dataclasses.replace(e, label=0, risk_type="") for e in head[340:]]
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
