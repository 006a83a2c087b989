"""gRPC load generator: N requests at concurrency C against a DecisionService (or a bare health endpoint).

A client only: it uses the generated stubs and its own code. Events come from a JSONL file of DecideRequest
messages in protobuf JSON (``python -m loadtest.bench`` writes one from held-out data); each request gets a
fresh request_id so idempotency never short-circuits the work being measured.

    python -m loadtest.loadgen --target 127.0.0.1:50051 --events events.jsonl -n 2000 -c 16 --out r.json

It connects as the riskcascade config's ``security`` section says (TLS with its CA, its client token; --config,
else $RISKCASCADE_CONFIG, else the defaults that `riskcascade up` uses), or in plaintext with --plaintext (the bare
baselines and Ray Serve's gRPC proxy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from orchestrator.client import ClientSecurityError, channel_credentials, open_aio_channel
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc as pb_grpc
from riskcascade.config import ConfigError, load_settings

MODES = ("decide", "health")
PERCENTILES = (50, 95, 99)


@dataclass
class LoadResult:
    label: str
    mode: str
    target: str
    requests: int
    concurrency: int
    ok: int
    errors: dict[str, int]
    seconds: float
    throughput_rps: float
    latency_ms: dict[str, float]
    escalated_share: float | None = None
    degraded_share: float | None = None
    actions: dict[str, int] = field(default_factory=dict)
    stage_ms_p50: dict[str, float] = field(default_factory=dict)


async def run_bounded(n: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> None:
    """Run call(0) .. call(n-1) with at most ``concurrency`` in flight (closed-loop workers)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await call(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


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


async def run_load(
    target: str,
    mode: str,
    n: int,
    concurrency: int,
    events: list[pb.DecideRequest],
    deadline_s: float,
    label: str,
    progress: bool = True,
    warmup: int = 20,
    metadata: tuple[tuple[str, str], ...] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> LoadResult:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    actions: dict[str, int] = {}
    escalated = degraded = 0
    stage_times: dict[str, list[float]] = {}
    run_id = uuid.uuid4().hex[:10]
    async with open_aio_channel(target, credentials) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        decide = pb_grpc.DecisionServiceStub(channel).Decide
        check = health_pb2_grpc.HealthStub(channel).Check

        async def one(i: int, record: bool) -> None:
            nonlocal escalated, degraded
            started = time.perf_counter()
            try:
                if mode == "health":
                    await check(health_pb2.HealthCheckRequest(), timeout=deadline_s)
                else:
                    request = pb.DecideRequest()
                    request.CopyFrom(events[i % len(events)])
                    request.request_id = f"load-{run_id}-{'w' if not record else ''}{i}"
                    decision = (await decide(request, timeout=deadline_s, metadata=metadata or None)).decision
            except grpc.aio.AioRpcError as err:
                if record:
                    errors[err.code().name] = errors.get(err.code().name, 0) + 1
                return
            if not record:
                return
            latencies.append((time.perf_counter() - started) * 1000.0)
            if mode == "decide":
                name = pb.Action.Name(decision.action)
                actions[name] = actions.get(name, 0) + 1
                escalated += decision.escalated
                degraded += decision.degraded
                for t in decision.timings:
                    stage_times.setdefault(t.stage, []).append(t.duration_ms)

        for i in range(warmup):  # connection set-up and first-call costs stay out of the figures
            await one(i, record=False)

        bar = tqdm(total=n, desc=label, unit="req", disable=not progress, leave=False)

        async def measured(i: int) -> None:
            await one(i, record=True)
            bar.update(1)

        started = time.perf_counter()
        await run_bounded(n, concurrency, measured)
        seconds = time.perf_counter() - started
        bar.close()

    ok = len(latencies)
    return LoadResult(
        label=label,
        mode=mode,
        target=target,
        requests=n,
        concurrency=concurrency,
        ok=ok,
        errors=errors,
        seconds=round(seconds, 3),
        throughput_rps=round(ok / seconds, 1) if seconds > 0 else 0.0,
        latency_ms=latency_figures(latencies),
        escalated_share=round(escalated / ok, 4) if mode == "decide" and ok else None,
        degraded_share=round(degraded / ok, 4) if mode == "decide" and ok else None,
        actions=actions,
        stage_ms_p50={k: round(float(np.percentile(v, 50)), 3) for k, v in stage_times.items()},
    )


def latency_figures(latencies: list[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of latencies in ms (NaN when there are none)."""
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return {f"p{p}": round(float(np.percentile(lat, p)), 3) for p in PERCENTILES} | {
        "mean": round(float(lat.mean()), 3)
    }


def format_result(r: LoadResult) -> str:
    lat = r.latency_ms
    line = (
        f"{r.label:<34} n={r.ok:>5}/{r.requests:<5} c={r.concurrency:<3} "
        f"p50 {lat['p50']:8.2f} ms  p95 {lat['p95']:8.2f} ms  p99 {lat['p99']:8.2f} ms  "
        f"{r.throughput_rps:8.1f} req/s"
    )
    if r.escalated_share is not None:
        line += f"  escalated {r.escalated_share:.1%}"
    if r.errors:
        line += f"  errors {r.errors}"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port of the gRPC server")
    parser.add_argument("--mode", choices=MODES, default="decide", help="Decide calls, or bare health checks")
    parser.add_argument("--events", type=Path, help="JSONL of DecideRequest (required for --mode decide)")
    parser.add_argument("-n", "--requests", type=int, default=2000, help="requests to send")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--deadline-ms", type=float, default=2000.0, help="per-request gRPC deadline")
    parser.add_argument("--label", default="", help="name of this run in the results")
    parser.add_argument("--out", type=Path, help="append the result as one JSON line to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                        help="gRPC metadata on every call (e.g. application=NAME for Ray Serve's gRPC proxy)")
    parser.add_argument("--warmup", type=int, default=20, help="unrecorded calls before measuring")
    parser.add_argument("--config", default=None,
                        help="riskcascade YAML whose security section says how to connect (TLS, token)")
    parser.add_argument("--plaintext", action="store_true", help="no TLS and no token (bare baselines, Serve proxy)")
    args = parser.parse_args(argv)
    try:
        metadata = tuple(tuple(item.split("=", 1)) for item in args.metadata)
        if any(len(pair) != 2 or not pair[0] for pair in metadata):
            raise ValueError
    except ValueError:
        parser.error("--metadata takes KEY=VALUE")
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    if args.mode == "decide" and not args.events:
        parser.error("--events is required for --mode decide")
    events = read_events(args.events) if args.events else []
    try:
        credentials = None if args.plaintext else channel_credentials(load_settings(args.config).security)
    except (ConfigError, ClientSecurityError) as exc:
        raise SystemExit(str(exc)) from None
    result = asyncio.run(
        run_load(args.target, args.mode, args.requests, args.concurrency, events, args.deadline_ms / 1000.0,
                 args.label or args.mode, progress=not args.quiet, warmup=args.warmup, metadata=metadata,
                 credentials=credentials)
    )
    print(format_result(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(asdict(result)) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
