"""Request validation at the gRPC edge: protobuf in, domain objects out, or InvalidField naming the field.

Nothing implausible gets through to a stage: ids match their pattern exactly, ``occurred_at`` lies in the
configured window (``validation.occurred_at_*``), and every feature value is finite, within the global bound
``validation.max_abs_feature_value`` and within the plausible range the deployed model's card declares for it
(``ranges``: computed from the training data, see ``riskcascade.modelling.training``). An out-of-range value is refused,
not scored and flagged: gradient-boosted trees are flat beyond the training range, so any score there is a guess
with a confident face, and a scored event is folded into the live entity state and stored, where garbage would
skew the next events of the same account, device and IP.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from risk.v1 import decision_pb2 as pb
from riskcascade.core.config import ValidationSettings
from riskcascade.core.domain import Entities, EventType, Outcome, RiskEvent

# The id format is part of the API (risk/v1/decision.proto: request_id and feedback_id), not a tunable limit.
ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
DEFAULT_LIMITS = ValidationSettings()
# google.protobuf.Timestamp's legal range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
TIMESTAMP_MIN_SECONDS = int(datetime(1, 1, 1, tzinfo=timezone.utc).timestamp())
TIMESTAMP_MAX_SECONDS = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp())
MAX_NANOS = 999_999_999

EVENT_TYPES = {
    pb.EVENT_TYPE_ORDER: EventType.ORDER,
    pb.EVENT_TYPE_LOGIN: EventType.LOGIN,
    pb.EVENT_TYPE_PAYOUT: EventType.PAYOUT,
    pb.EVENT_TYPE_REVIEW: EventType.REVIEW,
    pb.EVENT_TYPE_PROMO_REDEMPTION: EventType.PROMO_REDEMPTION,
    pb.EVENT_TYPE_ACCOUNT_CHANGE: EventType.ACCOUNT_CHANGE,
}
OUTCOMES = {pb.OUTCOME_LEGITIMATE: Outcome.LEGITIMATE, pb.OUTCOME_FRAUD: Outcome.FRAUD}


@dataclass(eq=False)  # not frozen: raising through a context manager sets __traceback__ on the exception
class InvalidField(ValueError):
    """A request field is missing or malformed. ``field`` is its path, e.g. ``event.features[amount]``."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


def quoted(value: str, limits: ValidationSettings = DEFAULT_LIMITS) -> str:
    """Caller input as it may appear in an error message or field path: at most ``max_quoted_chars``, printable.

    An error travels back in the status trailers, which have a size limit; a megabyte of garbage must not turn
    INVALID_ARGUMENT into a transport failure."""
    shown = value.encode("unicode_escape").decode("ascii") if not value.isprintable() else value
    if len(shown) <= limits.max_quoted_chars:
        return shown
    return shown[: limits.max_quoted_chars - 3] + "..."


def validate_id(value: str, field: str) -> str:
    if not value:
        raise InvalidField(field, "is required")
    if not ID_PATTERN.fullmatch(value):
        raise InvalidField(field, "must be 1-128 characters of letters, digits and . _ : -")
    return value


def to_risk_event(
    request: pb.DecideRequest,
    known_features: Collection[str],
    prefix: str = "",
    *,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    limits: ValidationSettings = DEFAULT_LIMITS,
    now: datetime | None = None,
) -> RiskEvent:
    """Validate a DecideRequest against the deployed model's feature names and their plausible ``ranges``
    (the model card's ``feature_ranges``; a feature without one is held to ``limits.max_abs_feature_value``).
    ``now`` (default: the clock) bounds how far in the future ``occurred_at`` may lie."""
    request_id = validate_id(request.request_id, f"{prefix}request_id")
    if not request.HasField("event"):
        raise InvalidField(f"{prefix}event", "is required")
    event = request.event
    p = f"{prefix}event"
    if event.type not in EVENT_TYPES:
        raise InvalidField(f"{p}.type", "must be a known EventType other than EVENT_TYPE_UNSPECIFIED")
    entities = _entities(event, p, limits)
    features = _features(event, p, known_features, ranges or {}, limits)
    if len(event.text) > limits.max_text_fields:
        raise InvalidField(f"{p}.text", f"at most {limits.max_text_fields} text fields")
    for key, value in event.text.items():
        if not key or len(key) > limits.max_text_key_chars:
            raise InvalidField(f"{p}.text", f"keys must be 1-{limits.max_text_key_chars} characters")
        if len(value) > limits.max_text_value_chars:
            raise InvalidField(f"{p}.text[{quoted(key, limits)}]", f"at most {limits.max_text_value_chars} characters")
    occurred_at = _occurred_at(event, f"{p}.occurred_at", limits, now) if event.HasField("occurred_at") else None
    return RiskEvent(
        request_id=request_id,
        event_type=EVENT_TYPES[event.type],
        entities=entities,
        features=features,
        text=dict(event.text),
        occurred_at=occurred_at,
    )


