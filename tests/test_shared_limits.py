"""Limits shared by several orchestrators (orchestrator/shared_limits.py) against a real ``redis-server``: one
escalation budget for all, leases that outlive a dead holder by no more than their time, a fall back to the
process's own budget when Redis stops or freezes, and circuit openings seen by the other orchestrators.

Each "orchestrator" is its own objects on its own Redis client, in one event loop. Time bounds are lower bounds
(load only makes things later) or generous upper bounds (3x what the path needs, or more).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from contextlib import asynccontextmanager

import pytest

from orchestrator.breaker import CircuitBreaker, CircuitState
from orchestrator.cascade import Busy, CallBudget, Cascade, EscalationSlot, StageLimits
from orchestrator.models import ModelSelection, ServingModel
from orchestrator.shared_limits import SharedCircuits, SharedEscalationBudget, SharedLimits, redis_client
from riskcascade.core.config import ConfigError, MergeSettings, SharedLimitsSettings, load_settings
from riskcascade.core.domain import (
    Action,
    DegradedCause,
    Entities,
    EventType,
    FastScore,
    ReasonerVerdict,
    RiskEvent,
    ScorerInfo,
)
from riskcascade.core.merge import MergeRules
from riskcascade.core.policy import EscalationPolicy
from tests.redis_server import redis_url, running_redis  # noqa: F401 - redis_url is a session fixture

PATIENCE_S = 10.0  # for what takes milliseconds here: waits on a condition, never a sleep of this length
ROUND_TRIP_MS = 2000.0  # Redis timeout where a fallback would spoil the count: a loaded box never reaches it
BAND = (0.2, 0.8)
UNCERTAIN = 0.5  # inside BAND: escalated
_prefixes = itertools.count()


def settings_for(url: str, **changes) -> SharedLimitsSettings:  # noqa: ANN003
    """Settings on ``url`` under a prefix no other test uses (one Redis serves the session)."""
    values = {"redis_url": url, "key_prefix": f"test-shared-{os.getpid()}-{next(_prefixes)}",
              "timeout_ms": ROUND_TRIP_MS, "escalation_lease_s": 60.0}
    return SharedLimitsSettings(**{**values, **changes})


@asynccontextmanager
async def orchestrators(settings: SharedLimitsSettings, limit: int, count: int = 2):
    """``count`` orchestrators' shared parts, each on its own client, closed on exit."""
    outages: list[str] = []
    parts = [SharedLimits(redis_client(settings), settings, limit, outages.append) for _ in range(count)]
    try:
        yield parts, outages
    finally:
        for part in parts:
            await part.close()


