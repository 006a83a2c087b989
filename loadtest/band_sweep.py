"""Band sweep: share escalated, average precision and cost per 1,000 decisions of the cascade, band by band.

    python -m loadtest.band_sweep [--config FILE] [--events 6000] [--out-dir loadtest/results]
                                  [--platform-cpu-ms-per-decision MS | --bench-results FILE [--bench-label TEXT]]

What it measures, on the configured data (``data.dir``), model (``model.dir``) and case memory (``retrieval``):

1. Fast scores, time-true: the held-out (test) events' features by replay of every earlier event and every label
   that had arrived (``riskcascade.evaluate_cascade.time_true_inputs``, what ``riskcascade eval --cascade`` and the
   load benchmark use), scored by the ONNX model in-process, one event at a time as a lone request is served.
   The validation split is scored the same way (in batches), for the band edges only.
2. The reasoner once per event on a fixed subset: the first ``--events`` test events in time order, each reviewed
   as ``eval --cascade`` reviews an escalated case (the reasoning service as served, retrieval bounded by label
   arrival, the fast score as its prior, no deadline pressure), and merged with its fast score by the merge rules
   (riskcascade/core/merge.py) into the cascade's score. Since neither the verdict nor the merge depends on the band,
   one review per event serves every band.
3. Stage costs: CPU-seconds per call by ``time.process_time`` (all threads of this process, so the reasoner's
   worker threads count) around each review and each lone fast scoring; the entity-state features' CPU as the
   replay's CPU per event folded. LLM tokens: 0 for the embedded evidence backend (no language model runs);
   the verdict carries no token usage for the other backends, so their cost leaves tokens out and says so.
   ``--platform-cpu-ms-per-decision`` (or a load benchmark's ``cpu_ms_per_decision`` via ``--bench-results``)
   replaces the fast path's model-only CPU with the platform's (orchestrator and scorer processes).
4. A grid of bands by escalated share, chosen on the validation split (``riskcascade.core.thresholds.band_by_share``,
   the rule that chose the default band), so nothing is tuned on test: 0%, 2%, 5%, 8%, the configured band, 20%,
   30%, 50%, 100%. Per band, on the subset: share escalated, average precision of the cascade score (escalated
   events: the merged score; the others: the fast score), of the fast score alone, and USD per 1,000 decisions
   (loadtest/cost.py, prices from the config's ``pricing``).

Writes loadtest/results/band-sweep-<UTC time>.json (every figure and per-event scores), .md (table, the three named
points, the goal check, the command, data range and protocol) and .png (cost against average precision).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.cost import (
    ALL_ESCALATED,
    AT_BAND,
    FAST_ONLY,
    StageCosts,
    cost_per_1000,
    named_points,
    read_platform_cpu_ms_per_decision,
)
from riskcascade.core.config import PricingSettings
from riskcascade.core.model_registry import live_model_dir
from riskcascade.report_paths import shown_path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "loadtest" / "results"
DEFAULT_EVENTS = 6000  # ~5 min of reviews on a busy 2-core machine (~45 ms of CPU each with the evidence backend)
GRID_SHARES = (0.0, 0.02, 0.05, 0.08, 0.20, 0.30, 0.50, 1.0)  # validation shares around the configured band
DEFAULT_BAND = "default"
GOAL_COST_RATIO = 0.1  # the goal: the default band at most a tenth of everything escalated's cost ...
GOAL_AP_RATIO = 0.97  # ... keeping at least 97% of its average precision
EVIDENCE_BACKEND = "evidence"  # the embedded reasoner: no language model, no tokens
PROTOCOL = ("time-true replay: each event's features from the entity state before it, labels counted from their "
            "arrival; the reasoner's retrieval sees only cases whose label had arrived by the event's time "
            "(as riskcascade eval --cascade); band edges from validation scores, figures on the test split")


@dataclass(frozen=True)
class BandSpec:
    """A band [low, high) and the share of validation events it escalates; ``high`` is inf for everything."""

    name: str
    low: float
    high: float
    validation_share: float


@dataclass(frozen=True)
class BandPoint:
    name: str
    low: float
    high: float
    validation_share: float
    escalated_share: float  # on the measured subset
    ap_cascade: float
    ap_fast: float
    usd_per_1000: float


# --- The pure part: no platform, testable on small arrays -------------------------------------------------------


def escalated(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """Which scores the band [low, high) escalates (the escalation policy's rule)."""
    scores = np.asarray(scores, dtype=np.float64)
    return (scores >= low) & (scores < high)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, NaN when only one class is present (it is undefined then)."""
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels)
    return float(average_precision_score(labels, scores)) if 0 < labels.sum() < len(labels) else math.nan


def band_grid(validation_scores: np.ndarray, shares: Sequence[float], default: tuple[float, float],
              centre: float) -> list[BandSpec]:
    """The bands escalating each of ``shares`` of the validation scores (0: none, 1: every one; between:
    ``band_by_share``, symmetric about ``centre`` as the share rule is) plus the configured band, by share."""
    from riskcascade.core.thresholds import band_by_share

    bands = []
    for share in shares:
        if share <= 0.0:
            low, high = centre, centre
        elif share >= 1.0:
            low, high = 0.0, math.inf
        else:
            low, high = band_by_share(validation_scores, share, centre)
        bands.append(BandSpec(f"{share:.0%}", low, high, float(escalated(validation_scores, low, high).mean())))
    low, high = default
    bands.append(BandSpec(DEFAULT_BAND, low, high, float(escalated(validation_scores, low, high).mean())))
    return sorted(bands, key=lambda b: (b.validation_share, b.name != DEFAULT_BAND))


def sweep_bands(fast: np.ndarray, merged: np.ndarray, labels: np.ndarray, bands: Sequence[BandSpec],
                costs: StageCosts, pricing: PricingSettings) -> list[BandPoint]:
    """Each band on one set of events: ``fast`` their fast scores, ``merged`` the cascade's score had each been
    escalated (the merge of its fast score and its reasoner verdict), ``labels`` the truth."""
    fast, merged, labels = np.asarray(fast, float), np.asarray(merged, float), np.asarray(labels, int)
    if not fast.shape == merged.shape == labels.shape or fast.ndim != 1 or len(fast) == 0:
        raise ValueError(f"fast, merged and labels must be non-empty 1-d arrays of one length, got "
                         f"{fast.shape}, {merged.shape}, {labels.shape}")
    ap_fast = average_precision(labels, fast)
    points = []
    for band in bands:
        mask = escalated(fast, band.low, band.high)
        share = float(mask.mean())
        points.append(BandPoint(
            band.name, band.low, band.high, band.validation_share, share,
            average_precision(labels, np.where(mask, merged, fast)), ap_fast, cost_per_1000(costs, share, pricing),
        ))
    return points


def goal_check(points: Sequence[BandPoint], cost_ratio: float = GOAL_COST_RATIO,
               ap_ratio: float = GOAL_AP_RATIO) -> dict[str, Any]:
    """The default band against everything escalated (the band escalating every event on the subset)."""
    default = next(p for p in points if p.name == DEFAULT_BAND)
    everything = max(points, key=lambda p: (p.escalated_share, p.name != DEFAULT_BAND))
    if everything.escalated_share < 1.0:
        raise ValueError("the grid has no band escalating every event")
    costs = default.usd_per_1000 / everything.usd_per_1000 if everything.usd_per_1000 > 0 else math.nan
    quality = default.ap_cascade / everything.ap_cascade if everything.ap_cascade > 0 else math.nan
    return {
        "cost_ratio": costs, "cost_ratio_goal": cost_ratio, "cost_met": bool(costs <= cost_ratio),
        "ap_ratio": quality, "ap_ratio_goal": ap_ratio, "ap_met": bool(quality >= ap_ratio),
        "met": bool(costs <= cost_ratio and quality >= ap_ratio),
    }


# --- Measurement: the platform's parts in-process --------------------------------------------------------------


@dataclass
class Measurement:
    events: list  # the subset, LabelledEvent in time order
    fast: np.ndarray
    merged: np.ndarray
    reasoner: np.ndarray  # the reasoner's own score
    reasoner_cpu_s: np.ndarray  # per review
    reasoner_wall_s: np.ndarray
    fallbacks: int
    validation_scores: np.ndarray
    model_cpu_s_lone: float  # per event scored alone
    model_cpu_s_batched: float  # per event in batches of evaluation.scoring_batch_size (for comparison)
    state_cpu_s_per_event: float  # replay CPU per event folded
    test_events: int
    test_range: tuple[str, str]
    llm_tokens: tuple[float, float] | None  # (input, output) per review, None when the verdict carries none
    model_version: str


def measure(settings, n_events: int, progress: bool = True) -> Measurement:
    from tqdm import tqdm

    from riskcascade.core.domain import reasoner_fell_back
    from riskcascade.core.merge import MergeRules, merge
    from riskcascade.core.policy import Route, RoutingDecision
    from riskcascade.evaluate_cascade import offline_scores, review_each, time_true_inputs, time_true_texts
    from riskcascade.modelling.datasets import read_split_events
    from services.scorer.fast_model import FastModel

    parts = read_split_events(settings.data.dir)
    model_dir = live_model_dir(settings.model.dir)
    model = FastModel(model_dir, threads=settings.model.onnx_threads,
                      reason_count=settings.model.reason_count, prefer_gpu=False,
                      embedding_dir=settings.retrieval.embedding_dir)
    x_valid = model.model_input(time_true_inputs(model_dir, parts, "valid"), time_true_texts(parts, "valid"))
    started = time.process_time()
    batch = settings.evaluation.scoring_batch_size  # validation scoring only (band edges)
    validation = np.array([s.score for s in offline_scores(model, x_valid, batch)])
    model_cpu_batched = (time.process_time() - started) / len(x_valid)
    started = time.process_time()  # the second replay: numba's kernels are compiled by now
    x_test, test_texts = time_true_inputs(model_dir, parts, "test"), time_true_texts(parts, "test")
    state_cpu = (time.process_time() - started) / sum(len(p) for p in parts.values())
    test = parts["test"]
    order = sorted(range(len(test)), key=lambda i: test[i].occurred_at)[:n_events]
    fast, fast_cpu = [], 0.0
    for i in tqdm(order, desc="fast scores (one event at a time)", unit="event", disable=not progress):
        started = time.process_time()
        fast.append(model.score_matrix(model.model_input(x_test[i : i + 1], test_texts[i : i + 1]))[0])
        fast_cpu += time.process_time() - started
    rules = MergeRules.from_settings(settings.merge)
    routing = RoutingDecision(Route.ESCALATE, "band sweep: every event of the subset is reviewed once")
    reviews = review_each(settings, [(test[i], f) for i, f in zip(order, fast)],
                          settings.evaluation.review_budget_ms, f"reviews ({settings.llm.backend})", progress)
    return Measurement(
        events=[test[i] for i in order], fast=np.array([f.score for f in fast]),
        merged=np.array([merge(rules, f, routing, r.verdict).risk_score for f, r in zip(fast, reviews)]),
        reasoner=np.array([r.verdict.score for r in reviews]),
        reasoner_cpu_s=np.array([r.cpu_s for r in reviews]), reasoner_wall_s=np.array([r.wall_s for r in reviews]),
        fallbacks=sum(reasoner_fell_back(r.verdict.reasons) for r in reviews), validation_scores=validation,
        model_cpu_s_lone=fast_cpu / len(order),
        model_cpu_s_batched=model_cpu_batched, state_cpu_s_per_event=state_cpu, test_events=len(test),
        test_range=(min(e.occurred_at for e in test).isoformat(), max(e.occurred_at for e in test).isoformat()),
        llm_tokens=(0.0, 0.0) if settings.llm.backend == EVIDENCE_BACKEND else None,
        model_version=model.info.model_version,
    )


def stage_costs(m: Measurement, platform_cpu_ms: float | None) -> tuple[StageCosts, str]:
    """The measured stage costs and, in words, what the fast path's CPU covers."""
    if platform_cpu_ms is not None:
        fast, source = platform_cpu_ms / 1000.0, "the platform's orchestrator and scorer processes (given)"
    else:
        fast = m.state_cpu_s_per_event + m.model_cpu_s_lone
        source = ("the model's own CPU only (entity-state features by replay + ONNX, anomaly score, calibration and "
                  "TreeSHAP reason codes for a lone event); the orchestrator, gRPC, TLS and Ray hops are not counted")
    tokens_in, tokens_out = m.llm_tokens or (0.0, 0.0)
    return StageCosts(fast, float(m.reasoner_cpu_s.mean()), tokens_in, tokens_out), source


# --- Reporting ---------------------------------------------------------------------------------------------------


def report(m: Measurement, settings, points: Sequence[BandPoint], costs: StageCosts, fast_source: str,
           command: str, started: datetime, seconds: float) -> dict[str, Any]:
    default = next(p for p in points if p.name == DEFAULT_BAND)
    pricing = settings.pricing
    named = {p.name: asdict(p) for p in named_points(costs, default.escalated_share, pricing)}
    labels = np.array([e.label for e in m.events])
    named[FAST_ONLY]["ap"] = default.ap_fast
    named[AT_BAND]["ap"] = default.ap_cascade
    named[ALL_ESCALATED]["ap"] = average_precision(labels, m.merged)
    notes = [f"fast path CPU: {fast_source}"]
    if m.llm_tokens is None:
        notes.append(f"backend {settings.llm.backend}: the verdict carries no token usage, so LLM tokens are left "
                     "out of the cost")
    else:
        notes.append("LLM tokens: 0 per review (the evidence backend runs no language model), so the LLM prices "
                     "do not enter the cost")
    notes.append("reasoner CPU: the reasoning service in this process; the Ray hop to its replica and the "
                 "orchestrator's extra work for an escalated call are not counted")
    return {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}",
        "command": command,
        "protocol": PROTOCOL,
        "backend": settings.llm.backend,
        "data": {
            "dir": shown_path(settings.data.dir), "model_dir": shown_path(settings.model.dir),
            "model_version": m.model_version,
            "case_memory": (shown_path(settings.retrieval.edge_path) if settings.retrieval.backend == "edge"
                            else settings.retrieval.qdrant_url or shown_path(settings.retrieval.qdrant_path)),
            "test_events": m.test_events, "test_range": list(m.test_range),
            "subset": f"the first {len(m.events)} test events in time order",
            "subset_events": len(m.events), "subset_range": [m.events[0].occurred_at.isoformat(),
                                                             m.events[-1].occurred_at.isoformat()],
            "subset_fraud_share": float(labels.mean()), "validation_events": len(m.validation_scores),
        },
        "stage_costs": asdict(costs),
        "measured": {
            "fast_cpu_source": fast_source,
            "model_cpu_ms_lone": m.model_cpu_s_lone * 1e3,
            "model_cpu_ms_batched": m.model_cpu_s_batched * 1e3, "batch": settings.evaluation.scoring_batch_size,
            "state_cpu_ms_per_event": m.state_cpu_s_per_event * 1e3,
            "reasoner_cpu_ms_mean": float(m.reasoner_cpu_s.mean() * 1e3),
            "reasoner_cpu_ms_p50": float(np.percentile(m.reasoner_cpu_s, 50) * 1e3),
            "reasoner_cpu_ms_p95": float(np.percentile(m.reasoner_cpu_s, 95) * 1e3),
            "reasoner_wall_ms_mean": float(m.reasoner_wall_s.mean() * 1e3),
            "reasoner_fallbacks": m.fallbacks,
            "llm_tokens_per_review": list(m.llm_tokens) if m.llm_tokens is not None else None,
            "ap_reasoner_alone": average_precision(labels, m.reasoner),
        },
        "pricing": pricing.model_dump(),
        "bands": [{**asdict(p), "high": None if math.isinf(p.high) else p.high} for p in points],
        "band_high_null": "no upper edge: every event escalated",
        "named_points": named,
        "goal": goal_check(points),
        "notes": notes,
        "events": {
            "case_id": [e.case_id for e in m.events], "label": labels.tolist(),
            "fast": np.round(m.fast, 6).tolist(), "merged": np.round(m.merged, 6).tolist(),
            "reasoner": np.round(m.reasoner, 6).tolist(),
            "reasoner_cpu_ms": np.round(m.reasoner_cpu_s * 1e3, 3).tolist(),
        },
    }


