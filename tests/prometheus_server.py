"""A real Prometheus for tests: Debian's ``prometheus`` on a free loopback port, scraping the given targets.

``running_prometheus(targets)`` starts one with a one-second scrape interval and a temporary database, and stops
it; ``query`` asks its HTTP API. Without the binary the tests that need it are skipped, or fail when
``RISKCASCADE_REQUIRE_PROMETHEUS=1`` (CI installs it: ``make prometheus``). ``promtool`` (same package) checks the
alert and recording rules in deploy/prometheus/.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.system_binaries import required_binary

MISSING = "{} is not installed: `make prometheus` (apt-get install -y prometheus)"
START_TIMEOUT_S = 60.0
SCRAPE_INTERVAL_S = 1


def prometheus_binary(name: str = "prometheus") -> str:
    return required_binary(name, "RISKCASCADE_REQUIRE_PROMETHEUS", MISSING.format(name))


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:  # noqa: S310 - loopback
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector of ``expr`` now: [{"metric": {...labels}, "value": [time, "text"]}]."""
        return self.get("/api/v1/query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` now, None when it has no sample."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def targets_up(self) -> dict[str, str]:
        """{job: health} of the active scrape targets."""
        return {t["labels"]["job"]: t["health"] for t in self.get("/api/v1/targets")["activeTargets"]}

    def wait_for(self, expr: str, predicate, timeout_s: float) -> float | None:  # noqa: ANN001
        """Poll ``expr`` until ``predicate(value)`` holds; the last value (the caller asserts on it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.value(expr)
            if (value is not None and predicate(value)) or time.monotonic() > deadline:
                return value
            time.sleep(0.5)


@contextmanager
def running_prometheus(targets: Mapping[str, str], port: int,
                       rule_files: tuple[Path, ...] = ()) -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1:``port`` scraping each ``{job: host:port}`` every second, until the block ends."""
    binary = prometheus_binary()
    with tempfile.TemporaryDirectory(prefix="prometheus-") as folder:
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }
        config_path = Path(folder) / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        log = (Path(folder) / "prometheus.log").open("w")
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={folder}/data",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        server = Prometheus(f"http://127.0.0.1:{port}")
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2):  # noqa: S310 - loopback
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"prometheus did not start: {(Path(folder) / 'prometheus.log').read_text()[-3000:]}"
                        ) from None
                    time.sleep(0.3)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
