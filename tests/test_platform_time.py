"""The running platform's time axis, end to end, on both entity-state backends: live traffic and feedback change
what the next decision knows, and what it computes equals training's replay of the same sequence.

``platform`` (conftest) keeps its state embedded in the scorer (SQLite log); ``redis_platform`` shares a real Redis
server started here, reuses the session platform's model and data, and escalates every event (band [0, 1)) so
the reasoner's evidence can be checked on each decision.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timezone

import numpy as np
import pytest

from loadtest.events import decide_request
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc
from riskcascade.core.entity_state import EntityBook, LabelEvent, StateEvent
from riskcascade.core.features import FeatureLayout
from riskcascade.core.model_registry import live_model_dir
from riskcascade.modelling.synthetic import LabelledEvent, read_events_csv
from tests.conftest import platform_channel, start_platform, stop_platform, write_platform_config
from tests.redis_server import redis_server_binary, running_redis

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def redis_platform(platform, otlp_receiver, tmp_path_factory):
    binary = redis_server_binary()
    workdir = tmp_path_factory.mktemp("redis-platform")
    with running_redis(binary) as url:
        config = write_platform_config(
            workdir, otlp_receiver.endpoint,
            model={"dir": str(platform.workdir / "model")},  # trained once, by the session platform
            data={"dir": str(platform.workdir / "data")},
            state={"backend": "redis", "redis_url": url},
            escalation={"band_low": 0.0, "band_high": 1.0, "min_reasoner_budget_ms": 1000},
        )
        running = start_platform(config, workdir)
        try:
            yield running
        finally:
            if running.process.poll() is None:
                stop_platform(running)


@pytest.fixture(params=["embedded", "redis"])
def target(request):
    """(platform, stub) of one state backend."""
    running = request.getfixturevalue("platform" if request.param == "embedded" else "redis_platform")
    with platform_channel(running) as channel:
        yield running, decision_pb2_grpc.DecisionServiceStub(channel)


@pytest.fixture(scope="module")
def template(platform) -> LabelledEvent:
    """A legitimate order from the held-out data: its features, with fresh entities in each test."""
    events = read_events_csv(platform.workdir / "data" / "test.csv")
    return next(e for e in events if e.label == 0 and e.event_type.value == "order")


def fresh_ip() -> str:
    value = uuid.uuid4().int
    return f"198.18.{value % 256}.{(value >> 8) % 256}"  # the benchmarking range: never in the generated data


def request_for(template: LabelledEvent, account: str, device: str, ip: str, at: datetime) -> pb.DecideRequest:
    request = decide_request(template, f"t-{uuid.uuid4().hex[:16]}")
    request.event.entities.account_id = account
    request.event.entities.device_id = device
    request.event.entities.ip = ip
    request.event.entities.payment_instrument_id = ""
    request.event.occurred_at.FromDatetime(at)
    return request


def now() -> datetime:
    return datetime.now(timezone.utc)


def test_a_burst_from_one_device_raises_the_next_events_velocity_and_score(target, template):
    _, stub = target
    tag = uuid.uuid4().hex[:10]
    device, ip = f"dev-burst-{tag}", fresh_ip()
    before = stub.Decide(request_for(template, f"acct-a-{tag}", device, ip, now()), timeout=20).decision
    assert before.state_features.get("device_id.n_1h", 0) == 0
    for k in range(30):  # thirty new accounts on one device within a minute: a farm warming up
        stub.Decide(request_for(template, f"acct-b{k}-{tag}", device, ip, now()), timeout=20)
    after = stub.Decide(request_for(template, f"acct-c-{tag}", device, ip, now()), timeout=20).decision
    assert after.state_features["device_id.n_1h"] == 31
    assert after.state_features["device_id.distinct.account_id"] == 31
    assert after.state_features["ip.n_1h"] == 31
    assert after.fast_score > before.fast_score


def test_feedback_is_seen_by_the_next_decision_of_the_account(target, template):
    running, stub = target
    tag = uuid.uuid4().hex[:10]
    account, device, ip = f"acct-fb-{tag}", f"dev-fb-{tag}", fresh_ip()
    first = request_for(template, account, device, ip, now())
    decided = stub.Decide(first, timeout=20).decision
    unlabelled = stub.Decide(request_for(template, account, device, ip, now()), timeout=20).decision
    assert unlabelled.state_features["account_id.fraud_known"] == 0
    stub.SubmitFeedback(pb.SubmitFeedbackRequest(
        feedback_id=f"fb-{tag}", request_id=first.request_id, outcome=pb.OUTCOME_FRAUD, risk_type="account_takeover",
    ), timeout=20)
    after = stub.Decide(request_for(template, account, device, ip, now()), timeout=20).decision
    assert after.state_features["account_id.fraud_known"] == 1
    assert after.fast_score > unlabelled.fast_score
    # another account on the same device now has a neighbour known for fraud (a 2-hop aggregate)
    neighbour = stub.Decide(request_for(template, f"acct-nb-{tag}", device, ip, now()), timeout=20).decision
    assert neighbour.state_features["device_id.fraud_accounts"] == 1
    assert decided.request_id == first.request_id
    if running.state["band"] == [0.0, 1.0]:  # every event escalated: the reasoner cites the labelled case
        cited = {e.id: e for e in after.evidence}
        assert f"history:{first.request_id}" in cited
        assert cited[f"history:{first.request_id}"].outcome == pb.OUTCOME_FRAUD
        assert all(e.id != f"history:{first.request_id}" for e in unlabelled.evidence)  # not known before


def test_the_platform_computes_what_training_replays(target, template):
    """Replay parity through the running platform: decisions' entity features == training's replay of the same
    events and label arrivals (fresh entities, so other tests' traffic cannot touch them)."""
    running, stub = target
    layout = FeatureLayout.load(live_model_dir(_model_dir(running))).state
    tag = uuid.uuid4().hex[:10]
    accounts = [f"acct-p{k}-{tag}" for k in range(3)]
    devices, ips = [f"dev-p{k}-{tag}" for k in range(2)], [fresh_ip(), fresh_ip()]
    rng = np.random.default_rng(7)
    sent: list[tuple[StateEvent, dict[str, float]]] = []
    labels: list[LabelEvent] = []
    for k in range(24):
        account, device, ip = accounts[rng.integers(3)], devices[rng.integers(2)], ips[rng.integers(2)]
        at = now()
        request = request_for(template, account, device, ip, at)
        decision = stub.Decide(request, timeout=20).decision
        values = tuple(float(request.event.features.get(a, math.nan)) for a in layout.aggregated)
        event = StateEvent(request.request_id, at.timestamp(),
                           {"account_id": account, "device_id": device, "ip": ip, "seller_id": template.entities.seller_id},
                           values)
        sent.append((event, dict(decision.state_features)))
        if k % 5 == 2:  # feedback on this event, fraud every other time
            answer = stub.SubmitFeedback(pb.SubmitFeedbackRequest(
                feedback_id=f"fb-{k}-{tag}", request_id=request.request_id,
                outcome=pb.OUTCOME_FRAUD if k % 2 else pb.OUTCOME_LEGITIMATE,
            ), timeout=20)
            labels.append(LabelEvent(request.request_id, bool(k % 2), answer.recorded_at.ToDatetime(
                tzinfo=timezone.utc).timestamp()))
    book = EntityBook(layout)
    pending = sorted(labels, key=lambda label: label.known_at)
    checked = 0
    for event, served in sent:
        while pending and pending[0].known_at <= event.time:
            book.fold_label(pending.pop(0))
        expected = dict(zip(book.names, book.features(event)))
        book.fold_event(event)
        for name, value in served.items():
            if name.startswith("payment_instrument_id") or name.startswith("seller_id"):
                continue  # the seller is shared with the data set's history, the instrument absent
            assert value == pytest.approx(float(np.float32(expected[name])), rel=0, abs=0), name
            checked += 1
    assert checked > 24 * 8


def _model_dir(running):
    import yaml

    return yaml.safe_load(running.config_path.read_text())["model"]["dir"]
