"""Train the fast model on any data set in the documented format: graph features, anomaly score, LightGBM, ONNX.

The order matters and is the contract with the scorer:

1. ``fit_layout`` (``riskcascade.modelling.layout_fitting``): raw numeric features, categorical codes (vocabulary
   from the training split) and graph neighbour aggregates over the data set's links
   (``riskcascade.core.graph_features``).
2. The hybrid feature: an isolation forest fitted on the training split, exported to ONNX, and evaluated *by
   ONNX* for every row (``riskcascade.modelling.anomaly``), appended after the layout's columns.
   With free text in ``training.text_model.fields``, the text model's ``text_risk`` column follows it
   (``riskcascade.modelling.text_model``: MiniLM embeddings and a logistic head, the column point in time by
   forward chaining); unless ``training.text_model.keep`` is "always", the trees are also grown without it and it is
   kept only when validation average precision is higher with it.
3. LightGBM learns on the training split with early stopping on validation. A small share of training cells is
   blanked to NaN first (``training.missing_value_share``) so that every feature learns where missing values go:
   the scorer sends NaN for any feature a request lacks, and for a feature never seen missing in training
   LightGBM reads NaN as 0, so a missing account_age_days would look like a brand-new account.
4. Platt calibration on validation raw probabilities; the escalation band on validation calibrated scores, by a
   target share of traffic or by the costs of mistakes (``riskcascade.core.thresholds``).
5. The booster is converted to ONNX and ``check_onnx_parity`` compares onnxruntime with LightGBM on the test
   set plus rows with missing values. A difference above ``training.onnx_parity_tolerance`` raises and nothing is
   written: the scorer serves ONNX but explains with the LightGBM booster, so the two must be the same model.
6. Test metrics; then (``write_model``) the ONNX models, booster, feature layout and the model card, card last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import lightgbm as lgb  # noqa: E402
import numpy as np  # noqa: E402
import onnxmltools  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnxmltools.convert.common.data_types import FloatTensorType  # noqa: E402
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score  # noqa: E402
from tqdm import tqdm  # noqa: E402

from retrieval.text_vectors import embedder_identity  # noqa: E402
from riskcascade.core.calibration import PlattCalibrator  # noqa: E402
from riskcascade.core.config import (  # noqa: E402
    ActionableFeature,
    DriftSettings,
    RetrievalSettings,
    Settings,
    StateSettings,
    TrainingSettings,
    ValidationSettings,
)
from riskcascade.core.counterfactual import servable_actionable  # noqa: E402
from riskcascade.core.drift import REFERENCE_FILE, DriftReference  # noqa: E402
from riskcascade.core.features import FeatureLayout  # noqa: E402
from riskcascade.core.model_card import (  # noqa: E402
    BOOSTER_FILE,
    ONNX_FILE,
    CalibrationSpec,
    FeatureScaling,
    ModelCard,
    OnnxSpec,
    Thresholds,
    write_model_card,
)
from riskcascade.core.model_registry import ModelRegistry  # noqa: E402
from riskcascade.core.thresholds import BandCosts, assess_band, band_by_cost, band_by_share  # noqa: E402
from riskcascade.modelling.anomaly import (  # noqa: E402
    ANOMALY_DESCRIPTION,
    ANOMALY_FEATURE,
    ANOMALY_FILE,
    AnomalyScorer,
    export_anomaly_onnx,
    fit_anomaly_model,
    sklearn_parity,
)
from riskcascade.modelling.datasets.format import SPLIT_NAMES, Dataset  # noqa: E402
from riskcascade.modelling.datasets.splits import choose_split, is_time_ordered  # noqa: E402
from riskcascade.modelling.evaluation import split_metrics  # noqa: E402
from riskcascade.modelling.layout_fitting import fit_layout  # noqa: E402
from riskcascade.modelling.model_metrics import expected_calibration_error  # noqa: E402
from riskcascade.modelling.text_model import (  # noqa: E402
    TEXT_FEATURE,
    TEXT_MODEL_FILE,
    TextFit,
    TextHead,
    field_texts,
    fit_text_model,
    shared_encoder,
    text_description,
)

log = logging.getLogger(__name__)

LIGHTGBM_FIXED_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": "auc",  # early stopping on ranking quality; calibration is Platt's job
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "deterministic": True,
    "force_row_wise": True,  # with deterministic, same data and seed give the same trees
    "verbose": -1,
}
ONNX_INPUT = "features"
ONNX_OUTPUT = "probabilities"  # [N, 2]: P(legitimate), P(fraud)
ONNX_TARGET_OPSET = 15  # highest default-domain opset onnxmltools 1.16 converts LightGBM for
STD_FLOOR = 1e-6
SOFT_LABEL_OBJECTIVE = "cross_entropy"  # LightGBM's objective for labels in [0, 1] (xentropy)


def snap_thresholds_to_float32(model_text: str) -> str:
    """The LightGBM model text with every numerical split threshold rounded down to a float32 value.

    LightGBM keeps thresholds as doubles; the ONNX tree ensemble stores them as float32, rounded to nearest. When
    a threshold rounds *up* onto a float32 value that the data holds, that value goes left in ONNX and right in
    LightGBM (measured: 4e-5 parity error on 6,000 events). Inputs are float32, and for a float32 x,
    ``x <= t`` exactly when ``x <= largest float32 <= t``, so rounding down changes no LightGBM decision on
    float32 input and makes the ONNX thresholds exact. The ``tree_sizes`` index is dropped because the text
    lengths change; LightGBM rebuilds it on the next save.
    """
    lines = model_text.split("\n")
    threshold_line: int | None = None
    for i, line in enumerate(lines):
        if line.startswith("Tree="):
            threshold_line = None
        elif line.startswith("threshold="):
            threshold_line = i
        elif line.startswith("decision_type=") and threshold_line is not None:
            kinds = [int(v) for v in line.partition("=")[2].split()]
            values = lines[threshold_line].partition("=")[2].split()
            categorical = [bool(kind & 1) for kind in kinds]  # bit 0 of decision_type
            snapped = [v if cat else _float32_at_or_below(float(v)) for v, cat in zip(values, categorical)]
            lines[threshold_line] = "threshold=" + " ".join(snapped)
    return "\n".join(line for line in lines if not line.startswith("tree_sizes="))


def as_binary_objective(model_text: str) -> str:
    """The model text with a cross-entropy objective relabelled binary (sigmoid 1): both predict the sigmoid of
    the raw score, and onnxmltools converts only the binary one. Other objectives are returned unchanged."""
    return (model_text.replace(f"\nobjective={SOFT_LABEL_OBJECTIVE}\n", "\nobjective=binary sigmoid:1\n")
            .replace(f"\n[objective: {SOFT_LABEL_OBJECTIVE}]\n", "\n[objective: binary]\n"))


def _float32_at_or_below(value: float) -> str:
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return repr(float(rounded))


def export_onnx(booster: lgb.Booster, n_features: int) -> tuple[bytes, int]:
    """The booster as an ONNX model, and the default-domain opset it uses."""
    model = onnxmltools.convert_lightgbm(
        booster,
        initial_types=[(ONNX_INPUT, FloatTensorType([None, n_features]))],
        zipmap=False,
        target_opset=ONNX_TARGET_OPSET,
    )
    outputs = [o.name for o in model.graph.output]
    if ONNX_OUTPUT not in outputs:
        raise RuntimeError(f"ONNX conversion produced outputs {outputs}, none named {ONNX_OUTPUT!r}")
    return model.SerializeToString(), next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _cpu_session(onnx_model: bytes | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def check_onnx_parity(
    onnx_model: bytes | str | Path, booster: lgb.Booster, x: np.ndarray,
    tolerance: float = TrainingSettings().onnx_parity_tolerance,
) -> float:
    """Max |P(fraud) by onnxruntime - P(fraud) by LightGBM| over rows ``x``; RuntimeError above ``tolerance``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    session = _cpu_session(onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model))
    onnx_fraud = session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0][:, 1]
    native_fraud = booster.predict(x, num_threads=1)
    diff = float(np.max(np.abs(onnx_fraud.astype(np.float64) - native_fraud)))
    if not diff <= tolerance:  # also catches NaN
        raise RuntimeError(
            f"ONNX parity check failed: max abs diff {diff:.3g} > tolerance {tolerance:.3g} over {len(x)} rows"
        )
    return diff


