"""Fuzzing the running platform's edge: more than 10,000 hostile, broken and borderline requests.

Raw random bytes, truncated messages and invalid UTF-8 go to every DecisionService method; structurally valid
DecideRequest, DecideBatchRequest, SubmitFeedbackRequest and GetDecisionRequest messages carry generated fields
(extreme floats, huge and negative values, odd ids, timestamps at the edges of the legal and the plausible range,
unknown features, big text). What must hold:

* no call ends UNKNOWN or INTERNAL; every error is a standard code of ``ALLOWED``;
* an undecodable body gets INVALID_ARGUMENT naming the request message type;
* a malformed request gets INVALID_ARGUMENT (a batch item: an item error with code 3);
* no input outside the plausible range (the model card's ``feature_ranges``, ``validation.max_abs_feature_value``,
  the ``occurred_at`` window) is ever decided, in Decide or in a batch item;
* the platform log gains no traceback and at most about one line per refused request;
* health and a good Decide still answer afterwards.

The generator is seeded (``RISKCASCADE_FUZZ_SEED``, default below) so a failure replays. Valid Decide requests are
decided for real (persisted, folded into the live state), so every request id is unique to the run and every
entity is one of the run's own (``fz-`` ids, IPv6 documentation addresses), never one another test looks at.
"""

from __future__ import annotations

import collections
import json
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.events import decide_request
from risk.v1 import decision_pb2 as pb
from riskcascade.core.config import load_settings
from riskcascade.core.model_registry import live_model_dir
from riskcascade.modelling.synthetic import read_events_csv

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("RISKCASCADE_FUZZ_SEED", "20261130"))
IN_FLIGHT = 24  # calls outstanding at once: enough to overlap, few enough for two slow cores
CALL_TIMEOUT_S = 60.0
LOG_SLACK_LINES = 50  # lines the platform may log for reasons of its own during the run
MIN_CLEAN_DECIDED_SHARE = 0.9  # valid requests that must be decided (the rest may be shed under load)
OVERSIZED_BYTES = 4 * 1024 * 1024 + 1024  # past grpc's default 4 MiB receive limit: RESOURCE_EXHAUSTED
FUTURE_EDGE_MARGIN_S = 1800  # generated times stay this far from the moving "now + skew" edge (longer than a run)
FEEDBACK_FAN_OUTS = 10  # feedbacks with odd but valid text that reach the state and the case memory

SERVICE = "/risk.v1.DecisionService/"
REQUEST_TYPES = {
    "Decide": pb.DecideRequest,
    "DecideBatch": pb.DecideBatchRequest,
    "SubmitFeedback": pb.SubmitFeedbackRequest,
    "GetDecision": pb.GetDecisionRequest,
    "GetServiceInfo": pb.GetServiceInfoRequest,
}
RESPONSE_TYPES = {
    "Decide": pb.DecideResponse,
    "DecideBatch": pb.DecideBatchResponse,
    "SubmitFeedback": pb.SubmitFeedbackResponse,
    "GetDecision": pb.GetDecisionResponse,
    "GetServiceInfo": pb.ServiceInfo,
}
C = grpc.StatusCode
ALLOWED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED,
           C.UNAVAILABLE}
SHED = {C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED, C.UNAVAILABLE}  # what a valid request may get under load
TIMESTAMP_MIN_S, TIMESTAMP_MAX_S = -62135596800, 253402300799  # google.protobuf.Timestamp's legal seconds


@dataclass
class Probe:
    """One request and what the edge must make of it."""

    kind: str
    method: str
    body: bytes
    invalid: bool = False  # the generator broke it on purpose: INVALID_ARGUMENT (or an item error) is required
    clean: bool = False  # valid and plausible: it should be decided / answered
    items: list[tuple[bool, bool]] = field(default_factory=list)  # batch: (invalid, clean) per item
    code: grpc.StatusCode | None = None
    details: str = ""
    response: bytes | None = None


