"""The cascade benchmark: the platform under load next to baselines measured in the same run.

    python -m loadtest.bench [-n 2000] [-c 16] [--serve-mode default|throughput|both] [--config FILE]

For each Ray Serve mode (default, and RAY_SERVE_THROUGHPUT_OPTIMIZED=1, which must be set before Ray starts,
so each mode runs in its own child process with its own local Ray), it:
1. starts a local Ray and deploys, in one Serve config, the platform's two stages (deploy/serve.yaml) plus the
   baselines of loadtest/baselines.py, with Serve's own gRPC proxy enabled for one of them;
2. starts the platform (`riskcascade up`) attached to that cluster, as an operator would (`ray.address`,
   `deploy_on_start: false`);
3. runs the load generator (a separate process) at concurrency 1 and at -c against: a bare grpc.aio health
   check, Serve's gRPC proxy in front of the same scorer, the orchestrator on clear cases (fast path only)
   and on held-out traffic (mixed, some escalated); and measures bare Serve handle calls to a trivial
   deployment from a driver;
4. writes every figure to loadtest/results/bench-<UTC time>.json and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from loadtest.loadgen import LoadResult, format_result, latency_figures

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "loadtest" / "results"
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"  # off, as the platform runs it (orchestrator/platform.py)
SERVICER_FUNCTION = "risk.v1.decision_pb2_grpc.add_DecisionServiceServicer_to_server"
START_TIMEOUT_S = 300
EVENTS_USED = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_events(settings, workdir: Path) -> tuple[Path, Path, dict]:
    """Held-out events as JSONL: all of them (mixed) and the clear ones only (fast path)."""
    from google.protobuf import json_format

    from loadtest.events import decide_request
    from riskcascade.evaluate_cascade import time_true_inputs
    from riskcascade.synthetic import read_events_csv
    from services.scorer.fast_model import FastModel

    parts = {name: read_events_csv(settings.data.dir / f"{name}.csv") for name in ("train", "valid", "test")}
    events = parts["test"][:EVENTS_USED]
    model = FastModel(settings.model.dir, reason_count=0)
    # the scores the platform gives these events at their own time: time-true features by replay
    x = model.model_input(time_true_inputs(settings.model.dir, parts, "test")[:EVENTS_USED])
    scores = np.array([s.score for s in model.score_matrix(x)])
    low, high = model.info.band_low, model.info.band_high
    clear = (scores < low) | (scores >= high)
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
         "args": {"scorer_app": settings.ray.scorer_app, "band_low": band[0], "band_high": band[1]},
         "deployments": [{"name": "ScorerGrpcIngress", "max_ongoing_requests": 128,
                          "ray_actor_options": {"num_cpus": 0}}]},
    ]
    return config


def run_loadgen(target: str, events: Path | None, n: int, c: int, label: str, out: Path, mode: str = "decide",
                metadata: tuple[str, ...] = (), config: Path | None = None) -> dict:
    """``config``: the platform's riskcascade YAML (TLS and token as it says); without one, plaintext."""
    cmd = [sys.executable, "-m", "loadtest.loadgen", "--target", target, "--mode", mode, "-n", str(n),
           "-c", str(c), "--label", label, "--out", str(out), "--quiet"]
    cmd += ["--config", str(config)] if config is not None else ["--plaintext"]
    if events is not None:
        cmd += ["--events", str(events)]
    for item in metadata:
        cmd += ["--metadata", item]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    print(done.stdout.strip() or done.stderr.strip()[-2000:], flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed for {label}: {done.stderr[-2000:]}")
    return json.loads(out.read_text().strip().splitlines()[-1])


def handle_result(label: str, latencies: list[float], seconds: float, n: int, c: int) -> dict:
    """Handle-call latencies measured in this driver, as the load generator reports its own runs."""
    result = LoadResult(
        label=label, mode="handle", target="serve handle (in-driver)", requests=n, concurrency=c,
        ok=len(latencies), errors={}, seconds=round(seconds, 3),
        throughput_rps=round(len(latencies) / seconds, 1), latency_ms=latency_figures(latencies),
    )
    print(format_result(result), flush=True)
    return asdict(result)


async def run_mode(args: argparse.Namespace, serve_mode: str) -> dict:
    import ray
    from ray import serve
    from loadtest.baselines import BareGrpcServer, handle_round_trips
    from orchestrator.platform import deploy_serve_config, wait_running
    from riskcascade.config import load_settings

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
    await wait_running(apps, START_TIMEOUT_S)
    config_path = workdir / "riskcascade.yaml"
    config_path.write_text(yaml.safe_dump(settings.to_wire()))
    env = {**os.environ, THROUGHPUT_ENV: "1" if serve_mode == "throughput" else "0", DIRECT_INGRESS_ENV: "0"}
    platform = subprocess.Popen(
        [sys.executable, "-m", "riskcascade.cli", "up", "--config", str(config_path), "--quiet"],
        cwd=REPO, env=env, stdout=(workdir / "platform.log").open("w"), stderr=subprocess.STDOUT,
    )
    results: list[dict] = []
    bare = BareGrpcServer()
    await bare.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (workdir / "ready.json").exists():
            if platform.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"platform did not start: {(workdir / 'platform.log').read_text()[-3000:]}")
            await asyncio.sleep(0.5)
        out = workdir / "results.jsonl"
        echo = serve.get_app_handle("bench_echo")
        await handle_round_trips(echo, 50, 1)  # warm-up
        for c in sorted({1, args.concurrency}):
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            # the bare server lives in this process: run the load generator without blocking its loop
            results.append(await loop.run_in_executor(None, lambda: run_loadgen(
                f"127.0.0.1:{bare.port}", None, args.requests, c, f"bare grpc.aio (c={c})", out, mode="health")))
            started = time.perf_counter()
            lat = await handle_round_trips(echo, args.requests, c)
            results.append(handle_result(f"bare Serve handle call (c={c})", lat, time.perf_counter() - started,
                                           args.requests, c))
            results.append(run_loadgen(f"127.0.0.1:{grpc_proxy_port}", clear, args.requests, c,
                                       f"Serve gRPC proxy->scorer (c={c})", out,
                                       metadata=("application=bench_scorer_grpc",)))
            results.append(run_loadgen(f"127.0.0.1:{platform_port}", clear, args.requests, c,
                                       f"orchestrator, clear cases (c={c})", out, config=config_path))
            results.append(run_loadgen(f"127.0.0.1:{platform_port}", mixed, args.requests, c,
                                       f"orchestrator, held-out mix (c={c})", out, config=config_path))
    finally:
        await bare.stop()
        if platform.poll() is None:
            platform.send_signal(signal.SIGTERM)
            platform.wait(timeout=120)
        await serve.shutdown_async()
        ray.shutdown()
    return {"serve_mode": serve_mode, "data": data_info, "results": results}


