"""Metrics as an operator reads them: a real Prometheus scrapes the running platform (the orchestrator's /metrics
and Ray's export of the replicas' Serve metrics), promtool checks and unit-tests the alert rules, and the dashboard
asks only for series that exist."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
import yaml

from loadtest.events import decide_request
from orchestrator.auth import SecurityError
from orchestrator.metrics import GatewayMetrics
from risk.v1 import decision_pb2 as pb
from riskcascade.core.config import MetricsSettings, SecuritySettings
from riskcascade.core.domain import (
    Action,
    Decision,
    DegradedCause,
    EventType,
    ReasonCode,
    Stage,
    StageTiming,
)
from riskcascade.core.model_registry import live_model_dir
from riskcascade.modelling.synthetic import read_events_csv
from tests.conftest import free_port
from tests.prometheus_server import prometheus_binary, running_prometheus

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "rules_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "riskcascade.json"
SCRAPE_WAIT_S = 60  # scrapes run every second; the rest is headroom on a loaded machine
RAY_EXPORT_WAIT_S = 120  # Ray's agent exports replica metrics every 10 s


def decision(action=Action.APPROVE, stage=Stage.FAST_MODEL, escalated=False, cause=DegradedCause.NONE,
             reasons=()) -> Decision:
    return Decision(
        request_id="r1", event_type=EventType.ORDER, action=action, risk_score=0.1, decided_by=stage,
        escalated=escalated, reasons=tuple(reasons), evidence=(), model_version="m", policy_version="p",
        timings=(StageTiming("fast_model", 3.0), StageTiming("cascade_total", 4.0)), trace_id="t",
        degraded=cause is not DegradedCause.NONE, degraded_reason="", decided_at=datetime.now(timezone.utc),
        degraded_cause=cause,
    )


def test_decisions_are_counted_by_action_stage_type_and_degraded_cause():
    metrics = GatewayMetrics(MetricsSettings())
    metrics.observe_decision(decision(), 0.002)
    metrics.observe_decision(decision(Action.REVIEW, Stage.REASONER, escalated=True,
                                      reasons=[ReasonCode("REASONER_FALLBACK", "model timed out", 0.0)]), 0.004)
    metrics.observe_decision(decision(Action.REVIEW, Stage.FALLBACK, cause=DegradedCause.FAST_MODEL_FAILED), 0.001)
    value = metrics.registry.get_sample_value
    assert value("riskcascade_decisions_total", {"action": "approve", "stage": "fast_model", "event_type": "order",
                                                  "degraded_cause": "none"}) == 1
    assert value("riskcascade_decisions_total", {"action": "review", "stage": "fallback", "event_type": "order",
                                                  "degraded_cause": "fast_model_failed"}) == 1
    assert value("riskcascade_escalations_total", {"event_type": "order"}) == 1
    assert value("riskcascade_fallbacks_total", {"stage": "fast_model"}) == 1
    assert value("riskcascade_fallbacks_total", {"stage": "reasoner"}) == 1  # the reasoner's own fallback
    assert value("riskcascade_stage_latency_seconds_count", {"stage": "fast_model"}) == 3
    assert value("riskcascade_stage_latency_seconds_sum", {"stage": "cascade_total"}) == pytest.approx(0.012)
    assert value("riskcascade_store_write_seconds_count") == 3
    # series an alert or a recording rule rate()s over exist before their first event, at 0
    assert value("riskcascade_shed_decisions_total", {"method": "Decide"}) == 0
    assert value("riskcascade_escalations_total", {"event_type": "login"}) == 0
    assert value("riskcascade_decisions_total", {"action": "block", "stage": "reasoner", "event_type": "payout",
                                                  "degraded_cause": "none"}) == 0


def test_circuit_changes_and_what_decides_are_exported():
    metrics = GatewayMetrics(MetricsSettings())
    metrics.serving("lgbm-1", "policy-1", "CPUExecutionProvider", 0.2, 0.8, 0.12, lambda: 7)
    metrics.circuit_changed("fast_model", "open")
    metrics.circuit_changed("fast_model", "half_open")
    value = metrics.registry.get_sample_value
    assert value("riskcascade_circuit_state", {"stage": "fast_model"}) == 1
    assert value("riskcascade_circuit_state", {"stage": "reasoner"}) == 0
    assert value("riskcascade_circuit_transitions_total", {"stage": "fast_model", "state": "open"}) == 1
    assert value("riskcascade_model_info", {"model_version": "lgbm-1", "policy_version": "policy-1",
                                            "provider": "CPUExecutionProvider"}) == 1
    assert value("riskcascade_escalation_target_share") == 0.12
    assert value("riskcascade_decisions_in_flight") == 7


def test_metrics_refuse_an_exposed_address_without_tls(tmp_path):
    exposed = GatewayMetrics(MetricsSettings(host="0.0.0.0", port=0))
    with pytest.raises(SecurityError, match="metrics.host 0.0.0.0"):
        exposed.start_server(SecuritySettings(tls=False, tokens=False))
    loopback = GatewayMetrics(MetricsSettings(port=0))
    port = loopback.start_server(SecuritySettings(tls=False, tokens=False))
    try:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:  # noqa: S310
            assert b"riskcascade_decisions_in_flight" in response.read()
    finally:
        loopback.stop_server()


def test_alert_rules_pass_promtool_check_and_their_unit_tests():
    promtool = prometheus_binary("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                            cwd=RULES_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr


def dashboard_series() -> set[str]:
    exprs = [t["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for t in panel["targets"]]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\b((?:ray_)?riskcascade[:_][a-z0-9_:]+)", expr)}


def recorded_series() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def metric_family(name: str) -> str:
    return re.sub(r"_(bucket|count|sum)$", "", name)


def mixed_events(platform) -> list:  # noqa: ANN001
    """30 events the fast model finds clear and 10 it finds uncertain (time-true scores computed here, as
    tests/test_platform.py does), so the traffic has escalations for the escalation counters to count."""
    from riskcascade.evaluate_cascade import time_true_inputs, time_true_texts
    from services.scorer.fast_model import FastModel

    parts = {name: read_events_csv(platform.workdir / "data" / f"{name}.csv") for name in ("train", "valid", "test")}
    model = FastModel(live_model_dir(platform.workdir / "model"), reason_count=0)
    x = model.model_input(time_true_inputs(live_model_dir(platform.workdir / "model"), parts, "test")[:1500],
                          time_true_texts(parts, "test")[:1500])
    scores = [s.score for s in model.score_matrix(x)]
    low, high = platform.state["band"]
    clear = [e for e, s in zip(parts["test"], scores) if s < low * 0.5]
    uncertain = [e for e, s in zip(parts["test"], scores) if low + (high - low) * 0.25 <= s < high - (high - low) * 0.25]
    assert len(clear) >= 30 and len(uncertain) >= 10
    return clear[:30] + uncertain[:10]


@pytest.mark.slow
def test_prometheus_scrapes_what_the_platform_decided(platform, stub):
    """Decisions, refusals and replays sent here show up, exactly, in a real Prometheus scraping the platform; the
    replicas' Serve metrics arrive through Ray's export; every series the dashboard plots exists."""
    metrics_port = platform.state["metrics_port"]
    ray_port = yaml.safe_load(platform.config_path.read_text())["ray"]["metrics_export_port"]
    events = mixed_events(platform)
    with running_prometheus({"riskcascade": f"127.0.0.1:{metrics_port}", "ray": f"127.0.0.1:{ray_port}"},
                            free_port(), rule_files=(RULES,)) as prometheus:
        up = prometheus.wait_for('min(up{job="riskcascade"})', lambda v: v == 1, SCRAPE_WAIT_S)
        assert up == 1, prometheus.targets_up()
        decided = 'sum(riskcascade_decisions_total) or vector(0)'
        invalid = 'sum(riskcascade_rpcs_total{method="Decide",code="INVALID_ARGUMENT"}) or vector(0)'
        replays = 'sum(riskcascade_replayed_decisions_total)'
        escalated = 'sum(riskcascade_escalations_total) or vector(0)'
        before = {q: prometheus.value(q) for q in (decided, invalid, replays, escalated)}

        sent = [decide_request(e, f"m-{uuid.uuid4().hex[:16]}") for e in events]
        answers = [stub.Decide(request, timeout=30).decision for request in sent]
        for request in sent[:5]:  # retries: answered from the store
            assert stub.Decide(request, timeout=30).decision.replayed
        bad = pb.DecideRequest(request_id="", event=sent[0].event)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Decide(bad, timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        expected = {decided: before[decided] + len(sent), invalid: before[invalid] + 3,
                    replays: before[replays] + 5,
                    escalated: before[escalated] + sum(d.escalated for d in answers)}
        for query, value in expected.items():
            assert prometheus.wait_for(query, lambda v, value=value: v >= value, SCRAPE_WAIT_S) == value, query
        info = stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
        assert prometheus.value(f'riskcascade_model_info{{model_version="{info.model_version}"}}') == 1
        assert prometheus.value('riskcascade_circuit_state{stage="fast_model"}') == 0
        assert prometheus.value('riskcascade_escalation_band{edge="low"}') == pytest.approx(info.band_low)
        share = prometheus.wait_for("riskcascade:escalation_share:rate5m", lambda v: v > 0, SCRAPE_WAIT_S)
        assert share is not None and 0 < share <= 1  # the recording rule runs on the scraped counters

        # the replicas' metrics, exported by Ray's metrics agent
        rows = prometheus.wait_for("sum(ray_riskcascade_scorer_rows_total)", lambda v: v >= len(sent),
                                   RAY_EXPORT_WAIT_S)
        assert rows is not None and rows >= len(sent), prometheus.targets_up()
        if any(d.escalated for d in answers):
            reviews = prometheus.wait_for("sum(ray_riskcascade_reasoner_reviews_total)", lambda v: v >= 1,
                                          RAY_EXPORT_WAIT_S)
            assert reviews is not None and reviews >= sum(d.escalated for d in answers)

        # the scorer's drift window: one PSI gauge per model input, and the score's, refreshed as events arrive
        card = json.loads((live_model_dir(platform.workdir / "model") / "model.json").read_text())
        inputs = prometheus.wait_for("count(count by (feature) (ray_riskcascade_feature_psi))",
                                     lambda v: v >= len(card["model_features"]), RAY_EXPORT_WAIT_S)
        assert inputs == len(card["model_features"])
        assert prometheus.value("max(ray_riskcascade_score_psi)") >= 0
        assert prometheus.value("max(ray_riskcascade_drift_psi_alert)") == pytest.approx(0.25)
        assert prometheus.value("max(ray_riskcascade_drift_window_events)") >= 20

        names = set(prometheus.get("/api/v1/label/__name__/values"))
        missing = sorted(s for s in dashboard_series() - recorded_series()
                         if s not in names and f"{s}_total" not in names and metric_family(s) not in names
                         and not any(n.startswith(metric_family(s)) for n in names))
        assert missing == [], "dashboard series no scrape provides"


def test_calls_are_counted_by_the_status_code_they_ended_with():
    """The tracing interceptor tells the metrics each call's method, code and time: an abort's code, OK, and
    UNKNOWN for an exception that escaped the servicer (grpc answers UNKNOWN, so must the metric), CANCELLED for a
    call its client gave up on."""
    import asyncio

    from orchestrator.interceptors import service_interceptors
    from risk.v1 import decision_pb2_grpc as pb_grpc

    class Servicer(pb_grpc.DecisionServiceServicer):
        async def GetServiceInfo(self, request, context):  # noqa: N802, ANN001
            return pb.ServiceInfo(model_version="m")

        async def GetDecision(self, request, context):  # noqa: N802, ANN001
            if request.request_id == "bad":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: bad")
            if request.request_id == "slow":
                slow_started.append(True)
                await asyncio.sleep(30)
            raise RuntimeError("a bug")

    ended: list[tuple[str, str]] = []
    slow_started: list[bool] = []

    async def scenario() -> None:
        server = grpc.aio.server(interceptors=service_interceptors(lambda m, code, s: ended.append((m, code))))
        pb_grpc.add_DecisionServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.DecisionServiceStub(channel)
                await stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
                for request_id in ("bad", "boom"):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.GetDecision(pb.GetDecisionRequest(request_id=request_id), timeout=10)
                call = stub.GetDecision(pb.GetDecisionRequest(request_id="slow"), timeout=10)
                while len(ended) < 3 or not slow_started:
                    await asyncio.sleep(0.05)
                call.cancel()
                for _ in range(200):  # the server sees the cancellation on its own schedule
                    if len(ended) == 4:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    method = "/risk.v1.DecisionService/"
    assert ended == [(f"{method}GetServiceInfo", "OK"), (f"{method}GetDecision", "INVALID_ARGUMENT"),
                     (f"{method}GetDecision", "UNKNOWN"), (f"{method}GetDecision", "CANCELLED")]
