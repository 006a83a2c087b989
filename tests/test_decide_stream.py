"""DecideStream at the gateway: a real grpc.aio server with the real servicer, cascade and store, scripted stages
(tests/test_resilience.py's Gateway). Results come as decisions finish, each naming its request; bad items get an
error result and the stream goes on; idempotency holds per item; flow control bounds what one stream holds."""

from __future__ import annotations

import asyncio

import grpc

from risk.v1 import decision_pb2 as pb
from riskcascade.core.config import ServerSettings
from tests.test_resilience import PATIENCE_S, Gateway, _until, request, run


def test_a_stream_answers_every_request_by_name_in_the_order_decisions_finish(tmp_path):
    async def scenario():
        async with Gateway(tmp_path) as gw:
            gate = gw.scorer.hang["slow-1"] = asyncio.Event()
            call = gw.stub.DecideStream(timeout=PATIENCE_S)
            await call.write(request("slow-1", 0.95))
            for i in range(5):
                await call.write(request(f"fast-{i}", 0.05))
            first = [await call.read() for _ in range(5)]  # the slow one is still being decided
            gate.set()
            last = await call.read()
            await call.done_writing()
            end = await call.read()
            return first, last, end, gw.store.count_decisions()

    first, last, end, stored = run(scenario())
    assert sorted(r.request_id for r in first) == [f"fast-{i}" for i in range(5)]
    assert all(r.decision.action == pb.ACTION_APPROVE and r.decision.request_id == r.request_id for r in first)
    assert last.request_id == "slow-1" and last.decision.action == pb.ACTION_BLOCK
    assert end is grpc.aio.EOF and stored == 6  # every streamed decision was stored


def test_a_bad_item_gets_an_error_result_and_the_stream_goes_on(tmp_path):
    async def scenario():
        async with Gateway(tmp_path) as gw:
            bad = request("bad-1", 0.5)
            bad.event.features["score"] = float("nan")
            results = []
            async for result in gw.stub.DecideStream(iter([request("ok-1", 0.05), bad, request("ok-2", 0.95)]),
                                                     timeout=PATIENCE_S):
                results.append(result)
            return {r.request_id: r for r in results}

    results = run(scenario())
    assert set(results) == {"ok-1", "bad-1", "ok-2"}
    error = results["bad-1"].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and error.field == "event.features[score]"
    assert results["ok-1"].decision.action == pb.ACTION_APPROVE
    assert results["ok-2"].decision.action == pb.ACTION_BLOCK


def test_stream_items_keep_decides_idempotency(tmp_path):
    async def scenario():
        async with Gateway(tmp_path) as gw:
            first = await gw.stub.Decide(request("same-1", 0.95), timeout=PATIENCE_S)
            changed = request("same-1", 0.05)
            results = [r async for r in gw.stub.DecideStream(iter([request("same-1", 0.95), changed]),
                                                               timeout=PATIENCE_S)]
            return first.decision, results, gw.scorer.calls

    first, results, calls = run(scenario())
    replayed = next(r for r in results if r.WhichOneof("result") == "decision")
    refused = next(r for r in results if r.WhichOneof("result") == "error")
    assert replayed.decision.replayed and replayed.decision.action == first.action
    assert refused.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert calls == 1  # decided once


def test_a_stream_holds_at_most_its_window_and_is_not_read_further_meanwhile(tmp_path):
    async def scenario():
        settings = ServerSettings(max_stream_in_flight=3)
        async with Gateway(tmp_path, server=settings) as gw:
            gates = {f"w-{i}": gw.scorer.hang.setdefault(f"w-{i}", asyncio.Event()) for i in range(8)}
            call = gw.stub.DecideStream(timeout=PATIENCE_S)
            for i in range(8):
                await call.write(request(f"w-{i}", 0.95))
            await _until(lambda: gw.scorer.calls >= 3)
            await asyncio.sleep(0.2)
            held = (gw.servicer.active_decisions, gw.scorer.calls)
            for gate in gates.values():
                gate.set()
            await call.done_writing()
            results = [r async for r in call]
            return held, results

    held, results = run(scenario())
    assert held == (3, 3)  # three being decided, the other five not yet read
    assert sorted(r.request_id for r in results) == [f"w-{i}" for i in range(8)]
    assert all(r.decision.action == pb.ACTION_BLOCK for r in results)


def test_stream_items_past_the_servers_limit_are_shed_with_an_item_error(tmp_path):
    async def scenario():
        settings = ServerSettings(max_in_flight_decisions=2)
        async with Gateway(tmp_path, server=settings) as gw:
            gates = [gw.scorer.hang.setdefault(f"busy-{i}", asyncio.Event()) for i in range(2)]
            busy = [gw.stub.Decide(request(f"busy-{i}", 0.95), timeout=PATIENCE_S) for i in range(2)]
            await _until(lambda: gw.servicer.active_decisions == 2)
            results = [r async for r in gw.stub.DecideStream(iter([request("s-1", 0.05)]), timeout=PATIENCE_S)]
            for gate in gates:
                gate.set()
            await asyncio.gather(*busy)
            return results

    (result,) = run(scenario())
    assert result.request_id == "s-1" and result.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def test_each_item_gets_the_per_item_deadline(tmp_path):
    async def scenario():
        settings = ServerSettings(stream_item_deadline_ms=300)
        async with Gateway(tmp_path, server=settings) as gw:
            results = [r async for r in gw.stub.DecideStream(iter([request("t-1", 0.05)]), timeout=PATIENCE_S)]
            return results, gw.scorer.timeouts

    results, timeouts = run(scenario())
    assert results[0].decision.action == pb.ACTION_APPROVE
    # the fast model's time is the item's 300 ms less the reserve, not the stream call's PATIENCE_S
    assert 0.2 < timeouts[0] <= 0.3
