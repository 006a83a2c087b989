"""A real PostgreSQL server for tests (``loadtest.postgres_process``): one per test session, a fresh database per
test that asks for one.

Without Debian's ``postgresql`` the tests that need it are skipped, or fail when ``RISKCASCADE_REQUIRE_POSTGRES=1``
(CI installs it: ``make postgres``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.postgres_process import create_database, postgres_binaries, running_postgres

MISSING = "PostgreSQL is not installed: `make postgres` (apt-get install -y postgresql)"


def postgres_binaries_or_skip() -> Path:
    """The folder of ``initdb``/``postgres``; skips the test (fails it under ``RISKCASCADE_REQUIRE_POSTGRES=1``)."""
    found = postgres_binaries()
    if found is None:
        if os.environ.get("RISKCASCADE_REQUIRE_POSTGRES") == "1":
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return found


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """One PostgreSQL server for the test session: the URL of its maintenance database."""
    with running_postgres(postgres_binaries_or_skip()) as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the session's server."""
    return create_database(postgres_server, f"t_{uuid.uuid4().hex[:12]}")
