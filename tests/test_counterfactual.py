"""Counterfactual explanations: the core search against scripted scorers (milliseconds), then a real small fast
model trained here, served through the replica's model shelf on its own entity state."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from pydantic import ValidationError

from orchestrator.convert import decision_to_proto
from orchestrator.servicer import fingerprint, request_fingerprint_of
from risk.v1 import decision_pb2 as pb
from riskcascade.core.config import DEFAULT_ACTIONABLE_FEATURES, ActionableFeature, TrainingSettings, load_settings
from riskcascade.core.counterfactual import candidates, find_counterfactuals, servable_actionable, targets_for
from riskcascade.core.domain import Action, ScoreRequest
from riskcascade.core.entity_state import EmbeddedEntityState
from riskcascade.core.features import FeatureLayout
from riskcascade.core.model_card import ModelCard
from riskcascade.core.model_registry import ModelRegistry, live_model_dir
from riskcascade.modelling.datasets.synthetic_source import synthetic_dataset
from riskcascade.modelling.synthetic import generate_events, split_events
from riskcascade.modelling.training import train_model
from services.scorer.fast_model import FastModel
from services.scorer.versions import ModelShelf

SPEC = DEFAULT_ACTIONABLE_FEATURES
EVENT = {"amount": 800.0, "amount_to_typical_ratio": 4.0, "shipping_billing_mismatch": 1.0, "promo_used": 1.0,
         "new_device": 1.0, "new_ip": 0.0, "account_age_days": 3.0}
LOW, HIGH = 0.3, 0.7


class Scripted:
    """A monotone scorer over the actionable features: each flag set adds its weight, money adds by the ratio (so a
    candidate that moved the amount but left the ratio would score as if nothing moved). Counts its calls."""

    def __init__(self, base: float, weights: dict[str, float], per_ratio: float = 0.0):
        self.base, self.weights, self.per_ratio, self.calls, self.rows = base, weights, per_ratio, 0, 0

    def score(self, f) -> float:  # noqa: ANN001 - a feature mapping
        money = self.per_ratio * f["amount_to_typical_ratio"]
        return self.base + sum(w * f[n] for n, w in self.weights.items()) + money

    def __call__(self, rows):  # noqa: ANN001, ANN204 - the ScoreRows callable
        self.calls += 1
        self.rows += len(rows)
        return [self.score(r) for r in rows]


def search(scorer: Scripted, features=EVENT, spec=SPEC, max_rows=512):  # noqa: ANN001, ANN201
    return find_counterfactuals(features, spec, scorer, scorer.score(features), LOW, HIGH, max_rows)


def test_an_event_below_the_band_gets_none_and_costs_no_model_run():
    scorer = Scripted(0.0, {"new_device": 0.1})
    assert search(scorer) == () and scorer.calls == 0
    assert targets_for(LOW - 1e-9, LOW, HIGH) == ()
    assert [t.action for t in targets_for(HIGH, LOW, HIGH)] == [Action.APPROVE, Action.REVIEW]


def test_fewest_features_first_then_the_smallest_relative_change_in_one_batch():
    # 0.25 + 0.05 + 0.05 + 4 * 0.04 = 0.51: in the band, so only the APPROVE target. Dropping the promo alone
    # (relative change 1.0) reaches it; no cheaper single change does (shipping comes first but is not enough)
    scorer = Scripted(0.0, {"promo_used": 0.25, "new_device": 0.05, "shipping_billing_mismatch": 0.05}, per_ratio=0.04)
    (cf,) = search(scorer)
    assert cf.found and cf.target is Action.APPROVE and cf.threshold == LOW
    assert [(c.feature, c.to_value) for c in cf.changes] == [("promo_used", 0.0)]
    assert cf.score == pytest.approx(0.26) and cf.original_score == pytest.approx(0.51)
    assert scorer.calls == 1 and cf.candidates == scorer.rows  # every candidate in one batch
    # among single-feature changes the smallest relative one: amount to 75% (ratio 4 -> 3) is enough, 90% is not
    scorer = Scripted(0.0, {"promo_used": 0.01}, per_ratio=0.09)
    (cf,) = search(scorer)  # 0.01 + 0.36 = 0.37; at 75%: 0.01 + 0.27 = 0.28 < 0.3; at 90%: 0.334
    assert [(c.feature, c.from_value, c.to_value, c.derived) for c in cf.changes] == [
        ("amount", 800.0, 600.0, False), ("amount_to_typical_ratio", 4.0, 3.0, True)]


def test_a_derived_feature_moves_with_the_one_it_derives_from():
    """The scorer sees money only through the ratio: ignoring moves_with would leave every amount candidate at the
    original score and the search would report none found."""
    scorer = Scripted(0.0, {}, per_ratio=0.1)  # 0.4: in the band
    (cf,) = search(scorer)
    assert cf.found
    amount, ratio = cf.changes
    assert ratio.feature == "amount_to_typical_ratio" and ratio.derived and amount.feature == "amount"
    assert ratio.to_value / ratio.from_value == pytest.approx(amount.to_value / amount.from_value)
    assert "amount" in ratio.action
    for c in candidates(EVENT, SPEC, 512):  # no candidate changes the amount without the ratio, or the other way
        changed = {x.feature for x in c.changes}
        assert ("amount" in changed) == ("amount_to_typical_ratio" in changed)


def test_a_block_also_gets_the_smallest_change_that_leaves_block():
    scorer = Scripted(0.0, {"shipping_billing_mismatch": 0.3, "promo_used": 0.3, "new_device": 0.2})  # 0.8
    to_approve, out_of_block = search(scorer)
    assert (to_approve.target, out_of_block.target) == (Action.APPROVE, Action.REVIEW)
    assert out_of_block.found and out_of_block.threshold == HIGH and out_of_block.score < HIGH
    # one feature is enough to leave BLOCK: the first flag in the actionable order (amount moves nothing here)
    assert [c.feature for c in out_of_block.changes] == ["shipping_billing_mismatch"]
    assert to_approve.found and to_approve.score < LOW
    assert [c.feature for c in to_approve.changes] == ["shipping_billing_mismatch", "promo_used"]  # first by order
    assert to_approve.original_score == out_of_block.original_score == pytest.approx(0.8)


def test_ties_break_by_the_actionable_order_and_spoofable_moves_say_so():
    scorer = Scripted(0.0, {"new_device": 0.2, "new_ip": 0.2, "account_age_days": 0.0})
    features = {**EVENT, "new_ip": 1.0, "shipping_billing_mismatch": 0.0, "promo_used": 0.0, "amount": 0.0}
    (cf,) = search(scorer, features)
    assert [c.feature for c in cf.changes] == ["new_device"] and cf.changes[0].spoofable  # before new_ip in SPEC
    assert search(scorer, features) == (cf,)  # deterministic


def test_none_found_is_said_never_invented():
    scorer = Scripted(0.35, {"account_age_days": 0.1})  # 0.65, and no actionable feature moves it
    (cf,) = search(scorer)
    assert not cf.found and cf.changes == () and cf.candidates > 0
    assert cf.score == pytest.approx(0.65)  # the lowest any candidate reached
    (cf,) = search(scorer, spec=())  # a card without actionable features: asked, nothing to try
    assert not cf.found and cf.candidates == 0


def test_missing_or_unmovable_features_offer_no_move_and_the_cut_keeps_the_smallest():
    features = {"amount": math.nan, "amount_to_typical_ratio": 2.0, "shipping_billing_mismatch": 0.0, "new_ip": 1.0}
    assert [[(x.feature, x.to_value) for x in c.changes] for c in candidates(features, SPEC, 512)] == [
        [("new_ip", 0.0)]]
    everything = candidates(EVENT, SPEC, 512)
    cut = candidates(EVENT, SPEC, 5)
    assert cut == everything[:5] and all(len({x.feature for x in c.changes if not x.derived}) == 1 for c in cut)


def test_actionable_settings_are_checked_and_filtered_to_the_model():
    with pytest.raises(ValidationError, match="exactly one of set_to and scale_to"):
        ActionableFeature(name="amount", set_to=(0.0,), scale_to=(0.5,), action="x")
    with pytest.raises(ValidationError, match="moves_with needs scale_to"):
        ActionableFeature(name="promo_used", set_to=(0.0,), moves_with=("amount",), action="x")
    with pytest.raises(ValidationError, match=r"in \(0, 1\)"):
        ActionableFeature(name="amount", scale_to=(1.5,), action="x")
    with pytest.raises(ValidationError, match="appear once"):
        TrainingSettings(actionable_features=(SPEC[0], SPEC[0]))
    kept = servable_actionable(SPEC, ["amount", "promo_used"])  # a data set without the ratio or the flags
    assert [(a.name, a.moves_with) for a in kept] == [("amount", ()), ("promo_used", ())]


def test_a_card_written_before_actionable_features_still_loads():
    body = {"version": "v0", "created_at": "2026-01-01", "feature_names": ["amount"], "feature_descriptions": {},
            "calibration": {"a": 1.0, "b": 0.0}, "thresholds": {"band_low": 0.2, "band_high": 0.8,
                                                                  "target_escalation_share": 0.1},
            "onnx": {"parity_max_abs_diff": 0.0}, "feature_scaling": {"mean": [0.0], "std": [1.0]}}
    assert ModelCard.model_validate(body).actionable == []


def test_explain_is_not_part_of_the_idempotency_key():
    plain = pb.DecideRequest(request_id="r1", event=pb.Event(type=pb.EVENT_TYPE_ORDER, features={"amount": 1.0}))
    explained = pb.DecideRequest()
    explained.CopyFrom(plain)
    explained.explain = True
    assert request_fingerprint_of(explained) == request_fingerprint_of(plain) == fingerprint(plain)
    assert explained.explain  # the caller's message is left as it was


# -- a real fast model ------------------------------------------------------------------------------------------

N_EVENTS = 2000
SEED = 9


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("counterfactual")
    parts = split_events(generate_events(N_EVENTS, SEED), SEED)
    settings = load_settings(model={"dir": str(root / "model")})
    card = train_model(settings, synthetic_dataset(parts), progress=False)
    return settings, card, parts


def _shelf(settings) -> ModelShelf:  # noqa: ANN001 - Settings
    """The replica's model shelf on a fresh in-memory entity state, as the Serve deployment builds it."""
    folder = live_model_dir(settings.model.dir)
    state = EmbeddedEntityState(FeatureLayout.load(folder).state)
    reported = settings.model.reported_state_features
    return ModelShelf(ModelRegistry(settings.model.dir), lambda f: FastModel(
        f, reason_count=0, prefer_gpu=False, state=state, reported_state_features=reported), folder)


