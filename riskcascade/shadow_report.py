"""`riskcascade shadow-report`: the shadow candidate's decisions on live traffic against the live ones, and, as
feedback arrives, against the outcomes.

Shadow mode (``ModelService.SetShadow``, ``riskcascade model shadow``) records with each live decision what the
candidate decided on the same event, at the same moment, from the same entity state (riskcascade/core/shadow.py).
This report reads those records from the decision store (read-only), with the feedback known by ``as_of``, and
gives live and candidate side by side with the backtest's figures (riskcascade/backtest.py): actions,
escalations, fraud caught, false positives, cost per 1,000 decisions, the live → candidate action matrix.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.store import shown_location, store_location
from risk.v1 import decision_pb2 as pb
from riskcascade.backtest import (
    BacktestError,
    _counted,
    _utc,
    compare,
    comparison_lines,
    open_store_read_only,
    read_feedback,
)
from riskcascade.core.config import Settings
from riskcascade.core.domain import Outcome


def run_shadow_report(settings: Settings, out_dir: Path, since: datetime | None = None,
                      as_of: datetime | None = None, store: Path | str | None = None,
                      command: str = "riskcascade shadow-report") -> dict[str, Any]:
    """Compare the recorded shadow decisions (decided at or after ``since``) with the live ones; write
    ``shadow.md`` and ``shadow.json`` to ``out_dir``."""
    as_of = _utc(as_of) if as_of is not None else datetime.now(timezone.utc)
    store = store or store_location(settings.store)
    conn = open_store_read_only(store)
    try:
        rows = [(request_id, action, decided_at, payload, json.loads(shadow)) for request_id, action, decided_at,
                payload, shadow in conn.execute("SELECT request_id, action, decided_at, payload, shadow FROM "
                                                "decisions WHERE shadow != '' ORDER BY decided_at")
                if since is None or _utc(datetime.fromisoformat(decided_at)) >= _utc(since)]
        # the latest known by as_of
        labels = {f.request_id: (Outcome.FRAUD if f.fraud else Outcome.LEGITIMATE).value
                  for f in read_feedback(conn, as_of)}
    finally:
        conn.close()
    if not rows:
        raise BacktestError(f"no shadow decisions recorded in {shown_location(store)}"
                            + (f" since {since.isoformat()}" if since else "")
                            + ": start one with `riskcascade model shadow`")
    answers = [pb.Decision.FromString(payload) for _, _, _, payload, _ in rows]
    live_actions = [action for _, action, _, _, _ in rows]
    live_escalated = [a.escalated for a in answers]
    shadow_actions = [s["action"] for *_, s in rows]
    shadow_escalated = [bool(s["escalated"]) for *_, s in rows]
    outcome = [labels.get(request_id) for request_id, *_ in rows]
    costs = settings.training.costs
    report = {
        "command": command,
        "made_at": datetime.now(timezone.utc).isoformat(),
        "store": shown_location(store),
        "range": {"from": rows[0][2], "to": rows[-1][2], "since": since.isoformat() if since else None,
                  "as_of": as_of.isoformat()},
        "protocol": "live traffic: each event decided by the live cascade and, at the same moment and from the same "
                    "entity state, by the shadow candidate (recorded, never returned); labels as known by as_of",
        "models": {"live": dict(Counter(a.model_version for a in answers)),
                   "candidate": dict(Counter(s["model_version"] for *_, s in rows)),
                   "candidate_policies": dict(Counter(s["policy_version"] for *_, s in rows)),
                   "candidate_bands": dict(Counter(f"[{s['band_low']:.4f}, {s['band_high']:.4f})"
                                                   for *_, s in rows))},
        "counts": {"decisions": len(rows), "labelled": sum(o is not None for o in outcome),
                   "agree": sum(a == b for a, b in zip(live_actions, shadow_actions)),
                   "candidate_from": dict(Counter(s["action_from"] for *_, s in rows))},
        "costs": {"units": "training.costs (the band rule's units)", **costs.model_dump()},
        **compare(live_actions, live_escalated, shadow_actions, shadow_escalated, outcome, costs),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shadow.json").write_text(json.dumps(report, indent=1))
    (out_dir / "shadow.md").write_text(_markdown(report))
    return report


def _markdown(r: dict[str, Any]) -> str:
    c = r["counts"]
    return "\n".join([
        f"# Shadow candidate against live on {c['decisions']:,} decisions",
        "",
        f"`{r['command']}` at {r['made_at']}",
        "",
        f"- store: {r['store']}; decided from {r['range']['from']} to {r['range']['to']} (labels known by "
        f"{r['range']['as_of']})",
        f"- protocol: {r['protocol']}",
        f"- live models: {_counted(r['models']['live'])}; candidate: {_counted(r['models']['candidate'])}, "
        f"policy {_counted(r['models']['candidate_policies'])}, band {_counted(r['models']['candidate_bands'])}",
        f"- {c['agree']:,} of {c['decisions']:,} actions agree; {c['labelled']:,} decisions have a label; where the "
        f"candidate's actions come from: {_counted(c['candidate_from'])} (an escalation only the candidate makes "
        "counts as merge.undecided_action)",
        *comparison_lines(r, ""),
    ])

