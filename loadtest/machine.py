"""The machine a load test ran on, and the CPU time its processes spent while it ran.

``describe()`` is what a results file says about the machine (CPU model, cores, memory, load, GPU, versions).
``ProcessGroups`` names groups of server processes (the orchestrator, the scorer's replicas, ...) and reads
their CPU time (user + system, all threads) from the kernel, so a benchmark can turn the difference over a
measured window into CPU milliseconds per decision: the input of a cost model.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata

import psutil

PACKAGES = ("ray", "grpcio", "protobuf", "onnxruntime-gpu", "numpy")
GPU_QUERY_TIMEOUT_S = 10


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpus() -> list[str]:
    """Names of the NVIDIA GPUs nvidia-smi lists ([] when there is none or no driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=GPU_QUERY_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict:
    """The machine, as a results file records it."""
    found = gpus()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": load_average(),
        "gpu": ", ".join(found) if found else "none found",
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
    }


def summary_line(machine: Mapping) -> str:
    """One line for a Markdown report."""
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    return (
        f"{machine['cpu_model']}, {machine['usable_cpus']} usable of {machine['logical_cpus']} logical CPUs "
        f"({machine['physical_cores']} physical cores), {machine['memory_gib']} GiB memory, GPU: {machine['gpu']}; "
        f"{machine['os']}; Python {machine['python']}, {packages}"
    )


def pin(cpus: Iterable[int]) -> list[int]:
    """Pin this process (all its threads created afterwards) to ``cpus``; returns the CPUs it now runs on."""
    os.sched_setaffinity(0, set(cpus))
    return sorted(os.sched_getaffinity(0))


def pids_matching(fragment: str) -> list[int]:
    """Pids of the processes whose command line contains ``fragment`` (``pgrep -f``), this one excluded."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if fragment in cmdline and proc.info["pid"] != os.getpid():
            found.append(proc.info["pid"])
    return sorted(found)


def serve_replica_pids(app: str, deployment: str = "") -> list[int]:
    """Pids of a Ray Serve application's replica processes (Ray titles them ``ServeReplica:<app>:<deployment>``)."""
    return pids_matching(f"ServeReplica:{app}:{deployment}")


@dataclass
class ProcessGroups:
    """Named groups of processes whose CPU time is read together (a process gone meanwhile counts as 0)."""

    groups: dict[str, list[int]] = field(default_factory=dict)

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds each group has used since its processes started."""
        return {name: sum(process_cpu_seconds(pid) for pid in pids) for name, pids in self.groups.items()}

    def with_group(self, name: str, pids: Iterable[int]) -> ProcessGroups:
        return ProcessGroups({**self.groups, name: sorted(pids)})

    def as_arguments(self) -> list[str]:
        """``--watch NAME=PID,PID`` arguments for the load generator (groups without processes left out)."""
        args = []
        for name, pids in self.groups.items():
            if pids:
                args += ["--watch", f"{name}={','.join(map(str, pids))}"]
        return args


def process_cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0.0
    return times.user + times.system


def cpu_usage(before: Mapping[str, float], after: Mapping[str, float], seconds: float,
              decisions: int) -> dict[str, dict[str, float | None]]:
    """Per group: CPU seconds spent between two readings, cores used on average, and ms per decision."""
    usage = {}
    for name, end in after.items():
        spent = max(0.0, end - before.get(name, 0.0))  # a restarted process can read lower than before
        usage[name] = {
            "cpu_s": round(spent, 4),
            "cores": round(spent / seconds, 3) if seconds > 0 else None,
            "ms_per_decision": round(spent * 1000.0 / decisions, 4) if decisions else None,
        }
    return usage
