"""Replaying a data set through the entity state: time-true training features, and the state a platform starts with.

Training does not compute features over the whole table: it walks the data set's timeline (each event at its
time, each label at its arrival time) through the same ``EntityBook`` the scorer serves from, and takes each event's
features as the state stood just before it. So a feature never sees a later row, a label counts only once it has
arrived, and the vectors a model learns from are those the platform computes live for the same sequence.

On the timeline, labels that arrive at an instant come before events at that instant (``known_at <= t`` counts),
events at one instant go in row order, and an event is folded in after its own features are taken.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from riskcascade.core.entity_state import EntityBook, EntityState, LabelEvent, StateEvent, StateLayout


@dataclass(frozen=True)
class Timeline:
    """A data set's events and label arrivals, as plain arrays (row order is the data set's)."""

    ids: np.ndarray  # str [N]
    times: np.ndarray  # float64 [N], seconds since the epoch
    entities: Mapping[str, np.ndarray]  # link -> object [N] of str, "" = none
    values: np.ndarray  # float64 [N, len(aggregated)]
    labels: np.ndarray  # int [N]: 1 fraud, 0 legitimate, -1 no label
    label_times: np.ndarray  # float64 [N], NaN where no label

    def event(self, i: int, links: Sequence[str]) -> StateEvent:
        return StateEvent(
            event_id=str(self.ids[i]),
            time=float(self.times[i]),
            entities={link: str(self.entities[link][i]) for link in links if self.entities[link][i]},
            values=tuple(float(v) for v in self.values[i]),
        )

    def ordered(self, until: float = math.inf) -> Iterator[tuple[str, int]]:
        """("label", row) and ("event", row) in timeline order; labels arriving after ``until`` are left out."""
        events = np.lexsort((np.arange(len(self.times)), self.times))
        labelled = np.flatnonzero((self.labels >= 0) & ~np.isnan(self.label_times))
        labelled = labelled[np.lexsort((labelled, self.label_times[labelled]))]
        j = 0
        for i in events:
            t = self.times[i]
            while j < len(labelled) and self.label_times[labelled[j]] <= t:
                yield "label", int(labelled[j])
                j += 1
            yield "event", int(i)
        for row in labelled[j:]:
            if self.label_times[row] <= until:
                yield "label", int(row)

    def label(self, i: int) -> LabelEvent:
        return LabelEvent(str(self.ids[i]), bool(self.labels[i] == 1), float(self.label_times[i]))


def replay_features(layout: StateLayout, timeline: Timeline) -> np.ndarray:
    """Each row's state features as of its time: ``[N, len(layout.names)]`` in the data set's row order."""
    book = EntityBook(layout)
    out = np.empty((len(timeline.ids), len(book.names)))
    for kind, i in timeline.ordered(until=-math.inf):
        if kind == "label":
            book.fold_label(timeline.label(i))
        else:
            event = timeline.event(i, layout.links)
            out[i] = book.features(event)
            book.fold_event(event)
    return out


def seed_state(state: EntityState, timeline: Timeline, batch: int = 512) -> tuple[int, int]:
    """Fold every event and every label of ``timeline`` into ``state`` in timeline order (labels arriving after
    the last event at the end): the history a platform starts from. Consecutive items of one kind go in batches of
    at most ``batch``. Returns (events, labels) folded."""
    links = state.layout.links
    n_events = n_labels = 0
    run_kind, run = "", []  # type: ignore[var-annotated]

    def flush() -> None:
        nonlocal n_events, n_labels, run
        if run_kind == "event":
            state.step(run)
            n_events += len(run)
        elif run:
            n_labels += state.apply_labels(run)
        run = []

    for kind, i in timeline.ordered():
        if kind != run_kind or len(run) >= batch:
            flush()
            run_kind = kind
        run.append(timeline.event(i, links) if kind == "event" else timeline.label(i))
    flush()
    return n_events, n_labels
