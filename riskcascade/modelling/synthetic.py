"""Synthetic e-commerce events with labelled fraud patterns, for training and exercising the cascade.

No real fraud data can ship with the project, and public sets (YelpChi, see FIELD-NOTES) hold reviews only, so the
fast model learns on a simulated marketplace. The simulation is built to be hard in the right places: each fraud
pattern has a mechanism that leaves signals, legitimate users produce the same signals for ordinary reasons, and
some fraudsters deliberately avoid them. A good model separates most events easily (ROC-AUC about 0.95-0.97 at
60,000 events, not 1.0) and leaves a genuinely mixed middle band: the cases the cascade escalates.

The world (``synthetic_marketplace``)
-------------------------------------
Legitimate accounts live in households of one to four that share a home IP; a third of households share a
family device and some a card; a fifth sit behind carrier-grade NAT IPs shared by dozens of strangers; small
companies share one card among staff; libraries and internet cafés put many accounts on one computer. Sellers
have an age and a popularity; new users flock to trending young sellers. Legitimate events come mostly from
home, with the everyday exceptions that look like fraud: travellers on hotel Wi-Fi (new, shared IP), new
phones (new device), gifts (shipping differs from billing, larger amounts), forgotten passwords (failed
logins, a reset), welcome promos, quick buyers (short sessions), heavy browsers (many clicks), terse reviews.

Fraud patterns (``synthetic_fraud``; ``risk_type`` names from ``domain.RISK_TYPES``)
------------------------------------------------------------------------------------
account_takeover
    A crew takes over aged legitimate accounts and works them from its own few devices and proxy IPs: logins
    after failed attempts (credential stuffing), a password reset, account changes (email, payout bank), then
    a drain: large payouts to mule bank accounts shared across the crew's victims and high-value orders
    shipped elsewhere, often at night. Sophisticated crews spoof the victim's device fingerprint, exit through
    a residential proxy on the victim's own IP, use phished credentials (no failed logins) and drain slowly.
collusion
    Rings of three to eight accounts share devices, IPs and cards and trade with a colluding seller of their
    own (fake sales, laundering): medium-to-large orders, glowing reviews, payouts. Sophisticated rings are
    aged "sleeper" accounts with a device, card and residential IP each, laundering through an established
    seller that also has real customers.
promo_abuse
    Batches of freshly created accounts on one device and one IP redeem sign-up and referral promos and place
    small discounted orders. Sophisticated batches give each account its own device fingerprint, card and
    residential proxy IP, and use accounts aged a few weeks to months.
brushing
    A seller inflates its ratings with cheap orders and five-star, few-word reviews from accounts it controls,
    placed from the seller's own devices and IPs. Sophisticated brushers are established sellers whose aged
    accounts have their own devices and residential IPs and write longer reviews.
click_farm
    Racks of phones behind two IPs, each shared by dozens of accounts, generate engagement for promoted
    sellers: very many clicks in very short sessions, logins, reviews, tiny orders. Sophisticated farms are
    SIM farms exiting through carrier NAT (the IPs legitimate mobile users share) at human click rates.

Each pattern also produces *legitimate twins*: events made by the same mechanism with every cluster
sophisticated, labelled legitimate (an owner back from a trip on a new phone, a family shop, a student dorm
signing up for a promo, a new seller's launch with friends' reviews, flash-sale deal hunters on mobile). The
sophisticated share of fraud and its twins are indistinguishable from features alone; the free-text ``note``
leans "shady" for fraud and plain for twins, a weak hint the reasoner may use.

Time
----
Every event happens inside the window of ``WINDOW_DAYS`` days from ``WINDOW_START``, and ``hour_of_day`` is always the
UTC hour of its ``occurred_at``. Ordinary legitimate events fall on random days at hours from a daily profile (busy
evenings, quiet nights), so an account's events spread over days and weeks (median first-to-last about 17 days);
a quarter follow the account's previous activity within minutes (log in, then order), users of a library or
internet-café computer queue one after another, and travellers on a lounge's Wi-Fi overlap.

Fraud is organised, and bursty. Each cluster acts within one active period and works it in sittings: the events of
a sitting follow each other seconds to minutes apart, in the order of the work (log in, change the account, redeem,
buy, review, cash out), and a sitting starts at an hour from the pattern's day/night profile. Plain clusters
(``synthetic_fraud.TEMPO``, median first-to-last span of a cluster in brackets):

- account takeover: per victim, logins, changes and the drain within half an hour to a day (about 1-2 h), one or
  two sittings; the crew works through its victims over one to four days;
- collusion: a ring trades over one to two weeks (about 7 days), a few trades a sitting;
- promo abuse: a batch's redemptions and orders within one to five hours (about 1 h), accounts under a minute
  apart;
- brushing: a seller's campaign over two to five days (about 2 days), several orders and reviews a sitting;
- click farm: each campaign (one promoted seller) within one to two days (half a day to a day), in bursts of the
  racks' phones firing seconds apart.

Sophisticated clusters avoid velocity: the same work one or two events a sitting, minutes to hours apart, over
periods several times longer (takeovers over two to five days by crews working one to two weeks, rings over three to
four weeks, batches over half a day to two days, brushing over ten to twenty days, farms over five to ten days).
A share of them (``SOPHISTICATED_BURST_SHARE``) is held to the burst tempo by a deadline: a promo about to expire, a
flash sale, a launch day. Legitimate twins are sophisticated clusters and get the same mix, so the dorm's promo
night, the launch day and the flash-sale evening burst like a batch or a farm: a burst is a strong hint, never
proof, and velocity does not tell sophisticated fraud from its twin. An active period is placed as if the window
went on and cut to the window (``WINDOW_OVERHANG_SHARE``), as an extract of a longer history would cut it: fraud
stays about as dense near the window's edges as in its middle, and no event falls outside. A burst is over long
before its labels arrive (see Label arrival), so the outcomes known at an event seldom cover its own cluster: what
catches a burst is its velocity and its shared entities, not its first members' labels. The counters drawn
per event (``orders_last_24h``, ``failed_logins_24h``, ``password_reset_recent``, ``new_device``, ``new_ip``) come
from the pattern's mechanism, not from counting the generated events.

Features
--------
Per-event features are drawn by the pattern that produced the event, except ``hour_of_day`` (see Time). Graph
features are computed afterwards, once every event has its time, as a feature store would have served them at that
moment: each event counts only the events at or before it, itself included, never a later one. Events in the same
second are taken in the order ``generate_events`` emits them (a stable sort of the times, so generation order breaks
ties): of two such events the first does not see the second. The graph features are the distinct accounts seen so
far on the event's device and IP, the most accounts so far on any payment instrument the account has used so far,
how many of the account's devices, IPs and instruments (so far) another account has also used (so far), and the
share of the seller's orders so far placed by accounts younger than ``NEW_ACCOUNT_DAYS``. Features that do not apply
to an event type are 0 (no amount on a login, no rating off a review, no seller on a payout). The generator never
emits missing values; the model is still trained to accept them (see ``riskcascade.modelling.training``).

Label arrival
-------------
An outcome is not known when the event happens. ``label_known_at`` says when it became known, always strictly
after ``occurred_at``; history as of a time may use a label only from then on. Fraud comes to light days later,
at a pace set by who notices (``FRAUD_LABEL_LAG_DAYS``, lognormal, capped at ``FRAUD_LABEL_MAX_LAG_DAYS``):
account takeover fastest, because the victim sees the login alert, the changed email or the missing payout
(median 1.5 days); promo abuse, click farms and brushing when an investigation of promo spend, engagement or
ratings gets to them (medians 4-6 days); collusion slowest, through chargebacks and payment-provider reports
(median 8 days, tail to the 45-day chargeback deadline). A legitimate event is confirmed only when its dispute
window (``LEGIT_DISPUTE_WINDOW_DAYS``: 7, 10 or 14 days) closes without a complaint, a few hours late
(``LEGIT_LABEL_JITTER_HOURS``). Labels of late events therefore arrive after the simulated window ends.

One ``numpy.random.Generator`` seeded from ``seed`` drives everything: the same ``(n_events, seed)`` gives the
same events, and the same CSV byte for byte.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Literal, TypeVar

import numpy as np

from riskcascade.core.domain import RISK_TYPES, AdjudicatedCase, Entities, EventType, Outcome, RiskEvent
from riskcascade.modelling.synthetic_fraud import FRAUD_PATTERNS, TWIN_EVENT_RATIO, legit_twins
from riskcascade.modelling.synthetic_marketplace import (
    DRAWN_FEATURES,
    ENTITY_KINDS,
    EVENT_TYPES,
    NEW_ACCOUNT_DAYS,
    ORDER,
    REVIEW,
    SECONDS_PER_DAY,
    SECONDS_PER_HOUR,
    WINDOW_DAYS,
    EventBatch,
    Population,
    build_legit_world,
    legit_events,
)
from riskcascade.modelling.synthetic_messages import write_messages
from riskcascade.modelling.synthetic_notes import write_notes

FEATURE_DESCRIPTIONS: dict[str, str] = {
    "amount": "Amount of money the event moves (order value or payout)",
    "amount_to_typical_ratio": "Amount relative to the account's typical order value",
    "account_age_days": "Age of the account in days",
    "orders_last_24h": "Orders the account placed in the last 24 hours",
    "failed_logins_24h": "Failed logins on the account in the last 24 hours",
    "password_reset_recent": "Password was reset in the last 7 days",
    "new_device": "Device first seen on this account in the last 7 days",
    "new_ip": "IP address first seen on this account in the last 7 days",
    "device_account_count": "Number of accounts seen on this device",
    "ip_account_count": "Number of accounts seen on this IP address",
    "instrument_account_count": "Most accounts sharing any of this account's payment instruments",
    "shared_entity_count": "Devices, IPs and payment instruments this account shares with other accounts",
    "promo_used": "A promotion code was used",
    "session_seconds": "Length of the session in seconds",
    "clicks_per_session": "Clicks in the session",
    "review_length": "Length of the review text in characters",
    "review_rating": "Star rating of the review (1-5)",
    "seller_age_days": "Age of the seller in days",
    "seller_new_buyer_share": f"Share of the seller's orders placed by accounts under {NEW_ACCOUNT_DAYS} days old",
    "shipping_billing_mismatch": "Shipping address differs from billing address",
    "hour_of_day": "Hour of day (UTC) the event happened",
}
FEATURE_NAMES: tuple[str, ...] = tuple(FEATURE_DESCRIPTIONS)

FRAUD_SHARE = 0.10  # share of events produced by a fraud pattern
RISK_TYPE_SHARES = {  # how fraud events divide between the patterns
    "account_takeover": 0.28,
    "collusion": 0.20,
    "promo_abuse": 0.22,
    "brushing": 0.15,
    "click_farm": 0.15,
}
MIN_EVENTS = 200  # below this some fraud patterns would get no events at all
WINDOW_START = datetime(2025, 1, 1, tzinfo=timezone.utc)  # events fall in [start, start + WINDOW_DAYS)
# When outcomes become known (see "Label arrival" in the module docstring).
FRAUD_LABEL_LAG_DAYS = {  # risk type -> (median, lognormal sigma) of the days from the event to the fraud label
    "account_takeover": (1.5, 0.8),  # the victim notices: login alert, changed email, missing payout
    "collusion": (8.0, 0.7),  # chargebacks and payment-provider reports, slow with a long tail
    "promo_abuse": (5.0, 0.6),  # investigations of promo spend batch through the redemptions
    "brushing": (6.0, 0.6),  # rating-integrity reviews of the seller
    "click_farm": (4.0, 0.6),  # engagement-anomaly investigations
}
FRAUD_LABEL_MAX_LAG_DAYS = 45.0  # the chargeback deadline: fraud not found by then stays unlabelled in practice
LEGIT_DISPUTE_WINDOW_DAYS = (7, 10, 14)  # a legitimate event is confirmed when its window closes quietly
LEGIT_LABEL_JITTER_HOURS = 6.0  # the job closing dispute windows runs up to this late
LABEL_MIN_LAG_SECONDS = 3600  # no outcome is known within the hour of the event


@dataclass(frozen=True)
class LabelledEvent:
    """One generated event with its ground truth: what training, evaluation and the case memory consume."""

    case_id: str
    event_type: EventType
    entities: Entities
    features: dict[str, float]
    note: str
    occurred_at: datetime
    label: int  # 1 fraud, 0 legitimate
    risk_type: str  # one of RISK_TYPES for fraud, "" for legitimate
    label_known_at: datetime | None = None  # when the outcome became known; the generator always sets it
    message: str = ""  # what the account wrote with the event (synthetic_messages); "" for none


# --- Point-in-time graph features ----------------------------------------------------------------------------
# The helpers take events in generation order and ``rank``, each event's position in time order (``_time_order``);
# an event sees the events of rank up to its own: itself and earlier, never later.


def _time_order(seconds: np.ndarray) -> np.ndarray:
    """Event indices in time order; events in the same second keep generation order. Also the output order."""
    return np.argsort(seconds, kind="stable")


def _as_of(
    key: np.ndarray, rank: np.ndarray, update_key: np.ndarray, update_rank: np.ndarray, update_value: np.ndarray,
    how: Literal["sum", "max"],
) -> np.ndarray:
    """For each query (key, rank), the sum or max (``how``) of the non-negative integer update values with the same
    key and a rank no later than the query's (an update at the query's own rank counts); 0 where there are none."""
    n_updates = len(update_key)
    keys = np.concatenate([update_key, key])
    ranks = np.concatenate([update_rank, rank])
    values = np.concatenate([update_value.astype(np.int64), np.zeros(len(key), dtype=np.int64)])
    is_query = np.arange(len(keys)) >= n_updates
    order = np.lexsort((is_query, ranks, keys))  # by key, then rank, an update before a query of the same rank
    k, v = keys[order], values[order]
    starts = np.r_[True, k[1:] != k[:-1]]
    group = np.cumsum(starts) - 1
    if how == "sum":
        running = np.cumsum(v)
        running -= (running - v)[starts][group]  # minus everything before the key's first entry
    else:  # lift each key above the ones before it so that one running max serves every key
        lift = group * (int(v.max(initial=0)) + 1)
        running = np.maximum.accumulate(v + lift) - lift
    out = np.empty(len(keys), dtype=np.int64)
    out[order] = running
    return out[n_updates:]


@dataclass(frozen=True)
class _Holders:
    """The distinct (entity, account) pairs of one entity kind, sorted by entity, then by the pair's first event."""

    entity: np.ndarray
    account: np.ndarray
    first: np.ndarray  # rank of the pair's first event: from then on the account is seen on the entity
    joined: np.ndarray  # accounts seen on the entity before this one (0 for the first)
    size: np.ndarray  # accounts ever seen on the entity
    second: np.ndarray  # rank at which the entity's second account appears; -1 if it never does


