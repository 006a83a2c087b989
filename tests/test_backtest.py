"""`riskcascade backtest` on recorded traffic: decisions written to a real decision store as the platform makes them
(the fast model's serving path on its own entity state, the band, the merge rules, a scripted reasoner) with
feedback recorded as it arrived, replayed through a candidate model or band."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from loadtest.events import decide_request
from loadtest.postgres_process import create_database
from orchestrator.convert import ACTIONS, STAGES
from orchestrator.store import (
    DecisionRecord,
    FeedbackRecord,
    PostgresDecisionStore,
    SQLiteDecisionStore,
    is_database_url,
)
from risk.v1 import decision_pb2 as pb
from riskcascade.backtest import FROM_LIVE_REASONER, FROM_UNDECIDED, run_backtest
from riskcascade.cli import main
from riskcascade.core.config import MergeSettings, load_settings
from riskcascade.core.domain import Action, ReasonerVerdict, ScoreRequest
from riskcascade.core.entity_state import EmbeddedEntityState, LabelEvent
from riskcascade.core.features import FeatureLayout
from riskcascade.core.merge import MergeRules, merge
from riskcascade.core.model_registry import live_model_dir
from riskcascade.core.policy import EscalationPolicy, Route
from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
from riskcascade.modelling.synthetic import generate_events, split_events
from riskcascade.modelling.training import train_model
from services.scorer.fast_model import FastModel
from tests.postgres_server import postgres_server  # noqa: F401 - fixture

N_EVENTS = 2000
SEED = 9
RECORDED = 160  # decisions in the recorded traffic
UNLABELLED_EVERY = 4  # every fourth recorded event never gets feedback


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("backtest")
    parts = split_events(generate_events(N_EVENTS, SEED), SEED)
    settings = load_settings(model={"dir": str(root / "model")}, store={"sqlite_path": str(root / "decisions.sqlite")})
    card = train_model(settings, synthetic_dataset(parts), progress=False)
    return settings, card, parts


def scripted_verdict(score: float, middle: float) -> ReasonerVerdict:
    """The stand-in reasoner: blocks above the band's middle, approves below; a recorded outcome the backtest must
    reuse, not recompute."""
    action = Action.BLOCK if score >= middle else Action.APPROVE
    return ReasonerVerdict(action, score, 0.9, "scripted", (), (), (), "r-1", "scripted")


@pytest.fixture(scope="module")
def recorded(trained):
    """Recorded traffic: the test split's first events decided in time order as the platform decides them (the
    fast model's serving path on its own entity state, the band, the merge rules, a scripted reasoner for the
    escalated ones), each label folded into that state at its arrival (the generator's delays) and stored as
    feedback recorded then; every fourth event never gets feedback."""
    settings, card, parts = trained
    model_dir = live_model_dir(settings.model.dir)
    model = FastModel(model_dir, reason_count=0, prefer_gpu=False,
                      state=EmbeddedEntityState(FeatureLayout.load(model_dir).state))
    low, high = card.thresholds.band_low, card.thresholds.band_high
    policy = EscalationPolicy(low, high, min_reasoner_budget_ms=0.0, max_in_flight=RECORDED)
    rules = MergeRules.from_settings(MergeSettings())
    events = parts["test"][:RECORDED]
    timeline = sorted([(e.occurred_at, 1, i) for i, e in enumerate(events)]
                      + [(e.label_known_at, 0, i) for i, e in enumerate(events) if i % UNLABELLED_EVERY])
    decisions, feedback = [], []
    for _, is_event, i in timeline:
        e = events[i]
        if not is_event:
            model.state.apply_labels([LabelEvent(e.case_id, bool(e.label), e.label_known_at.timestamp())])
            feedback.append(FeedbackRecord(f"fb-{e.case_id}", e.case_id, "fraud" if e.label else "legitimate",
                                           e.risk_type, "", e.label_known_at.isoformat()))
            continue
        request = decide_request(e, e.case_id)
        fast = model.score_batch([ScoreRequest.of(e.case_id, e.event_type, e.entities, dict(request.event.features),
                                                  occurred_at=e.occurred_at, text=dict(request.event.text))])[0]
        routing = policy.route(fast.score, float("inf"), 0)
        verdict = scripted_verdict(fast.score, (low + high) / 2) if routing.route is Route.ESCALATE else None
        merged = merge(rules, fast, routing, verdict)
        answer = pb.Decision(request_id=e.case_id, action=ACTIONS[merged.action], risk_score=merged.risk_score,
                             decided_by=STAGES[merged.decided_by], escalated=merged.escalated, fast_score=fast.score,
                             model_version=card.version, policy_version="policy-live")
        decisions.append(DecisionRecord(e.case_id, "fp", merged.action.value, merged.risk_score,
                                        merged.decided_by.value, e.event_type.value, merged.degraded,
                                        e.occurred_at.isoformat(), answer.SerializeToString(),
                                        request.event.SerializeToString()))
    store = SQLiteDecisionStore(settings.store.sqlite_path, synchronous="NORMAL")

    async def write() -> None:
        for record in decisions:
            await store.put_decision(record)
        for record in feedback:
            await store.put_feedback(record)

    asyncio.run(write())
    store.close()
    return settings, card


def test_the_live_model_as_candidate_reproduces_every_live_decision(recorded, tmp_path):
    """Same model, same band: the replay (time order, labels folded as they arrived) computes exactly the fast
    scores the live scorer computed, so no decision changes; both-escalated events keep the reasoner's outcome."""
    settings, card = recorded
    result = run_backtest(settings, tmp_path, model_dir=live_model_dir(settings.model.dir), progress=False)
    rows = result.rows
    assert len(rows) == RECORDED
    assert [r.candidate_score for r in rows] == [r.live_fast_score for r in rows]
    assert [r.candidate_action for r in rows] == [r.live_action for r in rows]
    assert [r.candidate_escalated for r in rows] == [r.live_escalated for r in rows]
    escalated = [r for r in rows if r.candidate_escalated]
    assert escalated and {r.candidate_from for r in escalated} == {FROM_LIVE_REASONER}
    report = result.report
    unlabelled = len(range(0, RECORDED, UNLABELLED_EVERY))
    assert report["counts"]["changed"] == 0 and report["counts"]["labelled"] == RECORDED - unlabelled
    assert report["delta"]["cost_per_1000"] == 0 and report["delta"]["escalations"] == 0
    assert report["live"]["block"] == sum(r.live_action == Action.BLOCK.value for r in rows)


def test_a_wider_band_escalates_exactly_the_events_between_the_edges(recorded, tmp_path):
    settings, card = recorded
    base = run_backtest(settings, tmp_path / "base", model_dir=live_model_dir(settings.model.dir), progress=False).rows
    low, high = card.thresholds.band_low, card.thresholds.band_high
    below = sorted(r.candidate_score for r in base if r.candidate_score < low)
    above = sorted(r.candidate_score for r in base if r.candidate_score >= high)
    wide_low = below[len(below) // 2]
    wide_high = above[len(above) // 2] if above else high
    between = [r for r in base if wide_low <= r.candidate_score < low or high <= r.candidate_score < wide_high]
    assert between

    result = run_backtest(settings, tmp_path / "wide", model_dir=live_model_dir(settings.model.dir),
                          band=(wide_low, wide_high), progress=False)
    report = result.report
    assert report["band"] == {"low": wide_low, "high": wide_high, "from": "override"}
    assert report["delta"]["escalations"] == len(between)
    changed = {r.request_id for r in result.rows if r.candidate_escalated and not r.live_escalated}
    assert changed == {r.request_id for r in between}
    newly = [r for r in result.rows if r.request_id in changed]
    assert {(r.candidate_from, r.candidate_action) for r in newly} == {(FROM_UNDECIDED, Action.REVIEW.value)}
    assert "not reviewed" in report["new_escalations"]
    transitions = report["transitions"]
    assert sum(transitions[a][Action.REVIEW.value] for a in ("approve", "block")) == len(between)


# -- a hand-made store: three events of one account, one label, moved around ---------------------------------------

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=timezone.utc)


def _store_with(path, template, label_at: datetime | None, extra: list[DecisionRecord] = ()):  # noqa: ANN001
    """Decisions A (t0), B (t0 + 100 s) and C (t0 + 200 s) of one account, device and IP, all approved by the fast
    model; A's fraud label recorded at ``label_at``; in a SQLite file, or the PostgreSQL database at a URL."""
    store = PostgresDecisionStore(path) if is_database_url(path) else SQLiteDecisionStore(path, synchronous="NORMAL")

    async def write() -> None:
        for name, offset in (("A", 0), ("B", 100), ("C", 200)):
            request = decide_request(template, name)
            request.event.occurred_at.FromDatetime(T0 + timedelta(seconds=offset))
            answer = pb.Decision(request_id=name, action=pb.ACTION_APPROVE, model_version="live-7", fast_score=0.01)
            await store.put_decision(DecisionRecord(
                name, "fp", "approve", 0.01, "fast_model", template.event_type.value, False,
                (T0 + timedelta(seconds=offset)).isoformat(), answer.SerializeToString(),
                request.event.SerializeToString()))
        for record in extra:
            await store.put_decision(record)
        if label_at is not None:
            await store.put_feedback(FeedbackRecord("fb-A", "A", "fraud", "account_takeover", "", label_at.isoformat()))

    asyncio.run(write())
    store.close()
    return path


@pytest.fixture(scope="module")
def template(trained):
    _, _, parts = trained
    return parts["test"][0]


def _scores(settings, path, out, as_of=None):  # noqa: ANN001, ANN202
    result = run_backtest(settings, out, model_dir=live_model_dir(settings.model.dir), store=path, as_of=as_of,
                          progress=False)
    return {r.request_id: r.candidate_score for r in result.rows}, result


@pytest.fixture(params=["sqlite", "postgres"])
def store_at(request, tmp_path) -> Callable[[str], Path | str]:  # noqa: ANN001
    """Names a new store on the backend under test: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return lambda name: tmp_path / f"{name}.sqlite"
    server = request.getfixturevalue("postgres_server")
    return lambda name: create_database(server, f"bt_{name}_{uuid.uuid4().hex[:8]}")


def test_a_label_counts_only_for_events_after_its_arrival(trained, template, tmp_path, store_at):
    settings, _, _ = trained
    late = _store_with(store_at("late"), template, T0 + timedelta(seconds=150))
    early = _store_with(store_at("early"), template, T0 + timedelta(seconds=50))
    # known by T0 + 120 s, the label (arriving at T0 + 150 s) is not known at all
    unseen, _ = _scores(settings, late, tmp_path / "unseen", as_of=T0 + timedelta(seconds=120))
    after_b, result = _scores(settings, late, tmp_path / "after_b")
    before_b, _ = _scores(settings, early, tmp_path / "before_b")
    assert after_b["B"] == unseen["B"]  # arrived after B: B's features and score do not see it
    assert after_b["C"] != unseen["C"]  # arrived before C: C's do
    assert before_b["B"] != unseen["B"]  # moved before B: now B sees it
    assert after_b["A"] == before_b["A"] == unseen["A"]  # a label never reaches its own event
    assert result.report["counts"]["labelled"] == 1 and result.report["live"]["labelled_fraud"] == 1


def test_rows_without_an_event_are_counted_and_skipped_and_the_report_names_what_it_ran(trained, template, tmp_path):
    settings, card, _ = trained
    old = DecisionRecord("old-1", "fp", "block", 0.99, "fast_model", "order", False, T0.isoformat(),
                         pb.Decision(request_id="old-1", model_version="live-6").SerializeToString(), b"")
    path = _store_with(tmp_path / "d.sqlite", template, None, extra=[old])
    _, result = _scores(settings, path, tmp_path / "out")
    report = result.report
    assert report["counts"]["without_event"] == 1 and [r.request_id for r in result.rows] == ["A", "B", "C"]
    assert report["range"]["from"] == T0.isoformat() and report["range"]["to"] == (T0 + timedelta(seconds=200)
                                                                                   ).isoformat()
    assert report["models"]["live"] == {"live-7": 3} and report["models"]["candidate"] == card.version
    assert report["store"] == str(path)
    markdown = (tmp_path / "out" / "backtest.md").read_text()
    for text in (report["command"], report["range"]["from"], report["range"]["to"], "live-7", card.version,
                 "1 rows recorded without their event", "each label folded in from its arrival"):
        assert text in markdown
    assert json.loads((tmp_path / "out" / "backtest.json").read_text())["counts"]["without_event"] == 1


def test_the_command_runs_on_a_store_file(recorded, tmp_path):
    settings, card = recorded
    out = tmp_path / "report"
    args = ["backtest", "--model-dir", str(live_model_dir(settings.model.dir)),
            "--store", str(settings.store.sqlite_path), "--band-low", "0.05", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{RECORDED:,} decisions from" in result.output
    report = json.loads((out / "backtest.json").read_text())
    assert report["command"].startswith("riskcascade backtest ") and "--band-low 0.05" in report["command"]
    assert report["band"]["low"] == 0.05 and report["band"]["high"] == card.thresholds.band_high
    assert (out / "backtest.md").read_text().startswith(f"# Backtest of {card.version}")

    bad = CliRunner().invoke(main, [*args[:-1], "--since", "yesterday"])
    assert bad.exit_code != 0 and "ISO 8601" in bad.output


def test_the_command_reads_a_postgres_store_and_masks_its_password(trained, template, tmp_path, postgres_server):  # noqa: F811
    settings, card, _ = trained
    url = _store_with(create_database(postgres_server, f"bt_cli_{uuid.uuid4().hex[:8]}"), template,
                      T0 + timedelta(seconds=50))
    with_password = url.replace("riskcascade@", "riskcascade:s3cret@")  # the test server trusts loopback
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["backtest", "--model-dir", str(live_model_dir(settings.model.dir)),
                                       "--store", with_password, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "backtest.json").read_text())
    assert report["counts"]["decisions"] == 3 and report["counts"]["labelled"] == 1
    assert "s3cret" not in (out / "backtest.md").read_text() + json.dumps(report)
    assert report["store"] == url.replace("riskcascade@", "riskcascade:***@")
