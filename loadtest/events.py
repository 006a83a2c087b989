"""Labelled events (from a data set in our CSV format) as DecideRequest messages, for load and tests."""

from __future__ import annotations

from risk.v1 import decision_pb2 as pb
from riskcascade.modelling.synthetic import LabelledEvent, event_text

EVENT_TYPES = {
    "order": pb.EVENT_TYPE_ORDER,
    "login": pb.EVENT_TYPE_LOGIN,
    "payout": pb.EVENT_TYPE_PAYOUT,
    "review": pb.EVENT_TYPE_REVIEW,
    "promo_redemption": pb.EVENT_TYPE_PROMO_REDEMPTION,
    "account_change": pb.EVENT_TYPE_ACCOUNT_CHANGE,
}


def decide_request(event: LabelledEvent, request_id: str) -> pb.DecideRequest:
    """The request a trust service would send for ``event`` at its time (its label, of course, stays behind)."""
    en = event.entities
    request = pb.DecideRequest(
        request_id=request_id,
        event=pb.Event(
            type=EVENT_TYPES[event.event_type.value],
            entities=pb.Entities(account_id=en.account_id, seller_id=en.seller_id, device_id=en.device_id,
                                 ip=en.ip, payment_instrument_id=en.payment_instrument_id),
            features={k: v for k, v in event.features.items() if v == v},  # NaN means absent
            text=event_text(event),
        ),
    )
    request.event.occurred_at.FromDatetime(event.occurred_at)
    return request
