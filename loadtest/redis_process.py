"""A throwaway ``redis-server``: a free loopback port, a temporary folder, no persistence.

Benchmarks use it directly; the test suite wraps it in pytest fixtures (``tests/redis_server.py``), since loadtest
imports nothing of tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest.local_server import free_port, stop_process

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or None when it is not installed."""
    return shutil.which("redis-server")



def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def running_redis(binary: str, attempts: int = 3) -> Iterator[str]:
    """A fresh ``redis-server`` (``binary``) on a free loopback port; yields its URL and stops it (its folder is
    removed) on exit. A port taken between choosing and binding it is retried on another one."""
    with tempfile.TemporaryDirectory(prefix="rc-redis-") as folder:
        log = Path(folder) / "redis.log"
        for attempt in range(attempts):
            port = free_port()
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", folder, "--logfile", str(log)],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            )
            try:
                if _wait_until_it_answers(process, port, log, last=attempt == attempts - 1):
                    yield f"redis://127.0.0.1:{port}/0"
                    return
            finally:
                stop_process(process, STOP_TIMEOUT_S)


def _wait_until_it_answers(process: subprocess.Popen, port: int, log: Path, last: bool) -> bool:
    """True once PING answers; False if the server exited (and another attempt is left)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers_ping(port):
        if process.poll() is not None:
            if not last:
                return False
            raise RuntimeError(f"redis-server exited with {process.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis-server did not answer PING on port {port} in {START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    return True
