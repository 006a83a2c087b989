"""Live entity state: what each account, device, IP, payment instrument and seller did *before* an event.

This is the platform's time axis. Every event the scorer decides is folded into the state of each of its entities,
and every label (an adjudicated outcome) is folded in when it *arrives*; the fast model's time-true features of an
event are computed from that state as it stood just before the event. Training builds the same features by
replaying a data set's events and label arrivals in time order through this same code
(``riskcascade.core.state_replay``), so the features a model learns from are the features it is served: no train/serve
skew, and no feature can see a later event or a label before its arrival.

Per entity (a link name such as ``device_id`` and its value) the state keeps:

- the events of the last ``retention_s`` seconds: time and the aggregated feature values (for velocity: counts and
  sums over sliding windows; mean and max over the longest window),
- first and last seen,
- distinct counterparts with the time each was first seen together (accounts per device, IP, instrument and
  seller; devices, IPs and instruments per account),
- the arrival times of the fraud and legitimate labels of its events,
- for an entity other than the account: the accounts seen on it that have a known fraud label, with the time that
  became known (a 2-hop aggregate: entity -> accounts -> outcomes).

Feature names, per link L (``state_feature_names``): ``L.age_h`` and ``L.idle_h`` (hours since first / last seen,
missing if never seen), ``L.n_<w>`` (events in each window), ``L.sum_<w>.<a>`` (sum of each aggregated feature over
the two shortest windows), ``L.mean_<W>.<a>`` / ``L.max_<W>.<a>`` (over the longest window), ``L.distinct.<M>``
(distinct counterparts), ``L.fraud_known`` / ``L.legit_known`` (labels known by then), and ``L.fraud_accounts``
(other accounts on it with a known fraud label).

A window counts the events with time in ``[t - w, t)``: strictly before the event, so an event never sees itself
or anything at or after its own instant. Labels count when ``known_at <= t``. Sums, means and maxima leave missing
(NaN) values out: a sum adds the others in event order (events at one instant in fold order) from 0.0, a mean divides
that by their count, a max is the first largest; with none, a sum is 0 and a mean or max missing. The order is part
of the definition (it decides the last bits, and training must learn the served values): ``window_features`` keeps it
in a loop that numba compiles without fast-math, over each entity's history held in one float64 array.

Backends (``StateSettings.backend``): ``EmbeddedEntityState`` (in the scorer process, durable in a SQLite log that
is replayed at start, so a restarted replica loses no history) and ``RedisEntityState``
(``riskcascade.core.state_redis``, shared by several replicas). Both run the feature and fold logic of ``EntityBook``
below, so they agree exactly. This module imports nothing of Ray, gRPC or Redis; numba is imported when the first
``EntityBook`` is made.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import threading
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from riskcascade.core.config import StateSettings

ACCOUNT = "account_id"
SECONDS_PER_HOUR = 3600.0
SUM_WINDOWS = 2  # sums over the shortest windows (velocity of money, clicks...); mean and max over the longest
COUNTERPARTS: dict[str, tuple[str, ...]] = {
    # link -> links whose distinct values seen together with it are counted
    "account_id": ("device_id", "ip", "payment_instrument_id"),
    "device_id": ("account_id",),
    "ip": ("account_id",),
    "payment_instrument_id": ("account_id",),
    "seller_id": ("account_id",),
}


def window_label(seconds: int) -> str:
    """``3600`` -> ``1h``, ``86400`` -> ``24h``, ``604800`` -> ``7d``; other lengths in seconds, minutes or hours."""
    if seconds % 86400 == 0 and seconds >= 7 * 86400:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


@dataclass(frozen=True)
class StateLayout:
    """Which entities the state tracks, which event values it aggregates, and over which windows."""

    links: tuple[str, ...]
    aggregated: tuple[str, ...]
    windows_s: tuple[int, ...]
    retention_s: int

    def __post_init__(self) -> None:
        if not self.windows_s or list(self.windows_s) != sorted(set(self.windows_s)):
            raise ValueError("windows_s must be distinct and ascending")
        if self.retention_s < self.windows_s[-1]:
            raise ValueError("retention_s must cover the longest window")

    def counterparts(self, link: str) -> tuple[str, ...]:
        return tuple(m for m in COUNTERPARTS.get(link, ()) if m in self.links and m != link)

    @property
    def names(self) -> list[str]:
        return state_feature_names(self)

    def to_json(self) -> dict:
        return {"links": list(self.links), "aggregated": list(self.aggregated), "windows_s": list(self.windows_s),
                "retention_s": self.retention_s}

    @classmethod
    def from_json(cls, body: Mapping) -> "StateLayout":
        return cls(tuple(body["links"]), tuple(body["aggregated"]), tuple(int(w) for w in body["windows_s"]),
                   int(body["retention_s"]))


def state_feature_names(layout: StateLayout) -> list[str]:
    windows = [window_label(w) for w in layout.windows_s]
    longest = windows[-1]
    names: list[str] = []
    for link in layout.links:
        names += [f"{link}.age_h", f"{link}.idle_h"]
        names += [f"{link}.n_{w}" for w in windows]
        for a in layout.aggregated:
            names += [f"{link}.sum_{w}.{a}" for w in windows[:SUM_WINDOWS]]
            names += [f"{link}.mean_{longest}.{a}", f"{link}.max_{longest}.{a}"]
        names += [f"{link}.distinct.{m}" for m in layout.counterparts(link)]
        names += [f"{link}.fraud_known", f"{link}.legit_known"]
        if link != ACCOUNT and ACCOUNT in layout.links:
            names.append(f"{link}.fraud_accounts")
    return names


def describe_state_feature(name: str, descriptions: Mapping[str, str]) -> str:
    """Plain words for a state feature name (reason codes)."""
    link, _, rest = name.partition(".")
    thing = link.removesuffix("_id").replace("_", " ")
    kind, _, feature = rest.partition(".")
    words = descriptions.get(feature, feature)
    words = words[:1].lower() + words[1:]
    if kind == "age_h":
        return f"Hours since this {thing} was first seen"
    if kind == "idle_h":
        return f"Hours since this {thing} was last seen"
    if kind.startswith("n_"):
        return f"Events of this {thing} in the last {kind[2:]}"
    if kind.startswith("sum_"):
        return f"Sum of {words} over this {thing}'s events in the last {kind[4:]}"
    if kind.startswith("mean_"):
        return f"Mean {words} over this {thing}'s events in the last {kind[5:]}"
    if kind.startswith("max_"):
        return f"Highest {words} over this {thing}'s events in the last {kind[4:]}"
    if kind == "distinct":
        return f"Distinct {feature.removesuffix('_id').replace('_', ' ')}s seen with this {thing}"
    if kind == "fraud_known":
        return f"Events of this {thing} known to be fraud"
    if kind == "legit_known":
        return f"Events of this {thing} known to be legitimate"
    if kind == "fraud_accounts":
        return f"Other accounts on this {thing} known to have committed fraud"
    return name


@dataclass(frozen=True)
class StateEvent:
    """One event as the state sees it: id, time, entity per link, and the aggregated feature values."""

    event_id: str
    time: float  # seconds since the epoch (UTC)
    entities: Mapping[str, str]  # link -> entity id; "" or absent = none
    values: tuple[float, ...]  # StateLayout.aggregated order; NaN = missing

    def to_json(self) -> str:
        return json.dumps([self.event_id, self.time, {k: v for k, v in self.entities.items() if v},
                           [None if math.isnan(v) else v for v in self.values]])

    @classmethod
    def from_json(cls, text: str) -> "StateEvent":
        event_id, time, entities, values = json.loads(text)
        return cls(event_id, float(time), entities, tuple(math.nan if v is None else float(v) for v in values))


@dataclass(frozen=True)
class LabelEvent:
    """An outcome of a past event, counted from ``known_at`` (when it arrived)."""

    event_id: str
    fraud: bool
    known_at: float  # seconds since the epoch (UTC)


_INITIAL_CAPACITY = 4  # history rows a record starts with; the array doubles when full


def _capacity_for(n: int) -> int:
    """The history capacity for ``n`` events and room for more: the initial one, doubled until above ``n``."""
    capacity = _INITIAL_CAPACITY
    while capacity <= n:
        capacity *= 2
    return capacity


@dataclass(eq=False, slots=True)
class EntityRecord:
    """The state of one entity.

    Its per-event history is a float64 array ``history`` of one row per event, ``[time, aggregated values...]`` (NaN =
    missing), sorted by time with the events of one instant in fold order, and spare rows at the end (the array doubles
    when full); ``times`` holds the same times as a list, for bisection in Python. Distinct counterparts and fraud
    accounts keep a sorted list of their times beside their dictionaries, so that counting the ones known before an
    instant is a bisection. Change the history through ``add_event``, ``insert_history``, ``load_history`` and
    ``trim``, and counterparts and fraud accounts through ``see_counterpart`` and ``note_fraud_account``.
    """

    first_seen: float = math.inf
    last_seen: float = -math.inf
    counterparts: dict[str, dict[str, float]] = field(default_factory=dict)  # link -> value -> first seen
    fraud_known: list[float] = field(default_factory=list)  # arrival times of fraud labels, sorted
    legit_known: list[float] = field(default_factory=list)
    fraud_accounts: dict[str, float] = field(default_factory=dict)  # account -> when its fraud became known
    times: list[float] = field(default_factory=list, init=False)
    history: np.ndarray | None = field(default=None, init=False, repr=False)  # [capacity, 1 + width]
    _firsts: dict[str, list[float]] = field(init=False, repr=False)  # link -> sorted first-seen times
    _fraud_times: list[float] = field(init=False, repr=False)  # sorted fraud_accounts times

    def __post_init__(self) -> None:
        self._firsts = {m: sorted(seen.values()) for m, seen in self.counterparts.items()}
        self._fraud_times = sorted(self.fraud_accounts.values())

    # ---- per-event history ------------------------------------------------------------------------------------

    def add_event(self, time: float, values: Sequence[float]) -> None:
        """An event at ``time`` with aggregated ``values``: seen then, its values after the others at that instant."""
        self.add_row(time, np.array((time, *values), dtype=np.float64))

    def add_row(self, time: float, row: np.ndarray) -> None:
        """``add_event`` with the event as its history row ``[time, values...]`` (the book builds it once per event)."""
        if time < self.first_seen:
            self.first_seen = time
        if time > self.last_seen:
            self.last_seen = time
        times, history = self.times, self.history
        if times and time >= times[-1] and history is not None and len(times) < history.shape[0]:
            history[len(times)] = row  # the common case: in time order, with room
            times.append(time)
        else:
            self._insert(time, row)

    def insert_history(self, time: float, values: Sequence[float]) -> None:
        """Add an event's values to the per-event history alone (first and last seen stay), after the others at its
        instant."""
        self._insert(time, np.array((time, *values), dtype=np.float64))

    def _insert(self, time: float, row: np.ndarray) -> None:
        times = self.times
        n = len(times)
        history = self.history
        if history is None:
            history = self.history = np.empty((_INITIAL_CAPACITY, len(row)))
        elif n == history.shape[0]:
            history = self._resize(2 * n)
        if not n or time >= times[-1]:
            history[n] = row
            times.append(time)
        else:
            at = bisect_right(times, time)
            history[at + 1:n + 1] = history[at:n]  # numpy copies overlapping slices as if through a buffer
            history[at] = row
            times.insert(at, time)

    def load_history(self, times: Sequence[float], values: np.ndarray) -> None:
        """Replace the per-event history (a backend loading a record): ``times`` sorted, ``values`` ``[n, width]`` in
        the same order. First and last seen stay."""
        self.times = list(times)
        n = len(self.times)
        if not n:
            self.history = None
            return
        values = np.asarray(values, dtype=np.float64).reshape(n, -1)
        history = self.history = np.empty((_capacity_for(n), 1 + values.shape[1]))
        history[:n, 0] = self.times
        history[:n, 1:] = values

    def row(self, index: int) -> tuple[float, ...]:
        """The aggregated values of the ``index``-th event of the history (NaN = missing)."""
        assert self.history is not None
        return tuple(self.history[index, 1:].tolist())

    def trim(self, before: float) -> None:
        """Forget per-event history older than ``before`` (first/last seen, counterparts and labels stay).

        The latest event before ``before`` stays too: a second event at the entity's last instant takes its idle
        time from it (``features`` reads the latest time strictly before the event)."""
        cut = bisect_left(self.times, before) - 1
        if cut <= 0:
            return
        del self.times[:cut]
        n = len(self.times)
        assert self.history is not None
        if _capacity_for(n) < self.history.shape[0] // 2:  # most of it went: give the memory back
            self._resize(_capacity_for(n), start=cut)
        else:
            self.history[:n] = self.history[cut:cut + n]

    def _resize(self, capacity: int, start: int = 0) -> np.ndarray:
        """A new history array of ``capacity`` rows holding the rows of the current one from ``start``."""
        assert self.history is not None
        n = len(self.times)
        resized = np.empty((capacity, self.history.shape[1]))
        resized[:n] = self.history[start:start + n]
        self.history = resized
        return resized

    # ---- counterparts and labels ------------------------------------------------------------------------------

    def see_counterpart(self, link: str, value: str, time: float) -> None:
        """``value`` of ``link`` seen together with this entity at ``time`` (the earliest time is kept)."""
        seen = self.counterparts.get(link)
        if seen is None:
            seen, self._firsts[link] = self.counterparts.setdefault(link, {}), []
        first = seen.get(value)
        if first is not None and time >= first:
            return
        firsts = self._firsts[link]
        if first is not None:
            del firsts[bisect_left(firsts, first)]
        seen[value] = time
        insort(firsts, time)

    def counterparts_before(self, link: str, t: float) -> int:
        """Distinct values of ``link`` first seen with this entity strictly before ``t``."""
        firsts = self._firsts.get(link)
        return bisect_left(firsts, t) if firsts else 0

    def note_fraud_account(self, account: str, known_at: float) -> None:
        """``account`` known for fraud on this entity from ``known_at`` (the earliest time is kept)."""
        old = self.fraud_accounts.get(account)
        if old is not None:
            if known_at >= old:
                return
            del self._fraud_times[bisect_left(self._fraud_times, old)]
        self.fraud_accounts[account] = known_at
        insort(self._fraud_times, known_at)

    def fraud_accounts_by(self, t: float, own_account: str) -> int:
        """Accounts other than ``own_account`` known for fraud on this entity by ``t``."""
        count = bisect_right(self._fraud_times, t)
        own = self.fraud_accounts.get(own_account)
        return count - 1 if own is not None and own <= t else count

    def fraud_known_by(self, t: float) -> int:
        return bisect_right(self.fraud_known, t)


def window_features(history: np.ndarray, n: int, t: float, first_seen: float, last_seen: float, windows: np.ndarray,
                    n_sums: int, out: np.ndarray, at: int) -> None:
    """Write an entity's history features as of ``t`` to ``out[at:]``: hours since first and last seen, events per
    window, then per aggregated value its sums over the ``n_sums`` shortest windows and its mean and max over the
    longest. ``history`` is the record's array (its first ``n`` rows), ``windows`` the lengths in seconds, ascending.

    The definitions of ``EntityBook.features`` (see the module docstring): a window is ``[t - w, t)``; a sum adds the
    values that are not NaN in event order from 0.0, as Python's ``sum`` over them; a mean is that sum over their
    count; a max is the first largest; with none, a sum is 0 and a mean or max NaN. Plain Python, compiled by numba
    (no fast-math: the additions happen in this order, so the features are the same in every backend and process).
    """
    width = history.shape[1] - 1
    lo, hi = 0, n
    while lo < hi:  # the events strictly before t: bisect_left
        mid = (lo + hi) // 2
        if history[mid, 0] < t:
            lo = mid + 1
        else:
            hi = mid
    end = lo
    last = history[end - 1, 0] if end else last_seen if last_seen < t else np.nan
    out[at] = (t - first_seen) / SECONDS_PER_HOUR
    out[at + 1] = (t - last) / SECONDS_PER_HOUR if last == last else np.nan
    n_windows = windows.shape[0]
    starts = np.empty(n_windows, dtype=np.int64)
    for k in range(n_windows):
        lo, hi = 0, end
        since = t - windows[k]
        while lo < hi:
            mid = (lo + hi) // 2
            if history[mid, 0] < since:
                lo = mid + 1
            else:
                hi = mid
        starts[k] = lo
        out[at + 2 + k] = end - lo
    per_value = n_sums + 2
    first = at + 2 + n_windows
    for k in range(n_sums):
        for j in range(width):
            total = 0.0
            for i in range(starts[k], end):
                v = history[i, 1 + j]
                if v == v:
                    total += v
            out[first + j * per_value + k] = total
    totals = np.zeros(width)
    counts = np.zeros(width, dtype=np.int64)
    tops = np.full(width, -np.inf)
    for i in range(starts[n_windows - 1], end):
        for j in range(width):
            v = history[i, 1 + j]
            if v == v:
                totals[j] += v
                counts[j] += 1
                if v > tops[j]:  # the first of equal values stays, as with max()
                    tops[j] = v
    for j in range(width):
        mean_at = first + j * per_value + n_sums
        if counts[j]:
            out[mean_at] = totals[j] / counts[j]
            out[mean_at + 1] = tops[j]
        else:
            out[mean_at] = np.nan
            out[mean_at + 1] = np.nan


@functools.cache
def _compiled_window_features() -> Callable[..., None]:
    """``window_features`` compiled by numba (once per process; numba caches it on disk beside this module), and
    called once, so that the compilation (or the load of the cache) happens here rather than on a request."""
    import numba

    compiled = numba.njit(cache=True, nogil=True)(window_features)
    compiled(np.zeros((1, 2)), 1, 1.0, 0.0, 0.0, np.ones(1), 1, np.empty(8), 0)
    return compiled


class EntityBook:
    """Entity records in memory, with the one feature computation and the one fold that every backend runs.

    ``records`` maps ``(link, value)`` to its record; ``events`` maps event ids the book has seen to their
    ``StateEvent`` (labels find their entities through it). The embedded backend keeps one book for its lifetime;
    the Redis backend loads the records a batch touches into a fresh book, runs the same code and writes back.
    """

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        self.names = state_feature_names(layout)
        self.records: dict[tuple[str, str], EntityRecord] = {}
        self.events: dict[str, StateEvent] = {}
        self.labelled: dict[str, bool] = {}  # event id -> fraud, for events whose label was folded
        self._windows = np.array(layout.windows_s, dtype=np.float64)
        self._window_features = _compiled_window_features()
        self._no_history = np.empty((0, 1 + len(layout.aggregated)))
        self._n_sums = min(SUM_WINDOWS, len(layout.windows_s))
        self._counterparts = {link: layout.counterparts(link) for link in layout.links}
        # Per link, in the order of state_feature_names: window_features' (age and idle time, events per window, per
        # aggregated value its sums, mean and max), then distinct counterparts, labels known and fraud accounts.
        # What an entity never seen before gets: no age nor idle time, no events and so no mean or max, zeros.
        history_unseen = [math.nan, math.nan] + [0.0] * len(layout.windows_s)
        history_unseen += ([0.0] * self._n_sums + [math.nan, math.nan]) * len(layout.aggregated)
        self._history_size = len(history_unseen)
        self._links: list[tuple[str, int, tuple[str, ...], bool]] = []  # link, where its features start, ...
        unseen: list[float] = []
        for link in layout.links:
            counterparts = self._counterparts[link]
            has_fraud_accounts = link != ACCOUNT and ACCOUNT in layout.links
            self._links.append((link, len(unseen), counterparts, has_fraud_accounts))
            unseen += history_unseen + [0.0] * (len(counterparts) + 2 + has_fraud_accounts)
        assert len(unseen) == len(self.names)
        self._unseen = np.array(unseen)

    def record(self, link: str, value: str) -> EntityRecord:
        key = (link, value)
        found = self.records.get(key)
        if found is None:
            found = self.records[key] = EntityRecord()
        return found

    def features(self, event: StateEvent) -> np.ndarray:
        """The state features of ``event`` as of its time, from what the book holds (nothing is changed)."""
        out = np.empty(len(self.names))
        self._features(event, out)
        return out

    def _features(self, event: StateEvent, out: np.ndarray) -> None:
        """``features`` written to ``out``."""
        out[:] = self._unseen
        t = event.time
        entities = event.entities
        account = entities.get(ACCOUNT, "")
        records = self.records
        window_features, windows, n_sums = self._window_features, self._windows, self._n_sums
        history_size = self._history_size
        for link, at, counterparts, has_fraud_accounts in self._links:  # what stays as in _unseen is left alone
            value = entities.get(link)
            rec = records.get((link, value)) if value else None
            if rec is None:
                continue
            seen = rec.first_seen < t  # else never seen before this event: only labels can count
            if seen:
                history = rec.history if rec.history is not None else self._no_history
                window_features(history, len(rec.times), t, rec.first_seen, rec.last_seen, windows, n_sums, out, at)
            at += history_size
            if seen:
                for k, m in enumerate(counterparts):
                    out[at + k] = rec.counterparts_before(m, t)
            at += len(counterparts)
            if rec.fraud_known:
                out[at] = bisect_right(rec.fraud_known, t)
            if rec.legit_known:
                out[at + 1] = bisect_right(rec.legit_known, t)
            if has_fraud_accounts and rec.fraud_accounts:
                out[at + 2] = rec.fraud_accounts_by(t, account)

    def fold_event(self, event: StateEvent) -> bool:
        """Add ``event`` to each of its entities; False (and nothing changes) when the id was folded before."""
        if event.event_id in self.events:
            return False
        self.events[event.event_id] = event
        t = event.time
        present = {link: value for link in self.layout.links if (value := event.entities.get(link, ""))}
        account = present.get(ACCOUNT, "")
        account_fraud_at = None
        if account:
            rec = self.records.get((ACCOUNT, account))
            if rec is not None and rec.fraud_known:
                account_fraud_at = rec.fraud_known[0]
        row = np.array((t, *event.values), dtype=np.float64)
        records = self.records
        for link, value in present.items():
            rec = records.get((link, value))
            if rec is None:
                rec = records[(link, value)] = EntityRecord()
            rec.add_row(t, row)
            for m in self._counterparts[link]:
                other = present.get(m)
                if other:
                    rec.see_counterpart(m, other, t)
            if link != ACCOUNT and account and account_fraud_at is not None:
                # an account already known for fraud shows up on this entity: known here from now on
                rec.note_fraud_account(account, max(account_fraud_at, t))
        return True

    def fold_label(self, label: LabelEvent) -> bool:
        """Count ``label`` for every entity of its event from ``known_at``; False when the event is unknown or
        already labelled (the first label of an event counts; a later correction does not move the counts)."""
        event = self.events.get(label.event_id)
        if event is None or label.event_id in self.labelled:
            return False
        self.labelled[label.event_id] = label.fraud
        account = event.entities.get(ACCOUNT, "") if ACCOUNT in self.layout.links else ""
        for link in self.layout.links:
            value = event.entities.get(link, "")
            if not value:
                continue
            rec = self.record(link, value)
            insort(rec.fraud_known if label.fraud else rec.legit_known, label.known_at)
        if label.fraud and account:
            account_rec = self.record(ACCOUNT, account)
            for m, values in account_rec.counterparts.items():
                for other, first in values.items():
                    self.record(m, other).note_fraud_account(account, max(label.known_at, first))
            for link in self.layout.links:  # the event's own seller too (sellers are not account counterparts)
                value = event.entities.get(link, "")
                if value and link != ACCOUNT:
                    self.record(link, value).note_fraud_account(account, label.known_at)
        return True

    def trim(self, now: float) -> None:
        before = now - self.layout.retention_s
        for rec in self.records.values():
            rec.trim(before)

    def step(self, events: Sequence[StateEvent]) -> np.ndarray:
        """Features of each event as of its time, folding each in before the next: ``[len(events), n_features]``."""
        out = np.empty((len(events), len(self.names)))
        for i, event in enumerate(events):
            self._features(event, out[i])
            self.fold_event(event)
        return out


class EntityState(ABC):
    """The live state behind one interface; see the module docstring."""

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        self.names = state_feature_names(layout)

    @abstractmethod
    def step(self, events: Sequence[StateEvent]) -> np.ndarray:
        """Features of each event as of its time (in order, each folded in before the next), then keep them."""

    @abstractmethod
    def apply_labels(self, labels: Sequence[LabelEvent]) -> int:
        """Fold labels in; returns how many were counted (labels of events never seen, and second labels of an
        event already labelled, are ignored: applying the same feedback twice changes nothing)."""

    @abstractmethod
    def event_count(self) -> int:
        """Events the state holds (for health and tests)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds."""


_DEFAULTS = StateSettings()

_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS state_log (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    kind  TEXT NOT NULL,          -- 'event' or 'label'
    body  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS state_layout (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL);
"""


