"""A real Qdrant server for the retrieval tests, when one is given (``QDRANT_URL``, and ``QDRANT_API_KEY`` if it needs
one). No Qdrant server can be installed here (neither Debian nor PyPI ships one), so without it the ``server`` cases of
the backend-parametrized tests skip with ``NO_SERVER``; with it, those tests run on the server exactly as on Qdrant
Edge and qdrant-client's local mode (README, "Testing against a Qdrant server").

Each test's collections are named after its temporary folder (a test that reopens its folder finds them again) and
deleted when the session ends.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SERVER = "server"
NO_SERVER = ("set QDRANT_URL (and QDRANT_API_KEY if the server needs one) to run the retrieval tests against a real "
             "Qdrant server too: none can be installed here")
# the backends of the parametrized retrieval tests: the two embedded ones, and the server where one is given
BACKENDS = ["edge", "qdrant", pytest.param(SERVER, marks=pytest.mark.qdrant_server)]

_created: set[tuple[str, str]] = set()


def on_server(root: Path, **collections: str) -> dict[str, Any]:
    """RetrievalSettings fields that put the named collections (field -> base name, e.g. ``collection="cases"``) on
    the server at QDRANT_URL, named after ``root``; skips the test without QDRANT_URL."""
    url = os.environ.get("QDRANT_URL")
    if not url:
        pytest.skip(NO_SERVER)
    tag = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    names = {field: f"rc_test_{tag}_{name}" for field, name in collections.items()}
    _created.update((url, name) for name in names.values())
    return {"backend": "qdrant", "qdrant_url": url, "qdrant_api_key": os.environ.get("QDRANT_API_KEY"), **names}


@pytest.fixture(scope="session", autouse=True)
def _delete_server_collections() -> Iterator[None]:
    """Delete every collection the session made on a Qdrant server."""
    yield
    if not _created:
        return
    from qdrant_client import QdrantClient

    for url in {url for url, _ in _created}:
        client = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY"))
        try:
            for _, name in sorted(c for c in _created if c[0] == url):
                client.delete_collection(name)
        finally:
            client.close()
