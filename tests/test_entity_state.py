"""The live entity state's semantics, on every backend: embedded (in memory, and with its SQLite log) and Redis (a
real server on a free port). The backends must give bit-identical features for the same calls, equal to training's
replay of the same timeline."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from riskcascade.core.config import StateSettings
from riskcascade.core.entity_state import (
    EmbeddedEntityState,
    EntityBook,
    EntityRecord,
    EntityState,
    LabelEvent,
    StateEvent,
    StateLayout,
)
from riskcascade.core.state_backends import open_entity_state
from riskcascade.core.state_replay import Timeline, replay_features
from tests.redis_server import redis_url  # noqa: F401 - the session's Redis server (fixture)

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
LINKS = ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id")
LAYOUT = StateLayout(LINKS, ("amount", "clicks"), (3600, 86400, 604800, 2592000), 2592000)
T = 1_700_000_000.0  # an instant of live traffic


def col(name: str, layout: StateLayout = LAYOUT) -> int:
    return layout.names.index(name)


def bits(x: np.ndarray) -> np.ndarray:
    """The float64 bit patterns: equal only if bit-identical (NaN equals NaN, 0.0 differs from -0.0)."""
    return np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)


def ev(event_id: str, time: float, account: str = "", device: str = "", ip: str = "", instrument: str = "",
       seller: str = "", amount: float = 1.0, clicks: float = math.nan) -> StateEvent:
    entities = {"account_id": account, "seller_id": seller, "device_id": device, "ip": ip,
                "payment_instrument_id": instrument}
    return StateEvent(event_id, time, {k: v for k, v in entities.items() if v}, (amount, clicks))


@dataclass
class Backend:
    """Opens states of one backend kind on one store (a log file, a Redis key prefix) for a test."""

    kind: str
    tmp_path: Path
    request: pytest.FixtureRequest
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:12]}")
    opened: list[EntityState] = field(default_factory=list)

    @property
    def shared(self) -> bool:
        """Whether a second ``open`` reaches the same state (a restarted or another replica)."""
        return self.kind != "memory"

    def open(self, layout: StateLayout = LAYOUT) -> EntityState:
        if self.kind == "memory":
            state: EntityState = EmbeddedEntityState(layout)
        elif self.kind == "log":
            state = EmbeddedEntityState(layout, self.tmp_path / "state.sqlite")
        else:
            from riskcascade.core.state_redis import RedisEntityState

            state = RedisEntityState(layout, self.request.getfixturevalue("redis_url"), self.prefix)
        self.opened.append(state)
        return state

    def redis(self):  # the raw client, for looking at keys
        import redis

        return redis.Redis.from_url(self.request.getfixturevalue("redis_url"))


@pytest.fixture(params=["memory", "log", "redis"])
def backend(request, tmp_path) -> Iterator[Backend]:
    opened = Backend(request.param, tmp_path, request)
    yield opened
    for state in opened.opened:
        state.close()


def one(state: EntityState, event: StateEvent) -> np.ndarray:
    return state.step([event])[0]


# ---- windows, counterparts, labels ---------------------------------------------------------------------------------


def test_windows_count_the_events_strictly_before_the_event(backend):
    state = backend.open()
    history = [(-31 * DAY, 1000.0, 1000.0), (-30 * DAY, 1.0, 1.0), (-30 * DAY, 1.0, 1.0), (-3 * DAY, 2.0, 2.0),
               (-2 * HOUR, 4.0, math.nan), (-HOUR, 8.0, 8.0), (-30 * MINUTE, 16.0, 16.0)]
    for i, (dt, amount, clicks) in enumerate(history):
        state.step([ev(f"e{i}", T + dt, account="a", amount=amount, clicks=clicks)])
    # at the probe's own instant, and later (out of order): neither counts for it
    state.step([ev("same", T, account="a", amount=32.0), ev("later", T + 10 * MINUTE, account="a", amount=64.0)])
    x = one(state, ev("probe", T, account="a", device="new-device"))

    # [t - w, t): t - 1 h and t - 30 d exactly count
    assert [x[col(f"account_id.n_{w}")] for w in ("1h", "24h", "7d", "30d")] == [2, 3, 4, 6]
    assert x[col("account_id.sum_1h.amount")] == 8 + 16
    assert x[col("account_id.sum_24h.amount")] == 4 + 8 + 16
    assert x[col("account_id.sum_24h.clicks")] == 8 + 16  # a missing value is left out of sums...
    assert x[col("account_id.mean_30d.amount")] == (1 + 1 + 2 + 4 + 8 + 16) / 6
    assert x[col("account_id.mean_30d.clicks")] == (1 + 1 + 2 + 8 + 16) / 5  # ...and of means
    assert x[col("account_id.max_30d.amount")] == 16
    assert x[col("account_id.age_h")] == 31 * 24
    assert x[col("account_id.idle_h")] == 0.5
    assert math.isnan(x[col("device_id.age_h")]) and x[col("device_id.n_30d")] == 0  # never seen before


def test_distinct_counterparts_as_of_the_event(backend):
    state = backend.open()
    state.step([ev("e1", T, account="a1", device="d", ip="i"), ev("e2", T + HOUR, account="a2", device="d", ip="i")])
    state.step([ev("e3", T + 2 * HOUR, account="a1", device="d"), ev("e4", T + 3 * HOUR, account="a1", device="d2")])
    state.step([ev("e5", T + 10 * HOUR, account="a3", device="d")])  # folded first, but later than the probes
    x = state.step([ev("p1", T + 5 * HOUR, account="a4", device="d", ip="i"),
                    ev("p2", T + 5 * HOUR, account="a1", device="d3")])
    assert x[0, col("device_id.distinct.account_id")] == 2  # a1 and a2; a3 comes at 10 h, a4 is the event itself
    assert x[0, col("ip.distinct.account_id")] == 2
    assert x[1, col("account_id.distinct.device_id")] == 2  # d and d2
    assert x[1, col("account_id.distinct.ip")] == 1
    later = one(state, ev("p3", T + 11 * HOUR, account="a5", device="d"))
    assert later[col("device_id.distinct.account_id")] == 4  # a1, a2, a3, a4


def test_labels_count_from_their_arrival(backend):
    state = backend.open()
    state.step([ev("e1", T, account="a", device="d"), ev("e2", T + DAY, account="a")])
    found = state.apply_labels([LabelEvent("e1", True, T + 3 * DAY), LabelEvent("e2", False, T + 2 * DAY),
                                LabelEvent("unknown", True, T + DAY)])
    assert found == 2
    assert state.apply_labels([LabelEvent("never-seen", True, T)]) == 0
    # the first label of an event counts: a second one (a correction, a redelivery) changes nothing
    assert state.apply_labels([LabelEvent("e1", False, T + DAY), LabelEvent("e2", False, T + 2 * DAY)]) == 0
    if backend.shared:
        assert backend.open().apply_labels([LabelEvent("e2", True, T)]) == 0
    x = state.step([ev("p1", T + 2 * DAY - 1, account="a", device="d"), ev("p2", T + 2 * DAY, account="a"),
                    ev("p3", T + 3 * DAY, account="a", device="d")])
    fraud, legit = col("account_id.fraud_known"), col("account_id.legit_known")
    assert (x[0, fraud], x[0, legit]) == (0, 0)
    assert (x[1, fraud], x[1, legit]) == (0, 1)  # known_at <= t counts
    assert (x[2, fraud], x[2, legit]) == (1, 1)
    assert x[2, col("device_id.fraud_known")] == 1 and x[2, col("device_id.legit_known")] == 0  # e2 had no device


def test_fraud_accounts_counts_other_accounts_once_their_fraud_is_known(backend):
    bad, dev = "bad:ü/1 \"x\"", "dév:1"  # ids with separators, quotes and non-ASCII letters
    state = backend.open()
    state.step([ev("e1", T, account=bad, device=dev, seller="s"), ev("e2", T + DAY, account="good", device=dev)])
    assert state.apply_labels([LabelEvent("e1", True, T + 2 * DAY)]) == 1
    on_dev = col("device_id.fraud_accounts")
    x = state.step([ev("p1", T + 1.5 * DAY, account="good", device=dev),
                    ev("p2", T + 2 * DAY, account="good", device=dev, seller="s"),
                    ev("p3", T + 3 * DAY, account=bad, device=dev)])
    assert list(x[:, on_dev]) == [0, 1, 0]  # before the label arrived; after; the account's own event
    assert x[1, col("seller_id.fraud_accounts")] == 1  # the event's seller too
    # an account already known for fraud shows up on a new device: counted there from that time on
    later = [ev("q1", T + 4 * DAY, account="other", device="dev2"),
             ev("q2", T + 5 * DAY, account=bad, device="dev2"),
             ev("q3", T + 5 * DAY, account="other", device="dev2"),
             ev("q4", T + 6 * DAY, account="other", device="dev2")]
    assert [one(state, e)[on_dev] for e in later] == [0, 0, 1, 1]


def test_a_duplicate_event_id_is_folded_once(backend):
    state = backend.open()
    first = ev("e1", T, account="a", amount=5.0)
    state.step([first, first])
    state.step([first])
    assert state.event_count() == 1
    n, total = col("account_id.n_30d"), col("account_id.sum_24h.amount")
    x = one(state, ev("p1", T + HOUR, account="a"))
    assert (x[n], x[total]) == (1, 5.0)
    if backend.shared:  # a restarted replica, or another one on the same Redis
        other = backend.open()
        other.step([first])
        assert other.event_count() == 2  # e1 and p1
        x = one(other, ev("p2", T + 2 * HOUR, account="a"))
        assert (x[n], x[total]) == (2, 5.0 + 1.0)


def test_two_redis_replicas_racing_on_one_event_fold_it_once(redis_url, monkeypatch):  # noqa: F811
    from riskcascade.core.state_redis import RedisEntityState

    prefix = f"t{uuid.uuid4().hex[:12]}"
    first, second = RedisEntityState(LAYOUT, redis_url, prefix), RedisEntityState(LAYOUT, redis_url, prefix)
    event = ev("e1", T, account="a", device="d", amount=5.0)
    load = first._load_for_step

    def load_then_lose_the_race(events):
        book = load(events)  # the first replica has read: e1 is new to it...
        # ...and the second one folds it (second at its instant there) before the first one writes
        second.step([ev("e0", T, account="a", amount=3.0), event])
        return book

    monkeypatch.setattr(first, "_load_for_step", load_then_lose_the_race)
    first.step([event, ev("e2", T, account="a", device="d", amount=7.0)])
    monkeypatch.undo()
    assert first.event_count() == 3
    x = one(first, ev("p", T + HOUR, account="a", device="d"))
    assert x[col("account_id.n_30d")] == 3 and x[col("account_id.sum_1h.amount")] == 3.0 + 5.0 + 7.0  # e1 once
    assert x[col("device_id.n_30d")] == 2
    first.close()
    second.close()


def test_two_redis_replicas_racing_on_labels_of_one_event_count_the_first(redis_url, monkeypatch):  # noqa: F811
    from riskcascade.core.state_redis import RedisEntityState

    prefix = f"t{uuid.uuid4().hex[:12]}"
    first, second = RedisEntityState(LAYOUT, redis_url, prefix), RedisEntityState(LAYOUT, redis_url, prefix)
    first.step([ev("e1", T, account="a", device="d")])
    load = first._load_for_labels

    def load_then_lose_the_race(labels):
        book = load(labels)  # e1 has no label yet, for the first replica...
        assert second.apply_labels([LabelEvent("e1", False, T + DAY)]) == 1  # ...when the second one labels it
        return book

    monkeypatch.setattr(first, "_load_for_labels", load_then_lose_the_race)
    assert first.apply_labels([LabelEvent("e1", True, T + DAY)]) == 0
    monkeypatch.undo()
    x = one(first, ev("p", T + 2 * DAY, account="a", device="d"))
    assert (x[col("account_id.fraud_known")], x[col("account_id.legit_known")]) == (0, 1)
    assert x[col("device_id.fraud_known")] == 0
    first.close()
    second.close()


def test_events_at_one_instant_come_back_in_fold_order(backend):
    """Floating-point sums depend on the order of the terms: ties keep the order they were folded in."""
    state = backend.open()
    orders = [(0.1, 0.2, 0.3), (0.3, 0.2, 0.1), (0.2, 0.3, 0.1), (0.3, 0.1, 0.2),
              (1e16, 1.0, -1e16), (1.0, -1e16, 1e16)]
    expected = []
    for k, order in enumerate(orders):
        for j, amount in enumerate(order):  # one batch each: every tie goes through a store
            state.step([ev(f"o{k}-{j}", T, account=f"a{k}", amount=amount)])
        expected.append(sum(order))
        x = one(state, ev(f"p{k}", T + 1, account=f"a{k}"))
        assert x[col("account_id.sum_1h.amount")] == expected[-1]
        assert x[col("account_id.mean_30d.amount")] == sum(order) / 3
    assert len(set(expected)) == 3  # the orders do give different sums


def test_a_late_event_within_the_allowance_gets_the_features_of_the_whole_history(backend):
    state = backend.open()
    for k, day in enumerate((0.0, 9.5, 40.0, 40.3)):
        state.step([ev(f"e{k}", T + day * DAY, account="a")])
    late = T + 39.8 * DAY  # before the account's last two events; its previous one is 30.3 days older
    x = one(state, ev("late", late, account="a"))
    assert x[col("account_id.idle_h")] == (late - (T + 9.5 * DAY)) / HOUR
    assert x[col("account_id.n_30d")] == 0 and x[col("account_id.age_h")] == (late - T) / HOUR
    # late after two newer events, its previous one long gone from every window (and from Redis's trimmed history
    # but for the latest instant before the cut)
    for k, day in enumerate((0.0, 40.0, 40.2)):
        state.step([ev(f"c{k}", T + day * DAY, account="c")])
    late = T + 39.9 * DAY
    x = one(state, ev("c-late", late, account="c"))
    assert x[col("account_id.idle_h")] == (late - T) / HOUR and x[col("account_id.n_30d")] == 0
    # an event from before an entity's first one, half a day late: the entity is older from then on
    state.step([ev("b1", T + 40.5 * DAY, account="b")])
    state.step([ev("b0", T + 40.0 * DAY, account="b")])
    assert one(state, ev("b2", T + 41 * DAY, account="b"))[col("account_id.age_h")] == 24


# ---- durability, layout, retention ---------------------------------------------------------------------------------


def test_a_killed_embedded_replica_loses_no_history(tmp_path):
    timeline = random_timeline(11, n=700)
    path = tmp_path / "state.sqlite"
    killed = EmbeddedEntityState(LAYOUT, path)
    feed(timeline, [killed], np.random.default_rng(12))  # never closed: the process dies with it
    again = EmbeddedEntityState(LAYOUT, path)
    assert again.event_count() == killed.event_count() == 700
    probes = [ev(f"probe{i}", float(timeline.times.max()) + HOUR, account=str(timeline.entities["account_id"][i]),
                 device=str(timeline.entities["device_id"][i]), ip=str(timeline.entities["ip"][i])) for i in range(50)]
    assert np.array_equal(bits(again.step(probes)), bits(killed.step(probes)))
    assert np.any(again.step([probes[0]])[0] != 0)  # the probes do see history
    again.close()


def test_a_store_written_for_another_layout_is_refused(backend):
    if not backend.shared:
        pytest.skip("an in-memory state has nothing to refuse")
    state = backend.open()
    state.step([ev("e1", T, account="a")])
    other = StateLayout(LINKS, ("amount",), (3600, 86400), 86400)
    with pytest.raises(ValueError, match="another layout"):
        backend.open(other)


SHORT = StateLayout(LINKS, ("amount", "clicks"), (600, 3600), 3600)  # 10 min and 1 h windows, 1 h history


def busy_sequence(seed: int, n: int = 1200) -> list[StateEvent]:
    """Events in time order on few entities over three days, many at one instant, some after long idle spells."""
    rng = np.random.default_rng(seed)
    times = np.sort(np.round(rng.uniform(0, 3 * DAY, n) / 30) * 30)  # 30 s steps: shared instants
    return [ev(f"b{i}", T + float(t), account=f"a{rng.integers(0, 15)}", device=f"d{rng.integers(0, 6)}",
               ip=f"i{rng.integers(0, 3)}", amount=float(rng.exponential(40)),
               clicks=float(rng.integers(0, 9)) if rng.random() < 0.8 else math.nan) for i, t in enumerate(times)]


def test_trimming_the_history_changes_no_feature_inside_the_longest_window():
    events = busy_sequence(21)
    full, trimmed = EntityBook(SHORT), EntityBook(SHORT)
    rng = np.random.default_rng(22)
    expected, got = [], []
    start = 0
    while start < len(events):
        batch = events[start:start + int(rng.integers(1, 40))]
        start += len(batch)
        expected.append(full.step(batch))
        got.append(trimmed.step(batch))
        trimmed.trim(batch[-1].time)
    assert sum(len(r.times) for r in trimmed.records.values()) < len(events) / 4  # history did go
    assert np.array_equal(bits(np.vstack(got)), bits(np.vstack(expected)))


def test_idle_time_survives_trimming_and_expiry(backend):
    """A second event at an entity's last instant takes its idle time from the event before, however old."""
    state = backend.open(SHORT)
    state.step([ev("e1", T, account="a")])
    state.step([ev("e2", T + 3 * DAY, account="a")])
    if backend.kind == "redis":
        backend.redis().delete(f"{backend.prefix}:h:account_id:a")  # as if the history had expired
    x = state.step([ev("e3", T + 3 * DAY, account="a"), ev("e4", T + 3 * DAY, account="a")])
    y = one(state, ev("e5", T + 3 * DAY, account="a"))
    assert list(x[:, col("account_id.idle_h", SHORT)]) == [72, 72]
    assert y[col("account_id.idle_h", SHORT)] == 72
    assert y[col("account_id.age_h", SHORT)] == 72


