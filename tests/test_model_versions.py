"""Model versions: the registry (atomic publish, the live pointer, rollback), a replica's shelf of loaded versions,
and the gateway's switch (load everywhere first, then band, inputs and validation in one step). The switch under
load on the running platform is in tests/test_model_switch.py."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from orchestrator.models import ModelSelection, ModelSwitcher, ServingModel, SwitchRefused, UnknownVersion
from riskcascade.core.config import EscalationSettings
from riskcascade.core.domain import FastScore, ScoreRequest, ScorerInfo
from riskcascade.core.entity_state import StateLayout
from riskcascade.core.features import LAYOUT_FILE
from riskcascade.core.model_card import (
    CARD_FILE,
    CalibrationSpec,
    FeatureScaling,
    ModelCard,
    OnnxSpec,
    Thresholds,
    write_model_card,
)
from riskcascade.core.model_registry import LIVE_FILE, ModelRegistry, UnknownModelVersion, live_model_dir
from services.scorer.versions import ModelShelf, VersionNotLoaded

STATE = StateLayout(links=("account_id",), aggregated=("amount",), windows_s=(3600,), retention_s=86400)


def write_version(folder: Path, version: str, band: tuple[float, float] = (0.2, 0.8),
                  state: StateLayout | None = STATE, created_at: str = "2026-11-30T10:00:00+00:00") -> ModelCard:
    """A model folder as far as the registry and the switch read it: the card and the feature layout."""
    folder.mkdir(parents=True, exist_ok=True)
    card = ModelCard(
        version=version, created_at=created_at, feature_names=["amount"], feature_descriptions={"amount": "amount"},
        calibration=CalibrationSpec(a=1.0, b=0.0),
        thresholds=Thresholds(band_low=band[0], band_high=band[1], target_escalation_share=0.1),
        onnx=OnnxSpec(parity_max_abs_diff=0.0), feature_scaling=FeatureScaling(mean=[0.0], std=[1.0]),
    )
    (folder / LAYOUT_FILE).write_text(json.dumps({
        "numeric": ["amount"], "categorical": {}, "links": list(state.links) if state else [],
        "aggregated": list(state.aggregated) if state else [], "graph": [], "descriptions": {},
        "uses_edges": False, "state": state.to_json() if state else None,
    }))
    write_model_card(folder, card)
    return card


def publisher(version: str, **kwargs):  # noqa: ANN201
    return lambda folder: write_version(folder, version, **kwargs)


# -- the registry ------------------------------------------------------------------------------------------------

def test_publish_renames_a_whole_version_into_place_and_only_the_first_goes_live(tmp_path):
    registry = ModelRegistry(tmp_path / "model")
    registry.publish(publisher("v1", created_at="2026-11-30T10:00:00+00:00"))
    assert registry.live() == "v1" and live_model_dir(registry.root) == registry.root / "versions" / "v1"
    registry.publish(publisher("v2", created_at="2026-11-30T11:00:00+00:00"))
    assert registry.names() == ["v1", "v2"] and registry.live() == "v1"  # published, not switched to
    assert [p.name for p in registry.root.iterdir() if p.name.startswith(".")] == []  # no staging left
    with pytest.raises(FileExistsError, match="v2 is already published"):
        registry.publish(publisher("v2"))
    assert (registry.path("v2") / CARD_FILE).exists()  # the published one untouched by the refused one


def test_a_publish_that_fails_halfway_leaves_no_version_and_no_staging(tmp_path):
    registry = ModelRegistry(tmp_path / "model")
    registry.publish(publisher("v1"))

    def half(folder: Path) -> ModelCard:
        (folder / "model.onnx").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        registry.publish(half)
    assert registry.names() == ["v1"] and registry.live() == "v1"
    assert sorted(p.name for p in registry.root.iterdir()) == [LIVE_FILE, "versions"]


def test_the_pointer_records_history_and_rollback_goes_to_the_version_replaced(tmp_path):
    registry = ModelRegistry(tmp_path / "model")
    for i, v in enumerate(("v1", "v2", "v3")):
        registry.publish(publisher(v, created_at=f"2026-11-30T1{i}:00:00+00:00"))
    assert registry.previous() is None
    registry.set_live("v3", "try v3")
    assert registry.previous() == "v1"
    registry.set_live("v2", "v3 was worse")
    assert (registry.live(), registry.previous()) == ("v2", "v3")
    assert [(s.version, s.reason) for s in registry.history()] == [
        ("v1", "published"), ("v3", "try v3"), ("v2", "v3 was worse")]
    with pytest.raises(UnknownModelVersion, match=r"no model version 'v9'.*v1, v2, v3"):
        registry.set_live("v9", "typo")
    for bad in ("", "../v1", ".staging-x"):
        with pytest.raises(UnknownModelVersion):
            registry.path(bad)
    assert registry.live() == "v2"


def test_a_flat_model_serves_from_its_folder_until_a_version_is_published_beside_it(tmp_path):
    root = tmp_path / "model"
    write_version(root, "flat-1")
    registry = ModelRegistry(root)
    assert registry.live() is None and live_model_dir(root) == root
    registry.publish(publisher("v2", created_at="2026-12-01T00:00:00+00:00"))
    # the flat model became a version (and stayed live); the new one waits for a switch
    assert registry.names() == ["flat-1", "v2"] and registry.live() == "flat-1"
    assert (root / CARD_FILE).exists()  # left in place: a platform may be serving it


# -- a replica's shelf -------------------------------------------------------------------------------------------

@dataclass
class FakeModel:
    """Stands in for FastModel: scores each row with its version's constant."""

    version: str
    value: float
    calls: list[list[str]]

    @property
    def card(self):  # noqa: ANN201
        return type("Card", (), {"version": self.version})()

    def fold(self, requests):  # noqa: ANN001, ANN201
        self.calls.append(["fold", *[r.request_id for r in requests]])
        return "folded"

    def score_batch(self, requests, state_features=None, live=True):  # noqa: ANN001, ANN201
        self.calls.append([r.request_id for r in requests] if state_features is None
                          else ["scored", state_features, live, *[r.request_id for r in requests]])
        return [FastScore(self.value, self.value, (), self.version, "cpu") for _ in requests]


