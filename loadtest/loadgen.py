"""gRPC load generator for a DecisionService (or a bare health endpoint), closed or open loop.

A client only: it uses the generated stubs and its own code. Events come from a JSONL file of DecideRequest
messages in protobuf JSON (``python -m loadtest.bench`` writes one from held-out data); every request (every batch
or stream item) gets a fresh request_id, so idempotency never short-circuits the work being measured.

Modes: ``decide`` (unary Decide), ``batch`` (DecideBatch, --batch-size items per call; latency per call),
``stream`` (--streams DecideStream calls, each with at most -c items outstanding; latency per item, from its send
to its result, matched by request_id since results come in completion order) and ``health`` (grpc.health.v1).

Closed loop (-c units in flight, each sent when one finishes) or open loop (--rate units per second, Poisson or
fixed-interval arrivals, sent on schedule whatever the server does). In open loop latency counts from the
*scheduled* send, so a client or server that falls behind shows in the figures instead of being hidden
(coordinated omission); sends later than --late-ms are counted (``late_sends``, ``max_send_lag_ms``). A unit is a
call for decide/health/batch (--rate in calls/s) and an item for stream (--rate in items/s).

    python -m loadtest.loadgen --target 127.0.0.1:50051 --events events.jsonl --duration 10 -c 64 --out r.json
    python -m loadtest.loadgen --target 127.0.0.1:50051 --events events.jsonl --duration 10 --rate 200
    python -m loadtest.loadgen --target ... --events ... --mode stream --streams 4 -c 256 -n 20000

It connects as the riskcascade config's ``security`` section says (TLS with its CA, its client token; --config,
else $RISKCASCADE_CONFIG, else the defaults that `riskcascade up` uses), or in plaintext with --plaintext (the bare
baselines and Ray Serve's gRPC proxy). The token goes as plain ``authorization`` metadata, not as gRPC call
credentials, which cost the client half its throughput (loadtest/results/tls-*.md). --cpu pins the generator to
CPUs; --watch NAME=PID,... reads those processes' CPU time over the measured window (ms per decision).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from loadtest.machine import ProcessGroups, cpu_usage, pin
from orchestrator.client import ClientSecurityError, client_token, open_aio_channel
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc as pb_grpc
from riskcascade.core.config import ConfigError, SecuritySettings, load_settings

MODES = ("decide", "batch", "stream", "health")
ARRIVALS = ("poisson", "fixed")
PERCENTILES = (50, 90, 99, 99.9)
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
DEFAULT_REQUESTS = 2000
STREAM_COUNTED_DEADLINE_S = 3600.0  # deadline of a stream sent by count, whose end is not known beforehand
STREAM_DEADLINE_SLACK_S = 60.0  # a stream sent for a duration gets that plus its warm-up, an item deadline and this
BEHIND_SHARE = 0.01  # an open-loop run with more late sends than this share says it fell behind
PROGRESS_INTERVAL_S = 0.5
NO_RESULT = "NO_RESULT"  # a stream ended OK without answering an item


class CallFailed(Exception):
    """A unit failed outside gRPC (an in-process baseline); ``code`` is how the results count it."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class LoadSpec:
    """What to send: the mode, the loop (closed: ``concurrency``; open: ``rate``), how much, and the warm-up."""

    mode: str = "decide"
    concurrency: int = 16  # closed loop: units in flight; stream mode: each stream's window (open loop too)
    rate: float | None = None  # open loop: units per second (calls; stream: items)
    arrivals: str = "poisson"
    requests: int | None = None  # measured units; None with duration_s
    duration_s: float | None = None  # measured seconds of scheduled sends
    warmup: int = 20  # unmeasured units first (ignored when warmup_s is set)
    warmup_s: float | None = None  # unmeasured seconds first
    batch_size: int = 64
    streams: int = 1
    deadline_s: float = 2.0
    late_ms: float = 5.0
    max_in_flight: int = 10_000  # open loop, unary modes: units outstanding at most (further sends wait, late)
    seed: int = 0
    fresh_entities: bool = True  # each run and each pass over the events gets its own entity ids

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"arrivals must be one of {ARRIVALS}")
        if (self.requests is None) == (self.duration_s is None):
            raise ValueError("give exactly one of requests and duration_s")
        if min(self.concurrency, self.batch_size, self.streams, self.max_in_flight, self.requests or 1) < 1:
            raise ValueError("concurrency, batch_size, streams, max_in_flight and requests must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if (self.duration_s is not None and self.duration_s <= 0) or self.warmup < 0 or (self.warmup_s or 0) < 0:
            raise ValueError("duration must be positive and warm-up not negative")

    @property
    def loop(self) -> str:
        return "open" if self.rate is not None else "closed"

    @property
    def unit(self) -> str:
        return "item" if self.mode == "stream" else "call"

    def describe_warmup(self) -> str:
        return f"{self.warmup_s:g} s" if self.warmup_s is not None else f"{self.warmup} {self.unit}s"


@dataclass
class LoadResult:
    label: str
    mode: str
    target: str
    loop: str  # closed | open
    concurrency: int  # closed loop: units in flight; stream: window per stream
    rate: float | None  # open loop: offered units per second
    arrivals: str | None
    batch_size: int | None
    streams: int | None
    warmup: str
    started_at: str
    sent: int  # measured units sent (calls; stream: items)
    ok: int  # measured units answered without error
    decisions: int
    errors: dict[str, int]  # failed calls, item errors and items lost with their stream, by status code
    item_errors: dict[str, int]  # the item errors alone (batch, stream)
    stream_errors: dict[str, int]  # stream calls that ended with a status other than OK (warm-up included)
    seconds: float  # from the first measured scheduled send to the last measured answer
    sent_per_s: float  # measured units scheduled per second of the sending window (open loop: the offered rate)
    requests_per_s: float  # answered units per second of ``seconds`` (calls; stream: items)
    calls_per_s: float | None  # successful calls per second (None for stream)
    decisions_per_s: float
    latency_ms: dict[str, float | None]  # of answered units, from the scheduled send
    escalated_share: float | None
    degraded_share: float | None
    actions: dict[str, int]
    stage_ms: dict[str, dict[str, float]]  # server-side, from decision.timings: stage -> p50/p99
    late_sends: int
    max_send_lag_ms: float
    behind_schedule: bool
    max_in_flight: int  # units outstanding at once at most (unary modes; 0 for stream: its window bounds it)
    cpu: dict[str, dict[str, float | None]]  # process group -> cpu_s, cores, ms_per_decision
    client_cpus: list[int]
    series: list[dict]  # per second of scheduled sends: second, sent, ok, p50, p99
    note: str = ""


def percentile(values: np.ndarray | Sequence[float], p: float) -> float | None:
    values = np.asarray(values, dtype=float)
    return round(float(np.percentile(values, p)), 3) if values.size else None


def latency_figures(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9, max and mean of latencies in ms (None when there are none)."""
    lat = np.asarray(latencies, dtype=float)
    figures = {f"p{p:g}": percentile(lat, p) for p in PERCENTILES}
    figures["max"] = round(float(lat.max()), 3) if lat.size else None
    figures["mean"] = round(float(lat.mean()), 3) if lat.size else None
    return figures


def per_second(seconds: Sequence[int], latencies: Sequence[float]) -> list[dict]:
    """Per second of scheduled sends: units sent, answered, and the answered ones' p50/p99 (NaN = failed)."""
    sec = np.asarray(seconds, dtype=int)
    lat = np.asarray(latencies, dtype=float)
    rows = []
    for s in range(int(sec.max()) + 1 if sec.size else 0):
        in_second = lat[sec == s]
        answered = in_second[~np.isnan(in_second)]
        rows.append({"second": s, "sent": int(in_second.size), "ok": int(answered.size),
                     "p50": percentile(answered, 50), "p99": percentile(answered, 99)})
    return rows


def arrival_gaps(rate: float, arrivals: str, seed: int = 0) -> Iterator[float]:
    """Seconds between scheduled sends: 1/rate each, or exponential with mean 1/rate (Poisson arrivals)."""
    if arrivals == "fixed":
        while True:
            yield 1.0 / rate
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.exponential(1.0 / rate, 4096).tolist()


class Schedule:
    """Which units go out when, and which are measured: the warm-up ones (first ``warmup`` units, or those
    scheduled in the first ``warmup_s`` seconds) are not. Closed loop: a unit is scheduled when it is taken.
    Open loop: on the arrival process, whenever it is taken."""

    def __init__(self, spec: LoadSpec, on_measure_start: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.spec = spec
        self._clock = clock
        self._on_measure_start = on_measure_start
        self._gaps = arrival_gaps(spec.rate, spec.arrivals, spec.seed) if spec.rate is not None else None
        self._issued = self._measured = 0
        self.t0 = self._next_at = 0.0
        self.measure_start: float | None = None

    def begin(self) -> None:
        self.t0 = self._next_at = self._clock()

    def _take(self, at: float) -> tuple[int, float, bool] | None:
        spec = self.spec
        measured = at >= self.t0 + spec.warmup_s if spec.warmup_s is not None else self._issued >= spec.warmup
        if measured:
            if self.measure_start is None:
                self.measure_start = self.t0 + spec.warmup_s if spec.warmup_s is not None else at
                if self._on_measure_start is not None:
                    self._on_measure_start()
            if spec.requests is not None and self._measured >= spec.requests:
                return None
            if spec.duration_s is not None and at >= self.measure_start + spec.duration_s:
                return None
            self._measured += 1
        self._issued += 1
        return self._issued - 1, at, measured

    def next_closed(self) -> tuple[int, float, bool] | None:
        """(index, scheduled time, measured) of the next unit, scheduled now; None when the run is over."""
        return self._take(self._clock())

    def next_open(self) -> tuple[int, float, bool] | None:
        """(index, scheduled time, measured) of the next arrival; None when the run is over."""
        item = self._take(self._next_at)
        if item is not None:
            self._next_at += next(self._gaps)
        return item


class Recorder:
    """What the measured units did. A unit's latency is NaN when it failed."""

    def __init__(self) -> None:
        self.measure_start = 0.0
        self.seconds: list[int] = []
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.item_errors: Counter[str] = Counter()
        self.stream_errors: Counter[str] = Counter()
        self.calls_ok = self.decisions = self.escalated = self.degraded = 0
        self.actions: Counter[str] = Counter()
        self.stage_ms: dict[str, list[float]] = {}
        self.late_sends = 0
        self.max_lag_s = 0.0
        self.last_answer = 0.0
        self.last_scheduled = 0.0

    def sent(self, lag_s: float, late_s: float) -> None:
        self.max_lag_s = max(self.max_lag_s, lag_s)
        self.late_sends += lag_s > late_s

    def _unit(self, scheduled: float, latency_ms: float, now: float) -> None:
        self.seconds.append(max(0, int(scheduled - self.measure_start)))
        self.latencies.append(latency_ms)
        self.last_answer = max(self.last_answer, now)
        self.last_scheduled = max(self.last_scheduled, scheduled)

    def failed(self, scheduled: float, code: str, now: float, item: bool = False) -> None:
        self._unit(scheduled, math.nan, now)
        self.errors[code] += 1
        if item:
            self.item_errors[code] += 1

    def answered(self, scheduled: float, now: float, answer: object) -> None:
        """A call answered: ``answer`` is None (health, echo), a Decision or the results of a batch."""
        self._unit(scheduled, (now - scheduled) * 1000.0, now)
        self.calls_ok += 1
        if isinstance(answer, pb.Decision):
            self.decision(answer)
        elif answer is not None:
            for result in answer:
                self.item(result)

    def item(self, result: pb.DecideBatchResult) -> bool:
        if result.WhichOneof("result") == "decision":
            self.decision(result.decision)
            return True
        code = STATUS_NAMES.get(result.error.code, str(result.error.code))
        self.errors[code] += 1
        self.item_errors[code] += 1
        return False

    def stream_item(self, scheduled: float, now: float, result: pb.DecideBatchResult) -> None:
        if result.WhichOneof("result") == "decision":
            self._unit(scheduled, (now - scheduled) * 1000.0, now)
            self.decision(result.decision)
        else:
            self._unit(scheduled, math.nan, now)
            self.item(result)

    def decision(self, d: pb.Decision) -> None:
        self.decisions += 1
        self.escalated += d.escalated
        self.degraded += d.degraded
        self.actions[pb.Action.Name(d.action)] += 1
        for t in d.timings:
            self.stage_ms.setdefault(t.stage, []).append(t.duration_ms)

    @property
    def ok(self) -> int:
        return sum(1 for x in self.latencies if not math.isnan(x))


class _Stream:
    """One DecideStream call: a writer keeping at most ``window`` items outstanding and a reader matching results
    to their sends by request_id.

    The writer sends one item and waits for its answer (or the stream's end, at most a deadline) before it sends
    more: grpc.aio turns a write that races the server closing the stream into a client-made INTERNAL status
    that hides the server's own (a server without DecideStream would read as INTERNAL, not UNIMPLEMENTED)."""

    def __init__(self, call: grpc.aio.StreamStreamCall, window: int):
        self.call = call
        self.size = window
        self.window = asyncio.Semaphore(window)
        self.pending: dict[str, tuple[float, bool]] = {}
        self.queue: asyncio.Queue[tuple[int, float, bool] | None] = asyncio.Queue()  # open loop: arrivals
        self.alive = True
        self.code = ""
        self.answered = asyncio.Event()  # the first answer came, or the stream ended

    async def read(self, rec: Recorder, clock: Callable[[], float]) -> None:
        try:
            while True:
                result = await self.call.read()
                if result is grpc.aio.EOF:
                    self.code = "OK"
                    break
                self.answered.set()
                entry = self.pending.pop(result.request_id, None)
                if entry is None:  # not ours, or answered twice: the server broke the protocol
                    rec.errors["UNEXPECTED_RESULT"] += 1
                    continue
                self.window.release()
                scheduled, measured = entry
                if measured:
                    rec.stream_item(scheduled, clock(), result)
        except grpc.aio.AioRpcError as err:
            self.code = err.code().name
        self.alive = False
        self.answered.set()
        for _ in range(self.size + 1):  # wake the writer wherever it waits
            self.window.release()

    async def write(self, take: Callable[[], Awaitable[tuple[int, float, bool] | None]],
                    request_of: Callable[[int], pb.DecideRequest], rec: Recorder, late_s: float,
                    clock: Callable[[], float], first_wait_s: float) -> None:
        first = True
        while True:
            await self.window.acquire()
            if not self.alive:
                break
            item = await take()
            if item is None or not self.alive:
                if item is not None:
                    self.queue.put_nowait(item)  # counted as lost with the stream below
                break
            i, scheduled, measured = item
            request = request_of(i)
            self.pending[request.request_id] = (scheduled, measured)
            if measured:
                rec.sent(clock() - scheduled, late_s)
            try:
                await self.call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break  # the call is over; the reader says how
            if first:
                first = False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.answered.wait(), first_wait_s)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.done_writing()

    def lost(self) -> list[tuple[float, bool]]:
        """Items sent and never answered, or queued for this stream after it ended."""
        left = list(self.pending.values())
        self.pending.clear()
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is not None:
                left.append((item[1], item[2]))
        return left


class LoadRun:
    """One measured run: the schedule, the recorder, the CPU time of watched process groups and the result."""

    def __init__(self, spec: LoadSpec, label: str, target: str, groups: ProcessGroups | None = None,
                 progress: bool = False, clock: Callable[[], float] = time.perf_counter):
        self.spec = spec
        self.label = label
        self.target = target
        self.rec = Recorder()
        self.groups = (groups or ProcessGroups()).with_group("client", [os.getpid()])
        self.clock = clock
        self.schedule = Schedule(spec, self._measure_started, clock)
        self._progress = progress
        self._cpu_before: dict[str, float] = {}
        self._in_flight = self._max_in_flight = 0

    def _measure_started(self) -> None:
        self.rec.measure_start = self.schedule.measure_start
        self._cpu_before = self.groups.cpu_seconds()

    async def unary(self, call: Callable[[int], Awaitable[object]]) -> LoadResult:
        """Run ``call(i)`` per unit (closed or open loop). It returns None, a Decision or a batch's results, and
        raises grpc.aio.AioRpcError or CallFailed on failure."""
        late_s = self.spec.late_ms / 1000.0

        async def one(i: int, scheduled: float, measured: bool) -> None:
            if measured:
                self.rec.sent(self.clock() - scheduled, late_s)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            try:
                answer = await call(i)
            except grpc.aio.AioRpcError as err:
                if measured:
                    self.rec.failed(scheduled, err.code().name, self.clock())
                return
            except CallFailed as err:
                if measured:
                    self.rec.failed(scheduled, err.code, self.clock())
                return
            finally:
                self._in_flight -= 1
            if measured:
                self.rec.answered(scheduled, self.clock(), answer)

        return await self._run(self._open_unary(one) if self.spec.rate is not None else self._closed_unary(one))

    async def _closed_unary(self, one: Callable[[int, float, bool], Awaitable[None]]) -> None:
        async def worker() -> None:
            while (item := self.schedule.next_closed()) is not None:
                await one(*item)

        await asyncio.gather(*(worker() for _ in range(self.spec.concurrency)))

    async def _open_unary(self, one: Callable[[int, float, bool], Awaitable[None]]) -> None:
        slots = asyncio.Semaphore(self.spec.max_in_flight)
        tasks: set[asyncio.Task] = set()

        async def run(item: tuple[int, float, bool]) -> None:
            try:
                await one(*item)
            finally:
                slots.release()

        while (item := self.schedule.next_open()) is not None:
            delay = item[1] - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()  # past max_in_flight the send waits: late, and counted from its schedule
            task = asyncio.create_task(run(item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def streams(self, open_stream: Callable[[], grpc.aio.StreamStreamCall],
                      request_of: Callable[[int], pb.DecideRequest]) -> LoadResult:
        """Run ``spec.streams`` streams, each with a window of ``spec.concurrency`` items outstanding."""
        return await self._run(self._streams(open_stream, request_of))

    async def _streams(self, open_stream: Callable[[], grpc.aio.StreamStreamCall],
                       request_of: Callable[[int], pb.DecideRequest]) -> None:
        spec, rec = self.spec, self.rec
        streams = [_Stream(open_stream(), spec.concurrency) for _ in range(spec.streams)]
        readers = [asyncio.create_task(s.read(rec, self.clock)) for s in streams]

        async def take_closed() -> tuple[int, float, bool] | None:
            return self.schedule.next_closed()

        def take_from(stream: _Stream) -> Callable[[], Awaitable[tuple[int, float, bool] | None]]:
            return stream.queue.get

        take = (lambda s: take_closed) if spec.rate is None else take_from
        writers = [asyncio.create_task(s.write(take(s), request_of, rec, spec.late_ms / 1000.0, self.clock,
                                               spec.deadline_s)) for s in streams]
        if spec.rate is not None:
            await self._schedule_streams(streams)
        await asyncio.gather(*writers, *readers)
        for stream in streams:
            code = stream.code or "UNKNOWN"
            if code != "OK":
                rec.stream_errors[code] += 1
            for scheduled, measured in stream.lost():
                if measured:
                    rec.failed(scheduled, code if code != "OK" else NO_RESULT, self.clock())

    async def _schedule_streams(self, streams: list[_Stream]) -> None:
        """Open loop: hand each arrival, at its time, to the next live stream (round robin)."""
        turn = 0
        while any(s.alive for s in streams) and (item := self.schedule.next_open()) is not None:
            delay = item[1] - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            live = [s for s in streams if s.alive]
            if not live:
                if item[2]:
                    self.rec.failed(item[1], streams[0].code or "UNKNOWN", self.clock())
                break
            live[turn % len(live)].queue.put_nowait(item)
            turn += 1
        for stream in streams:
            stream.queue.put_nowait(None)

    async def _run(self, body: Awaitable[None]) -> LoadResult:
        spec = self.spec
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        bar = tqdm(total=spec.requests if spec.requests is not None else int(math.ceil(spec.duration_s)),
                   desc=self.label, unit=spec.unit if spec.requests is not None else "s", leave=False,
                   disable=not self._progress, file=sys.stderr)
        ticker = asyncio.create_task(self._show_progress(bar))
        self.schedule.begin()
        try:
            await body
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            bar.close()
        if self.schedule.measure_start is None:  # nothing was measured (a run that ended in its warm-up)
            self.schedule.measure_start = self.clock()
            self._measure_started()
        cpu_after = self.groups.cpu_seconds()
        return self._result(started_at, cpu_after)

    async def _show_progress(self, bar: tqdm) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            rec = self.rec
            if self.spec.requests is not None:
                bar.n = len(rec.latencies)
            elif self.schedule.measure_start is not None:
                bar.n = min(bar.total, int(self.clock() - self.schedule.measure_start))
            bar.set_postfix(ok=rec.ok, errors=sum(rec.errors.values()), late=rec.late_sends, refresh=True)

    def _result(self, started_at: str, cpu_after: dict[str, float]) -> LoadResult:
        spec, rec = self.spec, self.rec
        sent, ok = len(rec.latencies), rec.ok
        seconds = max(rec.last_answer - rec.measure_start, 0.0) if sent else 0.0
        window = spec.duration_s if spec.duration_s is not None else max(rec.last_scheduled - rec.measure_start, 0.0)
        answered = [x for x in rec.latencies if not math.isnan(x)]
        behind = spec.rate is not None and rec.late_sends > BEHIND_SHARE * max(sent, 1)
        note = ""
        if behind:
            note = (f"the client fell behind its schedule: {rec.late_sends} of {sent} sends more than "
                    f"{spec.late_ms:g} ms late (at most {rec.max_lag_s * 1000:.1f} ms); latency counts from the "
                    "scheduled send, so the delay is in the figures")

        def per_s(count: int) -> float:
            return round(count / seconds, 1) if seconds > 0 else 0.0

        return LoadResult(
            label=self.label, mode=spec.mode, target=self.target, loop=spec.loop, concurrency=spec.concurrency,
            rate=spec.rate, arrivals=spec.arrivals if spec.rate is not None else None,
            batch_size=spec.batch_size if spec.mode == "batch" else None,
            streams=spec.streams if spec.mode == "stream" else None, warmup=spec.describe_warmup(),
            started_at=started_at, sent=sent, ok=ok, decisions=rec.decisions,
            errors=dict(rec.errors), item_errors=dict(rec.item_errors), stream_errors=dict(rec.stream_errors),
            seconds=round(seconds, 3), sent_per_s=round(sent / window, 1) if window > 0 else 0.0,
            requests_per_s=per_s(ok),
            calls_per_s=None if spec.mode == "stream" else per_s(rec.calls_ok),
            decisions_per_s=per_s(rec.decisions), latency_ms=latency_figures(answered),
            escalated_share=round(rec.escalated / rec.decisions, 4) if rec.decisions else None,
            degraded_share=round(rec.degraded / rec.decisions, 4) if rec.decisions else None,
            actions=dict(rec.actions),
            stage_ms={k: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for k, v in rec.stage_ms.items()},
            late_sends=rec.late_sends, max_send_lag_ms=round(rec.max_lag_s * 1000.0, 3), behind_schedule=behind,
            max_in_flight=self._max_in_flight,
            cpu=cpu_usage(self._cpu_before, cpu_after, seconds, rec.decisions),
            client_cpus=sorted(os.sched_getaffinity(0)), series=per_second(rec.seconds, rec.latencies), note=note,
        )


def read_events(path: Path) -> list[pb.DecideRequest]:
    events = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            events.append(json_format.Parse(line, pb.DecideRequest()))
        except json_format.ParseError as exc:
            raise SystemExit(f"{path}:{line_no}: not a DecideRequest in protobuf JSON: {exc}") from None
    if not events:
        raise SystemExit(f"{path}: no events")
    return events


def connection(security: SecuritySettings) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """Channel credentials (TLS as the settings say; None = plaintext) and the metadata carrying the token.

    The token travels as plain per-call metadata rather than call credentials: the server cannot tell the two
    apart, and the credentials plugin halves a client's throughput (loadtest/results/tls-*.md), which would make
    the load generator the bottleneck."""
    token = client_token(security)
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    if not security.tls:
        return None, metadata
    pair = {}
    if security.require_client_cert:
        pair = {"private_key": _read(security.client_key_file, "client_key_file"),
                "certificate_chain": _read(security.client_cert_file, "client_cert_file")}
    return grpc.ssl_channel_credentials(root_certificates=_read(security.ca_file, "ca_file"), **pair), metadata


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ClientSecurityError(f"cannot read security.{key} {path}: {exc.strerror}") from None


ENTITY_FIELDS = ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id")
DOC_PREFIX = 0x20010DB8  # 2001:db8::/32, RFC 3849


def with_entity_tag(event: pb.Event, tag: str) -> pb.Event:
    """``event`` with every entity id suffixed by ``tag``: the same traffic from a population the platform has not
    seen. Replaying the same events again into the live entity state would make each pass look like a burst on the
    same accounts and devices (inflated velocity features, more escalations), and one row's traffic would change the
    next row's; a fresh population per run and per pass keeps each measured row's features those of its events."""
    tagged = pb.Event()
    tagged.CopyFrom(event)
    for name in ENTITY_FIELDS:
        value = getattr(event.entities, name)
        if value:
            setattr(tagged.entities, name, _tagged_ip(value, tag) if name == "ip" else f"{value}~{tag}")
    return tagged


def _tagged_ip(ip: str, tag: str) -> str:
    """A stand-in address for ``ip`` in population ``tag`` (the same pair, the same address): an IPv6 address in
    the documentation range 2001:db8::/32, so it is valid and never a real client's."""
    digest = int.from_bytes(hashlib.sha256(f"{ip}~{tag}".encode()).digest()[:12], "big")
    return str(ipaddress.IPv6Address((DOC_PREFIX << 96) | digest))


async def run_load(target: str, spec: LoadSpec, events: Sequence[pb.DecideRequest], label: str = "",
                   metadata: tuple[tuple[str, str], ...] = (), credentials: grpc.ChannelCredentials | None = None,
                   groups: ProcessGroups | None = None, progress: bool = False) -> LoadResult:
    """Connect to ``target`` and run ``spec`` against it."""
    if spec.mode != "health" and not events:
        raise ValueError(f"mode {spec.mode} needs events")
    run_id = uuid.uuid4().hex[:10]
    md = metadata or None

    def event_of(j: int) -> pb.Event:
        event = events[j % len(events)].event
        return with_entity_tag(event, f"{run_id}.{j // len(events)}") if spec.fresh_entities else event

    def request_of(i: int) -> pb.DecideRequest:
        return pb.DecideRequest(request_id=f"load-{run_id}-{i}", event=event_of(i))

    def batch_of(i: int) -> pb.DecideBatchRequest:
        base = i * spec.batch_size
        return pb.DecideBatchRequest(requests=[
            pb.DecideRequest(request_id=f"load-{run_id}-{i}.{k}", event=event_of(base + k))
            for k in range(spec.batch_size)
        ])

    run = LoadRun(spec, label or spec.mode, target, groups, progress)
    async with open_aio_channel(target, credentials) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        stub = pb_grpc.DecisionServiceStub(channel)
        if spec.mode == "stream":
            if spec.duration_s is not None:
                timeout = spec.duration_s + (spec.warmup_s or 0.0) + spec.deadline_s + STREAM_DEADLINE_SLACK_S
            else:
                timeout = STREAM_COUNTED_DEADLINE_S
            return await run.streams(lambda: stub.DecideStream(timeout=timeout, metadata=md), request_of)
        if spec.mode == "health":
            check = health_pb2_grpc.HealthStub(channel).Check

            async def call(i: int) -> None:
                await check(health_pb2.HealthCheckRequest(), timeout=spec.deadline_s)
        elif spec.mode == "batch":
            async def call(i: int) -> Sequence[pb.DecideBatchResult]:
                return (await stub.DecideBatch(batch_of(i), timeout=spec.deadline_s, metadata=md)).results
        else:
            async def call(i: int) -> pb.Decision:
                return (await stub.Decide(request_of(i), timeout=spec.deadline_s, metadata=md)).decision
        return await run.unary(call)


def _fmt(value: float | None, width: int = 8) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def format_result(r: LoadResult | dict) -> str:
    r = asdict(r) if isinstance(r, LoadResult) else r
    lat = r["latency_ms"]
    loop = f"rate={r['rate']:g}/s" if r["loop"] == "open" else f"c={r['concurrency']}"
    if r["mode"] == "stream":
        loop = f"{r['streams']}x{r['concurrency']} {loop if r['loop'] == 'open' else ''}".strip()
    line = (f"{r['label']:<40} {loop:<11} n={r['ok']:>6}/{r['sent']:<6} p50 {_fmt(lat['p50'])} ms  "
            f"p99 {_fmt(lat['p99'])} ms  p99.9 {_fmt(lat['p99.9'])} ms  "
            f"{r['requests_per_s']:8.1f} {'items' if r['mode'] == 'stream' else 'calls'}/s")
    if r["decisions"]:
        line += f"  {r['decisions_per_s']:8.1f} decisions/s  escalated {r['escalated_share']:.1%}"
        line += f"  degraded {r['degraded_share']:.1%}"
    if r["errors"] or r["stream_errors"]:
        line += f"  errors {r['errors']}" + (f" streams failed {r['stream_errors']}" if r["stream_errors"] else "")
    if r["loop"] == "open":
        line += f"  late {r['late_sends']} (max {r['max_send_lag_ms']:.1f} ms)"
    return line


def parse_watch(items: Sequence[str]) -> ProcessGroups:
    groups: dict[str, list[int]] = {}
    for item in items:
        name, _, pids = item.partition("=")
        if not name or not pids:
            raise ValueError(item)
        groups.setdefault(name, []).extend(int(p) for p in pids.split(",") if p)
    return ProcessGroups(groups)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--target", required=True, help="host:port of the gRPC server")
    add("--mode", choices=MODES, default="decide", help="Decide, DecideBatch, DecideStream or bare health checks")
    add("--events", type=Path, help="JSONL of DecideRequest (required except for --mode health)")
    how_much = parser.add_mutually_exclusive_group()
    how_much.add_argument("-n", "--requests", type=int, help=f"measured units to send (default {DEFAULT_REQUESTS})")
    how_much.add_argument("--duration", type=float, help="seconds of measured sends (instead of -n)")
    add("-c", "--concurrency", type=int, default=16,
        help="closed loop: units in flight; stream mode: each stream's window of outstanding items")
    add("--rate", type=float, help="open loop: units per second (calls; stream mode: items), sent on schedule")
    add("--arrivals", choices=ARRIVALS, default="poisson", help="open loop: inter-arrival times")
    add("--batch-size", type=int, default=64, help="items per DecideBatch call")
    add("--streams", type=int, default=1, help="DecideStream calls in parallel")
    warmup = parser.add_mutually_exclusive_group()
    warmup.add_argument("--warmup", type=int, default=20, help="unmeasured units first")
    warmup.add_argument("--warmup-s", type=float, help="unmeasured seconds first (instead of --warmup)")
    add("--deadline-ms", type=float, default=2000.0, help="per-call gRPC deadline (a stream's item deadline is "
        "the server's)")
    add("--late-ms", type=float, default=5.0, help="open loop: a send this much past its schedule counts as late")
    add("--max-in-flight", type=int, default=10_000, help="open loop: units outstanding at most")
    add("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    add("--same-entities", action="store_true",
        help="send the events' own entity ids on every pass (default: fresh ids per run and pass, see "
        "with_entity_tag)")
    add("--label", default="", help="name of this run in the results")
    add("--out", type=Path, help="append the result as one JSON line to this file")
    add("--quiet", action="store_true", help="no progress bar")
    add("--metadata", action="append", default=[], metavar="KEY=VALUE",
        help="gRPC metadata on every call (e.g. application=NAME for Ray Serve's gRPC proxy)")
    add("--config", default=None, help="riskcascade YAML whose security section says how to connect (TLS, token)")
    add("--plaintext", action="store_true", help="no TLS and no token (bare baselines, Serve proxy)")
    add("--cpu", help="pin the load generator to these CPUs (e.g. 1 or 0,1): os.sched_setaffinity")
    add("--watch", action="append", default=[], metavar="NAME=PID[,PID...]",
        help="report the CPU time of these processes over the measured window (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        metadata = tuple(tuple(item.split("=", 1)) for item in args.metadata)
        if any(len(pair) != 2 or not pair[0] for pair in metadata):
            raise ValueError
    except ValueError:
        parser.error("--metadata takes KEY=VALUE")
    try:
        groups = parse_watch(args.watch)
    except ValueError:
        parser.error("--watch takes NAME=PID[,PID...]")
    if args.mode != "health" and not args.events:
        parser.error(f"--events is required for --mode {args.mode}")
    try:
        spec = LoadSpec(
            mode=args.mode, concurrency=args.concurrency, rate=args.rate, arrivals=args.arrivals,
            requests=args.requests if args.requests is not None or args.duration is not None else DEFAULT_REQUESTS,
            duration_s=args.duration, warmup=args.warmup, warmup_s=args.warmup_s, batch_size=args.batch_size,
            streams=args.streams, deadline_s=args.deadline_ms / 1000.0, late_ms=args.late_ms,
            max_in_flight=args.max_in_flight, seed=args.seed, fresh_entities=not args.same_entities,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.cpu:
        try:
            pin(int(c) for c in args.cpu.split(","))
        except (ValueError, OSError) as exc:
            parser.error(f"--cpu {args.cpu}: {exc}")
    events = read_events(args.events) if args.events else []
    try:
        credentials, token_metadata = (None, ()) if args.plaintext else connection(load_settings(args.config).security)
    except (ConfigError, ClientSecurityError) as exc:
        raise SystemExit(str(exc)) from None
    result = asyncio.run(run_load(args.target, spec, events, args.label or args.mode, metadata + token_metadata,
                                  credentials, groups, progress=not args.quiet))
    print(format_result(result), flush=True)
    if result.note:
        print(f"  note: {result.note}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(asdict(result)) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