def test_redis_trims_and_expires_history_but_keeps_what_counts_for_good(redis_url):  # noqa: F811
    from riskcascade.core.config import StateSettings
    from riskcascade.core.state_redis import RedisEntityState

    LATE_ALLOWANCE_S = StateSettings().redis_late_allowance_s

    events = busy_sequence(23)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    state, embedded = RedisEntityState(SHORT, redis_url, prefix), EmbeddedEntityState(SHORT)
    rng = np.random.default_rng(24)
    start = 0
    while start < len(events):
        batch = events[start:start + int(rng.integers(1, 40))]
        start += len(batch)
        assert np.array_equal(bits(state.step(batch)), bits(embedded.step(batch)))
    import redis

    client = redis.Redis.from_url(redis_url)
    on_i0 = [e.time for e in events if e.entities["ip"] == "i0"]
    cut = max(on_i0) - SHORT.retention_s - LATE_ALLOWANCE_S
    kept = [t for t in on_i0 if t >= max(t for t in on_i0 if t < cut)]  # and the latest instant before the cut
    assert len(kept) < len(on_i0) / 2  # there was something to trim
    history = client.zrange(f"{prefix}:h:ip:i0", 0, -1, withscores=True)
    assert sorted(score for _, score in history) == sorted(kept)
    assert 0 < client.ttl(f"{prefix}:h:ip:i0") <= SHORT.retention_s + LATE_ALLOWANCE_S
    assert client.ttl(f"{prefix}:e:ip:i0") == -1 and client.ttl(f"{prefix}:events") == -1  # kept for good
    state.close()