def shelf_with(tmp_path: Path, versions: list[str]) -> tuple[ModelShelf, list[str]]:
    registry = ModelRegistry(tmp_path / "model")
    for i, v in enumerate(versions):
        registry.publish(publisher(v, created_at=f"2026-11-30T1{i}:00:00+00:00"))
    loads: list[str] = []

    def load(folder: Path) -> FakeModel:
        loads.append(folder.name)
        return FakeModel(folder.name, float(versions.index(folder.name)), [])

    return ModelShelf(registry, load, registry.live_dir()), loads


def test_a_shelf_scores_each_request_with_the_version_it_names_and_loads_only_what_it_keeps(tmp_path):
    shelf, loads = shelf_with(tmp_path, ["v1", "v2", "v3"])
    assert shelf.loaded == ("v1",) and loads == ["v1"]  # the live one, at start
    shelf.keep(["v2", "v1"])
    assert shelf.loaded == ("v2", "v1") and shelf.default == "v2" and loads == ["v1", "v2"]
    requests = [ScoreRequest(f"r{i}", {}, model_version=v) for i, v in enumerate(["v1", "", "v2", "v1"])]
    scored = shelf.score(requests)
    assert [s.model_version for s in scored] == ["v1", "v2", "v2", "v1"]  # "" = the default
    assert shelf.model("v1").calls == [["r0", "r3"]] and shelf.model("v2").calls == [["r1", "r2"]]  # one run each
    shelf.keep(["v2"])
    assert shelf.loaded == ("v2",)
    # a version asked for before this replica loaded it is loaded then (a replica that missed an update)
    assert [s.model_version for s in shelf.score([ScoreRequest("late", {}, model_version="v3")])] == ["v3"]
    with pytest.raises(VersionNotLoaded, match="no model version 'v9'"):
        shelf.score([ScoreRequest("bad", {}, model_version="v9")])


# -- the gateway's switch ----------------------------------------------------------------------------------------

def info_of(card: ModelCard) -> ScorerInfo:
    t = card.thresholds
    return ScorerInfo(card.version, tuple(card.feature_names), t.band_low, t.band_high, "CPUExecutionProvider", "")


