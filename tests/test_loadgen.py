"""The load generator against a tiny in-process DecisionService (canned decisions), and its parts alone.

The fake server's answers are steered by each event's features: ``delay_ms`` (sleep first), ``fail`` (a status
code: the call fails with it, or the item in a batch/stream gets it as an item error) and ``escalate``/``degrade``.
No test asserts a timing figure; the open-loop test asserts that a wait the client imposed is in the latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from loadtest.loadgen import (
    LoadResult,
    LoadRun,
    LoadSpec,
    arrival_gaps,
    connection,
    latency_figures,
    per_second,
    run_load,
)
from loadtest.machine import ProcessGroups, cpu_usage
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc as pb_grpc
from riskcascade.core.config import SecuritySettings

REPO = Path(__file__).resolve().parent.parent
CODES = {code.value[0]: code for code in grpc.StatusCode}


def event(delay_ms: float = 0, fail: int = 0, escalate: bool = False, degrade: bool = False) -> pb.DecideRequest:
    features = {"delay_ms": delay_ms, "fail": fail, "escalate": float(escalate), "degrade": float(degrade)}
    return pb.DecideRequest(request_id="template", event=pb.Event(
        type=pb.EVENT_TYPE_ORDER, entities=pb.Entities(account_id="a1"), features=features))


class FakeDecisions(pb_grpc.DecisionServiceServicer):
    """Decide, DecideBatch and DecideStream with canned decisions (DecideStream can be left unimplemented)."""

    def __init__(self) -> None:
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.max_stream_in_flight = 0

    @staticmethod
    def decision(request: pb.DecideRequest) -> pb.Decision:
        f = request.event.features
        return pb.Decision(
            request_id=request.request_id, action=pb.ACTION_APPROVE, escalated=bool(f["escalate"]),
            degraded=bool(f["degrade"]),
            timings=[pb.StageTiming(stage="fast_model", duration_ms=1.0),
                     pb.StageTiming(stage="cascade_total", duration_ms=2.0 + f["delay_ms"])],
        )

    @classmethod
    async def result(cls, request: pb.DecideRequest) -> pb.DecideBatchResult:
        f = request.event.features
        if f["delay_ms"]:
            await asyncio.sleep(f["delay_ms"] / 1000.0)
        if f["fail"]:
            return pb.DecideBatchResult(request_id=request.request_id,
                                        error=pb.ItemError(code=int(f["fail"]), message="canned"))
        return pb.DecideBatchResult(request_id=request.request_id, decision=cls.decision(request))

    async def Decide(self, request, context):  # noqa: N802
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        f = request.event.features
        if f["delay_ms"]:
            await asyncio.sleep(f["delay_ms"] / 1000.0)
        if f["fail"]:
            await context.abort(CODES[int(f["fail"])], "canned failure")
        return pb.DecideResponse(decision=self.decision(request))

    async def DecideBatch(self, request, context):  # noqa: N802
        self.calls += 1
        results = await asyncio.gather(*(self.result(r) for r in request.requests))
        return pb.DecideBatchResponse(results=results)

    async def DecideStream(self, request_iterator, context):  # noqa: N802
        self.calls += 1
        answers: asyncio.Queue[pb.DecideBatchResult | None] = asyncio.Queue()
        in_flight = 0

        async def one(request: pb.DecideRequest) -> None:
            nonlocal in_flight
            in_flight += 1
            self.max_stream_in_flight = max(self.max_stream_in_flight, in_flight)
            try:
                answers.put_nowait(await self.result(request))
            finally:
                in_flight -= 1

        async def read() -> None:
            tasks = [asyncio.create_task(one(r)) async for r in request_iterator]
            await asyncio.gather(*tasks)
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        while (answer := await answers.get()) is not None:
            yield answer
        await reader


class WithoutStream(FakeDecisions):
    """A server from before DecideStream. (The generated base method sets UNIMPLEMENTED and raises, which grpc.aio
    answers with UNIMPLEMENTED or INTERNAL depending on timing; a deterministic status keeps the test exact.)"""

    async def DecideStream(self, request_iterator, context):  # noqa: N802
        self.calls += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


@contextlib.asynccontextmanager
async def serving(servicer: pb_grpc.DecisionServiceServicer):
    server = grpc.aio.server()
    pb_grpc.add_DecisionServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def run_against(servicer: pb_grpc.DecisionServiceServicer, spec: LoadSpec, events: list[pb.DecideRequest],
                **kwargs) -> LoadResult:
    async def scenario() -> LoadResult:
        async with serving(servicer) as target:
            return await asyncio.wait_for(run_load(target, spec, events, "test", **kwargs), timeout=30)

    return asyncio.run(scenario())


def test_open_loop_latency_counts_from_the_scheduled_send_and_counts_late_sends():
    # 50/s on a fixed schedule, one call in flight at most, the first call takes 300 ms: the 15 calls scheduled
    # meanwhile wait for it, and each one's wait belongs in its latency (20 ms apart: ~280, 260, ... ms).
    async def call(i: int) -> None:
        await asyncio.sleep(0.3 if i == 0 else 0.0)

    spec = LoadSpec(rate=50, arrivals="fixed", requests=16, warmup=0, max_in_flight=1, late_ms=5)
    result = asyncio.run(LoadRun(spec, "open", "fake").unary(call))
    assert result.loop == "open" and result.sent == result.ok == 16
    assert result.sent_per_s == pytest.approx(16 / 0.3, rel=0.01)  # the schedule's rate, however late the sends
    assert result.latency_ms["p50"] > 100  # measured from the actual send it would be ~0
    assert result.late_sends >= 10
    assert result.max_send_lag_ms >= 200
    assert result.behind_schedule and "fell behind" in result.note


def test_closed_loop_measures_from_its_own_send():
    async def call(i: int) -> None:
        await asyncio.sleep(0.3 if i == 0 else 0.0)

    result = asyncio.run(LoadRun(LoadSpec(requests=16, warmup=0, concurrency=1), "closed", "fake").unary(call))
    assert result.latency_ms["p50"] < 100 and result.late_sends == 0 and not result.behind_schedule


def test_decide_counts_errors_by_code_escalated_degraded_stages_series_and_sends_the_token():
    events = [event(fail=8 if i % 4 == 0 else 0, escalate=i % 5 == 1, degrade=i == 2) for i in range(20)]
    servicer = FakeDecisions()
    spec = LoadSpec(requests=40, warmup=5, concurrency=4)
    result = run_against(servicer, spec, events, metadata=(("authorization", "Bearer t0k"),))
    # warm-up calls reach the server but stay out of the figures
    assert servicer.calls == 45 and result.sent == 40
    # which events were measured depends on the warm-up offset: index 5..44 of a 20-event cycle = each twice
    assert result.errors == {"RESOURCE_EXHAUSTED": 10} and result.item_errors == {}
    assert result.ok == result.decisions == 30
    assert result.escalated_share == pytest.approx(6 / 30, abs=1e-4)  # i % 5 == 1 (1, 6, 11; 16 fails)
    assert result.degraded_share == pytest.approx(2 / 30, abs=1e-4)
    assert set(result.stage_ms) == {"fast_model", "cascade_total"}
    assert result.stage_ms["fast_model"] == {"p50": 1.0, "p99": 1.0}
    assert sum(s["sent"] for s in result.series) == 40 and sum(s["ok"] for s in result.series) == 30
    assert all(m.get("authorization") == "Bearer t0k" for m in servicer.metadata)
    assert result.requests_per_s > 0 and result.calls_per_s == result.requests_per_s
    assert result.decisions_per_s == result.requests_per_s
    # the JSON line carries every field, and round-trips
    line = json.loads(json.dumps(asdict(result)))
    assert set(line) == {f.name for f in fields(LoadResult)}
    assert set(line["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max", "mean"}
    assert line["cpu"]["client"]["cpu_s"] >= 0


def test_batch_counts_decisions_and_item_errors_by_code():
    events = [event(fail=3 if i in (2, 7) else 0, escalate=i == 1) for i in range(10)]
    result = run_against(FakeDecisions(), LoadSpec(mode="batch", batch_size=8, requests=5, warmup=0, concurrency=2),
                         events)
    assert result.sent == result.ok == 5  # calls
    assert result.decisions == 32 and result.item_errors == {"INVALID_ARGUMENT": 8}
    assert result.errors == {"INVALID_ARGUMENT": 8}
    assert result.escalated_share == pytest.approx(4 / 32)
    assert result.decisions_per_s == pytest.approx(result.calls_per_s * 32 / 5, rel=0.01)


def test_stream_matches_results_by_request_id_keeps_its_window_and_counts_item_errors():
    # slow items (events 0 and 7: a fifth of the answered ones) finish after later fast ones: results come in
    # completion order, and a slow item's latency must be its own, not that of the item sent before or after it
    events = [event(delay_ms=60 if i % 7 == 0 else 0, fail=9 if i % 6 == 5 else 0) for i in range(12)]
    servicer = FakeDecisions()
    spec = LoadSpec(mode="stream", streams=2, concurrency=4, requests=48, warmup=0)
    result = run_against(servicer, spec, events)
    assert servicer.calls == 2 and result.stream_errors == {}
    assert servicer.max_stream_in_flight <= 4
    assert result.sent == 48 and result.ok == result.decisions == 40
    assert result.item_errors == result.errors == {"FAILED_PRECONDITION": 8}
    assert result.latency_ms["p90"] >= 60
    assert result.calls_per_s is None and result.requests_per_s > 0


def test_stream_against_a_server_without_it_counts_unimplemented_instead_of_crashing():
    spec = LoadSpec(mode="stream", streams=2, concurrency=4, requests=10, warmup=0)
    result = run_against(WithoutStream(), spec, [event()])
    assert result.stream_errors == {"UNIMPLEMENTED": 2}
    assert result.ok == 0 and set(result.errors) == {"UNIMPLEMENTED"} and 1 <= result.errors["UNIMPLEMENTED"] <= 10
    # open loop, by duration: ends as soon as every stream has failed
    started = time.monotonic()
    spec = LoadSpec(mode="stream", streams=2, concurrency=4, rate=100, duration_s=20, warmup=0)
    result = run_against(WithoutStream(), spec, [event()])
    assert result.stream_errors == {"UNIMPLEMENTED": 2} and result.ok == 0
    assert time.monotonic() - started < 10


def test_open_loop_stream_sends_on_schedule():
    spec = LoadSpec(mode="stream", streams=2, concurrency=8, rate=200, arrivals="fixed", requests=20, warmup=2)
    result = run_against(FakeDecisions(), spec, [event()])
    assert result.loop == "open" and result.sent == result.ok == result.decisions == 20


def test_health_mode_and_duration():
    spec = LoadSpec(mode="health", duration_s=0.3, warmup_s=0.1, concurrency=2)
    result = run_against(FakeDecisions(), spec, [])
    assert result.ok == result.sent > 0 and result.decisions == 0 and result.escalated_share is None
    assert len(result.series) == 1 and result.warmup == "0.1 s"


def test_percentiles_and_per_second_series():
    figures = latency_figures([float(x) for x in range(1, 1001)])
    assert figures["p50"] == 500.5 and figures["p99.9"] == pytest.approx(999.001)
    assert figures["max"] == 1000 and figures["mean"] == 500.5 and figures["p90"] == pytest.approx(900.1)
    assert latency_figures([]) == {"p50": None, "p90": None, "p99": None, "p99.9": None, "max": None, "mean": None}
    series = per_second([0, 0, 0, 1, 3], [1.0, 3.0, math.nan, 5.0, math.nan])
    assert [s["second"] for s in series] == [0, 1, 2, 3]
    assert [(s["sent"], s["ok"]) for s in series] == [(3, 2), (1, 1), (0, 0), (1, 0)]
    assert series[0]["p50"] == 2.0 and series[2]["p99"] is None


def test_arrival_gaps():
    fixed = arrival_gaps(200, "fixed")
    assert [next(fixed) for _ in range(3)] == [0.005] * 3
    poisson = arrival_gaps(200, "poisson", seed=1)
    gaps = [next(poisson) for _ in range(5000)]
    assert sum(gaps) / len(gaps) == pytest.approx(0.005, rel=0.05) and len(set(gaps)) > 4000


def test_token_travels_as_plain_metadata(tmp_path):
    (tmp_path / "client.token").write_text("s3cret\n")
    security = SecuritySettings(tls=False, tokens=True, client_token_file=tmp_path / "client.token")
    assert connection(security) == (None, (("authorization", "Bearer s3cret"),))
    assert connection(SecuritySettings(tls=False, tokens=False)) == (None, ())


BUSY_CHILD = """
import sys, time
def spin(cpu_s):
    t = time.process_time()
    while time.process_time() - t < cpu_s:
        pass
