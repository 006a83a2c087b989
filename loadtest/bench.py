"""The cascade benchmark: the platform under load next to baselines measured in the same run.

    python -m loadtest.bench [--duration 10] [-c 64] [--serve-mode default|throughput|both] [--rows ...]
    python -m loadtest.bench --serve-mode throughput --quick          # a smoke run: a few seconds a row

For each Ray Serve mode (default, and RAY_SERVE_THROUGHPUT_OPTIMIZED=1, which must be set before Ray starts,
so each mode runs in its own child process with its own local Ray), it:
1. starts a local Ray and deploys, in one Serve config, the platform's two stages (deploy/serve.yaml) plus the
   baselines of loadtest/baselines.py, with Serve's own gRPC proxy enabled for one of them;
2. starts the platform (`riskcascade up`) attached to that cluster, as an operator would (`ray.address`,
   `deploy_on_start: false`);
3. measures these rows (--rows picks some), each with the load generator (``loadtest.loadgen``, a separate
   process pinned to its own CPU where there is more than one) for --duration seconds after a warm-up:
   - floor: a bare grpc.aio health round trip and a bare Serve handle call to a trivial deployment (from this
     driver), at c=1 and -c; the floor is one of each at c=1;
   - serve-proxy: Serve's own gRPC proxy in front of the same scorer doing the same work (baselines.py);
   - clear: the orchestrator's Decide on clear cases (fast path only), closed loop at c=1 and -c, open loop at
     --rate;
   - mix: Decide on held-out traffic (some escalated), c=1 and -c;
   - batch: DecideBatch of 64 and 256 items; stream: DecideStream on 1 stream (window 256) and 4 (window 64) (clear cases);
   - sweep: open-loop Decide on clear cases at rising rates until errors or lateness blow up;
   with, for every row, the CPU time of the orchestrator process and the Serve replicas over the measured
   window (CPU ms per decision per process group: a cost model's input);
4. writes every figure to loadtest/results/bench-<UTC time>.json, a Markdown report (tables, the goals met or
   not, the machine and the command) and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from loadtest import machine, plots
from loadtest.loadgen import LoadSpec, format_result
from loadtest.local_server import free_port
from loadtest.machine import ProcessGroups

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "loadtest" / "results"
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"  # off, as the platform runs it (orchestrator/platform.py)
SERVICER_FUNCTION = "risk.v1.decision_pb2_grpc.add_DecisionServiceServicer_to_server"
START_TIMEOUT_S = 300
EVENTS_USED = 2000
CLEAR_ROUNDS = 5  # replays of the clear file to drop the events it no longer finds clear
ROWS = ("floor", "serve-proxy", "clear", "mix", "batch", "stream", "sweep")
DEFAULT_DURATION_S, DEFAULT_WARMUP_S = 10.0, 2.0
QUICK_DURATION_S, QUICK_WARMUP_S = 2.0, 0.5
COUNTED_WARMUP = 20  # units of warm-up when rows are measured by count (-n)
SWEEP_RATES = (100, 200, 400, 800, 1600)
# (items per call, calls in flight): at most server.max_in_flight_decisions (512) items at once, or calls are shed
BATCH_ROWS = ((64, 4), (256, 2))
STREAM_ROWS = ((1, 256), (4, 64))  # (streams, window each): at most 256 items outstanding, inside the server's
# max_in_flight_decisions (512), so the rows measure throughput, not shedding
# a sweep stops after a rate where more than this share failed or was sent late, or p99 passed this
SWEEP_MAX_ERROR_SHARE, SWEEP_MAX_LATE_SHARE, SWEEP_MAX_P99_MS = 0.01, 0.05, 1000.0
GOAL_DECISIONS_C64 = 1500.0
GOAL_P50_X_FLOOR, GOAL_P99_X_FLOOR = 1.5, 2.0
GOAL_BULK_DECISIONS = 10_000.0
LOADGEN_SLACK_S = 180
ORCHESTRATOR_ROWS = ("clear-", "mix-", "batch-", "stream-", "sweep-")  # ids of the rows through the orchestrator
FAST_PATH_GROUPS = ("orchestrator", "scorer")  # whose CPU a decision always pays for (cost.py: the fast path)


def prepare_events(settings, workdir: Path) -> tuple[Path, Path, dict]:
    """Held-out events as JSONL: all of them (mixed) and the clear ones only (fast path)."""
    from google.protobuf import json_format

    from loadtest.events import decide_request
    from orchestrator.platform import serve_config_with_settings
    from riskcascade.core.domain import ScoreRequest
    from riskcascade.core.entity_state import EmbeddedEntityState
    from riskcascade.core.features import FeatureLayout
    from riskcascade.core.model_registry import live_model_dir
    from riskcascade.modelling.synthetic import event_text, read_events_csv
    from services.scorer.fast_model import FastModel

    # scored in the scorer's own batch size (its user_config in deploy/serve.yaml) to pick the clear ones
    batch = next(d["user_config"]["max_batch_size"] for app in serve_config_with_settings(settings)["applications"]
                 if app["name"] == settings.ray.scorer_app for d in app["deployments"])
    events = read_events_csv(settings.data.dir / "test.csv")[:EVENTS_USED]
    # The load generator sends each run and pass as a population the platform has not seen (fresh entity ids:
    # loadgen.with_entity_tag), so "clear" is what the scorer's own serving path says of these events, in time
    # order, from an empty entity state: the scores the platform gives them in a load run.
    model_dir = live_model_dir(settings.model.dir)
    layout = FeatureLayout.load(model_dir).state
    model = FastModel(model_dir, reason_count=0,
                      state=EmbeddedEntityState(layout) if layout is not None else None)
    low, high = model.info.band_low, model.info.band_high

    def fresh_scores(chosen: list[int]) -> np.ndarray:
        model.state = EmbeddedEntityState(layout) if layout is not None else None
        requests = [ScoreRequest.of(events[i].case_id, events[i].event_type, events[i].entities,
                                    dict(events[i].features), occurred_at=events[i].occurred_at,
                                    text=event_text(events[i])) for i in chosen]
        return np.array([s.score for start in range(0, len(requests), batch)
                         for s in model.score_batch(requests[start:start + batch])])

    scores = fresh_scores(list(range(len(events))))
    clear = (scores < low) | (scores >= high)
    # The clear file is sent without the other events, which changes the entity features of some clear ones:
    # keep only the events that are clear when the clear file itself is replayed (a fixed point, a few rounds).
    for _ in range(CLEAR_ROUNDS):
        chosen = [int(i) for i in np.flatnonzero(clear)]
        again = fresh_scores(chosen)
        still = (again < low) | (again >= high)
        if still.all():
            break
        clear[np.array(chosen)[~still]] = False
    mixed_path, clear_path = workdir / "events-mixed.jsonl", workdir / "events-clear.jsonl"
    lines = [json_format.MessageToJson(decide_request(e, "template"), indent=None) for e in events]
    mixed_path.write_text("\n".join(lines) + "\n")
    clear_path.write_text("\n".join(line for line, c in zip(lines, clear) if c) + "\n")
    return mixed_path, clear_path, {
        "events": len(events), "clear_share": round(float(clear.mean()), 4), "band": [low, high],
        "model_version": model.info.model_version,
    }


def combined_serve_config(settings, grpc_port: int, band: list[float]) -> dict:
    from orchestrator.platform import serve_config_with_settings

    config = serve_config_with_settings(settings)
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": free_port()}
    config["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]}
    config["applications"] += [
        # Baselines reserve no CPU, so they never keep the platform's own replicas from being scheduled, and
        # accept as many requests at once as the scorer does (Serve's default of 5 would queue them).
        {"name": "bench_echo", "route_prefix": "/bench-echo", "import_path": "loadtest.baselines:build_echo",
         "args": {}, "deployments": [{"name": "Echo", "max_ongoing_requests": 128,
                                      "ray_actor_options": {"num_cpus": 0}}]},
        {"name": "bench_scorer_grpc", "route_prefix": "/bench-scorer-grpc",
         "import_path": "loadtest.baselines:build_scorer_grpc_ingress",
         "args": {"scorer_app": settings.ray.scorer_app, "band_low": band[0], "band_high": band[1],
                  "validation": settings.validation.model_dump(mode="json")},
         "deployments": [{"name": "ScorerGrpcIngress", "max_ongoing_requests": 128,
                          "ray_actor_options": {"num_cpus": 0}}]},
    ]
    return config


def process_groups(settings, orchestrator_pid: int) -> ProcessGroups:
    """The server-side processes whose CPU time each row reports, found by pid file and Ray's process titles."""
    from loadtest.machine import pids_matching, serve_replica_pids

    return ProcessGroups({
        "orchestrator": [orchestrator_pid],
        "scorer": serve_replica_pids(settings.ray.scorer_app),
        "reasoner": serve_replica_pids(settings.ray.reasoner_app),
        "serve_proxy": pids_matching("ProxyActor"),
        "serve_controller": pids_matching("ServeController"),
        "baselines": serve_replica_pids("bench_scorer_grpc") + serve_replica_pids("bench_echo"),
        "bench_driver": [os.getpid()],  # the bare gRPC server and the in-driver handle calls
    })


