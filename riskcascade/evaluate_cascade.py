"""``riskcascade eval --cascade``: does the reasoner add anything on the cases the fast model escalates?

On a held-out period of the synthetic data, every event is scored by the fast model (the ONNX model in
``model.dir``, in-process) on its time-true features: the entity state replayed through every earlier event and
every label that had arrived by then, exactly what the live platform computes. The events inside the escalation
band are the escalated cases; each is reviewed, in time order, by the reasoning service as served
(services/reasoning/service.py: the case memory built by ``index``, the policy library, the workflow and the
configured LLM backend), with no deadline pressure (``evaluation.review_budget_ms``). The case memory holds every case
with the time its label arrived, and the agents retrieve only cases whose label was known before the reviewed event: the
feedback production would have had by then, with the generator's label delays. On those cases we compare:
- average precision of the fast score alone,
- average precision of the cascade's score (the merge rule: ``merge.fast_weight`` × fast + the rest × reasoner),
- average precision of the reasoner's score alone,
and report the actions the cascade took (block precision, share sent to people), fallbacks, and seconds per case.
The figures land in ``report.md`` and ``report.json``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score
from tqdm import tqdm

from riskcascade.core.config import Settings
from riskcascade.core.domain import Action, FastScore, ReasonerVerdict, ReasoningRequest, reasoner_fell_back
from riskcascade.core.merge import MergeRules, merge
from riskcascade.core.model_card import load_model_card
from riskcascade.core.model_registry import live_model_dir
from riskcascade.core.policy import EscalationPolicy, Route, escalation_policy
from riskcascade.modelling.datasets import read_split_events
from riskcascade.modelling.synthetic import LabelledEvent, to_risk_event


@dataclass(frozen=True)
class CascadeEvaluation:
    report: str
    figures: dict[str, Any]
    files: tuple[Path, ...]


def _ap(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(average_precision_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


@dataclass(frozen=True)
class Review:
    """One offline review: the verdict, and the wall and process CPU time it took."""

    verdict: ReasonerVerdict
    wall_s: float
    cpu_s: float


def review_each(settings: Settings, cases: Sequence[tuple[LabelledEvent, FastScore]], budget_ms: float, desc: str,
                progress: bool = True) -> list[Review]:
    """Review each (event, fast score) once, in order, with the reasoning service as it is served (retrieval
    bounded by label arrival), one case at a time on its own event loop."""
    from services.reasoning.service import open_reasoning_service

    service = open_reasoning_service(settings)
    reviews: list[Review] = []
    try:
        loop = asyncio.new_event_loop()
        try:
            for event, fast in tqdm(cases, desc=desc, unit="case", disable=not progress):
                wall, cpu = time.perf_counter(), time.process_time()
                verdict = loop.run_until_complete(service.review(ReasoningRequest(to_risk_event(event), fast,
                                                                                  budget_ms)))
                reviews.append(Review(verdict, time.perf_counter() - wall, time.process_time() - cpu))
        finally:
            loop.close()
    finally:
        service.close()
    return reviews


def offline_scores(model, x: np.ndarray, batch: int) -> list[FastScore]:  # noqa: ANN001 - a FastModel
    """Fast scores of model-input rows, ``batch`` rows per ONNX run (offline: memory stays bounded)."""
    return [s for start in range(0, len(x), batch) for s in model.score_matrix(x[start : start + batch])]


def run_cascade_evaluation(
    settings: Settings, out_dir: Path, split: str = "test", limit: int | None = None,
    progress: bool = True,
) -> CascadeEvaluation:
    from services.scorer.fast_model import FastModel

    budget_ms = settings.evaluation.review_budget_ms
    parts = read_split_events(settings.data.dir)
    events = parts[split]
    model_dir = live_model_dir(settings.model.dir)
    card = load_model_card(model_dir)
    band = escalation_policy(settings.escalation, card.thresholds.band_low, card.thresholds.band_high)
    model = FastModel(model_dir, threads=settings.model.onnx_threads, reason_count=settings.model.reason_count,
                      prefer_gpu=False, embedding_dir=settings.retrieval.embedding_dir)
    x, texts = time_true_inputs(model_dir, parts, split), time_true_texts(parts, split)
    fast = []
    batch = settings.evaluation.scoring_batch_size
    for start in range(0, len(events), batch):
        fast += model.score_matrix(model.model_input(x[start : start + batch], texts[start : start + batch]))
    # Offline, one case at a time with the whole budget: only the band decides what is escalated.
    routes = [band.route(f.score, budget_ms, 0) for f in fast]
    escalated = [i for i, r in enumerate(routes) if r.route is Route.ESCALATE]
    n_escalated = len(escalated)
    if limit is not None and limit < len(escalated):
        # A stratified-free, deterministic subsample: every k-th escalated case in file order.
        step = len(escalated) / limit
        escalated = [escalated[int(k * step)] for k in range(limit)]
    rules = MergeRules.from_settings(settings.merge)
    reviews = review_each(settings, [(events[i], fast[i]) for i in escalated], budget_ms,
                          f"reviewing escalated cases ({settings.llm.backend})", progress)
    rows: list[dict[str, Any]] = []
    for i, review in zip(escalated, reviews):
        e, f, verdict = events[i], fast[i], review.verdict
        merged = merge(rules, f, routes[i], verdict)
        rows.append({
            "case_id": e.case_id, "label": e.label, "risk_type": e.risk_type, "fast": f.score,
            "reasoner": verdict.score, "cascade": merged.risk_score, "action": merged.action.value,
            "fallback": reasoner_fell_back(verdict.reasons),
            "downgraded": any(r.code == "REFLECTION" and r.description.startswith("downgraded")
                              for r in verdict.reasons),
            "seconds": review.wall_s,
        })
    figures = _figures(rows, settings, split, len(events), n_escalated, band)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _report(figures)
    (out_dir / "report.md").write_text(report + "\n")
    (out_dir / "report.json").write_text(json.dumps({"figures": figures, "cases": rows}, indent=1))
    return CascadeEvaluation(report, figures, (out_dir / "report.md", out_dir / "report.json"))


def time_true_inputs(model_dir: Path, parts: dict[str, list], split: str) -> np.ndarray:
    """The pre-anomaly model input of ``split``'s events (in file order) as the live platform computes it: state
    features by replaying every split's events and label arrivals in time order (a transductive model: its own
    layout's serving path)."""
    from riskcascade.core.domain import EVENT_TYPE_ATTRIBUTE
    from riskcascade.core.features import FeatureLayout
    from riskcascade.core.state_replay import replay_features
    from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
    from riskcascade.modelling.layout_fitting import timeline_of

    layout = FeatureLayout.load(model_dir)
    dataset = synthetic_dataset(parts)
    rows = np.flatnonzero(dataset.splits[0] == split) if dataset.splits else np.arange(len(dataset))
    attributes = [{EVENT_TYPE_ATTRIBUTE: v} for v in dataset.categorical[EVENT_TYPE_ATTRIBUTE][rows]]
    entities = [{link: dataset.links[link][i] for link in layout.links} for i in rows]
    state = None
    if layout.state is not None:
        state = replay_features(layout.state, timeline_of(dataset))[rows]
    return layout.transform(dataset.numeric[rows], attributes, entities, state)


