"""Feedback is persisted, then applied to the entity state and the case memory from its arrival time; a stage
that cannot take it makes the call UNAVAILABLE, and a retry with the same feedback_id applies it again."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import grpc
import pytest

from orchestrator.cascade import StageError
from orchestrator.feedback import FeedbackFanout
from orchestrator.servicer import DecisionServicer
from orchestrator.store import DecisionRecord, PostgresDecisionStore, SQLiteDecisionStore
from risk.v1 import decision_pb2 as pb
from riskcascade.core.config import ServerSettings
from riskcascade.core.domain import AdjudicatedCase, LabelRecord, Outcome
from tests.postgres_server import postgres_server, postgres_url  # noqa: F401 - fixtures


class Aborted(Exception):
    def __init__(self, status):
        super().__init__(status.details)
        self.status = status


class Context:
    async def abort_with_status(self, status):
        raise Aborted(status)


class Stage:
    """A stage that is down until told otherwise (as a killed replica is), and remembers what it was sent."""

    def __init__(self) -> None:
        self.down = False
        self.labels: list[LabelRecord] = []
        self.cases: list[AdjudicatedCase] = []

    async def record_labels(self, labels, timeout_s):
        if self.down:
            raise StageError("entity state: replica unavailable")
        self.labels += labels
        return len(labels)

    async def add_case(self, case, timeout_s):
        self.cases.append(case)
        return 1


def decided_event() -> pb.Event:
    event = pb.Event(type=pb.EVENT_TYPE_ORDER, features={"amount": 90.0},
                     entities=pb.Entities(account_id="acct-1", device_id="dev-1", ip="203.0.113.9"))
    event.occurred_at.FromDatetime(datetime(2026, 11, 30, 9, 0, tzinfo=timezone.utc))
    return event


@pytest.fixture(params=["sqlite", "postgres"])
def setup(request, tmp_path):
    """A servicer on a store of each backend (embedded SQLite, a real PostgreSQL) holding one decision."""
    if request.param == "sqlite":
        store = SQLiteDecisionStore(tmp_path / "d.sqlite")
    else:
        store = PostgresDecisionStore(request.getfixturevalue("postgres_url"))
    stage = Stage()
    servicer = DecisionServicer(None, store, ["amount"], ServerSettings(), pb.ServiceInfo(),
                                FeedbackFanout(stage, stage, timeout_s=1.0))
    record = DecisionRecord("order-1", "fp", "approve", 0.1, "fast_model", "order", False,
                            "2026-11-30T09:00:01+00:00", b"", decided_event().SerializeToString())
    asyncio.run(store.put_decision(record))
    yield servicer, stage
    store.close()


def submit(servicer, feedback_id="fb-1"):
    request = pb.SubmitFeedbackRequest(feedback_id=feedback_id, request_id="order-1", outcome=pb.OUTCOME_FRAUD,
                                       risk_type="account_takeover")
    return asyncio.run(servicer.SubmitFeedback(request, Context()))


def test_feedback_reaches_the_state_and_the_case_memory_from_its_arrival(setup):
    servicer, stage = setup
    answer = submit(servicer)
    arrived = answer.recorded_at.ToDatetime(tzinfo=timezone.utc)
    assert stage.labels == [LabelRecord("order-1", True, arrived)]
    case = stage.cases[0]
    assert (case.case_id, case.outcome, case.risk_type, case.label_known_at) == (
        "order-1", Outcome.FRAUD, "account_takeover", arrived)
    assert case.entities.device_id == "dev-1" and case.features == {"amount": 90.0}
    assert case.occurred_at == datetime(2026, 11, 30, 9, 0, tzinfo=timezone.utc)


def test_a_stage_that_cannot_take_it_makes_the_call_unavailable_and_a_retry_applies_it(setup):
    servicer, stage = setup
    stage.down = True
    with pytest.raises(Aborted) as failed:
        submit(servicer)
    assert failed.value.status.code == grpc.StatusCode.UNAVAILABLE
    assert "recorded but not yet applied" in failed.value.status.details
    assert not stage.labels
    stage.down = False
    retried = submit(servicer)  # the same feedback_id: stored already, applied now
    assert retried.duplicate
    assert [label.request_id for label in stage.labels] == ["order-1"]
