"""The decision path under faults, at the gateway: a real grpc.aio server, the real servicer, cascade, store and
circuit breakers, with scripted in-process stages standing in for the Ray replicas (their failures are what is
scripted: a stage that hangs, fails, or answers late). The whole platform with real replicas killed mid-load is
tests/test_faults.py.

Covers issue 13's findings 1-4 and 6: cancelled calls never poison duplicates, degraded answers are decided again,
the fast model always gets its time, a dead stage fails fast behind its breaker and health says so, one batch
cannot take the whole escalation budget, load is shed with a retry hint, and a stalled or failing store never
blocks the event loop or kills its writer.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from orchestrator.breaker import CircuitBreaker, CircuitState
from orchestrator.cascade import Cascade, StageError, StageLimits
from orchestrator.errors import RETRY_AFTER_KEY
from orchestrator.health import SERVICE_NAME, StageHealth
from orchestrator.models import ModelSelection, ServingModel
from orchestrator.servicer import DecisionServicer
from orchestrator.store import DecisionStore, PostgresDecisionStore, SQLiteDecisionStore
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc as pb_grpc
from riskcascade.core.config import MergeSettings, ServerSettings
from riskcascade.core.domain import Action, EventType, FastScore, ReasonerVerdict, ScorerInfo
from riskcascade.core.merge import MergeRules
from riskcascade.core.policy import EscalationPolicy
from tests.postgres_server import postgres_server, postgres_url  # noqa: F401 - fixtures

# Generous on a loaded 2-core machine: scripted stages answer in microseconds, so every bound below is >10x what
# the path needs; the assertions that matter are about order and outcome, not speed.
PATIENCE_S = 10.0
FEATURES = ("score",)
BAND = (0.2, 0.8)


class ScriptedScorer:
    """Scores from the event's own ``score`` feature; a request id in ``hang`` waits until released (or its
    timeout), ``dead`` makes every call wait out its timeout like a killed replica behind a Serve handle."""

    def __init__(self) -> None:
        self.hang: dict[str, asyncio.Event] = {}
        self.dead = False
        self.calls = 0
        self.timeouts: list[float] = []

    async def score(self, request, timeout_s: float) -> FastScore:  # noqa: ANN001
        self.calls += 1
        self.timeouts.append(timeout_s)
        gate = self.hang.get(request.request_id)
        try:
            if self.dead:
                await asyncio.sleep(timeout_s)
                raise asyncio.TimeoutError
            if gate is not None:
                await asyncio.wait_for(gate.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise StageError(f"fast model: no answer within {timeout_s * 1000:.0f} ms") from None
        return FastScore(request.features["score"], request.features["score"], (), "m-1", "CPU")

    async def ping(self, timeout_s: float) -> bool:
        if self.dead:
            await asyncio.sleep(timeout_s)
        return True


class ScriptedReasoner:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    async def reason(self, request, timeout_s: float) -> ReasonerVerdict:  # noqa: ANN001
        self.calls += 1
        try:
            await asyncio.wait_for(asyncio.sleep(self.delay_s), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise StageError(f"reasoner: no answer within {timeout_s * 1000:.0f} ms") from None
        return ReasonerVerdict(Action.BLOCK, 0.9, 0.9, "scripted", (), (), (), "r-1", "scripted")


class Gateway:
    """A started server around one servicer; ``stub`` talks to it over a real channel."""

    def __init__(self, tmp_path, scorer=None, reasoner=None, server=None, store=None, limits=None,  # noqa: ANN001
                 max_per_call=8, max_in_flight=32, min_reasoner_ms=0.0, failures=3, open_s=60.0):
        self.scorer = scorer or ScriptedScorer()
        self.reasoner = reasoner or ScriptedReasoner()
        self.health = StageHealth()
        self.breakers = {
            name: CircuitBreaker(name, failures, open_s, on_change=self.health.changed)
            for name in ("fast_model", "reasoner")
        }
        self.cascade = Cascade(
            self.scorer, self.reasoner,
            ModelSelection(ServingModel(
                ScorerInfo("m-1", tuple(FEATURES), *BAND, "CPUExecutionProvider", "scripted"),
                EscalationPolicy(*BAND, min_reasoner_budget_ms=min_reasoner_ms, max_in_flight=max_in_flight),
            )),
            MergeRules.from_settings(MergeSettings()),
            "p-1",
            reserve_ms=20.0,
            limits=limits or StageLimits({t: 0.1 for t in EventType}, 1.0),
            scorer_breaker=self.breakers["fast_model"],
            reasoner_breaker=self.breakers["reasoner"],
            max_escalations_per_call=max_per_call,
        )
        self.store = store or SQLiteDecisionStore(tmp_path / "decisions.sqlite", synchronous="NORMAL")
        self.settings = server or ServerSettings()
        self.servicer = DecisionServicer(
            self.cascade, self.store, FEATURES, self.settings, pb.ServiceInfo(model_version="m-1")
        )

    async def __aenter__(self) -> "Gateway":
        self.server = grpc.aio.server()
        pb_grpc.add_DecisionServiceServicer_to_server(self.servicer, self.server)
        self.health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.health.attach(self.health_servicer, self.breakers)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        # connected before the first call: a call with a deadline of a few ms must reach the server, not spend it
        # on the connection (it then expires in the client and nothing is decided)
        await asyncio.wait_for(self.channel.channel_ready(), PATIENCE_S)
        self.stub = pb_grpc.DecisionServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(0)
        await self.health.stop()
        self.store.close()

    async def health_status(self, service: str = SERVICE_NAME) -> int:
        reply = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=PATIENCE_S)
        return reply.status


def request(request_id: str, score: float, event_type: int = pb.EVENT_TYPE_ORDER) -> pb.DecideRequest:
    return pb.DecideRequest(request_id=request_id, event=pb.Event(
        type=event_type, entities=pb.Entities(account_id="acct-1"), features={"score": score},
    ))


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, timeout=PATIENCE_S * 6))


# -- 1. a cancelled call never poisons its duplicates -------------------------------------------------------------

def test_a_cancelled_call_leaves_its_duplicate_and_batch_decided(tmp_path):
    async def scenario():
        async with Gateway(tmp_path) as gw:
            gate = gw.scorer.hang["dup-1"] = asyncio.Event()
            first = gw.stub.Decide(request("dup-1", 0.95))
            await _until(lambda: gw.scorer.calls >= 1)
            duplicate = gw.stub.Decide(request("dup-1", 0.95), timeout=PATIENCE_S)
            batch = gw.stub.DecideBatch(pb.DecideBatchRequest(
                requests=[request("dup-1", 0.95), request("other-1", 0.05)]), timeout=PATIENCE_S)
            await asyncio.sleep(0.05)
            first.cancel()  # the client gives up on the first call while it is being decided
            await asyncio.sleep(0.05)
            gate.set()
            answer = await duplicate
            batched = await batch
            return answer.decision, batched.results, gw.scorer.calls

    decision, results, calls = run(scenario())
    assert decision.action == pb.ACTION_BLOCK and not decision.degraded
    assert [r.decision.action for r in results] == [pb.ACTION_BLOCK, pb.ACTION_APPROVE]
    assert results[0].decision.request_id == "dup-1"
    assert calls == 2  # dup-1 was decided once (its duplicates waited for it), other-1 once


def test_the_decision_of_a_cancelled_call_is_stored_and_replayed_on_retry(tmp_path):
    async def scenario():
        async with Gateway(tmp_path) as gw:
            gate = gw.scorer.hang["gone-1"] = asyncio.Event()
            call = gw.stub.Decide(request("gone-1", 0.95))
            await _until(lambda: gw.scorer.calls >= 1)
            call.cancel()
            await asyncio.sleep(0.1)  # the cancellation reaches the server before the stage answers
            gate.set()
            await _until(lambda: gw.store.get_decision("gone-1") is not None)
            retry = await gw.stub.Decide(request("gone-1", 0.95), timeout=PATIENCE_S)
            return retry.decision, gw.scorer.calls

    decision, calls = run(scenario())
    assert decision.replayed and decision.action == pb.ACTION_BLOCK and calls == 1


# -- 2. a degraded answer is decided again ------------------------------------------------------------------------

def test_a_degraded_decision_is_decided_again_on_retry(tmp_path):
    async def scenario():
        async with Gateway(tmp_path, failures=100) as gw:
            gw.scorer.dead = True
            first = await gw.stub.Decide(request("again-1", 0.95), timeout=PATIENCE_S)
            gw.scorer.dead = False
            retry = await gw.stub.Decide(request("again-1", 0.95), timeout=PATIENCE_S)
            again = await gw.stub.Decide(request("again-1", 0.95), timeout=PATIENCE_S)
            stored = gw.store.get_decision("again-1")
            return first.decision, retry.decision, again.decision, stored

    first, retry, again, stored = run(scenario())
    assert first.degraded and first.action == pb.ACTION_REVIEW and first.attempt == 1  # orders fail closed
    assert not retry.degraded and retry.action == pb.ACTION_BLOCK and not retry.replayed and retry.attempt == 2
    assert again.replayed and again.action == pb.ACTION_BLOCK and again.attempt == 2
    assert not stored.degraded and stored.action == "block" and stored.attempts == 2


def test_a_duplicate_with_more_time_does_not_inherit_a_short_calls_degraded_answer(tmp_path):
    async def scenario():
        # the reasoner needs 300 ms; the first call's deadline leaves it too little, the duplicate's enough
        async with Gateway(tmp_path, reasoner=ScriptedReasoner(delay_s=0.3), failures=100) as gw:
            short = gw.stub.Decide(request("mid-1", 0.5), timeout=0.25)
            await _until(lambda: gw.scorer.calls >= 1)
            long = gw.stub.Decide(request("mid-1", 0.5), timeout=PATIENCE_S)
            try:  # its reasoner call runs out of time: a degraded REVIEW, stored but not final
                short_answer = (await short).decision
            except grpc.aio.AioRpcError as err:  # or, on a slow machine, the deadline passes first
                assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                short_answer = None
            answer = await long
            return short_answer, answer.decision

    short, decision = run(scenario())
    assert short is None or (short.degraded and short.action == pb.ACTION_REVIEW)
    assert not decision.degraded and decision.decided_by == pb.STAGE_REASONER and decision.action == pb.ACTION_BLOCK


# -- 3. the fast model always gets its time -----------------------------------------------------------------------

def test_a_short_deadline_still_asks_the_fast_model(tmp_path):
    async def scenario():
        async with Gateway(tmp_path, limits=StageLimits({t: 0.1 for t in EventType}, 1.0)) as gw:
            answers = []
            for i, timeout in enumerate((0.005, 0.02, 0.05)):
                try:
                    answers.append((await gw.stub.Decide(request(f"short-{i}", 0.998), timeout=timeout)).decision)
                except grpc.aio.AioRpcError as err:  # the answer may arrive after so short a deadline: retry
                    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                    await _until(lambda i=i: gw.store.get_decision(f"short-{i}") is not None)
                    answers.append((await gw.stub.Decide(request(f"short-{i}", 0.998), timeout=PATIENCE_S)).decision)
            return answers, list(gw.scorer.timeouts)

    answers, timeouts = run(scenario())
    assert [a.action for a in answers] == [pb.ACTION_BLOCK] * 3
    assert not any(a.degraded for a in answers)
    assert min(timeouts) >= 0.1 - 1e-9  # never less than the event type's minimum, whatever the deadline


# -- 4. a dead stage fails fast, health says so, budgets are shared fairly ----------------------------------------

def test_a_dead_fast_model_opens_its_circuit_fails_fast_and_turns_health_not_serving(tmp_path):
    async def scenario():
        limits = StageLimits({t: 0.05 for t in EventType}, 0.2)
        async with Gateway(tmp_path, limits=limits, failures=3, open_s=60.0) as gw:
            assert await gw.health_status() == health_pb2.HealthCheckResponse.SERVING
            gw.scorer.dead = True
            for i in range(3):  # each waits out the scorer's cap (0.2 s), not the 2 s deadline
                await gw.stub.Decide(request(f"dead-{i}", 0.95), timeout=PATIENCE_S)
            assert gw.breakers["fast_model"].state is CircuitState.OPEN
            calls_before = gw.scorer.calls
            started = time.monotonic()
            fast_fail = await gw.stub.Decide(request("dead-x", 0.95, pb.EVENT_TYPE_PAYOUT), timeout=PATIENCE_S)
            elapsed = time.monotonic() - started
            login = await gw.stub.Decide(request("dead-login", 0.95, pb.EVENT_TYPE_LOGIN), timeout=PATIENCE_S)
            await _until_async(lambda: gw.health_status(), health_pb2.HealthCheckResponse.NOT_SERVING)
            stage = await gw.health_status("riskcascade.stage.fast_model")
            alive = await gw.health_status("riskcascade.process")  # what a liveness probe asks
            return fast_fail.decision, login.decision, elapsed, gw.scorer.calls - calls_before, stage, alive

    decision, login, elapsed, new_calls, stage, alive = run(scenario())
    assert new_calls == 0  # the open circuit refused the calls without touching the stage
    assert decision.degraded and decision.action == pb.ACTION_REVIEW and "circuit open" in decision.degraded_reason
    assert login.degraded and login.action == pb.ACTION_APPROVE  # logins fail open by the configured policy
    assert elapsed < 0.2  # refused without waiting the scorer's cap (measured: ~2 ms)
    assert stage == health_pb2.HealthCheckResponse.NOT_SERVING
    assert alive == health_pb2.HealthCheckResponse.SERVING  # a stage outage is no reason to restart the process


def test_an_open_circuit_recovers_through_a_probe(tmp_path):
    async def scenario():
        limits = StageLimits({t: 0.05 for t in EventType}, 0.1)
        async with Gateway(tmp_path, limits=limits, failures=2, open_s=0.2) as gw:
            gw.scorer.dead = True
            for i in range(2):
                await gw.stub.Decide(request(f"rec-{i}", 0.95), timeout=PATIENCE_S)
            assert gw.breakers["fast_model"].state is CircuitState.OPEN
            gw.scorer.dead = False
            await asyncio.sleep(0.25)  # past open_s: the next call is the half-open probe
            answer = await gw.stub.Decide(request("rec-after", 0.95), timeout=PATIENCE_S)
            await _until_async(lambda: gw.health_status(), health_pb2.HealthCheckResponse.SERVING)
            return answer.decision, gw.breakers["fast_model"].state

    decision, state = run(scenario())
    assert not decision.degraded and decision.action == pb.ACTION_BLOCK and state is CircuitState.CLOSED


def test_one_batch_cannot_take_the_whole_escalation_budget(tmp_path):
    async def scenario():
        async with Gateway(tmp_path, reasoner=ScriptedReasoner(delay_s=0.2), max_per_call=4, max_in_flight=8) as gw:
            batch = gw.stub.DecideBatch(pb.DecideBatchRequest(
                requests=[request(f"b-{i}", 0.5) for i in range(32)]), timeout=PATIENCE_S)
            await _until(lambda: gw.reasoner.calls >= 4)
            lone = await gw.stub.Decide(request("lone-1", 0.5), timeout=PATIENCE_S)
            return (await batch).results, lone.decision

    results, lone = run(scenario())
    escalated = [r.decision for r in results if r.decision.escalated and not r.decision.degraded]
    held = [r.decision for r in results if r.decision.degraded]
    assert len(escalated) == 4 and len(held) == 28
    assert all("max_per_call" in d.degraded_reason for d in held)
    assert all(d.action == pb.ACTION_REVIEW for d in held)  # held, never fail-open
    assert lone.escalated and not lone.degraded  # another caller still got the reasoner


# -- 6. backpressure, and a store that stalls or fails ------------------------------------------------------------

def test_past_the_concurrency_limit_calls_are_shed_with_a_retry_hint(tmp_path):
    async def scenario():
        settings = ServerSettings(max_in_flight_decisions=2, shed_retry_after_ms=150)
        async with Gateway(tmp_path, server=settings) as gw:
            gates = [gw.scorer.hang.setdefault(f"busy-{i}", asyncio.Event()) for i in range(2)]
            busy = [gw.stub.Decide(request(f"busy-{i}", 0.95), timeout=PATIENCE_S) for i in range(2)]
            await _until(lambda: gw.servicer.active_decisions == 2)
            with pytest.raises(grpc.aio.AioRpcError) as shed:
                await gw.stub.Decide(request("shed-1", 0.95), timeout=PATIENCE_S)
            for gate in gates:
                gate.set()
            done = [(await b).decision.action for b in busy]
            after = await gw.stub.Decide(request("shed-1", 0.95), timeout=PATIENCE_S)
            return shed.value, done, after.decision

    err, done, after = run(scenario())
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.trailing_metadata())[RETRY_AFTER_KEY] == "150"
    assert done == [pb.ACTION_BLOCK] * 2 and after.action == pb.ACTION_BLOCK


def test_a_stalled_store_read_leaves_health_and_other_calls_answering(tmp_path, monkeypatch):
    release = threading.Event()
    original = DecisionStore._pooled_reads

    def stalled_read(self, request_ids):  # noqa: ANN001, ANN202 - a disk that stops answering
        if any(request_id.startswith("stall") for request_id in request_ids):
            release.wait(PATIENCE_S)
        return original(self, request_ids)

    monkeypatch.setattr(DecisionStore, "_pooled_reads", stalled_read)
    monkeypatch.setattr(DecisionStore, "get_decision", lambda self, rid: stalled_read(self, [rid])[0])

    async def scenario():
        async with Gateway(tmp_path) as gw:
            stuck = gw.stub.GetDecision(pb.GetDecisionRequest(request_id="stall-1"), timeout=PATIENCE_S)
            await asyncio.sleep(0.1)
            started = time.monotonic()
            status = await gw.health_status()
            info = await gw.stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=PATIENCE_S)
            other = await gw.stub.Decide(request("fine-1", 0.05), timeout=PATIENCE_S)
            answered_in = time.monotonic() - started
            release.set()
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stuck
            return status, info.model_version, other.decision.action, answered_in, missing.value.code()

    try:
        status, version, action, answered_in, code = run(scenario())
    finally:
        release.set()
    assert status == health_pb2.HealthCheckResponse.SERVING and version == "m-1" and action == pb.ACTION_APPROVE
    assert answered_in < PATIENCE_S / 2  # answered while the read was still stuck (measured: ~10 ms)
    assert code is grpc.StatusCode.NOT_FOUND


def test_the_store_writer_survives_a_failing_batch(tmp_path, monkeypatch):
    original = DecisionStore._apply
    failed = []

    def flaky(self, conn, kind, record):  # noqa: ANN001, ANN202
        if record.request_id == "poison-1" and not failed:
            failed.append(record.request_id)
            raise RuntimeError("disk controller said no")
        return original(self, conn, kind, record)

    monkeypatch.setattr(DecisionStore, "_apply", flaky)

    async def scenario():
        async with Gateway(tmp_path) as gw:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gw.stub.Decide(request("poison-1", 0.95), timeout=PATIENCE_S)
            later = await gw.stub.Decide(request("later-1", 0.95), timeout=PATIENCE_S)
            retry = await gw.stub.Decide(request("poison-1", 0.95), timeout=PATIENCE_S)
            return err.value.code(), later.decision.action, retry.decision.action

    code, later, retry = run(scenario())
    assert code is grpc.StatusCode.UNAVAILABLE  # not acknowledged, because not stored
    assert later == pb.ACTION_BLOCK and retry == pb.ACTION_BLOCK


def test_a_full_write_queue_refuses_at_once(tmp_path):
    async def scenario():
        store = SQLiteDecisionStore(tmp_path / "d.sqlite", synchronous="NORMAL", max_pending_writes=1)
        block = threading.Event()
        original_commit = store._commit
        store._commit = lambda conn, batch: (block.wait(PATIENCE_S), original_commit(conn, batch))[1]
        async with Gateway(tmp_path, store=store) as gw:
            first = gw.stub.Decide(request("q-1", 0.95), timeout=PATIENCE_S)  # taken by the (stuck) writer
            await asyncio.sleep(0.2)
            second = gw.stub.Decide(request("q-2", 0.95), timeout=PATIENCE_S)  # fills the queue
            await asyncio.sleep(0.2)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await gw.stub.Decide(request("q-3", 0.95), timeout=PATIENCE_S)
            waited = time.monotonic() - started
            block.set()
            return refused.value, waited, (await first).decision.action, (await second).decision.action

    err, waited, first, second = run(scenario())
    assert err.code() is grpc.StatusCode.UNAVAILABLE and "max_pending_writes" in err.details()
    assert waited < PATIENCE_S / 2
    assert first == second == pb.ACTION_BLOCK


def test_breaker_states_follow_failures_probes_and_time():
    now = [0.0]
    seen = []
    breaker = CircuitBreaker("s", 2, 5.0, clock=lambda: now[0], on_change=lambda n, s: seen.append(s))
    permit = breaker.allow()
    breaker.failure("a", permit)
    assert breaker.state is CircuitState.CLOSED
    breaker.failure("b", breaker.allow())
    assert breaker.state is CircuitState.OPEN and breaker.allow() is None and breaker.retry_in_s() == 5.0
    now[0] = 5.0
    probe = breaker.allow()
    assert probe is not None and probe.probe and breaker.allow() is None  # one probe at a time
    breaker.failure("c", probe)
    assert breaker.state is CircuitState.OPEN
    now[0] = 10.0
    breaker.success(breaker.allow())
    assert breaker.state is CircuitState.CLOSED
    assert seen == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.OPEN, CircuitState.HALF_OPEN,
                    CircuitState.CLOSED]


async def _until(predicate, timeout_s: float = PATIENCE_S) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def _until_async(probe, expected, timeout_s: float = PATIENCE_S) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while (await probe()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"never became {expected}")
        await asyncio.sleep(0.01)


# -- several orchestrators on one database --------------------------------------------------------------------------


def test_two_gateways_on_one_postgres_database_answer_each_duplicate_with_one_decision(tmp_path, postgres_url):  # noqa: F811, E501
    """Two orchestrators (servicers with their own cascades, in-flight maps and stores) on one PostgreSQL database:
    the same 60 requests sent to both at once, with scores in the band (escalated, so both are still deciding when
    the other's answer lands) are each stored once, and both callers of a request get that stored decision."""
    ids = [f"both-{i}" for i in range(60)]
    slow = ScriptedReasoner(delay_s=0.05)

    async def scenario():
        a_dir, b_dir = tmp_path / "a", tmp_path / "b"
        a_dir.mkdir()
        b_dir.mkdir()
        # room for every escalation: a degraded answer ("reasoner busy") is provisional and may be decided again
        room = {"max_in_flight": len(ids), "max_per_call": 1}
        async with Gateway(a_dir, reasoner=slow, store=PostgresDecisionStore(postgres_url), **room) as a, \
                Gateway(b_dir, reasoner=ScriptedReasoner(delay_s=0.05), store=PostgresDecisionStore(postgres_url),
                        **room) as b:
            answers = await asyncio.gather(*(
                gw.stub.Decide(request(rid, 0.5), timeout=PATIENCE_S) for rid in ids for gw in (a, b)))
            return answers, a.store.count_decisions(), await a.store.aget_decisions(ids)

    answers, count, stored = run(scenario())
    assert count == len(ids)
    for i, (rid, row) in enumerate(zip(ids, stored)):
        first, second = answers[2 * i].decision, answers[2 * i + 1].decision
        assert first.request_id == second.request_id == rid and not first.degraded and first.escalated
        # both callers were answered with the one stored decision; at most one of them decided it unreplayed
        assert (first.action, first.risk_score, first.decided_at) == (second.action, second.risk_score,
                                                                      second.decided_at), rid
        assert pb.Decision.FromString(row.payload).decided_at == first.decided_at, rid
        assert not (not first.replayed and not second.replayed), rid
