"""Evaluation metrics on data with known answers, the across-split summary, the plots and the Markdown report."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from riskcascade.modelling.evaluation import (
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


# -- unlabelled rows, split names and the protocol line ------------------------------------------------------------


def test_unlabelled_rows_are_left_out_of_every_metric():
    scores, labels = separable()
    risk_types = np.where(labels == 1, "collusion", "")
    rng = np.random.default_rng(3)
    noise = rng.random(500)  # unlabelled rows with scores that would wreck every metric if they counted
    with_unlabelled = split_metrics(
        np.concatenate([scores, noise]), np.concatenate([labels, np.full(500, -1)]),
        np.concatenate([risk_types, np.full(500, "collusion")]),
    )
    assert with_unlabelled == split_metrics(scores, labels, risk_types)
    assert with_unlabelled["n"] == 1000 and with_unlabelled["roc_auc"] == 1.0


def test_labels_other_than_fraud_legit_or_unlabelled_are_refused():
    with pytest.raises(ValueError, match="labels must be 0"):
        split_metrics(np.array([0.1, 0.9, 0.5]), np.array([0, 1, 2]))


def test_plots_skip_unlabelled_rows(tmp_path):
    scores, labels = separable()
    labels = labels.copy()
    labels[:10] = -1
    assert_png(plot_calibration([scores, scores], [labels, labels], tmp_path / "c.png", split_labels=["a", "b"]))
    assert_png(plot_score_histogram(scores, labels, tmp_path / "h.png"))
    with pytest.raises(ValueError, match="2 split labels for 1 splits"):
        plot_calibration(scores, labels, tmp_path / "x.png", split_labels=["a", "b"])


def test_report_names_splits_and_states_the_protocol():
    splits = three_splits()
    report = format_report(summarise(splits), splits, "synthetic", protocol="fixed split columns a, b, c.")
    assert "| Metric | Mean ± std | a | b | c |" in report
    assert "Split 1" not in report
    assert "Protocol: fixed split columns a, b, c." in report
    unnamed = [{k: v for k, v in s.items() if k != "split"} for s in splits]
    assert "| Metric | Mean ± std | Split 1 | Split 2 | Split 3 |" in format_report(summarise(unnamed), unnamed, "x")
    single = format_report(summarise(splits[:1]), splits[:1], "synthetic")
    assert "One split: a." in single and "Protocol" not in single


# -- evaluate_model: which splits run, what the report says about them ---------------------------------------------


def _dataset(n: int = 40, time_column: bool = True, split_column: bool = False, unlabelled: int = 0):
    """``n`` hourly rows, fraud and legitimate in turn; the last ``unlabelled`` (the latest) have no label."""
    from pathlib import Path

    import pandas as pd

    from riskcascade.modelling.datasets.format import DatasetSpec, dataset_from_frame

    labels = np.where(np.arange(n) % 2 == 0, "1", "0").astype(object)
    labels[n - unlabelled:] = ""
    frame = pd.DataFrame({
        "id": [f"e{i}" for i in range(n)],
        "label": labels,
        "x": np.arange(n, dtype=float),
        "at": np.arange(n, dtype=float) * 3600,  # hourly, epoch seconds
        "split": np.resize(["train", "valid", "test", "train", "valid", "test", "train"], n),
    })
    spec = {"name": "tiny", "table": Path("t.csv"), "numeric_features": ["x"]}
    if time_column:
        spec["time_column"] = "at"
    if split_column:
        spec["split_columns"] = ["split"]
    return dataset_from_frame(DatasetSpec.model_validate(spec), frame)


def _training(rule: str = "auto"):
    from riskcascade.core.config import TrainingSettings

    return TrainingSettings(split_rule=rule)


def test_evaluation_splits_by_time_once_and_refuses_repeats():
    from riskcascade.modelling.evaluate_model import EvaluationSetupError, evaluation_splits

    data = _dataset()
    (choice,) = evaluation_splits(data, _training(), seed=7)
    assert choice.protocol == "time" and choice.name == "time 70/15/15"
    with pytest.raises(EvaluationSetupError, match="a time split is deterministic"):
        evaluation_splits(data, _training(), seed=7, repeats=3)
    stratified = evaluation_splits(data, _training("stratified"), seed=7, repeats=3)
    assert [c.name for c in stratified] == ["stratified seed 7", "stratified seed 8", "stratified seed 9"]


def test_evaluation_splits_refuses_repeats_with_fixed_split_columns():
    from riskcascade.modelling.evaluate_model import EvaluationSetupError, evaluation_splits

    data = _dataset(split_column=True)
    assert [c.name for c in evaluation_splits(data, _training(), seed=7)] == ["split"]
    with pytest.raises(EvaluationSetupError, match=r"brings its own split columns \(split\); --repeats draws new"):
        evaluation_splits(data, _training(), seed=7, repeats=2)


def test_evaluation_splits_turns_a_split_it_cannot_choose_into_a_setup_error():
    from riskcascade.modelling.evaluate_model import EvaluationSetupError, evaluation_splits

    with pytest.raises(EvaluationSetupError, match="needs a time_column"):
        evaluation_splits(_dataset(time_column=False), _training("time"), seed=7)
    with pytest.raises(EvaluationSetupError, match="the test part needs both"):
        evaluation_splits(_dataset(unlabelled=10), _training(), seed=7)  # the latest rows have no label


def test_protocol_line_says_how_splits_features_and_labels_were_made():
    from riskcascade.modelling.datasets.splits import choose_split
    from riskcascade.modelling.evaluate_model import describe_protocol

    timed = _dataset(unlabelled=2)
    line = describe_protocol(timed, [choose_split(timed, 0, "auto", 0.15, 0.15, 7)])
    assert line.startswith("time-ordered 70/15/15 split by at; features by replay")
    assert "labels known at their event's time (no label time or delay given: optimistic)" in line
    assert "2 unlabelled rows feed features, not the loss or the metrics" in line
    static = _dataset(time_column=False)
    choices = [choose_split(static, 0, "auto", 0.15, 0.15, seed) for seed in (7, 8)]
    assert describe_protocol(static, choices) == (
        "stratified random splits (stratified seed 7, stratified seed 8); transductive graph features "
        "(no time column)."
    )
    fixed = _dataset(time_column=False, split_column=True)
    assert describe_protocol(fixed, [choose_split(fixed, 0, "auto", 0.15, 0.15, 7)]).startswith(
        "fixed split column split; transductive"
    )
    reported = describe_protocol(timed, [choose_split(timed, 0, "auto", 0.15, 0.15, 7)], features="transductive")
    assert "transductive graph features;" in reported  # what training says it did wins over the assumption
