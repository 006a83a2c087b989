"""Limits shared by several orchestrators through Redis: one escalation budget and the stages' circuit openings.

One orchestrator keeps both in its process (cascade.LocalEscalationBudget, breaker.CircuitBreaker). With
``shared.redis_url`` set, every orchestrator of a cluster points at one Redis server and:

- **Escalation budget** (SharedEscalationBudget, the cascade's EscalationBudget): ``escalation.max_in_flight`` slots
  in all. A slot is a lease: taken and released by the acquire script and ZREM, it ends by itself
  ``shared.escalation_lease_s`` after it was taken, so the slots of an orchestrator that crashed (or lost Redis
  while holding them) come back. An escalation holding one runs at most the lease less two ``timeout_ms`` (the
  acquire's and the release's round trips), so its slot is released before its lease ends. ``max_per_call`` stays
  per call, as before.
- **Circuit openings** (SharedCircuits): when a breaker's own failures open its circuit, the opening is published
  with a TTL of that breaker's ``open_s``. Every orchestrator reads the openings in the background each
  ``shared.circuit_refresh_ms`` (never on the decision path) and holds its own breaker of that stage OPEN for the
  time the key has left (``CircuitBreaker.force_open``); then the circuit is half-open and closed by its own probes.
  Closing is local: a key is never deleted, it expires.

Time: lease expiries are on the Redis server's clock (``TIME`` in the script) and circuit openings are a TTL read
back with ``PTTL``, so the orchestrators' clocks never meet.

Keys (``P`` = ``shared.key_prefix``; one server or primary, not Redis Cluster):

- ``P:escalations`` (sorted set): slot token -> its lease's end (ms, server clock). The key expires a lease after its
  last slot was taken, so an idle cluster leaves nothing.
- ``P:circuit:{stage}`` (string, TTL = the opener's ``open_s``): JSON ``{"opener", "opening", "error"}``: the
  orchestrator that opened it, an id of this opening (each is applied once by each reader) and the stage's error.

Redis down or slow: no decision fails or waits more than ``shared.timeout_ms`` for it. A failed or late call (any
Redis error, a connection refused, a reply past the timeout) puts that part on this process's own state: escalations
take slots of a per-process budget of ``max_in_flight`` (during an outage N orchestrators may run N times the budget),
and circuits open and close by this process's calls and probes alone. Escalations try Redis again
``shared.outage_retry_s`` after the last failure, circuit reads at each refresh. Each outage is logged once when it
starts and once when it ends, and counted (``riskcascade_shared_limits_outages_total{part}``). A slot that may have
been taken by a call whose answer was lost is released in the background, or ends with its lease.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from orchestrator.breaker import CircuitBreaker
from orchestrator.cascade import Busy, EscalationSlot
from riskcascade.core.config import SharedLimitsSettings

log = logging.getLogger("riskcascade.shared_limits")

# KEYS[1] the slots; ARGV limit, lease (ms), token. Drops ended leases, then takes a slot if fewer than limit are
# held. Returns {1, held} when it took one (held counts it), {0, held} when all were taken.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then
  return {0, held}
end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease)
return {1, held + 1}
"""

# What a failed or late Redis call raises (asyncio's timeout is the builtin TimeoutError, an OSError).
REDIS_FAILURES = (RedisError, OSError)


def redis_client(settings: SharedLimitsSettings) -> aioredis.Redis:
    """An asyncio client whose every call ends within ``timeout_ms`` and is never retried (a failure falls back at
    once). Connects on first use: creating it waits for nothing."""
    if not settings.redis_url:
        raise ValueError("shared.redis_url is not set")
    timeout_s = settings.timeout_ms / 1000.0
    return aioredis.Redis.from_url(
        settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0), decode_responses=True,
    )


