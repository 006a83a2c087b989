"""The one typed configuration for every riskcascade knob.

Sources, highest priority first: keyword overrides, environment variables (prefix ``RISKCASCADE_``, nested
keys joined by ``__``, e.g. ``RISKCASCADE_SERVER__PORT=50052``), a YAML file (``--config`` or
``RISKCASCADE_CONFIG``), then the defaults below. Unknown keys and bad values fail at start-up with an error that
names the key. Relative paths are resolved against the working directory at load time, so Ray replicas (which
run elsewhere) receive absolute ones.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from riskcascade.core.domain import Action, EventType

CONFIG_ENV_VAR = "RISKCASCADE_CONFIG"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    default_deadline_ms: float = Field(
        2000.0, gt=0, description="deadline applied when a client sends none"
    )
    max_batch_items: int = Field(256, ge=1, description="largest DecideBatch accepted")
    reserve_ms: float = Field(
        20.0, ge=0, description="time kept back from the deadline for merging, persisting and answering"
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="time in-flight calls get to finish on stop")
    feedback_timeout_ms: float = Field(
        5000.0, gt=0, description="time feedback gets to reach the entity state and the case memory"
    )
    max_in_flight_decisions: int = Field(
        512, ge=1,
        description="decisions (a batch counts its items) the server works on at once; a call past it is shed "
        "with RESOURCE_EXHAUSTED and a retry hint instead of queueing past its deadline",
    )
    shed_retry_after_ms: int = Field(
        200, ge=0, description="retry hint (google.rpc.RetryInfo and retry-after-ms metadata) sent when shedding"
    )
    stream_item_deadline_ms: float = Field(
        2000.0, gt=0, description="deadline of each DecideStream item (capped by the stream call's own deadline)"
    )
    max_stream_in_flight: int = Field(
        256, ge=1,
        description="items of one DecideStream decided at once; the server reads no further requests of that "
        "stream until one finishes (flow control back to the client)",
    )
    ready_file: Path | None = Field(
        None, description="file written with the bound port once the server is serving"
    )
    pid_file: Path = Field(Path("var/riskcascade.pid"), description="pid of the running platform, for `down`")
    stop_wait_s: float = Field(60.0, gt=0, description="how long `riskcascade down` waits for the platform to stop")


class BatchingSettings(_Section):
    """How the orchestrator coalesces concurrent fast-model calls into one Serve handle call."""

    coalesce: bool = Field(
        True,
        description="send the fast-model calls that are waiting together as one handle call (a lone call goes "
        "at once, never waiting for company); off = one handle call per decision",
    )
    max_batch_size: int = Field(128, ge=1, description="most events in one fast-model handle call")
    max_batches_in_flight: int = Field(
        2, ge=1,
        description="fast-model batch calls outstanding at once; calls arriving meanwhile wait and form the "
        "next batch (with one scorer replica, 2 keeps it busy while the next batch forms)",
    )


class RaySettings(_Section):
    address: str | None = Field(
        None, description="Ray cluster address; empty starts a local Ray owned by this process"
    )
    namespace: str = Field("riskcascade", description="Ray namespace for our applications")
    include_dashboard: bool = Field(True, description="start the Ray dashboard with a local Ray")
    dashboard_port: int = Field(8265, description="dashboard port for a local Ray (serve status uses it)")
    num_cpus: int | None = Field(None, description="CPUs a local Ray advertises; empty = all")
    serve_config: Path = Field(
        Path("deploy/serve.yaml"), description="Ray Serve config applied at start (serve deploy format)"
    )
    deploy_on_start: bool = Field(
        True, description="apply serve_config at start; false attaches to apps already deployed"
    )
    scorer_resources: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="Ray custom resources each scorer replica requires, merged into its ray_actor_options.resources "
        "when serve_config is applied; e.g. {\"scorer_node\": 1} places replicas only on nodes started with "
        "`--resources '{\"scorer_node\": N}'`",
    )
    reasoner_resources: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="Ray custom resources each reasoner replica requires, merged into its "
        "ray_actor_options.resources when serve_config is applied; e.g. {\"reasoner_node\": 1} places replicas only "
        "on nodes started with `--resources '{\"reasoner_node\": N}'`",
    )
    throughput_optimized: bool = Field(
        True,
        description="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for this process and a local cluster (set it on an "
        "external cluster yourself); measured faster on every path, see loadtest/results",
    )
    scorer_app: str = Field("scorer", description="Serve application name of the fast scorer")
    reasoner_app: str = Field("reasoner", description="Serve application name of the reasoner")
    start_timeout_s: float = Field(180.0, gt=0, description="how long to wait for applications to run")
    metrics_export_port: int | None = Field(
        None, ge=1, le=65535,
        description="port of a local Ray's Prometheus export (the replicas' Serve metrics), with "
        "security.ray_metrics_export; empty = Ray picks one",
    )
    app_poll_interval_s: float = Field(0.5, gt=0, description="how often start-up checks the applications' status")
    scorer_info_timeout_s: float = Field(
        30.0, gt=0, description="time the scorer gets to describe its model (band, features) at start-up"
    )


class ModelSettings(_Section):
    dir: Path = Field(Path("var/model"), description="folder with model.onnx, model.lgb.txt and model.json")
    onnx_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per scorer replica")
    reason_count: int = Field(3, ge=0, description="reason codes the fast path returns")
    reasons_for: Literal["at_risk", "all"] = Field(
        "at_risk",
        description="which decisions get per-feature TreeSHAP reason codes: 'at_risk' = events scored at or above "
        "the band's low edge (reviews, blocks, escalations: what reviewers, the reasoner and blocked users read); "
        "the approvals below it get one SCORE_BELOW_BAND code naming their score. 'all' = every event (TreeSHAP is "
        "most of a row's scoring cost)",
    )
    prefer_gpu: bool = Field(True, description="use onnxruntime's CUDA provider when a probe finds a GPU")
    switch_probe_calls: int = Field(
        8, ge=1,
        description="concurrent describe calls a model switch makes before it switches; each waits until the "
        "replica it reaches has loaded the version (set it to a few times the scorer's replica count)",
    )
    reported_state_features: tuple[str, ...] = Field(
        (
            "account_id.n_1h", "account_id.n_24h", "account_id.fraud_known", "account_id.legit_known",
            "account_id.distinct.device_id", "device_id.n_1h", "device_id.n_24h", "device_id.distinct.account_id",
            "device_id.fraud_accounts", "ip.n_1h", "ip.n_24h", "ip.distinct.account_id", "ip.fraud_accounts",
            "payment_instrument_id.fraud_accounts",
        ),
        description=(
            "entity-state features returned on each decision (Decision.state_features), when the model has them"
        ),
    )
    text_cache_entries: int = Field(
        20_000, ge=1,
        description="distinct field texts whose text-model embedding a scorer replica remembers (1.5 KB each; pasted "
        "scripts and templated notes repeat: a remembered text costs no encoder run)",
    )
    text_batch_size: int = Field(32, ge=1, description="texts per encoder run of the text model")
    counterfactual_max_rows: int = Field(
        512, ge=1,
        description="most changed events one counterfactual search scores (in one model run); the search takes the "
        "changes of fewest features first, so a cut only drops the larger ones (riskcascade/core/counterfactual.py)",
    )


class DataSettings(_Section):
    dir: Path = Field(Path("var/data"), description="generated training data (train/valid/test CSV)")
    seed: int = Field(7, description="seed of the synthetic generator")
    n_events: int = Field(60000, ge=1000, description="events the synthetic generator produces for train")


class CostSettings(_Section):
    """What one decision costs, for the cost rule of the escalation band (only the ratios matter)."""

    missed_fraud: float = Field(20.0, gt=0, description="approving one fraudulent event")
    wrong_block: float = Field(10.0, gt=0, description="blocking one legitimate event")
    review: float = Field(1.0, gt=0, description="escalating one event to the reasoner")


class PricingSettings(_Section):
    """What compute costs in money, for the cost per 1,000 decisions (loadtest/cost.py, loadtest/band_sweep.py).

    Illustrative defaults, to be set by the operator to their own prices: an on-demand cloud vCPU-hour and a small
    hosted LLM's list price per token."""

    fast_path_usd_per_cpu_hour: float = Field(
        0.045, ge=0, allow_inf_nan=False,
        description="price of one CPU-hour of the fast path (orchestrator and scorer cores), in USD; illustrative",
    )
    reasoner_usd_per_cpu_hour: float = Field(
        0.045, ge=0, allow_inf_nan=False,
        description="price of one CPU-hour of the reasoner's cores (workflow, retrieval, embedding), in USD; "
        "illustrative",
    )
    llm_input_usd_per_1k_tokens: float = Field(
        0.00015, ge=0, allow_inf_nan=False,
        description="price of 1,000 prompt tokens sent to a hosted LLM backend, in USD; illustrative (a small model)",
    )
    llm_output_usd_per_1k_tokens: float = Field(
        0.0006, ge=0, allow_inf_nan=False,
        description="price of 1,000 answer tokens from a hosted LLM backend, in USD; illustrative (a small model)",
    )