def _request(e, band=None, features=None, request_id=None) -> ScoreRequest:  # noqa: ANN001
    return ScoreRequest.of(request_id or e.case_id, e.event_type, e.entities, dict(features or e.features),
                           occurred_at=e.occurred_at, counterfactual_band=band)


def test_training_writes_the_actionable_features_into_the_card(trained):
    _, card, _ = trained
    assert [a.name for a in card.actionable] == [a.name for a in SPEC]
    assert card.actionable[0].moves_with == ("amount_to_typical_ratio",)


def test_a_found_change_really_flips_the_served_model(trained):
    """Two replicas' shelves fed the same history; at the first event whose APPROVE counterfactual is found, one
    scores the event as asked and the other scores the changed event through the ordinary path (a new event on
    the same state): it lands below band_low with exactly the score the search reported, from the same
    entity-state features. Explaining folds nothing into the state beyond the event itself."""
    settings, card, parts = trained
    band = (card.thresholds.band_low, card.thresholds.band_high)
    asked, plain = _shelf(settings), _shelf(settings)
    approved_seen = found = None
    for e in parts["test"]:
        (scored,) = asked.score([_request(e, band)])
        if not scored.counterfactuals:
            assert scored.score < band[0]  # only an approval goes without
            approved_seen = True
        cf = scored.counterfactuals[0] if scored.counterfactuals else None
        if cf is not None and cf.found:
            found = (e, scored, cf)
            break
        plain.score([_request(e)])
    assert approved_seen and found, "the test split should hold approvals and a flippable event"
    e, scored, cf = found
    assert cf.target is Action.APPROVE and cf.original_score == scored.score >= band[0]
    changed = {**e.features, **{c.feature: c.to_value for c in cf.changes}}
    (rescored,) = plain.score([_request(e, features=changed, request_id=f"{e.case_id}-changed")])
    assert rescored.score < band[0]
    assert rescored.score == pytest.approx(cf.score, abs=1e-9)
    assert rescored.state_features == scored.state_features and scored.state_features  # the same state, not empty
    shelf_state = asked.model().state
    assert shelf_state.event_count() == plain.model().state.event_count()  # candidates were never folded in
    ratio = [c for c in cf.changes if c.feature == "amount_to_typical_ratio"]
    amount = [c for c in cf.changes if c.feature == "amount"]
    assert bool(ratio) == bool(amount)