def with_missing_values(x: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``x`` with about ``share`` of its cells set to NaN."""
    out = x.copy()
    out[rng.random(out.shape) < share] = np.nan
    return out


class _StageClock:
    """Times the named stages of a training run and shows them on a tqdm bar when progress is on."""

    STAGES = ("features", "anomaly", "text", "lightgbm", "calibration", "onnx", "metrics")

    def __init__(self, progress: bool) -> None:
        self._bar = tqdm(total=len(self.STAGES), disable=not progress, desc="train", unit="stage")
        self.seconds: dict[str, float] = {}
        self._current: str | None = None
        self._since = 0.0

    def start(self, name: str) -> None:
        self.stop()
        self._current, self._since = name, time.perf_counter()
        self._bar.set_description_str(f"train: {name}")
        log.info("training: %s", name)

    def stop(self) -> None:
        if self._current is not None:
            self.seconds[self._current] = round(time.perf_counter() - self._since, 3)
            self._bar.update()
            self._current = None

    def close(self) -> None:
        self.stop()
        self._bar.close()


@dataclass
class TrainedModel:
    """Everything ``fit_fast_model`` learned, in memory; ``write_model`` puts it next to the scorer."""

    dataset_name: str
    layout: FeatureLayout
    feature_names: list[str]  # every ONNX input column: layout names, the anomaly score, then the text model's
    anomaly_onnx: bytes | None
    booster: lgb.Booster
    calibrator: PlattCalibrator
    band: tuple[float, float]
    band_rule: str
    onnx_model: bytes
    opset: int
    parity: float
    anomaly_parity: float | None
    metrics: dict[str, Any]
    test_scores: np.ndarray  # calibrated, for plots
    test_labels: np.ndarray
    counts: dict[str, int]
    fraud_rate: dict[str, float]
    input_scaling: FeatureScaling  # over the raw numeric inputs (behaviour vectors of the case memory)
    training: dict[str, Any]
    input_extremes: dict[str, tuple[float, float]] = field(default_factory=dict)  # training min and max per input
    drift_reference: DriftReference | None = None  # what live traffic is compared with (riskcascade.core.drift)
    text_head: TextHead | None = None  # the text model behind the text_risk column (None: no text model)


def dataset_texts(dataset: Dataset, fields: tuple[str, ...]) -> list[tuple[str, ...]] | None:
    """Each row's text as the text model reads it (``field_texts`` of the data set's columns named in ``fields``);
    None when the data set has none of them or they are all empty."""
    columns = [f for f in fields if dataset.extra is not None and f in dataset.extra.columns]
    if not columns:
        return None
    cells = {f: dataset.extra[f].fillna("").astype(str).to_numpy() for f in columns}
    texts = [field_texts({f: cells[f][i] for f in columns}, fields) for i in range(len(dataset))]
    return texts if any(any(t) for t in texts) else None


def _fit_text(dataset: Dataset, split: np.ndarray, config: TrainingSettings, seed: int,
              embedding_dir: Path) -> TextFit | None:
    """The text model and its point-in-time column (riskcascade/modelling/text_model.py), or None: switched off, no
    text in the data set, or too few labelled texts."""
    settings = config.text_model
    texts = dataset_texts(dataset, settings.fields) if settings.enabled else None
    if texts is None:
        return None
    ordered = dataset.times is not None and is_time_ordered(dataset, split)
    cut = label_cutoffs(dataset, split).get("valid")
    return fit_text_model(
        texts, dataset.labels, split, dataset.times if ordered else None,
        dataset.label_times if ordered else None, cut, settings.fields, shared_encoder(embedding_dir.resolve()),
        embedder_identity(embedding_dir), settings.time_blocks, settings.regularization, settings.min_class_labels,
        seed,
    )


def split_of(dataset: Dataset, index: int, config: TrainingSettings, seed: int) -> np.ndarray:
    """The data set's fixed split ``index``, else by ``config.split_rule`` (auto: by time when the data set has a
    time column, else stratified with ``seed``)."""
    return choose_split(dataset, index, config.split_rule, config.valid_share, config.test_share, seed).split


def label_cutoffs(dataset: Dataset, split: np.ndarray) -> dict[str, float]:
    """On a time-ordered split with label times: when the fitting parts' labels must have arrived by, for a model
    fitted (and calibrated, band included) when the test period starts. {} for a split that is not ordered by time
    (a stratified split mixes periods) or data without label times."""
    if dataset.label_times is None or not is_time_ordered(dataset, split):
        return {}
    start = float(dataset.times[split == "test"].min())
    return {"train": start, "valid": start}


def labels_after_test_start(dataset: Dataset, split: np.ndarray) -> float | None:
    """Share of the train and valid labels that arrived after the test period started (what the default protocol's
    fitting knows that a model fitted at that moment could not); None without label times or a time-ordered split."""
    cutoffs = label_cutoffs(dataset, split)
    if not cutoffs:
        return None
    fitting = np.isin(split, ("train", "valid")) & (dataset.labels >= 0)
    return float(np.mean(dataset.label_times[fitting] > cutoffs["valid"]))


def _early_stopping(patience: int, min_rounds: int):  # noqa: ANN202 - a LightGBM callback
    """LightGBM's early stopping that never stops before ``min_rounds`` trees: on a few thousand rows the
    validation metric is noisy and stopped training after 15-57 trees, costing quality."""
    inner = lgb.early_stopping(patience, verbose=False)

    def callback(env: Any) -> None:
        try:
            inner(env)
        except lgb.callback.EarlyStopException as stop:
            if env.iteration + 1 >= min_rounds:  # keep at least min_rounds trees (LightGBM cuts at the best one)
                raise lgb.callback.EarlyStopException(max(stop.best_iteration, min_rounds - 1), stop.best_score)

    callback.order = inner.order  # type: ignore[attr-defined]
    return callback


def fit_fast_model(
    dataset: Dataset, split: np.ndarray, config: TrainingSettings, seed: int, progress: bool = False,
    state: StateSettings | None = None, drift_bins: int = DriftSettings().bins,
    train_targets: np.ndarray | None = None, train_weights: np.ndarray | None = None,
    embedding_dir: Path = RetrievalSettings().embedding_dir,
) -> TrainedModel:
    """Fit the whole fast model on one split of ``dataset``; RuntimeError when ONNX disagrees with LightGBM.

    Rows without a label (labels -1) feed the entity features (state, graph) and never the loss or the metrics.
    ``state`` gives the windows of the time-true entity features (defaults when None). A row whose split is none
    of train / valid / test feeds only the entity features.

    ``train_targets`` (float [N], NaN = not a target) replaces the train part's labels with targets in [0, 1]
    (soft labels, e.g. a teacher's probabilities: riskcascade/distill.py), fitted by LightGBM's cross-entropy
    objective with ``train_weights`` (float [N]; None = 1); validation, calibration, band and metrics keep the
    data set's labels. Cross-entropy's prediction is the binary objective's sigmoid of the same raw score, so the
    booster is saved as binary (ONNX conversion knows no cross-entropy) and the snapping check below proves the
    relabelled booster predicts the same.

    With free text in ``config.text_model.fields``, the text model's point-in-time ``text_risk`` column follows the
    anomaly score (the encoder from ``embedding_dir``)."""
    clock = _StageClock(progress)
    state = state or StateSettings()
    try:
        labelled = dataset.labels >= 0
        rows = {name: (split == name) & labelled for name in SPLIT_NAMES}
        cutoffs = label_cutoffs(dataset, split) if config.labels_known_by_split else {}
        for name, cutoff in cutoffs.items():  # labels not yet arrived at fitting time feed only the entity state
            rows[name] &= dataset.label_times <= cutoff
        if train_targets is not None:
            rows["train"] = (split == "train") & ~np.isnan(train_targets)
        y = {name: dataset.labels[mask] for name, mask in rows.items()}
        if train_targets is not None:
            y["train"] = train_targets[rows["train"]].astype(np.float64)
        rng = np.random.default_rng(seed)

        clock.start("features")
        layout, matrix = fit_layout(
            dataset, rows["train"], graph_features=config.graph_features, state_settings=state
        )
        x_all = matrix.astype(np.float32)
        names = list(layout.names)

        clock.start("anomaly")
        anomaly_onnx, anomaly_parity = None, None
        if config.anomaly_trees:
            forest = fit_anomaly_model(x_all[rows["train"]], config.anomaly_trees, seed)
            anomaly_onnx = export_anomaly_onnx(forest, x_all.shape[1])
            scorer = AnomalyScorer(anomaly_onnx)
            anomaly_parity = sklearn_parity(forest, scorer, x_all[rows["test"]])
            x_all = np.column_stack([x_all, scorer.score(x_all)])
            names.append(ANOMALY_FEATURE)
            layout.descriptions[ANOMALY_FEATURE] = ANOMALY_DESCRIPTION

        clock.start("text")
        text = _fit_text(dataset, split, config, seed, Path(embedding_dir))
        if text is not None:
            x_all = np.column_stack([x_all, text.feature.astype(np.float32)])
            names.append(TEXT_FEATURE)
            layout.descriptions[TEXT_FEATURE] = text_description(config.text_model.fields)
        x = {name: x_all[mask] for name, mask in rows.items()}

        clock.start("lightgbm")
        params = {
            **LIGHTGBM_FIXED_PARAMS,
            "learning_rate": config.learning_rate,
            "num_leaves": config.num_leaves,
            "min_data_in_leaf": config.min_data_in_leaf,
            "feature_fraction": config.feature_fraction,
            "num_threads": config.threads,
            "seed": seed,
        }
        if train_targets is not None:
            params["objective"] = SOFT_LABEL_OBJECTIVE

        def grow(width: int, blanking: np.random.Generator) -> tuple[lgb.Booster, lgb.Booster, int]:
            """LightGBM on the first ``width`` columns: the trained booster, its binary float32-snapped copy (what is
            served), and the number of trees kept."""
            train_set = lgb.Dataset(
                with_missing_values(x["train"][:, :width], config.missing_value_share, blanking), y["train"],
                weight=None if train_weights is None else train_weights[rows["train"]],
                feature_name=_lightgbm_names(names[:width]),
            )
            valid_set = lgb.Dataset(x["valid"][:, :width], y["valid"], reference=train_set)
            grown = lgb.train(
                params, train_set, num_boost_round=config.max_boost_rounds, valid_sets=[valid_set],
                callbacks=[_early_stopping(config.early_stopping_rounds, config.min_boost_rounds)],
            )
            best = grown.best_iteration or grown.current_iteration()
            kept = lgb.Booster(model_str=grown.model_to_string(num_iteration=best))
            served = lgb.Booster(model_str=snap_thresholds_to_float32(as_binary_objective(kept.model_to_string())))
            return kept, served, best

        trained, booster, best_iteration = grow(len(names), rng)
        text_gate = None
        if text is not None and config.text_model.keep == "if_validation_gain":
            # the text column must earn its place: validation average precision with it against without it
            plain = grow(len(names) - 1, np.random.default_rng(seed))
            with_text = float(average_precision_score(y["valid"], booster.predict(x["valid"])))
            without = float(average_precision_score(y["valid"], plain[1].predict(x["valid"][:, :-1])))
            text_gate = {"rule": config.text_model.keep, "valid_ap_with_text": with_text,
                         "valid_ap_without_text": without, "kept": with_text > without}
            if not text_gate["kept"]:
                log.info("text model dropped: validation AP %.4f with it, %.4f without", with_text, without)
                trained, booster, best_iteration = plain
                text, x_all, names = None, x_all[:, :-1], names[:-1]
                layout.descriptions.pop(TEXT_FEATURE, None)
                x = {name: x_all[mask] for name, mask in rows.items()}

        clock.start("calibration")
        raw_valid = booster.predict(x["valid"])
        calibrator = PlattCalibrator.fit(raw_valid, y["valid"])
        calibrated_valid = calibrator.apply(raw_valid)
        drift_reference = DriftReference.fit(
            names, x["valid"], calibrated_valid, drift_bins,
            source=f"validation split, {len(calibrated_valid)} events, {drift_bins} quantile bins per input",
        )
        costs = BandCosts(**config.costs.model_dump())
        if config.band_rule == "cost":
            band = band_by_cost(calibrated_valid, y["valid"], costs)
        else:
            band = band_by_share(calibrated_valid, config.target_escalation_share)

        clock.start("onnx")
        onnx_model, opset = export_onnx(booster, len(names))
        holes = x["test"][: config.onnx_parity_missing_rows]
        parity_rows = np.vstack(
            [x["test"], with_missing_values(holes, config.onnx_parity_missing_cell_share, rng),
             np.full((1, len(names)), np.nan, dtype=np.float32)]
        )
        snap_diff = float(np.max(np.abs(trained.predict(parity_rows) - booster.predict(parity_rows))))
        if snap_diff != 0.0:
            raise RuntimeError(f"float32 threshold snapping changed LightGBM predictions by {snap_diff:.3g}")
        parity = check_onnx_parity(onnx_model, booster, parity_rows, config.onnx_parity_tolerance)

        clock.start("metrics")
        raw_test = booster.predict(x["test"])
        calibrated_test = calibrator.apply(raw_test)
        risk_types = dataset.risk_types[rows["test"]] if dataset.risk_types is not None else None
        metrics: dict[str, Any] = {
            "split": "test", "feature_protocol": layout.protocol,
            "label_cutoffs": {name: datetime.fromtimestamp(t, timezone.utc).isoformat() for name, t in cutoffs.items()},
            "fitting_labels_after_test_start": labels_after_test_start(dataset, split),
            **split_metrics(calibrated_test, y["test"], risk_types),
        }
        metrics.update(_band_metrics(calibrated_test, y["test"], band, config.band_rule, costs))
        metrics["log_loss_raw"] = float(log_loss(y["test"], raw_test, labels=[0, 1]))
        metrics["log_loss_calibrated"] = float(log_loss(y["test"], calibrated_test, labels=[0, 1]))
        metrics["ece_raw"] = expected_calibration_error(raw_test, y["test"])
        metrics["valid_roc_auc"] = float(roc_auc_score(y["valid"], raw_valid))
        clock.stop()

        inputs = dataset.numeric[rows["train"]]
        return TrainedModel(
            dataset_name=dataset.spec.name,
            layout=layout,
            feature_names=names,
            anomaly_onnx=anomaly_onnx,
            booster=booster,
            calibrator=calibrator,
            band=band,
            band_rule=config.band_rule,
            onnx_model=onnx_model,
            opset=opset,
            parity=parity,
            anomaly_parity=anomaly_parity,
            metrics=metrics,
            test_scores=calibrated_test,
            test_labels=y["test"],
            counts={**{name: int(mask.sum()) for name, mask in rows.items()}, "unlabelled": int((~labelled).sum())},
            fraud_rate={name: float(v.mean()) for name, v in y.items()},
            input_scaling=FeatureScaling(
                mean=np.nanmean(inputs, axis=0).tolist(),
                std=np.maximum(np.nanstd(inputs, axis=0), STD_FLOOR).tolist(),
            ),
            input_extremes=observed_extremes(layout.numeric, inputs),
            drift_reference=drift_reference,
            text_head=text.head if text is not None else None,
            training={
                "best_iteration": best_iteration,
                "params": params,
                "config": config.model_dump(mode="json"),
                "parity_rows": int(len(parity_rows)),
                "lightgbm_version": lgb.__version__,
                "onnxmltools_version": onnxmltools.__version__,
                "stage_seconds": dict(clock.seconds),
                **({"text_scored_rows": text.scored_rows} if text is not None else {}),
                **({"text_model_gate": text_gate} if text_gate is not None else {}),
            },
        )
    finally:
        clock.close()


def observed_extremes(names: list[str], values: np.ndarray) -> dict[str, tuple[float, float]]:
    """Each input's smallest and largest training value (features never present in training are left out)."""
    present = ~np.all(np.isnan(values), axis=0)
    return {
        name: (float(np.nanmin(values[:, j])), float(np.nanmax(values[:, j])))
        for j, name in enumerate(names) if present[j]
    }


def plausible_ranges(extremes: dict[str, tuple[float, float]], margin: float) -> dict[str, tuple[float, float]]:
    """The model card's plausible range per input: the training extremes widened by ``margin`` times their span
    (``validation.feature_range_margin``), never crossing zero where training never did (a count stays
    non-negative). A feature constant in training widens by its own magnitude; one always 0 gets no range, so only
    the edge's global bound applies (a flag never set in training is not thereby garbage when set)."""
    ranges: dict[str, tuple[float, float]] = {}
    for name, (low, high) in extremes.items():
        span = (high - low) or max(abs(low), abs(high))
        if span == 0:
            continue
        wide_low, wide_high = low - margin * span, high + margin * span
        ranges[name] = (max(wide_low, 0.0) if low >= 0 else wide_low, min(wide_high, 0.0) if high <= 0 else wide_high)
    return ranges


def _lightgbm_names(names: list[str]) -> list[str]:
    """LightGBM refuses some characters in feature names; the booster only needs them distinct."""
    return [f"f{i}" for i in range(len(names))]


def _band_metrics(
    scores: np.ndarray, labels: np.ndarray, band: tuple[float, float], rule: str, costs: BandCosts
) -> dict[str, float]:
    in_band = (scores >= band[0]) & (scores < band[1])
    blocked, approved = scores >= band[1], scores < band[0]
    choice = assess_band(rule, scores, labels, band, costs)
    return {
        "escalation_share": float(in_band.mean()),
        "fraud_share_in_band": float(labels[in_band].mean()) if in_band.any() else 0.0,
        "fraud_share_of_approved": float(labels[approved].mean()) if approved.any() else 0.0,
        "legit_share_of_blocked": float(1 - labels[blocked].mean()) if blocked.any() else 0.0,
        "cost_per_event": choice.cost_per_event,
    }


def _content_hash(model: TrainedModel) -> str:
    digest = hashlib.sha256(model.booster.model_to_string().encode())
    digest.update(model.anomaly_onnx or b"")
    if model.text_head is not None:
        digest.update(model.text_head.weights.tobytes())
    digest.update(json.dumps([model.calibrator.a, model.calibrator.b, *model.band]).encode())
    return digest.hexdigest()[:8]


def write_model(model: TrainedModel, model_dir: Path, data: dict[str, Any],
                range_margin: float = ValidationSettings().feature_range_margin) -> ModelCard:
    """Write the model files into ``model_dir``, the model card last (the scorer reads the card first).

    The card declares each input's plausible range (``feature_ranges``, see ``plausible_ranges``), which the edge
    holds requests to."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    created = datetime.now(timezone.utc)
    layout = model.layout
    card = ModelCard(
        version=f"lgbm-{created:%Y%m%d%H%M%S}-{_content_hash(model)}",
        created_at=created.isoformat(),
        feature_names=list(layout.numeric),
        feature_descriptions={n: layout.descriptions.get(n, n) for n in model.feature_names},
        model_features=list(model.feature_names),
        categorical_features=dict(layout.categorical),
        links=list(layout.links),
        calibration=CalibrationSpec(a=model.calibrator.a, b=model.calibrator.b),
        thresholds=Thresholds(
            band_low=model.band[0], band_high=model.band[1], rule=model.band_rule,
            target_escalation_share=model.training["config"]["target_escalation_share"],
            costs=model.training["config"]["costs"],
        ),
        onnx=OnnxSpec(input=ONNX_INPUT, output=ONNX_OUTPUT, opset=model.opset, parity_max_abs_diff=model.parity),
        anomaly={"file": ANOMALY_FILE, "feature": ANOMALY_FEATURE, "sklearn_parity_max_abs_diff": model.anomaly_parity}
        if model.anomaly_onnx else None,
        text_model={"file": TEXT_MODEL_FILE, "feature": TEXT_FEATURE, "fields": list(model.text_head.fields),
                    "encoder": model.text_head.encoder, **model.text_head.training}
        if model.text_head is not None else None,
        feature_scaling=model.input_scaling,
        metrics=model.metrics,
        data={"dataset": model.dataset_name, "counts": model.counts, "fraud_rate": model.fraud_rate, **data},
        training={**model.training, "feature_range_margin": range_margin},
        feature_ranges={n: list(r) for n, r in plausible_ranges(model.input_extremes, range_margin).items()},
        # the configured actionable features this data set has (training.actionable_features, as fitted with)
        actionable=servable_actionable(
            [ActionableFeature.model_validate(a) for a in model.training["config"].get("actionable_features", ())],
            layout.numeric,
        ),
    )
    staged: list[tuple[Path, bytes]] = [(model_dir / ONNX_FILE, model.onnx_model)]
    if model.anomaly_onnx:
        staged.append((model_dir / ANOMALY_FILE, model.anomaly_onnx))
    else:
        (model_dir / ANOMALY_FILE).unlink(missing_ok=True)
    for path, body in staged:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, path)
    if model.text_head is not None:
        model.text_head.save(model_dir)
    else:
        (model_dir / TEXT_MODEL_FILE).unlink(missing_ok=True)
    (model_dir / BOOSTER_FILE).write_text(model.booster.model_to_string())
    layout.save(model_dir)
    if model.drift_reference is not None:
        model.drift_reference.save(model_dir)
    else:
        (model_dir / REFERENCE_FILE).unlink(missing_ok=True)
    write_model_card(model_dir, card)
    log.info("wrote %s: test ROC-AUC %.4f, band [%.3f, %.3f)", card.version, model.metrics["roc_auc"], *model.band)
    return card


def train_model(settings: Settings, dataset: Dataset, progress: bool = True, data: dict[str, Any] | None = None,
                make_live: bool | None = None) -> ModelCard:
    """Train on the data set's first split (or a stratified one) and publish the model as a new version in the
    registry at ``settings.model.dir`` (its own folder, renamed into place whole; the live one is never touched).
    ``make_live``: point the registry at it (None: only when no version is live yet)."""
    split = split_of(dataset, 0, settings.training, settings.data.seed)
    model = fit_fast_model(dataset, split, settings.training, settings.data.seed, progress=progress,
                           state=settings.state, drift_bins=settings.drift.bins,
                           embedding_dir=settings.retrieval.embedding_dir)
    return ModelRegistry(settings.model.dir).publish(
        lambda folder: write_model(model, folder, data or {}, settings.validation.feature_range_margin), make_live
    )