class ActionableFeature(_Section):
    """A request feature the customer or merchant can change, and the moves allowed (counterfactual explanations,
    riskcascade/core/counterfactual.py). Exactly one of ``set_to`` / ``scale_to``."""

    name: str = Field(min_length=1, description="the request feature (a model input)")
    set_to: tuple[float, ...] = Field((), description="values it may be set to, e.g. (0,) for a flag")
    scale_to: tuple[float, ...] = Field(
        (), description="fractions of its current value it may be lowered to, each in (0, 1)"
    )
    moves_with: tuple[str, ...] = Field(
        (), description="derived features scaled by the same fraction (kept consistent: amount -> amount ratio)"
    )
    action: str = Field(min_length=1, description="the move in words, as a customer would be told it")
    spoofable: bool = Field(
        False, description="a fraudster can fake this change cheaply (a spoofed device, a proxy): returned with the "
        "change so a caller can choose not to show it as advice",
    )

    @model_validator(mode="after")
    def _one_kind_of_move(self) -> "ActionableFeature":
        if bool(self.set_to) == bool(self.scale_to):
            raise ValueError(f"{self.name}: give exactly one of set_to and scale_to")
        if any(not 0.0 < f < 1.0 for f in self.scale_to):
            raise ValueError(f"{self.name}: scale_to fractions must lie in (0, 1)")
        if self.moves_with and not self.scale_to:
            raise ValueError(f"{self.name}: moves_with needs scale_to (coupled features move by the same fraction)")
        if self.name in self.moves_with:
            raise ValueError(f"{self.name}: a feature cannot move with itself")
        return self


# The synthetic generator's features a customer or merchant controls (see riskcascade/modelling/synthetic.py);
# training keeps the ones its data set has. Everything else is history, time or behaviour already shown.
DEFAULT_ACTIONABLE_FEATURES = (
    ActionableFeature(name="amount", scale_to=(0.9, 0.75, 0.5, 0.25), moves_with=("amount_to_typical_ratio",),
                      action="lower the amount"),
    ActionableFeature(name="shipping_billing_mismatch", set_to=(0.0,), action="ship to the billing address"),
    ActionableFeature(name="promo_used", set_to=(0.0,), action="drop the promotion code"),
    ActionableFeature(name="new_device", set_to=(0.0,), action="use a device already known on the account",
                      spoofable=True),
    ActionableFeature(name="new_ip", set_to=(0.0,), action="use a network already known on the account",
                      spoofable=True),
)


