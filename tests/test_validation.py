"""Request validation at the edge: every bad field is named, every good request converts faithfully."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.validation import InvalidField, to_feedback, to_risk_event
from risk.v1 import decision_pb2 as pb
from riskcascade.core.domain import EventType

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
    st.dictionaries(st.sampled_from(FEATURES), st.floats(-1e9, 1e9)),  # within validation.max_abs_feature_value
    st.from_regex(r"[A-Za-z0-9._:\-]{1,128}", fullmatch=True),
)
def test_valid_inputs_round_trip(features, request_id):
    r = good(); r.request_id = request_id
    r.event.features.clear(); r.event.features.update(features)
    event = to_risk_event(r, FEATURES)
    assert event.request_id == request_id and event.features == features


@given(st.text(min_size=1, max_size=20).filter(lambda s: s not in FEATURES))
def test_unknown_feature_names_always_rejected(name):
    from orchestrator.validation import quoted

    r = good(); r.event.features[name] = 1.0
    assert field_of(r) == f"event.features[{quoted(name)}]"  # as typed when printable, escaped when not


def test_feedback_validation():
    ok = to_feedback(pb.SubmitFeedbackRequest(feedback_id="f1", request_id="r1", outcome=pb.OUTCOME_FRAUD))
    assert ok.outcome.value == "fraud"
    with pytest.raises(InvalidField, match="outcome"):
        to_feedback(pb.SubmitFeedbackRequest(feedback_id="f1", request_id="r1"))
    with pytest.raises(InvalidField, match="feedback_id"):
        to_feedback(pb.SubmitFeedbackRequest(request_id="r1", outcome=pb.OUTCOME_FRAUD))


# -- exact ids, occurred_at, plausible feature values (issue 13, finding 5) -----------------------------------

import asyncio  # noqa: E402
import logging  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from orchestrator.validation import validate_id  # noqa: E402
from riskcascade.core.config import ValidationSettings  # noqa: E402

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
RANGES = {"amount": (0.0, 10_000.0), "account_age_days": (0.0, 8_000.0), "new_device": (0.0, 2.0)}
LIMITS = ValidationSettings()


def problem(request, **kwargs) -> InvalidField:
    kwargs.setdefault("now", NOW)
    with pytest.raises(InvalidField) as err:
        to_risk_event(request, FEATURES, **kwargs)
    return err.value


@pytest.mark.parametrize("value", ["x\n", "x\r\n", "\nx", "x\x00", "x y", "x" * 129, "ü"])
def test_ids_must_match_exactly(value):
    with pytest.raises(InvalidField, match="request_id"):
        validate_id(value, "request_id")
    r = good(); r.request_id = value
    assert field_of(r) == "request_id"
    with pytest.raises(InvalidField, match="feedback_id"):
        to_feedback(pb.SubmitFeedbackRequest(feedback_id=value, request_id="r1", outcome=pb.OUTCOME_FRAUD))


@given(st.text(max_size=140) | st.from_regex(r"[A-Za-z0-9._:\-]{1,130}[\n\r ]?", fullmatch=True))
def test_an_id_is_accepted_exactly_when_it_is_1_to_128_safe_characters(value):
    safe = 1 <= len(value) <= 128 and all(c.isascii() and (c.isalnum() or c in "._:-") for c in value)
    try:
        assert validate_id(value, "request_id") == value and safe
    except InvalidField as err:
        assert not safe and err.field == "request_id"


def at(seconds: int, nanos: int = 0) -> pb.DecideRequest:
    r = good(); r.event.occurred_at.seconds = seconds; r.event.occurred_at.nanos = nanos
    return r


@pytest.mark.parametrize("seconds", [2**62, -(2**62), 253402300800, -62135596801, 2**63 - 1, -(2**63)])
def test_occurred_at_outside_the_timestamp_range_is_named_not_a_crash(seconds):
    err = problem(at(seconds))
    assert err.field == "event.occurred_at" and "not even a valid Timestamp" in err.description


def test_occurred_at_must_lie_in_the_plausibility_window():
    window = LIMITS.occurred_at_max_future_s
    assert problem(at(-1)).field == "event.occurred_at"  # before 1970-01-01
    assert problem(at(int(NOW.timestamp() + window) + 1)).field == "event.occurred_at"
    err = problem(at(253402300799))  # the last legal Timestamp second: legal, not plausible
    assert err.field == "event.occurred_at" and "9999-12-31T23:59:59Z" in err.description
    assert to_risk_event(at(0), FEATURES, now=NOW).occurred_at == datetime(1970, 1, 1, tzinfo=timezone.utc)
    edge = int(NOW.timestamp() + window)
    assert to_risk_event(at(edge), FEATURES, now=NOW).occurred_at == NOW + timedelta(seconds=window)
    late = ValidationSettings(occurred_at_earliest_s=NOW.timestamp() - 60, occurred_at_max_future_s=0)
    assert problem(at(int(NOW.timestamp()) - 61), limits=late).field == "event.occurred_at"
    assert problem(at(int(NOW.timestamp()) + 1), limits=late).field == "event.occurred_at"


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_any_timestamp_is_either_in_the_window_or_named(seconds, nanos):
    try:
        event = to_risk_event(at(seconds, nanos), FEATURES, now=NOW)
    except InvalidField as err:
        assert err.field == "event.occurred_at"
    else:
        assert datetime(1970, 1, 1, tzinfo=timezone.utc) <= event.occurred_at
        assert event.occurred_at <= NOW + timedelta(seconds=LIMITS.occurred_at_max_future_s)


def test_absurd_magnitudes_are_refused_even_without_declared_ranges():
    for value in (1e308, -1e308, LIMITS.max_abs_feature_value * 2):
        r = good(); r.event.features["amount"] = value
        err = problem(r)
        assert err.field == "event.features[amount]" and "outside the accepted range" in err.description
    r = good(); r.event.features["amount"] = LIMITS.max_abs_feature_value
    assert to_risk_event(r, FEATURES).features["amount"] == LIMITS.max_abs_feature_value


def test_values_outside_the_model_cards_plausible_range_are_refused_with_the_range():
    r = good(); r.event.features["account_age_days"] = -3.0  # a negative count or age
    err = problem(r, ranges=RANGES)
    assert err.field == "event.features[account_age_days]"
    assert "-3 is outside the plausible range [0, 8000]" in err.description
    r = good(); r.event.features["amount"] = 10_000.01
    assert problem(r, ranges=RANGES).field == "event.features[amount]"
    r = good(); r.event.features["amount"] = 10_000.0
    assert to_risk_event(r, FEATURES, ranges=RANGES).features["amount"] == 10_000.0


@given(st.sampled_from(sorted(RANGES)), st.floats())
def test_no_value_outside_its_range_ever_converts(name, value):
    r = good(); r.event.features[name] = value
    try:
        event = to_risk_event(r, FEATURES, ranges=RANGES)
    except InvalidField as err:
        assert err.field == f"event.features[{name}]"
    else:
        low, high = RANGES[name]
        assert low <= event.features[name] <= high


def test_caller_input_quoted_in_an_error_is_short_and_printable():
    r = good(); r.event.features["\n" + "z" * 100_000] = 1.0
    err = problem(r)
    assert err.field.startswith("event.features[\\nzzz") and len(err.field) < 100
    assert "\n" not in str(err)


# -- the model card's ranges: computed at training, exposed by the scorer ---------------------------------------

def test_plausible_ranges_widen_the_training_extremes_and_keep_signs():
    from riskcascade.modelling.training import observed_extremes, plausible_ranges

    values = np.array([[0.0, 1.0, 5.0, -3.0, np.nan, 0.0], [10.0, 1.0, 7.0, -1.0, np.nan, 0.0]])
    extremes = observed_extremes(["amount", "flag", "age", "delta", "never", "zero"], values)
    assert "never" not in extremes
    ranges = plausible_ranges(extremes, margin=1.0)
    assert ranges["amount"] == (0.0, 20.0)  # non-negative in training: stays non-negative
    assert ranges["age"] == (3.0, 9.0)
    assert ranges["delta"] == (-5.0, 0.0)  # never positive in training: stays non-positive
    assert ranges["flag"] == (0.0, 2.0)  # constant: widened by its own magnitude
    assert "zero" not in ranges  # always 0: no range, the global bound applies
    assert plausible_ranges(extremes, margin=0.0)["amount"] == (0.0, 10.0)


def card_with(**extra):
    from riskcascade.core.model_card import ModelCard

    return ModelCard.model_validate({
        "version": "m1", "created_at": "2026-01-01T00:00:00+00:00", "feature_names": ["amount", "new_device"],
        "feature_descriptions": {}, "calibration": {"a": 1.0, "b": 0.0},
        "thresholds": {"band_low": 0.2, "band_high": 0.8, "target_escalation_share": 0.1},
        "onnx": {"parity_max_abs_diff": 0.0}, "feature_scaling": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
        **extra,
    })


def test_scorer_info_exposes_the_cards_ranges_and_an_old_card_has_none():
    from services.scorer.fast_model import declared_feature_ranges

    assert declared_feature_ranges(card_with()) == {}
    assert declared_feature_ranges(card_with(feature_ranges={"amount": [0, 20.5]})) == {"amount": (0.0, 20.5)}
    with pytest.raises(ValueError, match="feature_ranges"):
        declared_feature_ranges(card_with(feature_ranges={"bogus": [0, 1]}))
    with pytest.raises(ValueError, match="feature_ranges"):
        declared_feature_ranges(card_with(feature_ranges={"amount": [2, 1]}))


# -- the decode guard, on a real grpc.aio server ------------------------------------------------------------------

class EchoServicer:
    """Every DecisionService method answers an empty response: only the edge is under test."""

    def __init__(self):
        from risk.v1 import decision_pb2_grpc

        class Servicer(decision_pb2_grpc.DecisionServiceServicer):
            async def Decide(self, request, context):
                return pb.DecideResponse(decision=pb.Decision(request_id=request.request_id))

            async def DecideBatch(self, request, context):
                return pb.DecideBatchResponse()

            async def SubmitFeedback(self, request, context):
                return pb.SubmitFeedbackResponse(feedback_id=request.feedback_id)

            async def GetDecision(self, request, context):
                return pb.GetDecisionResponse()

            async def GetServiceInfo(self, request, context):
                return pb.ServiceInfo(model_version="m1")

            async def DecideStream(self, request_iterator, context):
                async for request in request_iterator:
                    yield pb.DecideBatchResult(request_id=request.request_id,
                                               decision=pb.Decision(request_id=request.request_id))

        self.servicer = Servicer()


METHODS = {
    "Decide": pb.DecideRequest(request_id="r1", event=pb.Event(text={"note": "hello"})),
    "DecideBatch": pb.DecideBatchRequest(requests=[pb.DecideRequest(request_id="r1")]),
    "SubmitFeedback": pb.SubmitFeedbackRequest(feedback_id="f1", request_id="r1", note="hello"),
    "GetDecision": pb.GetDecisionRequest(request_id="r1"),
    "GetServiceInfo": None,  # an empty message: every body but a corrupt one decodes
}


def bad_bodies(message) -> list[bytes]:
    bodies = [b"\xff\xff\xff\xff", b"\x0a\xff"]  # garbage; a length prefix promising bytes that never come
    if message is not None:
        wire = message.SerializeToString()
        bodies.append(wire[:-1])  # truncated
        bodies.append(wire.replace(b"r1", b"\xc3\x28") if b"r1" in wire else wire.replace(b"hello", b"h\xffllo"))
    return bodies


@contextmanager
def recorded_spans(monkeypatch):
    """Span names with their final rpc.grpc.status_code, from the tracing interceptor."""
    import orchestrator.interceptors as interceptors

    spans: list[dict] = []

    @contextmanager
    def fake_span(name, carrier=None, **attributes):
        class Span:
            def set_attribute(self, key, value):
                record[key] = value

        record = {"name": name}
        spans.append(record)
        yield Span()

    monkeypatch.setattr(interceptors, "span", fake_span)
    yield spans


async def call_all(bodies_by_method) -> list[tuple[str, grpc.StatusCode, str]]:
    from orchestrator.interceptors import service_interceptors
    from risk.v1 import decision_pb2_grpc

    server = grpc.aio.server(interceptors=service_interceptors())
    decision_pb2_grpc.add_DecisionServiceServicer_to_server(EchoServicer().servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method, bodies in bodies_by_method.items():
                raw = channel.unary_unary(f"/risk.v1.DecisionService/{method}")
                for body in bodies:
                    try:
                        await raw(body, timeout=10)
                        results.append((method, grpc.StatusCode.OK, ""))
                    except grpc.aio.AioRpcError as err:
                        results.append((method, err.code(), err.details()))
    finally:
        await server.stop(0)
    return results


def test_undecodable_bodies_get_invalid_argument_one_warning_and_no_traceback(caplog, monkeypatch):
    bodies = {method: bad_bodies(message) for method, message in METHODS.items()}
    bodies["GetServiceInfo"] = bodies["GetServiceInfo"][:1]  # b"\x0a\xff" is a valid (unknown) field there
    caplog.set_level(logging.INFO)
    with recorded_spans(monkeypatch) as spans:
        results = asyncio.run(call_all(bodies))
    n = sum(len(b) for b in bodies.values())
    assert len(results) == n
    for method, code, details in results:
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        request_type = "risk.v1.GetServiceInfoRequest" if method == "GetServiceInfo" else f"risk.v1.{method}Request"
        assert f"not a valid {request_type}" in details
    assert any("UTF-8" in d for _, _, d in results)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "orchestrator.interceptors"]
    assert len(warnings) == n
    assert all("\n" not in r.getMessage() for r in warnings)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
    assert len(spans) == n and all(s["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                                   for s in spans)


def test_good_bodies_pass_the_guard_unchanged(caplog, monkeypatch):
    bodies = {m: [message.SerializeToString() if message is not None else b""] for m, message in METHODS.items()}
    with recorded_spans(monkeypatch) as spans:
        results = asyncio.run(call_all(bodies))
    assert [code for _, code, _ in results] == [grpc.StatusCode.OK] * len(METHODS)
    assert len(spans) == len(METHODS) and {s["rpc.grpc.status_code"] for s in spans} == {0}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_undecodable_stream_message_ends_the_stream_with_invalid_argument_after_the_good_ones(caplog, monkeypatch):
    from orchestrator.interceptors import service_interceptors
    from risk.v1 import decision_pb2_grpc

    good = [pb.DecideRequest(request_id=f"s{i}").SerializeToString() for i in range(2)]
    bodies = [good[0], b"\x0a\xff", good[1]]  # the second message is cut short

    async def scenario():
        server = grpc.aio.server(interceptors=service_interceptors())
        decision_pb2_grpc.add_DecisionServiceServicer_to_server(EchoServicer().servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream("/risk.v1.DecisionService/DecideStream",
                                             response_deserializer=pb.DecideBatchResult.FromString)(iter(bodies),
                                                                                                   timeout=10)
                answered = []
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for result in call:
                        answered.append(result.request_id)
                return answered, err.value
        finally:
            await server.stop(0)

    caplog.set_level(logging.INFO)
    with recorded_spans(monkeypatch) as spans:
        answered, err = asyncio.run(scenario())
    assert answered == ["s0"]  # the item before the bad one was answered; nothing after it was read
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "stream item 1 is not a valid risk.v1.DecideRequest" in err.details()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "orchestrator.interceptors"]
    assert len(warnings) == 1 and "stream item 1" in warnings[0].getMessage()
    assert "Traceback" not in caplog.text
    assert [s["rpc.grpc.status_code"] for s in spans] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