spin(0.5)  # before the window: must not count
print("ready", flush=True)
spin(0.3)  # in the window: at most this counts
time.sleep(30)
"""


def test_cpu_time_of_a_busy_child_process():
    busy = subprocess.Popen([sys.executable, "-c", BUSY_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "ready"
        groups = ProcessGroups({"busy": [busy.pid], "gone": [2**22 + 12345]})
        before = groups.cpu_seconds()
        started = time.monotonic()
        time.sleep(0.6)
        after = groups.cpu_seconds()
        wall = time.monotonic() - started
    finally:
        busy.kill()
        busy.wait()
    usage = cpu_usage(before, after, wall, decisions=10)
    # > 0, within the wall time (one thread), and only the window's share: the 0.5 s spent before is not in it
    assert 0.02 < usage["busy"]["cpu_s"] <= min(wall, 0.3) + 0.05
    assert usage["busy"]["ms_per_decision"] == pytest.approx(usage["busy"]["cpu_s"] * 100, rel=1e-3)
    assert usage["busy"]["cores"] == pytest.approx(usage["busy"]["cpu_s"] / wall, abs=1e-3)
    assert usage["gone"]["cpu_s"] == 0


def test_command_line_pins_the_client_watches_processes_and_appends_json(tmp_path):
    events = tmp_path / "events.jsonl"
    from google.protobuf import json_format

    events.write_text(json_format.MessageToJson(event(), indent=None) + "\n")
    out = tmp_path / "r.jsonl"
    cpu = min(os.sched_getaffinity(0))

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    async def scenario() -> int:
        async with serving(FakeDecisions()) as target:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest.loadgen", "--target", target, "--events", str(events),
                "--duration", "0.5", "-c", "2", "--plaintext", "--quiet", "--cpu", str(cpu),
                "--watch", f"busy={busy.pid}", "--label", "cli", "--out", str(out), cwd=REPO,
            )
            return await asyncio.wait_for(proc.wait(), timeout=60)

    try:
        assert asyncio.run(scenario()) == 0
    finally:
        busy.kill()
        busy.wait()
    line = json.loads(out.read_text().splitlines()[-1])
    assert line["client_cpus"] == [cpu] and line["label"] == "cli" and line["ok"] == line["sent"] > 0
    assert set(line["cpu"]) == {"busy", "client"} and line["cpu"]["busy"]["cpu_s"] > 0


def test_each_run_and_pass_sends_a_fresh_population_of_entities():
    import ipaddress

    from loadtest.loadgen import with_entity_tag
    from orchestrator.validation import to_risk_event

    event = pb.Event(type=pb.EVENT_TYPE_ORDER, entities=pb.Entities(account_id="a1", device_id="d1", ip="10.0.0.1"),
                     features={"score": 1.0})
    first, again, other = (with_entity_tag(event, t) for t in ("run1.0", "run1.0", "run1.1"))
    assert first == again  # the same event in the same pass: the same entities
    assert first.entities.account_id == "a1~run1.0" and other.entities.account_id == "a1~run1.1"
    assert first.entities.ip != other.entities.ip and first.entities.ip != event.entities.ip
    assert ipaddress.ip_address(first.entities.ip) in ipaddress.ip_network("2001:db8::/32")
    assert not first.entities.seller_id  # absent stays absent
    assert first.features == event.features and event.entities.account_id == "a1"  # the original is untouched
    # what the platform's edge accepts
    to_risk_event(pb.DecideRequest(request_id="r1", event=first), {"score"})
