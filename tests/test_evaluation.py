"""Evaluation metrics on data with known answers, the across-split summary, the plots and the Markdown report."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from riskcascade.evaluation import (
    FIGURE_DPI,
    FIGURE_SIZE_IN,
    RISK_TYPE_RECALL,
    format_report,
    plot_calibration,
    plot_score_histogram,
    split_metrics,
    summarise,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def separable(seed: int = 0, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.1).astype(int)
    scores = np.where(labels == 1, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
    return scores, labels


def test_perfect_separation_scores_perfectly():
    scores, labels = separable()
    m = split_metrics(scores, labels)
    assert m["roc_auc"] == 1.0 and m["average_precision"] == 1.0
    assert m["recall_at_1pct_fpr"] == 1.0 and m["recall_at_5pct_fpr"] == 1.0
    assert m["n"] == 1000 and m["fraud_rate"] == pytest.approx(labels.mean())
    assert RISK_TYPE_RECALL not in m


def test_scores_unrelated_to_labels_rank_at_chance():
    rng = np.random.default_rng(7)
    labels = (rng.random(40_000) < 0.1).astype(int)
    m = split_metrics(rng.random(40_000), labels)
    assert m["roc_auc"] == pytest.approx(0.5, abs=0.02)
    assert m["average_precision"] == pytest.approx(labels.mean(), abs=0.02)
    assert m["recall_at_1pct_fpr"] == pytest.approx(0.01, abs=0.01)
    assert m["recall_at_5pct_fpr"] == pytest.approx(0.05, abs=0.015)


def test_ece_of_a_known_miscalibration():
    # 100 events at 0.1 with 10 frauds (calibrated), 100 at 0.9 with 70 frauds (0.2 too high): ECE = 0.2 / 2
    scores = np.repeat([0.1, 0.9], 100)
    labels = np.concatenate([np.arange(100) < 10, np.arange(100) < 70]).astype(int)
    assert split_metrics(scores, labels)["ece"] == pytest.approx(0.1)


def test_recall_by_risk_type_uses_the_global_threshold():
    legit = np.arange(100) / 100  # 1% FPR lets one legit (0.99) through: threshold just above 0.98
    fraud = {"account_takeover": [0.995, 0.5], "collusion": [0.999, 0.99, 0.985], "promo_abuse": [0.1]}
    scores = np.concatenate([legit, *map(np.array, fraud.values())])
    labels = np.concatenate([np.zeros(100, int), np.ones(6, int)])
    risk_types = np.array([""] * 100 + [r for r, s in fraud.items() for _ in s])
    by_type = split_metrics(scores, labels, risk_types)[RISK_TYPE_RECALL]
    assert by_type == pytest.approx({"account_takeover": 0.5, "collusion": 1.0, "promo_abuse": 0.0})


def test_single_class_split_is_refused():
    with pytest.raises(ValueError, match="both fraud and legitimate"):
        split_metrics(np.array([0.1, 0.2]), np.array([0, 0]))


def three_splits() -> list[dict]:
    return [
        {"roc_auc": 0.8, "n": 100, "split": "a", RISK_TYPE_RECALL: {"collusion": 0.5, "brushing": 0.2}},
        {"roc_auc": 0.9, "n": 200, "split": "b", RISK_TYPE_RECALL: {"collusion": 0.7}},
        {"roc_auc": 1.0, "n": 300, "split": "c", RISK_TYPE_RECALL: {"collusion": 0.9, "brushing": 0.4}},
    ]


def test_summarise_gives_mean_and_population_std():
    summary = summarise(three_splits())
    assert summary["roc_auc"] == pytest.approx({"mean": 0.9, "std": np.sqrt(0.02 / 3), "splits": 3})
    assert summary["n"] == pytest.approx({"mean": 200, "std": np.sqrt(20_000 / 3), "splits": 3})
    assert "split" not in summary  # names are not metrics
    nested = summary[RISK_TYPE_RECALL]
    assert nested["collusion"] == pytest.approx({"mean": 0.7, "std": np.sqrt(0.08 / 3), "splits": 3})
    assert nested["brushing"] == pytest.approx({"mean": 0.3, "std": 0.1, "splits": 2})
    assert summarise(three_splits()[:1])["roc_auc"] == {"mean": 0.8, "std": 0.0, "splits": 1}


def test_report_shows_spread_only_for_several_splits():
    splits = three_splits()
    several = format_report(summarise(splits), splits, "synthetic")
    assert "synthetic" in several and "±" in several
    assert "| ROC AUC | 0.9000 ± 0.0816 | 0.8000 | 0.9000 | 1.0000 |" in several
    assert "| Recall at 1% FPR: brushing | 0.3000 ± 0.1000 (2 of 3 splits) | 0.2000 | – | 0.4000 |" in several
    single = format_report(summarise(splits[:1]), splits[:1], "synthetic")
    assert "±" not in single
    assert "| ROC AUC | 0.8000 |" in single and "| Events | 100 |" in single
    assert "| Recall at 1% FPR: collusion | 0.5000 |" in single


def test_report_from_real_metrics_lists_every_metric():
    splits = [split_metrics(*separable(seed)) for seed in range(2)]
    report = format_report(summarise(splits), splits, "separable")
    for label in ("ROC AUC", "Average precision", "Recall at 1% FPR", "Recall at 5% FPR", "ECE", "Fraud rate"):
        assert f"| {label}" in report


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[: len(PNG_MAGIC)] == PNG_MAGIC
    width_in, height_in = FIGURE_SIZE_IN
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (round(height_in * FIGURE_DPI), round(width_in * FIGURE_DPI))
    assert image.std() > 0  # something was drawn


@pytest.mark.parametrize("n_splits", [1, 3])
def test_plots_are_written_as_png(tmp_path, n_splits):
    splits = [separable(seed) for seed in range(n_splits)]
    scores = [s for s, _ in splits] if n_splits > 1 else splits[0][0]
    labels = [y for _, y in splits] if n_splits > 1 else splits[0][1]
    written = [
        plot_calibration(scores, labels, tmp_path / "nested" / "calibration.png"),
        plot_score_histogram(scores, labels, tmp_path / "band.png", band=(0.3, 0.7)),
        plot_score_histogram(scores, labels, tmp_path / "threshold.png", band=(0.5, 0.5)),
        plot_score_histogram(scores, labels, tmp_path / "plain.png"),
    ]
    for path in written:
        assert_png(path)


def test_split_lists_must_match():
    scores, labels = separable()
    with pytest.raises(ValueError, match="one array per split"):
        plot_calibration([scores, scores], labels, "unused.png")
