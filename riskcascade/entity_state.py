"""Live entity state: what each account, device, IP, payment instrument and seller did *before* an event.

This is the platform's time axis. Every event the scorer decides is folded into the state of each of its entities,
and every label (an adjudicated outcome) is folded in when it *arrives*; the fast model's time-true features of an
event are computed from that state as it stood just before the event. Training builds the same features by
replaying a data set's events and label arrivals in time order through this same code (``riskcascade.state_replay``),
so the features a model learns from are the features it is served: no train/serve skew, and no feature can see a
later event or a label before its arrival.

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
or anything at or after its own instant. Labels count when ``known_at <= t``.

Backends (``StateSettings.backend``): ``EmbeddedEntityState`` (in the scorer process, durable in a SQLite log that
is replayed at start, so a restarted replica loses no history) and ``RedisEntityState`` (``riskcascade.state_redis``,
shared by several replicas). Both run the feature and fold logic of ``EntityBook`` below, so they agree exactly.
This module imports nothing of Ray, gRPC or Redis.
"""

from __future__ import annotations

import bisect
import json
import math
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


@dataclass
class EntityRecord:
    """The state of one entity. Lists of times are kept sorted (events arrive mostly in time order)."""

    first_seen: float = math.inf
    last_seen: float = -math.inf
    times: list[float] = field(default_factory=list)
    rows: list[tuple[float, ...]] = field(default_factory=list)
    counterparts: dict[str, dict[str, float]] = field(default_factory=dict)  # link -> value -> first seen
    fraud_known: list[float] = field(default_factory=list)  # arrival times of fraud labels
    legit_known: list[float] = field(default_factory=list)
    fraud_accounts: dict[str, float] = field(default_factory=dict)  # account -> when its fraud became known

    def add_event(self, time: float, row: tuple[float, ...]) -> None:
        self.first_seen = min(self.first_seen, time)
        self.last_seen = max(self.last_seen, time)
        if not self.times or time >= self.times[-1]:
            self.times.append(time)
            self.rows.append(row)
        else:
            at = bisect.bisect_right(self.times, time)
            self.times.insert(at, time)
            self.rows.insert(at, row)

    def trim(self, before: float) -> None:
        """Forget per-event history older than ``before`` (first/last seen, counterparts and labels stay).

        The latest event before ``before`` stays too: a second event at the entity's last instant takes its idle
        time from it (``features`` reads the latest time strictly before the event)."""
        cut = bisect.bisect_left(self.times, before) - 1
        if cut > 0:
            del self.times[:cut]
            del self.rows[:cut]

    def fraud_known_by(self, t: float) -> int:
        return bisect.bisect_right(self.fraud_known, t)


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
        self._windows = [float(w) for w in layout.windows_s]
        self._width = len(layout.aggregated)

    def record(self, link: str, value: str) -> EntityRecord:
        key = (link, value)
        found = self.records.get(key)
        if found is None:
            found = self.records[key] = EntityRecord()
        return found

    def features(self, event: StateEvent) -> np.ndarray:
        """The state features of ``event`` as of its time, from what the book holds (nothing is changed)."""
        out: list[float] = []
        t = event.time
        account = event.entities.get(ACCOUNT, "")
        n_windows = len(self._windows)
        for link in self.layout.links:
            value = event.entities.get(link, "")
            rec = self.records.get((link, value)) if value else None
            counterparts = self.layout.counterparts(link)
            has_fraud_accounts = link != ACCOUNT and ACCOUNT in self.layout.links
            if rec is None or rec.first_seen >= t:  # never seen before this event
                out += [math.nan, math.nan]
                out += [0.0] * n_windows
                for _ in range(self._width):
                    out += [0.0] * min(SUM_WINDOWS, n_windows) + [math.nan, math.nan]
                out += [0.0] * len(counterparts)
                fraud = float(rec.fraud_known_by(t)) if rec is not None else 0.0
                legit = float(bisect.bisect_right(rec.legit_known, t)) if rec is not None else 0.0
                out += [fraud, legit]
                if has_fraud_accounts:
                    out.append(_fraud_accounts(rec, t, account) if rec is not None else 0.0)
                continue
            end = bisect.bisect_left(rec.times, t)  # events strictly before t
            last = rec.times[end - 1] if end else rec.last_seen if rec.last_seen < t else math.nan
            out += [(t - rec.first_seen) / SECONDS_PER_HOUR,
                    (t - last) / SECONDS_PER_HOUR if not math.isnan(last) else math.nan]
            starts = [bisect.bisect_left(rec.times, t - w) for w in self._windows]
            out += [float(end - s) for s in starts]
            longest = rec.rows[starts[-1]:end]
            short = [rec.rows[s:end] for s in starts[:SUM_WINDOWS]]
            for j in range(self._width):
                for rows in short:
                    out.append(_nansum(r[j] for r in rows))
                column = [r[j] for r in longest if not math.isnan(r[j])]
                out += [sum(column) / len(column), max(column)] if column else [math.nan, math.nan]
            for m in counterparts:
                seen = rec.counterparts.get(m, {})
                out.append(float(sum(1 for first in seen.values() if first < t)))
            out += [float(rec.fraud_known_by(t)), float(bisect.bisect_right(rec.legit_known, t))]
            if has_fraud_accounts:
                out.append(_fraud_accounts(rec, t, account))
        return np.array(out, dtype=np.float64)

    def fold_event(self, event: StateEvent) -> bool:
        """Add ``event`` to each of its entities; False (and nothing changes) when the id was folded before."""
        if event.event_id in self.events:
            return False
        self.events[event.event_id] = event
        t = event.time
        present = {link: event.entities.get(link, "") for link in self.layout.links}
        present = {link: value for link, value in present.items() if value}
        account = present.get(ACCOUNT, "")
        account_fraud_at = None
        if account:
            rec = self.records.get((ACCOUNT, account))
            if rec is not None and rec.fraud_known:
                account_fraud_at = rec.fraud_known[0]
        for link, value in present.items():
            rec = self.record(link, value)
            rec.add_event(t, event.values)
            for m in self.layout.counterparts(link):
                other = present.get(m)
                if other:
                    seen = rec.counterparts.setdefault(m, {})
                    if t < seen.get(other, math.inf):
                        seen[other] = t
            if link != ACCOUNT and account and account_fraud_at is not None:
                # an account already known for fraud shows up on this entity: known here from now on
                _note_fraud_account(rec, account, max(account_fraud_at, t))
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
            bisect.insort(rec.fraud_known if label.fraud else rec.legit_known, label.known_at)
        if label.fraud and account:
            account_rec = self.record(ACCOUNT, account)
            for m, values in account_rec.counterparts.items():
                for other, first in values.items():
                    _note_fraud_account(self.record(m, other), account, max(label.known_at, first))
            for link in self.layout.links:  # the event's own seller too (sellers are not account counterparts)
                value = event.entities.get(link, "")
                if value and link != ACCOUNT:
                    _note_fraud_account(self.record(link, value), account, label.known_at)
        return True

    def trim(self, now: float) -> None:
        before = now - self.layout.retention_s
        for rec in self.records.values():
            rec.trim(before)

    def step(self, events: Sequence[StateEvent]) -> np.ndarray:
        """Features of each event as of its time, folding each in before the next: ``[len(events), n_features]``."""
        out = np.empty((len(events), len(self.names)))
        for i, event in enumerate(events):
            out[i] = self.features(event)
            self.fold_event(event)
        return out


