"""Ray Serve deployment of the fast scorer: a thin shell around FastModel.

Batching: the orchestrator sends batches it formed itself to ``score_many`` (one handle call per micro-batch,
see orchestrator/batching.py). Single ``score`` calls (other callers, Serve's gRPC proxy baseline) are scored
together through ``@serve.batch``; a request that arrives while the replica has nothing else in flight is scored
at once instead of waiting out the batch window alone (see ArrivalGate). Batch size and wait come from
``user_config`` in deploy/serve.yaml.

Scoring reads and folds the live entity state (SQLite log or Redis) and runs the model: that work goes to one
worker thread, never the replica's event loop, and one thread keeps the state's folds in arrival order.
Labels (``record_labels``, sent by the orchestrator when feedback arrives) go through the same thread.

Model versions (services/scorer/versions.py): a replica keeps the versions ``user_config.model_versions`` lists
(the orchestrator sets them when it switches), all on its one entity state; a request names the version to score
with (the gateway's live one), and ``info(version)`` describes one once it is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import metrics

from riskcascade.core.config import MetricsSettings, settings_from_wire
from riskcascade.core.domain import FastScore, LabelRecord, ScoreRequest, ScorerInfo
from riskcascade.core.entity_state import LabelEvent
from riskcascade.core.model_registry import ModelRegistry
from riskcascade.core.state_backends import open_entity_state
from riskcascade.core.telemetry import configure_tracing, span
from services.scorer.arrivals import ArrivalGate
from services.scorer.fast_model import FastModel
from services.scorer.versions import ModelShelf

log = logging.getLogger(__name__)


class ScorerMetrics:
    """The replica's Serve custom metrics (Ray adds deployment, replica and application tags)."""

    def __init__(self, settings: MetricsSettings):
        self.rows = metrics.Counter(
            "riskcascade_scorer_rows", description="Events scored, by how the call reached the replica",
            tag_keys=("call",),
        )
        self.batch_rows = metrics.Histogram(
            "riskcascade_scorer_batch_rows", description="Events per model run",
            boundaries=list(settings.batch_buckets),
        )
        self.run_seconds = metrics.Histogram(
            "riskcascade_scorer_run_seconds",
            description="Time of one model run (entity state, features, ONNX, reason codes) in the worker thread",
            boundaries=[ms / 1000.0 for ms in settings.latency_buckets_ms],
        )
        self.feature_psi = metrics.Gauge(
            "riskcascade_feature_psi", description="PSI of each model input over the replica's drift window",
            tag_keys=("feature",),
        )
        self.score_psi = metrics.Gauge(
            "riskcascade_score_psi", description="PSI of the calibrated score over the replica's drift window",
        )
        self.window_events = metrics.Gauge("riskcascade_drift_window_events", description="Events in the window")
        self.psi_warn = metrics.Gauge("riskcascade_drift_psi_warn", description="drift.psi_warn (config)")
        self.psi_alert = metrics.Gauge("riskcascade_drift_psi_alert", description="drift.psi_alert (config)")

    def drift(self, features: dict[str, float], score: float, events: int, warn: float, alert: float) -> None:
        """The window's PSI, with the thresholds it is read against (set with every export: a gauge set once at
        start-up is not reliably exported by Ray)."""
        self.psi_warn.set(warn)
        self.psi_alert.set(alert)
        for name, value in features.items():
            self.feature_psi.set(value, tags={"feature": name})
        self.score_psi.set(score)
        self.window_events.set(events)

    def scored(self, call: str, rows: int, seconds: float) -> None:
        self.rows.inc(rows, tags={"call": call})
        self.batch_rows.observe(rows)
        self.run_seconds.observe(seconds)