def _holders(entity: np.ndarray, account: np.ndarray, rank: np.ndarray, n_accounts: int) -> _Holders:
    has = entity >= 0
    key, when = entity[has] * n_accounts + account[has], rank[has]
    by_time = np.argsort(when)
    pair, first_index = np.unique(key[by_time], return_index=True)
    ent, acc, first = pair // n_accounts, pair % n_accounts, when[by_time][first_index]
    order = np.lexsort((first, ent))
    ent, acc, first = ent[order], acc[order], first[order]
    starts = np.flatnonzero(np.r_[True, ent[1:] != ent[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(ent)]))
    size = np.diff(np.r_[starts, len(ent)])[group]
    second = np.where(size > 1, first[np.minimum(starts[group] + 1, len(ent) - 1)], -1)
    return _Holders(ent, acc, first, np.arange(len(ent)) - starts[group], size, second)


def _accounts_per_entity(entity: np.ndarray, h: _Holders, rank: np.ndarray) -> np.ndarray:
    """For each event, the distinct accounts seen on its entity so far (0 where the event has none: no pair has
    entity -1, so those queries find no update)."""
    return _as_of(entity, rank, h.entity, h.first, np.ones(len(h.entity)), "sum").astype(float)


def _most_accounts_per_instrument(account: np.ndarray, h: _Holders, rank: np.ndarray) -> np.ndarray:
    """For each event, the most accounts seen so far on any instrument its account has used so far.

    Each later account on an instrument raises the count of every earlier holder, so holder ``r`` of an instrument
    gets an update (rank of the ``s``-th account's first use, ``s``) for every ``s`` from its own place on.
    """
    n_later = h.size - h.joined
    holder = np.repeat(np.arange(len(h.entity)), n_later)
    later = holder + np.arange(len(holder)) - np.repeat(np.cumsum(n_later) - n_later, n_later)
    return _as_of(account, rank, h.account[holder], h.first[later], h.joined[later] + 1, "max").astype(float)