class TextModelSettings(_Section):
    """The text model of the fast model's ``text_risk`` feature (riskcascade/modelling/text_model.py)."""

    enabled: bool = Field(True, description="fit a text model when the data set has free text in `fields`")
    fields: tuple[str, ...] = Field(
        ("note", "message"),
        description="the event's text fields the text model reads (data set columns in training, RiskEvent.text keys "
        "in serving), joined in this order",
    )
    time_blocks: int = Field(
        4, ge=2, description="train blocks by time (folds without times) the point-in-time training column uses"
    )
    regularization: float = Field(1.0, gt=0, description="inverse L2 strength (C) of the logistic head")
    keep: Literal["if_validation_gain", "always"] = Field(
        "if_validation_gain",
        description="if_validation_gain = also grow the trees without the text column and keep the text model only "
        "when validation average precision is higher with it (small data sets can lose by it); always = keep it",
    )
    min_class_labels: int = Field(
        20, ge=1, description="labelled texts of each class a head needs; fewer: that block is unscored, or no model"
    )


class TrainingSettings(_Section):
    """How the fast model is trained and its escalation band chosen (riskcascade/modelling/training.py)."""

    learning_rate: float = Field(0.08, gt=0, le=1, description="LightGBM learning rate")
    num_leaves: int = Field(63, ge=2, description="LightGBM leaves per tree")
    min_data_in_leaf: int = Field(20, ge=1, description="LightGBM minimum rows per leaf")
    feature_fraction: float = Field(0.7, gt=0, le=1, description="share of features each tree sees")
    max_boost_rounds: int = Field(2000, ge=1, description="upper bound on trees; early stopping picks fewer")
    early_stopping_rounds: int = Field(50, ge=1, description="rounds without validation gain before stopping")
    missing_value_share: float = Field(
        0.02, ge=0, lt=1, description="training cells blanked so every feature learns where missing values go"
    )
    graph_features: bool = Field(True, description="add neighbour aggregates over the data set's links")
    anomaly_trees: int = Field(100, ge=0, description="isolation-forest trees of the anomaly feature; 0 = none")
    band_rule: Literal["share", "cost"] = Field(
        "share", description="choose the escalation band from a target share of traffic or from costs"
    )
    target_escalation_share: float = Field(0.12, gt=0, lt=1, description="share rule: validation share escalated")
    costs: CostSettings = CostSettings()
    valid_share: float = Field(0.15, gt=0, lt=1, description="split when a data set has none: valid share")
    test_share: float = Field(0.15, gt=0, lt=1, description="split when a data set has none: test share")
    split_rule: Literal["auto", "time", "stratified"] = Field(
        "auto",
        description="how rows are split when a data set brings no split column: auto = by time when the data set "
        "has a time column (train on the past, validate next, test on the future), else stratified at random",
    )
    labels_known_by_split: bool = Field(
        False,
        description="strict protocol on a time-ordered split: fit, calibrate and set the band only on labels that had "
        "arrived when the test period starts (needs a history longer than the labels' delay; off: the eventual "
        "labels of the train and valid events are the training targets, features stay point in time)",
    )
    min_boost_rounds: int = Field(
        200, ge=1, description="trees grown before early stopping may stop (small data sets stop too soon otherwise)"
    )
    threads: int = Field(2, ge=1, description="LightGBM training threads")
    onnx_parity_tolerance: float = Field(
        1e-5, gt=0,
        description="largest |P(fraud) by ONNX - P(fraud) by LightGBM| accepted; above it nothing is written",
    )
    onnx_parity_missing_rows: int = Field(
        256, ge=0, description="test rows copied with holes for the parity check, so it covers the NaN branches too"
    )
    onnx_parity_missing_cell_share: float = Field(
        0.2, gt=0, le=1, description="share of cells blanked in those copied rows"
    )
    text_model: TextModelSettings = TextModelSettings()
    actionable_features: tuple[ActionableFeature, ...] = Field(
        DEFAULT_ACTIONABLE_FEATURES,
        description="request features a customer or merchant can change, with their allowed moves; written into the "
        "model card (those the data set has) for counterfactual explanations",
    )

    @field_validator("actionable_features")
    @classmethod
    def _actionable_once(cls, value: tuple[ActionableFeature, ...]) -> tuple[ActionableFeature, ...]:
        names = [n for a in value for n in (a.name, *a.moves_with)]
        if len(names) != len(set(names)):
            raise ValueError("each feature may appear once among actionable names and their moves_with")
        return value


class EvaluationSettings(_Section):
    """Offline evaluation of the whole cascade (riskcascade/evaluate_cascade.py, loadtest/band_sweep.py)."""

    scoring_batch_size: int = Field(256, ge=1, description="events the fast model scores per call offline")
    review_budget_ms: float = Field(
        600_000.0, gt=0,
        description="deadline of each offline review (one case at a time, so no deadline pressure: a review that "
        "still falls back is counted as a fallback, not hidden)",
    )


class BacktestSettings(_Section):
    """Replaying recorded decisions through a candidate model or band (riskcascade/backtest.py)."""

    examples: int = Field(10, ge=0, description="changed decisions the backtest report shows one by one")


class DistillSettings(_Section):
    """Retraining the fast model with the reasoner's verdicts as soft labels (riskcascade/distill.py).

    The events after the live model's fitting period (the data set's test split) are cut, in time order, into one
    teaching period per round, then a selection period (where the winner rule is applied) and a report period (the
    rest: never used to fit or to choose)."""

    teaching_shares: tuple[float, ...] = Field(
        (0.25, 0.25), min_length=1,
        description="share of the post-fitting events taught on in each round, in time order (one per round)",
    )
    selection_share: float = Field(0.25, gt=0, lt=1, description="share of them the winner is chosen on")
    valid_share: float = Field(
        0.15, gt=0, lt=1, description="share of the fitting and taught events with a label arrived by the cut, the "
        "latest by event time, that validates each student (early stopping, calibration, band)",
    )
    teacher_weight: float = Field(0.3, gt=0, le=1, description="weighted variant: weight of a teacher's soft label")
    confidence_margin: float = Field(
        0.2, ge=0, lt=0.5, description="filtered variant: keep a soft label p only when |p - 0.5| >= this"
    )
    sample_share: float = Field(
        0.5, gt=0, le=1,
        description="sampled variant: share of the teacher's labels kept, those the hard-label student is least "
        "sure of (calibrated score nearest 0.5)",
    )
    max_ap_loss: float = Field(
        0.005, ge=0, le=1,
        description="winner rule: a variant qualifies when its cascade AP on the selection period is at most this "
        "below the hard-label baseline's; the qualifying one with the lowest cost per 1,000 decisions wins",
    )

    @model_validator(mode="after")
    def _periods_leave_a_report(self) -> "DistillSettings":
        if sum(self.teaching_shares) + self.selection_share >= 1 or min(self.teaching_shares) <= 0:
            raise ValueError("teaching_shares must be positive and, with selection_share, sum to less than 1 "
                             "(the rest is the report period)")
        return self


