"""Training the fast model end to end on a small generated set, plus the calibration and metric pieces it uses."""

from __future__ import annotations

import json
import os
import re

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from riskcascade.cli import main  # noqa: E402
from riskcascade.core.calibration import PlattCalibrator, logit, sigmoid  # noqa: E402
from riskcascade.core.config import TrainingSettings, load_settings  # noqa: E402
from riskcascade.core.domain import ScoreRequest  # noqa: E402
from riskcascade.core.entity_state import EmbeddedEntityState, LabelEvent  # noqa: E402
from riskcascade.core.features import (  # noqa: E402
    GRAPH_FILE,
    LAYOUT_FILE,
    FeatureLayout,  # noqa: E402
)
from riskcascade.core.model_card import BOOSTER_FILE, CARD_FILE, ONNX_FILE, load_model_card  # noqa: E402
from riskcascade.core.model_registry import live_model_dir
from riskcascade.core.thresholds import band_by_share  # noqa: E402
from riskcascade.evaluate_cascade import time_true_inputs, time_true_texts  # noqa: E402
from riskcascade.modelling.anomaly import ANOMALY_FEATURE, ANOMALY_FILE  # noqa: E402
from riskcascade.modelling.datasets import SPLIT_FILES, open_dataset, read_split_events  # noqa: E402
from riskcascade.modelling.datasets.format import Dataset, DatasetSpec, dataset_from_frame, write_dataset  # noqa: E402
from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset  # noqa: E402
from riskcascade.modelling.model_metrics import (  # noqa: E402
    expected_calibration_error,
    recall_at_fpr,
    threshold_at_fpr,
)
from riskcascade.modelling.synthetic import (  # noqa: E402
    FEATURE_NAMES,
    event_text,
    generate_events,
    read_events_csv,
    split_events,
)
from riskcascade.modelling.text_model import TEXT_FEATURE, TEXT_MODEL_FILE  # noqa: E402
from riskcascade.modelling.training import (  # noqa: E402
    check_onnx_parity,
    snap_thresholds_to_float32,
    train_model,
)
from services.scorer.fast_model import FastModel  # noqa: E402

PARITY_TOLERANCE = TrainingSettings().onnx_parity_tolerance
N_EVENTS = 6000
SEED = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    settings = load_settings(
        data={"dir": str(root / "data"), "n_events": N_EVENTS, "seed": SEED}, model={"dir": str(root / "model")}
    )
    dataset, source = open_dataset("synthetic", settings, write_synthetic_csv=True)
    card = train_model(settings, dataset, progress=False, data=source)
    return settings, card


def _parts(settings):
    return read_split_events(settings.data.dir)


def _valid_matrix(settings, rows=200):
    """Model input of the first valid events, with their time-true entity features (training's replay)."""
    model = FastModel(live_model_dir(settings.model.dir), reason_count=0)
    parts = _parts(settings)
    return model.model_input(time_true_inputs(live_model_dir(settings.model.dir), parts, "valid")[:rows],
                             time_true_texts(parts, "valid")[:rows])


def test_served_features_equal_training_replay(trained):
    """Replay parity: the scorer's serving path (live state, events scored in time order, labels folded as they
    arrive) computes exactly the vectors training learned from for the same sequence."""
    settings, _ = trained
    parts = _parts(settings)
    events = [e for part in parts.values() for e in part]
    model = FastModel(live_model_dir(settings.model.dir), reason_count=0, state=EmbeddedEntityState(
        FeatureLayout.load(live_model_dir(settings.model.dir)).state))
    served: dict[str, np.ndarray] = {}
    timeline = sorted(
        [(e.occurred_at, 1, i) for i, e in enumerate(events)] + [(e.label_known_at, 0, i) for i, e in enumerate(events)]
    )  # at one instant labels go first, as in training's replay (known_at <= t counts)
    batch: list[int] = []

    def flush() -> None:
        if batch:
            x = model.matrix([ScoreRequest.of(events[i].case_id, events[i].event_type, events[i].entities,
                                              dict(events[i].features), occurred_at=events[i].occurred_at,
                                              text=event_text(events[i]))
                              for i in batch])
            served.update({events[i].case_id: row for i, row in zip(batch, x)})
            batch.clear()

    for _, is_event, i in timeline:
        if is_event:
            batch.append(i)
            if len(batch) == 64:
                flush()
        else:
            flush()
            model.state.apply_labels([LabelEvent(events[i].case_id, bool(events[i].label),
                                                 events[i].label_known_at.timestamp())])
    flush()
    for split, part in parts.items():
        trained_x = model.model_input(time_true_inputs(live_model_dir(settings.model.dir), parts, split),
                                      time_true_texts(parts, split))
        served_x = np.stack([served[e.case_id] for e in part])
        assert np.array_equal(trained_x, served_x, equal_nan=True), split