class Replicas:
    """The scorer as the switch sees it: ``apply`` sets the versions every replica keeps (recorded, with what was
    live at that moment), ``info`` describes a kept version."""

    def __init__(self, registry: ModelRegistry, selection_ref: list, fail_apply: bool = False):
        self.registry, self.selection_ref, self.fail_apply = registry, selection_ref, fail_apply
        self.kept: tuple[str, ...] = ()
        self.applied: list[tuple[tuple[str, ...], str]] = []

    async def apply(self, versions: tuple[str, ...]) -> None:
        self.applied.append((versions, self.selection_ref[0].live.version))
        if self.fail_apply:
            raise RuntimeError("replica failed to load")
        self.kept = versions

    async def info(self, timeout_s: float, version: str | None = None) -> ScorerInfo:
        assert version in self.kept, "described before every replica loaded it"
        return info_of(ModelRegistry(self.registry.root).versions()[self.registry.names().index(version)].card)


def switcher_for(tmp_path: Path, fail_apply: bool = False, **candidate) -> tuple[ModelSwitcher, Replicas]:  # noqa: ANN003
    registry = ModelRegistry(tmp_path / "model")
    live_card = registry.publish(publisher("v1", band=(0.2, 0.8), created_at="2026-11-30T10:00:00+00:00"))
    registry.publish(publisher("v2", **{"band": (0.3, 0.7), "created_at": "2026-11-30T11:00:00+00:00", **candidate}))
    selection = ModelSelection(ServingModel.of(info_of(live_card), EscalationSettings()))
    replicas = Replicas(registry, [selection], fail_apply)
    return ModelSwitcher(selection, replicas, replicas.apply, registry, EscalationSettings(), 1.0, 3), replicas


def test_a_switch_loads_the_version_everywhere_first_then_switches_band_and_inputs_in_one_step(tmp_path):
    switcher, replicas = switcher_for(tmp_path)
    result = asyncio.run(switcher.use("v2", "better AP"))
    assert result.changed and result.previous.version == "v1"
    # the replicas kept both while the gateway still served v1: calls in flight finish on the version they named
    assert replicas.applied == [(("v2", "v1"), "v1")]
    live = switcher.selection.live
    assert (live.version, live.policy.band_low, live.policy.band_high) == ("v2", 0.3, 0.7)
    assert switcher.selection.previous.version == "v1"
    assert ModelRegistry(tmp_path / "model").live() == "v2"  # a restart serves it too
    again = asyncio.run(switcher.use("v2", "again"))
    assert not again.changed and len(replicas.applied) == 1
    back = asyncio.run(switcher.rollback("v2 blocked too much"))
    assert back.live.version == "v1" and back.live.policy.band_low == 0.2
    assert ModelRegistry(tmp_path / "model").history()[-1].reason == "v2 blocked too much"


def test_a_configured_band_wins_over_the_new_cards_as_at_start_up(tmp_path):
    switcher, _ = switcher_for(tmp_path)
    switcher._escalation = EscalationSettings(band_low=0.25, band_high=0.9)
    live = asyncio.run(switcher.use("v2", "x")).live
    assert (live.policy.band_low, live.policy.band_high) == (0.25, 0.9)


@pytest.mark.parametrize("case", ["unknown", "other_state", "apply_fails"])
def test_a_refused_or_failed_switch_leaves_the_live_version_and_the_pointer_alone(tmp_path, case):
    other = StateLayout(links=("device_id",), aggregated=("amount",), windows_s=(60,), retention_s=600)
    switcher, replicas = switcher_for(tmp_path, fail_apply=case == "apply_fails",
                                      **({"state": other} if case == "other_state" else {}))
    version = "v9" if case == "unknown" else "v2"
    expected = {"unknown": UnknownVersion, "other_state": SwitchRefused, "apply_fails": RuntimeError}[case]
    with pytest.raises(expected):
        asyncio.run(switcher.use(version, "x"))
    assert switcher.selection.live.version == "v1" and switcher.selection.previous is None
    assert ModelRegistry(tmp_path / "model").live() == "v1"
    # refused before any replica was touched, unless the replicas themselves failed
    assert len(replicas.applied) == (1 if case == "apply_fails" else 0)


