"""The distillation report: ``distill.md``, ``distill.json`` and ``distill.png`` (the escalation-share curve per
model version), from the figures ``riskcascade.distill.run_distillation`` measured."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPORT_FILES = ("distill.md", "distill.json", "distill.png")


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, ...]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**report, "made_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (out_dir / REPORT_FILES[1]).write_text(json.dumps(report, indent=1, default=_plain) + "\n")
    (out_dir / REPORT_FILES[0]).write_text(markdown(report) + "\n")
    _plot(report, out_dir / REPORT_FILES[2])
    return tuple(out_dir / f for f in REPORT_FILES)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _figure_row(label: str, m: dict[str, Any], period: str, extra: str = "") -> str:
    f = m["figures"][period]
    return (f"| {label} | {extra}{_f(f['escalation_share'] * 100, 1)}% | {_f(f['ap_fast'])} | {_f(f['ap_cascade'])} | "
            f"{_f(f['ap_cascade_escalated'])} | {_f(f['fraud_caught_share'])} | {f['false_positives']} | "
            f"{_f(f['cost_per_1000'], 1)} |")


HEADER = ("| model | training rows (hard / soft) | escalated | AP fast | AP cascade | AP cascade on escalated | "
          "fraud caught | false positives | cost per 1,000 |", "|---|---|---|---|---|---|---|---|---|")


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [
        "# Distillation: the reasoner's verdicts as soft labels for the fast model",
        "",
        f"`{r['command']}` at {r['made_at']}; data {r['data']['data_dir']} ({r['data']['events']:,} events, "
        f"generator and LightGBM seed {r['data']['seed']}); distilled from the live model {r['live']['version']}.",
        "",
        "## Protocol",
        "",
        "A label counts from when it arrived. The live model was fitted on fit-train / fit-valid. In each teaching "
        "period the model of the moment (round 1: the live one; later: the previous round's winner) scores the "
        "events on their time-true features and the reasoner reviews the ones inside its band, in time order, "
        "retrieving only labels arrived before each event. A round's student is fitted at its cut (the teaching "
        "period's last event): hard labels of the fitting and taught events whose label had arrived by the cut, plus "
        "(by variant) the teacher's probability as a soft label on taught escalations whose label had not (LightGBM "
        f"cross-entropy; a reasoner fallback is no label); validation = the latest {s['valid_share']:.0%}, by event "
        "time, of the fitting and taught events labelled by the cut (not the live model's fit-valid: its legitimate "
        "labels arrive when their dispute window closes, so by the first cut it held fraud labels only; the latest "
        "labels still lean to fraud, which arrives sooner); "
        f"the band by training's own rule (`{r['band_rule']}`, target share {r['target_escalation_share']}) on that "
        "validation. Every model is scored on select and report, its escalations reviewed and merged "
        "(`merge.fast_weight`), and costed as the backtest costs (`training.costs`: "
        + ", ".join(f"{k} {v:g}" for k, v in r["costs"].items()) + "). AP over all the period's events.",
        "",
        f"**Winner rule, fixed before the run**: on the select period, among the variants whose cascade AP is at most "
        f"{s['max_ap_loss']} below the hard-label baseline's, the lowest cost per 1,000 decisions (ties: the "
        "baseline). The report period is never used to fit or to choose.",
        "",
        f"Variants: `hard_only` (no teacher), `teacher_full`, `teacher_weighted` (weight {s['teacher_weight']}), "
        f"`teacher_filtered` (|p - 0.5| >= {s['confidence_margin']}), `teacher_sampled` (the {s['sample_share']:.0%} "
        "of the teacher's labels the hard-label student is least sure of). Later rounds run `hard_only` and round 1's "
        "winning recipe.",
        "",
        "| period | events | fraud | from | to | cut |",
        "|---|---|---|---|---|---|",
        *(f"| {p['period']} | {p['events']:,} | {p['fraud']:,} | {p['from']} | {p['to']} | {p.get('cut', '')} |"
          for p in r["periods"]),
        "",
    ]
    for rnd in r["rounds"]:
        lines += [
            f"## Round {rnd['round']}",
            "",
            f"Teacher: the reasoner on {rnd['escalated']} escalations of {rnd['teacher_model']} among "
            f"{rnd['events']:,} teaching events ({rnd['fallbacks']} fallbacks left out); {rnd['verdicts']} verdicts, "
            f"{rnd['label_arrived_by_cut']} of them on events whose label had arrived by the cut (those keep the "
            f"label); fraud share {_f(rnd['fraud_share'])}; AP of the verdicts {_f(rnd['teacher_ap'])} against "
            f"the fast score's {_f(rnd['fast_ap_on_reviewed'])} on the same events (eventual labels).",
            "",
        ]
        for period in ("select", "report"):
            lines += [f"On **{period}**:", "", *HEADER]
            lines.append(_figure_row(f"live {r['live']['version']}", r["live"], period, "– | "))
            for name, m in rnd["students"].items():
                t = m["training"]
                mark = " **(winner)**" if name == rnd["winner"] else ""
                rows = f"{t['hard_labels']:,} / {t['soft_labels']:,} | "
                lines.append(_figure_row(f"`{name}`{mark}", m, period, rows))
            lines.append("")
        lines += [f"Qualified by the rule: {', '.join(rnd['qualified'])}. Winner `{rnd['winner']}`, published as "
                  f"{rnd['published']} (not live; `riskcascade model use` switches).", ""]
    lines += ["## The curve per model version (report period)", "",
              "| round | version | escalated | AP fast | AP cascade | cost per 1,000 |", "|---|---|---|---|---|---|"]
    for c in r["curve"]:
        f = c["figures"]["report"]
        lines.append(f"| {c['round']} | {c['version']} ({c['name']}) | {_f(f['escalation_share'] * 100, 1)}% | "
                     f"{_f(f['ap_fast'])} | {_f(f['ap_cascade'])} | {_f(f['cost_per_1000'], 1)} |")
    lines += ["", f"Registry {r['registry']['dir']}: live version {r['registry']['live']} (unchanged).",
              "`distill.png` plots the escalated share and the cascade AP per version."]
    return "\n".join(lines)


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = r["curve"]
    x = list(range(len(curve)))
    share = [c["figures"]["report"]["escalation_share"] * 100 for c in curve]
    ap = [c["figures"]["report"]["ap_cascade"] for c in curve]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(x, share, "o-", color="tab:blue", label="escalated (%)")
    left.set_ylabel("escalated share of report-period events (%)", color="tab:blue")
    left.set_xticks(x, [f"{'live' if c['round'] == 0 else 'round ' + str(c['round'])}\n{c['version'][-8:]}"
                        for c in curve])
    right = left.twinx()
    right.plot(x, ap, "s--", color="tab:red", label="cascade AP")
    right.set_ylabel("cascade average precision", color="tab:red")
    left.set_title("Escalation share and quality per model version (report period)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
