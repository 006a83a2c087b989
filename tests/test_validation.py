"""Request validation at the edge: every bad field is named, every good request converts faithfully."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.validation import InvalidField, to_feedback, to_risk_event
from risk.v1 import decision_pb2 as pb
from riskcascade.domain import EventType

FEATURES = ("amount", "account_age_days", "new_device")


def good(**event_overrides) -> pb.DecideRequest:
    event = pb.Event(
        type=pb.EVENT_TYPE_ORDER,
        entities=pb.Entities(account_id="acct-1", device_id="dev-1", ip="10.0.0.1"),
        features={"amount": 12.5, "new_device": 1.0},
        text={"note": "gift for mum"},
    )
    for k, v in event_overrides.items():
        setattr(event, k, v)
    return pb.DecideRequest(request_id="req-1", event=event)


def field_of(request) -> str:
    with pytest.raises(InvalidField) as err:
        to_risk_event(request, FEATURES)
    return err.value.field


def test_good_request_converts():
    event = to_risk_event(good(), FEATURES)
    assert event.request_id == "req-1" and event.event_type is EventType.ORDER
    assert event.features == {"amount": 12.5, "new_device": 1.0}
    assert event.entities.device_id == "dev-1" and event.text == {"note": "gift for mum"}


def test_each_bad_field_is_named():
    assert field_of(pb.DecideRequest(event=good().event)) == "request_id"
    assert field_of(pb.DecideRequest(request_id="bad id!", event=good().event)) == "request_id"
    assert field_of(pb.DecideRequest(request_id="r")) == "event"
    r = good(); r.event.type = pb.EVENT_TYPE_UNSPECIFIED
    assert field_of(r) == "event.type"
    r = good(); r.event.entities.account_id = ""
    assert field_of(r) == "event.entities.account_id"
    r = good(); r.event.entities.ip = "999.1.1.1"
    assert field_of(r) == "event.entities.ip"
    r = good(); r.event.features["bogus"] = 1.0
    assert field_of(r) == "event.features[bogus]"
    r = good(); r.event.features["amount"] = math.nan
    assert field_of(r) == "event.features[amount]"
    r = good(); r.event.text["note"] = "x" * 5000
    assert field_of(r) == "event.text[note]"
    r = good(); r.event.ClearField("entities")
    assert field_of(r) == "event.entities"


def test_batch_prefix_names_the_item():
    r = good(); r.event.features["amount"] = math.inf
    with pytest.raises(InvalidField) as err:
        to_risk_event(r, FEATURES, prefix="requests[3].")
    assert err.value.field == "requests[3].event.features[amount]"


@given(
    st.dictionaries(st.sampled_from(FEATURES), st.floats(allow_nan=False, allow_infinity=False)),
    st.from_regex(r"[A-Za-z0-9._:\-]{1,128}", fullmatch=True),
)
def test_valid_inputs_round_trip(features, request_id):
    r = good(); r.request_id = request_id
    r.event.features.clear(); r.event.features.update(features)
    event = to_risk_event(r, FEATURES)
    assert event.request_id == request_id and event.features == features


@given(st.text(min_size=1, max_size=20).filter(lambda s: s not in FEATURES))
def test_unknown_feature_names_always_rejected(name):
    r = good(); r.event.features[name] = 1.0
    assert field_of(r) == f"event.features[{name}]"


def test_feedback_validation():
    ok = to_feedback(pb.SubmitFeedbackRequest(feedback_id="f1", request_id="r1", outcome=pb.OUTCOME_FRAUD))
    assert ok.outcome.value == "fraud"
    with pytest.raises(InvalidField, match="outcome"):
        to_feedback(pb.SubmitFeedbackRequest(feedback_id="f1", request_id="r1"))
    with pytest.raises(InvalidField, match="feedback_id"):
        to_feedback(pb.SubmitFeedbackRequest(request_id="r1", outcome=pb.OUTCOME_FRAUD))