async def until(predicate, what: str, timeout_s: float = PATIENCE_S) -> float:  # noqa: ANN001
    """Wait (polling) until ``predicate()`` holds; the monotonic time it held."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.01)
    return time.monotonic()


# -- the escalation budget ----------------------------------------------------------------------------------------


def test_two_orchestrators_never_hold_more_than_the_limit_and_can_use_all_of_it(redis_url):  # noqa: F811
    limit = 4
    settings = settings_for(redis_url)

    async def scenario():
        async with orchestrators(settings, limit) as ((a, b), outages):
            # everyone asks at once, nobody gives back: exactly `limit` slots in all, the others are told it is full
            grabs = await asyncio.gather(*(o.budget.acquire() for _ in range(3 * limit) for o in (a, b)))
            slots = [g for g in grabs if isinstance(g, EscalationSlot)]
            refusals = [g for g in grabs if isinstance(g, Busy)]
            assert len(slots) == limit and all(s.token for s in slots)  # shared slots, none from a fallback
            assert {r.in_flight for r in refusals} == {limit}
            assert a.budget.in_flight + b.budget.in_flight == limit
            for slot in slots:
                (a if slot.token.startswith(f"{a.owner}:") else b).budget.release(slot)
            await a.budget.close()
            await b.budget.close()

            # churn: many workers on both take, hold across awaits and give back; count what is held at once
            held, most, used = 0, 0, 0
            deadline = time.monotonic() + PATIENCE_S

            async def worker(budget: SharedEscalationBudget, rounds: int = 5) -> None:
                nonlocal held, most, used
                while rounds and time.monotonic() < deadline:
                    slot = await budget.acquire()
                    if isinstance(slot, Busy):
                        await asyncio.sleep(0.001)
                        continue
                    rounds -= 1
                    held += 1
                    used += 1
                    most = max(most, held)
                    await asyncio.sleep(0.002)
                    held -= 1  # counted free before Redis is told: the count can only err high
                    budget.release(slot)

            workers = [worker(o.budget) for o in (a, b) for _ in range(3 * limit)]
            await asyncio.gather(*workers)
            assert most <= limit and used == len(workers) * 5 and not outages
            await a.budget.close()
            await b.budget.close()
            assert await a.client.zcard(f"{settings.key_prefix}:escalations") == 0  # every release reached Redis

    asyncio.run(scenario())


def test_the_slots_of_a_holder_that_dies_come_back_after_the_lease(redis_url):  # noqa: F811
    limit, lease_s = 3, 4.0
    settings = settings_for(redis_url, escalation_lease_s=lease_s, timeout_ms=1000.0)
    # the survivor's own slot must outlive the dead's however loaded the machine is: its leases are long
    lasting = settings.model_copy(update={"escalation_lease_s": 60.0})

    async def scenario():
        async with orchestrators(lasting, limit, count=1) as ((survivor,), _):
            dead = SharedLimits(redis_client(settings), settings, limit)
            taken_from = time.monotonic()
            slots = [await dead.budget.acquire() for _ in range(limit - 1)]
            assert all(isinstance(s, EscalationSlot) and s.token for s in slots)
            assert slots[0].max_s == pytest.approx(lease_s - 2.0)  # runs at most the lease less two round trips
            await dead.client.aclose()  # it crashes: never releases
            mine = await survivor.budget.acquire()
            assert isinstance(mine, EscalationSlot) and mine.token
            assert isinstance(await survivor.budget.acquire(), Busy)
            got: list[tuple[float, EscalationSlot]] = []

            async def all_back() -> bool:
                slot = await survivor.budget.acquire()
                if isinstance(slot, EscalationSlot):
                    got.append((time.monotonic(), slot))
                return len(got) == limit - 1

            await until(all_back, "the dead holder's slots", lease_s + PATIENCE_S)
            # not before the dead's leases ended (server clock, ms resolution)
            assert got[0][0] - taken_from >= lease_s - 0.01
            # exactly the dead's slots came back: the survivor's own, still held, still counts
            full = await survivor.budget.acquire()
            assert isinstance(full, Busy) and full.in_flight == limit

    asyncio.run(scenario())


class InBandScorer:
    async def score(self, request, timeout_s: float) -> FastScore:  # noqa: ANN001
        return FastScore(UNCERTAIN, UNCERTAIN, (), "m-1", "CPU")


class HeldReasoner:
    """Answers once ``gate`` is set; counts the calls under way."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0

    async def reason(self, request, timeout_s: float) -> ReasonerVerdict:  # noqa: ANN001
        self.running += 1
        try:
            await asyncio.wait_for(self.gate.wait(), timeout=timeout_s)
        finally:
            self.running -= 1
        return ReasonerVerdict(Action.BLOCK, 0.9, 0.9, "held", (), (), (), "r-1", "held")


def cascade_on(budget, reasoner, limit: int) -> Cascade:  # noqa: ANN001
    breakers = [CircuitBreaker(n, 3, 60.0) for n in ("fast_model", "reasoner")]
    return Cascade(
        InBandScorer(), reasoner,
        ModelSelection(ServingModel(ScorerInfo("m-1", ("x",), *BAND, "CPUExecutionProvider", "scripted"),
                                    EscalationPolicy(*BAND, min_reasoner_budget_ms=0.0, max_in_flight=limit))),
        MergeRules.from_settings(MergeSettings()), "p-1", reserve_ms=0.0,
        limits=StageLimits({t: 0.1 for t in EventType}, PATIENCE_S), scorer_breaker=breakers[0],
        reasoner_breaker=breakers[1], max_escalations_per_call=8, escalation_budget=budget,
    )


def event(n: int) -> RiskEvent:
    return RiskEvent(f"r{n}", EventType.ORDER, Entities(account_id=f"a{n}"), {"x": 1.0})


