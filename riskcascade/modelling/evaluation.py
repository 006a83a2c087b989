"""Evaluation report for a binary fraud model over one or several fixed splits.

Only labelled rows are scored: a row with label ``UNLABELLED`` (-1, no label yet) may feed features, but no
metric and no plot.

One number from one split hides how much it would move on another draw of the data, so metrics are computed per
split and reported as mean ± std across splits. The metrics are the ones training reports for the fast model
(``riskcascade.modelling.training``) so that figures from here and from a model card can be set side by side; the plots
show what the numbers summarise: whether a score of 0.3 means three in ten (reliability diagram) and where
fraud and legitimate scores overlap, which is where the escalation band has to sit (score histogram).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, Union

import matplotlib

matplotlib.use("Agg")  # files only, no display: must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from riskcascade.modelling.datasets.format import UNLABELLED  # noqa: E402 - label of a row without one: in no metric
from riskcascade.modelling.model_metrics import (  # noqa: E402
    DEFAULT_ECE_BINS,
    expected_calibration_error,
    recall_at_fpr,
    threshold_at_fpr,
)

RECALL_AT_FPR = {"recall_at_1pct_fpr": 0.01, "recall_at_5pct_fpr": 0.05}  # metric name -> false-positive rate
RISK_TYPE_RECALL_FPR = 0.01  # per-risk-type recall is read at the global threshold for this false-positive rate
RISK_TYPE_RECALL = "recall_at_1pct_fpr_by_risk_type"
NO_RISK_TYPE = ""  # the risk type of legitimate rows; fraud rows carrying it are left out of the per-type recall
METRIC_LABELS = {  # report rows, in order
    "roc_auc": "ROC AUC",
    "average_precision": "Average precision",
    "recall_at_1pct_fpr": "Recall at 1% FPR",
    "recall_at_5pct_fpr": "Recall at 5% FPR",
    "ece": f"ECE ({DEFAULT_ECE_BINS} bins)",
    "n": "Events",
    "fraud_rate": "Fraud rate",
}
RISK_TYPE_LABEL = "Recall at 1% FPR: {risk_type}"
VALUE_FORMAT = ".4f"
COUNT_FORMAT = ".0f"
COUNT_METRICS = frozenset({"n"})
MISSING_CELL = "–"
FIGURE_SIZE_IN = (7.0, 5.0)  # width, height
FIGURE_DPI = 100  # with FIGURE_SIZE_IN: 700 x 500 pixel PNGs
CALIBRATION_HEIGHT_RATIOS = (3, 1)  # reliability curve above, bin counts below
HISTOGRAM_BINS = 50
SPLIT_LINE_ALPHA = 0.35  # per-split curves stay behind the pooled one
HISTOGRAM_ALPHA = 0.5
BAND_ALPHA = 0.15
BAND_COLOUR = "tab:green"  # apart from the two class colours it is drawn over

SplitArrays = Union[np.ndarray, Sequence[float], Sequence[np.ndarray]]  # one split, or one array per split


class MetricSummary(TypedDict):
    """One metric across splits; ``splits`` counts those that had it (a risk type can be absent from a split)."""

    mean: float
    std: float  # population std (ddof=0): 0 for a single split
    splits: int


def split_metrics(
    scores: np.ndarray, labels: np.ndarray, risk_types: np.ndarray | None = None
) -> dict[str, float | dict[str, float]]:
    """Ranking, operating-point and calibration metrics of one split.

    With ``risk_types`` (one string per row, ``NO_RISK_TYPE`` for legitimate rows), recall is also given per
    risk type at the *global* 1%-FPR threshold: the model runs one threshold in production, so the question is
    which fraud patterns that threshold lets through, not how each pattern would fare with its own threshold.
    Rows labelled ``UNLABELLED`` are left out of every figure, ``n`` included.
    """
    keep = np.asarray(labels) != UNLABELLED
    if risk_types is not None:
        risk_types = np.asarray(risk_types)
        if risk_types.shape != keep.shape:
            raise ValueError(f"risk_types must have one entry per row, got {risk_types.shape} for {keep.shape}")
        risk_types = risk_types[keep]
    scores, labels = _labelled(scores, labels)
    if labels.min() == labels.max():
        raise ValueError("a split needs both fraud and legitimate events")
    metrics: dict[str, float | dict[str, float]] = {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        **{name: recall_at_fpr(scores, labels, fpr) for name, fpr in RECALL_AT_FPR.items()},
        "ece": expected_calibration_error(scores, labels, DEFAULT_ECE_BINS),
        "n": int(len(labels)),
        "fraud_rate": float(labels.mean()),
    }
    if risk_types is not None:
        metrics[RISK_TYPE_RECALL] = _recall_by_risk_type(scores, labels, risk_types)
    return metrics


def summarise(per_split: list[dict[str, Any]]) -> dict[str, MetricSummary | dict[str, MetricSummary]]:
    """Mean and population std of every numeric metric across splits, nested per-risk-type recall included.

    The std is the population std (ddof=0): it describes the spread of these fixed splits, not an estimate of
    the spread over every split one might draw, which with k splits is larger by sqrt(k / (k - 1)). Non-numeric
    entries (a split's name, say) are skipped.
    """
    if not per_split:
        raise ValueError("summarise needs at least one split")
    summary: dict[str, MetricSummary | dict[str, MetricSummary]] = {}
    for key in _keys_in_order(per_split):
        values = [split[key] for split in per_split if key in split]
        if all(isinstance(v, dict) for v in values):
            summary[key] = {sub: _summary([v[sub] for v in values if sub in v]) for sub in _keys_in_order(values)}
        elif all(_is_number(v) for v in values):
            summary[key] = _summary(values)
    return summary


def format_report(
    summary: dict[str, MetricSummary | dict[str, MetricSummary]],
    per_split: list[dict[str, Any]],
    dataset_name: str,
    protocol: str | None = None,
) -> str:
    """A Markdown table: one row per metric, ``mean ± std`` and one column per split when there are several.

    Splits are named by their ``split`` entry (a split column's name, "time 70/15/15", "stratified seed 7"),
    else numbered. ``protocol`` is one sentence on how the splits, features and labels were made; it heads the
    report, because the same model scores very differently under a random and a time-ordered split.
    """
    several = len(per_split) > 1
    names = split_names(per_split)
    header = ["Metric", "Mean ± std", *names] if several else ["Metric", "Value"]
    extent = f"{len(per_split)} splits; mean ± population std across splits." if several else f"One split: {names[0]}."
    lines = [
        f"## Evaluation: {dataset_name}",
        "",
        *([f"Protocol: {protocol}", ""] if protocol else []),
        extent,
        "",
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
    ]
    rows = [(key, label, summary[key], [s.get(key) for s in per_split]) for key, label in _metric_rows(summary)]
    nested = summary.get(RISK_TYPE_RECALL, {})
    for risk_type in sorted(nested):
        per_type = [s.get(RISK_TYPE_RECALL, {}).get(risk_type) for s in per_split]
        rows.append((RISK_TYPE_RECALL, RISK_TYPE_LABEL.format(risk_type=risk_type), nested[risk_type], per_type))
    for key, label, stats, values in rows:
        fmt = COUNT_FORMAT if key in COUNT_METRICS else VALUE_FORMAT
        if several:
            cells = [_mean_std_cell(stats, fmt, len(per_split)), *(_cell(v, fmt) for v in values)]
        else:
            cells = [_cell(stats["mean"], fmt)]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def split_names(per_split: list[dict[str, Any]]) -> list[str]:
    """Each split's ``split`` entry, or "Split i" (1-based) where it has none."""
    return [str(split.get("split") or f"Split {i + 1}") for i, split in enumerate(per_split)]


def plot_calibration(
    scores: SplitArrays,
    labels: SplitArrays,
    path: str | Path,
    bins: int = DEFAULT_ECE_BINS,
    title: str = "Reliability diagram",
    split_labels: Sequence[str] | None = None,
) -> Path:
    """Reliability diagram: observed fraud rate against mean predicted score per equal-width bin.

    The bins are the ones ``expected_calibration_error`` uses, so the gaps drawn are the ones the ECE averages.
    Several splits are pooled into the bold curve, each split drawn faintly behind it so that a curve's wobble
    can be told from a split's noise; the lower panel gives the pooled count per bin (log scale), without which
    a wild point from a near-empty bin would look as credible as one from a full bin. ``split_labels`` name the
    faint curves in the legend (default "split 1", "split 2", ...).
    """
    splits = _splits(scores, labels)
    if split_labels is not None and len(split_labels) != len(splits):
        raise ValueError(f"{len(split_labels)} split labels for {len(splits)} splits")
    pooled = tuple(np.concatenate(parts) for parts in zip(*splits))
    fig, (curve, counts) = plt.subplots(
        2, 1, sharex=True, figsize=FIGURE_SIZE_IN, gridspec_kw={"height_ratios": CALIBRATION_HEIGHT_RATIOS}
    )
    try:
        curve.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        if len(splits) > 1:
            for i, (s, y) in enumerate(splits):
                predicted, observed = _reliability(s, y, bins)
                name = split_labels[i] if split_labels is not None else f"split {i + 1}"
                curve.plot(predicted, observed, alpha=SPLIT_LINE_ALPHA, label=name)
        predicted, observed = _reliability(*pooled, bins)
        ece = expected_calibration_error(*pooled, bins)
        curve.plot(predicted, observed, marker="o", color="black", label=f"pooled (ECE {ece:.3f})")
        curve.set(ylabel="observed fraud rate", xlim=(0, 1), ylim=(0, 1), title=title)
        curve.legend(loc="upper left", fontsize="small")
        edges = np.linspace(0, 1, bins + 1)
        counts.bar(edges[:-1], _bin_counts(pooled[0], bins), width=1 / bins, align="edge", edgecolor="black")
        counts.set(yscale="log", xlabel="predicted score", ylabel="events")
        counts.yaxis.set_minor_formatter(NullFormatter())  # powers of ten only: minor labels crowd a short panel
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_score_histogram(
    scores: SplitArrays,
    labels: SplitArrays,
    path: str | Path,
    band: tuple[float, float] | None = None,
    title: str = "Score distribution",
) -> Path:
    """Histograms of fraud and legitimate scores (pooled over splits), log-scale counts, band shaded if given.

    The log scale keeps the rare fraud class and the thin legitimate tail visible beside the legitimate bulk;
    the overlap of the two is what the escalation band is for, so drawing the band on it shows what it catches.
    An empty band (low == high) is drawn as the single approve/block threshold.
    """
    scores, labels = (np.concatenate(parts) for parts in zip(*_splits(scores, labels)))
    fig, ax = plt.subplots(figsize=FIGURE_SIZE_IN)
    try:
        edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
        ax.hist(scores[labels == 0], bins=edges, alpha=HISTOGRAM_ALPHA, label=f"legitimate ({np.sum(labels == 0)})")
        ax.hist(scores[labels == 1], bins=edges, alpha=HISTOGRAM_ALPHA, label=f"fraud ({np.sum(labels == 1)})")
        if band is not None and band[0] < band[1]:
            label = f"escalation band [{band[0]:.3f}, {band[1]:.3f})"
            ax.axvspan(*band, color=BAND_COLOUR, alpha=BAND_ALPHA, label=label)
        elif band is not None:
            ax.axvline(band[0], color=BAND_COLOUR, label=f"approve/block threshold {band[0]:.3f}")
        ax.set(yscale="log", xlim=(0, 1), xlabel="score", ylabel="events", title=title)
        ax.legend(fontsize="small")
        return _save(fig, path)
    finally:
        plt.close(fig)


def _recall_by_risk_type(scores: np.ndarray, labels: np.ndarray, risk_types: np.ndarray) -> dict[str, float]:
    if risk_types.shape != labels.shape:
        raise ValueError(f"risk_types must have one entry per row, got {risk_types.shape} for {labels.shape}")
    threshold = threshold_at_fpr(scores, labels, RISK_TYPE_RECALL_FPR)
    fraud = labels == 1
    present = sorted(set(risk_types[fraud].tolist()) - {NO_RISK_TYPE})
    return {str(r): float(np.mean(scores[fraud & (risk_types == r)] >= threshold)) for r in present}


def _reliability(scores: np.ndarray, labels: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted score and observed fraud rate of each non-empty bin."""
    which = _bin_index(scores, bins)
    count = np.bincount(which, minlength=bins)
    filled = count > 0
    predicted = np.bincount(which, weights=scores, minlength=bins)[filled] / count[filled]
    observed = np.bincount(which, weights=labels, minlength=bins)[filled] / count[filled]
    return predicted, observed


def _bin_counts(scores: np.ndarray, bins: int) -> np.ndarray:
    return np.bincount(_bin_index(scores, bins), minlength=bins)


def _bin_index(scores: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of each score, exactly as ``expected_calibration_error`` bins it."""
    return np.minimum((scores * bins).astype(np.int64), bins - 1)


def _splits(scores: SplitArrays, labels: SplitArrays) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (scores, labels) pair per split, labelled rows only: a list of arrays is several splits, a flat array or
    list is one."""
    several = isinstance(scores, (list, tuple)) and len(scores) > 0 and np.ndim(scores[0]) == 1
    if not several:
        return [_labelled(scores, labels)]
    if not isinstance(labels, (list, tuple)) or len(labels) != len(scores):
        raise ValueError("with several splits of scores, labels must be a list with one array per split")
    return [_labelled(s, y) for s, y in zip(scores, labels)]


def _labelled(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``_checked`` over the rows whose label is not ``UNLABELLED``."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape == labels.shape:
        keep = labels != UNLABELLED
        scores, labels = scores[keep], labels[keep]
    return _checked(scores, labels)


def _checked(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scores as float64 probabilities and labels as int64 0/1 of one non-zero length, or ValueError."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape or len(scores) == 0:
        shapes = f"{scores.shape} and {labels.shape}"
        raise ValueError(f"scores and labels must be non-empty 1-d arrays of one length, got {shapes}")
    if not np.all((scores >= 0) & (scores <= 1)):
        raise ValueError("scores must be probabilities in [0, 1]")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (legitimate) or 1 (fraud)")
    return scores, labels.astype(np.int64)


def _keys_in_order(dicts: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for d in dicts for key in d))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_summary(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == MetricSummary.__required_keys__


def _summary(values: list[float]) -> MetricSummary:
    array = np.asarray(values, dtype=np.float64)
    return MetricSummary(mean=float(array.mean()), std=float(array.std(ddof=0)), splits=len(values))


def _metric_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Known metrics in report order, then any other flat metric under its own name."""
    known = [(key, label) for key, label in METRIC_LABELS.items() if key in summary]
    others = [(key, key) for key, stats in summary.items() if key not in METRIC_LABELS and _is_summary(stats)]
    return known + others


def _mean_std_cell(stats: MetricSummary, fmt: str, total_splits: int) -> str:
    cell = f"{stats['mean']:{fmt}} ± {stats['std']:{fmt}}"
    return cell if stats["splits"] == total_splits else f"{cell} ({stats['splits']} of {total_splits} splits)"


def _cell(value: Any, fmt: str) -> str:
    return MISSING_CELL if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{fmt}}"


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI, format="png")
    return path