class StateSettings(_Section):
    """Live entity state (riskcascade/core/entity_state.py): what each account, device, IP, instrument and seller did
    before an event, the fast model's time-true features."""

    backend: Literal["embedded", "redis"] = Field(
        "embedded", description="embedded = in the scorer process, durable in log_path; redis = a Redis server"
    )
    log_path: Path = Field(
        Path("var/state/entity-state.sqlite"),
        description="embedded: the durable log of observed events and labels, replayed at start",
    )
    redis_url: str | None = Field(None, description="redis backend: server URL, e.g. redis://127.0.0.1:6379/0")
    key_prefix: str = Field("rc", min_length=1, description="redis backend: prefix of every key")
    windows_s: tuple[int, ...] = Field(
        (3600, 86400, 604800, 2592000), min_length=1,
        description="sliding windows of the velocity features, in seconds (1 h, 24 h, 7 d, 30 d)",
    )
    retention_s: int = Field(
        2592000, ge=1,
        description="how long an entity's per-event history is kept (the longest window needs no more)",
    )
    seed_from_data: bool = Field(
        True, description="`up` folds the data set's events and labels (as of their arrival) into an empty state"
    )
    trim_every_events: int = Field(
        10_000, ge=1, description="embedded: the book forgets history older than retention_s this often (events)"
    )
    redis_timeout_s: float = Field(5.0, gt=0, description="redis backend: connect and socket timeout")
    redis_late_allowance_s: int = Field(
        86400, ge=0,
        description="redis backend: history kept beyond retention_s, so an event that reaches its entity up to this "
        "late (a retry, a slow producer) still finds every event of its windows; also how long an idle entity's "
        "history outlives retention_s on the server's clock (room for skew between event times and wall clock)",
    )

    @model_validator(mode="after")
    def _redis_target(self) -> "StateSettings":
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend=redis needs redis_url")
        if max(self.windows_s) > self.retention_s:
            raise ValueError("retention_s must cover the longest window in windows_s")
        return self


class RetrievalSettings(_Section):
    backend: Literal["edge", "qdrant"] = Field(
        "edge", description="edge = Qdrant Edge in-process on disk; qdrant = qdrant-client (url or path)"
    )
    edge_path: Path = Field(Path("var/qdrant-edge"), description="Qdrant Edge shard folder")
    qdrant_url: str | None = Field(None, description="Qdrant server URL for backend=qdrant")
    qdrant_path: Path | None = Field(
        None, description="qdrant-client local-mode folder for backend=qdrant without a url"
    )
    qdrant_api_key: SecretStr | None = Field(
        None, description="API key for a Qdrant server; set it by RISKCASCADE_RETRIEVAL__QDRANT_API_KEY or "
        "qdrant_api_key_file (secrets never travel in Serve args: each replica reads its environment or the file)",
    )
    qdrant_api_key_file: Path | None = Field(
        None, description="file holding the Qdrant API key, read where it is used; wins over qdrant_api_key"
    )

    def qdrant_api_key_text(self) -> str | None:
        """The Qdrant API key: the file's content when qdrant_api_key_file is set, else qdrant_api_key."""
        return secret_text(self.qdrant_api_key, self.qdrant_api_key_file)
    collection: str = Field("adjudicated_cases", description="collection of adjudicated cases")
    policy_collection: str = Field("risk_policies", description="collection of chunked policy documents")
    policy_dir: Path = Field(
        Path("retrieval/policies"), description="folder of policy documents (one Markdown file per risk type)"
    )
    top_k: int = Field(10, ge=1, le=100, description="similar cases retrieved per escalated event")
    narrative_top_k: int = Field(5, ge=0, le=100, description="cases retrieved by narrative text; 0 = none")
    policy_top_k: int = Field(4, ge=1, le=50, description="policy chunks retrieved per escalated event")
    entity_history_limit: int = Field(
        20, ge=0, le=500, description="past cases per entity the structured data agent reads; 0 = none"
    )
    index_batch_size: int = Field(512, ge=1, description="points written per upsert by the index command")
    embedding_dir: Path = Field(
        Path("var/embedding"), description="exported text embedding model (make embedding writes it)"
    )
    embedding_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads of the text embedder")
    embedding_cache_entries: int = Field(
        50_000, ge=1,
        description="narrative texts the case memory keeps embedded (384 float32 each: ~77 MB at 50,000); past it "
        "the least recently used go first, so indexing stays bounded in memory",
    )

    @model_validator(mode="after")
    def _qdrant_target(self) -> "RetrievalSettings":
        if self.backend == "qdrant" and not (self.qdrant_url or self.qdrant_path):
            raise ValueError("backend=qdrant needs qdrant_url or qdrant_path")
        return self


