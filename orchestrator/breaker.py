"""A circuit breaker per stage: after repeated failures, calls fail at once instead of waiting out a dead stage.

Plain logic with an injectable clock, no Ray or gRPC. States:

- CLOSED: calls go through; ``failure_threshold`` failures in a row open the circuit.
- OPEN: calls are refused at once (``allow()`` is False) for ``open_s``; then the circuit is HALF_OPEN.
- HALF_OPEN: up to ``half_open_probes`` calls go through at once; a success closes the circuit, a failure opens
  it again for another ``open_s``.

A call that was let through gets a Permit and must settle it exactly once with ``success()``, ``failure()`` or
``release()`` (the caller gave up for its own reasons: neither). Background pings (``record_probe``) count like calls, so a stage
that dies while no traffic reaches it is noticed, and one that comes back is closed again without waiting for a
client to probe it. ``on_change(name, state)`` is called on every transition (health status, metrics, logs);
``on_trip(name, open_s, error)`` only when the breaker's own failures open the circuit (so it can be told to other
orchestrators, orchestrator/shared_limits.py).

``force_open(for_s, reason)`` opens the circuit from outside (another orchestrator saw the stage fail): it stays
OPEN for ``for_s`` whatever the calls and pings here say, then goes HALF_OPEN and closes by this breaker's own
probes, as after its own opening. No Redis here: the shared part feeds this through those two hooks.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class CircuitState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; ``probe`` when it was let through a half-open circuit."""

    probe: bool = False


_CALL = Permit(probe=False)
_PROBE = Permit(probe=True)


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failure_threshold: int,
        open_s: float,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, CircuitState], None] | None = None,
        on_trip: Callable[[str, float, str], None] | None = None,
    ):
        if failure_threshold < 1 or half_open_probes < 1 or open_s <= 0:
            raise ValueError("failure_threshold and half_open_probes must be >= 1 and open_s > 0")
        self.name = name
        self._threshold = failure_threshold
        self._open_s = open_s
        self._max_probes = half_open_probes
        self._clock = clock
        self._on_change = on_change
        self._on_trip = on_trip
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._reopen_at = 0.0  # while OPEN: when it turns HALF_OPEN
        self._held_until = float("-inf")  # a forced opening: no success closes the circuit before this
        self._probes = 0
        self.last_error = ""

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() >= self._reopen_at:
            self._set(CircuitState.HALF_OPEN)
        return self._state

    def allow(self) -> Permit | None:
        """A permit to call now, or None (refused). A permit obliges the caller to settle it once."""
        state = self.state
        if state is CircuitState.CLOSED:
            return _CALL
        if state is CircuitState.HALF_OPEN and self._probes < self._max_probes:
            self._probes += 1
            return _PROBE
        return None

    def retry_in_s(self) -> float:
        """Time until an open circuit lets a probe through (0 when not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._reopen_at - self._clock())

    def success(self, permit: Permit | None = None) -> None:
        self._settle(permit)
        self._failures = 0
        if self._state is not CircuitState.CLOSED and self._clock() >= self._held_until:
            self._set(CircuitState.CLOSED)

    def failure(self, error: str = "", permit: Permit | None = None) -> None:
        self._settle(permit)
        self.last_error = error
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._failures >= self._threshold
        ):
            self._reopen_at = self._clock() + self._open_s
            self._set(CircuitState.OPEN)
            if self._on_trip is not None:
                self._on_trip(self.name, self._open_s, error)

    def force_open(self, for_s: float, reason: str) -> None:
        """Hold the circuit OPEN for ``for_s`` from now (an opening seen elsewhere); an open circuit that would
        reopen later keeps its own time. Does not call ``on_trip``: the opening is not this breaker's news."""
        if for_s <= 0:
            return
        until = self._clock() + for_s
        self._held_until = max(self._held_until, until)
        if self.state is CircuitState.OPEN:
            self._reopen_at = max(self._reopen_at, until)
            return
        self._reopen_at = until
        self.last_error = reason
        self._set(CircuitState.OPEN)

    def release(self, permit: Permit | None = None) -> None:
        """The call was abandoned by its caller (cancelled): it says nothing about the stage."""
        self._settle(permit)

    def record_probe(self, ok: bool, error: str = "") -> None:
        """A background ping's result: counts like a call's."""
        if ok:
            self.success()
        else:
            self.failure(error)

    def _settle(self, permit: Permit | None) -> None:
        if permit is not None and permit.probe and self._probes:
            self._probes -= 1

    def _set(self, state: CircuitState) -> None:
        if state is self._state:
            return
        self._state = state
        if state is not CircuitState.HALF_OPEN:
            self._probes = 0
        if self._on_change is not None:
            self._on_change(self.name, state)
