"""`riskcascade explain`: counterfactual explanations of the deployed fast model on a split of the data set.

Each event of the split gets the model inputs the live platform computes for it (``time_true_inputs``: the entity
state's features by replaying the data set's events and label arrivals in time order), its calibrated score and,
when the score is at or above the band (the fast model would not approve it), the counterfactuals the scorer
returns for ``DecideRequest.explain``: the same ``FastModel.counterfactuals`` on the same state row. The report
(Markdown and JSON) says how often an actionable change flips the fast model, which features the changes use, and
shows the first examples, found or not, with the command that wrote it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from riskcascade.core.config import Settings
from riskcascade.core.domain import Action, Counterfactual, ScoreRequest
from riskcascade.core.features import FeatureLayout
from riskcascade.core.policy import escalation_policy


def explain_split(settings: Settings, model_dir: Path, parts: dict[str, list], split: str, limit: int | None,
                  examples: int, command: str) -> dict[str, Any]:
    """Counterfactuals of ``split``'s first ``limit`` events (all when None) that the band does not approve; the
    first ``examples`` events whose APPROVE change was found, whose was not, and that the band blocks, in full."""
    from riskcascade.evaluate_cascade import time_true_inputs, time_true_texts
    from riskcascade.modelling.synthetic import event_text
    from services.scorer.fast_model import FastModel

    model = FastModel(model_dir, reason_count=0, prefer_gpu=False, embedding_dir=settings.retrieval.embedding_dir)
    layout = FeatureLayout.load(model_dir)
    x = time_true_inputs(model_dir, parts, split)
    events = parts[split][: limit or len(parts[split])]
    x = x[: len(events)]
    scores = model.score_matrix(model.model_input(x, time_true_texts(parts, split)[: len(events)]), reasons=False)
    policy = escalation_policy(settings.escalation, model.card.thresholds.band_low, model.card.thresholds.band_high)
    band = (policy.band_low, policy.band_high)
    state_from = len(layout.names) - len(layout.graph) if layout.state is not None else None
    tally: Counter[str] = Counter()
    moved: Counter[str] = Counter()
    shown: list[dict[str, Any]] = []
    for i, (e, s) in enumerate(zip(events, scores)):
        request = ScoreRequest.of(e.case_id, e.event_type, e.entities, dict(e.features), occurred_at=e.occurred_at,
                                  counterfactual_band=band, text=event_text(e))
        found = model.counterfactuals(request, x[i, state_from:] if state_from is not None else None, s.score)
        for cf in found:
            tally[f"{cf.target.value}:{'found' if cf.found else 'none'}"] += 1
            if cf.found and cf.target is Action.APPROVE:
                moved[" + ".join(c.feature for c in cf.changes if not c.derived)] += 1
        kind = "block" if len(found) > 1 else "found" if found and found[0].found else "none"
        if found and sum(x["kind"] == kind for x in shown) < examples:
            shown.append({"kind": kind, **_example(e, s.score, found)})
    return {
        "command": command,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_version": model.card.version,
        "split": split,
        "events": len(events),
        "band": list(band),
        "actionable": [a.model_dump(mode="json") for a in model.card.actionable],
        "at_or_above_band": sum(s.score >= band[0] for s in scores),
        "blocked": sum(s.score >= band[1] for s in scores),
        "outcomes": dict(sorted(tally.items())),
        "approve_changes": dict(moved.most_common()),
        "examples": shown,
    }


def _example(e, score: float, found: tuple[Counterfactual, ...]) -> dict[str, Any]:  # noqa: ANN001 - LabelledEvent
    return {
        "case_id": e.case_id, "event_type": e.event_type.value, "occurred_at": e.occurred_at.isoformat(),
        "label": "fraud" if e.label else "legitimate", "risk_type": e.risk_type, "score": round(score, 4),
        "counterfactuals": [{**asdict(cf), "target": cf.target.value} for cf in found],
    }


def write_explain_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text("\n".join(report_lines(report)) + "\n")
    return md_path, json_path


def report_lines(r: dict[str, Any]) -> list[str]:
    low, high = r["band"]
    lines = [
        f"# Counterfactual explanations ({r['split']} split, model {r['model_version']})",
        "",
        f"Written by `{r['command']}` at {r['written_at']}.",
        "",
        f"{r['events']} events; {r['at_or_above_band']} scored at or above the band's low edge {low:.4f} (the fast "
        f"model does not approve them), {r['blocked']} at or above its high edge {high:.4f} (BLOCK). Each asked for "
        "the smallest change to the model card's actionable features that takes the fast score below the low edge "
        "(APPROVE) and, for a block, below the high edge (out of BLOCK): fewest features first, then the smallest "
        "relative change. The changed event keeps the event's entity-state features; its anomaly score is "
        "recomputed.",
        "",
        "Actionable features (model card): " + "; ".join(
            f"`{a['name']}` ({a['action']}{', spoofable' if a['spoofable'] else ''})" for a in r["actionable"]),
        "",
        "| target | found | none found |",
        "|---|---|---|",
    ]
    for target in (Action.APPROVE.value, Action.REVIEW.value):
        lines.append(f"| {target} | {r['outcomes'].get(f'{target}:found', 0)} | "
                     f"{r['outcomes'].get(f'{target}:none', 0)} |")
    lines += ["", "Features changed by the APPROVE counterfactuals found:", ""]
    lines += [f"- {k}: {v}" for k, v in r["approve_changes"].items()] or ["- none"]
    lines += ["", "## Examples (in time order: the first events with an APPROVE change found, without, and blocked)",
              ""]
    for x in r["examples"]:
        truth = f"{x['label']}, {x['risk_type']}" if x["risk_type"] else x["label"]
        lines.append(f"- `{x['case_id']}` {x['event_type']} ({truth}), fast score {x['score']:.4f}:")
        for cf in x["counterfactuals"]:
            if cf["found"]:
                moves = ", ".join(f"`{c['feature']}` {c['from_value']:g} → {c['to_value']:g}"
                                  f"{' (derived)' if c['derived'] else ''}{' (spoofable)' if c['spoofable'] else ''}"
                                  for c in cf["changes"])
                lines.append(f"  - to {cf['target']} (score < {cf['threshold']:.4f}): {moves} → score "
                             f"{cf['score']:.4f} ({cf['candidates']} candidates)")
            else:
                lines.append(f"  - to {cf['target']} (score < {cf['threshold']:.4f}): none found among "
                             f"{cf['candidates']} candidates (lowest score reached {cf['score']:.4f})")
    return lines