class ResilienceSettings(_Section):
    """How the orchestrator treats a slow or dead stage (orchestrator/breaker.py, orchestrator/cascade.py)."""

    fast_model_min_ms: dict[EventType, float] = Field(
        default_factory=lambda: {
            EventType.ORDER: 100.0,
            EventType.LOGIN: 50.0,
            EventType.PAYOUT: 150.0,
            EventType.REVIEW: 50.0,
            EventType.PROMO_REDEMPTION: 100.0,
            EventType.ACCOUNT_CHANGE: 100.0,
        },
        description="least time the fast model gets, per event type, even when the caller's deadline is shorter "
        "(the fast model is asked before any reserve is taken; an answer that misses the caller's deadline is "
        "still stored and a retry gets it)",
    )
    scorer_timeout_ms: float = Field(
        1000.0, gt=0, description="longest one fast-model call may wait, whatever the deadline allows"
    )
    breaker_failures: int = Field(
        5, ge=1, description="consecutive failures of a stage that open its circuit (calls then fail at once)"
    )
    breaker_open_s: float = Field(
        2.0, gt=0, description="time an open circuit waits before letting probe calls through (half-open)"
    )
    breaker_half_open_probes: int = Field(1, ge=1, description="calls let through at once while half-open")
    probe_interval_s: float = Field(
        0.5, gt=0, description="how often the orchestrator pings each stage; failed pings count as failures"
    )
    probe_timeout_ms: float = Field(500.0, gt=0, description="time one ping may take")


class EscalationSettings(_Section):
    """When the fast score is not decisive enough and the reasoner is asked."""

    band_low: float | None = Field(
        None, ge=0, le=1, description="scores below approve; empty = the model card's threshold"
    )
    band_high: float | None = Field(
        None, ge=0, le=1, description="scores at or above block; empty = the model card's threshold"
    )
    min_reasoner_budget_ms: float = Field(
        50.0, ge=0, description="escalate only if at least this much of the deadline is left"
    )
    max_in_flight: int = Field(32, ge=0, description="escalations running at once; beyond it, no escalation")
    max_per_call: int = Field(
        8, ge=0, description="escalations one call (a DecideBatch) may start, so one batch cannot take the whole "
        "max_in_flight budget from other callers",
    )
    policy_version: str = Field("cascade-policy-1", description="version stamped on decisions")


class SharedLimitsSettings(_Section):
    """What several orchestrators share through Redis (orchestrator/shared_limits.py): one escalation budget
    (``escalation.max_in_flight`` slots in all) and the stages' circuit openings. Without ``redis_url`` each
    orchestrator keeps its own, as a single one does; it is not taken from ``state.redis_url`` by default, since one
    orchestrator gains nothing from it but a dependency (point it at the same server to share)."""

    redis_url: str | None = Field(
        None, description="Redis server shared by the orchestrators, e.g. redis://127.0.0.1:6379/0; empty = per process"
    )
    key_prefix: str = Field("rc-shared", min_length=1, description="prefix of the shared keys (one per cluster)")
    escalation_lease_s: float = Field(
        60.0, gt=0, description="life of a shared escalation slot: a crashed orchestrator's slots come back after "
        "it; an escalation holding one runs at most this less two timeout_ms (acquire and release round trips)",
    )
    timeout_ms: float = Field(
        100.0, gt=0, description="longest one Redis call may take; past it (or on any Redis error) the "
        "orchestrator falls back to its own budget and circuits",
    )
    outage_retry_s: float = Field(
        5.0, gt=0, description="after a failed Redis call, how long escalations use the per-process budget before "
        "Redis is tried again",
    )
    circuit_refresh_ms: float = Field(
        250.0, gt=0, description="how often the other orchestrators' circuit openings are read (in the background, "
        "never on the decision path)",
    )

    @model_validator(mode="after")
    def _lease_outlives_round_trips(self) -> "SharedLimitsSettings":
        if self.escalation_lease_s * 1000.0 <= 2 * self.timeout_ms:
            raise ValueError("escalation_lease_s must exceed two timeout_ms (the acquire and release round trips)")
        return self


class MergeSettings(_Section):
    """How the fast score and the reasoner's verdict become one decision."""

    fast_weight: float = Field(0.5, ge=0, le=1, description="weight of the fast score in the merged score")
    min_reasoner_confidence: float = Field(
        0.5, ge=0, le=1, description="a verdict below this confidence becomes REVIEW"
    )
    failure_action: dict[EventType, Action] = Field(
        default_factory=lambda: {
            EventType.ORDER: Action.REVIEW,
            EventType.LOGIN: Action.APPROVE,
            EventType.REVIEW: Action.APPROVE,
            EventType.PROMO_REDEMPTION: Action.REVIEW,
            EventType.PAYOUT: Action.REVIEW,
            EventType.ACCOUNT_CHANGE: Action.REVIEW,
        },
        description="action when the fast model fails: fail open (APPROVE) or closed (REVIEW/BLOCK), per event type; "
        "money-moving events (orders, payouts, promos) and account changes fail closed by default",
    )
    undecided_action: Action = Field(
        Action.REVIEW, description="action for an uncertain case the reasoner could not decide"
    )


class ReasonerSettings(_Section):
    """The evidence-weighted reasoner (services/reasoning/evidence_weighing.py): the default LLM backend, and
    the evidence score the reflection step checks every backend's verdict against."""

    prior_weight: float = Field(
        2.0, ge=0, description="pseudo-count the fast score weighs against retrieved cases"
    )
    block_at: float = Field(0.7, ge=0, le=1, description="posterior fraud share at or above which to BLOCK")
    approve_at: float = Field(0.3, ge=0, le=1, description="posterior fraud share below which to APPROVE")
    min_similarity: float = Field(0.0, ge=-1, le=1, description="cases less similar than this are ignored")
    min_cases: int = Field(3, ge=0, description="fewer usable cases than this gives low confidence")
    history_weight: float = Field(1.0, ge=0, description="trust in the account's own past cases (log-odds share)")
    neighbour_weight: float = Field(
        0.2, ge=0, description="trust in the cases of other accounts on a shared device, IP or instrument"
    )
    similar_weight: float = Field(0.3, ge=0, description="trust in cases of similar behaviour")
    narrative_weight: float = Field(0.1, ge=0, description="trust in cases with a similar narrative")
    neighbour_links: tuple[str, ...] = Field(
        ("device_id", "ip", "payment_instrument_id"),
        description="entity fields whose other accounts count as graph neighbours (a seller links too many)",
    )
    policy_version: str = Field("case-review-1", description="version stamped on reasoner verdicts")
    retrieval_threads: int = Field(
        2, ge=1, description="worker threads of the reasoning workflow's blocking retrieval (case memory and "
        "policy queries, text embedding), so none runs on the event loop; more calls wait for a thread",
    )
    max_policy_risk_types: int = Field(
        2, ge=1, description="policies of at most this many suspected risk types are searched per case"
    )