class Oracle:
    """What counts as out of range, from the platform's own model card and settings (not from the edge's code)."""

    def __init__(self, ranges: dict[str, tuple[float, float]], bound: float, earliest_s: float, future_s: float):
        self.ranges, self.bound, self.earliest_s, self.future_s = ranges, bound, earliest_s, future_s

    def out_of_range(self, request: pb.DecideRequest) -> bool:
        event = request.event
        for name, value in event.features.items():
            if not math.isfinite(value) or abs(value) > self.bound:
                return True
            if name in self.ranges and not self.ranges[name][0] <= value <= self.ranges[name][1]:
                return True
        if event.HasField("occurred_at"):
            stamp = event.occurred_at
            if not 0 <= stamp.nanos <= 999_999_999:
                return True
            if not self.earliest_s <= stamp.seconds + stamp.nanos / 1e9 <= time.time() + self.future_s:
                return True
        return False


class Generator:
    """Seeded requests of every kind; each knows whether it was broken on purpose."""

    def __init__(self, rng: random.Random, templates: list[pb.DecideRequest], oracle: Oracle, run: str):
        self.rng, self.templates, self.oracle, self.run = rng, templates, oracle, run
        self.names = sorted(oracle.ranges)
        self.serial = 0

    # -- ids and values ---------------------------------------------------------------------------------------

    def uid(self) -> str:
        self.serial += 1
        return f"fz-{self.run}-{self.serial}"

    def good_id(self) -> str:
        base = self.uid()
        return self.rng.choice([base, f"{base}:a.b_c-d", (base + "-" + "z" * 128)[:128], base.upper()])

    def bad_id(self) -> str:
        base = self.uid()
        return self.rng.choice([
            "", f"{base}\n", f"{base}\r\n", f"\n{base}", f"{base} x", f"{base}\x00", f"{base}ü", "z" * 129,
            f"{base}/../x", f"{base}'--", "\u202e" + base, "😀", " " * 3, base + "\t",
        ])

    def odd_value(self, name: str) -> float:
        """A feature value at, near or far beyond the edges of its plausible range."""
        low, high = self.oracle.ranges.get(name, (-self.oracle.bound, self.oracle.bound))
        span = max(high - low, 1.0)
        value = self.rng.choice([
            math.nan, math.inf, -math.inf, 1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 0.0,
            self.oracle.bound, -self.oracle.bound, self.oracle.bound * 1.000001, 1e15, -1.0, -1e-9,
            low, high, low - span * 1e-3, high + span * 1e-3, high * 10 + 1, low - 1, (low + high) / 2,
            float(self.rng.randint(-(2**63), 2**63)),
        ])
        return value

    def odd_time(self) -> tuple[int, int]:
        """Timestamp seconds and nanos at the edges of the legal and the plausible range."""
        now = int(time.time())
        future = int(self.oracle.future_s)
        seconds = self.rng.choice([
            TIMESTAMP_MIN_S - 1, TIMESTAMP_MIN_S, -1, 0, 1, now - 86400 * 365, now,
            now + future - FUTURE_EDGE_MARGIN_S, now + future + FUTURE_EDGE_MARGIN_S, TIMESTAMP_MAX_S,
            TIMESTAMP_MAX_S + 1, 2**62, -(2**62), 2**63 - 1, -(2**63),
        ])
        nanos = self.rng.choice([0, 0, 0, 999_999_999, -1, 1_000_000_000, -(2**31), 2**31 - 1])
        return seconds, nanos

    # -- DecideRequest ------------------------------------------------------------------------------------------

    def clean_decide(self) -> pb.DecideRequest:
        request = pb.DecideRequest()
        request.CopyFrom(self.rng.choice(self.templates))
        request.request_id = self.good_id()
        tag = self.uid()
        entities = request.event.entities
        entities.account_id = f"acct-{tag}"
        entities.device_id = f"dev-{tag}" if self.rng.random() < 0.8 else ""
        entities.ip = f"2001:db8:{self.rng.randrange(65536):x}:{self.rng.randrange(65536):x}::{self.serial % 65536:x}"
        entities.payment_instrument_id = f"pi-{tag}" if entities.payment_instrument_id else ""
        entities.seller_id = ""
        if self.rng.random() < 0.5:
            request.event.ClearField("occurred_at")  # decided at its arrival time
        else:
            request.event.occurred_at.FromDatetime(datetime.now(timezone.utc))
        return request

    def decide(self, clean_share: float) -> tuple[pb.DecideRequest, bool, bool]:
        """A request, whether it is invalid, and whether it is clean."""
        request = self.clean_decide()
        invalid = False
        if self.rng.random() >= clean_share:
            for _ in range(self.rng.randint(1, 3)):
                invalid |= self.mutate(request)
        invalid |= self.oracle.out_of_range(request)  # features and times: judged on the final request
        return request, invalid, not invalid

    def mutate(self, request: pb.DecideRequest) -> bool:
        """Apply one mutation; True when it makes the request invalid for good (no later mutation undoes it).
        Feature values and times may be overwritten by a later mutation, so the oracle judges those at the end."""
        rng, event = self.rng, request.event
        kind = rng.choice(["id", "id", "feature", "feature", "feature", "unknown_feature", "time", "time",
                           "type", "entities", "ip", "text", "text", "no_event", "valid_oddities"])
        if kind == "id":
            request.request_id = self.bad_id()
            return True
        if kind == "feature" and self.names:
            name = rng.choice(self.names)
            event.features[name] = self.odd_value(name)
            return False
        if kind == "unknown_feature":
            event.features[rng.choice(["bogus", "", "amount ", "AMOUNT", "\x00", "x" * 10_000, "é" * 40])] = 1.0
            return True
        if kind == "time":
            event.occurred_at.seconds, event.occurred_at.nanos = self.odd_time()
            return False
        if kind == "type":
            event.type = rng.choice([pb.EVENT_TYPE_UNSPECIFIED, 99, -1, 2**31 - 1])
            return True
        if kind == "entities":
            choice = rng.randrange(4)
            if choice == 0:
                event.ClearField("entities")
            elif choice == 1:
                event.entities.account_id = ""
            elif choice == 2:
                event.entities.device_id = "d" * 257
            else:
                event.entities.seller_id = "s" * 257
            return True
        if kind == "ip":
            event.entities.ip = rng.choice(["999.1.1.1", "::g", "10.0.0.1/24", "localhost", " 2001:db8::1", "1" * 300])
            return True
        if kind == "text":
            choice = rng.randrange(5)
            if choice == 0:
                event.text.update({f"k{i}": "v" for i in range(17)})
            elif choice == 1:
                event.text[""] = "empty key"
            elif choice == 2:
                event.text["k" * 65] = "long key"
            elif choice == 3:
                event.text["note"] = "x" * 4097
            else:
                event.text["note"] = "ü" * rng.choice([10_000, 100_000])
            return True
        if kind == "no_event":
            request.ClearField("event")
            return True
        # valid oddities (never undoing an earlier break): text at its limits, unicode and control characters
        event.text["k0"] = "y" * 4096
        event.text["\u202e😀"] = "\u202e😀\x00\n" * 10
        if event.HasField("entities") and event.entities.account_id:
            event.entities.account_id = f"acct-\u202e😀\n-{self.uid()}"
        return False

    # -- the other messages -------------------------------------------------------------------------------------

    def batch(self) -> tuple[pb.DecideBatchRequest, bool, list[tuple[bool, bool]]]:
        roll = self.rng.random()
        if roll < 0.03:
            return pb.DecideBatchRequest(), True, []  # no items
        if roll < 0.05:  # one more than the server's max_batch_items (256 by default)
            requests = [pb.DecideRequest(request_id=self.bad_id()) for _ in range(257)]
            return pb.DecideBatchRequest(requests=requests), True, []
        items, flags = [], []
        for _ in range(self.rng.randint(1, 8)):
            request, invalid, clean = self.decide(clean_share=0.08)
            items.append(request)
            flags.append((invalid, clean))
        return pb.DecideBatchRequest(requests=items), False, flags

    def feedback(self) -> tuple[pb.SubmitFeedbackRequest, bool]:
        rng = self.rng
        request = pb.SubmitFeedbackRequest(
            feedback_id=self.good_id(), request_id=self.good_id(),  # an unknown decision: NOT_FOUND
            outcome=rng.choice([pb.OUTCOME_FRAUD, pb.OUTCOME_LEGITIMATE]),
            risk_type=rng.choice(["", "account_takeover", "r" * 64, "\u202e😀"]),
            note=rng.choice(["", "note", "n" * 4096, "\x00\n\t" * 100]),
        )
        invalid = False
        for _ in range(rng.randint(0, 2)):
            kind = rng.randrange(5)
            if kind == 0:
                request.feedback_id = self.bad_id()
            elif kind == 1:
                request.request_id = self.bad_id()
            elif kind == 2:
                request.outcome = rng.choice([0, 3, 99, -7])
            elif kind == 3:
                request.risk_type = "r" * 65
            else:
                request.note = "n" * rng.choice([4097, 200_000])
            invalid = True
        return request, invalid

    def get(self) -> tuple[pb.GetDecisionRequest, bool]:
        if self.rng.random() < 0.5:
            return pb.GetDecisionRequest(request_id=self.bad_id()), True
        return pb.GetDecisionRequest(request_id=self.good_id()), False  # unknown: NOT_FOUND

    def any_valid_message(self, method: str):
        if method == "Decide":
            return self.decide(clean_share=0.0)[0]
        if method == "DecideBatch":
            return self.batch()[0]
        if method == "SubmitFeedback":
            return self.feedback()[0]
        if method == "GetDecision":
            return self.get()[0]
        return pb.GetServiceInfoRequest()

    def with_bad_utf8(self, method: str) -> bytes:
        """A message whose string field holds bytes that are not UTF-8 (same length, so the framing stays valid)."""
        marker = "\u0001MARK\u0001"
        if method == "Decide":
            message = self.clean_decide()
            target = self.rng.choice(["id", "account", "text_key", "text_value", "feature"])
            if target == "id":
                message.request_id = marker
            elif target == "account":
                message.event.entities.account_id = marker
            elif target == "text_key":
                message.event.text[marker] = "v"
            elif target == "text_value":
                message.event.text["note"] = marker
            else:
                message.event.features[marker] = 1.0
        elif method == "DecideBatch":
            inner = self.clean_decide()
            inner.event.entities.account_id = marker
            message = pb.DecideBatchRequest(requests=[self.clean_decide(), inner])
        elif method == "SubmitFeedback":
            message = pb.SubmitFeedbackRequest(feedback_id="f", request_id="r", outcome=pb.OUTCOME_FRAUD, note=marker)
        else:
            message = pb.GetDecisionRequest(request_id=marker)
        wire = message.SerializeToString()
        junk = self.rng.choice([b"\xff\xfe\xfd\xfc\xfb\xfa", b"\xc3\x28\xa0\xa1\xe2\x28", b"\xed\xa0\x80\xed\xbf\xbf"])
        return wire.replace(marker.encode(), junk)

    # -- the whole mix ----------------------------------------------------------------------------------------------

    def probes(self) -> list[Probe]:
        rng, out = self.rng, []
        methods = list(REQUEST_TYPES)
        for _ in range(2500):  # raw random bytes
            method = rng.choice(methods)
            size = rng.choice([0, 1, 2, 3, 5, 8, 16, 64, 256, 1024])
            out.append(self.classify("raw", method, rng.randbytes(size)))
        for _ in range(1500):  # truncated valid messages
            method = rng.choice(methods[:4])
            wire = self.any_valid_message(method).SerializeToString()
            out.append(self.classify("truncated", method, wire[: rng.randrange(max(len(wire), 1))]))
        for _ in range(1500):  # invalid UTF-8 in a string field
            method = rng.choice(methods[:4])
            out.append(self.classify("bad_utf8", method, self.with_bad_utf8(method)))
        for _ in range(3000):
            request, invalid, clean = self.decide(clean_share=0.1)
            out.append(Probe("decide", "Decide", request.SerializeToString(), invalid=invalid, clean=clean))
        for _ in range(600):
            request, invalid, items = self.batch()
            out.append(Probe("batch", "DecideBatch", request.SerializeToString(), invalid=invalid, items=items))
        for _ in range(600):
            request, invalid = self.feedback()
            out.append(Probe("feedback", "SubmitFeedback", request.SerializeToString(), invalid=invalid))
        for _ in range(400):
            request, invalid = self.get()
            out.append(Probe("get", "GetDecision", request.SerializeToString(), invalid=invalid))
        for method in ("Decide", "DecideBatch"):
            out.append(Probe("oversized", method, rng.randbytes(OVERSIZED_BYTES), invalid=True))
        rng.shuffle(out)
        return out

    def classify(self, kind: str, method: str, body: bytes) -> Probe:
        """A broken body that still happens to decode is judged as the message it decodes to."""
        try:
            message = REQUEST_TYPES[method].FromString(body)
        except DecodeError:
            return Probe(kind, method, body, invalid=True)
        if method == "Decide":
            return Probe(kind, method, body, items=[(self.oracle.out_of_range(message), False)])
        if method == "DecideBatch":
            return Probe(kind, method, body, items=[(self.oracle.out_of_range(r), False) for r in message.requests])
        return Probe(kind, method, body)


