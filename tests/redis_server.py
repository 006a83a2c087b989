"""A real Redis server for tests: ``redis-server`` on a free loopback port in a temporary folder, no persistence.

``running_redis()`` starts one and stops it; the session fixture ``redis_url`` shares one per test session (import it
into a test module). Without ``redis-server`` the tests that need it are skipped, or fail when
``RISKCASCADE_REQUIRE_REDIS=1`` (CI installs it: ``make redis``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from loadtest.redis_process import running_redis as start_redis
from tests.system_binaries import required_binary

MISSING = "redis-server is not installed: `make redis` (apt-get install -y redis-server)"


def redis_server_binary() -> str:
    """The path of ``redis-server``; skips the test (fails it under ``RISKCASCADE_REQUIRE_REDIS=1``) without one."""
    return required_binary("redis-server", "RISKCASCADE_REQUIRE_REDIS", MISSING)


@contextmanager
def running_redis(binary: str | None = None) -> Iterator[str]:
    """A fresh ``redis-server`` (``loadtest.redis_process``); skips without one, as ``redis_server_binary``."""
    with start_redis(binary or redis_server_binary()) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """One Redis server for the test session; tests keep apart by key prefix."""
    with running_redis() as url:
        yield url