class LLMSettings(_Section):
    """The reasoning step's language model (services/reasoning/llm/). Every backend fills the same schema."""

    backend: Literal["evidence", "llama_cpp", "openai_compatible"] = Field(
        "evidence",
        description="evidence = the embedded evidence-weighted reasoner; llama_cpp = a local GGUF model; "
        "openai_compatible = any OpenAI-compatible endpoint",
    )
    model_path: Path | None = Field(
        None, description="GGUF file for llama_cpp; empty = SmolLM2-135M-Instruct from the `llm` extra"
    )
    context_tokens: int = Field(4096, ge=512, description="llama_cpp context window")
    threads: int = Field(2, ge=1, description="llama_cpp CPU threads")
    base_url: str | None = Field(None, description="openai_compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    api_key: SecretStr = Field(
        SecretStr("not-needed"), description="openai_compatible API key (local servers ignore it); set it by "
        "RISKCASCADE_LLM__API_KEY or api_key_file (secrets never travel in Serve args: each replica reads its "
        "environment or the file)",
    )
    api_key_file: Path | None = Field(
        None, description="file holding the openai_compatible API key, read where it is used; wins over api_key"
    )

    def api_key_text(self) -> str:
        """The API key: the file's content when api_key_file is set, else api_key."""
        return secret_text(self.api_key, self.api_key_file) or ""
    model: str = Field("local", description="model name sent to an openai_compatible endpoint")
    max_output_tokens: int = Field(
        256, ge=16, le=4096, description="answer length cap; an answer cut here counts as looping"
    )
    temperature: float = Field(0.0, ge=0, le=2, description="sampling temperature (0 = greedy)")
    timeout_s: float = Field(
        30.0, gt=0, description="longest a model call may take; the request budget can cut it shorter"
    )
    schema_format: Literal["json_schema", "json_object"] = Field(
        "json_schema",
        description="how an openai_compatible request carries the JSON schema: json_schema = OpenAI structured "
        "outputs (vLLM, Ollama, Ray Serve LLM); json_object = {type: json_object, schema} (llama-cpp-python's server)",
    )
    repeat_penalty: float = Field(
        1.1, ge=1.0, description="llama_cpp penalty on tokens already generated; 1.1 keeps small models from looping"
    )
    max_prompt_evidence: int = Field(
        0, ge=0, description="evidence items shown to the model, taken in turn from each kind; 0 = all (right for "
        "the evidence backend; a small local model needs ~12 to fit its context and answer in seconds)",
    )
    max_prompt_chars: int = Field(
        600, ge=50, description="longest free-text field quoted into a prompt; longer text is cut and marked"
    )
    call_threads: int = Field(
        4, ge=1, description="worker threads the reasoning workflow makes model calls from (off the event loop); "
        "a call that finds none free within its timeout falls back to REVIEW",
    )

    @model_validator(mode="after")
    def _endpoint(self) -> "LLMSettings":
        if self.backend == "openai_compatible" and not self.base_url:
            raise ValueError("backend=openai_compatible needs base_url")
        return self


class ReflectionSettings(_Section):
    """When the reflection step revises a verdict (services/reasoning/reflection.py)."""

    block_needs_fraud_evidence: int = Field(
        1, ge=0, description="BLOCK must cite at least this many fraud cases or fraud neighbours, else REVIEW"
    )
    disagreement: float = Field(
        0.35, ge=0, le=1, description="verdict and evidence score this far apart: downgrade to REVIEW"
    )
    min_confidence: float = Field(
        0.3, ge=0, le=1, description="an APPROVE/BLOCK less confident than this becomes REVIEW"
    )


class SecuritySettings(_Section):
    """Who may reach the gRPC server and how (orchestrator/auth.py; clients: orchestrator/client.py), and what a
    local Ray exposes. While dev_material is on, `riskcascade up` writes development material
    (riskcascade/dev_secrets.py) for each file below that TLS or tokens need and that is missing."""

    tls: bool = Field(True, description="serve gRPC over TLS with tls_cert_file and tls_key_file")
    tls_cert_file: Path = Field(Path("var/secrets/server.crt"), description="server certificate chain (PEM)")
    tls_key_file: Path = Field(Path("var/secrets/server.key"), description="server private key (PEM)")
    ca_file: Path = Field(
        Path("var/secrets/ca.crt"),
        description="CA certificate(s) (PEM) clients verify the server with; under mutual TLS also the CA of "
        "client certificates unless client_ca_file is set",
    )
    require_client_cert: bool = Field(
        False, description="mutual TLS: refuse clients without a certificate signed by client_ca_file"
    )
    client_ca_file: Path | None = Field(None, description="CA certificate(s) of client certificates; empty = ca_file")
    client_cert_file: Path = Field(
        Path("var/secrets/client.crt"), description="certificate this repo's clients present under mutual TLS"
    )
    client_key_file: Path = Field(Path("var/secrets/client.key"), description="private key of client_cert_file")
    tokens: bool = Field(
        True, description="require a per-client bearer token (metadata `authorization: Bearer <token>`)"
    )
    tokens_file: Path = Field(
        Path("var/secrets/tokens.yaml"),
        description="known clients: name -> token_sha256 and roles or methods (format: orchestrator/auth.py)",
    )
    client_token_file: Path = Field(
        Path("var/secrets/client.token"),
        description="bearer token this repo's clients send (loadgen, tests); `up` writes an all-roles dev one",
    )
    public_health: bool = Field(
        True, description="grpc.health.v1.Health answers without a token (Kubernetes probes send none)"
    )
    refusal_log_interval_s: float = Field(
        10.0, gt=0, description="at most one WARNING line per interval for refused calls (the next counts the rest)"
    )
    dev_material: bool = Field(
        True,
        description="`up` writes a dev CA, a server certificate for localhost, a client certificate and an "
        "all-roles token for whichever needed file is missing (off in production: a missing file stops start-up)",
    )
    dev_cert_days: int = Field(365, ge=1, description="validity of generated dev certificates, in days")
    allow_insecure: bool = Field(
        False, description="serve on a non-loopback server.host without TLS or tokens (only behind a proxy that "
        "provides both)",
    )
    ray_dashboard_host: str = Field("127.0.0.1", description="interface a local Ray's dashboard binds")
    ray_metrics_export: bool = Field(
        False,
        description="open a local Ray's Prometheus metrics export port. Ray 2.60 cannot keep it (nor its GCS, "
        "raylet and worker ports) on loopback: it maps 127.0.0.1 to the node's address and binds every "
        "interface, so it stays closed unless you scrape it (Ray's own token auth guards the core ports)",
    )

    def exposure_problem(self, host: str) -> str | None:
        """Why serving on ``host`` with these settings is refused, or None when it is allowed."""
        if self.allow_insecure or (self.tls and self.tokens) or is_loopback(host):
            return None
        return (
            f"server.host {host} is not a loopback address: it needs security.tls and security.tokens "
            "(or security.allow_insecure: true behind a proxy that provides both)"
        )


