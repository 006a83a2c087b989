"""An event told in plain words: the text a case and a query event are both embedded by (the ``narrative`` vector).

``event_narrative`` is the one function for stored cases and for query events, so their embeddings are comparable:
plain-language facts from the features, then the event's free-text fields, quoted. It never sees the outcome, so
a query cannot leak a label into the search and a stored case's narrative says nothing its features and text do
not already say. The display ``summary`` of a case (``riskcascade.modelling.synthetic``) uses the same fact phrases with
exact numbers and appends the verdict.

Numbers are rounded to two significant digits in a narrative (an order of 123.45 and one of 118.20 both read
"order 120"): a text embedder barely tells such numbers apart, and fewer distinct narratives means fewer texts to
embed when indexing (identical narratives are embedded once). Features that are missing (absent or NaN) are not
mentioned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from riskcascade.core.domain import EventType

NARRATIVE_VERSION = 1
"""Bump when the wording changes: stored narrative vectors are only comparable with queries worded the same way
(the index identity includes it, so ``riskcascade up`` re-indexes)."""

SIGNIFICANT_DIGITS = 2
SHARED_ENTITY_MIN_ACCOUNTS = 3  # "device / IP shared by N accounts" from this many accounts
TEXT_FIELD_MAX_CHARS = 1024
"""A free-text field longer than this is cut before embedding. The embedder reads 256 tokens (about 1,000
characters of English) and truncates the rest anyway; cutting first keeps a huge field from costing tokenizer time."""


def feature_facts(event_type: EventType, features: Mapping[str, float], precise: bool = False) -> list[str]:
    """Plain-language facts about an event from its features, most telling first.

    ``precise`` writes numbers as they are (amounts to the cent, counts and ages whole), for display; otherwise
    they are rounded to ``SIGNIFICANT_DIGITS``.
    """
    number = _exact if precise else _rounded
    what = EventType(event_type).value.replace("_", " ")
    amount = _value(features, "amount")
    if amount is not None and amount > 0:
        what += f" {amount:.2f}" if precise else f" {_rounded(amount)}"
    age = _value(features, "account_age_days")
    if age is not None:
        what += f" from {number(age)}-day-old account"
    facts = [what]
    for feature, entity in (("device_account_count", "device"), ("ip_account_count", "IP")):
        accounts = _value(features, feature)
        if accounts is not None and accounts >= SHARED_ENTITY_MIN_ACCOUNTS:
            facts.append(f"on {entity} shared by {number(accounts)} accounts")
    new_device, new_ip = _flag(features, "new_device"), _flag(features, "new_ip")
    if new_device and new_ip:
        facts.append("new device and IP")
    elif new_device or new_ip:
        facts.append("new device" if new_device else "new IP")
    failed = _value(features, "failed_logins_24h")
    if failed is not None and failed > 0:
        facts.append(f"{number(failed)} failed login" + ("s" if failed > 1 else ""))
    if _flag(features, "password_reset_recent"):
        facts.append("after password reset")
    if _flag(features, "promo_used"):
        facts.append("promo used")
    if _flag(features, "shipping_billing_mismatch"):
        facts.append("shipping differs from billing")
    rating, length = _value(features, "review_rating"), _value(features, "review_length")
    if EventType(event_type) is EventType.REVIEW and rating is not None:
        facts.append(f"{rating:.0f}-star review" + (f" of {number(length)} chars" if length is not None else ""))
    return facts


def event_narrative(event_type: EventType, features: Mapping[str, float], text: Mapping[str, str]) -> str:
    """The event's facts, then its free-text fields quoted (``Note: "..."``, fields in name order), one line.

    Equal inputs give equal text whatever the order of the mappings. The outcome is not an input: nothing here
    can leak a label.
    """
    facts = feature_facts(event_type, features)
    sentence = ", ".join(facts)
    parts = [sentence[:1].upper() + sentence[1:] + "."]
    for field in sorted(text):
        value = " ".join(str(text[field]).split())[:TEXT_FIELD_MAX_CHARS].replace('"', "'")
        if value:
            parts.append(f'{field.replace("_", " ").capitalize()}: "{value}"')
    return " ".join(parts)


def _value(features: Mapping[str, float], name: str) -> float | None:
    """The feature's value, or None when it is missing or not a finite number."""
    value = features.get(name)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _flag(features: Mapping[str, float], name: str) -> bool:
    return _value(features, name) == 1


def _exact(value: float) -> str:
    return f"{value:.0f}"


def _rounded(value: float) -> str:
    """``value`` to ``SIGNIFICANT_DIGITS`` significant digits, written without exponent or trailing zeros."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    decimals = SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(value)))
    try:
        rounded = round(value, decimals)
    except OverflowError:  # within a rounding step of the largest double: no digits to drop that round() can
        return f"{value:.{SIGNIFICANT_DIGITS}g}"
    if decimals <= 0:
        return str(int(rounded))
    return f"{rounded:.{decimals}f}".rstrip("0").rstrip(".")
