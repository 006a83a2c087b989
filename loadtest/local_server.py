"""What every throwaway server of the benchmarks and tests shares (Redis, PostgreSQL, the platform's own ports): a
free loopback port, and stopping a server process with a signal and a bounded wait."""

from __future__ import annotations

import signal
import socket
import subprocess


def free_port() -> int:
    """A loopback port free now (another process may take it before it is bound: callers retry on another)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float, how: signal.Signals = signal.SIGTERM) -> None:
    """Send ``how``, wait up to ``timeout_s``, then kill; nothing when it already exited."""
    if process.poll() is not None:
        return
    process.send_signal(how)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)