def test_redis_steps_in_two_round_trips(redis_url, monkeypatch):  # noqa: F811
    from redis.connection import AbstractConnection

    from riskcascade.core.state_redis import RedisEntityState

    state = RedisEntityState(LAYOUT, redis_url, f"t{uuid.uuid4().hex[:12]}")
    state.step([ev("warm", T, account="a0")])  # connects
    sent: list[int] = []
    send = AbstractConnection.send_packed_command
    monkeypatch.setattr(AbstractConnection, "send_packed_command", lambda self, *a, **k: (sent.append(1),
                                                                                           send(self, *a, **k))[1])
    batch = [ev(f"e{i}", T + i, account=f"a{i % 7}", device=f"d{i % 5}", ip=f"i{i % 3}", instrument=f"p{i}",
                seller=f"s{i % 4}") for i in range(64)]
    state.step(batch)
    assert len(sent) == 2  # one pipelined read, one write script
    sent.clear()
    assert state.apply_labels([LabelEvent("e1", True, T + DAY), LabelEvent("e2", False, T + DAY)]) == 2
    assert len(sent) == 3  # registries, the fraud label's account, the write
    sent.clear()
    assert state.apply_labels([LabelEvent("e3", False, T + DAY)]) == 1
    assert len(sent) == 2
    monkeypatch.undo()
    state.close()


