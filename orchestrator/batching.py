"""Coalescing concurrent calls into batch calls. Plain asyncio: no Ray or gRPC import.

``MicroBatcher`` turns many ``await submit(item, timeout_s)`` into few ``await call(items, timeout_s)``. Items
wait in arrival order; whenever fewer than ``max_in_flight`` batch calls are outstanding, the waiting items (at
most ``max_batch_size``) go out together on the next turn of the event loop. So:

- a lone call goes at once: nothing waits for company, there is no batch timer;
- items submitted in the same turn (a DecideBatch's items, a burst the gRPC server read together) share a call;
- under load, while ``max_in_flight`` calls run, new arrivals queue and form the next batch: batch size follows
  the load, and the stage behind does one hop, one feature assembly and one model run per batch.

Each item keeps its own deadline. A waiter whose time runs out (``BatchTimeout``) or who is cancelled stops
waiting; if its item has not been sent yet it is dropped from the queue, never sent. A batch call gets the
latest deadline of its items. A failed batch call fails each of its items with the call's exception.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatchTimeout(Exception):
    """An item's own time ran out before its batch answered."""


@dataclass
class BatcherStats:
    """What the batcher has sent so far (for benchmarks and tests)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    dropped: int = 0  # items whose waiter left before they were sent

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    deadline: float


@dataclass
class MicroBatcher(Generic[T, R]):
    """Coalesces ``submit`` calls into calls of ``call(items, timeout_s) -> results`` (one result per item, in
    order; ``timeout_s`` is None when no item has a limit)."""

    call: Callable[[list[T], float | None], Awaitable[Sequence[R]]]
    max_batch_size: int
    max_in_flight: int
    clock: Callable[[], float] = time.monotonic
    stats: BatcherStats = field(default_factory=BatcherStats)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_in_flight < 1:
            raise ValueError("max_batch_size and max_in_flight must be at least 1")
        self._queue: deque[_Pending[T]] = deque()
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def submit(self, item: T, timeout_s: float | None) -> R:
        """The result for ``item``; raises BatchTimeout after ``timeout_s`` (None: no limit of its own), or the
        batch call's exception."""
        loop = asyncio.get_running_loop()
        deadline = self.clock() + timeout_s if timeout_s is not None else math.inf
        pending = _Pending(item, loop.create_future(), deadline)
        self._queue.append(pending)
        self._schedule(loop)
        if timeout_s is None:
            return await pending.future
        try:
            return await asyncio.wait_for(pending.future, timeout_s)
        except asyncio.TimeoutError:
            raise BatchTimeout(f"no answer within {timeout_s * 1000:.0f} ms") from None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._queue and self._in_flight < self.max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._in_flight < self.max_in_flight and self._queue:
            batch: list[_Pending[T]] = []
            while self._queue and len(batch) < self.max_batch_size:
                pending = self._queue.popleft()
                if pending.future.done():  # its waiter timed out or was cancelled: never sent
                    self.stats.dropped += 1
                    continue
                batch.append(pending)
            if not batch:
                break
            self._in_flight += 1
            self.stats.batches += 1
            self.stats.items += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending[T]]) -> None:
        try:
            latest = max(p.deadline for p in batch)
            timeout_s = latest - self.clock() if latest != math.inf else None
            results = await self.call([p.item for p in batch], timeout_s)
            if len(results) != len(batch):
                raise RuntimeError(f"batch call answered {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - each item fails with the call's own error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)
        finally:
            self._in_flight -= 1
            self._schedule(asyncio.get_running_loop())