class StoreSettings(_Section):
    """The decision and feedback store (orchestrator/store.py): SQLite embedded, or PostgreSQL shared."""

    url: str | None = Field(
        None, description="PostgreSQL URL (postgresql://user:password@host:5432/db) of a store shared by every "
        "orchestrator that names it; empty = the embedded SQLite file at sqlite_path (one orchestrator)",
    )
    sqlite_path: Path = Field(Path("var/decisions.sqlite"), description="decision and feedback store")
    connect_timeout_s: float = Field(5.0, ge=1, description="PostgreSQL: time one connection attempt may take")
    write_retries: int = Field(
        3, ge=0, description="PostgreSQL: times a group commit is committed again after the server aborted it "
        "(deadlock or serialization failure between orchestrators) or its connection broke",
    )
    retention_s: float = Field(
        0.0, ge=0, description="decisions (so their request_id idempotency keys) and their feedback are kept this "
        "long after decided_at, then deleted; 0 = forever. A pruned request_id may be decided again",
    )
    retention_sweep_interval_s: float = Field(
        300.0, gt=0, description="how often the orchestrator deletes what is past retention_s"
    )
    retention_sweep_batch: int = Field(1000, ge=1, description="decisions deleted per transaction by a sweep")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite fsync level: FULL survives power loss, NORMAL only process crashes"
    )
    max_group_commit: int = Field(256, ge=1, description="writes committed together in one transaction")
    max_pending_writes: int = Field(
        4096, ge=1, description="writes waiting for the writer thread; past it a write is refused at once "
        "(UNAVAILABLE), never queued without bound",
    )
    read_threads: int = Field(2, ge=1, description="threads that read the store (reads never run on the event loop)")
    max_read_batch: int = Field(
        256, ge=1, description="most concurrent reads answered by one query (reads waiting together share one)"
    )

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("store.url must be a PostgreSQL URL (postgresql://...); leave it empty for SQLite")
        return value or None


class ValidationSettings(_Section):
    """What the gRPC edge accepts (orchestrator/validation.py); anything else is refused with INVALID_ARGUMENT
    naming the field, before it reaches a stage, the entity state or the decision store."""

    max_entity_id_chars: int = Field(256, ge=1, description="longest entity id (account, seller, device, ...)")
    max_text_fields: int = Field(16, ge=0, description="most entries in an event's text map")
    max_text_key_chars: int = Field(64, ge=1, description="longest key of an event's text map")
    max_text_value_chars: int = Field(4096, ge=1, description="longest value of an event's text map")
    max_risk_type_chars: int = Field(64, ge=1, description="longest feedback risk_type")
    max_note_chars: int = Field(4096, ge=1, description="longest feedback note")
    max_quoted_chars: int = Field(
        64, ge=8, description="longest piece of caller input (e.g. an unknown feature name) quoted in an error"
    )
    occurred_at_earliest_s: float = Field(
        0.0, description="earliest accepted event.occurred_at, in seconds since 1970-01-01T00:00:00Z"
    )
    occurred_at_max_future_s: float = Field(
        3600.0, ge=0, description="how far past the server's clock event.occurred_at may lie (clock skew)"
    )
    max_abs_feature_value: float = Field(
        1e9, gt=0, description="largest feature magnitude accepted, also for features the model card gives no range"
    )
    feature_range_margin: float = Field(
        3.0, ge=0,
        description="training: each feature's plausible range in the model card reaches past the training minimum "
        "and maximum by this many times their span (a feature never negative in training stays non-negative); "
        "generous, because trees score everything past the training maximum alike and a refused event costs too",
    )


