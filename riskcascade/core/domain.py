"""Domain types shared by every part of riskcascade.

This module imports nothing of ours and nothing of Ray, gRPC or LlamaIndex: protobuf messages are converted to
and from these types only at the gRPC edge, and these are what crosses Ray Serve handles (plain dataclasses
pickle cheaply).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime


class EventType(str, enum.Enum):
    ORDER = "order"
    LOGIN = "login"
    PAYOUT = "payout"
    REVIEW = "review"
    PROMO_REDEMPTION = "promo_redemption"
    ACCOUNT_CHANGE = "account_change"


class Action(str, enum.Enum):
    APPROVE = "approve"
    REVIEW = "review"
    BLOCK = "block"


class Stage(str, enum.Enum):
    FAST_MODEL = "fast_model"
    REASONER = "reasoner"
    FALLBACK = "fallback"


class DegradedCause(str, enum.Enum):
    """Why a decision is degraded, as a closed set (metrics label it; ``degraded_reason`` says it in words)."""

    NONE = "none"
    FAST_MODEL_FAILED = "fast_model_failed"  # the fast model failed or its circuit is open: the failure policy decided
    REASONER_FAILED = "reasoner_failed"  # escalated, but the reasoner failed or ran out of time
    NO_TIME_FOR_REASONER = "no_time_for_reasoner"  # uncertain, but too little of the deadline was left to escalate
    REASONER_BUSY = "reasoner_busy"  # uncertain, but escalation.max_in_flight escalations were running
    CALL_ESCALATION_LIMIT = "call_escalation_limit"  # uncertain, but the call spent escalation.max_per_call


class Outcome(str, enum.Enum):
    LEGITIMATE = "legitimate"
    FRAUD = "fraud"


RISK_TYPES = ("account_takeover", "collusion", "promo_abuse", "brushing", "click_farm")
"""Fraud patterns the synthetic generator produces and the policy knows about."""


@dataclass(frozen=True)
class Entities:
    account_id: str
    seller_id: str = ""
    device_id: str = ""
    ip: str = ""
    payment_instrument_id: str = ""


@dataclass(frozen=True)
class RiskEvent:
    """One event to decide, already validated."""

    request_id: str
    event_type: EventType
    entities: Entities
    features: dict[str, float]
    text: dict[str, str] = field(default_factory=dict)
    occurred_at: datetime | None = None


@dataclass(frozen=True)
class ReasonCode:
    code: str
    description: str
    weight: float


@dataclass(frozen=True)
class Evidence:
    id: str  # what a verdict cites: "case:<id>", "history:<id>", "neighbour:<id>", "policy:<chunk id>"
    kind: str  # similar_case | narrative_case | entity_history | neighbour_case | policy
    similarity: float
    outcome: Outcome | None  # None for evidence that is not a past case (a policy passage)
    risk_type: str = ""
    summary: str = ""


@dataclass(frozen=True)
class ReasoningStep:
    """One step the reasoner ran for a case, recorded on the decision."""

    name: str  # plan | structured_data | similar_cases | policy_search | reasoning | reflection
    outcome: str  # one line: what the step found or did
    duration_ms: float


@dataclass(frozen=True)
class StageTiming:
    stage: str
    duration_ms: float


EVENT_TYPE_ATTRIBUTE = "event_type"  # the categorical attribute every event carries
REASONER_FALLBACK_CODE = "REASONER_FALLBACK"  # reason code of a reasoner verdict that fell back to review


def reasoner_fell_back(reasons: Iterable[ReasonCode]) -> bool:
    """The reasoner fell back to review (its backend failed or ran out of time) instead of reasoning."""
    return any(r.code == REASONER_FALLBACK_CODE for r in reasons)


@dataclass(frozen=True)
class ScoreRequest:
    """What the orchestrator sends the fast scorer for one event."""

    request_id: str
    features: dict[str, float]
    entities: dict[str, str] = field(default_factory=dict)  # Entities field name -> id, for graph features
    attributes: dict[str, str] = field(default_factory=dict)  # categorical features, e.g. event_type
    text: dict[str, str] = field(default_factory=dict)  # the event's free-text fields (what a text model reads)
    trace_carrier: dict[str, str] = field(default_factory=dict)
    occurred_at: float | None = None  # event time, seconds since the epoch (UTC); None = when it is scored
    model_version: str = ""  # the model version to score with (the gateway's live one); "" = the scorer's default
    shadow_version: str = ""  # a candidate version to score the same rows with, beside (never instead of) it
    # ask for counterfactuals against this escalation band (band_low, band_high): the gateway's live band, which the
    # config may set apart from the card's. None (the default) = not asked; only asking rows pay for the search
    counterfactual_band: tuple[float, float] | None = None

    @property
    def counterfactual(self) -> bool:
        """The caller asked for counterfactual explanations of this event."""
        return self.counterfactual_band is not None

    @classmethod
    def of(cls, request_id: str, event_type: "EventType", entities: Entities, features: dict[str, float],
           trace_carrier: dict[str, str] | None = None, occurred_at: datetime | None = None,
           model_version: str = "", shadow_version: str = "",
           counterfactual_band: tuple[float, float] | None = None,
           text: dict[str, str] | None = None) -> "ScoreRequest":
        return cls(
            request_id=request_id,
            features=features,
            entities={name: value for name, value in asdict(entities).items() if value},
            attributes={EVENT_TYPE_ATTRIBUTE: event_type.value},
            text=dict(text or {}),
            trace_carrier=trace_carrier or {},
            occurred_at=occurred_at.timestamp() if occurred_at is not None else None,
            model_version=model_version,
            shadow_version=shadow_version,
            counterfactual_band=counterfactual_band,
        )


@dataclass(frozen=True)
class FeatureChange:
    """One request feature a counterfactual changes, from the event's value to the one that flips the decision."""

    feature: str
    from_value: float
    to_value: float
    action: str = ""  # the move in words (the model card's actionable entry), or the feature it is derived from
    spoofable: bool = False  # a fraudster can fake this change cheaply: not advice to show without care
    derived: bool = False  # moved with another feature to stay consistent (amount -> amount_to_typical_ratio)


