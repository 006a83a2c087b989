"""The ``message`` free-text field of synthetic events: what the account wrote with the event, carrying signal the
numbers do not.

What a message is, by event type: an order's message to the seller, a review's title, a payout's reference, an
account change's message to support, a promo redemption's share text; a login has none.

Who writes what:

- Ordinary users and the legitimate twins write ordinary messages from natural pools (an order often none). A few
  (``LEGIT_SCRIPTED_SHARE``) write like a script: the enthusiastic reviewer, the genuinely urgent support request.
- Fraud clusters work from a script. Each cluster renders, per event type, one line of its pattern's script pool,
  and its members paste that line verbatim (``COPY_PASTE_SHARE``): copy-paste farms. The others write like ordinary
  users, to blend in. The scripts are fake review titles (generic superlatives, "received free for an honest
  review"), scam messages to support ("lost access to my old email, skip verification"), off-platform settlement
  with a colluding seller, referral spam.

Sophisticated clusters and their legitimate twins have the same numbers (``riskcascade.modelling.synthetic``); the
sophisticated cluster still pastes its script and the twin does not. That is the signal the fast model's numbers
cannot see and its text model can (``riskcascade.modelling.text_model``).

Messages are written after the simulation from their own random stream (``default_rng([seed, MESSAGE_STREAM])``), so
every other column (features, notes, times, labels) is the same with or without them, byte for byte.
"""

from __future__ import annotations

import numpy as np

from riskcascade.modelling.synthetic_marketplace import ACCOUNT_CHANGE, LOGIN, ORDER, PAYOUT, PROMO, REVIEW

MESSAGE_STREAM = 1  # the second key of the messages' random stream (the simulation's is the seed alone)
COPY_PASTE_SHARE = 0.6  # fraud events that paste their cluster's script; the rest write like ordinary users
LEGIT_SCRIPTED_SHARE = 0.03  # ordinary events worded like a script
BLANK_SHARE = {ORDER: 0.45, PROMO: 0.5, PAYOUT: 0.1, ACCOUNT_CHANGE: 0.2, REVIEW: 0.0}  # ordinary events with none

SLOTS = {
    "product": ("blender", "phone case", "backpack", "lamp", "headphones", "kettle", "jacket", "toy car", "charger",
                "desk chair", "water bottle", "yoga mat"),
    "colour": ("blue", "black", "red", "green", "grey", "white"),
    "size": ("size 8", "medium", "large", "small", "queen bed", "13-inch laptop"),
    "relative": ("sister", "dad", "mum", "son", "daughter", "neighbour", "partner", "colleague"),
    "year": ("2023", "2024", "2025"),
    "month": ("January", "February", "March", "April"),
    "app": ("WhatsApp", "Telegram", "Signal", "WeChat"),
    "code": ("QX7K2", "ZP4M9", "BB82T", "KL0V3", "HJ55R", "WQ1E8", "TT9Y6", "MN3C4"),
    "n": tuple(str(k) for k in range(2, 40)),
}
SLOT_ORDER = tuple(SLOTS)

NATURAL = {
    ORDER: (
        "Is this the {year} model?",
        "Please pack it carefully, it is a present for my {relative}.",
        "Can you send it in {colour}?",
        "Thanks, looking forward to the {product}.",
        "Could you put the invoice in the parcel?",
        "Will this fit a {size}?",
        "Please leave it with the neighbour if I am out.",
        "Ordering a second {product} for my {relative}.",
        "Any chance it ships before the weekend?",
    ),
    REVIEW: (
        "Does what it says",
        "Good value for a {product}",
        "Nice {product}, a bit smaller than I thought",
        "Decent, not perfect",
        "Happy with it",
        "Broke after a week",
        "Not what I expected",
        "Solid {product} for the price",
        "My {relative} uses it every day",
        "Colour is more {colour} than in the photos",
    ),
    PAYOUT: (
        "Weekly payout",
        "Payout for {month} sales",
        "Monthly settlement",
        "Sales payout number {n}",
        "Shop earnings, {month}",
    ),
    ACCOUNT_CHANGE: (
        "Moved house, updating my address.",
        "New phone number after switching carrier.",
        "Updating my email to my work address.",
        "Changing my password as a routine precaution.",
        "My {relative} helped me set up a new bank account for the shop.",
    ),
    PROMO: (
        "Thanks for the welcome offer!",
        "Trying the spring sale on a {product}.",
        "Sharing this with my {relative}.",
        "Nice discount on the {product}.",
    ),
}

