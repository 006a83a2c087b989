"""The entity state's feature and fold code as it was before the per-event history moved into numpy arrays and its
window features into a compiled kernel (``riskcascade/entity_state.py`` at commit e7a6f33), frozen here as the
baseline of ``loadtest.state_bench``. Not used by the platform. Its features are ``EntityBook``'s, bit for bit (the
benchmark checks it).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from riskcascade.core.entity_state import (
    ACCOUNT,
    SECONDS_PER_HOUR,
    SUM_WINDOWS,
    LabelEvent,
    StateEvent,
    StateLayout,
    state_feature_names,
)


@dataclass
class PreviousEntityRecord:
    """An entity's state as it was kept: per-event times and value tuples in Python lists."""

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


class PreviousEntityBook:
    """``EntityBook`` as it was: the same features and folds, computed over Python lists."""

    def __init__(self, layout: StateLayout) -> None:
        self.layout = layout
        self.names = state_feature_names(layout)
        self.records: dict[tuple[str, str], PreviousEntityRecord] = {}
        self.events: dict[str, StateEvent] = {}
        self.labelled: dict[str, bool] = {}  # event id -> fraud, for events whose label was folded
        self._windows = [float(w) for w in layout.windows_s]
        self._width = len(layout.aggregated)

    def record(self, link: str, value: str) -> PreviousEntityRecord:
        key = (link, value)
        found = self.records.get(key)
        if found is None:
            found = self.records[key] = PreviousEntityRecord()
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


def _note_fraud_account(rec: PreviousEntityRecord, account: str, known_at: float) -> None:
    if known_at < rec.fraud_accounts.get(account, math.inf):
        rec.fraud_accounts[account] = known_at


def _fraud_accounts(rec: PreviousEntityRecord, t: float, own_account: str) -> float:
    return float(sum(1 for acct, at in rec.fraud_accounts.items() if at <= t and acct != own_account))


def _nansum(values: Iterable[float]) -> float:
    return float(sum(v for v in values if not math.isnan(v)))