def _shared_from(h: _Holders) -> tuple[np.ndarray, np.ndarray]:
    """Accounts and ranks from which one of their entities is shared: the first holder's becomes shared when the
    second account appears, every later holder's at its own first use."""
    shared = h.size > 1
    return h.account[shared], np.where(h.joined == 0, h.second, h.first)[shared]


def _graph_features(
    entity: dict[str, np.ndarray], account_age: np.ndarray, event_type: np.ndarray, rank: np.ndarray
) -> dict[str, np.ndarray]:
    account = entity["account"]
    n_accounts = len(account_age)
    holders = {kind: _holders(entity[kind], account, rank, n_accounts) for kind in ("device", "ip", "instrument")}
    out = {
        "device_account_count": _accounts_per_entity(entity["device"], holders["device"], rank),
        "ip_account_count": _accounts_per_entity(entity["ip"], holders["ip"], rank),
        "instrument_account_count": _most_accounts_per_instrument(account, holders["instrument"], rank),
    }
    sharer, since = (np.concatenate(parts) for parts in zip(*(_shared_from(h) for h in holders.values())))
    out["shared_entity_count"] = _as_of(account, rank, sharer, since, np.ones(len(sharer)), "sum").astype(float)

    seller = entity["seller"]
    orders = np.flatnonzero((event_type == ORDER) & (seller >= 0))
    young_buyer = account_age[account[orders]] < NEW_ACCOUNT_DAYS
    order_count = _as_of(seller, rank, seller[orders], rank[orders], np.ones(len(orders)), "sum")
    young_count = _as_of(seller, rank, seller[orders], rank[orders], young_buyer, "sum")
    share = np.round(young_count / np.maximum(order_count, 1), 4)
    out["seller_new_buyer_share"] = np.where(seller >= 0, share, 0.0)
    return out