def orchestrator_id() -> str:
    """This orchestrator's name in the shared keys: host, process and a random part (a restart is a new one)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RedisOutage:
    """Whether one shared part (``budget`` or ``circuit``) is on this process's own state because Redis failed.
    Each outage is logged when it starts and when it ends, and counted once (``on_outage(part)``)."""

    def __init__(self, part: str, retry_s: float, on_outage: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.part = part
        self.down = False
        self.outages = 0
        self._retry_s = retry_s
        self._on_outage = on_outage
        self._clock = clock
        self._retry_at = float("-inf")

    def should_try(self) -> bool:
        """Redis is worth a call: it answered last, or ``retry_s`` passed since it last failed."""
        return not self.down or self._clock() >= self._retry_at

    def failed(self, error: BaseException) -> None:
        self._retry_at = self._clock() + self._retry_s
        if self.down:
            return
        self.down = True
        self.outages += 1
        log.warning("shared %s: Redis failed (%s: %s); this orchestrator uses its own until Redis answers again",
                    self.part, type(error).__name__, error)
        if self._on_outage is not None:
            self._on_outage(self.part)

    def answered(self) -> None:
        if self.down:
            self.down = False
            log.warning("shared %s: Redis answers again; shared across orchestrators from now on", self.part)


class _Background:
    """Redis calls nobody waits for (releases, publications), kept until done so they can be awaited on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


class SharedEscalationBudget:
    """``limit`` escalation slots shared by every orchestrator on one Redis (see the module docstring); the
    cascade's EscalationBudget."""

    def __init__(self, client: aioredis.Redis, limit: int, settings: SharedLimitsSettings, owner: str,
                 on_outage: Callable[[str], None] | None = None):
        self._client = client
        self._limit = limit
        self._key = f"{settings.key_prefix}:escalations"
        self._lease_ms = round(settings.escalation_lease_s * 1000.0)
        self._timeout_s = settings.timeout_ms / 1000.0
        self._max_s = settings.escalation_lease_s - 2 * self._timeout_s
        self._script = client.register_script(_ACQUIRE)
        self._tokens = (f"{owner}:{n}" for n in itertools.count())
        self._shared_held = 0  # slots of the shared budget held here
        self._local_held = 0  # slots taken from the per-process budget while Redis failed
        self._background = _Background()
        self.outage = RedisOutage("budget", settings.outage_retry_s, on_outage)

    @property
    def in_flight(self) -> int:
        return self._shared_held + self._local_held

    async def acquire(self) -> EscalationSlot | Busy:
        if not self.outage.should_try():
            return self._take_local()
        token = next(self._tokens)
        try:
            reply = await asyncio.wait_for(
                self._script(keys=[self._key], args=[self._limit, self._lease_ms, token]), self._timeout_s
            )
            granted, held = int(reply[0]), int(reply[1])
        except asyncio.CancelledError:
            self._release_shared(token)  # the script may have run: give the slot back rather than wait its lease
            raise
        except (*REDIS_FAILURES, TypeError, ValueError, IndexError) as exc:  # no answer, or not the script's
            self._release_shared(token)
            self.outage.failed(exc)
            return self._take_local()
        self.outage.answered()
        if not granted:
            return Busy(held)
        self._shared_held += 1
        return EscalationSlot(token, self._max_s)

    def release(self, slot: EscalationSlot) -> None:
        if not slot.token:
            self._local_held -= 1
            return
        self._shared_held -= 1
        self._release_shared(slot.token)

    async def close(self) -> None:
        """Wait for the releases still out (each bounded by ``timeout_ms``)."""
        await self._background.drain()

    def _take_local(self) -> EscalationSlot | Busy:
        if self.in_flight >= self._limit:
            return Busy(self.in_flight)
        self._local_held += 1
        return EscalationSlot()

    def _release_shared(self, token: str) -> None:
        self._background.run(self._zrem(token))

    async def _zrem(self, token: str) -> None:
        try:
            await asyncio.wait_for(self._client.zrem(self._key, token), self._timeout_s)
        except REDIS_FAILURES as exc:
            self.outage.failed(exc)  # the lease will end it


