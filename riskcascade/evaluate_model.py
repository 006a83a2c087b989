"""``riskcascade eval``: train the fast model on each split of a data set and report how good it is.

Each fixed split of the data set (or, without fixed splits, ``repeats`` stratified splits drawn with consecutive
seeds) gets the whole pipeline: features, anomaly score, LightGBM, calibration, band, ONNX parity. The test part of
each split is scored; the report gives every metric per split and as mean ± std, with a calibration plot and a
score histogram (PNG) over the pooled test scores.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from riskcascade.config import Settings
from riskcascade.datasets.format import Dataset
from riskcascade.evaluation import format_report, plot_calibration, plot_score_histogram, summarise
from riskcascade.training import fit_fast_model, split_of

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CALIBRATION_PNG = "calibration.png"
HISTOGRAM_PNG = "score-histogram.png"


@dataclass
class EvaluationResult:
    per_split: list[dict[str, Any]]
    summary: dict[str, Any]
    report: str
    files: list[Path]


def run_evaluation(
    dataset: Dataset, settings: Settings, out_dir: Path, repeats: int = 1, progress: bool = True
) -> EvaluationResult:
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(dataset.splits) if dataset.splits else repeats
    per_split, scores, labels, bands = [], [], [], []
    for index in range(count):
        seed = settings.data.seed + (0 if dataset.splits else index)
        started = time.monotonic()
        model = fit_fast_model(dataset, split_of(dataset, index, settings.training, seed), settings.training, seed,
                               progress=progress)
        per_split.append({
            **model.metrics,
            "split": dataset.spec.split_columns[index] if dataset.splits else f"stratified seed {seed}",
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
    report = format_report(summary, per_split, dataset.spec.name)
    band = bands[0] if len(bands) == 1 else None
    files = [
        plot_calibration(scores, labels, out_dir / CALIBRATION_PNG, title=f"{dataset.spec.name}: calibration"),
        plot_score_histogram(scores, labels, out_dir / HISTOGRAM_PNG, band=band,
                             title=f"{dataset.spec.name}: test scores"),
    ]
    body = {"dataset": dataset.spec.name, "rows": len(dataset), "training": settings.training.model_dump(mode="json"),
            "per_split": per_split, "summary": summary}
    (out_dir / REPORT_JSON).write_text(json.dumps(body, indent=2, default=float))
    (out_dir / REPORT_MD).write_text(report + "\n")
    files += [out_dir / REPORT_JSON, out_dir / REPORT_MD]
    return EvaluationResult(per_split=per_split, summary=summary, report=report, files=files)