def test_a_decision_keeps_the_version_it_started_with_when_a_switch_lands_meanwhile(tmp_path):
    """The cascade reads the live model once: a switch while the fast model is being asked does not route that
    score on the new band, and the score request names the version picked."""
    from orchestrator.breaker import CircuitBreaker
    from orchestrator.cascade import Cascade, StageLimits
    from riskcascade.core.config import MergeSettings
    from riskcascade.core.domain import Entities, EventType, RiskEvent
    from riskcascade.core.merge import MergeRules
    from riskcascade.core.policy import EscalationPolicy

    old = ServingModel(ScorerInfo("v1", ("amount",), 0.2, 0.8, "cpu", ""), EscalationPolicy(0.2, 0.8, 0.0, 8))
    new = ServingModel(ScorerInfo("v2", ("amount",), 0.05, 0.1, "cpu", ""), EscalationPolicy(0.05, 0.1, 0.0, 8))
    selection = ModelSelection(old)
    asked: list[str] = []

    class Scorer:
        async def score(self, request: ScoreRequest, timeout_s: float) -> FastScore:
            asked.append(request.model_version)
            selection.live = new  # the switch lands while this call is out
            return FastScore(0.15, 0.15, (), request.model_version, "cpu")

    breakers = [CircuitBreaker(n, 3, 1.0) for n in ("fast", "reasoner")]
    cascade = Cascade(Scorer(), None, selection, MergeRules.from_settings(MergeSettings()), "p", 0.0,
                      StageLimits({t: 0.1 for t in EventType}, 1.0), *breakers, 4)
    event = RiskEvent("r1", EventType.ORDER, Entities(account_id="a"), {"amount": 1.0})
    decision = asyncio.run(cascade.decide(event, deadline=float("inf")))
    # 0.15 is below v1's band (approve); on v2's band it would have been a block
    assert asked == ["v1"] and decision.model_version == "v1" and decision.action.value == "approve"
    second = asyncio.run(cascade.decide(replace(event, request_id="r2"), deadline=float("inf")))
    assert asked[-1] == "v2" and second.action.value == "block"


def test_model_commands_list_and_move_the_pointer_of_a_stopped_platform(tmp_path):
    from click.testing import CliRunner

    from riskcascade.cli import main

    registry = ModelRegistry(tmp_path / "model")
    registry.publish(publisher("v1", created_at="2026-11-30T10:00:00+00:00"))
    registry.publish(publisher("v2", created_at="2026-11-30T11:00:00+00:00"))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"dir": str(tmp_path / "model")},
                                  "server": {"pid_file": str(tmp_path / "none.pid")}}))
    runner = CliRunner()
    listed = runner.invoke(main, ["model", "list", "--config", str(config)])
    assert listed.exit_code == 0 and "* v1" in listed.output and "  v2" in listed.output
    used = runner.invoke(main, ["model", "use", "v2", "--config", str(config), "--reason", "try it"])
    assert used.exit_code == 0 and "v2 is live" in used.output and registry.live() == "v2"
    assert registry.history()[-1].reason == "try it"
    back = runner.invoke(main, ["model", "use", "--rollback", "--config", str(config)])
    assert back.exit_code == 0 and registry.live() == "v1"
    unknown = runner.invoke(main, ["model", "use", "v9", "--config", str(config)])
    assert unknown.exit_code != 0 and "no model version 'v9'" in unknown.output and registry.live() == "v1"
    both = runner.invoke(main, ["model", "use", "v2", "--rollback", "--config", str(config)])
    assert both.exit_code != 0 and registry.live() == "v1"



# -- shadow mode ---------------------------------------------------------------------------------------------------

