"""A circuit breaker per stage: after repeated failures, calls fail at once instead of waiting out a dead stage.

Plain logic with an injectable clock, no Ray or gRPC. States:

- CLOSED: calls go through; ``failure_threshold`` failures in a row open the circuit.
- OPEN: calls are refused at once (``allow()`` is False) for ``open_s``; then the circuit is HALF_OPEN.
- HALF_OPEN: up to ``half_open_probes`` calls go through at once; a success closes the circuit, a failure opens
  it again for another ``open_s``.

A call that was let through gets a Permit and must settle it exactly once with ``success()``, ``failure()`` or
``release()`` (the caller gave up for its own reasons: neither). Background pings (``record_probe``) count like calls, so a stage
that dies while no traffic reaches it is noticed, and one that comes back is closed again without waiting for a
client to probe it. ``on_change(name, state)`` is called on every transition (health status, metrics, logs).
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
    ):
        if failure_threshold < 1 or half_open_probes < 1 or open_s <= 0:
            raise ValueError("failure_threshold and half_open_probes must be >= 1 and open_s > 0")
        self.name = name
        self._threshold = failure_threshold
        self._open_s = open_s
        self._max_probes = half_open_probes
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self.last_error = ""

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self._open_s:
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
        return max(0.0, self._open_s - (self._clock() - self._opened_at))

    def success(self, permit: Permit | None = None) -> None:
        self._settle(permit)
        self._failures = 0
        if self._state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def failure(self, error: str = "", permit: Permit | None = None) -> None:
        self._settle(permit)
        self.last_error = error
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._failures >= self._threshold
        ):
            self._opened_at = self._clock()
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