def test_training_writes_data_model_and_a_valid_card(trained):
    settings, card = trained
    for name in SPLIT_FILES.values():
        assert (settings.data.dir / name).exists()
    for name in (ONNX_FILE, ANOMALY_FILE, BOOSTER_FILE, LAYOUT_FILE, CARD_FILE):
        assert (live_model_dir(settings.model.dir) / name).exists()
    assert not (live_model_dir(settings.model.dir) / GRAPH_FILE).exists()  # time-true: no frozen graph to serve from
    loaded = load_model_card(live_model_dir(settings.model.dir))
    assert loaded == card
    assert re.fullmatch(r"lgbm-\d{14}-[0-9a-f]{8}", card.version)
    assert card.feature_names == list(FEATURE_NAMES)  # what callers send
    features = card.model_features
    assert features[: len(FEATURE_NAMES)] == list(FEATURE_NAMES)
    # the anomaly score, then the text model's score when validation kept it (riskcascade/modelling/text_model.py)
    assert features[-2:] == [ANOMALY_FEATURE, TEXT_FEATURE] if card.text_model else features[-1] == ANOMALY_FEATURE
    assert (live_model_dir(settings.model.dir) / TEXT_MODEL_FILE).exists() == bool(card.text_model)
    assert "event_type=order" in features and "device_id.n_1h" in features and "ip.distinct.account_id" in features
    assert "account_id.fraud_known" in features and "device_id.fraud_accounts" in features
    assert card.metrics["feature_protocol"] == "time-true"
    assert set(card.feature_descriptions) == set(features)
    assert card.categorical_features["event_type"] == sorted(card.categorical_features["event_type"])
    assert card.links == ["account_id", "seller_id", "device_id", "ip", "payment_instrument_id"]
    assert card.anomaly["feature"] == ANOMALY_FEATURE and card.anomaly["sklearn_parity_max_abs_diff"] < 1e-4
    assert len(card.feature_scaling.mean) == len(card.feature_scaling.std) == len(FEATURE_NAMES)
    assert min(card.feature_scaling.std) >= 1e-6
    assert card.data["counts"] == {"train": 4200, "valid": 900, "test": 900, "unlabelled": 0}
    assert card.data["seed"] == SEED and card.data["dataset"] == "synthetic"
    written = read_events_csv(settings.data.dir / SPLIT_FILES["test"])
    assert len(written) == card.metrics["n"]


def test_model_separates_fraud_and_leaves_an_uncertain_band(trained):
    _, card = trained
    m = card.metrics
    assert m["roc_auc"] > 0.85
    assert 0 < m["average_precision"] <= 1
    assert 0 < m["recall_at_1pct_fpr"] <= m["recall_at_5pct_fpr"] <= 1
    assert 0 <= m["ece"] < 0.05
    assert set(m["recall_at_1pct_fpr_by_risk_type"]) <= {"account_takeover", "collusion", "promo_abuse",
                                                          "brushing", "click_farm"}
    t = card.thresholds
    assert 0 <= t.band_low < t.band_high <= 1
    assert t.rule == "share" and t.target_escalation_share == 0.12
    assert 0.05 < m["escalation_share"] < 0.2
    assert 0.05 < m["fraud_share_in_band"] < 0.95, "the band should hold both fraud and legitimate events"


