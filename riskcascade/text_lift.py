"""``riskcascade text-lift``: what the text model adds to the fast model, measured on one split with everything else
equal.

The fast model is trained twice on the same data set, split and seed: without the text model
(``training.text_model.enabled`` off) and with it. Both are scored on the same test rows; the report gives each
one's ranking, operating-point and band figures, the difference with a paired bootstrap interval over the test rows,
the same figures on the events the model without text leaves uncertain (its escalation band: where the numbers do
not decide), and the text model alone. Protocol: the training pipeline's own (entity features by replay in time
order; the text column point in time, ``riskcascade.modelling.text_model``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from riskcascade.core.config import Settings
from riskcascade.modelling.datasets.format import Dataset
from riskcascade.modelling.evaluation import RISK_TYPE_RECALL
from riskcascade.modelling.text_model import represent, shared_encoder
from riskcascade.modelling.training import TrainedModel, dataset_texts, fit_fast_model, split_of
from riskcascade.report_paths import shown_path

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
FIGURES = (  # (key in the model's test metrics, label)
    ("roc_auc", "ROC AUC"),
    ("average_precision", "Average precision"),
    ("recall_at_1pct_fpr", "Recall at 1% FPR"),
    ("escalation_share", "Escalated share (band)"),
    ("fraud_share_of_approved", "Fraud share of approved"),
    ("legit_share_of_blocked", "Legitimate share of blocked"),
    ("cost_per_event", "Band cost per event"),
)


class TextLiftError(ValueError):
    """The comparison cannot run on this data set (no free text in the configured fields)."""


def _paired_bootstrap(labels: np.ndarray, a: np.ndarray, b: np.ndarray, rounds: int, seed: int
                      ) -> tuple[float, float]:
    """95% interval of AP(b) - AP(a) over test rows resampled with replacement (both models on the same rows)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(rounds):
        rows = rng.integers(0, len(labels), len(labels))
        if labels[rows].min() == labels[rows].max():
            continue
        diffs.append(average_precision_score(labels[rows], b[rows]) - average_precision_score(labels[rows], a[rows]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def _ranking(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    ok = ~np.isnan(scores)
    if labels[ok].min() == labels[ok].max():
        return {"n": int(ok.sum())}
    return {"n": int(ok.sum()), "fraud_rate": float(labels[ok].mean()),
            "roc_auc": float(roc_auc_score(labels[ok], scores[ok])),
            "average_precision": float(average_precision_score(labels[ok], scores[ok]))}


def compare(settings: Settings, dataset: Dataset, bootstrap_rounds: int, progress: bool = False) -> dict[str, Any]:
    """Both models on one split, and the figures of the report (``run_text_lift``)."""
    fields = settings.training.text_model.fields
    texts = dataset_texts(dataset, fields)
    if texts is None:
        raise TextLiftError(f"data set {dataset.spec.name} has no free text in {', '.join(fields)} "
                            "(training.text_model.fields)")
    seed = settings.data.seed
    split = split_of(dataset, 0, settings.training, seed)
    models: dict[str, TrainedModel] = {}
    seconds: dict[str, float] = {}
    for name, enabled in (("without text", False), ("with text", True)):  # with text: kept whatever validation says
        config = settings.training.model_copy(update={"text_model": settings.training.text_model.model_copy(
            update={"enabled": enabled, "keep": "always"})})
        started = time.perf_counter()
        models[name] = fit_fast_model(dataset, split, config, seed, progress=progress, state=settings.state,
                                      drift_bins=settings.drift.bins, embedding_dir=settings.retrieval.embedding_dir)
        seconds[name] = time.perf_counter() - started
    base, text = models["without text"], models["with text"]
    if text.text_head is None:
        raise TextLiftError("the text model was not fitted: too few labelled texts of a class "
                            "(training.text_model.min_class_labels)")
    if not np.array_equal(base.test_labels, text.test_labels):
        raise RuntimeError("the two models were scored on different test rows")
    labels = base.test_labels
    test_rows = np.flatnonzero((split == "test") & (dataset.labels >= 0))
    encoder = shared_encoder(Path(settings.retrieval.embedding_dir).resolve())
    test_texts = [texts[i] for i in test_rows]
    alone = np.full(len(test_rows), np.nan)
    has_text = np.array([any(t) for t in test_texts])
    alone[has_text] = text.text_head.probability(represent(encoder, [t for t in test_texts if any(t)]))
    low, high = base.band
    uncertain = (base.test_scores >= low) & (base.test_scores < high)
    figures = {name: {key: float(m.metrics[key]) for key, _ in FIGURES} for name, m in models.items()}
    return {
        "data": {"dataset": dataset.spec.name, "rows": len(dataset), "test_rows": int(len(labels)),
                 "test_fraud_rate": float(labels.mean()), "seed": seed,
                 "feature_protocol": base.metrics["feature_protocol"]},
        "text_fields": list(fields),
        "text_model": text.text_head.training,
        "figures": figures,
        "recall_by_risk_type": {name: m.metrics.get(RISK_TYPE_RECALL, {}) for name, m in models.items()},
        "average_precision_difference_95": _paired_bootstrap(labels, base.test_scores, text.test_scores,
                                                             bootstrap_rounds, seed),
        "bootstrap_rounds": bootstrap_rounds,
        "uncertain_without_text": {
            "band": [low, high], "events": int(uncertain.sum()),
            "without text": _ranking(labels[uncertain], base.test_scores[uncertain]),
            "with text": _ranking(labels[uncertain], text.test_scores[uncertain]),
            "text model alone": _ranking(labels[uncertain], alone[uncertain]),
        },
        "text_model_alone": _ranking(labels, alone),
        "training_seconds": seconds,
        "text_stage_seconds": text.training["stage_seconds"].get("text"),
    }


def run_text_lift(settings: Settings, dataset: Dataset, source: dict[str, Any], out_dir: Path, command: str,
                  bootstrap_rounds: int, progress: bool = False) -> dict[str, Any]:
    """Train with and without the text model, write ``report.json`` and ``report.md`` into ``out_dir``."""
    report = {"command": command, "source": source, **compare(settings, dataset, bootstrap_rounds, progress),
              "embedding_dir": shown_path(settings.retrieval.embedding_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=1))
    (out_dir / REPORT_MD).write_text(format_text_lift(report))
    return report


def _f(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def format_text_lift(r: dict[str, Any]) -> str:
    d, u = r["data"], r["uncertain_without_text"]
    low, high = r["average_precision_difference_95"]
    lines = [
        "# What the text model adds to the fast model",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Data: {d['dataset']} ({d['rows']:,} events), test period {d['test_rows']:,} labelled events, fraud rate "
        f"{d['test_fraud_rate']:.3f}, seed {d['seed']}. Protocol: the same split, seed and training pipeline for both "
        "models (the text model kept whatever validation says: `training.text_model.keep` is set to always here); "
        f"entity features {d['feature_protocol']} (replayed in time order); the text column point in time: "
        f"{r['text_model']['protocol']}.",
        "",
        f"Text read: {', '.join(r['text_fields'])} (each field's all-MiniLM-L6-v2 ONNX sentence embedding, side by "
        "side; a logistic head fitted "
        f"on {r['text_model']['fitted_on_labels']:,} labelled events with text, {r['text_model']['fraud_labels']:,} "
        "of them fraud; distinct texts per field: "
        + ", ".join(f"{f} {n:,}" for f, n in r['text_model']['distinct_texts'].items()) + ").",
        "",
        "| test period | without text | with text |",
        "|---|---|---|",
    ]
    for key, label in FIGURES:
        lines.append(f"| {label} | {_f(r['figures']['without text'][key])} | {_f(r['figures']['with text'][key])} |")
    lines += [
        "",
        f"Average precision, with text minus without: 95% interval [{low:+.4f}, {high:+.4f}] (paired bootstrap over "
        f"the test events, {r['bootstrap_rounds']} rounds). Each model's band is its own (the training's rule on its "
        "validation scores).",
        "",
        f"Where the numbers do not decide: the {u['events']:,} test events inside the band of the model without text "
        f"[{u['band'][0]:.3f}, {u['band'][1]:.3f}):",
        "",
        "| uncertain events | ROC AUC | Average precision |",
        "|---|---|---|",
    ]
    for name in ("without text", "with text", "text model alone"):
        lines.append(f"| {name} | {_f(u[name].get('roc_auc'))} | {_f(u[name].get('average_precision'))} |")
    alone = r["text_model_alone"]
    lines += [
        "",
        f"The text model alone on every test event with text ({alone['n']:,}): ROC AUC {_f(alone.get('roc_auc'))}, "
        f"average precision {_f(alone.get('average_precision'))}.",
        "",
        "Recall at the global 1%-FPR threshold, per risk type:",
        "",
        "| risk type | without text | with text |",
        "|---|---|---|",
    ]
    by_type = r["recall_by_risk_type"]
    for risk_type in sorted(by_type["without text"]):
        lines.append(f"| {risk_type} | {_f(by_type['without text'][risk_type])} | "
                     f"{_f(by_type['with text'].get(risk_type))} |")
    lines += [
        "",
        f"Training took {r['training_seconds']['without text']:.0f} s without text and "
        f"{r['training_seconds']['with text']:.0f} s with it ({r['text_stage_seconds']:.0f} s of it the text model: "
        "embedding the distinct texts and fitting the heads).",
        "",
    ]
    return "\n".join(lines)