def time_true_texts(parts: dict[str, list], split: str) -> list[dict[str, str]]:
    """The free-text map of ``split``'s events, in the order of ``time_true_inputs``' rows (what a text model reads)."""
    from riskcascade.modelling.synthetic import event_text

    return [event_text(e) for e in parts[split]]


def _figures(rows: list[dict[str, Any]], settings: Settings, split: str, n_events: int, n_escalated: int,
             band: EscalationPolicy) -> dict[str, Any]:
    labels = np.array([r["label"] for r in rows], dtype=int)
    actions = Counter(r["action"] for r in rows)
    blocked = [r for r in rows if r["action"] == Action.BLOCK.value]
    approved = [r for r in rows if r["action"] == Action.APPROVE.value]
    seconds = np.array([r["seconds"] for r in rows]) if rows else np.zeros(1)
    return {
        "split": split,
        "protocol": "time-ordered replay: features from the entity state before each event; retrieval sees only "
                    "labels that had arrived (generator label delays)",
        "backend": settings.llm.backend,
        "events": n_events,
        "band": [band.band_low, band.band_high],
        "escalated_cases": n_escalated,
        "reviewed_cases": len(rows),
        "fraud_share": float(labels.mean()) if rows else 0.0,
        "ap_fast": _ap(labels, np.array([r["fast"] for r in rows])),
        "ap_cascade": _ap(labels, np.array([r["cascade"] for r in rows])),
        "ap_reasoner": _ap(labels, np.array([r["reasoner"] for r in rows])),
        "actions": dict(actions),
        "block_precision": float(np.mean([r["label"] for r in blocked])) if blocked else float("nan"),
        "approve_fraud_share": float(np.mean([r["label"] for r in approved])) if approved else float("nan"),
        "fallbacks": sum(r["fallback"] for r in rows),
        "reflection_downgrades": sum(r["downgraded"] for r in rows),
        "seconds_per_case_mean": float(seconds.mean()),
        "seconds_per_case_p50": float(np.percentile(seconds, 50)),
        "seconds_per_case_p95": float(np.percentile(seconds, 95)),
    }


def _report(f: dict[str, Any]) -> str:
    acts = ", ".join(f"{k} {v}" for k, v in sorted(f["actions"].items()))
    return "\n".join([
        f"# Cascade on escalated cases ({f['split']} split, backend {f['backend']})",
        "",
        f"Protocol: {f['protocol']}.",
        "",
        f"{f['escalated_cases']} of {f['events']} events escalated (band [{f['band'][0]:.3f}, {f['band'][1]:.3f})); "
        f"{f['reviewed_cases']} reviewed by the reasoner, {f['fraud_share']:.1%} of them fraud.",
        "",
        "| score on escalated cases | average precision |",
        "|---|---|",
        f"| fast model alone | {f['ap_fast']:.3f} |",
        f"| cascade (merged) | {f['ap_cascade']:.3f} |",
        f"| reasoner alone | {f['ap_reasoner']:.3f} |",
        "",
        f"Actions: {acts}; block precision {f['block_precision']:.3f}; fraud among approvals "
        f"{f['approve_fraud_share']:.3f}; fallbacks {f['fallbacks']}; reflection downgrades "
        f"{f['reflection_downgrades']}.",
        f"Seconds per case: mean {f['seconds_per_case_mean']:.3f}, p50 {f['seconds_per_case_p50']:.3f}, "
        f"p95 {f['seconds_per_case_p95']:.3f}.",
    ])