class ScorerUserConfig(BaseModel):
    """The scorer's ``user_config`` in deploy/serve.yaml, the one place its batching is set (no default in code:
    a deployment without it is refused by name, not served on Ray's own batch defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(ge=1, description="most concurrent single-event calls scored in one ONNX run")
    batch_wait_timeout_s: float = Field(ge=0, description="longest a single-event call waits for others to join it")
    model_versions: tuple[str, ...] = Field(
        (), description="model versions every replica keeps loaded (the orchestrator sets them when it switches: "
        "the live one first, then the one it replaces); empty = the registry's live version (model.dir/live.json)",
    )


@serve.deployment(name="FastScorer")
class FastScorer:
    def __init__(self, settings: dict[str, Any]):
        config = settings_from_wire(settings)
        configure_tracing(config.tracing, "scorer")
        registry = ModelRegistry(config.model.dir)
        live_dir = registry.live_dir()  # read once: the state's layout and the first model are the same version's
        self._state = open_model_state(config, live_dir)
        self._shelf = ModelShelf(registry, lambda folder: FastModel(
            folder,
            threads=config.model.onnx_threads,
            reason_count=config.model.reason_count,
            prefer_gpu=config.model.prefer_gpu,
            state=self._state,
            reported_state_features=config.model.reported_state_features,
            reasons_for=config.model.reasons_for,
            drift_window=config.drift.window_events if config.drift.enabled else 0,
            counterfactual_max_rows=config.model.counterfactual_max_rows,
            embedding_dir=config.retrieval.embedding_dir,
            text_cache_entries=config.model.text_cache_entries,
            text_batch_size=config.model.text_batch_size,
        ), live_dir)
        self._loading: asyncio.Task[None] | None = None  # a reconfigure's model load, in the background
        self._arrivals = ArrivalGate()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._batching: ScorerUserConfig | None = None  # set by reconfigure, from deploy/serve.yaml
        self._metrics = ScorerMetrics(config.metrics)
        self._drift = config.drift
        self._drift_exported_at = 0  # window events seen at the last export

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batching from deploy/serve.yaml; the model versions to keep loaded. Loading takes seconds and Serve
        routes no request to a replica until its reconfigure returns, so the load runs in the background while
        the loaded versions go on scoring; ``info(version)`` waits for it (the orchestrator's switch asks)."""
        try:
            config = ScorerUserConfig.model_validate(user_config)
        except ValidationError as exc:
            raise ValueError(f"FastScorer user_config (deploy/serve.yaml): {exc}") from None
        if config.model_versions and config.model_versions != self._shelf.loaded:
            self._loading = asyncio.create_task(asyncio.to_thread(self._shelf.keep, config.model_versions))
            self._loading.add_done_callback(_log_failed_load)
        self._score_batched.set_max_batch_size(config.max_batch_size)
        self._score_batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._batching = config

    async def score(self, request: ScoreRequest) -> FastScore:
        if self._batching is None:
            raise RuntimeError("FastScorer has no user_config: set max_batch_size and batch_wait_timeout_s in "
                               "deploy/serve.yaml")
        with span("scorer.score", carrier=request.trace_carrier, request_id=request.request_id) as current:
            async with self._arrivals.enter() as lone:
                current.set_attribute("scorer.batched", not lone)
                if lone:
                    return (await self._score("lone", [request]))[0]
                return await self._score_batched(request)

    async def score_many(self, requests: list[ScoreRequest]) -> list[FastScore]:
        """Score a batch the caller formed (the orchestrator's coalesced calls, a DecideBatch): one handle hop,
        one feature assembly, one ONNX run, in the order given."""
        if not requests:
            return []
        with span("scorer.score_many", carrier=requests[0].trace_carrier, batch_size=len(requests)):
            return await self._score("score_many", requests)

    @serve.batch  # sizes come from user_config (reconfigure runs before the replica takes a call)
    async def _score_batched(self, rows: list[ScoreRequest]) -> list[FastScore]:
        with span("scorer.batch", batch_size=len(rows)):
            return await self._score("serve_batch", rows)

    async def record_labels(self, labels: list[LabelRecord]) -> int:
        """Fold adjudicated outcomes into the entity state from their arrival; returns how many found their
        event (0 for a model without entity state)."""
        state = self._state
        if state is None:
            return 0
        events = [LabelEvent(r.request_id, r.fraud, r.known_at.timestamp()) for r in labels]
        with span("scorer.record_labels", labels=len(events)):
            return await self._run(state.apply_labels, events)

    async def info(self, version: str | None = None) -> ScorerInfo:
        """The model of ``version`` (default: the one that answers requests naming none), loaded if need be."""
        if version and version not in self._shelf.loaded:
            return (await asyncio.to_thread(self._shelf.model, version)).info
        return self._shelf.model(version).info

    async def ping(self, _: object = None) -> bool:
        """Liveness for the orchestrator's stage probe: answered on the replica's loop, no model work."""
        return True

    async def _score(self, call: str, requests: list[ScoreRequest]) -> list[FastScore]:
        started = time.perf_counter()
        scores = await self._run(self._shelf.score, requests)
        self._metrics.scored(call, len(requests), time.perf_counter() - started)
        model = self._shelf.model()  # the drift of the version that answers by default
        window = model.drift
        if window is not None and window.seen - self._drift_exported_at >= self._drift.export_every_events:
            self._drift_exported_at = window.seen
            snapshot = await self._run(model.drift_snapshot, self._drift.psi_floor)
            self._metrics.drift(*snapshot, self._drift.psi_warn, self._drift.psi_alert)
        return scores

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            state.close()


def _log_failed_load(task: "asyncio.Task[None]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("loading model versions failed: %s", task.exception())


def open_model_state(config: Any, model_dir: Any) -> Any:
    """The live entity state for the model in ``model_dir`` (None when the model has none)."""
    from riskcascade.core.features import FeatureLayout

    layout = FeatureLayout.load(model_dir).state
    return open_entity_state(config.state, layout) if layout is not None else None
