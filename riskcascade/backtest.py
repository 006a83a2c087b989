"""`riskcascade backtest`: what a candidate model or escalation band would have decided on recorded traffic.

The decision store holds every decision with the event exactly as decided (its time stamped) and every piece of
feedback with the time it arrived. The backtest reads them (read-only: the live writer is never touched), sorts
the events by time and replays them through the candidate fast model's serving path (``FastModel.score_batch``)
with a fresh embedded entity state, folding each label into the state from its arrival: before an event at time t
is scored, every label recorded at or before t is in, none after (the standing point-in-time rule; a label that
arrives after ``as_of`` is not seen at all). Events before ``since`` are replayed too, so the state has their
history, but only the events from ``since`` are compared.

Each compared event is routed by the candidate's band (the candidate card's, unless ``escalation.band_low/high``
or the command's override say otherwise) with the whole budget: offline nothing is held for lack of time or
reasoner capacity. The candidate's action for an escalated event is the live one where the live platform also
escalated it (the reasoner's recorded outcome); an event only the candidate escalates has no recorded reasoner
outcome, so it counts as the platform's undecided action (``merge.undecided_action``, REVIEW by default) unless
``review`` runs the offline reasoner on it (``evaluate_cascade.review_each``). The report says which.

Outcomes are the feedback known by ``as_of``; figures that need a label (fraud caught, false positives, the
error part of the cost) count the labelled decisions only, and the report says how many those are. Costs are the
band rule's (``training.costs``: an escalation, a missed fraud, a wrongly blocked customer), per 1,000 decisions.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.store import connect_read_only, shown_location, store_location
from risk.v1 import decision_pb2 as pb
from riskcascade.core.config import CostSettings, Settings
from riskcascade.core.domain import Action, DegradedCause, FastScore, Outcome, RiskEvent, ScoreRequest, Stage
from riskcascade.core.entity_state import LabelEvent
from riskcascade.core.merge import MergeRules, merge
from riskcascade.core.model_card import load_model_card
from riskcascade.core.policy import EscalationPolicy, Route
from riskcascade.core.shadow import (  # noqa: F401 - the three sources a row names, re-exported beside the fourth
    FROM_FAST_MODEL,
    FROM_LIVE_REASONER,
    FROM_UNDECIDED,
    candidate_action,
    candidate_policy,
)

PER_DECISIONS = 1000  # costs are reported per 1,000 decisions
PROTOCOL = ("recorded events replayed in time order through the candidate's serving path, a fresh entity state, "
            "each label folded in from its arrival (feedback.recorded_at <= event time), none after as_of")

# where the candidate's action comes from: riskcascade/core/shadow.py's three, or
FROM_OFFLINE_REVIEW = "offline_review"  # escalated by the candidate only, reviewed offline (--review)


FAST_MODEL_FAILED = DegradedCause.FAST_MODEL_FAILED.value


class BacktestError(RuntimeError):
    """The backtest cannot run (no store, nothing recorded in the range); the message says what to do."""


@dataclass(frozen=True)
class RecordedDecision:
    """One stored decision with its event as decided."""

    event: RiskEvent  # occurred_at always set
    action: Action
    decided_by: Stage
    escalated: bool  # the live platform sent it to the reasoner (whatever the reasoner then did)
    fast_score: float | None  # the live fast model's score (None when its payload does not say)
    model_version: str
    policy_version: str


@dataclass(frozen=True)
class RecordedFeedback:
    request_id: str
    fraud: bool
    recorded_at: datetime  # when the label arrived


@dataclass(frozen=True)
class RecordedTraffic:
    decisions: list[RecordedDecision]  # time order, up to ``until``, history before ``since`` too
    feedback: list[RecordedFeedback]  # arrival order, known by ``as_of``
    without_event: int  # rows of an older version, recorded without their event: skipped
    unreadable: int  # rows whose event does not parse: skipped


@dataclass(frozen=True)
class BacktestRow:
    """One compared decision: live, candidate and the label known by ``as_of``."""

    request_id: str
    occurred_at: str
    event_type: str
    label: str | None  # Outcome value, None = no feedback by as_of
    live_action: str
    live_escalated: bool
    live_fast_score: float | None
    candidate_score: float
    candidate_action: str
    candidate_escalated: bool
    candidate_from: str  # FROM_*


@dataclass(frozen=True)
class BacktestResult:
    report: dict[str, Any]
    rows: list[BacktestRow]
    files: tuple[Path, ...]


def open_store_read_only(store: Path | str) -> Any:
    """The decision store (a SQLite file or a PostgreSQL URL), read-only: the live writers are never touched."""
    try:
        return connect_read_only(store)
    except FileNotFoundError as exc:
        raise BacktestError(f"{exc} (store.url, store.sqlite_path)") from None


def read_feedback(conn: Any, as_of: datetime) -> list[RecordedFeedback]:
    """The feedback recorded by ``as_of``, in arrival order."""
    feedback = [
        RecordedFeedback(request_id, outcome == Outcome.FRAUD.value, when)
        for request_id, outcome, recorded_at in conn.execute("SELECT request_id, outcome, recorded_at FROM feedback")
        if (when := _utc(datetime.fromisoformat(recorded_at))) <= as_of
    ]
    return sorted(feedback, key=lambda f: f.recorded_at)


def read_recorded_traffic(store: Path | str, until: datetime | None, as_of: datetime) -> RecordedTraffic:
    """Decisions with events up to ``until`` in event-time order, and the feedback recorded by ``as_of`` in arrival
    order, from the store opened read-only."""
    from orchestrator.validation import InvalidField, to_risk_event

    conn = open_store_read_only(store)
    try:
        rows = conn.execute("SELECT request_id, action, decided_by, decided_at, payload, event FROM decisions")
        decisions, without_event, unreadable = [], 0, 0
        for request_id, action, decided_by, decided_at, payload, event in rows:
            if not event:
                without_event += 1
                continue
            try:
                message = pb.Event.FromString(event)
                risk_event = to_risk_event(pb.DecideRequest(request_id=request_id, event=message),
                                           known_features=message.features.keys())
            except (InvalidField, ValueError):
                unreadable += 1
                continue
            if risk_event.occurred_at is None:  # recorded events carry their time; an odd one takes its decision's
                risk_event = replace(risk_event, occurred_at=_utc(datetime.fromisoformat(decided_at)))
            if until is not None and risk_event.occurred_at > until:
                continue
            answer = pb.Decision.FromString(payload)
            decisions.append(RecordedDecision(
                event=risk_event, action=Action(action), decided_by=Stage(decided_by),
                escalated=answer.escalated or decided_by == Stage.REASONER.value,
                fast_score=answer.fast_score if payload and answer.degraded_cause != FAST_MODEL_FAILED else None,
                model_version=answer.model_version, policy_version=answer.policy_version,
            ))
        feedback = read_feedback(conn, as_of)
    finally:
        conn.close()
    decisions.sort(key=lambda d: (d.event.occurred_at, d.event.request_id))
    return RecordedTraffic(decisions, feedback, without_event, unreadable)


def replay_scores(model: Any, decisions: Sequence[RecordedDecision], feedback: Sequence[RecordedFeedback],
                  batch_size: int) -> list[FastScore]:
    """The candidate's fast score of each decision (in the given time order) through its serving path: each event
    scored from the entity state as of its time and folded in, each label folded in from its arrival, before any
    later event. A label that arrived before its own event's time (a client clock ahead) is folded in as soon as
    the event is: the state counts it from its arrival either way."""
    state = model.state
    labels = _first_labels(feedback) if state is not None else []
    scores: list[FastScore] = []
    batch: list[ScoreRequest] = []
    seen: set[str] = set()
    waiting: dict[str, LabelEvent] = {}  # arrived labels whose event is not in the state yet
    next_label = 0

    def fold(due: list[LabelEvent]) -> None:
        ready = [label for label in due if label.event_id in seen]
        waiting.update((label.event_id, label) for label in due if label.event_id not in seen)
        if ready:
            state.apply_labels(ready)

    def flush() -> None:
        if batch:
            scores.extend(model.score_batch(batch))
            seen.update(r.request_id for r in batch)
            batch.clear()
            fold([waiting.pop(i) for i in [i for i in waiting if i in seen]])

    for d in decisions:
        t = d.event.occurred_at.timestamp()  # type: ignore[union-attr]
        due = []
        while next_label < len(labels) and labels[next_label].known_at <= t:
            due.append(labels[next_label])
            next_label += 1
        if due:
            flush()
            fold(due)
        e = d.event
        batch.append(ScoreRequest.of(e.request_id, e.event_type, e.entities, e.features, occurred_at=e.occurred_at,
                                     text=e.text))
        if len(batch) >= batch_size:
            flush()
    flush()
    return scores


def _first_labels(feedback: Sequence[RecordedFeedback]) -> list[LabelEvent]:
    """The label the live state counts for each event: its first feedback (a later correction does not move the
    state's counts, see ``EntityBook.fold_label``), in arrival order."""
    first: dict[str, LabelEvent] = {}
    for f in feedback:
        first.setdefault(f.request_id, LabelEvent(f.request_id, f.fraud, f.recorded_at.timestamp()))
    return sorted(first.values(), key=lambda label: label.known_at)


def run_backtest(
    settings: Settings,
    out_dir: Path,
    model_dir: Path | None = None,
    band: tuple[float | None, float | None] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    as_of: datetime | None = None,
    store: Path | str | None = None,
    review: bool = False,
    progress: bool = True,
    command: str | None = None,
    message: Callable[[str], None] | None = None,
) -> BacktestResult:
    """Replay the store's recorded traffic through the candidate (``model_dir``, default the version that serves
    from ``model.dir``; ``band`` overrides its (low, high) edges, either may be None) and write ``backtest.md`` and
    ``backtest.json`` to ``out_dir``."""
    from riskcascade.core.model_registry import live_model_dir
    from services.scorer.fast_model import FastModel

    as_of = _utc(as_of) if as_of is not None else datetime.now(timezone.utc)
    since, until = (_utc(t) if t is not None else None for t in (since, until))
    model_dir = Path(model_dir) if model_dir is not None else live_model_dir(settings.model.dir)
    store = store or store_location(settings.store)
    traffic = read_recorded_traffic(store, until, as_of)
    first = next((i for i, d in enumerate(traffic.decisions) if since is None or d.event.occurred_at >= since),
                 len(traffic.decisions))
    compared = traffic.decisions[first:]
    if not compared:
        raise BacktestError(f"no recorded decision with an event in the range (since {since}, until {until}) in "
                            f"{shown_location(store)}")
    card = load_model_card(model_dir)
    policy = candidate_policy(settings.escalation, card.thresholds.band_low, card.thresholds.band_high,
                              band or (None, None))
    model = FastModel(model_dir, threads=settings.model.onnx_threads, reason_count=settings.model.reason_count,
                      prefer_gpu=False, embedding_dir=settings.retrieval.embedding_dir)
    scores = replay_scores(model, traffic.decisions, traffic.feedback, settings.evaluation.scoring_batch_size)[first:]
    labels = {f.request_id: f.fraud for f in traffic.feedback}  # the latest label known by as_of wins
    rules = MergeRules.from_settings(settings.merge)
    routes = [policy.route(s.score, float("inf"), 0) for s in scores]
    reviewed = _offline_reviews(settings, compared, scores, routes, rules, progress) if review else {}
    rows = []
    for d, s, r in zip(compared, scores, routes):
        action, source = _candidate_action(d, s.score, policy, reviewed.get(d.event.request_id), rules)
        label = labels.get(d.event.request_id)
        rows.append(BacktestRow(
            request_id=d.event.request_id, occurred_at=d.event.occurred_at.isoformat(),  # type: ignore[union-attr]
            event_type=d.event.event_type.value,
            label=None if label is None else (Outcome.FRAUD if label else Outcome.LEGITIMATE).value,
            live_action=d.action.value, live_escalated=d.escalated, live_fast_score=d.fast_score,
            candidate_score=s.score, candidate_action=action.value, candidate_escalated=r.route is Route.ESCALATE,
            candidate_from=source,
        ))
    costs = settings.training.costs
    compared_sides = compare([r.live_action for r in rows], [r.live_escalated for r in rows],
                             [r.candidate_action for r in rows], [r.candidate_escalated for r in rows],
                             [r.label for r in rows], costs)
    changed = [r for r in rows if r.candidate_action != r.live_action]
    report = {
        "command": command or _call(model_dir, band, since, until, as_of, store, review),
        "made_at": datetime.now(timezone.utc).isoformat(),
        "store": shown_location(store),
        "protocol": PROTOCOL,
        "range": {"from": rows[0].occurred_at, "to": rows[-1].occurred_at,
                  "since": since.isoformat() if since else None, "until": until.isoformat() if until else None,
                  "as_of": as_of.isoformat()},
        "models": {"live": dict(Counter(d.model_version or "unrecorded" for d in compared)),
                   "live_policies": dict(Counter(d.policy_version or "unrecorded" for d in compared)),
                   "candidate": card.version, "candidate_dir": str(model_dir)},
        "band": {"low": policy.band_low, "high": policy.band_high,
                 "from": "override" if band and any(e is not None for e in band) else
                 "config" if (settings.escalation.band_low, settings.escalation.band_high) != (None, None)
                 else "candidate model card"},
        "new_escalations": ("reviewed offline by the reasoner (--review, backend " + settings.llm.backend + ")"
                            if review else f"not reviewed: counted as {rules.undecided_action.value} "
                            "(merge.undecided_action), an escalation the reasoner did not decide"),
        "counts": {"decisions": len(compared), "history_only": first, "without_event": traffic.without_event,
                   "unreadable": traffic.unreadable, "labelled": sum(r.label is not None for r in rows),
                   "feedback_known": len(traffic.feedback), "changed": len(changed),
                   "candidate_from": dict(Counter(r.candidate_from for r in rows))},
        "costs": {"units": "training.costs (the band rule's units)", **costs.model_dump()},
        **compared_sides,
        "examples": [asdict(r) for r in sorted(changed, key=lambda r: r.label is None)[: settings.backtest.examples]],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = (out_dir / "backtest.json", out_dir / "backtest.md")
    files[0].write_text(json.dumps(report, indent=1))
    files[1].write_text(_markdown(report))
    if message is not None:
        message(_summary(report))
    return BacktestResult(report, rows, files)


def _candidate_action(d: RecordedDecision, score: float, policy: EscalationPolicy, verdict: Any,
                      rules: MergeRules) -> tuple[Action, str]:
    """As shadow mode decides (riskcascade/core/shadow.py), with an offline review where ``--review`` gave one."""
    action, escalated, source = candidate_action(score, policy, d.escalated, d.action, rules.undecided_action)
    if source == FROM_UNDECIDED and verdict is not None:
        return verdict, FROM_OFFLINE_REVIEW
    return action, source


def _offline_reviews(settings: Settings, decisions: Sequence[RecordedDecision], scores: Sequence[FastScore],
                     routes: Sequence[Any], rules: MergeRules, progress: bool) -> dict[str, Action]:
    """The merged action of each event only the candidate escalates, reviewed once by the reasoning service as
    served (retrieval bounded by label arrival), with the offline budget."""
    from riskcascade.evaluate_cascade import review_each
    from riskcascade.modelling.datasets.format import UNLABELLED
    from riskcascade.modelling.synthetic import NOTE_FIELD, LabelledEvent

    todo = [i for i, (d, r) in enumerate(zip(decisions, routes)) if r.route is Route.ESCALATE and not d.escalated]
    cases = [(LabelledEvent(e.request_id, e.event_type, e.entities, dict(e.features), e.text.get(NOTE_FIELD, ""),
                            e.occurred_at, UNLABELLED, ""), scores[i])  # the label stays behind, as live
             for i in todo for e in [decisions[i].event]]
    budget_ms = settings.evaluation.review_budget_ms
    reviews = review_each(settings, cases, budget_ms, "reviewing newly escalated events", progress)
    return {decisions[i].event.request_id: merge(rules, scores[i], routes[i], review.verdict).action
            for i, review in zip(todo, reviews)}


def compare(live_actions: Sequence[str], live_escalated: Sequence[bool], candidate_actions: Sequence[str],
            candidate_escalated: Sequence[bool], labels: Sequence[str | None], costs: CostSettings
            ) -> dict[str, Any]:
    """Live and candidate side by side on the same decisions: each side's figures, their difference and the
    live → candidate action matrix (the backtest's and the shadow report's)."""
    live = decision_figures(live_actions, live_escalated, labels, costs)
    candidate = decision_figures(candidate_actions, candidate_escalated, labels, costs)
    return {
        "live": live, "candidate": candidate,
        "delta": {k: candidate[k] - live[k] for k in live
                  if isinstance(live[k], (int, float)) and isinstance(candidate[k], (int, float))},
        "transitions": {a.value: {b.value: sum(x == a.value and y == b.value
                                               for x, y in zip(live_actions, candidate_actions)) for b in Action}
                        for a in Action},
    }


def decision_figures(actions: Sequence[str], escalated: Sequence[bool], labels: Sequence[str | None],
          costs: CostSettings) -> dict[str, Any]:
    """One side's figures. Fraud caught: blocked or sent to review among labelled fraud; false positives:
    blocked legitimate; the cost counts every escalation and the labelled errors."""
    n = len(actions)
    fraud = [a for a, label in zip(actions, labels) if label == Outcome.FRAUD.value]
    legit = [a for a, label in zip(actions, labels) if label == Outcome.LEGITIMATE.value]
    caught = sum(a != Action.APPROVE.value for a in fraud)
    missed = len(fraud) - caught
    false_positives = sum(a == Action.BLOCK.value for a in legit)
    escalations = sum(escalated)
    cost = costs.review * escalations + costs.missed_fraud * missed + costs.wrong_block * false_positives
    return {
        "decisions": n,
        **{action.value: sum(a == action.value for a in actions) for action in Action},
        "escalations": escalations, "escalation_share": escalations / n,
        "labelled_fraud": len(fraud), "fraud_caught": caught,
        "fraud_caught_share": caught / len(fraud) if fraud else None,
        "missed_fraud": missed, "false_positives": false_positives,
        "reviewed_legitimate": sum(a == Action.REVIEW.value for a in legit),
        "cost_per_1000": cost / n * PER_DECISIONS,
    }


FIGURES = (("approve", "approvals"), ("review", "reviews"), ("block", "blocks"), ("escalations", "escalations"),
           ("escalation_share", "escalation share"), ("fraud_caught", "fraud caught"),
           ("fraud_caught_share", "fraud caught (share of labelled fraud)"), ("missed_fraud", "missed fraud"),
           ("false_positives", "false positives (blocked legitimate)"),
           ("reviewed_legitimate", "legitimate sent to review"), ("cost_per_1000", "cost per 1,000 decisions"))


def _markdown(r: dict[str, Any]) -> str:
    c, band = r["counts"], r["band"]

    lines = [
        f"# Backtest of {r['models']['candidate']} on {c['decisions']:,} recorded decisions",
        "",
        f"`{r['command']}` at {r['made_at']}",
        "",
        f"- store: {r['store']}",
        f"- events: from {r['range']['from']} to {r['range']['to']} (labels known by {r['range']['as_of']}; "
        f"{c['history_only']:,} earlier events replayed for their history only)",
        f"- protocol: {r['protocol']}",
        f"- live models: {_counted(r['models']['live'])}; live policies: {_counted(r['models']['live_policies'])}",
        f"- candidate: {r['models']['candidate']} ({r['models']['candidate_dir']}), band "
        f"[{band['low']:.4f}, {band['high']:.4f}) from the {band['from']}",
        f"- events only the candidate escalates: {r['new_escalations']}",
        f"- {c['labelled']:,} of {c['decisions']:,} decisions have a label; {c['without_event']:,} rows recorded "
        f"without their event and {c['unreadable']:,} unreadable ones skipped",
        *comparison_lines(r, f"{c['changed']:,} decisions change."),
        "| request | time | label | live | live score | candidate | candidate score | from |",
        "|---|---|---|---|---:|---|---:|---|",
        *[f"| {e['request_id']} | {e['occurred_at']} | {e['label'] or ''} | {e['live_action']} | "
          f"{'' if e['live_fast_score'] is None else format(e['live_fast_score'], '.3f')} | {e['candidate_action']} | "
          f"{e['candidate_score']:.3f} | {e['candidate_from']} |" for e in r["examples"]],
        "",
    ]
    return "\n".join(lines)


def comparison_lines(r: dict[str, Any], changed: str) -> list[str]:
    """The report's costs line, live/candidate/change table and action matrix (the backtest's and the shadow
    report's, from the same keys)."""
    return [
        f"- costs in {r['costs']['units']}: escalation {r['costs']['review']}, missed fraud "
        f"{r['costs']['missed_fraud']}, blocked legitimate {r['costs']['wrong_block']}; errors count labelled "
        "decisions only",
        "",
        "| | live | candidate | change |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {_shown(key, r['live'][key])} | {_shown(key, r['candidate'][key])} | "
          f"{_shown(key, r['delta'].get(key), signed=True)} |" for key, name in FIGURES],
        "",
        f"{changed} Live action (rows) to candidate action (columns):".strip(),
        "",
        "| live \\ candidate | " + " | ".join(r["transitions"]) + " |",
        "|---|" + "---:|" * len(r["transitions"]),
        *[f"| {a} | " + " | ".join(f"{n:,}" for n in row.values()) + " |" for a, row in r["transitions"].items()],
        "",
    ]


def _shown(key: str, value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    sign = "+" if signed else ""
    if key.endswith("share"):
        return f"{value:{sign}.1%}"
    return f"{value:{sign},.2f}" if isinstance(value, float) else f"{value:{sign},}"


def _call(model_dir: Path, band: Any, since: Any, until: Any, as_of: datetime, store: Path, review: bool) -> str:
    """How a backtest run from Python (not the command) was asked for, for the report's first line."""
    return (f"run_backtest(model_dir={str(model_dir)!r}, band={band!r}, since={since and since.isoformat()!r}, "
            f"until={until and until.isoformat()!r}, as_of={as_of.isoformat()!r}, store={shown_location(store)!r}, "
            f"review={review})")


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ({v:,})" for k, v in sorted(counts.items()))


def _summary(r: dict[str, Any]) -> str:
    live, cand = r["live"], r["candidate"]
    return (f"{r['counts']['decisions']:,} decisions from {r['range']['from']} to {r['range']['to']}: "
            f"{r['counts']['changed']:,} change; escalations {live['escalations']:,} -> {cand['escalations']:,}, "
            f"blocks {live['block']:,} -> {cand['block']:,}, cost per 1,000 {live['cost_per_1000']:.1f} -> "
            f"{cand['cost_per_1000']:.1f}")


def parse_time(value: str | None) -> datetime | None:
    """An ISO 8601 time from the command line (``Z`` allowed; UTC when it names no zone)."""
    if value is None:
        return None
    try:
        return _utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None


def _utc(t: datetime) -> datetime:
    """A time without a zone is read as UTC (the store writes UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)