def test_settings_choose_the_backend(tmp_path, redis_url):  # noqa: F811
    from riskcascade.core.state_redis import RedisEntityState

    embedded = open_entity_state(StateSettings(log_path=tmp_path / "s.sqlite"), LAYOUT)
    assert isinstance(embedded, EmbeddedEntityState) and (tmp_path / "s.sqlite").exists()
    redis_settings = StateSettings(backend="redis", redis_url=redis_url, key_prefix=f"t{uuid.uuid4().hex[:12]}")
    shared = open_entity_state(redis_settings, LAYOUT)
    assert isinstance(shared, RedisEntityState)
    embedded.close()
    shared.close()


# ---- parity ------------------------------------------------------------------------------------------------------


def random_timeline(seed: int, n: int = 3000) -> Timeline:
    """~40 days of events on shared devices, IPs, instruments and sellers; labels arriving after random delays."""
    rng = np.random.default_rng(seed)
    times = T + np.round(np.sort(rng.uniform(0, 40 * DAY, n)) / 10) * 10  # 10 s steps: many shared instants
    accounts = rng.integers(0, 300, n)
    labels = rng.choice([-1, 0, 1], size=n, p=[0.3, 0.5, 0.2])
    label_times = np.round(times + rng.exponential(3 * DAY, n))
    label_times[labels < 0] = np.nan
    values = np.column_stack([np.round(rng.lognormal(3, 1.2, n), 2), rng.integers(0, 40, n).astype(float)])
    values[rng.random(n) < 0.1, 1] = np.nan

    def pick(prefix: str, k: int, share: float, own: np.ndarray | None = None) -> np.ndarray:
        value = np.array([f"{prefix}{x}" for x in rng.integers(0, k, n)], dtype=object)
        if own is not None:  # mostly the account's own entity, sometimes a shared one
            shared = rng.random(n) < 0.3
            value = np.where(shared, value, np.array([f"{prefix}-{a}" for a in own], dtype=object))
        value[rng.random(n) > share] = ""
        return value

    return Timeline(
        ids=np.array([f"e{i}" for i in range(n)]), times=times,
        entities={"account_id": np.array([f"a{x}" for x in accounts], dtype=object),
                  "seller_id": pick("s", 40, 0.9), "device_id": pick("d", 30, 0.85, accounts),
                  "ip": pick("i", 12, 0.95, accounts), "payment_instrument_id": pick("p", 50, 0.7, accounts)},
        values=values, labels=labels, label_times=label_times,
    )


