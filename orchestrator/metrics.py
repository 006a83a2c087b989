"""The gateway's Prometheus metrics (prometheus-client), served on their own port, loopback by default.

Names follow Prometheus' conventions (and Ray Serve's for its own): a ``riskcascade_`` prefix, counters end in
``_total``, durations are histograms in seconds. Every label is a small closed set (action, deciding stage, event
type, degraded cause, RPC method and status code, stage, circuit state); request ids and free text never become
labels. What each series means, and which to alert on, is in deploy/README.md; the alert rules and a dashboard
are deploy/prometheus/ and deploy/grafana/.

The servicer, the interceptor and the breakers call the ``observe_*`` methods; nothing here decides anything.
The escalation share is a ratio of two counters (``riskcascade:escalation_share:rate5m`` in
deploy/prometheus/rules.yml), so it stays exact across restarts and across several orchestrators.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from orchestrator.auth import SecurityError
from riskcascade.core.config import MetricsSettings, SecuritySettings, is_loopback
from riskcascade.core.domain import Action, Decision, DegradedCause, EventType, Stage, reasoner_fell_back

CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}
# who decides what when nothing is degraded: these series exist from the start, at 0 (a counter that first appears
# with its value already counted shows no rate until it changes again)
NORMAL_OUTCOMES = ((Action.APPROVE, Stage.FAST_MODEL), (Action.BLOCK, Stage.FAST_MODEL),
                   (Action.APPROVE, Stage.REASONER), (Action.REVIEW, Stage.REASONER), (Action.BLOCK, Stage.REASONER))


class GatewayMetrics:
    """Every series the orchestrator exports, in one registry (so tests and several servers never collide)."""

    def __init__(self, settings: MetricsSettings, registry: CollectorRegistry | None = None):
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self._server = None  # the /metrics HTTP server, once started
        seconds = tuple(ms / 1000.0 for ms in settings.latency_buckets_ms)
        r = self.registry
        self.decisions = Counter(
            "riskcascade_decisions", "Decisions made and persisted (idempotent replays are not counted)",
            ["action", "stage", "event_type", "degraded_cause"], registry=r,
        )
        self.escalations = Counter(
            "riskcascade_escalations", "Decisions whose event was sent to the reasoner", ["event_type"], registry=r,
        )
        self.replays = Counter(
            "riskcascade_replayed_decisions", "Retries answered with the stored decision (request_id seen before)",
            registry=r,
        )
        self.stage_latency = Histogram(
            "riskcascade_stage_latency_seconds", "Time of each cascade stage of a decision",
            ["stage"], buckets=seconds, registry=r,
        )
        self.store_write = Histogram(
            "riskcascade_store_write_seconds", "Time from handing a decision to the store to its commit",
            buckets=seconds, registry=r,
        )
        self.shed = Counter(
            "riskcascade_shed_decisions", "Decisions refused with RESOURCE_EXHAUSTED because the server was busy",
            ["method"], registry=r,
        )
        self.rpcs = Counter(
            "riskcascade_rpcs", "DecisionService calls by method and the status code they ended with",
            ["method", "code"], registry=r,
        )
        self.rpc_latency = Histogram(
            "riskcascade_rpc_latency_seconds", "DecisionService call time as the server sees it",
            ["method"], buckets=seconds, registry=r,
        )
        self.circuit_state = Gauge(
            "riskcascade_circuit_state", "Circuit breaker of each stage: 0 closed, 1 half-open, 2 open",
            ["stage"], registry=r,
        )
        self.circuit_transitions = Counter(
            "riskcascade_circuit_transitions", "Circuit breaker state changes, by the state entered",
            ["stage", "state"], registry=r,
        )
        self.in_flight = Gauge(
            "riskcascade_decisions_in_flight", "Decisions being worked on (a batch counts its items)", registry=r,
        )
        self.model = Gauge(
            "riskcascade_model_info", "The model and escalation policy deciding now (value 1)",
            ["model_version", "policy_version", "provider"], registry=r,
        )
        self.band = Gauge("riskcascade_escalation_band", "Edges of the escalation band", ["edge"], registry=r)
        self.target_share = Gauge(
            "riskcascade_escalation_target_share",
            "Share of validation events the band escalated when it was chosen (the live share is watched against it)",
            registry=r,
        )
        self.fallbacks = Counter(
            "riskcascade_fallbacks", "Decisions where a stage failed and a fallback answered, by that stage",
            ["stage"], registry=r,
        )
        self.shadow = Counter(
            "riskcascade_shadow_decisions", "Live decisions with a shadow candidate's, by the live and the candidate's "
            "action (riskcascade model shadow)", ["live_action", "shadow_action"], registry=r,
        )
        self.shared_outages = Counter(
            "riskcascade_shared_limits_outages", "Times the shared Redis (shared.redis_url) failed and the escalation "
            "budget or the circuits fell back to this process's own, by part", ["part"], registry=r,
        )
        # Known label values start at 0, so rate() and `> 0` alerts see a series before its first event.
        for part in ("budget", "circuit"):
            self.shared_outages.labels(part)
        for live in Action:
            for candidate in Action:
                self.shadow.labels(live.value, candidate.value)
        for stage in ("fast_model", "reasoner"):
            self.circuit_state.labels(stage).set(0)
            self.fallbacks.labels(stage)
        for method in ("Decide", "DecideBatch", "DecideStream"):
            self.shed.labels(method)
        for event_type in EventType:  # the escalation share's numerator and denominator, on the normal paths
            self.escalations.labels(event_type.value)
            for action, stage in NORMAL_OUTCOMES:
                self.decisions.labels(action.value, stage.value, event_type.value, DegradedCause.NONE.value)

    # -- what the platform tells it -------------------------------------------------------------------------

    def serving(self, model_version: str, policy_version: str, provider: str, band_low: float, band_high: float,
                target_share: float | None, in_flight: Callable[[], float]) -> None:
        """What decides now: model, policy, band, the band's target share; and where to read the work in flight."""
        self.model.clear()
        self.model.labels(model_version, policy_version, provider).set(1)
        self.band.labels("low").set(band_low)
        self.band.labels("high").set(band_high)
        if target_share is not None:
            self.target_share.set(target_share)
        self.in_flight.set_function(in_flight)

    def observe_decision(self, decision: Decision, store_seconds: float) -> None:
        """A decision made and persisted (not a replay)."""
        self.decisions.labels(
            decision.action.value, decision.decided_by.value, decision.event_type.value,
            decision.degraded_cause.value,
        ).inc()
        if decision.escalated:
            self.escalations.labels(decision.event_type.value).inc()
        if decision.shadow is not None:
            self.shadow.labels(decision.action.value, decision.shadow.action.value).inc()
        cause = decision.degraded_cause
        if cause is DegradedCause.FAST_MODEL_FAILED:
            self.fallbacks.labels("fast_model").inc()
        elif cause is DegradedCause.REASONER_FAILED or reasoner_fell_back(decision.reasons):
            self.fallbacks.labels("reasoner").inc()
        for timing in decision.timings:
            self.stage_latency.labels(timing.stage).observe(timing.duration_ms / 1000.0)
        self.store_write.observe(store_seconds)

    def observe_replay(self) -> None:
        self.replays.inc()

    def observe_shed(self, method: str) -> None:
        self.shed.labels(method).inc()

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        short = method.rsplit("/", 1)[-1]
        self.rpcs.labels(short, code).inc()
        self.rpc_latency.labels(short).observe(seconds)

    def observe_shared_outage(self, part: str) -> None:
        self.shared_outages.labels(part).inc()

    def circuit_changed(self, stage: str, state: str) -> None:
        self.circuit_state.labels(stage).set(CIRCUIT_STATE_VALUES[state])
        self.circuit_transitions.labels(stage, state).inc()

    # -- serving them ---------------------------------------------------------------------------------------

    def start_server(self, security: SecuritySettings) -> int:
        """Serve /metrics on ``metrics.host:metrics.port`` (0 picks a free port) in a daemon thread; the port.

        On loopback in plain HTTP. On any other address only over TLS with the server's certificate, a scraper
        presenting a client certificate signed by ``security.ca_file`` (or plain with ``security.allow_insecure``,
        behind a proxy); otherwise refused, as the gRPC server is."""
        host, tls = self.settings.host, {}
        if not is_loopback(host):
            if security.tls:
                tls = {"certfile": str(security.tls_cert_file), "keyfile": str(security.tls_key_file),
                       "client_cafile": str(security.client_ca_file or security.ca_file),
                       "client_auth_required": True}
            elif not security.allow_insecure:
                raise SecurityError(
                    f"metrics.host {host} is not a loopback address: it needs security.tls (served over mutual TLS) "
                    "or security.allow_insecure: true"
                )
        server, _ = start_http_server(self.settings.port, host, registry=self.registry, **tls)
        self._server = server
        return server.server_port

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

