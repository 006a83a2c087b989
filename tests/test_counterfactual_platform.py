"""Decide with explain=true against the real platform: the counterfactual it returns, re-sent as a new event, is
approved by the fast model."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from loadtest.events import decide_request
from risk.v1 import decision_pb2 as pb
from riskcascade.core.domain import Entities, ScoreRequest
from riskcascade.core.model_registry import live_model_dir
from riskcascade.modelling.synthetic import LabelledEvent, event_text, read_events_csv
from services.scorer.fast_model import FastModel

pytestmark = pytest.mark.slow


def fresh(e: LabelledEvent, tag: str) -> LabelledEvent:
    """``e`` by entities never seen (the same links present; ``tag`` 12 hex digits, the IP from 2001:db8::/32, the
    documentation prefix): its entity-state features are those of an empty
    state whenever it is sent, so the event and its changed copy see the same state, on the platform and here."""
    en = e.entities
    return dataclasses.replace(e, entities=Entities(
        account_id=f"cf-{tag}-a", seller_id=en.seller_id and f"cf-{tag}-s", device_id=en.device_id and f"cf-{tag}-d",
        ip=en.ip and f"2001:db8:{tag[:4]}:{tag[4:8]}::{tag[8:12]}",
        payment_instrument_id=en.payment_instrument_id and f"cf-{tag}-p"))


def test_a_counterfactual_resent_as_a_new_event_is_approved_by_the_fast_model(stub, platform):
    folder = live_model_dir(platform.workdir / "model")
    model = FastModel(folder, reason_count=0, prefer_gpu=False)  # its own empty state: what fresh entities meet
    low, high = platform.state["band"]
    blocked = in_band = None
    for e in read_events_csv(platform.workdir / "data" / "test.csv"):  # find one here: flippable, fresh entities
        e = fresh(e, uuid.uuid4().hex[:12])
        request = ScoreRequest.of(e.case_id, e.event_type, e.entities, dict(e.features), occurred_at=e.occurred_at,
                                  counterfactual_band=(low, high), text=event_text(e))
        folded = model.fold([request])
        (scored,) = model.with_counterfactuals([request], folded, model.score_batch([request], folded))
        if scored.counterfactuals and scored.counterfactuals[0].found:
            if scored.score >= high:
                blocked = (e, scored)
                break
            in_band = in_band or (e, scored)
    found = blocked or in_band
    assert found, "the test split should hold an event an actionable change flips"
    e, expected = found
    # a BLOCK stays with the fast model; an in-band event under 0.6 s gets a REVIEW without the reasoner (which
    # might approve it, and an approval carries no counterfactual)
    request = decide_request(e, f"cf-{uuid.uuid4().hex[:16]}")
    request.explain = True
    d = stub.Decide(request, timeout=10 if blocked else 0.6).decision
    assert d.action in (pb.ACTION_BLOCK, pb.ACTION_REVIEW)
    assert d.fast_score == pytest.approx(expected.score, abs=1e-9)
    cf = d.counterfactuals[0]
    assert cf.found and cf.target_action == pb.ACTION_APPROVE and cf.threshold == pytest.approx(low)
    assert [(c.feature, c.to_value) for c in cf.changes] == [(c.feature, c.to_value)
                                                             for c in expected.counterfactuals[0].changes]
    assert len(d.counterfactuals) == (2 if d.fast_score >= high else 1)
    # stored with the decision
    stored = stub.GetDecision(pb.GetDecisionRequest(request_id=request.request_id), timeout=10).decision
    assert list(stored.counterfactuals) == list(d.counterfactuals)

    changed = dataclasses.replace(fresh(e, uuid.uuid4().hex[:12]),
                                  features={**e.features, **{c.feature: c.to_value for c in cf.changes}})
    again = stub.Decide(decide_request(changed, f"cf-{uuid.uuid4().hex[:16]}"), timeout=10).decision
    assert again.action == pb.ACTION_APPROVE and again.decided_by == pb.STAGE_FAST_MODEL
    assert again.fast_score == pytest.approx(cf.score, abs=1e-9) and again.fast_score < low
    assert not again.counterfactuals  # not asked