def feed(timeline: Timeline, states: list[EntityState], rng: np.random.Generator) -> np.ndarray:
    """The serving path: batches of random size in timeline order, each label as it arrives; states take turns."""
    out = np.full((len(timeline.ids), len(states[0].names)), np.nan)
    pending: list[int] = []
    size = int(rng.integers(1, 65))

    def turn() -> EntityState:
        return states[int(rng.integers(0, len(states)))]

    def flush() -> None:
        nonlocal size
        if pending:
            out[pending] = turn().step([timeline.event(i, LINKS) for i in pending])
            pending.clear()
            size = int(rng.integers(1, 65))

    labels: list[LabelEvent] = []
    for kind, i in timeline.ordered(until=-math.inf):
        if kind == "label":
            flush()
            labels.append(timeline.label(i))
            continue
        if labels:
            turn().apply_labels(labels)
            labels = []
        pending.append(i)
        if len(pending) >= size:
            flush()
    flush()
    return out


def test_every_backend_gives_the_replay_features_bit_for_bit(backend):
    timeline = random_timeline(31)
    expected = replay_features(LAYOUT, timeline)
    states = [backend.open(), backend.open()] if backend.kind == "redis" else [backend.open()]
    served = feed(timeline, states, np.random.default_rng(32))
    assert np.array_equal(bits(served), bits(expected))
    assert states[0].event_count() == len(timeline.ids)
    # the check could fail: labels and shared entities did shape the features
    assert np.nanmax(expected[:, col("device_id.fraud_accounts")]) >= 1
    assert np.nanmax(expected[:, col("ip.distinct.account_id")]) >= 10