def service_info(config_path: Path, target: str) -> dict:
    """GetServiceInfo from the running orchestrator: model version and the scorer's execution provider."""
    from orchestrator.client import open_channel
    from risk.v1 import decision_pb2 as pb
    from risk.v1 import decision_pb2_grpc as pb_grpc
    from riskcascade.core.config import load_settings

    with open_channel(load_settings(config_path), target) as channel:
        info = pb_grpc.DecisionServiceStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=30)
    return {"model_version": info.model_version, "provider": info.scorer_provider,
            "provider_detail": info.scorer_provider_detail, "band": [info.band_low, info.band_high],
            "policy_version": info.policy_version, "retrieval_backend": info.retrieval_backend}


class Rows:
    """Runs and collects the rows of one Serve mode: the load generator in a child process per row."""

    def __init__(self, args: argparse.Namespace, workdir: Path, groups: ProcessGroups):
        self.args = args
        self.workdir = workdir
        self.groups = groups
        self.results: list[dict] = []

    def timing(self, items_per_call: int = 1) -> list[str]:
        """By count (-n decisions: a batch row sends that many items, in calls) or by duration."""
        a = self.args
        if a.requests is not None:
            calls = max(1, -(-a.requests // items_per_call))
            return ["-n", str(calls), "--warmup", str(max(1, -(-COUNTED_WARMUP // items_per_call)))]
        return ["--duration", str(a.duration), "--warmup-s", str(a.warmup_s)]

    def spec(self, **kw) -> LoadSpec:
        a = self.args
        if a.requests is not None:
            return LoadSpec(requests=a.requests, warmup=COUNTED_WARMUP, **kw)
        return LoadSpec(duration_s=a.duration, warmup_s=a.warmup_s, **kw)

    async def loadgen(self, row_id: str, label: str, target: str, *, mode: str = "decide", events: Path | None = None,
                      concurrency: int = 1, rate: float | None = None, config: Path | None = None,
                      items_per_call: int = 1, extra: tuple[str, ...] = ()) -> dict:
        """One row by the load generator (``config``: TLS and token as it says; without one, plaintext)."""
        out = self.workdir / f"row-{len(self.results):02d}.jsonl"
        cmd = [sys.executable, "-m", "loadtest.loadgen", "--target", target, "--mode", mode, "-c", str(concurrency),
               "--label", label, "--out", str(out), "--quiet", *self.timing(items_per_call),
               *self.groups.as_arguments(), *extra]
        cmd += ["--rate", str(rate)] if rate is not None else []
        cmd += ["--config", str(config)] if config is not None else ["--plaintext"]
        cmd += ["--events", str(events)] if events is not None else []
        cmd += ["--cpu", str(self.args.client_cpu)] if self.args.client_cpu is not None else []
        limit = (self.args.duration + self.args.warmup_s if self.args.requests is None else 1800) + LOADGEN_SLACK_S
        # the bare gRPC server lives in this process's loop: run the child without blocking it
        done = await asyncio.to_thread(subprocess.run, cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
        print(done.stdout.strip() or done.stderr.strip()[-2000:], flush=True)
        if not out.exists():  # exit status 1 with a result = nothing answered (counted), which is a figure too
            raise RuntimeError(f"load generator failed for {label}: {done.stderr[-2000:]}")
        return self.add(row_id, json.loads(out.read_text().strip().splitlines()[-1]))

    def add(self, row_id: str, result: dict) -> dict:
        result["id"] = row_id
        if row_id.startswith(ORCHESTRATOR_ROWS):
            # the fast path's processes, the input loadtest/cost.py reads (its per-group parts stay in "cpu")
            parts = [result["cpu"].get(g, {}).get("ms_per_decision") for g in FAST_PATH_GROUPS]
            result["cpu_ms_per_decision"] = round(sum(parts), 4) if None not in parts else None
        self.results.append(result)
        return result


def blown_up(result: dict) -> bool:
    """Past what the server (or the client) can take: errors, late sends, or a p99 past a second."""
    sent = max(result["sent"], 1)
    p99 = result["latency_ms"]["p99"]
    return (_errors_share(result) > SWEEP_MAX_ERROR_SHARE or result["late_sends"] > SWEEP_MAX_LATE_SHARE * sent
            or p99 is None or p99 > SWEEP_MAX_P99_MS)


async def run_mode(args: argparse.Namespace, serve_mode: str) -> dict:
    import ray
    from ray import serve

    from loadtest.baselines import BareGrpcServer, handle_round_trips
    from orchestrator.platform import deploy_serve_config, wait_running
    from riskcascade.core.config import load_settings

    base = load_settings(args.config)
    workdir = Path(tempfile.mkdtemp(prefix=f"riskcascade-bench-{serve_mode}-"))
    mixed, clear, data_info = prepare_events(base, workdir)
    grpc_proxy_port, platform_port = free_port(), free_port()
    ray.init(include_dashboard=False, num_cpus=os.cpu_count(), log_to_driver=False, namespace=base.ray.namespace)
    gcs = ray.get_runtime_context().gcs_address
    overrides = {
        "server": {"host": "127.0.0.1", "port": platform_port, "ready_file": str(workdir / "ready.json"),
                   "pid_file": str(workdir / "riskcascade.pid")},
        "ray": {"address": gcs, "deploy_on_start": False, "throughput_optimized": serve_mode == "throughput"},
        "store": {"sqlite_path": str(workdir / "decisions.sqlite")},
        "tracing": {"exporter": "none"},
    }
    settings = load_settings(args.config, **{k: base.model_dump()[k] | v for k, v in overrides.items()})
    apps = deploy_serve_config(combined_serve_config(settings, grpc_proxy_port, data_info["band"]))
    await wait_running(apps, START_TIMEOUT_S, settings.ray.app_poll_interval_s)
    config_path = workdir / "riskcascade.yaml"
    config_path.write_text(yaml.safe_dump(settings.to_wire()))
    env = {**os.environ, THROUGHPUT_ENV: "1" if serve_mode == "throughput" else "0", DIRECT_INGRESS_ENV: "0"}
    platform = subprocess.Popen(
        [sys.executable, "-m", "riskcascade.cli", "up", "--config", str(config_path), "--quiet"],
        cwd=REPO, env=env, stdout=(workdir / "platform.log").open("w"), stderr=subprocess.STDOUT,
    )
    bare = BareGrpcServer()
    await bare.start()
    rows: Rows | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (workdir / "ready.json").exists():
            if platform.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"platform did not start: {(workdir / 'platform.log').read_text()[-3000:]}")
            await asyncio.sleep(0.5)
        ready = json.loads((workdir / "ready.json").read_text())
        groups = process_groups(settings, ready["pid"])
        print(f"processes watched: {groups.groups}", flush=True)
        info = await asyncio.to_thread(service_info, config_path, f"127.0.0.1:{platform_port}")
        rows = Rows(args, workdir, groups)
        await measure_rows(rows, args, bare.port, grpc_proxy_port, platform_port, config_path, clear, mixed,
                           serve.get_app_handle("bench_echo"), handle_round_trips)
    finally:
        await bare.stop()
        if platform.poll() is None:
            platform.send_signal(signal.SIGTERM)
            platform.wait(timeout=120)
        await serve.shutdown_async()
        ray.shutdown()
    return {"serve_mode": serve_mode, "data": data_info, "service": info, "processes": groups.groups,
            "results": rows.results}


async def measure_rows(rows: Rows, args: argparse.Namespace, bare_port: int, proxy_port: int, platform_port: int,
                       config: Path, clear: Path, mixed: Path, echo, handle_round_trips) -> None:
    c_loaded = args.concurrency
    platform = f"127.0.0.1:{platform_port}"
    wanted = set(args.rows)
    if "floor" in wanted:
        for c in sorted({1, c_loaded}):
            await rows.loadgen(f"floor-grpc-c{c}", f"bare grpc.aio health (c={c})", f"127.0.0.1:{bare_port}",
                               mode="health", concurrency=c)
            result = await handle_round_trips(echo, rows.spec(mode="health", concurrency=c),
                                              f"bare Serve handle call (c={c})", rows.groups)
            print(format_result(result), flush=True)
            rows.add(f"floor-handle-c{c}", asdict(result))
    if "serve-proxy" in wanted:
        for c in sorted({1, c_loaded}):
            await rows.loadgen(f"proxy-c{c}", f"Serve gRPC proxy -> scorer (c={c})", f"127.0.0.1:{proxy_port}",
                               events=clear, concurrency=c, extra=("--metadata", "application=bench_scorer_grpc"))
    if "clear" in wanted:
        for c in sorted({1, c_loaded}):
            await rows.loadgen(f"clear-c{c}", f"orchestrator, clear cases (c={c})", platform, events=clear,
                               concurrency=c, config=config)
        await rows.loadgen("clear-open", f"orchestrator, clear cases ({args.rate:g}/s open loop)", platform,
                           events=clear, rate=args.rate, config=config)
    if "mix" in wanted:
        for c in sorted({1, c_loaded}):
            await rows.loadgen(f"mix-c{c}", f"orchestrator, held-out mix (c={c})", platform, events=mixed,
                               concurrency=c, config=config)
    if "batch" in wanted:
        for size, c in BATCH_ROWS:
            await rows.loadgen(f"batch-{size}", f"DecideBatch x{size}, clear (c={c} calls)", platform, mode="batch",
                               events=clear, concurrency=c, config=config, items_per_call=size,
                               extra=("--batch-size", str(size)))
    if "stream" in wanted:
        for streams, window in STREAM_ROWS:
            await rows.loadgen(f"stream-{streams}", f"DecideStream x{streams}, clear (window {window})",
                               platform, mode="stream", events=clear, concurrency=window, config=config,
                               extra=("--streams", str(streams)))
    if "sweep" in wanted:
        for rate in args.sweep_rates:
            result = await rows.loadgen(f"sweep-{rate:g}", f"orchestrator, clear cases, {rate:g}/s", platform,
                                        events=clear, rate=rate, config=config)
            if blown_up(result):
                print(f"sweep stops at {rate:g}/s: errors, late sends or p99 blew up", flush=True)
                break


# ---- the report ----

def by_id(mode: dict) -> dict[str, dict]:
    return {r["id"]: r for r in mode["results"]}


def floor_of(mode: dict) -> dict[str, float | None]:
    """One bare gRPC round trip plus one bare handle call, at c=1 (p50 + p50, p99 + p99: the p99 sum is an
    upper bound of the p99 of the sum)."""
    rows = by_id(mode)
    grpc_row, handle_row = rows.get("floor-grpc-c1"), rows.get("floor-handle-c1")
    if grpc_row is None or handle_row is None:
        return {"p50": None, "p99": None}
    figures = {}
    for p in ("p50", "p99"):
        a, b = grpc_row["latency_ms"][p], handle_row["latency_ms"][p]
        figures[p] = round(a + b, 3) if a is not None and b is not None else None
    return figures


def goals(mode: dict, concurrency: int) -> list[dict]:
    """The four goals of issue 14, each met or not (None: its rows were not measured or nothing answered)."""
    rows, floor = by_id(mode), floor_of(mode)
    found = []
    c64 = rows.get(f"clear-c{concurrency}")
    found.append({"goal": f"{GOAL_DECISIONS_C64:,.0f} decisions/s, Decide on clear cases, closed loop c={concurrency}",
                  "target": f">= {GOAL_DECISIONS_C64:,.0f}/s",
                  "measured": f"{c64['decisions_per_s']:,.0f}/s" if c64 else "not measured",
                  "met": c64["decisions_per_s"] >= GOAL_DECISIONS_C64 if c64 else None})
    open_row = rows.get("clear-open")
    for p, factor in (("p50", GOAL_P50_X_FLOOR), ("p99", GOAL_P99_X_FLOOR)):
        value = open_row["latency_ms"][p] if open_row else None
        met = None
        if value is not None and floor[p] is not None:
            met = value <= factor * floor[p] and not _errors_share(open_row) > SWEEP_MAX_ERROR_SHARE
        found.append({"goal": f"open loop at {open_row['rate']:g}/s, clear cases: {p} within {factor:g}x the floor"
                      if open_row else f"open loop, clear cases: {p} within {factor:g}x the floor",
                      "target": f"<= {factor * floor[p]:.2f} ms ({factor:g} x {floor[p]:.2f})"
                      if floor[p] is not None else "floor not measured",
                      "measured": f"{value:.2f} ms" if value is not None else "not measured", "met": met})
    bulk = [r for r in mode["results"] if r["id"].startswith(("batch-", "stream-"))]
    best = max(bulk, key=lambda r: r["decisions_per_s"], default=None)
    found.append({"goal": f"{GOAL_BULK_DECISIONS:,.0f} decisions/s with DecideBatch or DecideStream",
                  "target": f">= {GOAL_BULK_DECISIONS:,.0f}/s",
                  "measured": f"{best['decisions_per_s']:,.0f}/s ({best['label']})" if best else "not measured",
                  "met": best["decisions_per_s"] >= GOAL_BULK_DECISIONS if best else None})
    return found


def _errors_share(r: dict) -> float:
    return sum(r["errors"].values()) / max(r["sent"], 1)


def _ms(value: float | None) -> str:
    return f"{value:,.2f}" if value is not None else "-"


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "-"


def _cpu(r: dict, *groups: str) -> str:
    values = [r["cpu"].get(g, {}).get("ms_per_decision") for g in groups]
    values = [v for v in values if v is not None]
    return f"{sum(values):.3f}" if values else "-"


def markdown(report: dict, images: dict[str, dict[str, str]]) -> str:
    m = report["machine"]
    lines = [
        f"# riskcascade benchmark, {report['started_at']}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {machine.summary_line(m)}. Load average (1, 5, 15 min) at start {m['load_average']}, at end "
        f"{report['load_average_end']}.",
        "",
        f"Client: {report['client_note']}",
        "",
        f"Each row: {report['per_row']}. Latency is client-observed, in ms; in open-loop rows it counts from the "
        "*scheduled* send (coordinated omission is not hidden) and late sends are listed. Every row of one mode "
        "was measured in the same run. CPU ms per decision: CPU time (user + system) the process group spent over "
        "the row's measured window, divided by the decisions answered; \"other\" is Serve's proxy and controller "
        "and the baseline replicas; \"client\" is the load generator itself.",
        "",
    ]
    for mode in report["modes"]:
        d, s, floor = mode["data"], mode["service"], floor_of(mode)
        lines += [
            f"## Ray Serve mode: {mode['serve_mode']}",
            "",
            f"Model {s['model_version']} on **{s['provider']}** ({s['provider_detail']}); band "
            f"[{s['band'][0]:.3f}, {s['band'][1]:.3f}); policy {s['policy_version']}; retrieval "
            f"{s['retrieval_backend']}. {d['clear_share']:.1%} of {d['events']} held-out events are clear cases.",
            "",
            f"Floor = bare gRPC + one bare handle call (c=1): p50 {_ms(floor['p50'])} ms, p99 {_ms(floor['p99'])} ms.",
            "",
            "| row | loop | p50 | p99 | p99.9 | calls/s | decisions/s | escalated | degraded | errors "
            "| CPU ms/decision: orchestrator | scorer | reasoner | other | client |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mode["results"]:
            lat = r["latency_ms"]
            loop = f"open {r['rate']:g}/s" if r["loop"] == "open" else f"c={r['concurrency']}"
            if r["mode"] == "stream":
                loop = f"{r['streams']} x window {r['concurrency']}"
            errors = ", ".join(f"{k} {v}" for k, v in sorted({**r["errors"], **{
                f"stream {k}": v for k, v in r["stream_errors"].items()}}.items())) or "0"
            if r["loop"] == "open" and r["late_sends"]:
                errors += f"; late {r['late_sends']} (max {r['max_send_lag_ms']:.0f} ms)"
            esc, deg = r["escalated_share"], r["degraded_share"]
            lines.append(
                f"| {r['label']} | {loop} | {_ms(lat['p50'])} | {_ms(lat['p99'])} | {_ms(lat['p99.9'])} | "
                f"{_rate(r['calls_per_s'])} | {_rate(r['decisions_per_s']) if r['decisions'] else '-'} | "
                f"{'-' if esc is None else f'{esc:.1%}'} | {'-' if deg is None else f'{deg:.1%}'} | {errors} | "
                f"{_cpu(r, 'orchestrator')} | {_cpu(r, 'scorer')} | {_cpu(r, 'reasoner')} | "
                f"{_cpu(r, 'serve_proxy', 'serve_controller', 'baselines')} | {_cpu(r, 'client')} |"
            )
        lines += ["", "### Goals", "", "| goal | target | measured | |", "|---|---|---|---|"]
        for g in goals(mode, report["concurrency"]):
            verdict = {True: "**met**", False: "**not met**", None: "not measured"}[g["met"]]
            lines.append(f"| {g['goal']} | {g['target']} | {g['measured']} | {verdict} |")
        staged = [r for r in mode["results"] if r["stage_ms"]]
        if staged:
            lines += ["", "Server-side stage time, p50 / p99 ms (from the decisions' own timings):", ""]
            for r in staged:
                parts = ", ".join(f"{k} {v['p50']:.2f} / {v['p99']:.2f}" for k, v in r["stage_ms"].items())
                lines.append(f"- {r['label']}: {parts}")
        notes = [f"- {r['label']}: {r['note']}" for r in mode["results"] if r.get("note")]
        if notes:
            lines += ["", "Notes:", "", *notes]
        for title, name in images.get(mode["serve_mode"], {}).items():
            lines += ["", f"{title}: ![{title}]({name})"]
        lines.append("")
    return "\n".join(lines)


def write_plots(report: dict, stem: Path) -> dict[str, dict[str, str]]:
    images: dict[str, dict[str, str]] = {}
    for mode in report["modes"]:
        name = mode["serve_mode"]
        rows = by_id(mode)
        made = {}
        sweep = [r for r in mode["results"] if r["id"].startswith("sweep-")]
        path = plots.latency_vs_load(sweep, Path(f"{stem}-{name}-latency-vs-load.png"),
                                     f"Decide, clear cases, open loop ({name} Serve mode)", floor_of(mode))
        if path:
            made["Latency vs offered load"] = path.name
        over_time = [rows[k] for k in (f"clear-c{report['concurrency']}", "clear-open") if k in rows]
        path = plots.latency_over_time(over_time, Path(f"{stem}-{name}-latency-over-time.png"),
                                       f"Decide, clear cases, latency over time ({name} Serve mode)")
        if path:
            made["Latency over time"] = path.name
        images[name] = made
    return images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, help=f"measured seconds per row (default {DEFAULT_DURATION_S:g}; "
                        f"--quick: {QUICK_DURATION_S:g})")
    parser.add_argument("--warmup-s", type=float, help=f"unmeasured seconds before each row (default "
                        f"{DEFAULT_WARMUP_S:g}; --quick: {QUICK_WARMUP_S:g})")
    parser.add_argument("-n", "--requests", type=int,
                        help="measured requests (decisions; batch rows: in calls of their size) per row instead of "
                        "--duration")
    parser.add_argument("--quick", action="store_true", help="a few seconds a row: a smoke test, not figures")
    parser.add_argument("--rows", type=lambda s: [r for r in s.split(",") if r], default=list(ROWS),
                        help=f"comma-separated rows to measure, of {','.join(ROWS)} (default all)")
    parser.add_argument("-c", "--concurrency", type=int, default=64, help="concurrency of the loaded rows")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the open-loop clear-cases row")
    parser.add_argument("--sweep-rates", type=lambda s: [float(r) for r in s.split(",") if r],
                        default=list(SWEEP_RATES), help="requests/s of the latency-vs-load sweep, ascending")
    default_cpu = max(os.sched_getaffinity(0)) if len(os.sched_getaffinity(0)) > 1 else None
    parser.add_argument("--client-cpu", type=lambda s: None if s == "none" else int(s), default=default_cpu,
                        help=f"CPU the load generator is pinned to ('none': not pinned; default {default_cpu})")
    parser.add_argument("--serve-mode", choices=("default", "throughput", "both"), default="both")
    parser.add_argument("--config", default=None, help="riskcascade YAML (model, data and case memory to use)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows are {','.join(ROWS)}")
    if args.duration is None:
        args.duration = QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S
    if args.warmup_s is None:
        args.warmup_s = QUICK_WARMUP_S if args.quick else DEFAULT_WARMUP_S
    if (args.requests is not None and args.requests < 1) or args.concurrency < 1 or args.duration <= 0:
        parser.error("--requests, --concurrency and --duration must be positive")
    return args


def child_command(args: argparse.Namespace, mode: str, child_out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "loadtest.bench", "--serve-mode", mode, "--child-out", str(child_out),
           "--duration", str(args.duration), "--warmup-s", str(args.warmup_s), "--rows", ",".join(args.rows),
           "-c", str(args.concurrency), "--rate", str(args.rate),
           "--sweep-rates", ",".join(f"{r:g}" for r in args.sweep_rates),
           "--client-cpu", "none" if args.client_cpu is None else str(args.client_cpu)]
    cmd += ["-n", str(args.requests)] if args.requests is not None else []
    cmd += ["--config", args.config] if args.config else []
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_out:  # one mode, in this process, with its own Ray
        result = asyncio.run(run_mode(args, args.serve_mode))
        args.child_out.write_text(json.dumps(result))
        return 0

    started = datetime.now(timezone.utc)
    command = shlex.join(["python", "-m", "loadtest.bench", *(sys.argv[1:] if argv is None else argv)])
    modes = ["default", "throughput"] if args.serve_mode == "both" else [args.serve_mode]
    cores = len(os.sched_getaffinity(0))
    client_note = (
        f"the load generator runs pinned to CPU {args.client_cpu} (os.sched_setaffinity); the platform, Ray and "
        f"the baselines are not pinned, so client and server share this machine's {cores} CPUs"
        if args.client_cpu is not None else f"the load generator is not pinned; it shares the {cores} CPUs with "
        "the server")
    per_row = (f"{args.requests} measured calls or items after {COUNTED_WARMUP} of warm-up"
               if args.requests is not None else
               f"{args.duration:g} s of measured sends after {args.warmup_s:g} s of warm-up")
    report = {
        "started_at": started.isoformat(timespec="seconds"), "command": command, "machine": machine.describe(),
        "client_cpu": args.client_cpu, "client_note": client_note, "per_row": per_row,
        "duration_s": args.duration, "warmup_s": args.warmup_s, "requests": args.requests,
        "concurrency": args.concurrency, "quick": args.quick, "rows": args.rows, "modes": [],
    }
    for mode in modes:
        print(f"== Ray Serve mode: {mode}", flush=True)
        child_out = Path(tempfile.mkstemp(suffix=".json")[1])
        env = {**os.environ, THROUGHPUT_ENV: "1" if mode == "throughput" else "0", DIRECT_INGRESS_ENV: "0"}
        if subprocess.run(child_command(args, mode, child_out), cwd=REPO, env=env).returncode != 0:
            print(f"benchmark of mode {mode} failed", file=sys.stderr)
            return 1
        report["modes"].append(json.loads(child_out.read_text()))
        child_out.unlink()
    report["load_average_end"] = machine.load_average()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}"
    images = write_plots(report, stem)
    report["images"] = images
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = markdown(report, images)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"results: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
