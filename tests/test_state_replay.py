"""Point in time: training's replay features never see a later row or a label before its arrival, and the served
state computes the same vectors for the same sequence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from riskcascade.core.entity_state import EmbeddedEntityState, StateLayout
from riskcascade.core.state_replay import Timeline, replay_features, seed_state

DAY = 86400.0
LAYOUT = StateLayout(("account_id", "device_id", "ip"), ("amount",), (3600, 86400, 604800, 2592000), 2592000)


def random_timeline(seed: int, n: int = 1500) -> Timeline:
    rng = np.random.default_rng(seed)
    times = np.round(np.sort(rng.uniform(0, 40 * DAY, n)))  # whole seconds: some events share an instant
    labels = rng.choice([-1, 0, 1], size=n, p=[0.2, 0.6, 0.2])
    label_times = times + rng.exponential(4 * DAY, n)
    label_times[labels < 0] = np.nan
    return Timeline(
        ids=np.array([f"e{i}" for i in range(n)]),
        times=times,
        entities={
            "account_id": np.array([f"a{x}" for x in rng.integers(0, 120, n)], dtype=object),
            "device_id": np.array([f"d{x}" if x < 60 else "" for x in rng.integers(0, 80, n)], dtype=object),
            "ip": np.array([f"i{x}" for x in rng.integers(0, 25, n)], dtype=object),
        },
        values=rng.exponential(50, (n, 1)),
        labels=labels,
        label_times=label_times,
    )


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


def perturb_after(timeline: Timeline, cut: float, seed: int) -> Timeline:
    """Everything at or after ``cut`` changed: event values, entities and labels; labels arriving after it too."""
    rng = np.random.default_rng(seed)
    later = timeline.times >= cut
    values = timeline.values.copy()
    values[later] = rng.exponential(500, (later.sum(), values.shape[1]))
    entities = {k: v.copy() for k, v in timeline.entities.items()}
    entities["device_id"][later] = "d0"  # every later event moves onto one device
    labels, label_times = timeline.labels.copy(), timeline.label_times.copy()
    late = ~np.isnan(label_times) & (label_times > cut)
    labels[late] = 1 - labels[late]  # every label arriving after the cut is flipped...
    label_times[late] = cut + rng.uniform(1, DAY, late.sum())  # ...and arrives at another (still later) time
    return Timeline(timeline.ids, timeline.times, entities, values, labels, label_times)


def test_no_feature_sees_a_later_row_or_a_label_before_it_arrived():
    timeline = random_timeline(1)
    cut = float(np.quantile(timeline.times, 0.6))
    before = replay_features(LAYOUT, timeline)
    after = replay_features(LAYOUT, perturb_after(timeline, cut, 2))
    past = timeline.times <= cut
    assert same(before[past], after[past])
    # the perturbation is visible to later rows: the comparison above could have failed
    assert not same(before[~past], after[~past])


def test_a_label_counts_from_its_arrival_not_from_its_event():
    ids = np.array(["x", "y", "z"])
    timeline = Timeline(
        ids=ids, times=np.array([0.0, 2 * DAY, 5 * DAY]),
        entities={"account_id": np.array(["a", "a", "a"], dtype=object), "device_id": np.array(["", "", ""], dtype=object),
                  "ip": np.array(["", "", ""], dtype=object)},
        values=np.ones((3, 1)), labels=np.array([1, -1, -1]), label_times=np.array([3 * DAY, np.nan, np.nan]),
    )
    x = replay_features(LAYOUT, timeline)
    fraud = LAYOUT.names.index("account_id.fraud_known")
    assert x[1, fraud] == 0  # event y (day 2): x's fraud label arrives on day 3
    assert x[2, fraud] == 1  # event z (day 5): known by then


def test_fraud_accounts_is_two_hop_and_time_bound():
    timeline = Timeline(
        ids=np.array(["e1", "e2", "e3"]), times=np.array([0.0, DAY, 4 * DAY]),
        entities={"account_id": np.array(["bad", "good", "good"], dtype=object),
                  "device_id": np.array(["dev", "dev", "dev"], dtype=object), "ip": np.array(["", "", ""], dtype=object)},
        values=np.ones((3, 1)), labels=np.array([1, -1, -1]), label_times=np.array([2 * DAY, np.nan, np.nan]),
    )
    x = replay_features(LAYOUT, timeline)
    col = LAYOUT.names.index("device_id.fraud_accounts")
    assert list(x[:, col]) == [0.0, 0.0, 1.0]  # 'bad' is known for fraud from day 2; its own event never counts


def test_windows_are_strictly_before_the_event():
    times = np.array([0.0, 1800.0, 3600.0, 3600.0, 7200.0])
    n = len(times)
    timeline = Timeline(
        ids=np.array([f"e{i}" for i in range(n)]), times=times,
        entities={"account_id": np.array(["a"] * n, dtype=object), "device_id": np.array([""] * n, dtype=object),
                  "ip": np.array([""] * n, dtype=object)},
        values=np.arange(1.0, n + 1)[:, None], labels=np.full(n, -1), label_times=np.full(n, np.nan),
    )
    x = replay_features(LAYOUT, timeline)
    n1h = LAYOUT.names.index("account_id.n_1h")
    sum1h = LAYOUT.names.index("account_id.sum_1h.amount")
    assert list(x[:, n1h]) == [0, 1, 2, 2, 2]  # [t - 1 h, t): the second event at 3600 s does not see the first
    assert x[4, sum1h] == 3 + 4  # the two events at 3600 s
    assert math.isnan(x[0, LAYOUT.names.index("account_id.age_h")])


@pytest.mark.parametrize("with_log", [False, True])
def test_served_state_gives_the_replay_vectors(tmp_path, with_log):
    """The serving path (state.step per batch, labels as they arrive) equals training's replay, batch or not."""
    timeline = random_timeline(3, n=800)
    expected = replay_features(LAYOUT, timeline)
    state = EmbeddedEntityState(LAYOUT, tmp_path / "state.sqlite" if with_log else None)
    served = np.full_like(expected, np.nan)
    pending: list[int] = []

    def flush() -> None:
        if pending:
            served[pending] = state.step([timeline.event(i, LAYOUT.links) for i in pending])
            pending.clear()

    rng = np.random.default_rng(4)
    for kind, i in timeline.ordered(until=-math.inf):
        if kind == "label":
            flush()
            state.apply_labels([timeline.label(i)])
        else:
            pending.append(i)
            if len(pending) >= rng.integers(1, 65):
                flush()
    flush()
    assert same(served, expected)


def test_seeded_state_restarts_with_its_history(tmp_path):
    timeline = random_timeline(5, n=600)
    path = tmp_path / "state.sqlite"
    first = EmbeddedEntityState(LAYOUT, path)
    assert seed_state(first, timeline) == (600, int((timeline.labels >= 0).sum()))
    first.close()
    again = EmbeddedEntityState(LAYOUT, path)  # a restarted replica: the log is replayed
    assert again.event_count() == 600
    probe = timeline.event(0, LAYOUT.links)
    probe = type(probe)("new", float(timeline.times.max()) + 60, probe.entities, probe.values)
    fresh = EmbeddedEntityState(LAYOUT)
    seed_state(fresh, timeline)
    assert same(again.step([probe]), fresh.step([probe]))
