"""ArrivalGate: a lone request skips the batch window; requests that arrive together do not."""

import asyncio

from services.scorer.arrivals import ArrivalGate


async def enter(gate: ArrivalGate) -> bool:
    async with gate.enter() as lone:
        await asyncio.sleep(0)
        return lone


def test_a_lone_request_is_told_so_every_time():
    gate = ArrivalGate()

    async def one_after_another():
        return [await enter(gate) for _ in range(5)]

    assert asyncio.run(one_after_another()) == [True] * 5
    assert gate.in_flight == 0


def test_requests_that_arrive_together_all_see_company():
    gate = ArrivalGate()

    async def together():
        return await asyncio.gather(*(enter(gate) for _ in range(8)))

    assert asyncio.run(together()) == [False] * 8
    assert gate.in_flight == 0


def test_the_count_is_released_when_scoring_fails():
    gate = ArrivalGate()

    async def failing():
        async with gate.enter():
            raise ValueError("model error")

    try:
        asyncio.run(failing())
    except ValueError:
        pass
    assert gate.in_flight == 0