# --- Assembly ------------------------------------------------------------------------------------------------


def _label_lag_seconds(rng: np.random.Generator, risk_type: list[str]) -> np.ndarray:
    """Seconds from each event until its outcome is known (see "Label arrival" in the module docstring)."""
    n = len(risk_type)
    median = np.array([FRAUD_LABEL_LAG_DAYS[r][0] if r else 0.0 for r in risk_type])
    sigma = np.array([FRAUD_LABEL_LAG_DAYS[r][1] if r else 0.0 for r in risk_type])
    fraud_days = np.minimum(median * np.exp(sigma * rng.standard_normal(n)), FRAUD_LABEL_MAX_LAG_DAYS)
    window_days = rng.choice(np.array(LEGIT_DISPUTE_WINDOW_DAYS, dtype=float), n)
    legit_days = window_days + rng.uniform(0, LEGIT_LABEL_JITTER_HOURS, n) / 24
    days = np.where(median > 0, fraud_days, legit_days)
    return np.maximum(np.round(days * 86400), LABEL_MIN_LAG_SECONDS).astype(np.int64)


def _ip_address(ip_id: int) -> str:
    return f"10.{(ip_id >> 16) & 255}.{(ip_id >> 8) & 255}.{ip_id & 255}"


def _entities(ids: dict[str, np.ndarray], i: int) -> Entities:
    seller, device, ip, instrument = (int(ids[k][i]) for k in ("seller", "device", "ip", "instrument"))
    return Entities(
        account_id=f"acct-{int(ids['account'][i]):06d}",
        seller_id=f"slr-{seller:05d}" if seller >= 0 else "",
        device_id=f"dev-{device:06d}" if device >= 0 else "",
        ip=_ip_address(ip) if ip >= 0 else "",
        payment_instrument_id=f"pi-{instrument:06d}" if instrument >= 0 else "",
    )