def _features(
    event: pb.Event, p: str, known: Collection[str], ranges: Mapping[str, tuple[float, float]],
    limits: ValidationSettings,
) -> dict[str, float]:
    features: dict[str, float] = {}
    bound = limits.max_abs_feature_value
    for name, value in event.features.items():
        field = f"{p}.features[{quoted(name, limits)}]"
        if name not in known:
            raise InvalidField(field, "is not a feature of the deployed model (see its model card)")
        if not math.isfinite(value):
            raise InvalidField(field, "must be a finite number")
        if abs(value) > bound:
            raise InvalidField(field, f"{value:g} is outside the accepted range [{-bound:g}, {bound:g}]")
        if name in ranges:
            low, high = ranges[name]
            if not low <= value <= high:
                raise InvalidField(
                    field, f"{value:g} is outside the plausible range [{low:g}, {high:g}] of the deployed model"
                )
        features[name] = float(value)
    return features


def _occurred_at(event: pb.Event, field: str, limits: ValidationSettings, now: datetime | None) -> datetime:
    stamp = event.occurred_at
    if not 0 <= stamp.nanos <= MAX_NANOS:
        raise InvalidField(field, "nanos out of range")
    latest_s = (now or datetime.now(timezone.utc)).timestamp() + limits.occurred_at_max_future_s
    earliest_s = limits.occurred_at_earliest_s
    window = (f"must lie between {_iso(earliest_s)} and {limits.occurred_at_max_future_s:g} s after the server's "
              "clock")
    if not TIMESTAMP_MIN_SECONDS <= stamp.seconds <= TIMESTAMP_MAX_SECONDS:  # ToDatetime would raise
        raise InvalidField(field, f"{window}; seconds={stamp.seconds} is not even a valid Timestamp")
    seconds = stamp.seconds + stamp.nanos / 1e9
    if not earliest_s <= seconds <= latest_s:
        raise InvalidField(field, f"{window}; got {stamp.ToJsonString()}")
    return stamp.ToDatetime(tzinfo=timezone.utc)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _entities(event: pb.Event, p: str, limits: ValidationSettings) -> Entities:
    if not event.HasField("entities"):
        raise InvalidField(f"{p}.entities", "is required")
    e = event.entities
    if not e.account_id:
        raise InvalidField(f"{p}.entities.account_id", "is required")
    for name in ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id"):
        if len(getattr(e, name)) > limits.max_entity_id_chars:
            raise InvalidField(f"{p}.entities.{name}", f"at most {limits.max_entity_id_chars} characters")
    if e.ip:
        try:
            ipaddress.ip_address(e.ip)
        except ValueError:
            raise InvalidField(f"{p}.entities.ip", "must be an IPv4 or IPv6 address") from None
    return Entities(e.account_id, e.seller_id, e.device_id, e.ip, e.payment_instrument_id)


@dataclass(frozen=True)
class FeedbackInput:
    feedback_id: str
    request_id: str
    outcome: Outcome
    risk_type: str
    note: str


def to_feedback(request: pb.SubmitFeedbackRequest, limits: ValidationSettings = DEFAULT_LIMITS) -> FeedbackInput:
    feedback_id = validate_id(request.feedback_id, "feedback_id")
    request_id = validate_id(request.request_id, "request_id")
    if request.outcome not in OUTCOMES:
        raise InvalidField("outcome", "must be OUTCOME_LEGITIMATE or OUTCOME_FRAUD")
    if len(request.risk_type) > limits.max_risk_type_chars:
        raise InvalidField("risk_type", f"at most {limits.max_risk_type_chars} characters")
    if len(request.note) > limits.max_note_chars:
        raise InvalidField("note", f"at most {limits.max_note_chars} characters")
    return FeedbackInput(feedback_id, request_id, OUTCOMES[request.outcome], request.risk_type, request.note)
