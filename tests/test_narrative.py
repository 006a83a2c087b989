"""Event narratives: the outcome-free text cases and query events are both embedded by."""

from __future__ import annotations

from dataclasses import replace

import pytest

from retrieval.case_nodes import case_narrative
from retrieval.narrative import event_narrative, feature_facts
from riskcascade.core.domain import RISK_TYPES, EventType, Outcome
from riskcascade.modelling.synthetic import generate_events, to_adjudicated_case

LABEL_WORDS = ("fraud", "legitimate", "verdict", *RISK_TYPES, *(r.replace("_", " ") for r in RISK_TYPES))


@pytest.fixture(scope="module")
def cases():
    return [to_adjudicated_case(e) for e in generate_events(600, seed=5)]


def test_no_label_leaks_into_the_narrative(cases):
    fraud = [c for c in cases if c.outcome is Outcome.FRAUD]
    assert {c.risk_type for c in fraud} == set(RISK_TYPES)  # every label is exercised
    for case in cases:
        narrative = case_narrative(case).lower()
        assert not [word for word in LABEL_WORDS if word in narrative], narrative
        # the summary says the verdict; the narrative of the same event with the other verdict is the same text
        flipped = replace(case, outcome=Outcome.LEGITIMATE, risk_type="", summary="")
        assert case_narrative(flipped) == case_narrative(case)
    assert any("fraud" in c.summary for c in fraud)


def test_same_facts_give_the_same_text():
    features = {"amount": 123.45, "account_age_days": 347.0, "new_device": 1.0, "new_ip": 0.0}
    text = {"note": "Leave at the front door.", "comment": "Thanks"}
    first = event_narrative(EventType.ORDER, features, text)
    assert event_narrative(EventType.ORDER, dict(reversed(features.items())), dict(reversed(text.items()))) == first
    # numbers are rounded to two significant digits: nearby values read the same
    nearby = {**features, "amount": 118.2, "account_age_days": 351.0}
    assert event_narrative(EventType.ORDER, nearby, text) == first
    assert first.startswith("Order 120 from 350-day-old account, new device.")
    assert event_narrative(EventType.ORDER, {**features, "amount": 250.0}, text) != first
    assert event_narrative(EventType.PAYOUT, features, text) != first


def test_free_text_is_quoted_after_the_facts_one_line():
    narrative = event_narrative(
        EventType.ORDER,
        {"amount": 40.0, "shipping_billing_mismatch": 1.0},
        {"note": 'Ship to  freight forwarder,\nref "88".', "gift_message": "Happy birthday", "empty": "  "},
    )
    assert narrative == (
        'Order 40, shipping differs from billing. Gift message: "Happy birthday" '
        "Note: \"Ship to freight forwarder, ref '88'.\""
    )


def test_missing_features_are_not_mentioned():
    assert event_narrative(EventType.LOGIN, {}, {}) == "Login."
    nan = float("nan")
    assert event_narrative(EventType.ORDER, {"amount": nan, "account_age_days": 12.0, "new_ip": nan}, {}) == (
        "Order from 12-day-old account."
    )
    review = event_narrative(EventType.REVIEW, {"review_rating": 5.0}, {"note": "A+++"})
    assert review == 'Review, 5-star review. Note: "A+++"'


@pytest.mark.parametrize(
    "amount,written",
    [(123.45, "120"), (6.34, "6.3"), (0.0449, "0.045"), (1234.0, "1200"), (9.96, "10"), (45.0, "45"), (0.5, "0.5")],
)
def test_amounts_keep_two_significant_digits(amount, written):
    assert event_narrative(EventType.PAYOUT, {"amount": amount}, {}) == f"Payout {written}."


def test_display_facts_are_exact_and_shared_with_the_summary(cases):
    features = {"amount": 123.45, "account_age_days": 347.0, "ip_account_count": 64.0, "failed_logins_24h": 2.0}
    assert feature_facts(EventType.ORDER, features, precise=True) == [
        "order 123.45 from 347-day-old account", "on IP shared by 64 accounts", "2 failed logins"
    ]
    case = cases[0]
    assert case.summary.startswith(", ".join(feature_facts(case.event_type, case.features, precise=True)))


@pytest.mark.parametrize("amount", [1.7976931348623157e308, 1e308, 5e-324])
def test_any_finite_amount_is_narrated(amount):
    # round() overflows near the largest double: the narrative (and so indexing such a case) must not raise
    assert event_narrative(EventType.PAYOUT, {"amount": amount, "account_age_days": -amount}, {}).startswith("Payout")
