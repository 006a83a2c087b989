"""Feedback reaches what the next decision reads: the entity state (scorer) and the case memory (reasoner).

An adjudicated outcome is persisted first (the servicer), then fanned out from its arrival time: the scorer folds
it into the state of every entity of the decided event (its outcome counts, and for fraud the accounts known for
fraud on its devices, IPs and instruments), and the reasoner adds or updates the case in its memory with the label
time, so the very next decision of that account sees it in its features and in its evidence. Both sides are
idempotent (a label counts once per event; a case is keyed by its id), so a retried feedback is applied again
safely. Plain asyncio: stages are reached through the protocols below.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Protocol

from riskcascade.core.domain import AdjudicatedCase, LabelRecord, Outcome, RiskEvent


class LabelSink(Protocol):
    async def record_labels(self, labels: list[LabelRecord], timeout_s: float) -> int: ...


class CaseSink(Protocol):
    async def add_case(self, case: AdjudicatedCase, timeout_s: float) -> int: ...


def adjudicated_case(event: RiskEvent, outcome: Outcome, risk_type: str, known_at: datetime) -> AdjudicatedCase:
    """The decided event as a case with its outcome, known from ``known_at`` (the reasoner writes its summary)."""
    return AdjudicatedCase(
        case_id=event.request_id,
        event_type=event.event_type,
        features=dict(event.features),
        outcome=outcome,
        risk_type=risk_type if outcome is Outcome.FRAUD else "",
        entities=event.entities,
        occurred_at=event.occurred_at,
        text=dict(event.text),
        label_known_at=known_at,
    )


class FeedbackFanout:
    def __init__(self, labels: LabelSink, cases: CaseSink, timeout_s: float):
        self._labels = labels
        self._cases = cases
        self._timeout_s = timeout_s

    async def apply(self, event: RiskEvent, outcome: Outcome, risk_type: str, known_at: datetime) -> None:
        """Send the outcome to both stages at once; raises the first stage's error (StageError)."""
        label = LabelRecord(event.request_id, outcome is Outcome.FRAUD, known_at)
        await asyncio.gather(
            self._labels.record_labels([label], self._timeout_s),
            self._cases.add_case(adjudicated_case(event, outcome, risk_type, known_at), self._timeout_s),
        )
