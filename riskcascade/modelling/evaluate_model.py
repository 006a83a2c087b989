"""``riskcascade eval``: train the fast model on each split of a data set and report how good it is.

The splits are the data set's fixed split columns; without them, ``training.split_rule`` chooses
(``riskcascade.modelling.datasets.splits.choose_split``): one time-ordered split when the data set has a time column (it
is the same every time, so ``repeats`` > 1 is refused), else ``repeats`` stratified splits drawn with consecutive seeds.
Each split gets the whole pipeline: features, anomaly score, LightGBM, calibration, band, ONNX parity. The test part
of each split is scored (labelled rows only); the report names each split, says which protocol ran (how rows were
split, whether features were built by replay in time order or transductively over a static graph, when labels count
as known), and gives every metric per split and as mean ± std, with a calibration plot and a score histogram (PNG)
over the pooled test scores.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riskcascade.core.config import Settings, TrainingSettings
from riskcascade.core.features import TIME_TRUE, TRANSDUCTIVE
from riskcascade.modelling.datasets.format import Dataset
from riskcascade.modelling.datasets.splits import SplitChoice, choose_split, is_time_ordered
from riskcascade.modelling.evaluation import (
    format_report,
    plot_calibration,
    plot_score_histogram,
    split_names,
    summarise,
)
from riskcascade.modelling.training import fit_fast_model

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CALIBRATION_PNG = "calibration.png"
HISTOGRAM_PNG = "score-histogram.png"
FEATURES_BY_REPLAY = TIME_TRUE  # features of each event from earlier events only (and labels arrived by then)
FEATURES_TRANSDUCTIVE = TRANSDUCTIVE  # features over the whole static graph


class EvaluationSetupError(ValueError):
    """The evaluation cannot run as asked; raised before any training, with what to change."""


@dataclass
class EvaluationResult:
    per_split: list[dict[str, Any]]
    summary: dict[str, Any]
    report: str
    files: list[Path]


def evaluation_splits(dataset: Dataset, training: TrainingSettings, seed: int, repeats: int = 1) -> list[SplitChoice]:
    """The splits ``run_evaluation`` trains on (stratified ones drawn with ``seed``, ``seed + 1``, ...).

    EvaluationSetupError when ``repeats`` cannot apply (fixed split columns, or a time split, which is the same
    every time) or when no usable split can be chosen (split rule "time" without a time column, a part without both
    labels).
    """
    if repeats < 1:
        raise EvaluationSetupError("repeats must be at least 1")
    if dataset.splits and repeats > 1:
        raise EvaluationSetupError(
            f"the data set brings its own split columns ({', '.join(dataset.spec.split_columns)}); --repeats draws "
            "new splits and cannot be used with them"
        )
    count = len(dataset.splits) or repeats
    choices: list[SplitChoice] = []
    for index in range(count):
        try:
            choice = choose_split(dataset, index, training.split_rule, training.valid_share, training.test_share,
                                  seed + (0 if dataset.splits else index))
        except ValueError as exc:
            raise EvaluationSetupError(str(exc)) from None
        if choice.protocol == "time" and repeats > 1:
            raise EvaluationSetupError(
                f"data set {dataset.spec.name!r} is split by its time column ({dataset.spec.time_column}, "
                f"training.split_rule: {training.split_rule}); a time split is deterministic, so --repeats would "
                "train the same split again: leave --repeats at 1, or set training.split_rule: stratified"
            )
        choices.append(choice)
    return choices


def describe_protocol(dataset: Dataset, choices: list[SplitChoice], features: str | None = None) -> str:
    """One sentence for the report: how rows were split, how features were built, when labels count as known.

    ``features`` is what training says it did (``metrics["feature_protocol"]``: FEATURES_BY_REPLAY or
    FEATURES_TRANSDUCTIVE); without it, features are taken to be built by replay when the data set has times and
    transductively when it is a static graph.
    """
    features = features or _assumed_features(dataset)
    protocol = choices[0].protocol
    if protocol == "fixed":
        names = ", ".join(c.name for c in choices)
        split = f"fixed split column{'s' if len(choices) > 1 else ''} {names}"
        if all(is_time_ordered(dataset, c.split) for c in choices):
            split += f" (time-ordered by {dataset.spec.time_column}: train, then valid, then test)"
    elif protocol == "time":
        split = f"time-ordered {choices[0].name.removeprefix('time ')} split by {dataset.spec.time_column}"
    else:
        split = f"stratified random split{'s' if len(choices) > 1 else ''} ({', '.join(c.name for c in choices)})"
    if features == FEATURES_BY_REPLAY:
        built = "features by replay (each event sees only what came before it)"
    elif features == FEATURES_TRANSDUCTIVE:
        built = "transductive graph features" + (" (no time column)" if dataset.times is None else "")
    else:
        built = f"features: {features}"
    parts = [split, built]
    if dataset.spec.label_timing:
        parts.append(dataset.spec.label_timing)
    unlabelled = int((~dataset.labelled).sum())
    if unlabelled:
        parts.append(f"{unlabelled} unlabelled rows feed features, not the loss or the metrics")
    return "; ".join(parts) + "."


def run_evaluation(
    dataset: Dataset, settings: Settings, out_dir: Path, repeats: int = 1, progress: bool = True
) -> EvaluationResult:
    """Train and score every split ``evaluation_splits`` chooses; write the report, its JSON and the plots."""
    choices = evaluation_splits(dataset, settings.training, settings.data.seed, repeats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_split, scores, labels, bands = [], [], [], []
    features: str | None = None
    for index, choice in enumerate(choices):
        seed = settings.data.seed + (0 if dataset.splits else index)
        started = time.monotonic()
        model = fit_fast_model(dataset, choice.split, settings.training, seed, progress=progress,
                               state=settings.state, embedding_dir=settings.retrieval.embedding_dir)
        reported = model.metrics.get("feature_protocol")  # training's own word on how it built the features
        features = features or (reported if isinstance(reported, str) else None)
        per_split.append({
            **model.metrics,
            "split": choice.name,
            "band_low": model.band[0],
            "band_high": model.band[1],
            "onnx_parity_max_abs_diff": model.parity,
            "features": len(model.feature_names),
            "trees": model.training["best_iteration"],
            "seconds": round(time.monotonic() - started, 1),
        })
        scores.append(model.test_scores)
        labels.append(model.test_labels)
        bands.append(model.band)
    summary = summarise(per_split)
    features = features or _assumed_features(dataset)
    protocol = describe_protocol(dataset, choices, features)
    report = format_report(summary, per_split, dataset.spec.name, protocol=protocol)
    band = bands[0] if len(bands) == 1 else None
    files = [
        plot_calibration(scores, labels, out_dir / CALIBRATION_PNG, title=f"{dataset.spec.name}: calibration",
                         split_labels=split_names(per_split)),
        plot_score_histogram(scores, labels, out_dir / HISTOGRAM_PNG, band=band,
                             title=f"{dataset.spec.name}: test scores"),
    ]
    body = {
        "dataset": dataset.spec.name,
        "rows": len(dataset),
        "labelled_rows": int(dataset.labelled.sum()),
        "protocol": {
            "split": choices[0].protocol,
            "splits": [c.name for c in choices],
            "features": features,
            "labels_known": dataset.spec.label_timing,
            "text": protocol,
        },
        "training": settings.training.model_dump(mode="json"),
        "per_split": per_split,
        "summary": summary,
    }
    (out_dir / REPORT_JSON).write_text(json.dumps(body, indent=2, default=float))
    (out_dir / REPORT_MD).write_text(report + "\n")
    files += [out_dir / REPORT_JSON, out_dir / REPORT_MD]
    return EvaluationResult(per_split=per_split, summary=summary, report=report, files=files)


def _assumed_features(dataset: Dataset) -> str:
    """How training builds features when it does not say: by replay over timed data, transductively otherwise."""
    return FEATURES_BY_REPLAY if dataset.times is not None else FEATURES_TRANSDUCTIVE

