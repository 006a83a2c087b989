"""Shared fixtures. The end-to-end ones start the real platform once per session: `riskcascade up` in a
subprocess (it trains a small model, indexes it into Qdrant Edge, starts a local Ray, deploys the Serve
applications and serves gRPC), exporting spans to a real OTLP receiver in this process.

Every test platform serves TLS and checks bearer tokens (the defaults), with the development material `up` writes
under its own ``<workdir>/secrets``; ``platform_channel`` opens an authenticated channel to any of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from loadtest.local_server import free_port  # noqa: F401 - the tests import it from here
from tests.otlp_receiver import OtlpReceiver

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 420
STOP_TIMEOUT_S = 90
TEST_EVENTS = 8000
RESERVE_MS = 300


def descendants(pid: int) -> set[int]:
    """All live descendant pids of ``pid`` (from /proc; no psutil here)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class RunningPlatform:
    process: subprocess.Popen
    config_path: Path
    workdir: Path
    port: int
    dashboard_port: int
    state: dict
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def otlp_receiver():
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def write_platform_config(workdir: Path, otlp_endpoint: str, **overrides) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": free_port(), "ready_file": str(workdir / "ready.json"),
                   "pid_file": str(workdir / "riskcascade.pid")},
        # Ray exports the replicas' Serve metrics on a known port, for the Prometheus of tests/test_metrics.py
        "ray": {"dashboard_port": free_port(), "num_cpus": 2, "metrics_export_port": free_port()},
        "model": {"dir": str(workdir / "model")},
        "data": {"dir": str(workdir / "data"), "n_events": TEST_EVENTS, "seed": 11},
        # the small test model keeps its text model whatever validation says, so the text path is served
        "training": {"text_model": {"keep": "always"}},
        "retrieval": {"backend": "edge", "edge_path": str(workdir / "edge")},
        "store": {"sqlite_path": str(workdir / "decisions.sqlite")},
        "state": {"log_path": str(workdir / "entity-state.sqlite")},
        "tracing": {"exporter": "otlp", "otlp_endpoint": otlp_endpoint},
        "metrics": {"port": 0},  # the bound port is in the ready file
        "drift": {"export_every_events": 20},  # the replica's PSI gauges refresh within a test's traffic
        # Generous time margins make the deadline paths deterministic on a slow machine: a call with less than
        # 300 ms left never reaches a stage, and one with less than 1 s left after scoring is not escalated.
        "escalation": {"min_reasoner_budget_ms": 1000},
        "security": platform_security(workdir / "secrets"),
    }
    config["server"]["reserve_ms"] = RESERVE_MS
    config["security"]["ray_metrics_export"] = True
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    path = workdir / "riskcascade.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def platform_security(secrets_dir: Path) -> dict:
    """A test platform's security settings: TLS and tokens on, every file under ``secrets_dir`` (which `up` fills
    with development material)."""
    return {
        "tls": True,
        "tokens": True,
        "ca_file": str(secrets_dir / "ca.crt"),
        "tls_cert_file": str(secrets_dir / "server.crt"),
        "tls_key_file": str(secrets_dir / "server.key"),
        "client_cert_file": str(secrets_dir / "client.crt"),
        "client_key_file": str(secrets_dir / "client.key"),
        "tokens_file": str(secrets_dir / "tokens.yaml"),
        "client_token_file": str(secrets_dir / "client.token"),
    }


def platform_settings(platform: RunningPlatform):  # noqa: ANN201 - riskcascade.core.config.Settings
    """The settings a running test platform was started with."""
    from riskcascade.core.config import load_settings

    return load_settings(platform.config_path)


@contextmanager
def platform_channel(platform: RunningPlatform) -> Iterator[grpc.Channel]:
    """A ready channel to ``platform`` with its TLS trust and its all-roles development token."""
    from orchestrator.client import open_channel

    with open_channel(platform_settings(platform), platform.target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


def start_platform(config_path: Path, workdir: Path, new_session: bool = False) -> RunningPlatform:
    config = yaml.safe_load(config_path.read_text())
    ready = Path(config["server"]["ready_file"])
    log_path = workdir / "platform.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "riskcascade.cli", "up", "--config", str(config_path), "--quiet"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=new_session,  # its own process group, as a terminal's foreground job has
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"platform did not start; log:\n{log_path.read_text()[-6000:]}")
        time.sleep(0.5)
    state = json.loads(ready.read_text())
    return RunningPlatform(process, config_path, workdir, state["port"], config["ray"]["dashboard_port"], state, log_path)


def stop_platform(platform: RunningPlatform) -> int:
    platform.process.send_signal(signal.SIGTERM)
    try:
        return platform.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in descendants(platform.process.pid):
            os.kill(pid, signal.SIGKILL)
        platform.process.kill()
        raise


@pytest.fixture(scope="session")
def platform(tmp_path_factory, otlp_receiver):
    workdir = tmp_path_factory.mktemp("platform")
    running = start_platform(write_platform_config(workdir, otlp_receiver.endpoint), workdir)
    yield running
    if running.process.poll() is None:
        stop_platform(running)


@pytest.fixture(scope="session")
def channel(platform):
    with platform_channel(platform) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel):
    from risk.v1 import decision_pb2_grpc

    return decision_pb2_grpc.DecisionServiceStub(channel)


def pytest_collection_modifyitems(config, items):
    """Tests that disrupt the session's platform (kill its replicas) run after those that need it whole, and tests
    that stop it run last."""
    items.sort(key=lambda item: (item.get_closest_marker("stops_platform") is not None,
                                 item.get_closest_marker("disrupts_platform") is not None))


def venv_tool(name: str) -> str | None:
    """An executable installed into this interpreter's environment (its bin/ need not be on PATH)."""
    import shutil

    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)