def test_only_asking_rows_pay_and_a_model_without_actionable_features_finds_none(trained):
    settings, card, parts = trained
    band = (card.thresholds.band_low, card.thresholds.band_high)
    shelf = _shelf(settings)
    batch = parts["test"][:40]
    scored = shelf.score([_request(e, band if i % 2 else None) for i, e in enumerate(batch)])
    assert all(s.counterfactuals == () for s in scored[0::2])
    asked = scored[1::2]
    assert all(bool(s.counterfactuals) == (s.score >= band[0]) for s in asked)
    assert any(s.counterfactuals for s in asked)
    assert shelf.model().state.event_count() == len(batch)
    model = shelf.model()
    model.card.actionable = []  # a card written before actionable features: asked, nothing to try, none found
    cfs = model.counterfactuals(_request(batch[1], band), None, band[1])
    assert [(c.target, c.found, c.candidates) for c in cfs] == [(Action.APPROVE, False, 0), (Action.REVIEW, False, 0)]


def test_the_decision_message_carries_the_counterfactual():
    from datetime import datetime, timezone

    from riskcascade.core.domain import Counterfactual, Decision, EventType, FeatureChange, Stage

    cf = Counterfactual(Action.APPROVE, 0.3, True, (FeatureChange("new_ip", 1.0, 0.0, "use a known network", True),),
                        0.2, 0.5, 12)
    d = Decision("r", EventType.ORDER, Action.REVIEW, 0.5, Stage.REASONER, True, (), (), "m", "p", (), "t", False,
                 "", datetime.now(timezone.utc), counterfactuals=(cf, replace(cf, target=Action.REVIEW, found=False,
                                                                             changes=())))
    msg = pb.Decision.FromString(decision_to_proto(d).SerializeToString())
    first, second = msg.counterfactuals
    assert first.target_action == pb.ACTION_APPROVE and first.found and first.candidates == 12
    assert [(c.feature, c.from_value, c.to_value, c.spoofable) for c in first.changes] == [("new_ip", 1.0, 0.0, True)]
    assert second.target_action == pb.ACTION_REVIEW and not second.found and not second.changes


def test_the_explain_command_writes_its_report(trained, tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from riskcascade.cli import main
    from riskcascade.modelling.synthetic import write_events_csv

    settings, card, parts = trained
    data = tmp_path / "data"
    for name in ("train", "valid", "test"):
        write_events_csv(data / f"{name}.csv", parts[name])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"dir": str(settings.model.dir)}, "data": {"dir": str(data)}}))
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["explain", "--config", str(config), "--limit", "200", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["model_version"] == card.version and report["events"] == 200
    asked = report["at_or_above_band"]
    assert asked and sum(v for k, v in report["outcomes"].items() if k.startswith("approve:")) == asked
    assert report["command"].startswith("riskcascade explain") and "report.md" in result.output
    assert (out / "report.md").read_text().startswith("# Counterfactual explanations")