def test_backends_agree_on_resent_events_and_labels(request, tmp_path, redis_url):  # noqa: F811
    """Duplicates and repeated labels (not in any replay) go through every backend the same way."""
    timeline = random_timeline(41, n=1200)
    backends = [Backend(kind, tmp_path / kind, request) for kind in ("memory", "log", "redis")]
    for b in backends:
        b.tmp_path.mkdir()
    results = []
    for b in backends:
        state = b.open()
        feed(timeline, [state], np.random.default_rng(42))
        rng = np.random.default_rng(43)  # resent within the late allowance: retries, redeliveries
        recent = np.flatnonzero(timeline.times >= timeline.times.max() - 0.9 * DAY)
        again = [timeline.event(int(i), LINKS) for i in rng.choice(recent, 200)]
        resent = state.step(again)
        relabelled = state.apply_labels([timeline.label(int(i)) for i in np.flatnonzero(timeline.labels >= 0)[:50]])
        probes = [StateEvent(f"probe{k}", e.time + DAY, e.entities, e.values) for k, e in enumerate(again[:100])]
        results.append((resent, relabelled, state.step(probes), state.event_count()))
        state.close()
    for resent, relabelled, probed, count in results[1:]:
        assert np.array_equal(bits(resent), bits(results[0][0]))
        assert np.array_equal(bits(probed), bits(results[0][2]))
        assert (relabelled, count) == (results[0][1], results[0][3]) == (0, 1300)  # labelled once already