def test_onnx_matches_lightgbm_including_missing_values(trained):
    settings, card = trained
    assert card.onnx.input == "features" and card.onnx.output == "probabilities"
    assert card.onnx.parity_max_abs_diff <= PARITY_TOLERANCE
    session = ort.InferenceSession(str(live_model_dir(settings.model.dir) / ONNX_FILE),
                                   providers=["CPUExecutionProvider"])
    booster = lgb.Booster(model_file=str(live_model_dir(settings.model.dir) / BOOSTER_FILE))
    x = _valid_matrix(settings)
    assert x.shape[1] == len(card.model_features)
    x[::3, ::2] = np.nan  # a third of the rows lose half their features
    probabilities = session.run([card.onnx.output], {card.onnx.input: x})[0]
    assert probabilities.shape == (len(x), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert np.max(np.abs(probabilities[:, 1] - booster.predict(x))) <= PARITY_TOLERANCE


def test_parity_check_raises_when_onnx_and_booster_differ(trained):
    settings, _ = trained
    booster = lgb.Booster(model_file=str(live_model_dir(settings.model.dir) / BOOSTER_FILE))
    fewer_trees = lgb.Booster(model_str=booster.model_to_string(num_iteration=max(1, booster.num_trees() // 2)))
    x = _valid_matrix(settings, rows=900)
    assert check_onnx_parity(live_model_dir(settings.model.dir) / ONNX_FILE, booster, x) <= PARITY_TOLERANCE
    with pytest.raises(RuntimeError, match="ONNX parity check failed: max abs diff"):
        check_onnx_parity(live_model_dir(settings.model.dir) / ONNX_FILE, fewer_trees, x)


def test_shipped_thresholds_are_float32_values(trained):
    settings, _ = trained
    text = (live_model_dir(settings.model.dir) / BOOSTER_FILE).read_text()
    thresholds = [float(v) for line in text.splitlines() if line.startswith("threshold=") for v in line[10:].split()]
    assert thresholds and all(float(np.float32(t)) == t for t in thresholds)


def test_threshold_snapping_rounds_down_and_keeps_float32_decisions():
    text = "tree\nTree=0\nthreshold=1.1869999766349795 0.5 3\ndecision_type=2 2 1\nleft_child=-1\n"
    snapped = snap_thresholds_to_float32(text).splitlines()[2].partition("=")[2].split()
    below = float(snapped[0])
    assert below <= 1.1869999766349795 < float(np.float32(1.187))  # rounded down, not onto the data value 1.187
    assert float(np.float32(below)) == below
    assert snapped[1:] == ["0.5", "3"]  # exact values and categorical splits untouched


@pytest.fixture(scope="module")
def small_synthetic():
    return synthetic_dataset(split_events(generate_events(2000, 9), 9))


def test_same_data_gives_the_same_model(tmp_path, small_synthetic):
    versions = []
    for run in ("a", "b"):
        settings = load_settings(model={"dir": str(tmp_path / run)})
        card = train_model(settings, small_synthetic, progress=False)
        versions.append(card.version.rsplit("-", 1)[1])
    assert versions[0] == versions[1]
    boosters = [(live_model_dir(tmp_path / run) / BOOSTER_FILE).read_text() for run in ("a", "b")]
    assert boosters[0] == boosters[1]


def test_small_data_is_not_stopped_after_a_few_trees(tmp_path, small_synthetic):
    """On ~1,400 training rows the validation metric peaks early by chance; training.min_boost_rounds keeps
    boosting (and the trees) at least that long."""
    rounds = []
    for minimum in (1, 150):
        settings = load_settings(model={"dir": str(tmp_path / str(minimum))},
                                 training={"min_boost_rounds": minimum, "early_stopping_rounds": 10})
        card = train_model(settings, small_synthetic, progress=False)
        rounds.append(card.training["best_iteration"])
    assert rounds[0] < 150 <= rounds[1]


def test_cost_rule_band_is_recorded_and_cheaper_review_widens_it(tmp_path, small_synthetic):
    shares = []
    for review in (8.0, 0.5):
        settings = load_settings(
            model={"dir": str(tmp_path / str(review))},
            training={"band_rule": "cost", "costs": {"missed_fraud": 20, "wrong_block": 10, "review": review}},
        )
        card = train_model(settings, small_synthetic, progress=False)
        assert card.thresholds.rule == "cost" and card.thresholds.costs["review"] == review
        shares.append(card.metrics["escalation_share"])
    assert shares[0] < shares[1]


def _linked_table(n=1500, seed=3):
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 300, n)
    y = (rng.random(300) < 0.2)[user].astype(int)
    return pd.DataFrame({
        "id": [f"r{i}" for i in range(n)],
        "label": y.astype(str),
        "x": rng.normal(y * 1.0, 1.0),
        "user": [f"u{u}" for u in user],
    })


def test_a_model_on_non_event_links_trains_but_is_refused_by_the_scorer(tmp_path):
    spec = DatasetSpec(name="reviews", table="t.csv", numeric_features=["x"], links=["user"])
    dataset: Dataset = dataset_from_frame(spec, _linked_table())
    settings = load_settings(model={"dir": str(tmp_path / "m")})
    card = train_model(settings, dataset, progress=False)
    assert "user.mean.x" in card.model_features and card.metrics["roc_auc"] > 0.6
    with pytest.raises(ValueError, match=r"cannot be served: its links \['user'\] are not event entities"):
        FastModel(live_model_dir(settings.model.dir))


def test_eval_command_reports_each_fixed_split_with_plots(tmp_path):
    table = _linked_table(2000)
    for k in range(2):
        table[f"split_{k}"] = np.random.default_rng(k).choice(["train", "train", "valid", "test"], len(table))
    spec = DatasetSpec(name="two-splits", table="t.csv", numeric_features=["x"], links=["user"],
                       split_columns=["split_0", "split_1"])
    descriptor = write_dataset(dataset_from_frame(spec, table), tmp_path / "data")
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", "--dataset", str(descriptor), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "±" in result.output and "roc_auc" in (out / "report.json").read_text()
    for png in ("calibration.png", "score-histogram.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert [s["split"] for s in report["per_split"]] == ["split_0", "split_1"]


def test_eval_command_names_the_bad_cell(tmp_path):
    (tmp_path / "t.csv").write_text("id,label,x\nr1,1,0.5\nr2,0,oops\n")
    (tmp_path / "dataset.yaml").write_text("name: bad\ntable: t.csv\nnumeric_features: [x]\n")
    result = CliRunner().invoke(main, ["eval", "--dataset", str(tmp_path / "dataset.yaml"), "--quiet"])
    assert result.exit_code != 0
    assert "row 2, column 'x': 'oops' is not a number" in result.output


def test_platt_calibration_keeps_the_ranking_when_validation_separates_the_classes():
    """A small validation period the model separates perfectly: plain Platt targets drove the slope to infinity
    and every confident score to exactly 1.0 (recall at 1% FPR then read 0 on a 6,000-event model)."""
    rng = np.random.default_rng(2)
    raw = np.concatenate([rng.uniform(0.001, 0.3, 500), rng.uniform(0.7, 0.999, 40)])
    y = np.concatenate([np.zeros(500), np.ones(40)])
    calibrator = PlattCalibrator.fit(raw, y)
    assert np.isfinite(calibrator.a) and 0 < calibrator.a < 20
    calibrated = calibrator.apply(np.sort(raw))
    assert np.all(np.diff(calibrated) > 0)  # strictly increasing: no ties at 1.0 or 0.0
    assert calibrated.max() < 1.0 and calibrated.min() > 0.0


def test_platt_calibration_repairs_shifted_probabilities():
    rng = np.random.default_rng(0)
    true_p = sigmoid(rng.normal(-2.0, 1.5, 20_000))
    y = (rng.random(true_p.size) < true_p).astype(int)
    raw = sigmoid(1.8 * logit(true_p) + 0.9)  # overconfident and shifted towards fraud
    calibrated = PlattCalibrator.fit(raw, y).apply(raw)

    def log_loss(p):
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    assert log_loss(calibrated) < log_loss(raw)
    assert expected_calibration_error(calibrated, y) < expected_calibration_error(raw, y) / 3
    assert log_loss(calibrated) == pytest.approx(log_loss(true_p), rel=0.02)


def test_escalation_band_holds_the_target_share_closest_to_one_half():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.beta(0.5, 8, 9000), rng.beta(4, 1, 1000)])  # skewed, like fraud scores
    low, high = band_by_share(scores, target_share=0.12)
    inside = (scores >= low) & (scores < high)
    assert inside.mean() == pytest.approx(0.12, abs=0.002)
    assert 0.5 - low == pytest.approx(high - 0.5)
    assert np.abs(scores[inside] - 0.5).max() <= np.abs(scores[~inside] - 0.5).min()


def test_recall_at_fpr_never_exceeds_the_false_positive_budget():
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.95, 0.85, 0.2])
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    legit = scores[labels == 0]
    assert np.sum(legit >= threshold_at_fpr(scores, labels, 0.1)) == 1  # one of ten may score at or above t
    assert np.sum(legit >= threshold_at_fpr(scores, labels, 0.2)) == 1  # the tie at 0.8 stays out together
    assert recall_at_fpr(scores, labels, 0.05) == pytest.approx(1 / 3)  # no false positive: only 0.95
    assert recall_at_fpr(scores, labels, 0.1) == pytest.approx(2 / 3)  # 0.95 and 0.85 clear 0.8
    assert recall_at_fpr(scores, labels, 1.0) == 1.0


