"""Training the fast model end to end on a small generated set, plus the calibration and metric pieces it uses."""

from __future__ import annotations

import os
import re

import lightgbm as lgb
import numpy as np
import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

from riskcascade.calibration import PlattCalibrator, logit, sigmoid  # noqa: E402
from riskcascade.config import load_settings  # noqa: E402
from riskcascade.model_card import BOOSTER_FILE, CARD_FILE, ONNX_FILE, load_model_card  # noqa: E402
from riskcascade.model_metrics import (  # noqa: E402
    expected_calibration_error,
    recall_at_fpr,
    threshold_at_fpr,
)
from riskcascade.synthetic import FEATURE_NAMES, generate_events, read_events_csv, split_events  # noqa: E402
from riskcascade.training import (  # noqa: E402
    PARITY_TOLERANCE,
    SPLIT_FILES,
    check_onnx_parity,
    choose_escalation_band,
    feature_matrix,
    label_vector,
    snap_thresholds_to_float32,
    train_model,
)

N_EVENTS = 6000
SEED = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    settings = load_settings(
        data={"dir": str(root / "data"), "n_events": N_EVENTS, "seed": SEED}, model={"dir": str(root / "model")}
    )
    card = train_model(settings, progress=False)
    return settings, card


def test_training_writes_data_model_and_a_valid_card(trained):
    settings, card = trained
    for name in SPLIT_FILES.values():
        assert (settings.data.dir / name).exists()
    for name in (ONNX_FILE, BOOSTER_FILE, CARD_FILE):
        assert (settings.model.dir / name).exists()
    loaded = load_model_card(settings.model.dir)
    assert loaded == card
    assert re.fullmatch(r"lgbm-\d{14}-[0-9a-f]{8}", card.version)
    assert card.feature_names == list(FEATURE_NAMES)
    assert set(card.feature_descriptions) == set(FEATURE_NAMES)
    assert len(card.feature_scaling.mean) == len(card.feature_scaling.std) == len(FEATURE_NAMES)
    assert min(card.feature_scaling.std) >= 1e-6
    assert card.data["counts"] == {"train": 4200, "valid": 900, "test": 900}
    assert card.data["seed"] == SEED
    written = read_events_csv(settings.data.dir / SPLIT_FILES["test"])
    assert len(written) == card.metrics["n"]


def test_model_separates_fraud_and_leaves_an_uncertain_band(trained):
    _, card = trained
    m = card.metrics
    assert m["roc_auc"] > 0.85
    assert m["roc_auc"] < 0.995, "the synthetic task must not be trivially separable"
    assert 0 < m["average_precision"] <= 1
    assert 0 < m["recall_at_1pct_fpr"] <= m["recall_at_5pct_fpr"] <= 1
    assert set(m["recall_at_1pct_fpr_by_risk_type"]) <= set(card.data["risk_type_counts"])
    t = card.thresholds
    assert 0 <= t.band_low < t.band_high <= 1
    assert t.target_escalation_share == 0.12
    assert 0.05 < m["escalation_share"] < 0.2
    assert 0.05 < m["fraud_share_in_band"] < 0.95, "the band should hold both fraud and legitimate events"


def test_onnx_matches_lightgbm_including_missing_values(trained):
    settings, card = trained
    assert card.onnx.input == "features" and card.onnx.output == "probabilities"
    assert card.onnx.parity_max_abs_diff <= PARITY_TOLERANCE
    session = ort.InferenceSession(str(settings.model.dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    booster = lgb.Booster(model_file=str(settings.model.dir / BOOSTER_FILE))
    x = feature_matrix(read_events_csv(settings.data.dir / SPLIT_FILES["valid"])[:200])
    x[::3, ::2] = np.nan  # a third of the rows lose half their features
    probabilities = session.run([card.onnx.output], {card.onnx.input: x})[0]
    assert probabilities.shape == (len(x), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert np.max(np.abs(probabilities[:, 1] - booster.predict(x))) <= PARITY_TOLERANCE


def test_parity_check_raises_when_onnx_and_booster_differ(trained):
    settings, _ = trained
    booster = lgb.Booster(model_file=str(settings.model.dir / BOOSTER_FILE))
    fewer_trees = lgb.Booster(model_str=booster.model_to_string(num_iteration=max(1, booster.num_trees() // 2)))
    x = feature_matrix(read_events_csv(settings.data.dir / SPLIT_FILES["test"]))
    assert check_onnx_parity(settings.model.dir / ONNX_FILE, booster, x) <= PARITY_TOLERANCE
    with pytest.raises(RuntimeError, match="ONNX parity check failed: max abs diff"):
        check_onnx_parity(settings.model.dir / ONNX_FILE, fewer_trees, x)


def test_shipped_thresholds_are_float32_values(trained):
    settings, _ = trained
    text = (settings.model.dir / BOOSTER_FILE).read_text()
    thresholds = [float(v) for line in text.splitlines() if line.startswith("threshold=") for v in line[10:].split()]
    assert thresholds and all(float(np.float32(t)) == t for t in thresholds)


def test_threshold_snapping_rounds_down_and_keeps_float32_decisions():
    text = "tree\nTree=0\nthreshold=1.1869999766349795 0.5 3\ndecision_type=2 2 1\nleft_child=-1\n"
    snapped = snap_thresholds_to_float32(text).splitlines()[2].partition("=")[2].split()
    below = float(snapped[0])
    assert below <= 1.1869999766349795 < float(np.float32(1.187))  # rounded down, not onto the data value 1.187
    assert float(np.float32(below)) == below
    assert snapped[1:] == ["0.5", "3"]  # exact values and categorical splits untouched


def test_same_events_give_the_same_model(tmp_path):
    parts = split_events(generate_events(2000, 9), 9)
    versions = []
    for run in ("a", "b"):
        settings = load_settings(model={"dir": str(tmp_path / run)})
        card = train_model(settings, events=parts, progress=False)
        assert card.data["generator"] == "supplied by caller"
        versions.append(card.version.rsplit("-", 1)[1])
    assert versions[0] == versions[1]
    assert (tmp_path / "a" / BOOSTER_FILE).read_text() == (tmp_path / "b" / BOOSTER_FILE).read_text()


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
    low, high = choose_escalation_band(scores, target_share=0.12)
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


def test_labels_and_matrix_follow_feature_order():
    events = generate_events(300, 2)
    x, y = feature_matrix(events), label_vector(events)
    assert x.dtype == np.float32 and x.shape == (300, len(FEATURE_NAMES))
    assert x[7, FEATURE_NAMES.index("amount")] == np.float32(events[7].features["amount"])
    assert y.tolist() == [e.label for e in events]