@dataclass(frozen=True)
class Counterfactual:
    """The smallest change to the event's actionable features (the model card's) that brings the FAST MODEL's
    calibrated score below ``threshold`` (the band's low edge: APPROVE; or its high edge: out of BLOCK, to the band).
    ``found`` False: no allowed combination of moves reaches it (said, never invented); ``score`` is then the
    lowest score any candidate reached."""

    target: Action  # APPROVE (below band_low) or REVIEW (below band_high, leaving BLOCK)
    threshold: float
    found: bool
    changes: tuple[FeatureChange, ...] = ()
    score: float = 0.0  # the changed event's calibrated fast score (found), or the lowest reached (not found)
    original_score: float = 0.0
    candidates: int = 0  # changed events scored in the search


@dataclass(frozen=True)
class FastScore:
    """The fast model's answer for one event."""

    score: float  # calibrated probability of fraud
    raw_score: float  # the model's uncalibrated probability
    reasons: tuple[ReasonCode, ...]
    model_version: str
    provider: str  # onnxruntime execution provider that ran the model
    state_features: dict[str, float] = field(default_factory=dict)  # reported entity-state features (see proto)
    shadow_score: float | None = None  # the shadow version's calibrated score of the same row, when one was named
    shadow_version: str = ""
    # asked for (ScoreRequest.counterfactual_band) and scored at or above band_low: the change to APPROVE, then for a
    # score at or above band_high the change out of BLOCK; () otherwise
    counterfactuals: tuple[Counterfactual, ...] = ()