def test_reason_codes_are_attributed_where_they_are_read(trained):
    """reasons_for="at_risk": rows at or above the band's low edge get the same TreeSHAP reasons as "all"; rows
    approved below it get one summary code naming their score, and the scores themselves never change."""
    settings, card = trained
    x = _valid_matrix(settings, rows=400)
    everything = FastModel(live_model_dir(settings.model.dir), reason_count=3, reasons_for="all").score_matrix(x)
    at_risk = FastModel(live_model_dir(settings.model.dir), reason_count=3, reasons_for="at_risk").score_matrix(x)
    low = card.thresholds.band_low
    below = [i for i, s in enumerate(everything) if s.score < low]
    above = [i for i, s in enumerate(everything) if s.score >= low]
    assert below and above, "the sample needs rows on both sides of the band's low edge"
    assert [s.score for s in at_risk] == [s.score for s in everything]
    for i in above:
        assert at_risk[i].reasons == everything[i].reasons and len(at_risk[i].reasons) == 3
    for i in below:
        (summary,) = at_risk[i].reasons
        assert summary.code == "SCORE_BELOW_BAND" and summary.weight == 0.0
        assert f"{at_risk[i].score:.3f}" in summary.description and f"{low:.3f}" in summary.description
        assert all(r.code.startswith(("RISK_UP:", "RISK_DOWN:")) for r in everything[i].reasons)
    with pytest.raises(ValueError, match="reasons_for"):
        FastModel(live_model_dir(settings.model.dir), reasons_for="some")