def markdown(report: dict) -> str:
    lines = [
        f"# riskcascade benchmark, {report['started_at']}",
        "",
        f"Machine: {report['machine']}. Requests per row: {report['requests']}. "
        "Latency is client-observed, in ms. Every row of one mode was measured in the same run.",
        "",
    ]
    for mode in report["modes"]:
        d = mode["data"]
        lines += [
            f"## Ray Serve mode: {mode['serve_mode']}",
            "",
            f"Model {d['model_version']}; band [{d['band'][0]:.3f}, {d['band'][1]:.3f}); "
            f"{d['clear_share']:.1%} of held-out events are clear cases.",
            "",
            "| path | c | p50 | p95 | p99 | req/s | escalated | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in mode["results"]:
            lat = r["latency_ms"]
            esc = r.get("escalated_share")
            lines.append(
                f"| {r['label'].rsplit(' (c=', 1)[0]} | {r['concurrency']} | {lat['p50']:.2f} | {lat['p95']:.2f} | "
                f"{lat['p99']:.2f} | {r['throughput_rps']:.0f} | {'' if esc is None else f'{esc:.1%}'} | "
                f"{sum(r['errors'].values()) if r['errors'] else 0} |"
            )
        stage = [r for r in mode["results"] if r.get("stage_ms_p50")]
        if stage:
            lines += ["", "Server-side stage time, p50 ms (from the decisions' own timings):", ""]
            for r in stage:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in r["stage_ms_p50"].items())
                lines.append(f"- {r['label']}: {parts}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--requests", type=int, default=2000, help="requests per measured row")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="concurrency of the loaded rows")
    parser.add_argument("--serve-mode", choices=("default", "throughput", "both"), default="both")
    parser.add_argument("--config", default=None, help="riskcascade YAML (model, data and case memory to use)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")

    if args.child_out:  # one mode, in this process, with its own Ray
        result = asyncio.run(run_mode(args, args.serve_mode))
        args.child_out.write_text(json.dumps(result))
        return 0

    started = datetime.now(timezone.utc)
    modes = ["default", "throughput"] if args.serve_mode == "both" else [args.serve_mode]
    report = {
        "started_at": started.isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}",
        "requests": args.requests, "concurrency": args.concurrency, "modes": [],
    }
    for mode in modes:
        print(f"== Ray Serve mode: {mode}", flush=True)
        child_out = Path(tempfile.mkstemp(suffix=".json")[1])
        cmd = [sys.executable, "-m", "loadtest.bench", "--serve-mode", mode, "-n", str(args.requests),
               "-c", str(args.concurrency), "--child-out", str(child_out)]
        if args.config:
            cmd += ["--config", args.config]
        env = {**os.environ, THROUGHPUT_ENV: "1" if mode == "throughput" else "0", DIRECT_INGRESS_ENV: "0"}
        if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
            print(f"benchmark of mode {mode} failed", file=sys.stderr)
            return 1
        report["modes"].append(json.loads(child_out.read_text()))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"results: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