def _fraud_counts(n_fraud: int) -> list[int]:
    counts = [math.floor(n_fraud * RISK_TYPE_SHARES[r]) for r in RISK_TYPES]
    counts[0] += n_fraud - sum(counts)
    return counts


@dataclass(frozen=True)
class _Simulation:
    """All events as columns, in generation order (legitimate, twins, then each fraud pattern)."""

    event_type: np.ndarray  # integer codes into EVENT_TYPES
    entity: dict[str, np.ndarray]  # kind -> integer ids, -1 for none
    feature: dict[str, np.ndarray]  # every name in FEATURE_NAMES
    notes: list[str]
    messages: list[str]  # written after everything else, from their own random stream (synthetic_messages)
    risk_type: list[str]
    sophisticated: np.ndarray  # generated by a sophisticated cluster or a legitimate twin (diagnostics only)
    cluster: np.ndarray  # the ring, batch, farm, brushing seller or takeover victim behind it; -1 for ordinary events
    pattern: np.ndarray  # the risk type whose mechanism made it (fraud and legitimate twins); "" for ordinary events
    seconds: np.ndarray  # seconds after WINDOW_START
    label_lag_seconds: np.ndarray  # seconds from the event until its label is known


def _global_clusters(batches: list[EventBatch]) -> np.ndarray:
    """Each event's cluster numbered across all batches (the batches number theirs from 0); -1 stays -1."""
    out, offset = [], 0
    for b in batches:
        out.append(np.where(b.cluster >= 0, b.cluster + offset, -1))
        offset += int(b.cluster.max(initial=-1)) + 1
    return np.concatenate(out)