# ---- the history arrays ------------------------------------------------------------------------------------------


def defined_window_features(history: list[tuple[float, tuple[float, ...]]], t: float,
                            layout: StateLayout = LAYOUT) -> dict[str, float]:
    """An account's window features straight from their definitions, over ``(time, values)`` in history order
    (time order, ties in fold order): sums add the values present in that order from 0.0, a mean divides by their
    count, a max is the first largest."""
    from riskcascade.core.entity_state import SUM_WINDOWS, window_label

    labels = [window_label(w) for w in layout.windows_s]
    out: dict[str, float] = {}
    for k, (w, label) in enumerate(zip(layout.windows_s, labels, strict=True)):
        window = [values for time, values in history if t - w <= time < t]
        out[f"account_id.n_{label}"] = float(len(window))
        for j, name in enumerate(layout.aggregated):
            present = [values[j] for values in window if not math.isnan(values[j])]
            total = 0.0
            for v in present:
                total += v
            if k < SUM_WINDOWS:
                out[f"account_id.sum_{label}.{name}"] = total
            if k == len(labels) - 1:
                top = present[0] if present else math.nan
                for v in present[1:]:
                    top = v if v > top else top
                out[f"account_id.mean_{label}.{name}"] = total / len(present) if present else math.nan
                out[f"account_id.max_{label}.{name}"] = top
    return out


