"""Tells a request whether it arrived alone, so it can skip the batch window. Plain asyncio, no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ArrivalGate:
    """Counts the requests a replica is handling.

    Scoring is synchronous, so without a pause each request would finish before the next one even started
    and none would ever see company. Entering yields to the event loop once, so requests that arrived
    together all register before any of them learns whether it is alone.
    """

    def __init__(self) -> None:
        self.in_flight = 0

    @asynccontextmanager
    async def enter(self) -> AsyncIterator[bool]:
        """Yields True when this request is the only one in flight."""
        self.in_flight += 1
        try:
            await asyncio.sleep(0)
            yield self.in_flight == 1
        finally:
            self.in_flight -= 1