class DriftSettings(_Section):
    """Population stability of live traffic against the training reference (riskcascade/core/drift.py)."""

    enabled: bool = Field(True, description="keep a sliding window of scored events and export their PSI")
    bins: int = Field(10, ge=2, le=100, description="quantile bins per feature in the reference training writes")
    window_events: int = Field(5000, ge=1, description="scored events the live window holds, per scorer replica")
    export_every_events: int = Field(
        500, ge=1, description="the replica recomputes and exports its PSI gauges after this many events"
    )
    psi_floor: float = Field(1e-4, gt=0, lt=1, description="least share a bin counts with (an empty bin is not "
                             "infinitely surprising)")
    psi_warn: float = Field(0.1, gt=0, description="PSI from which a feature or the score has moved (report: warn)")
    psi_alert: float = Field(
        0.25, gt=0, description="PSI from which the population has shifted (report: alert; exported as "
        "riskcascade_drift_psi_alert, which the Prometheus alert compares against)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> "DriftSettings":
        if self.psi_warn > self.psi_alert:
            raise ValueError("psi_warn must not exceed psi_alert")
        return self


class MetricsSettings(_Section):
    """Prometheus metrics (orchestrator/metrics.py, and Serve custom metrics in the replicas)."""

    enabled: bool = Field(True, description="serve the orchestrator's /metrics")
    host: str = Field(
        "127.0.0.1",
        description="address /metrics binds; a non-loopback one needs security.tls (then served over TLS, and a "
        "scraper must present a client certificate signed by security.ca_file) or security.allow_insecure",
    )
    port: int = Field(9464, ge=0, le=65535, description="port of /metrics; 0 picks a free one (in the ready file)")
    latency_buckets_ms: tuple[float, ...] = Field(
        (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000), min_length=1,
        description="upper bounds of the latency histograms, in milliseconds (exported in seconds)",
    )
    batch_buckets: tuple[float, ...] = Field(
        (1, 2, 4, 8, 16, 32, 64, 128, 256), min_length=1,
        description="upper bounds of the scorer's batch-size histogram (rows)",
    )


class TracingSettings(_Section):
    exporter: Literal["otlp", "console", "none"] = Field("none", description="where spans go")
    otlp_endpoint: str = Field("http://127.0.0.1:4317", description="OTLP/gRPC collector endpoint")
    service_name: str = Field("riskcascade", description="service.name prefix for every process")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of traces recorded")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RISKCASCADE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    batching: BatchingSettings = BatchingSettings()
    ray: RaySettings = RaySettings()
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    training: TrainingSettings = TrainingSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    backtest: BacktestSettings = BacktestSettings()
    distill: DistillSettings = DistillSettings()
    state: StateSettings = StateSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    resilience: ResilienceSettings = ResilienceSettings()
    escalation: EscalationSettings = EscalationSettings()
    shared: SharedLimitsSettings = SharedLimitsSettings()
    merge: MergeSettings = MergeSettings()
    reasoner: ReasonerSettings = ReasonerSettings()
    llm: LLMSettings = LLMSettings()
    reflection: ReflectionSettings = ReflectionSettings()
    store: StoreSettings = StoreSettings()
    tracing: TracingSettings = TracingSettings()
    metrics: MetricsSettings = MetricsSettings()
    drift: DriftSettings = DriftSettings()
    security: SecuritySettings = SecuritySettings()
    validation: ValidationSettings = ValidationSettings()
    pricing: PricingSettings = PricingSettings()

    _yaml_data: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="after")
    def _shared_lease_outlives_a_model_call(self) -> "Settings":
        # the lease also caps an escalation's time (cascade.py); it must not cut the longest model call short
        shared = self.shared
        longest_ms = self.llm.timeout_s * 1000.0 + 2 * shared.timeout_ms
        if shared.redis_url and shared.escalation_lease_s * 1000.0 <= longest_ms:
            raise ValueError("shared.escalation_lease_s must exceed llm.timeout_s (the longest model call) plus two "
                             "shared.timeout_ms")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls, cls._yaml_data))

    def resolved(self) -> "Settings":
        """A copy with every relative path made absolute against the current working directory."""
        return Settings.model_validate(_absolute_paths(self.model_dump()))

    def to_wire(self) -> dict[str, Any]:
        """JSON-safe dict, for passing to Ray Serve deployments as builder args. Secrets stay out (the Ray dashboard
        shows args): a replica reads them from its own environment or their ``*_file`` path (settings_from_wire)."""
        exclude: dict[str, set[str]] = {}
        for section, name in SECRET_FIELDS:
            exclude.setdefault(section, set()).add(name)
        return self.model_dump(mode="json", exclude=exclude)


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


# The settings that hold secrets, as (section, field): never in to_wire(), never logged (SecretStr).
SECRET_FIELDS: tuple[tuple[str, str], ...] = (("llm", "api_key"), ("retrieval", "qdrant_api_key"))


def secret_env_var(section: str, name: str) -> str:
    """The environment variable of a setting, e.g. RISKCASCADE_LLM__API_KEY."""
    config = Settings.model_config
    return f"{config['env_prefix']}{section}{config['env_nested_delimiter']}{name}".upper()


def secret_text(value: SecretStr | None, file: Path | None) -> str | None:
    """A secret's text: the stripped content of ``file`` when one is set (read where the secret is used, so each
    Ray replica reads its own file), else ``value``."""
    if file is not None:
        try:
            return file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read secret file {file}: {exc.strerror}") from None
    return value.get_secret_value() if value is not None else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def _absolute_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _absolute_paths(v) for k, v in value.items()}
    if isinstance(value, Path):
        return value if value.is_absolute() else (Path.cwd() / value).resolve()
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_settings(config_path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load, validate and resolve settings; raises ConfigError naming the bad key."""
    path = config_path or os.environ.get(CONFIG_ENV_VAR)
    Settings._yaml_data = _read_yaml(Path(path)) if path else {}
    try:
        return Settings(**overrides).resolved()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
    finally:
        Settings._yaml_data = {}


def settings_from_wire(data: dict[str, Any]) -> Settings:
    """Rebuild settings passed to a Ray replica (already resolved). Of the environment, only the secrets are read
    (RISKCASCADE_LLM__API_KEY, RISKCASCADE_RETRIEVAL__QDRANT_API_KEY): the wire never carries them."""
    settings = Settings.model_validate(data)
    updates: dict[str, BaseModel] = {}
    for section, name in SECRET_FIELDS:
        value = os.environ.get(secret_env_var(section, name))
        if value is not None:
            part = updates.get(section, getattr(settings, section))
            updates[section] = part.model_copy(update={name: SecretStr(value)})
    return settings.model_copy(update=updates) if updates else settings