def _simulate(n_events: int, seed: int) -> _Simulation:
    if n_events < MIN_EVENTS:
        raise ValueError(f"n_events must be at least {MIN_EVENTS}, got {n_events}")
    rng = np.random.default_rng(seed)
    pop = Population()
    n_fraud = round(n_events * FRAUD_SHARE)
    world = build_legit_world(pop, rng, n_events)
    fraud_counts = _fraud_counts(n_fraud)
    twin_counts = [round(k * TWIN_EVENT_RATIO) for k in fraud_counts]
    batches = [legit_events(world, pop, rng, n_events - n_fraud - sum(twin_counts))]
    batches += [legit_twins(world, pop, rng, r, k) for r, k in zip(RISK_TYPES, twin_counts)]
    batches += [FRAUD_PATTERNS[r](world, pop, rng, k) for r, k in zip(RISK_TYPES, fraud_counts)]

    event_type = np.concatenate([b.event_type for b in batches])
    entity = {k: np.concatenate([b.entity[k] for b in batches]) for k in ENTITY_KINDS}
    feature = {k: np.concatenate([b.feature[k] for b in batches]) for k in DRAWN_FEATURES}
    account_age, seller_age = pop.account_age(), pop.seller_age()
    account, seller = entity["account"], entity["seller"]
    feature["account_age_days"] = account_age[account]
    feature["seller_age_days"] = np.where(seller >= 0, seller_age[np.maximum(seller, 0)], 0.0)
    feature["amount_to_typical_ratio"] = np.round(feature["amount"] / pop.typical_amount()[account], 3)
    notes = write_notes(
        rng,
        event_type,
        np.concatenate([b.style for b in batches]),
        np.concatenate([b.terse for b in batches]),
        feature["review_rating"],
        feature["shipping_billing_mismatch"],
    )
    feature["review_length"] = np.where(event_type == REVIEW, np.array([len(t) for t in notes], dtype=float), 0.0)
    seconds = np.concatenate([b.seconds for b in batches])
    feature["hour_of_day"] = (seconds % SECONDS_PER_DAY // SECONDS_PER_HOUR).astype(float)
    risk_type = [b.risk_type for b in batches for _ in range(b.n)]
    label_lag_seconds = _label_lag_seconds(rng, risk_type)
    rank = np.empty(n_events, dtype=np.int64)
    rank[_time_order(seconds)] = np.arange(n_events)
    feature.update(_graph_features(entity, account_age, event_type, rank))  # needs the times: point in time
    cluster = _global_clusters(batches)
    return _Simulation(
        event_type=event_type,
        entity=entity,
        feature=feature,
        notes=notes,
        messages=write_messages(seed, event_type, risk_type, cluster),
        risk_type=risk_type,
        sophisticated=np.concatenate([b.sophisticated for b in batches]),
        cluster=cluster,
        pattern=np.repeat(["", *RISK_TYPES, *RISK_TYPES], [b.n for b in batches]),
        seconds=seconds,
        label_lag_seconds=label_lag_seconds,
    )


def generate_events(n_events: int, seed: int) -> list[LabelledEvent]:
    """``n_events`` labelled events, in time order, fully determined by ``(n_events, seed)``."""
    sim = _simulate(n_events, seed)
    order = _time_order(sim.seconds)
    matrix = np.column_stack([sim.feature[name] for name in FEATURE_NAMES])[order].tolist()
    events = []
    for row, i in enumerate(order.tolist()):
        occurred_at = WINDOW_START + timedelta(seconds=int(sim.seconds[i]))
        events.append(
            LabelledEvent(
                case_id=f"syn{seed}-{row:06d}",
                event_type=EVENT_TYPES[sim.event_type[i]],
                entities=_entities(sim.entity, i),
                features=dict(zip(FEATURE_NAMES, matrix[row])),
                note=sim.notes[i],
                occurred_at=occurred_at,
                label=int(sim.risk_type[i] != ""),
                risk_type=sim.risk_type[i],
                label_known_at=occurred_at + timedelta(seconds=int(sim.label_lag_seconds[i])),
                message=sim.messages[i],
            )
        )
    return events


def split_events(
    events: list[LabelledEvent], seed: int, valid_share: float = 0.15, test_share: float = 0.15
) -> dict[str, list[LabelledEvent]]:
    """Time split: train on the past, validate on what follows, test on the future.

    Events are taken in ``occurred_at`` order (a stable sort, so events of the same time keep the input order):
    the first ``1 - valid_share - test_share`` of them are train, the next ``valid_share`` valid, the last
    ``test_share`` test. ``seed`` is accepted for the signature other splits share and not used. Raises
    ValueError for shares outside (0, 1) or summing to 1 or more, and for a part without both labels.
    """
    if not (0 < valid_share < 1 and 0 < test_share < 1 and valid_share + test_share < 1):
        raise ValueError("valid_share and test_share must be in (0, 1) and sum to less than 1")
    ordered = sorted(events, key=lambda e: e.occurred_at)
    n_valid, n_test = round(len(ordered) * valid_share), round(len(ordered) * test_share)
    n_train = len(ordered) - n_valid - n_test
    parts = {
        "train": ordered[:n_train],
        "valid": ordered[n_train : n_train + n_valid],
        "test": ordered[n_train + n_valid :],
    }
    for name, part in parts.items():
        if {e.label for e in part} != {0, 1}:
            raise ValueError(f"the {name} part ({len(part)} events) does not hold both fraud and legitimate events")
    return parts


# --- CSV -----------------------------------------------------------------------------------------------------

ENTITY_COLUMNS = ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id")
CSV_COLUMNS: tuple[str, ...] = (
    ("case_id", "event_type", *ENTITY_COLUMNS, "occurred_at", *FEATURE_NAMES, "note", "message", "label",
     "risk_type", "label_known_at")
)
OPTIONAL_CSV_COLUMNS = ("message",)  # read as "" when absent: files written before the generator wrote messages


def write_events_csv(path: str | Path, events: Iterable[LabelledEvent]) -> Path:
    """Write events under the header CSV_COLUMNS: floats exactly (repr), times as ISO 8601 with offset.

    Raises ValueError for an event without ``label_known_at``: the file could not be read back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for e in events:
            if e.label_known_at is None:
                raise ValueError(f"event {e.case_id!r} has no label_known_at")
            writer.writerow(
                [
                    e.case_id,
                    e.event_type.value,
                    *(getattr(e.entities, c) for c in ENTITY_COLUMNS),
                    e.occurred_at.isoformat(),
                    *(repr(float(e.features[name])) for name in FEATURE_NAMES),
                    e.note,
                    e.message,
                    e.label,
                    e.risk_type,
                    e.label_known_at.isoformat(),
                ]
            )
    return path


class _BadCell(ValueError):
    """A cell that does not parse; read_events_csv adds the file and row number."""

    def __init__(self, column: str, value: str, why: str) -> None:
        super().__init__(f"bad value {value!r} in column {column!r}: {why}")
        self.column = column


_T = TypeVar("_T")


def _parse_cell(row: dict[str, str], column: str, parse: Callable[[str], _T]) -> _T:
    value = row[column]
    try:
        return parse(value)
    except ValueError as exc:
        raise _BadCell(column, value, str(exc)) from None


def _required_text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _feature_value(value: str) -> float:
    number = float(value)  # "nan" is accepted as an explicit missing value; an empty cell is not
    if math.isinf(number):
        raise ValueError("must be finite")
    return number


def _timestamp(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("needs a UTC offset")
    return moment


def _label(value: str) -> int:
    if value not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return int(value)


def _parse_row(row: dict[str, str]) -> LabelledEvent:
    label = _parse_cell(row, "label", _label)
    risk_type = row["risk_type"]
    if label == 1 and risk_type not in RISK_TYPES:
        raise _BadCell("risk_type", risk_type, f"fraud needs one of {', '.join(RISK_TYPES)}")
    if label == 0 and risk_type:
        raise _BadCell("risk_type", risk_type, "must be empty for a legitimate event")
    occurred_at = _parse_cell(row, "occurred_at", _timestamp)
    label_known_at = _parse_cell(row, "label_known_at", _timestamp)
    if label_known_at < occurred_at:
        raise _BadCell("label_known_at", row["label_known_at"], "is before occurred_at")
    return LabelledEvent(
        case_id=_parse_cell(row, "case_id", _required_text),
        event_type=_parse_cell(row, "event_type", EventType),
        entities=Entities(
            account_id=_parse_cell(row, "account_id", _required_text),
            **{c: row[c] for c in ENTITY_COLUMNS if c != "account_id"},
        ),
        features={name: _parse_cell(row, name, _feature_value) for name in FEATURE_NAMES},
        note=row["note"],
        occurred_at=occurred_at,
        label=label,
        risk_type=risk_type,
        label_known_at=label_known_at,
        message=row.get("message", ""),
    )


def read_events_csv(path: str | Path) -> list[LabelledEvent]:
    """Read a file written by write_events_csv, validating every cell.

    Raises ValueError naming the missing or unexpected column, or the column and 1-based data row of a bad value.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for column in CSV_COLUMNS:
            if column not in header and column not in OPTIONAL_CSV_COLUMNS:
                raise ValueError(f"{path}: missing column {column!r}")
        for column in header:
            if column not in CSV_COLUMNS:
                raise ValueError(f"{path}: unexpected column {column!r}")
        events = []
        for row_number, row in enumerate(reader, start=1):
            if None in row or any(v is None for v in row.values()):
                raise ValueError(f"{path}: data row {row_number} does not have the header's {len(header)} columns")
            try:
                events.append(_parse_row(row))
            except _BadCell as exc:
                raise ValueError(f"{path}: data row {row_number}: {exc}") from None
    return events


# --- Case memory ---------------------------------------------------------------------------------------------


def to_risk_event(e: LabelledEvent) -> RiskEvent:
    """The event as the platform receives it: same id, entities, features and note; the label stays behind."""
    return RiskEvent(e.case_id, e.event_type, e.entities, dict(e.features), event_text(e), e.occurred_at)


def to_adjudicated_case(e: LabelledEvent) -> AdjudicatedCase:
    """The event as a past case with a known outcome, with a one-line plain-language summary."""
    return AdjudicatedCase(
        case_id=e.case_id,
        event_type=e.event_type,
        features=dict(e.features),
        outcome=Outcome.FRAUD if e.label else Outcome.LEGITIMATE,
        risk_type=e.risk_type,
        entities=e.entities,
        occurred_at=e.occurred_at,
        summary=_summary(e),
        text=event_text(e),
        label_known_at=e.label_known_at,
    )


NOTE_FIELD = "note"  # the free-text field of RiskEvent.text the generator's notes travel in
MESSAGE_FIELD = "message"  # the one its messages travel in


def event_text(e: LabelledEvent) -> dict[str, str]:
    """The event's free-text fields as RiskEvent.text carries them (empty ones left out)."""
    return {name: value for name, value in ((NOTE_FIELD, e.note), (MESSAGE_FIELD, e.message)) if value}


def _summary(e: LabelledEvent) -> str:
    """Display line: the event's facts with exact numbers (``retrieval.narrative.feature_facts``), then the verdict.

    The narrative a case is embedded by uses the same phrases, rounded and without the verdict.
    """
    from retrieval.narrative import feature_facts  # riskcascade does not import retrieval at module level

    verdict = f"fraud ({e.risk_type})" if e.label else "legitimate"
    return ", ".join(feature_facts(e.event_type, e.features, precise=True)) + f"; {verdict}"