def late_sequence(seed: int, n: int = 300) -> list[StateEvent]:
    """Events of one account over two days in folding order: many at one instant, a fifth of them late (folded after
    later ones), the first late one into a full history array; values with NaN, both zeros, negatives and repeats
    (amounts whose sums depend on the order; clicks never positive, so that their max is often a zero of either
    sign)."""
    rng = np.random.default_rng(seed)
    times = np.sort(np.round(rng.uniform(0, 2 * DAY, n) / 600) * 600)
    amounts = [0.0, -0.0, 1.0, -2.5, 0.1, 0.2, 0.3, 1e16, -1e16, math.nan]
    clicks = [0.0, -0.0, -0.0, -2.5, -1e16, math.nan]
    events = [ev(f"s{i}", T + float(t), account="a", amount=float(rng.choice(amounts)),
                 clicks=float(rng.choice(clicks))) for i, t in enumerate(times)]
    order = list(range(5, n))
    for i in [i for i in order if rng.random() < 0.2]:  # each folded up to 40 events later
        at = order.index(i)
        order.insert(min(len(order), at + int(rng.integers(1, 40))), order.pop(at))
    return [*events[1:5], events[0], *(events[i] for i in order)]  # events[0]: before all, into a full array of 4


def test_history_arrays_grow_and_take_late_events_with_the_defined_features():
    events = late_sequence(51)
    folded = EntityBook(LAYOUT)  # late events inserted, the array doubling past its capacity
    for e in events:
        folded.fold_event(e)
    in_order = sorted(range(len(events)), key=lambda i: events[i].time)  # stable: ties keep their folding order
    appended = EntityBook(LAYOUT)  # the same history, every event appended
    for i in in_order:
        appended.fold_event(events[i])
    loaded = EntityBook(LAYOUT)  # as the Redis backend loads a record: one array, then more events added
    rec = appended.records[("account_id", "a")]
    copy = loaded.records[("account_id", "a")] = EntityRecord(first_seen=rec.first_seen, last_seen=rec.last_seen)
    copy.load_history(rec.times[:150], np.array([rec.row(i) for i in range(150)]))
    for i in in_order[150:]:
        copy.add_event(events[i].time, events[i].values)

    record = folded.records[("account_id", "a")]
    assert record.history is not None and record.history.shape[0] >= len(events) > 64
    assert record.times == sorted(record.times) == [events[i].time for i in in_order]
    assert np.array_equal(record.history[:len(events), 0], record.times)
    expected_rows = [events[i].values for i in in_order]
    assert np.array_equal(bits(np.array([record.row(i) for i in range(len(events))])), bits(np.array(expected_rows)))
    history = [(events[i].time, events[i].values) for i in in_order]
    probes = [ev(f"p{k}", T + k * 1800.0, account="a") for k in range(-1, 100)]  # on event instants, and past them
    for book in (folded, appended, loaded):
        got = np.vstack([book.features(p) for p in probes])
        assert np.array_equal(bits(got), bits(np.vstack([folded.features(p) for p in probes])))
    checked = 0
    for probe in probes:
        x = folded.features(probe)
        for name, value in defined_window_features(history, probe.time).items():
            assert bits(np.array([x[col(name)]])) == bits(np.array([value])), (name, probe.time)
            checked += 1
    assert checked > 1000


def test_a_trimmed_history_array_shrinks_and_takes_more_events():
    events = busy_sequence(25)
    full, trimmed = EntityBook(SHORT), EntityBook(SHORT)
    capacities = []  # of one busy record's array, before and after each trim
    expected, got = [], []
    for start in range(0, len(events), 30):
        batch = events[start:start + 30]
        batch = batch[1:] + batch[:1]  # the first one late, within the window
        expected.append(full.step(batch))
        got.append(trimmed.step(batch))
        if start % 300 == 270:  # every 10 batches: hours of history go at once
            record = trimmed.records[("ip", "i0")]
            before = record.history.shape[0]
            trimmed.trim(batch[-1].time)
            capacities.append((before, record.history.shape[0], len(record.times)))
    assert np.array_equal(bits(np.vstack(got)), bits(np.vstack(expected)))
    assert all(after < before and n < after for before, after, n in capacities)  # it gave memory back, and kept room
