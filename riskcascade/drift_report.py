"""`riskcascade drift`: how far a set of events has moved from the data the deployed model was trained on.

The events (a file in the generator's CSV format, or one of the data set's own splits) get the model inputs the
live platform computes for them: the entity state's features by replaying the data set's events and label
arrivals and then these events, in time order, through the serving state code (``time_true_inputs``); then the
model's calibrated scores. Each input and the score are compared with the model's drift reference
(``riskcascade.core.drift``, written by training from the validation split), bin by bin, as the population
stability index; so is the share of events the band would escalate, against the share it escalated on held-out
data when the model was trained. The report (Markdown, JSON, PNG) names the command, the events' time range and
the thresholds (``drift.psi_warn``, ``drift.psi_alert``).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from riskcascade.core.config import Settings
from riskcascade.core.drift import DriftReference, DriftWindow
from riskcascade.core.model_card import load_model_card
from riskcascade.core.model_registry import live_model_dir
from riskcascade.core.policy import escalation_policy

STABLE, MODERATE, SHIFTED = "stable", "moderate", "shifted"


class DriftReportError(RuntimeError):
    """The report cannot be made (no reference, no events); the message says what to do."""


@dataclass(frozen=True)
class ColumnDrift:
    name: str
    psi: float
    status: str


def status_of(value: float, warn: float, alert: float) -> str:
    return SHIFTED if value >= alert else MODERATE if value >= warn else STABLE


def run_drift_report(settings: Settings, out_dir: Path, events_file: Path | None = None,
                     split: str | None = None) -> dict:
    """Compare ``events_file`` (or the data set's ``split``) with the model's reference; write the report."""
    from riskcascade.evaluate_cascade import offline_scores, time_true_inputs, time_true_texts
    from riskcascade.modelling.datasets import read_split_events
    from riskcascade.modelling.synthetic import read_events_csv
    from services.scorer.fast_model import FastModel

    model_dir = live_model_dir(settings.model.dir)
    reference = DriftReference.load(model_dir)
    if reference is None:
        raise DriftReportError(f"model at {model_dir} has no drift reference (trained before references were "
                               "written): retrain it (riskcascade train)")
    parts = read_split_events(settings.data.dir)
    if events_file is not None:
        live = read_events_csv(events_file)
        ids = {e.case_id for e in live}
        # the file's events are "test"; everything the data set holds before or beside them stays in the timeline
        parts = {"train": [e for e in parts["train"] if e.case_id not in ids],
                 "valid": [e for e in parts["valid"] + parts["test"] if e.case_id not in ids],
                 "test": live}
        what = str(events_file)
    else:
        what = f"the data set's {split} split ({settings.data.dir})"
        live = parts[split or "test"]
    if not live:
        raise DriftReportError(f"no events in {what}")
    card = load_model_card(model_dir)
    model = FastModel(model_dir, threads=settings.model.onnx_threads, reason_count=0, prefer_gpu=False,
                      embedding_dir=settings.retrieval.embedding_dir)
    scored = "test" if events_file is not None else split
    x = model.model_input(time_true_inputs(model_dir, parts, scored), time_true_texts(parts, scored))
    scores = np.array([s.score for s in offline_scores(model, x, settings.evaluation.scoring_batch_size)])
    window = DriftWindow(reference, len(x))
    window.add(x, scores)
    cfg = settings.drift
    columns = [ColumnDrift(name, value, status_of(value, cfg.psi_warn, cfg.psi_alert))
               for name, value in window.feature_psi(cfg.psi_floor).items()]
    score_psi = window.score_psi(cfg.psi_floor)
    band = escalation_policy(settings.escalation, card.thresholds.band_low, card.thresholds.band_high)
    band_low, band_high = band.band_low, band.band_high  # as the platform routes: config edges win over the card's
    escalated = float(np.mean((scores >= band_low) & (scores < band_high)))
    times = sorted(e.occurred_at for e in live)
    report = {
        "command": " ".join(["riskcascade", *map(shlex.quote, sys.argv[1:])]) if sys.argv else "riskcascade drift",
        "made_at": datetime.now(timezone.utc).isoformat(),
        "events": what, "n_events": len(live),
        "from": times[0].isoformat(), "to": times[-1].isoformat(),
        "model_version": card.version, "reference": reference.source,
        "protocol": "time-ordered replay: each event's entity features from the state before it (the data set's "
                    "events and label arrivals, then these events)",
        "thresholds": {"psi_warn": cfg.psi_warn, "psi_alert": cfg.psi_alert, "psi_floor": cfg.psi_floor},
        "score": {"psi": score_psi, "status": status_of(score_psi, cfg.psi_warn, cfg.psi_alert)},
        "escalation_share": {"live": escalated, "target": card.metrics.get("escalation_share"),
                             "band": [band_low, band_high]},
        "features": [{"name": c.name, "psi": c.psi, "status": c.status}
                     for c in sorted(columns, key=lambda c: -c.psi)],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "drift.json").write_text(json.dumps(report, indent=1))
    (out_dir / "drift.md").write_text(_markdown(report))
    _plot(report, out_dir / "drift.png")
    return report


def _markdown(r: dict) -> str:
    t = r["thresholds"]
    share = r["escalation_share"]
    target = f"{share['target']:.1%}" if share["target"] is not None else "not in the model card"
    lines = [
        f"# Drift of {r['n_events']:,} events against model {r['model_version']}",
        "",
        f"`{r['command']}` at {r['made_at']}",
        "",
        f"- events: {r['events']}, from {r['from']} to {r['to']}",
        f"- reference: {r['reference']}",
        f"- protocol: {r['protocol']}",
        f"- PSI thresholds: moderate from {t['psi_warn']}, shifted from {t['psi_alert']} (floor {t['psi_floor']})",
        f"- **score**: PSI {r['score']['psi']:.3f} ({r['score']['status']})",
        f"- **escalation share**: {share['live']:.1%} of these events fall in the band "
        f"[{share['band'][0]:.3f}, {share['band'][1]:.3f}), against {target} on held-out data at training",
        "",
        "| input | PSI | status |",
        "|---|---:|---|",
        *[f"| `{f['name']}` | {f['psi']:.3f} | {f['status']} |" for f in r["features"]],
        "",
    ]
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("score", r["score"]["psi"]), *[(f["name"], f["psi"]) for f in r["features"]]]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.28 * len(rows))))
    names, values = zip(*reversed(rows))
    ax.barh(names, values, color=["tab:red" if v >= r["thresholds"]["psi_alert"] else "tab:orange"
                                  if v >= r["thresholds"]["psi_warn"] else "tab:blue" for v in values])
    ax.axvline(r["thresholds"]["psi_warn"], color="tab:orange", linestyle="--", label="moderate")
    ax.axvline(r["thresholds"]["psi_alert"], color="tab:red", linestyle="--", label="shifted")
    ax.set_xlabel("population stability index")
    ax.set_title(f"{r['n_events']:,} events vs model {r['model_version']}", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
