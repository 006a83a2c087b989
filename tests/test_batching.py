"""The orchestrator's micro-batcher (orchestrator/batching.py): coalescing, adaptivity, deadlines, failures."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.batching import BatchTimeout, MicroBatcher


class Recorder:
    """A batch call that records each batch and, when gated, waits until released."""

    def __init__(self, gated: bool = False, fail: Exception | None = None, short: bool = False):
        self.batches: list[list[int]] = []
        self.timeouts: list[float] = []
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.fail = fail
        self.short = short

    async def __call__(self, items: list[int], timeout_s: float) -> list[int]:
        self.batches.append(list(items))
        self.timeouts.append(timeout_s)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        results = [i * 10 for i in items]
        return results[:-1] if self.short else results


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_calls_made_together_share_one_batch_call_and_get_their_own_results():
    async def scenario():
        call = Recorder()
        batcher = MicroBatcher(call, max_batch_size=64, max_in_flight=2)
        results = await asyncio.gather(*(batcher.submit(i, 1.0) for i in range(20)))
        assert results == [i * 10 for i in range(20)]
        assert call.batches == [list(range(20))]
        assert batcher.stats.batches == 1 and batcher.stats.mean_batch_size == 20

    run(scenario())


def test_a_lone_call_goes_at_once_without_waiting_for_company():
    async def scenario():
        call = Recorder(gated=True)
        batcher = MicroBatcher(call, max_batch_size=64, max_in_flight=1)
        waiter = asyncio.ensure_future(batcher.submit(1, 1.0))
        for _ in range(3):  # a few turns of the loop, no timer: it has been sent
            await asyncio.sleep(0)
        assert call.batches == [[1]]
        call.gate.set()
        assert await waiter == 10

    run(scenario())


def test_arrivals_during_a_busy_call_form_the_next_batch():
    async def scenario():
        call = Recorder(gated=True)
        batcher = MicroBatcher(call, max_batch_size=64, max_in_flight=1)
        first = asyncio.ensure_future(batcher.submit(0, 1.0))
        await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(batcher.submit(i, 1.0)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        assert call.batches == [[0]] and batcher.waiting == 5  # queued behind the busy call, not sent one by one
        call.gate.set()
        assert await first == 0 and await asyncio.gather(*later) == [10, 20, 30, 40, 50]
        assert call.batches == [[0], [1, 2, 3, 4, 5]]

    run(scenario())


def test_batches_never_exceed_the_size_limit_and_use_every_slot():
    async def scenario():
        call = Recorder()
        batcher = MicroBatcher(call, max_batch_size=4, max_in_flight=3)
        results = await asyncio.gather(*(batcher.submit(i, 1.0) for i in range(10)))
        assert results == [i * 10 for i in range(10)]
        assert [len(b) for b in call.batches] == [4, 4, 2]
        assert sorted(i for b in call.batches for i in b) == list(range(10))

    run(scenario())


def test_an_item_whose_time_runs_out_while_queued_is_never_sent():
    async def scenario():
        call = Recorder(gated=True)
        batcher = MicroBatcher(call, max_batch_size=64, max_in_flight=1)
        busy = asyncio.ensure_future(batcher.submit(0, 5.0))
        await asyncio.sleep(0.01)
        with pytest.raises(BatchTimeout):
            await batcher.submit(1, 0.02)  # waits behind the busy call and gives up
        patient = asyncio.ensure_future(batcher.submit(2, 5.0))
        await asyncio.sleep(0.01)
        call.gate.set()
        assert await busy == 0 and await patient == 20
        assert call.batches == [[0], [2]] and batcher.stats.dropped == 1

    run(scenario())


def test_a_batch_call_gets_the_latest_deadline_of_its_items():
    async def scenario():
        call = Recorder()
        batcher = MicroBatcher(call, max_batch_size=64, max_in_flight=1)
        await asyncio.gather(batcher.submit(1, 0.2), batcher.submit(2, 3.0))
        assert 2.5 < call.timeouts[0] <= 3.0

    run(scenario())


def test_a_failed_batch_call_fails_each_of_its_items_with_its_error():
    async def scenario():
        call = Recorder(fail=ValueError("replica gone"))
        batcher = MicroBatcher(call, max_batch_size=64, max_in_flight=1)
        outcomes = await asyncio.gather(*(batcher.submit(i, 1.0) for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, ValueError) and str(o) == "replica gone" for o in outcomes)
        # the batcher goes on after a failure
        call.fail = None
        assert await batcher.submit(7, 1.0) == 70

    run(scenario())


def test_a_batch_answering_the_wrong_number_of_results_fails_its_items():
    async def scenario():
        batcher = MicroBatcher(Recorder(short=True), max_batch_size=64, max_in_flight=1)
        outcomes = await asyncio.gather(*(batcher.submit(i, 1.0) for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, RuntimeError) and "2 results for 3 items" in str(o) for o in outcomes)

    run(scenario())


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), max_batch_size=0, max_in_flight=1)
