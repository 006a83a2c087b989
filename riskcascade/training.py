"""Train the fast model: LightGBM on synthetic events, Platt calibration, escalation band, ONNX export, model card.

The order matters and is the contract with the scorer:

1. LightGBM learns on the training split (early stopping on validation). A small share of training cells is
   blanked to NaN first (``MISSING_VALUE_SHARE``) so that every feature learns where missing values go: the
   scorer sends NaN for any feature a request lacks, and for a feature never seen missing in training
   LightGBM reads NaN as 0, so a missing account_age_days would look like a brand-new account.
2. Platt calibration is fitted on validation raw probabilities; the escalation band is chosen on validation
   calibrated scores (rule in ``choose_escalation_band``).
3. The booster is converted to ONNX and ``check_onnx_parity`` compares onnxruntime with LightGBM on the test
   set plus rows with missing values. A difference above ``PARITY_TOLERANCE`` raises and nothing is written:
   the scorer serves ONNX but explains with the LightGBM booster, so the two must be the same model.
4. Test metrics, then model.onnx, model.lgb.txt and the model card, the card last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import lightgbm as lgb  # noqa: E402
import numpy as np  # noqa: E402
import onnxmltools  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnxmltools.convert.common.data_types import FloatTensorType  # noqa: E402
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score  # noqa: E402
from tqdm import tqdm  # noqa: E402

from riskcascade.calibration import PlattCalibrator  # noqa: E402
from riskcascade.config import Settings  # noqa: E402
from riskcascade.domain import RISK_TYPES  # noqa: E402
from riskcascade.model_card import (  # noqa: E402
    BOOSTER_FILE,
    ONNX_FILE,
    CalibrationSpec,
    FeatureScaling,
    ModelCard,
    OnnxSpec,
    Thresholds,
    write_model_card,
)
from riskcascade.model_metrics import expected_calibration_error, recall_at_fpr, threshold_at_fpr  # noqa: E402
from riskcascade.synthetic import (  # noqa: E402
    FEATURE_DESCRIPTIONS,
    FEATURE_NAMES,
    LabelledEvent,
    generate_events,
    split_events,
    write_events_csv,
)

log = logging.getLogger(__name__)

TARGET_ESCALATION_SHARE = 0.12  # share of validation events the band should send to the reasoner
BAND_CENTRE = 0.5  # the band is centred on the least decisive calibrated score
MAX_BOOST_ROUNDS = 400
EARLY_STOPPING_ROUNDS = 30
LIGHTGBM_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": "binary_logloss",
    "learning_rate": 0.08,
    "num_leaves": 31,
    "min_data_in_leaf": 40,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "num_threads": 2,
    "deterministic": True,
    "force_row_wise": True,  # with deterministic, same data and seed give the same trees
    "verbose": -1,
}
MISSING_VALUE_SHARE = 0.02  # training cells blanked to NaN so every feature learns a missing-value branch
ONNX_INPUT = "features"
ONNX_OUTPUT = "probabilities"  # [N, 2]: P(legitimate), P(fraud)
ONNX_TARGET_OPSET = 15  # highest default-domain opset onnxmltools 1.16 converts LightGBM for
PARITY_TOLERANCE = 1e-5  # max |P_onnx - P_lightgbm|
PARITY_MISSING_ROWS = 256  # test rows copied with holes, so parity also covers the NaN branches
PARITY_MISSING_CELL_SHARE = 0.2
RECALL_AT_FPR = {"recall_at_1pct_fpr": 0.01, "recall_at_5pct_fpr": 0.05}  # metric name -> false-positive rate
RISK_TYPE_RECALL_FPR = 0.01  # per-risk-type recall is reported at this false-positive rate
STD_FLOOR = 1e-6
SPLIT_FILES = {"train": "train.csv", "valid": "valid.csv", "test": "test.csv"}
GENERATOR = "riskcascade.synthetic.generate_events"


def feature_matrix(events: Iterable[LabelledEvent]) -> np.ndarray:
    """Events as a float32 [N, F] matrix in FEATURE_NAMES order (the ONNX input type)."""
    return np.array([[e.features[name] for name in FEATURE_NAMES] for e in events], dtype=np.float32)


def label_vector(events: Iterable[LabelledEvent]) -> np.ndarray:
    return np.array([e.label for e in events], dtype=np.int64)


def choose_escalation_band(
    scores: np.ndarray, target_share: float = TARGET_ESCALATION_SHARE, centre: float = BAND_CENTRE
) -> tuple[float, float]:
    """The narrowest band [low, high) symmetric about ``centre`` holding ``target_share`` of ``scores``.

    The events escalated are exactly the ``target_share`` whose calibrated score is closest to ``centre``: the
    least decisive ones, whichever side they fall. Symmetry in score (rather than in rank) matters on skewed
    data: with 10% fraud most scores sit near 0, and a rank-centred band would reach up into confident blocks
    while leaving out scores of 0.3. The edge is put halfway between the last event inside and the first
    outside, so a re-run on the same scores gives the same share.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not 0 < target_share < 1:
        raise ValueError(f"target_share must be in (0, 1), got {target_share}")
    distance = np.sort(np.abs(scores - centre))
    inside = max(1, round(target_share * len(scores)))
    if inside >= len(scores):
        return 0.0, 1.0
    half_width = (distance[inside - 1] + distance[inside]) / 2
    return float(max(0.0, centre - half_width)), float(min(1.0, centre + half_width))


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


