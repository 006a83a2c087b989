"""A system program a test needs (Debian's redis-server, prometheus, promtool): its path, or the test is skipped.

With ``<require_env>=1`` (CI sets it after installing the package) a missing program fails the test instead, so CI
cannot pass by skipping what it was meant to run.
"""

from __future__ import annotations

import os
import shutil

import pytest


def required_binary(name: str, require_env: str, missing: str) -> str:
    """The path of ``name`` on PATH; skips the test with ``missing`` without it (fails it under ``require_env=1``)."""
    found = shutil.which(name)
    if found is None:
        if os.environ.get(require_env) == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    return found
