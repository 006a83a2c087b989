"""Stopping the platform: one command, and nothing is left running or half-written. Runs last (it stops the
session's platform)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, alive, descendants

pytestmark = [pytest.mark.slow, pytest.mark.stops_platform]


def test_down_stops_ray_the_server_and_every_child_cleanly(platform, stub):
    from risk.v1 import decision_pb2 as pb

    decided = stub.Decide(
        pb.DecideRequest(request_id="before-stop",
                         event=pb.Event(type=pb.EVENT_TYPE_LOGIN, entities=pb.Entities(account_id="acct-1"))),
        timeout=10,
    ).decision
    assert decided.request_id == "before-stop"
    children = descendants(platform.process.pid)
    assert len(children) >= 3, "a local Ray (gcs, raylet, workers) should be running under the platform"
    down = subprocess.run(
        [sys.executable, "-m", "riskcascade.cli", "down", "--config", str(platform.config_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    assert platform.process.wait(timeout=30) == 0
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [pid for pid in children if alive(pid)]
    assert not left, f"processes left running after stop: {left}"
    assert not (platform.workdir / "riskcascade.pid").exists()
    db = sqlite3.connect(platform.workdir / "decisions.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT action FROM decisions WHERE request_id='before-stop'").fetchone() is not None
    log = platform.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_ctrl_c_stops_the_whole_process_group_cleanly(tmp_path, otlp_receiver, platform):
    """Ctrl-C in a terminal sends SIGINT to every process of the foreground group, Ray's own included."""
    import os
    import signal

    from tests.conftest import start_platform, write_platform_config

    assert platform.process.poll() is not None, "runs after the session's platform has stopped"
    # the stopped session platform's model, data and case index serve again: nothing to train or index here
    config = write_platform_config(
        tmp_path, otlp_receiver.endpoint,
        model={"dir": str(platform.workdir / "model")}, data={"dir": str(platform.workdir / "data")},
        retrieval={"edge_path": str(platform.workdir / "edge")},
    )
    running = start_platform(config, tmp_path, new_session=True)
    children = descendants(running.process.pid)
    assert children
    os.killpg(running.process.pid, signal.SIGINT)
    assert running.process.wait(timeout=90) == 0
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in children if alive(pid)], "processes left running after Ctrl-C"
    log = running.log_path.read_text()
    assert "riskcascade stopped" in log and "Traceback" not in log, log[-3000:]