def test_a_shelf_scores_a_shadow_from_the_same_fold_of_the_state(tmp_path):
    shelf, _ = shelf_with(tmp_path, ["v1", "v2"])
    shelf.keep(["v1", "v2"])
    requests = [ScoreRequest(f"r{i}", {}, model_version="v1", shadow_version="v2") for i in range(2)]
    scored = shelf.score(requests)
    assert [(s.model_version, s.score, s.shadow_version, s.shadow_score) for s in scored] == [
        ("v1", 0.0, "v2", 1.0)] * 2
    # the live version folded the rows once and scored them; the shadow scored the same fold, as not live
    assert shelf.model("v1").calls == [["fold", "r0", "r1"], ["scored", "folded", True, "r0", "r1"]]
    assert shelf.model("v2").calls == [["scored", "folded", False, "r0", "r1"]]
    # a shadow naming the live version itself is no second run
    assert shelf.score([ScoreRequest("r9", {}, model_version="v1", shadow_version="v1")])[0].shadow_score is None


def test_a_candidate_decides_on_its_own_band_and_reuses_only_the_live_reasoners_outcome():
    from riskcascade.core.domain import Action
    from riskcascade.core.policy import EscalationPolicy
    from riskcascade.core.shadow import FROM_FAST_MODEL, FROM_LIVE_REASONER, FROM_UNDECIDED, candidate_action

    band = EscalationPolicy(0.3, 0.7, 0.0, 8)
    assert candidate_action(0.1, band, True, Action.BLOCK, Action.REVIEW) == (Action.APPROVE, False, FROM_FAST_MODEL)
    assert candidate_action(0.7, band, False, Action.APPROVE, Action.REVIEW) == (Action.BLOCK, False, FROM_FAST_MODEL)
    assert candidate_action(0.5, band, True, Action.BLOCK, Action.REVIEW) == (Action.BLOCK, True, FROM_LIVE_REASONER)
    assert candidate_action(0.5, band, False, Action.APPROVE, Action.REVIEW) == (Action.REVIEW, True, FROM_UNDECIDED)


def test_the_cascade_records_the_shadows_decision_and_returns_the_live_one(tmp_path):
    from orchestrator.breaker import CircuitBreaker
    from orchestrator.cascade import Cascade, StageLimits
    from orchestrator.convert import decision_to_proto
    from orchestrator.models import Shadow
    from orchestrator.store import DecisionRecord, SQLiteDecisionStore, shadow_json
    from riskcascade.core.config import MergeSettings
    from riskcascade.core.domain import Entities, EventType, RiskEvent
    from riskcascade.core.merge import MergeRules
    from riskcascade.core.policy import EscalationPolicy

    live = ServingModel(ScorerInfo("v1", ("amount",), 0.2, 0.8, "cpu", ""), EscalationPolicy(0.2, 0.8, 0.0, 8))
    candidate = ServingModel(ScorerInfo("v2", ("amount",), 0.05, 0.1, "cpu", ""), EscalationPolicy(0.05, 0.1, 0.0, 8))
    selection = ModelSelection(live)
    selection.shadow = Shadow(candidate, "p+shadow")
    asked: list[ScoreRequest] = []

    class Scorer:
        async def score(self, request: ScoreRequest, timeout_s: float) -> FastScore:
            asked.append(request)
            return FastScore(0.15, 0.15, (), request.model_version, "cpu", shadow_score=0.12,
                             shadow_version=request.shadow_version)

    breakers = [CircuitBreaker(n, 3, 1.0) for n in ("fast", "reasoner")]
    cascade = Cascade(Scorer(), None, selection, MergeRules.from_settings(MergeSettings()), "p", 0.0,
                      StageLimits({t: 0.1 for t in EventType}, 1.0), *breakers, 4)
    event = RiskEvent("r1", EventType.ORDER, Entities(account_id="a"), {"amount": 1.0})
    decision = asyncio.run(cascade.decide(event, deadline=float("inf")))
    assert (asked[0].model_version, asked[0].shadow_version) == ("v1", "v2")
    assert decision.action.value == "approve" and decision.model_version == "v1"  # the live decision
    shadow = decision.shadow
    assert (shadow.model_version, shadow.policy_version, shadow.score, shadow.action.value, shadow.action_from) == (
        "v2", "p+shadow", 0.12, "block", "fast_model")  # 0.12 is at or above v2's high edge
    assert "v2" not in str(decision_to_proto(decision))  # never returned
    # recorded with the decision, in the same row
    store = SQLiteDecisionStore(tmp_path / "d.sqlite")
    try:
        record = DecisionRecord("r1", "fp", "approve", 0.15, "fast_model", "order", False, "2026-11-30T00:00:00+00:00",
                                b"", b"", shadow=shadow_json(shadow))
        asyncio.run(store.put_decision(record))
        stored = json.loads(store.get_decision("r1").shadow)
        assert (stored["model_version"], stored["action"], stored["band_high"]) == ("v2", "block", 0.1)
    finally:
        store.close()
    selection.shadow = None
    assert asyncio.run(cascade.decide(replace(event, request_id="r2"), deadline=float("inf"))).shadow is None
    assert asked[-1].shadow_version == ""


