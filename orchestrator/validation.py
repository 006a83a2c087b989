"""Request validation at the gRPC edge: protobuf in, domain objects out, or InvalidField naming the field."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timezone

from risk.v1 import decision_pb2 as pb
from riskcascade.domain import Entities, EventType, Outcome, RiskEvent

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_ENTITY_ID_CHARS = 256
MAX_TEXT_FIELDS = 16
MAX_TEXT_KEY_CHARS = 64
MAX_TEXT_VALUE_CHARS = 4096
MAX_RISK_TYPE_CHARS = 64
MAX_NOTE_CHARS = 4096

EVENT_TYPES = {
    pb.EVENT_TYPE_ORDER: EventType.ORDER,
    pb.EVENT_TYPE_LOGIN: EventType.LOGIN,
    pb.EVENT_TYPE_PAYOUT: EventType.PAYOUT,
    pb.EVENT_TYPE_REVIEW: EventType.REVIEW,
    pb.EVENT_TYPE_PROMO_REDEMPTION: EventType.PROMO_REDEMPTION,
    pb.EVENT_TYPE_ACCOUNT_CHANGE: EventType.ACCOUNT_CHANGE,
}
OUTCOMES = {pb.OUTCOME_LEGITIMATE: Outcome.LEGITIMATE, pb.OUTCOME_FRAUD: Outcome.FRAUD}


@dataclass(frozen=True)
class InvalidField(ValueError):
    """A request field is missing or malformed. ``field`` is its path, e.g. ``event.features[amount]``."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


def validate_id(value: str, field: str) -> str:
    if not value:
        raise InvalidField(field, "is required")
    if not ID_PATTERN.match(value):
        raise InvalidField(field, "must be 1-128 characters of letters, digits and . _ : -")
    return value


def to_risk_event(request: pb.DecideRequest, known_features: Collection[str], prefix: str = "") -> RiskEvent:
    """Validate a DecideRequest against the deployed model's feature names."""
    request_id = validate_id(request.request_id, f"{prefix}request_id")
    if not request.HasField("event"):
        raise InvalidField(f"{prefix}event", "is required")
    event = request.event
    p = f"{prefix}event"
    if event.type not in EVENT_TYPES:
        raise InvalidField(f"{p}.type", "must be a known EventType other than EVENT_TYPE_UNSPECIFIED")
    entities = _entities(event, p)
    features: dict[str, float] = {}
    for name, value in event.features.items():
        field = f"{p}.features[{name}]"
        if name not in known_features:
            raise InvalidField(field, "is not a feature of the deployed model (see its model card)")
        if not math.isfinite(value):
            raise InvalidField(field, "must be a finite number")
        features[name] = float(value)
    if len(event.text) > MAX_TEXT_FIELDS:
        raise InvalidField(f"{p}.text", f"at most {MAX_TEXT_FIELDS} text fields")
    for key, value in event.text.items():
        if not key or len(key) > MAX_TEXT_KEY_CHARS:
            raise InvalidField(f"{p}.text", f"keys must be 1-{MAX_TEXT_KEY_CHARS} characters")
        if len(value) > MAX_TEXT_VALUE_CHARS:
            raise InvalidField(f"{p}.text[{key}]", f"at most {MAX_TEXT_VALUE_CHARS} characters")
    occurred_at = None
    if event.HasField("occurred_at"):
        if event.occurred_at.nanos < 0 or event.occurred_at.nanos > 999_999_999:
            raise InvalidField(f"{p}.occurred_at", "nanos out of range")
        occurred_at = event.occurred_at.ToDatetime(tzinfo=timezone.utc)
    return RiskEvent(
        request_id=request_id,
        event_type=EVENT_TYPES[event.type],
        entities=entities,
        features=features,
        text=dict(event.text),
        occurred_at=occurred_at,
    )


def _entities(event: pb.Event, p: str) -> Entities:
    if not event.HasField("entities"):
        raise InvalidField(f"{p}.entities", "is required")
    e = event.entities
    if not e.account_id:
        raise InvalidField(f"{p}.entities.account_id", "is required")
    for name in ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id"):
        if len(getattr(e, name)) > MAX_ENTITY_ID_CHARS:
            raise InvalidField(f"{p}.entities.{name}", f"at most {MAX_ENTITY_ID_CHARS} characters")
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


def to_feedback(request: pb.SubmitFeedbackRequest) -> FeedbackInput:
    feedback_id = validate_id(request.feedback_id, "feedback_id")
    request_id = validate_id(request.request_id, "request_id")
    if request.outcome not in OUTCOMES:
        raise InvalidField("outcome", "must be OUTCOME_LEGITIMATE or OUTCOME_FRAUD")
    if len(request.risk_type) > MAX_RISK_TYPE_CHARS:
        raise InvalidField("risk_type", f"at most {MAX_RISK_TYPE_CHARS} characters")
    if len(request.note) > MAX_NOTE_CHARS:
        raise InvalidField("note", f"at most {MAX_NOTE_CHARS} characters")
    return FeedbackInput(feedback_id, request_id, OUTCOMES[request.outcome], request.risk_type, request.note)