def test_two_cascades_on_one_budget_escalate_at_most_the_limit_and_hold_the_rest(redis_url):  # noqa: F811
    limit = 2
    settings = settings_for(redis_url)

    async def scenario():
        async with orchestrators(settings, limit) as ((a, b), outages):
            reasoner = HeldReasoner()
            cascades = [cascade_on(o.budget, reasoner, limit) for o in (a, b)]
            calls = [CallBudget(8), CallBudget(8)]
            deadline = time.monotonic() + 3 * PATIENCE_S
            tasks = [asyncio.create_task(c.decide(event(i * 10 + j), deadline, call))
                     for i, (c, call) in enumerate(zip(cascades, calls)) for j in range(4)]

            async def limit_reached() -> bool:
                return reasoner.running == limit and sum(t.done() for t in tasks) == len(tasks) - limit

            await until(limit_reached, "the others decided without the reasoner")
            reasoner.gate.set()
            decisions = await asyncio.gather(*tasks)
            escalated = [d for d in decisions if d.escalated]
            held = [d for d in decisions if not d.escalated]
            assert len(escalated) == limit and not any(d.degraded for d in escalated)
            assert {d.degraded_cause for d in held} == {DegradedCause.REASONER_BUSY}
            assert all(f"{limit} of {limit} escalations running" in d.degraded_reason for d in held)
            # a call's budget pays only for escalations that got a slot
            assert 16 - calls[0].escalations_left - calls[1].escalations_left == limit
            assert cascades[0].escalations_in_flight == cascades[1].escalations_in_flight == 0 and not outages

    asyncio.run(scenario())


def test_a_stopped_or_frozen_redis_falls_back_to_the_local_budget_within_its_timeout():
    limit, timeout_ms, retry_s = 3, 300.0, 0.5
    bound_s = 5 * timeout_ms / 1000.0  # one timeout and a few ms of work, with room for a loaded 2-core box

    async def decide_timed(cascade: Cascade, n: int):  # noqa: ANN202
        started = time.monotonic()
        decision = await asyncio.wait_for(cascade.decide(event(n), time.monotonic() + PATIENCE_S), PATIENCE_S)
        return decision, time.monotonic() - started

    async def frozen(url: str) -> None:
        settings = settings_for(url, timeout_ms=timeout_ms, outage_retry_s=retry_s)
        async with orchestrators(settings, limit, count=1) as ((one,), outages):
            reasoner = HeldReasoner()
            reasoner.gate.set()
            cascade = cascade_on(one.budget, reasoner, limit)
            first, _ = await decide_timed(cascade, 1)
            assert first.escalated and not first.degraded and one.budget.outage.outages == 0
            pid = int((await one.client.info("server"))["process_id"])
            os.kill(pid, signal.SIGSTOP)  # accepts connections, answers nothing
            try:
                decision, took_s = await decide_timed(cascade, 2)
                assert took_s < bound_s, f"waited {took_s:.2f} s for a frozen Redis (timeout {timeout_ms} ms)"
                assert decision.escalated and not decision.degraded  # the local budget let it through
                assert one.budget.outage.down and outages == ["budget"]
                # while it is out, escalations do not ask Redis again (no wait at all), and the local budget bounds
                grabs = [await asyncio.wait_for(one.budget.acquire(), bound_s) for _ in range(limit + 1)]
                assert [isinstance(g, EscalationSlot) and not g.token for g in grabs] == [True] * limit + [False]
                for slot in grabs[:limit]:
                    one.budget.release(slot)
            finally:
                os.kill(pid, signal.SIGCONT)

            async def shared_again() -> bool:
                slot = await one.budget.acquire()
                if isinstance(slot, EscalationSlot):
                    one.budget.release(slot)
                return isinstance(slot, EscalationSlot) and bool(slot.token)

            await until(shared_again, "back on the shared budget once Redis answers")
            assert not one.budget.outage.down and outages == ["budget"]  # one outage, counted once

    async def stopped() -> None:
        with running_redis() as url:
            settings = settings_for(url, timeout_ms=timeout_ms)
            one = SharedLimits(redis_client(settings), settings, limit)
            reasoner = HeldReasoner()
            reasoner.gate.set()
            cascade = cascade_on(one.budget, reasoner, limit)
            first, _ = await decide_timed(cascade, 1)
            assert first.escalated and one.budget.outage.outages == 0
        try:  # the server is gone
            decision, took_s = await decide_timed(cascade, 2)
            assert took_s < bound_s and decision.escalated and not decision.degraded
            assert one.budget.outage.down and one.budget.outage.outages == 1
        finally:
            await one.close()

    with running_redis() as url:
        asyncio.run(frozen(url))
    asyncio.run(stopped())


# -- circuit openings ---------------------------------------------------------------------------------------------


def breakers_of(circuits: SharedCircuits | None, open_s: float) -> dict[str, CircuitBreaker]:
    trip = circuits.tripped if circuits is not None else None
    return {n: CircuitBreaker(n, 2, open_s, on_trip=trip) for n in ("fast_model", "reasoner")}