def test_a_store_from_before_shadows_gains_the_column_and_keeps_its_rows(tmp_path):
    import sqlite3

    from orchestrator.store import SQLiteDecisionStore

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE decisions (request_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, action TEXT NOT "
                 "NULL, risk_score REAL NOT NULL, decided_by TEXT NOT NULL, event_type TEXT NOT NULL, degraded "
                 "INTEGER NOT NULL, decided_at TEXT NOT NULL, payload BLOB NOT NULL, event BLOB NOT NULL DEFAULT "
                 "x'', attempts INTEGER NOT NULL DEFAULT 1)")
    conn.execute("INSERT INTO decisions VALUES ('old', 'fp', 'block', 0.9, 'fast_model', 'order', 0, "
                 "'2026-01-01T00:00:00+00:00', x'', x'', 1)")
    conn.commit()
    conn.close()
    store = SQLiteDecisionStore(path)
    try:
        old = store.get_decision("old")
        assert (old.action, old.shadow) == ("block", "")
    finally:
        store.close()


def test_the_shadow_report_compares_with_the_live_decisions_and_the_outcomes_known(tmp_path):
    from datetime import datetime, timezone

    from orchestrator.store import DecisionRecord, FeedbackRecord, SQLiteDecisionStore
    from risk.v1 import decision_pb2 as pb
    from riskcascade.core.config import load_settings
    from riskcascade.shadow_report import run_shadow_report

    def shadow(action: str, escalated: bool = False) -> str:
        return json.dumps({"model_version": "v2", "policy_version": "p+shadow", "score": 0.5, "band_low": 0.1,
                           "band_high": 0.4, "action": action, "escalated": escalated, "action_from": "fast_model"})

    store = SQLiteDecisionStore(tmp_path / "d.sqlite")
    rows = [  # request, live action, shadow action, label, label arrives
        ("fraud-missed-live", "approve", "block", "fraud", "2026-11-30T10:00:00+00:00"),
        ("legit-blocked-live", "block", "approve", "legitimate", "2026-11-30T10:00:00+00:00"),
        ("label-too-late", "approve", "block", "fraud", "2026-12-02T00:00:00+00:00"),
        ("agree", "approve", "approve", None, None),
    ]
    try:
        for request_id, live, candidate, _, _ in rows:
            payload = pb.Decision(request_id=request_id, model_version="v1").SerializeToString()
            asyncio.run(store.put_decision(DecisionRecord(
                request_id, "fp", live, 0.5, "fast_model", "order", False, "2026-11-30T09:00:00+00:00", payload, b"",
                shadow=shadow(candidate))))
        for request_id, _, _, label, at in rows:
            if label:
                asyncio.run(store.put_feedback(FeedbackRecord(f"fb-{request_id}", request_id, label, "", "", at)))
    finally:
        store.close()
    settings = load_settings(store={"sqlite_path": str(tmp_path / "d.sqlite")})
    report = run_shadow_report(settings, tmp_path / "out", as_of=datetime(2026, 12, 1, tzinfo=timezone.utc))
    live, candidate = report["live"], report["candidate"]
    assert report["counts"] == {"decisions": 4, "labelled": 2, "agree": 1, "candidate_from": {"fast_model": 4}}
    assert (live["fraud_caught"], live["false_positives"]) == (0, 1)  # the late label is not known yet
    assert (candidate["fraud_caught"], candidate["false_positives"]) == (1, 0)
    assert report["transitions"]["approve"]["block"] == 2 and report["models"]["live"] == {"v1": 4}
    assert "4 decisions" in (tmp_path / "out" / "shadow.md").read_text()