def _float32_at_or_below(value: float) -> str:
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return repr(float(rounded))


def export_onnx(booster: lgb.Booster, path: Path, n_features: int) -> int:
    """Convert the booster to ONNX at ``path``; returns the default-domain opset the model uses."""
    model = onnxmltools.convert_lightgbm(
        booster,
        initial_types=[(ONNX_INPUT, FloatTensorType([None, n_features]))],
        zipmap=False,
        target_opset=ONNX_TARGET_OPSET,
    )
    outputs = [o.name for o in model.graph.output]
    if ONNX_OUTPUT not in outputs:
        raise RuntimeError(f"ONNX conversion produced outputs {outputs}, none named {ONNX_OUTPUT!r}")
    path.write_bytes(model.SerializeToString())
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _cpu_session(onnx_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def check_onnx_parity(
    onnx_path: str | Path, booster: lgb.Booster, x: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> float:
    """Max |P(fraud) by onnxruntime - P(fraud) by LightGBM| over rows ``x``; RuntimeError above ``tolerance``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    onnx_fraud = _cpu_session(Path(onnx_path)).run([ONNX_OUTPUT], {ONNX_INPUT: x})[0][:, 1]
    native_fraud = booster.predict(x, num_threads=LIGHTGBM_PARAMS["num_threads"])
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


def _test_metrics(
    raw: np.ndarray, calibrated: np.ndarray, y: np.ndarray, risk_types: np.ndarray, band: tuple[float, float]
) -> dict[str, Any]:
    in_band = (calibrated >= band[0]) & (calibrated < band[1])
    blocked = calibrated >= band[1]
    approved = calibrated < band[0]
    risk_type_threshold = threshold_at_fpr(calibrated, y, RISK_TYPE_RECALL_FPR)
    metrics: dict[str, Any] = {
        "split": "test",
        "n": int(len(y)),
        "fraud_rate": float(y.mean()),
        "roc_auc": float(roc_auc_score(y, calibrated)),
        "average_precision": float(average_precision_score(y, calibrated)),
        **{name: recall_at_fpr(calibrated, y, fpr) for name, fpr in RECALL_AT_FPR.items()},
        "log_loss_raw": float(log_loss(y, raw, labels=[0, 1])),
        "log_loss_calibrated": float(log_loss(y, calibrated, labels=[0, 1])),
        "ece_raw": expected_calibration_error(raw, y),
        "ece_calibrated": expected_calibration_error(calibrated, y),
        "escalation_share": float(in_band.mean()),
        "fraud_share_in_band": float(y[in_band].mean()) if in_band.any() else 0.0,
        "fraud_share_of_approved": float(y[approved].mean()) if approved.any() else 0.0,
        "legit_share_of_blocked": float(1 - y[blocked].mean()) if blocked.any() else 0.0,
        "recall_at_1pct_fpr_by_risk_type": {
            r: float(np.mean(calibrated[risk_types == r] >= risk_type_threshold))
            for r in RISK_TYPES
            if np.any(risk_types == r)
        },
    }
    return metrics


def _data_summary(events: dict[str, list[LabelledEvent]], generated: bool, settings: Settings) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "generator": GENERATOR if generated else "supplied by caller",
        "counts": {k: len(v) for k, v in events.items()},
        "fraud_rate": {k: float(np.mean([e.label for e in v])) for k, v in events.items()},
        "risk_type_counts": {r: sum(e.risk_type == r for v in events.values() for e in v) for r in RISK_TYPES},
    }
    if generated:
        summary.update(
            seed=settings.data.seed,
            n_events=settings.data.n_events,
            files={k: str(settings.data.dir / name) for k, name in SPLIT_FILES.items()},
        )
    return summary


def _content_hash(booster_text: str, calibration: PlattCalibrator, band: tuple[float, float]) -> str:
    digest = hashlib.sha256(booster_text.encode())
    digest.update(json.dumps([calibration.a, calibration.b, *band]).encode())
    return digest.hexdigest()[:8]


class _StageClock:
    """Times the named stages of a training run and shows them on a tqdm bar when progress is on."""

    STAGES = ("data", "lightgbm", "calibration", "onnx", "metrics")

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


def train_model(
    settings: Settings,
    events: dict[str, list[LabelledEvent]] | None = None,
    progress: bool = True,
    *,
    target_escalation_share: float = TARGET_ESCALATION_SHARE,
) -> ModelCard:
    """Train, calibrate, choose the band, export and verify ONNX, and write model files and card.

    ``events`` holds the train/valid/test splits; when None they are generated from ``settings.data`` (n_events,
    seed), split with the same seed, and written as CSV into ``settings.data.dir``. Raises RuntimeError, writing
    nothing into ``settings.model.dir``, when the ONNX model disagrees with LightGBM.
    """
    clock = _StageClock(progress)
    try:
        generated = events is None
        clock.start("data")
        if events is None:
            all_events = generate_events(settings.data.n_events, settings.data.seed)
            events = split_events(all_events, settings.data.seed)
            for split, name in SPLIT_FILES.items():
                write_events_csv(settings.data.dir / name, events[split])
        missing = [k for k in SPLIT_FILES if k not in events]
        if missing:
            raise ValueError(f"events is missing the split(s) {missing}")
        x = {k: feature_matrix(events[k]) for k in SPLIT_FILES}
        y = {k: label_vector(events[k]) for k in SPLIT_FILES}
        rng = np.random.default_rng(settings.data.seed)

        clock.start("lightgbm")
        params = {**LIGHTGBM_PARAMS, "seed": settings.data.seed}
        train_set = lgb.Dataset(
            with_missing_values(x["train"], MISSING_VALUE_SHARE, rng), y["train"], feature_name=list(FEATURE_NAMES)
        )
        valid_set = lgb.Dataset(x["valid"], y["valid"], reference=train_set)
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=MAX_BOOST_ROUNDS,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)],
        )
        best_iteration = booster.best_iteration or booster.current_iteration()
        trained = lgb.Booster(model_str=booster.model_to_string(num_iteration=best_iteration))
        booster = lgb.Booster(model_str=snap_thresholds_to_float32(trained.model_to_string()))
        booster_text = booster.model_to_string()  # exactly the trees that ship

        clock.start("calibration")
        raw_valid = booster.predict(x["valid"])
        calibrator = PlattCalibrator.fit(raw_valid, y["valid"])
        band = choose_escalation_band(calibrator.apply(raw_valid), target_escalation_share)

        clock.start("onnx")
        model_dir = Path(settings.model.dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        onnx_tmp = model_dir / f".{ONNX_FILE}.tmp"
        try:
            opset = export_onnx(booster, onnx_tmp, len(FEATURE_NAMES))
            holes = x["test"][:PARITY_MISSING_ROWS]
            parity_rows = np.vstack(
                [
                    x["test"],
                    with_missing_values(holes, PARITY_MISSING_CELL_SHARE, rng),
                    np.full((1, len(FEATURE_NAMES)), np.nan, dtype=np.float32),
                ]
            )
            snap_diff = float(np.max(np.abs(trained.predict(parity_rows) - booster.predict(parity_rows))))
            if snap_diff != 0.0:
                raise RuntimeError(f"float32 threshold snapping changed LightGBM predictions by {snap_diff:.3g}")
            parity = check_onnx_parity(onnx_tmp, booster, parity_rows)
        except BaseException:
            onnx_tmp.unlink(missing_ok=True)
            raise

        clock.start("metrics")
        raw_test = booster.predict(x["test"])
        risk_types = np.array([e.risk_type for e in events["test"]])
        metrics = _test_metrics(raw_test, calibrator.apply(raw_test), y["test"], risk_types, band)
        metrics["valid_roc_auc"] = float(roc_auc_score(y["valid"], raw_valid))

        clock.stop()
        mean = np.nanmean(x["train"].astype(np.float64), axis=0)
        std = np.maximum(np.nanstd(x["train"].astype(np.float64), axis=0), STD_FLOOR)
        created = datetime.now(timezone.utc)
        card = ModelCard(
            version=f"lgbm-{created:%Y%m%d%H%M%S}-{_content_hash(booster_text, calibrator, band)}",
            created_at=created.isoformat(),
            feature_names=list(FEATURE_NAMES),
            feature_descriptions=dict(FEATURE_DESCRIPTIONS),
            calibration=CalibrationSpec(a=calibrator.a, b=calibrator.b),
            thresholds=Thresholds(
                band_low=band[0], band_high=band[1], target_escalation_share=target_escalation_share
            ),
            onnx=OnnxSpec(input=ONNX_INPUT, output=ONNX_OUTPUT, opset=opset, parity_max_abs_diff=parity),
            feature_scaling=FeatureScaling(mean=mean.tolist(), std=std.tolist()),
            metrics=metrics,
            data=_data_summary(events, generated, settings),
            training={
                "best_iteration": best_iteration,
                "params": params,
                "max_boost_rounds": MAX_BOOST_ROUNDS,
                "early_stopping_rounds": EARLY_STOPPING_ROUNDS,
                "missing_value_share": MISSING_VALUE_SHARE,
                "parity_rows": int(len(parity_rows)),
                "lightgbm_version": lgb.__version__,
                "onnxmltools_version": onnxmltools.__version__,
                "stage_seconds": dict(clock.seconds),
            },
        )
        os.replace(onnx_tmp, model_dir / ONNX_FILE)
        (model_dir / BOOSTER_FILE).write_text(booster_text)
        write_model_card(model_dir, card)
        log.info("trained %s: test ROC-AUC %.4f, band [%.3f, %.3f)", card.version, metrics["roc_auc"], *band)
        return card
    finally:
        clock.close()