# -- running it ---------------------------------------------------------------------------------------------------

def fire(channel: grpc.Channel, probes: list[Probe]) -> None:
    """Send every probe over ``channel``, ``IN_FLIGHT`` at a time, and record code, details and response."""
    callables = {m: channel.unary_unary(SERVICE + m, request_serializer=None, response_deserializer=None)
                 for m in REQUEST_TYPES}
    window: collections.deque = collections.deque()

    def settle(probe: Probe, future) -> None:
        error = future.exception()
        if error is None:
            probe.code, probe.response = grpc.StatusCode.OK, future.result()
        else:
            probe.code, probe.details = error.code(), error.details() or ""

    for probe in probes:
        if len(window) >= IN_FLIGHT:
            settle(*window.popleft())
        window.append((probe, callables[probe.method].future(probe.body, timeout=CALL_TIMEOUT_S)))
    while window:
        settle(*window.popleft())


def model_ranges(platform) -> dict[str, tuple[float, float]]:
    card = json.loads((live_model_dir(platform.workdir / "model") / "model.json").read_text())
    return {name: (low, high) for name, (low, high) in card.get("feature_ranges", {}).items()}


def log_lines(path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def report(probes: list[Probe], seconds: float, log_lines_added: int, refused: int) -> None:
    codes = collections.Counter(p.code.name for p in probes)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for p in probes:
        by_kind[p.kind][p.code.name] += 1
    print(f"\nfuzz seed {SEED}: {len(probes)} requests in {seconds:.1f} s ({len(probes) / seconds:.0f}/s), "
          f"{IN_FLIGHT} in flight; codes {dict(codes.most_common())}; "
          f"{log_lines_added} new log lines for {refused} refused requests")
    for kind, counter in sorted(by_kind.items()):
        print(f"  {kind:10s} {dict(counter.most_common())}")


def examples(bad: list[Probe]) -> str:
    return "; ".join(f"{p.kind}/{p.method} {p.code.name} {p.details[:160]!r} body={p.body[:80]!r}" for p in bad[:5])


def decided_on_bad_input(probes: list[Probe]) -> list[Probe]:
    """Probes whose out-of-range or malformed input (a whole Decide, or one batch item) got a decision."""
    confident = []
    for p in probes:
        if p.code is not C.OK:
            continue
        if p.method == "Decide" and (p.invalid or (p.items and p.items[0][0])):
            confident.append(p)
        if p.method == "DecideBatch":
            results = pb.DecideBatchResponse.FromString(p.response).results
            assert len(results) == len(pb.DecideBatchRequest.FromString(p.body).requests)
            for (invalid, _), result in zip(p.items, results):
                if invalid and (result.WhichOneof("result") != "error"
                                or result.error.code != C.INVALID_ARGUMENT.value[0]):
                    confident.append(p)
    return confident


def test_ten_thousand_hostile_requests_get_standard_codes_and_no_confident_answer_on_garbage(platform, channel, stub):
    settings = load_settings(platform.config_path).validation
    ranges = model_ranges(platform)
    assert ranges, "the model card declares no feature_ranges"
    assert all(low >= 0 for name, (low, _) in ranges.items() if "count" in name or name.endswith("_days"))
    oracle = Oracle(ranges, settings.max_abs_feature_value, settings.occurred_at_earliest_s,
                    settings.occurred_at_max_future_s)
    events = read_events_csv(platform.workdir / "data" / "test.csv")[:500]
    templates = [decide_request(e, "template") for e in events]
    generator = Generator(random.Random(SEED), templates, oracle, uuid.uuid4().hex[:8])
    probes = generator.probes()
    assert len(probes) >= 10_000

    log_before = len(log_lines(platform.log_path))
    started = time.monotonic()
    fire(channel, probes)
    seconds = time.monotonic() - started
    new_log = log_lines(platform.log_path)[log_before:]

    refused = sum(p.code is not C.OK for p in probes)
    report(probes, seconds, len(new_log), refused)

    strange = [p for p in probes if p.code not in ALLOWED]
    assert not strange, f"{len(strange)} calls ended outside the allowed codes: {examples(strange)}"

    undecodable = [p for p in probes if p.invalid and p.kind in ("raw", "truncated", "bad_utf8")]
    wrong = [p for p in undecodable if p.code is not C.INVALID_ARGUMENT
             or f"not a valid {REQUEST_TYPES[p.method].DESCRIPTOR.full_name}:" not in p.details]
    assert not wrong, f"{len(wrong)} undecodable bodies not refused as INVALID_ARGUMENT: {examples(wrong)}"

    oversized = [p for p in probes if p.kind == "oversized"]
    assert all(p.code is C.RESOURCE_EXHAUSTED for p in oversized), examples(oversized)

    not_refused = [p for p in probes if p.invalid and p.kind in ("decide", "batch", "feedback", "get")
                   and p.code is not C.INVALID_ARGUMENT]
    assert not not_refused, f"{len(not_refused)} malformed requests not refused: {examples(not_refused)}"

    confident = decided_on_bad_input(probes)
    assert not confident, f"{len(confident)} decisions on out-of-range or malformed input: {examples(confident)}"

    clean = [p for p in probes if p.kind == "decide" and p.clean]
    decided = [p for p in clean if p.code is C.OK]
    not_shed = [p for p in clean if p.code not in SHED | {C.OK}]
    assert not not_shed, f"valid requests refused: {examples(not_shed)}"
    assert len(decided) >= MIN_CLEAN_DECIDED_SHARE * len(clean), f"{len(decided)} of {len(clean)} valid decided"
    for p in decided[:50]:
        decision = pb.DecideResponse.FromString(p.response).decision
        assert decision.request_id == pb.DecideRequest.FromString(p.body).request_id and 0 <= decision.risk_score <= 1

    traceback_lines = [line for line in new_log if "Traceback" in line]
    assert not traceback_lines, f"tracebacks in the platform log: {new_log[:20]}"
    assert len(new_log) <= refused + LOG_SLACK_LINES, f"{len(new_log)} log lines for {refused} refused requests"

    # feedback with odd but valid text reaches the entity state and the case memory
    for p in decided[:FEEDBACK_FAN_OUTS]:
        request_id = pb.DecideRequest.FromString(p.body).request_id
        feedback = pb.SubmitFeedbackRequest(
            feedback_id=generator.good_id(), request_id=request_id, outcome=pb.OUTCOME_FRAUD,
            risk_type="\u202e😀" + "r" * 60, note="\x00\n" + "ü" * 4000,
        )
        assert stub.SubmitFeedback(feedback, timeout=CALL_TIMEOUT_S).feedback_id == feedback.feedback_id

    # the platform still serves: health, a good decision, and the stored decisions read back
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    good = generator.clean_decide()
    assert stub.Decide(good, timeout=CALL_TIMEOUT_S).decision.request_id == good.request_id
    sample = pb.DecideRequest.FromString(decided[0].body).request_id
    assert stub.GetDecision(pb.GetDecisionRequest(request_id=sample), timeout=10).decision.request_id == sample