class EmbeddedEntityState(EntityState):
    """The default backend: an ``EntityBook`` in this process, every change appended to a SQLite log first.

    At start the log is replayed into the book, so a restarted (or killed) replica comes back with the same
    history. The log is written in one transaction per call (WAL, ``synchronous=NORMAL``: survives a killed
    process; an fsync per batch would only add power-loss safety). Without ``log_path`` the state lives in memory
    only (training replay, offline evaluation). Calls are serialised by a lock: callers run it from one worker
    thread (the scorer's), never on an event loop.
    """

    def __init__(self, layout: StateLayout, log_path: Path | None = None,
                 trim_every_events: int = _DEFAULTS.trim_every_events) -> None:
        super().__init__(layout)
        self._book = EntityBook(layout)
        self._trim_every = trim_every_events
        self._lock = threading.Lock()
        self._newest = -math.inf
        self._since_trim = 0
        self._log: sqlite3.Connection | None = None
        if log_path is not None:
            log_path = Path(log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = sqlite3.connect(log_path, check_same_thread=False, isolation_level=None)
            self._log.execute("PRAGMA journal_mode=WAL")
            self._log.execute("PRAGMA synchronous=NORMAL")
            self._log.executescript(_LOG_SCHEMA)
            self._check_layout()
            self._replay()

    def _check_layout(self) -> None:
        assert self._log is not None
        body = json.dumps(self.layout.to_json(), sort_keys=True)
        row = self._log.execute("SELECT body FROM state_layout WHERE id = 1").fetchone()
        if row is None:
            self._log.execute("INSERT INTO state_layout VALUES (1, ?)", (body,))
        elif row[0] != body:
            raise ValueError(
                f"the entity state log was written for another layout ({row[0]}); this model needs {body}: "
                "remove the log (state.log_path) to rebuild the state from the data set"
            )

    def _replay(self) -> None:
        assert self._log is not None
        for kind, body in self._log.execute("SELECT kind, body FROM state_log ORDER BY seq"):
            if kind == "event":
                self._book.fold_event(StateEvent.from_json(body))
            else:
                event_id, fraud, known_at = json.loads(body)
                self._book.fold_label(LabelEvent(event_id, bool(fraud), float(known_at)))

    def _append(self, rows: list[tuple[str, str]]) -> None:
        if self._log is None or not rows:
            return
        self._log.execute("BEGIN")
        try:
            self._log.executemany("INSERT INTO state_log (kind, body) VALUES (?, ?)", rows)
            self._log.execute("COMMIT")
        except BaseException:
            self._log.execute("ROLLBACK")
            raise

    def step(self, events: Sequence[StateEvent]) -> np.ndarray:
        with self._lock:
            new = [e for e in events if e.event_id not in self._book.events]
            if self._log is not None:
                self._append([("event", e.to_json()) for e in _unique(new)])
            features = self._book.step(events)
            self._newest = max([self._newest, *(e.time for e in events)])
            self._since_trim += len(new)
            if self._since_trim >= self._trim_every:
                self._book.trim(self._newest)
                self._since_trim = 0
            return features

    def apply_labels(self, labels: Sequence[LabelEvent]) -> int:
        with self._lock:
            known = [label for label in labels
                     if label.event_id in self._book.events and label.event_id not in self._book.labelled]
            if self._log is not None:
                self._append([("label", json.dumps([x.event_id, x.fraud, x.known_at])) for x in known])
            return sum(self._book.fold_label(label) for label in known)

    def features_of(self, event: StateEvent) -> np.ndarray:
        """Features of ``event`` as of its time without folding it in (tests, explanations)."""
        with self._lock:
            return self._book.features(event)

    def event_count(self) -> int:
        with self._lock:
            return len(self._book.events)

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None


def _unique(events: Sequence[StateEvent]) -> list[StateEvent]:
    seen: set[str] = set()
    out = []
    for e in events:
        if e.event_id not in seen:
            seen.add(e.event_id)
            out.append(e)
    return out