@dataclass(frozen=True)
class ReasoningRequest:
    """An escalated case: the event, the fast model's view of it, and the time the reasoner may spend."""

    event: RiskEvent
    fast_score: FastScore
    budget_ms: float
    trace_carrier: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReasonerVerdict:
    action: Action
    score: float  # the reasoner's own estimate of fraud probability
    confidence: float  # in [0, 1]
    rationale: str
    reasons: tuple[ReasonCode, ...]
    evidence: tuple[Evidence, ...]
    steps: tuple[ReasoningStep, ...]  # which reasoning steps ran, in order
    policy_version: str
    backend: str = ""  # the LLM backend of the reasoning step (evidence | llama_cpp | openai_compatible)


@dataclass(frozen=True)
class Decision:
    request_id: str
    event_type: EventType
    action: Action
    risk_score: float
    decided_by: Stage
    escalated: bool
    reasons: tuple[ReasonCode, ...]
    evidence: tuple[Evidence, ...]
    model_version: str
    policy_version: str
    timings: tuple[StageTiming, ...]
    trace_id: str
    degraded: bool
    degraded_reason: str
    decided_at: datetime
    degraded_cause: DegradedCause = DegradedCause.NONE
    missing_features: tuple[str, ...] = ()
    fast_score: float = 0.0
    scorer_provider: str = ""
    replayed: bool = False
    reasoning_steps: tuple[ReasoningStep, ...] = ()
    rationale: str = ""
    reasoner_backend: str = ""
    state_features: dict[str, float] = field(default_factory=dict)
    shadow: "ShadowDecision | None" = None  # what a candidate beside the live one would have decided: recorded only
    counterfactuals: tuple[Counterfactual, ...] = ()  # asked for, REVIEW/BLOCK only: flips of the fast model's view


@dataclass(frozen=True)
class ShadowDecision:
    """A candidate model version or escalation band's decision on a live event, made beside the live one and
    recorded with it, never returned (see riskcascade/core/shadow.py)."""

    model_version: str
    policy_version: str
    score: float
    band_low: float
    band_high: float
    action: Action
    escalated: bool
    action_from: str  # fast_model | live_reasoner | undecided: where the escalated candidate's action comes from


@dataclass(frozen=True)
class Feedback:
    feedback_id: str
    request_id: str
    outcome: Outcome
    risk_type: str = ""
    note: str = ""
    recorded_at: datetime | None = None


@dataclass(frozen=True)
class LabelRecord:
    """An adjudicated outcome of a decided event, as the entity state counts it: from when it arrived."""

    request_id: str
    fraud: bool
    known_at: datetime


@dataclass(frozen=True)
class AdjudicatedCase:
    """A past case with a known outcome: what the reasoner retrieves as evidence."""

    case_id: str
    event_type: EventType
    features: dict[str, float]
    outcome: Outcome
    risk_type: str = ""
    entities: Entities | None = None
    occurred_at: datetime | None = None
    summary: str = ""  # one plain-language line about the case, outcome included, for people and prompts
    text: dict[str, str] = field(default_factory=dict)  # the event's free-text fields (e.g. note), as received
    label_known_at: datetime | None = None  # when the outcome became known (feedback arrival); None = unknown


@dataclass(frozen=True)
class ScorerInfo:
    """What the scorer tells callers about itself (health/info, validation, escalation band)."""

    model_version: str
    feature_names: tuple[str, ...]
    band_low: float
    band_high: float
    provider: str  # the provider the session actually runs on
    provider_detail: str  # why (the GPU probe's line)
    # plausible [low, high] per input feature, from the model card (training's extremes, widened); {} for a card
    # written before cards declared ranges: the edge then holds every feature to its global bound only
    feature_ranges: dict[str, tuple[float, float]] = field(default_factory=dict, hash=False)
    # share of validation events the band escalated when it was chosen (the model card's escalation_share): the
    # live escalation share is watched against it; None for a card that does not say
    target_escalation_share: float | None = None