def markdown(r: dict[str, Any]) -> str:
    d, s, g = r["data"], r["measured"], r["goal"]
    everything = r["named_points"][ALL_ESCALATED]
    rows = []
    for b in r["bands"]:
        high = "∞" if b["high"] is None else f"{b['high']:.3f}"
        rows.append(f"| {b['name']} | [{b['low']:.3f}, {high}) | {b['validation_share']:.1%} | "
                    f"{b['escalated_share']:.1%} | {b['ap_cascade']:.4f} | {b['ap_fast']:.4f} | "
                    f"{b['ap_cascade'] / everything['ap']:.1%} | {b['usd_per_1000']:.6f} | "
                    f"{b['usd_per_1000'] / everything['usd_per_1000']:.3f} |")
    named = [f"| {name} | {p['escalated_share']:.1%} | {p['ap']:.4f} | {p['usd_per_1000']:.6f} |"
             for name, p in r["named_points"].items()]
    verdict = "met" if g["met"] else "NOT met"
    c = r["stage_costs"]
    return "\n".join([
        f"# Band sweep: cost against quality of the cascade, {r['started_at']}",
        "",
        f"Command: `{r['command']}` ({r['seconds']:.0f} s on {r['machine']}; backend {r['backend']}).",
        "",
        f"Protocol: {r['protocol']}.",
        "",
        f"Data: {d['subset']} ({d['subset_range'][0]} to {d['subset_range'][1]}; {d['subset_fraud_share']:.1%} "
        f"fraud) of {d['test_events']} test events ({d['test_range'][0]} to {d['test_range'][1]}); band edges from "
        f"{d['validation_events']} validation events. Each subset event reviewed once by the reasoner; "
        f"{s['reasoner_fallbacks']} fallbacks. Data {d['dir']}, model {d['model_dir']} ({d['model_version']}), "
        f"case memory {d['case_memory']}.",
        "",
        "| band | [low, high) | share (validation) | share escalated | AP cascade | AP fast | AP / all escalated "
        "| USD per 1,000 | cost / all escalated |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| named point | share escalated | AP | USD per 1,000 decisions |",
        "|---|---|---|---|",
        *named,
        "",
        f"Goal (default band at most {g['cost_ratio_goal']:.0%} of everything escalated's cost, at least "
        f"{g['ap_ratio_goal']:.0%} of its AP): **{verdict}**: cost ratio {g['cost_ratio']:.3f} "
        f"({'met' if g['cost_met'] else 'not met'}), AP ratio {g['ap_ratio']:.3f} "
        f"({'met' if g['ap_met'] else 'not met'}).",
        "",
        f"Stage costs: fast path {c['fast_cpu_s_per_decision'] * 1e3:.3f} CPU-ms per decision; reasoner "
        f"{c['reasoner_cpu_s_per_call'] * 1e3:.2f} CPU-ms per call (p50 {s['reasoner_cpu_ms_p50']:.2f}, p95 "
        f"{s['reasoner_cpu_ms_p95']:.2f}; wall {s['reasoner_wall_ms_mean']:.2f} ms); LLM tokens "
        f"{c['llm_input_tokens_per_case']:.0f} in / {c['llm_output_tokens_per_case']:.0f} out per escalated case. "
        f"Model CPU per event: {s['model_cpu_ms_lone']:.3f} ms alone, {s['model_cpu_ms_batched']:.3f} ms in batches "
        f"of {s['batch']}; entity-state replay {s['state_cpu_ms_per_event']:.3f} ms per event folded. "
        f"Reasoner alone AP {s['ap_reasoner_alone']:.4f}.",
        "",
        "Prices (config `pricing`, illustrative defaults): " + ", ".join(f"{k} {v:g}" for k, v in r["pricing"].items())
        + ".",
        "",
        *[f"- {n}" for n in r["notes"]],
    ])


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = sorted(r["bands"], key=lambda b: b["escalated_share"])
    everything = r["named_points"][ALL_ESCALATED]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.plot([b["usd_per_1000"] for b in bands], [b["ap_cascade"] for b in bands], "o-", color="tab:blue",
            label="cascade, band by validation share")
    for b in bands:  # named by the band (its validation share); the x position is the share it escalated here
        ax.annotate(b["name"], (b["usd_per_1000"], b["ap_cascade"]), textcoords="offset points", xytext=(4, -12),
                    fontsize=8)
    default = next(b for b in bands if b["name"] == DEFAULT_BAND)
    ax.plot(default["usd_per_1000"], default["ap_cascade"], "*", color="tab:red", markersize=16,
            label=f"default band ({default['escalated_share']:.1%} escalated)")
    fast = r["named_points"][FAST_ONLY]
    ax.plot(fast["usd_per_1000"], fast["ap"], "s", color="tab:gray", markersize=10, label="fast only")
    ax.plot(everything["usd_per_1000"], everything["ap"], "^", color="tab:green", markersize=11,
            label="everything escalated")
    g = r["goal"]
    ax.axvline(everything["usd_per_1000"] * g["cost_ratio_goal"], color="tab:orange", linestyle="--", linewidth=1,
               label=f"goal: ≤ {g['cost_ratio_goal']:.0%} of all-escalated cost")
    ax.axhline(everything["ap"] * g["ap_ratio_goal"], color="tab:purple", linestyle=":", linewidth=1,
               label=f"goal: ≥ {g['ap_ratio_goal']:.0%} of all-escalated AP")
    ax.set_xlabel("USD per 1,000 decisions (illustrative prices)")
    ax.set_ylabel("average precision (held-out subset)")
    ax.set_title(f"Cascade cost against quality ({r['data']['subset_events']} test events, {r['backend']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def command_line(argv: Sequence[str]) -> str:
    """The command as run, with the RISKCASCADE_* settings of its environment (never a secret's value)."""
    from riskcascade.core.config import CONFIG_ENV_VAR, SECRET_FIELDS, Settings, secret_env_var

    prefix = Settings.model_config["env_prefix"]
    secrets = {secret_env_var(section, name) for section, name in SECRET_FIELDS}
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if (k.startswith(prefix) or k == CONFIG_ENV_VAR) and k.upper() not in secrets]
    return " ".join([*env, "python -m loadtest.band_sweep", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.band_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="riskcascade YAML config (default: the built-in defaults)")
    parser.add_argument("--events", type=int, default=DEFAULT_EVENTS,
                        help="first N test events in time order, each reviewed once (default %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    cpu = parser.add_mutually_exclusive_group()
    cpu.add_argument("--platform-cpu-ms-per-decision", type=float,
                     help="the platform's CPU-ms per decision (orchestrator + scorer processes), from a load test")
    cpu.add_argument("--bench-results", type=Path,
                     help="a load benchmark's results JSON carrying cpu_ms_per_decision")
    parser.add_argument("--bench-label", default="clear cases",
                        help="with --bench-results: the result whose path, id or label contains this "
                        "(default %(default)r)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.events < 1:
        parser.error("--events must be at least 1")
    platform_cpu = args.platform_cpu_ms_per_decision
    if platform_cpu is not None and not (math.isfinite(platform_cpu) and platform_cpu >= 0):
        parser.error("--platform-cpu-ms-per-decision must be a finite number >= 0")
    if args.bench_results is not None:
        try:
            platform_cpu = read_platform_cpu_ms_per_decision(args.bench_results, args.bench_label)
        except (OSError, ValueError) as exc:
            parser.error(f"--bench-results {args.bench_results}: {exc}")
        if platform_cpu is None:
            parser.error(f"{args.bench_results} carries no cpu_ms_per_decision for a result labelled "
                         f"*{args.bench_label}*")

    from riskcascade.core.config import load_settings
    from riskcascade.core.model_card import load_model_card
    from riskcascade.core.policy import escalation_policy
    from riskcascade.core.thresholds import BAND_CENTRE

    settings = load_settings(args.config)
    card = load_model_card(live_model_dir(settings.model.dir))
    policy = escalation_policy(settings.escalation, card.thresholds.band_low, card.thresholds.band_high)
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    m = measure(settings, args.events, progress=not args.quiet)
    costs, fast_source = stage_costs(m, platform_cpu)
    bands = band_grid(m.validation_scores, GRID_SHARES, (policy.band_low, policy.band_high), BAND_CENTRE)
    points = sweep_bands(m.fast, m.merged, [e.label for e in m.events], bands, costs, settings.pricing)
    command = command_line(argv if argv is not None else sys.argv[1:])
    result = report(m, settings, points, costs, fast_source, command, started, time.perf_counter() - clock)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"band-sweep-{started.strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(markdown(result))
    print(f"results: {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
