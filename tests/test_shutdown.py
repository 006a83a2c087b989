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

    info = stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
    assert info.model_version
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
    assert db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] > 0
    log = platform.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