def _note_fraud_account(rec: EntityRecord, account: str, known_at: float) -> None:
    if known_at < rec.fraud_accounts.get(account, math.inf):
        rec.fraud_accounts[account] = known_at


def _fraud_accounts(rec: EntityRecord, t: float, own_account: str) -> float:
    return float(sum(1 for acct, at in rec.fraud_accounts.items() if at <= t and acct != own_account))


def _nansum(values: Iterable[float]) -> float:
    return float(sum(v for v in values if not math.isnan(v)))


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


TRIM_EVERY_EVENTS = 10_000  # the embedded book forgets history older than the retention this often

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

    def __init__(self, layout: StateLayout, log_path: Path | None = None) -> None:
        super().__init__(layout)
        self._book = EntityBook(layout)
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
            self._append([("event", e.to_json()) for e in _unique(new)])
            features = self._book.step(events)
            self._newest = max([self._newest, *(e.time for e in events)])
            self._since_trim += len(new)
            if self._since_trim >= TRIM_EVERY_EVENTS:
                self._book.trim(self._newest)
                self._since_trim = 0
            return features

    def apply_labels(self, labels: Sequence[LabelEvent]) -> int:
        with self._lock:
            known = [label for label in labels
                     if label.event_id in self._book.events and label.event_id not in self._book.labelled]
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
