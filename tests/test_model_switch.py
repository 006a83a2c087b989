"""Switching the serving model version of the running platform under load, and rolling it back, with no failed
call: the real gateway, Ray Serve replicas reconfigured through their user_config, and the registry on disk."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from loadtest.events import decide_request
from loadtest.loadgen import with_entity_tag
from risk.v1 import decision_pb2 as pb
from risk.v1 import decision_pb2_grpc, model_pb2, model_pb2_grpc
from riskcascade.core.domain import DegradedCause
from riskcascade.core.model_card import CARD_FILE, load_model_card, write_model_card
from riskcascade.core.model_registry import ModelRegistry
from riskcascade.modelling.synthetic import read_events_csv
from tests.conftest import platform_channel, platform_settings

# it changes the session platform's model (and puts it back): after the tests that read it as started
pytestmark = [pytest.mark.slow, pytest.mark.disrupts_platform]

CALLERS = 4
DEADLINE_S = 20.0  # generous: a slow CI box must not turn a healthy call into DEADLINE_EXCEEDED
SETTLE_S = 1.5  # traffic before and after each switch


def publish_rebanded(registry: ModelRegistry, live: str) -> tuple[str, float, float]:
    """A new version: the live model's files with its band moved (as an operator re-choosing the band would
    publish), so which version routed a decision shows in the band the service reports."""
    card = load_model_card(registry.path(live))
    low, high = card.thresholds.band_low * 0.5, min(1.0, card.thresholds.band_high * 1.1)
    version = f"{live}-rebanded-{uuid.uuid4().hex[:6]}"

    def write(folder: Path):  # noqa: ANN202
        for item in registry.path(live).iterdir():
            if item.is_file() and item.name != CARD_FILE:
                shutil.copy2(item, folder / item.name)
        changed = card.model_copy(update={
            "version": version,
            "thresholds": card.thresholds.model_copy(update={"band_low": low, "band_high": high}),
        })
        write_model_card(folder, changed)
        return changed

    registry.publish(write, make_live=False)
    return version, low, high


class Load:
    """CALLERS threads sending Decide calls (fresh entities, so the session's entity state is not disturbed) and
    keeping every answer with the time it was sent, or the error."""

    def __init__(self, stub: decision_pb2_grpc.DecisionServiceStub, events: list):
        self.stub, self.events = stub, events
        self.results: list[tuple[float, float, pb.Decision]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CALLERS)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(DEADLINE_S * 2)

    def _run(self, caller: int) -> None:
        tag = uuid.uuid4().hex[:8]
        i = caller
        while not self.stop.is_set():
            event = self.events[i % len(self.events)]
            request = decide_request(event, f"switch-{tag}-{i}")
            request.event.CopyFrom(with_entity_tag(request.event, f"{tag}.{i}"))
            sent = time.monotonic()
            try:
                decision = self.stub.Decide(request, timeout=DEADLINE_S).decision
                with self._lock:
                    self.results.append((sent, time.monotonic(), decision))
            except grpc.RpcError as exc:
                with self._lock:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
            i += CALLERS

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + DEADLINE_S * 3
        start = len(self.results)
        while len(self.results) < start + n and time.monotonic() < deadline and not self.errors:
            time.sleep(0.05)


def test_a_version_switch_and_a_rollback_under_load_fail_no_call(platform):
    registry = ModelRegistry(platform.workdir / "model")
    live = registry.live()
    assert live is not None, "`up` puts the trained model into the registry"
    candidate, low, high = publish_rebanded(registry, live)
    events = read_events_csv(platform.workdir / "data" / "test.csv")[:400]
    with platform_channel(platform) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        models = model_pb2_grpc.ModelServiceStub(channel)
        listed = models.ListModels(model_pb2.ListModelsRequest())
        assert listed.live_version == live and {v.version for v in listed.versions} >= {live, candidate}
        with pytest.raises(grpc.RpcError) as refused:
            models.UseModel(model_pb2.UseModelRequest(version="no-such-version"), timeout=DEADLINE_S)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-version" in refused.value.details()

        with Load(stub, events) as load:
            load.wait_for(20)
            asked = time.monotonic()
            switched = models.UseModel(model_pb2.UseModelRequest(version=candidate, reason="test: rebanded"),
                                       timeout=DEADLINE_S * 6)
            answered = time.monotonic()
            load.wait_for(40)
            asked_back = time.monotonic()
            back = models.UseModel(model_pb2.UseModelRequest(rollback=True, reason="test: back"),
                                   timeout=DEADLINE_S * 6)
            rolled_back = time.monotonic()
            load.wait_for(20)

    assert load.errors == [], load.errors[:5]
    assert switched.changed and switched.previous_version == live and switched.info.model_version == candidate
    assert (switched.info.band_low, switched.info.band_high) == pytest.approx((low, high))
    assert back.changed and back.previous_version == candidate and back.info.model_version == live
    decisions = load.results
    assert len(decisions) >= 80
    # nothing was scored by a failing or missing model while the replicas reconfigured
    failed = [d for _, _, d in decisions if d.degraded_cause == DegradedCause.FAST_MODEL_FAILED.value]
    phases = {"before": (0, asked), "switching": (asked, answered), "switched": (answered, rolled_back),
              "after": (rolled_back, float("inf"))}
    by_phase = {name: (sum(1 for sent, _, d in decisions if a <= sent < b),
                       sum(1 for sent, _, d in decisions if a <= sent < b and d in failed))
                for name, (a, b) in phases.items()}
    assert failed == [], (by_phase, switched.switch_ms, back.switch_ms, [d.degraded_reason for d in failed[:3]])
    versions = {d.model_version for _, _, d in decisions}
    assert versions == {live, candidate}
    # every call sent after a switch answered, and answered before the rollback was asked, was decided by the
    # version switched to (a call still out when the rollback was asked may meet either version)
    assert {d.model_version for sent, done, d in decisions if answered < sent and done < asked_back} == {candidate}
    assert {d.model_version for sent, _, d in decisions if sent > rolled_back} == {live}
    assert {d.model_version for _, done, d in decisions if done < asked} == {live}

    assert registry.live() == live and registry.history()[-2].version == candidate
    ready = json.loads((platform.workdir / "ready.json").read_text())
    assert ready["model_version"] == live  # the ready file follows the switch

    # a backtest of the candidate on this recorded traffic: the store holds each decision with its event and the
    # version that made it; the load's events had entities of their own, so the replay's fresh entity state gives
    # them the features they had live, and the candidate (the same weights, another band) their live fast scores
    from riskcascade.backtest import run_backtest

    settings = platform_settings(platform)
    result = run_backtest(settings, platform.workdir / "backtest", model_dir=registry.path(candidate),
                          progress=False)
    report = result.report
    assert report["models"]["candidate"] == candidate and {live, candidate} <= set(report["models"]["live"])
    assert (report["band"]["low"], report["band"]["high"]) == pytest.approx((low, high))
    rows = {r.request_id: r for r in result.rows}
    ours = [(rows[d.request_id], d) for _, _, d in decisions]
    assert len(ours) == len(decisions)  # every acknowledged decision was recorded, with its event
    assert all(r.live_fast_score == pytest.approx(d.fast_score, abs=1e-9) for r, d in ours)
    assert all(r.candidate_score == pytest.approx(d.fast_score, abs=1e-6) for r, d in ours)
    assert (platform.workdir / "backtest" / "backtest.md").exists()


def test_a_shadow_candidate_is_recorded_beside_every_live_decision_and_reported(platform):
    """The rebanded version (published by the test above, or here) in shadow on live traffic: every answer is the
    live version's; every stored decision carries the candidate's, scored by it on the same event; the report
    compares them; once it is off, decisions carry none."""
    import sqlite3
    from datetime import datetime, timezone

    from riskcascade.shadow_report import run_shadow_report

    registry = ModelRegistry(platform.workdir / "model")
    live = registry.live()
    candidate, low, high = publish_rebanded(registry, live)
    events = read_events_csv(platform.workdir / "data" / "test.csv")[400:700]
    since = datetime.now(timezone.utc)
    counted_before = shadow_counts(platform)
    with platform_channel(platform) as channel:
        stub = decision_pb2_grpc.DecisionServiceStub(channel)
        models = model_pb2_grpc.ModelServiceStub(channel)
        on = models.SetShadow(model_pb2.SetShadowRequest(version=candidate, policy_version="rebanded"),
                              timeout=DEADLINE_S * 6)
        assert on.on and on.version == candidate and (on.band_low, on.band_high) == pytest.approx((low, high))
        with Load(stub, events) as load:
            load.wait_for(40)
        assert not models.SetShadow(model_pb2.SetShadowRequest(off=True), timeout=DEADLINE_S).on
        request = decide_request(events[0], f"after-shadow-{uuid.uuid4().hex[:8]}")
        request.event.CopyFrom(with_entity_tag(request.event, uuid.uuid4().hex[:8]))
        after = stub.Decide(request, timeout=DEADLINE_S).decision
        with pytest.raises(grpc.RpcError) as refused:
            models.SetShadow(model_pb2.SetShadowRequest(band_low=0.9, band_high=0.1), timeout=DEADLINE_S * 6)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert load.errors == [], load.errors[:5]
    decisions = [d for _, _, d in load.results]
    assert len(decisions) >= 40 and {d.model_version for d in decisions} == {live}  # answers are the live ones
    db = sqlite3.connect(f"{(platform.workdir / 'decisions.sqlite').resolve().as_uri()}?mode=ro", uri=True)
    try:
        stored = dict(db.execute(
            f"SELECT request_id, shadow FROM decisions WHERE request_id IN ({','.join('?' * len(decisions))})",
            [d.request_id for d in decisions]).fetchall())
        assert db.execute("SELECT shadow FROM decisions WHERE request_id=?", (after.request_id,)).fetchone() == ("",)
    finally:
        db.close()
    assert len(stored) == len(decisions)
    for d in decisions:
        shadow = json.loads(stored[d.request_id])
        assert (shadow["model_version"], shadow["policy_version"]) == (candidate, "rebanded")
        assert (shadow["band_low"], shadow["band_high"]) == pytest.approx((low, high))
        if d.degraded_cause != DegradedCause.FAST_MODEL_FAILED.value:
            assert shadow["score"] == pytest.approx(d.fast_score, abs=1e-6)  # the same weights, its own run
            expected = "approve" if shadow["score"] < low else "block" if shadow["score"] >= high else None
            assert expected is None or shadow["action"] == expected
    report = run_shadow_report(platform_settings(platform), platform.workdir / "shadow", since=since)
    assert report["counts"]["decisions"] == len(stored) and report["models"]["candidate"] == {candidate: len(stored)}
    assert report["counts"]["agree"] == sum(json.loads(stored[d.request_id])["action"] == pb.Action.Name(d.action)
                                            .removeprefix("ACTION_").lower() for d in decisions)
    assert (platform.workdir / "shadow" / "shadow.md").exists()
    # the gateway's metric counts them by live and candidate action, as the report does
    counted = shadow_counts(platform)
    assert sum(counted.values()) - sum(counted_before.values()) == len(decisions)
    moved = {k: counted[k] - counted_before.get(k, 0) for k in counted}
    assert moved[("approve", "approve")] + moved[("block", "block")] + moved[("review", "review")] == \
        report["counts"]["agree"]


def shadow_counts(platform) -> dict[tuple[str, str], float]:  # noqa: ANN001
    """riskcascade_shadow_decisions_total by (live action, shadow action), scraped from the gateway."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = json.loads((platform.workdir / "ready.json").read_text())["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    return {(s.labels["live_action"], s.labels["shadow_action"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "riskcascade_shadow_decisions"
            for s in family.samples if s.name.endswith("_total")}