SCRIPTS = {  # event type -> risk type -> the pattern's script lines (a cluster renders one and pastes it)
    ORDER: {
        "collusion": (
            "As agreed, mark it shipped today and we settle the rest on {app}.",
            "Order {n} of the batch, same as before, no need to actually send anything.",
            "Confirm delivery in the system, I pay the difference on {app}.",
        ),
        "account_takeover": (
            "Urgent, ship express to the new address and do not call me.",
            "Send it today, I will not be reachable by phone or email.",
        ),
        "brushing": (
            "Empty box is fine, just need the tracking number.",
            "Ship anything light, the review is coming.",
        ),
        "click_farm": ("Order {n}, task {code}.", "Task {code} done, next order {n}."),
        "promo_abuse": ("Referral bonus order, account {n}.", "Promo order {n}, cheapest item please."),
    },
    REVIEW: {
        "brushing": (
            "BEST {product} EVER!!! HIGHLY RECOMMEND THIS SELLER!!!",
            "Received this product free in exchange for an honest review",
            "Amazing amazing amazing, five stars, buy now",
        ),
        "click_farm": (
            "Top quality top seller 100% recommended A+++",
            "Perfect perfect perfect!!! Must buy!!!",
        ),
        "collusion": ("Best seller on the platform, trusted partner, buy with confidence!!!",),
    },
    PAYOUT: {
        "account_takeover": (
            "Withdraw the full balance immediately to the new account",
            "Release all funds now, new bank details attached",
        ),
        "collusion": ("Settlement as agreed on {app}", "Partner share transfer, ref {code}"),
    },
    ACCOUNT_CHANGE: {
        "account_takeover": (
            "I lost access to my old email, please change it urgently and skip the verification.",
            "Travelling abroad and cannot get SMS codes, please remove two-factor today.",
            "This is the account owner, update the payout bank account to the one below right now.",
        ),
    },
    PROMO: {
        "promo_abuse": (
            "Free money!!! Sign up with my code {code} and get {n} off, limited time!!!",
            "Join now with code {code}, easy cash, no purchase needed",
        ),
        "click_farm": ("Use my link for free credit {code} {code} {code}",),
    },
}


def _script_pool(code: int, risk_type: str) -> tuple[str, ...]:
    """The pattern's script lines for the event type, else every pattern's lines for it (a pattern with no script of
    its own for that type borrows the others')."""
    by_pattern = SCRIPTS.get(code, {})
    return by_pattern.get(risk_type) or tuple(line for lines in by_pattern.values() for line in lines)


def _render(pool: tuple[str, ...], picks: np.ndarray) -> str:
    """One line of ``pool`` with its slots filled, all chosen by the non-negative integers ``picks``."""
    template = pool[int(picks[0]) % len(pool)]
    return template.format(**{name: SLOTS[name][int(picks[1 + k]) % len(SLOTS[name])]
                              for k, name in enumerate(SLOT_ORDER)})


def write_messages(seed: int, event_type: np.ndarray, risk_type: list[str], cluster: np.ndarray) -> list[str]:
    """One message per event ("" for none), from its type code, risk type ("" legitimate) and cluster (-1 none), in
    generation order; fully determined by ``seed`` and the inputs."""
    rng = np.random.default_rng([seed, MESSAGE_STREAM])
    n = len(event_type)
    pasted = rng.random(n) < COPY_PASTE_SHARE
    scripted = rng.random(n) < LEGIT_SCRIPTED_SHARE
    blank = rng.random(n)
    picks = rng.integers(0, 1 << 30, (n, 1 + len(SLOT_ORDER)))
    cluster_lines: dict[tuple[int, int], str] = {}
    out = [""] * n
    for i in range(n):
        code = int(event_type[i])
        if code == LOGIN:
            continue
        if risk_type[i] and pasted[i]:
            key = (int(cluster[i]), code) if cluster[i] >= 0 else (-1 - i, code)
            if key not in cluster_lines:  # rendered by the cluster's first event of the type, in generation order
                cluster_lines[key] = _render(_script_pool(code, risk_type[i]), picks[i])
            out[i] = cluster_lines[key]
        elif not risk_type[i] and scripted[i]:
            out[i] = _render(_script_pool(code, ""), picks[i])
        elif blank[i] >= BLANK_SHARE[code]:
            out[i] = _render(NATURAL[code], picks[i])
    return out