class SharedCircuits:
    """Circuit openings told to and read from the other orchestrators (see the module docstring). ``tripped`` is
    the breakers' ``on_trip`` hook; ``start`` reads the others' openings in the background into ``breakers``."""

    def __init__(self, client: aioredis.Redis, settings: SharedLimitsSettings, owner: str,
                 on_outage: Callable[[str], None] | None = None):
        self.owner = owner
        self._client = client
        self._prefix = settings.key_prefix
        self._timeout_s = settings.timeout_ms / 1000.0
        self._refresh_s = settings.circuit_refresh_ms / 1000.0
        self._breakers: dict[str, CircuitBreaker] = {}
        self._applied: dict[str, str] = {}  # stage -> the opening last applied to its breaker
        self._unreadable: dict[str, str] = {}  # stage -> a value that is not an opening (logged once)
        self._background = _Background()
        self._reader: asyncio.Task | None = None
        self.outage = RedisOutage("circuit", settings.outage_retry_s, on_outage)

    def key(self, stage: str) -> str:
        return f"{self._prefix}:circuit:{stage}"

    def tripped(self, stage: str, open_s: float, error: str) -> None:
        """A breaker here opened by its own failures: publish it (in the background) for ``open_s``."""
        value = json.dumps({"opener": self.owner, "opening": uuid.uuid4().hex, "error": error})
        self._background.run(self._publish(self.key(stage), value, max(1, round(open_s * 1000.0))))

    def start(self, breakers: Mapping[str, CircuitBreaker]) -> None:
        """Read the openings of ``breakers``' stages every ``circuit_refresh_ms`` from now on."""
        self._breakers = dict(breakers)
        self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="shared-circuits")

    async def refresh(self, breakers: Mapping[str, CircuitBreaker] | None = None) -> list[str]:
        """Read every stage's opening once (one round trip) and hold the breakers of the stages another
        orchestrator opened; the stages newly held. On a Redis failure nothing changes (and the outage is noted)."""
        breakers = self._breakers if breakers is None else breakers
        stages = list(breakers)
        if not stages:
            return []
        pipe = self._client.pipeline(transaction=False)
        for stage in stages:
            pipe.get(self.key(stage))
            pipe.pttl(self.key(stage))
        try:
            replies = await asyncio.wait_for(pipe.execute(), self._timeout_s)
        except REDIS_FAILURES as exc:
            self.outage.failed(exc)
            return []
        self.outage.answered()
        held = []
        for stage, value, ttl_ms in zip(stages, replies[0::2], replies[1::2]):
            if value is None or not isinstance(ttl_ms, int) or ttl_ms <= 0:
                continue  # no opening, or it ended between the two reads (-2), or a key with no TTL is not ours
            opening = self._opening(stage, value)
            if opening is None or opening["opener"] == self.owner or self._applied.get(stage) == opening["opening"]:
                continue
            self._applied[stage] = opening["opening"]
            breakers[stage].force_open(ttl_ms / 1000.0, f"opened by orchestrator {opening['opener']}: "
                                                        f"{opening['error'] or 'unknown'}")
            held.append(stage)
        return held

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        await self._background.drain()

    async def _read_loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_s)

    async def _publish(self, key: str, value: str, ttl_ms: int) -> None:
        try:
            await asyncio.wait_for(self._client.set(key, value, px=ttl_ms), self._timeout_s)
        except REDIS_FAILURES as exc:
            self.outage.failed(exc)
        else:
            self.outage.answered()

    def _opening(self, stage: str, value: str) -> dict[str, str] | None:
        """The opening in ``value``, or None (logged once per value) when it is not one of ours."""
        try:
            opening = json.loads(value)
            if all(isinstance(opening.get(f), str) for f in ("opener", "opening", "error")):
                return opening
        except (ValueError, AttributeError):
            pass
        if self._unreadable.get(stage) != value:
            self._unreadable[stage] = value
            log.warning("shared circuit %s: %s holds %.80r, not an opening; ignored", stage, self.key(stage), value)
        return None


class SharedLimits:
    """One orchestrator's shared parts on one Redis client: the escalation budget and the circuit openings."""

    def __init__(self, client: aioredis.Redis, settings: SharedLimitsSettings, max_in_flight: int,
                 on_outage: Callable[[str], None] | None = None, owner: str | None = None):
        self.owner = owner or orchestrator_id()
        self.client = client
        self.budget = SharedEscalationBudget(client, max_in_flight, settings, self.owner, on_outage)
        self.circuits = SharedCircuits(client, settings, self.owner, on_outage)

    @classmethod
    def connect(cls, settings: SharedLimitsSettings, max_in_flight: int,
                on_outage: Callable[[str], None] | None = None) -> "SharedLimits":
        return cls(redis_client(settings), settings, max_in_flight, on_outage)

    async def close(self) -> None:
        await self.circuits.close()
        await self.budget.close()
        await self.client.aclose()