def test_a_circuit_opened_by_one_orchestrator_is_open_in_the_other_until_open_s_ends(redis_url):  # noqa: F811
    open_s = 3.0  # the other must read it before it ends: reads take milliseconds
    settings = settings_for(redis_url, circuit_refresh_ms=20.0)

    async def scenario():
        async with orchestrators(settings, limit=1) as ((a, b), outages):
            mine, theirs = breakers_of(a.circuits, open_s), breakers_of(b.circuits, open_s)
            b.circuits.start(theirs)
            mine["reasoner"].failure("reasoner: boom")
            tripped_at = time.monotonic()
            mine["reasoner"].failure("reasoner: boom")
            assert mine["reasoner"].state is CircuitState.OPEN

            async def open_there() -> bool:
                return theirs["reasoner"].state is CircuitState.OPEN

            await until(open_there, "the opening seen by the other orchestrator", open_s)
            other = theirs["reasoner"]
            assert other.allow() is None and "boom" in other.last_error and a.owner in other.last_error
            assert theirs["fast_model"].state is CircuitState.CLOSED  # only that stage
            other.record_probe(True)  # its own ping succeeds: still held open until the opener's time ends
            assert other.state is CircuitState.OPEN
            assert await a.circuits.refresh(mine) == []  # the opener does not hold itself

            async def half_open() -> bool:
                return other.state is CircuitState.HALF_OPEN

            ended_at = await until(half_open, "the opening's end", open_s + PATIENCE_S)
            assert ended_at - tripped_at >= open_s - 0.05  # the TTL is read back in ms
            other.record_probe(True)  # closed by its own probe
            assert other.state is CircuitState.CLOSED
            assert await a.client.get(b.circuits.key("reasoner")) is None  # the opening expired
            await asyncio.sleep(5 * settings.circuit_refresh_ms / 1000.0)
            assert other.state is CircuitState.CLOSED and not outages

    asyncio.run(scenario())


def test_an_unreadable_opening_is_ignored_not_believed(redis_url):  # noqa: F811
    settings = settings_for(redis_url)

    async def scenario():
        async with orchestrators(settings, limit=1, count=1) as ((one,), _):
            breakers = breakers_of(None, 1.0)
            await one.client.set(one.circuits.key("reasoner"), "not json", px=60_000)
            await one.client.set(one.circuits.key("fast_model"), '{"opener": 1}', px=60_000)
            assert await one.circuits.refresh(breakers) == []
            assert all(b.state is CircuitState.CLOSED for b in breakers.values())

    asyncio.run(scenario())


# -- the plain parts ----------------------------------------------------------------------------------------------


def test_a_forced_opening_holds_against_successes_then_half_opens_and_is_not_republished():
    now = [0.0]
    trips, seen = [], []
    breaker = CircuitBreaker("s", 2, 5.0, clock=lambda: now[0], on_change=lambda n, s: seen.append(s),
                             on_trip=lambda *a: trips.append(a))
    breaker.force_open(3.0, "opened by orchestrator x: boom")
    assert breaker.state is CircuitState.OPEN and breaker.allow() is None and breaker.retry_in_s() == 3.0
    breaker.record_probe(True)
    assert breaker.state is CircuitState.OPEN and trips == []  # held, and not this breaker's news
    now[0] = 3.0
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record_probe(True)
    assert breaker.state is CircuitState.CLOSED
    breaker.failure("a")
    breaker.failure("b")
    assert trips == [("s", 5.0, "b")] and breaker.retry_in_s() == 5.0
    breaker.force_open(1.0, "shorter")  # an opening here that lasts longer keeps its time
    assert breaker.retry_in_s() == 5.0 and breaker.last_error == "b"
    assert seen == [CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED, CircuitState.OPEN]


def test_shared_settings_refuse_a_lease_shorter_than_a_model_call():
    SharedLimitsSettings(escalation_lease_s=1.0, timeout_ms=100.0)
    with pytest.raises(ValueError, match="two timeout_ms"):
        SharedLimitsSettings(escalation_lease_s=0.1, timeout_ms=100.0)
    with pytest.raises(ConfigError, match="shared.escalation_lease_s must exceed llm.timeout_s"):
        load_settings(shared={"redis_url": "redis://127.0.0.1:1/0", "escalation_lease_s": 10.0},
                      llm={"timeout_s": 30.0})
    assert load_settings(shared={"escalation_lease_s": 10.0}, llm={"timeout_s": 30.0}).shared.redis_url is None
