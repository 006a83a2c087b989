"""Free-text notes for synthetic events: review text, shipping notes, login / payout / change descriptions.

Notes come from small templates. Each template has a weight for plain wording and one for shady wording; fraud
leans shady ("ship to freight forwarder"), but both styles draw from every template, so the text hints without
deciding. Review text is a few sentences matching the star rating, or a terse phrase ("Great!") whose length
is what the review_length feature measures.
"""

from __future__ import annotations

import numpy as np

from riskcascade.modelling.synthetic_marketplace import ACCOUNT_CHANGE, LOGIN, ORDER, PAYOUT, PROMO, REVIEW, SHADY

MAX_REVIEW_SENTENCES = 4
REVIEW_SENTENCES = {
    "positive": (
        "Arrived on time and well packed.",
        "Exactly as described.",
        "The quality is better than I expected.",
        "Would buy from this seller again.",
        "Fits well and feels sturdy.",
        "My kids love it.",
        "Good value for the price.",
        "Setup took five minutes.",
    ),
    "mixed": (
        "Does the job, nothing special.",
        "Shipping took longer than promised.",
        "Colour is a bit different from the photos.",
        "Okay for the price.",
    ),
    "negative": (
        "Stopped working after a week.",
        "Arrived damaged and support was slow.",
        "Not as described.",
        "Cheap material, returning it.",
    ),
}
TERSE_REVIEWS = ("Great!", "Good", "Nice product", "5 stars", "Love it", "A+++", "Perfect", "Fast shipping")
ORDER_NOTES = (  # (text, plain weight, shady weight)
    ("Leave at the front door.", 3, 1),
    ("Please ring the bell.", 2, 1),
    ("Deliver after 5pm.", 1, 1),
    ("No special instructions.", 2, 2),
)
MISMATCH_ORDER_NOTES = (
    ("Gift - please include a gift receipt.", 4, 1),
    ("Birthday present, ship to my sister.", 3, 1),
    ("Ship to freight forwarder, ref {ref}.", 0.3, 3),
    ("Recipient travelling, leave with concierge.", 0.5, 2),
    ("Hold at pickup point.", 1, 2),
)
LOGIN_NOTES = (
    ("Signed in via the mobile app.", 3, 1),
    ("Signed in with Chrome on Windows.", 2, 2),
    ("Signed in with Safari on macOS.", 2, 1),
    ("Signed in with Firefox on Linux.", 0.5, 2),
)
PAYOUT_NOTES = (
    ("Payout to bank account ending {ref4}.", 1, 1),
    ("Payout to new bank account ending {ref4}.", 0.2, 1),
)
ACCOUNT_CHANGE_NOTES = (
    ("Changed shipping address.", 3, 0.5),
    ("Changed phone number.", 2, 1),
    ("Changed email address.", 1.5, 3),
    ("Changed payout bank account.", 0.5, 3),
    ("Changed password.", 2, 1.5),
)
PROMO_NOTES = (
    ("Redeemed WELCOME10.", 2, 4),
    ("Redeemed SPRING15.", 3, 1),
    ("Redeemed FREESHIP.", 3, 1),
    ("Redeemed REFER20.", 1, 3),
)
_NOTES_BY_EVENT_TYPE = {
    LOGIN: LOGIN_NOTES,
    PAYOUT: PAYOUT_NOTES,
    ACCOUNT_CHANGE: ACCOUNT_CHANGE_NOTES,
    PROMO: PROMO_NOTES,
}


def _choose_templates(rng: np.random.Generator, templates: tuple, style: np.ndarray) -> np.ndarray:
    plain = np.array([t[1] for t in templates], dtype=float)
    shady = np.array([t[2] for t in templates], dtype=float)
    n = len(style)
    return np.where(
        style == SHADY,
        rng.choice(len(templates), size=n, p=shady / shady.sum()),
        rng.choice(len(templates), size=n, p=plain / plain.sum()),
    )


def write_notes(
    rng: np.random.Generator,
    event_type: np.ndarray,
    style: np.ndarray,
    terse: np.ndarray,
    rating: np.ndarray,
    mismatch: np.ndarray,
) -> list[str]:
    """One note per event, from its type code, wording style, terse flag, star rating and address mismatch."""
    n = len(event_type)
    notes = [""] * n
    refs = rng.integers(100000, 999999, n)
    for code, templates in _NOTES_BY_EVENT_TYPE.items():
        rows = np.flatnonzero(event_type == code)
        for i, t in zip(rows.tolist(), _choose_templates(rng, templates, style[rows]).tolist()):
            notes[i] = templates[t][0].format(ref4=refs[i] % 10000)
    for mismatched, templates in ((False, ORDER_NOTES), (True, MISMATCH_ORDER_NOTES)):
        rows = np.flatnonzero((event_type == ORDER) & ((mismatch > 0) == mismatched))
        for i, t in zip(rows.tolist(), _choose_templates(rng, templates, style[rows]).tolist()):
            notes[i] = templates[t][0].format(ref=refs[i])
    rows = np.flatnonzero(event_type == REVIEW)
    lengths = rng.integers(1, MAX_REVIEW_SENTENCES + 1, n)
    picks = rng.integers(0, 1 << 30, (n, MAX_REVIEW_SENTENCES))
    for i in rows.tolist():
        if terse[i]:
            notes[i] = TERSE_REVIEWS[picks[i, 0] % len(TERSE_REVIEWS)]
            continue
        mood = "positive" if rating[i] >= 4 else "mixed" if rating[i] == 3 else "negative"
        pool = REVIEW_SENTENCES[mood]
        chosen = dict.fromkeys(pool[p % len(pool)] for p in picks[i, : lengths[i]])
        notes[i] = " ".join(chosen)
    return notes
