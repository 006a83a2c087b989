"""Stage health: the circuit breakers' states as gRPC health statuses, and the pings that keep them current.

The standard health service answers for the whole server (``""``) and for ``risk.v1.DecisionService``: SERVING
while the fast model's circuit is closed, NOT_SERVING while it is open or half-open (decisions are then made by
the failure policy alone, so a load balancer should send traffic elsewhere). Each stage also has its own entry,
``riskcascade.stage.<name>`` (fast_model, reasoner): a reasoner outage degrades escalated decisions but leaves
the service SERVING. ``riskcascade.process`` is SERVING from start to shutdown whatever the stages say: a liveness
probe asks it, so a stage outage takes an orchestrator out of the load balancer (readiness) without restarting
it. Every ping's result feeds the stage's breaker, so a stage that dies between calls is noticed
and one that comes back is closed again without waiting for client traffic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from grpc_health.v1 import health_pb2

from orchestrator.breaker import CircuitBreaker, CircuitState
from risk.v1 import decision_pb2

log = logging.getLogger("riskcascade.health")

SERVICE_NAME = decision_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
STAGE_PREFIX = "riskcascade.stage."
PROCESS_SERVICE = "riskcascade.process"  # the process serves: for liveness probes, never gated by a stage
GATING_STAGE = "fast_model"  # without it the service decides by failure policy only
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StageHealth:
    def __init__(self) -> None:
        self._health = None
        self._states: dict[str, CircuitState] = {}
        self._updates: set[asyncio.Task] = set()
        self._probes: list[asyncio.Task] = []

    async def attach(self, health, breakers: Mapping[str, CircuitBreaker]) -> None:  # noqa: ANN001 - HealthServicer
        """Publish the breakers' states on ``health`` (grpc_health's async HealthServicer) from now on."""
        self._health = health
        for name, breaker in breakers.items():
            self._states[name] = breaker.state
        await health.set(PROCESS_SERVICE, SERVING)
        await self._publish()

    def changed(self, name: str, state: CircuitState) -> None:
        """A breaker's on_change hook (called on the event loop thread)."""
        before = self._states.get(name, CircuitState.CLOSED)
        self._states[name] = state
        if state is CircuitState.OPEN and before is CircuitState.CLOSED:  # not again after each failed probe
            log.warning("stage %s: circuit open, calls fail at once until a probe gets through", name)
        elif state is CircuitState.CLOSED:
            log.warning("stage %s: circuit closed, serving again", name)
        if self._health is not None:
            task = asyncio.get_running_loop().create_task(self._publish())
            self._updates.add(task)
            task.add_done_callback(self._updates.discard)

    def status(self, name: str) -> int:
        return SERVING if self._states.get(name, CircuitState.CLOSED) is CircuitState.CLOSED else NOT_SERVING

    async def _publish(self) -> None:
        for name in self._states:
            await self._health.set(STAGE_PREFIX + name, self.status(name))
        overall = self.status(GATING_STAGE)
        for service in ("", SERVICE_NAME):
            await self._health.set(service, overall)

    def start_probes(
        self,
        pings: Mapping[str, Callable[[float], Awaitable[object]]],
        breakers: Mapping[str, CircuitBreaker],
        interval_s: float,
        timeout_s: float,
    ) -> None:
        for name, ping in pings.items():
            self._probes.append(asyncio.get_running_loop().create_task(
                _probe_loop(ping, breakers[name], interval_s, timeout_s), name=f"probe:{name}"
            ))

    async def stop(self) -> None:
        for task in self._probes:
            task.cancel()
        await asyncio.gather(*self._probes, *self._updates, return_exceptions=True)
        self._probes.clear()


async def _probe_loop(
    ping: Callable[[float], Awaitable[object]], breaker: CircuitBreaker, interval_s: float, timeout_s: float
) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.wait_for(ping(timeout_s), timeout=timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of a ping is a failure of the stage
            breaker.record_probe(False, f"ping: {type(exc).__name__}: {exc}".rstrip(": "))
        else:
            breaker.record_probe(True)
