"""A throwaway PostgreSQL server: ``initdb`` into a temporary folder, ``postgres`` on a free loopback port.

Debian's ``postgresql`` package keeps its programs in ``/usr/lib/postgresql/<major>/bin`` (not on PATH), so they are
looked up there too. PostgreSQL refuses to run as root: as root, the cluster is made and run as the package's
``postgres`` user, in a folder handed to that user. The cluster trusts loopback connections of its one
role, ``riskcascade`` (a test server, never a deployment's). The test suite wraps this in pytest fixtures
(``tests/postgres_server.py``); benchmarks and the cluster test use it directly.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest.local_server import free_port, stop_process

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
ROLE = "riskcascade"
RUN_AS_WHEN_ROOT = "postgres"


def postgres_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: PATH first, then Debian's versioned folders (newest)."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in folders:
        if (Path(folder) / "initdb").exists() and (Path(folder) / "postgres").exists():
            return Path(folder)
    return None



def _owner() -> dict[str, str]:
    """Popen's ``user``/``group`` arguments: the ``postgres`` user as root (the server is then its own process, so
    signals reach it), nothing otherwise."""
    return {"user": RUN_AS_WHEN_ROOT, "group": RUN_AS_WHEN_ROOT} if os.geteuid() == 0 else {}


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


@contextmanager
def running_postgres(binaries: Path, attempts: int = 3) -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free loopback port; yields the URL of its ``postgres`` database (role
    ``riskcascade``) and stops it on exit, removing its folder. A port taken between choosing and binding it is
    retried on another one."""
    folder = Path(tempfile.mkdtemp(prefix="rc-postgres-"))
    try:
        data, log = folder / "data", folder / "postgres.log"
        if os.geteuid() == 0:
            shutil.chown(folder, RUN_AS_WHEN_ROOT, RUN_AS_WHEN_ROOT)
        subprocess.run(
            [str(binaries / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust", "--no-sync", "-E", "UTF8",
             "--locale=C"],
            check=True, capture_output=True, timeout=START_TIMEOUT_S, cwd=folder, **_owner(),
        )
        for attempt in range(attempts):
            port = free_port()
            with log.open("ab") as errors:  # the child keeps its own copy of the descriptor
                process = subprocess.Popen(
                    [str(binaries / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                     "-k", str(folder), "-c", "max_connections=200"],
                    stdout=subprocess.DEVNULL, stderr=errors, cwd=folder, **_owner(),
                )
            try:
                if _wait_until_it_answers(process, port, log, last=attempt == attempts - 1):
                    yield f"postgresql://{ROLE}@127.0.0.1:{port}/postgres"
                    return
            finally:
                # SIGINT: PostgreSQL's "fast" shutdown, clients still connected are disconnected
                stop_process(process, STOP_TIMEOUT_S, signal.SIGINT)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_until_it_answers(process: subprocess.Popen, port: int, log: Path, last: bool) -> bool:
    """True once the server accepts a query; False if it exited (and another attempt is left)."""
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            if not last:
                return False
            raise RuntimeError(f"postgres exited with {process.returncode}: {log.read_text()[-2000:]}")
        if _answers(port):
            try:
                with psycopg.connect(f"postgresql://{ROLE}@127.0.0.1:{port}/postgres", connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:  # starting up: "the database system is starting up"
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"postgres did not accept connections on port {port} in {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def create_database(url: str, name: str) -> str:
    """Create database ``name`` on the server of ``url`` (the maintenance database); returns its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"
