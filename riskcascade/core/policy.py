"""The escalation policy: which events the reasoner sees. Plain logic, no Ray or gRPC.

The fast model's calibrated score is compared with the escalation band [band_low, band_high):
below it the event is approved, at or above it blocked, inside it escalated to the reasoner -- provided the
escalation budget allows: enough of the caller's deadline left for the reasoner to do useful work, fewer
than ``max_in_flight`` escalations already running (the reasoner is the expensive stage; past its capacity we
answer with the fallback rather than queue behind it and miss deadlines), and escalations left in the call's
own budget (one DecideBatch may not take the whole reasoner).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from riskcascade.core.config import EscalationSettings
from riskcascade.core.domain import DegradedCause


class Route(str, enum.Enum):
    APPROVE = "approve"  # score below the band
    BLOCK = "block"  # score at or above the band
    ESCALATE = "escalate"  # uncertain and the budget allows the reasoner
    HOLD = "hold"  # uncertain, but no budget for the reasoner: the fallback decides


@dataclass(frozen=True)
class RoutingDecision:
    route: Route
    reason: str
    cause: DegradedCause = DegradedCause.NONE  # for a HOLD: which budget stopped the escalation


@dataclass(frozen=True)
class EscalationPolicy:
    band_low: float
    band_high: float
    min_reasoner_budget_ms: float
    max_in_flight: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.band_low <= self.band_high <= 1.0:
            raise ValueError(
                f"escalation band must satisfy 0 <= band_low <= band_high <= 1, "
                f"got [{self.band_low}, {self.band_high})"
            )

    def route(self, score: float, remaining_ms: float, in_flight: int, call_left: int = 1) -> RoutingDecision:
        """Route one event given its calibrated score, the time left, escalations now running and escalations
        its call may still start."""
        if score < self.band_low:
            return RoutingDecision(
                Route.APPROVE, f"score {score:.3f} below band [{self.band_low:.3f}, {self.band_high:.3f})"
            )
        if score >= self.band_high:
            return RoutingDecision(Route.BLOCK, f"score {score:.3f} at or above {self.band_high:.3f}")
        if remaining_ms < self.min_reasoner_budget_ms:
            return RoutingDecision(
                Route.HOLD,
                f"uncertain score {score:.3f} but only {remaining_ms:.0f} ms of the deadline left "
                f"(reasoner needs {self.min_reasoner_budget_ms:.0f} ms)",
                DegradedCause.NO_TIME_FOR_REASONER,
            )
        if in_flight >= self.max_in_flight:
            return RoutingDecision(
                Route.HOLD,
                f"uncertain score {score:.3f} but escalation budget exhausted "
                f"({in_flight} of {self.max_in_flight} escalations running)",
                DegradedCause.REASONER_BUSY,
            )
        if call_left <= 0:
            return RoutingDecision(
                Route.HOLD,
                f"uncertain score {score:.3f} but this call's escalation budget is spent (escalation.max_per_call)",
                DegradedCause.CALL_ESCALATION_LIMIT,
            )
        return RoutingDecision(Route.ESCALATE, f"uncertain score {score:.3f} inside the band")


def escalation_policy(settings: EscalationSettings, model_band_low: float, model_band_high: float) -> EscalationPolicy:
    """The configured policy; an empty band edge in the settings takes the model card's."""
    return EscalationPolicy(
        band_low=settings.band_low if settings.band_low is not None else model_band_low,
        band_high=settings.band_high if settings.band_high is not None else model_band_high,
        min_reasoner_budget_ms=settings.min_reasoner_budget_ms,
        max_in_flight=settings.max_in_flight,
    )
