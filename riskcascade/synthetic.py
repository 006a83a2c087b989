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

Features
--------
Per-event features are drawn by the pattern that produced the event. Graph features are computed afterwards
from all events together, as a feature store would: distinct accounts on the event's device and IP and on the
account's payment instruments, how many of the account's entities other accounts also use, and the share of a
seller's orders placed by accounts younger than ``NEW_ACCOUNT_DAYS``. Features that do not apply to an event
type are 0 (no amount on a login, no rating off a review, no seller on a payout). The generator never emits
missing values; the model is still trained to accept them (see ``riskcascade.training``).

One ``numpy.random.Generator`` seeded from ``seed`` drives everything: the same ``(n_events, seed)`` gives the
same events, and the same CSV byte for byte.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np

from riskcascade.domain import RISK_TYPES, AdjudicatedCase, Entities, EventType, Outcome, RiskEvent
from riskcascade.synthetic_fraud import FRAUD_PATTERNS, TWIN_EVENT_RATIO, legit_twins
from riskcascade.synthetic_marketplace import (
    DRAWN_FEATURES,
    ENTITY_KINDS,
    EVENT_TYPES,
    NEW_ACCOUNT_DAYS,
    ORDER,
    REVIEW,
    Population,
    build_legit_world,
    legit_events,
)
from riskcascade.synthetic_notes import write_notes

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
WINDOW_DAYS = 30


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


# --- Assembly ------------------------------------------------------------------------------------------------


def _accounts_per_entity(entity: np.ndarray, account: np.ndarray, n_accounts: int) -> np.ndarray:
    """For each event, the number of distinct accounts seen on its entity (0 where the event has none)."""
    has = entity >= 0
    pairs = np.unique(entity[has] * n_accounts + account[has])
    counts = np.bincount(pairs // n_accounts, minlength=int(entity.max()) + 1)
    return np.where(has, counts[np.maximum(entity, 0)], 0).astype(float)


def _graph_features(
    entity: dict[str, np.ndarray], account_age: np.ndarray, event_type: np.ndarray
) -> dict[str, np.ndarray]:
    account = entity["account"]
    n_accounts = len(account_age)
    out = {
        "device_account_count": _accounts_per_entity(entity["device"], account, n_accounts),
        "ip_account_count": _accounts_per_entity(entity["ip"], account, n_accounts),
    }
    per_instrument_event = _accounts_per_entity(entity["instrument"], account, n_accounts)
    per_account = np.zeros(n_accounts)
    np.maximum.at(per_account, account, per_instrument_event)
    out["instrument_account_count"] = per_account[account]

    shared = np.zeros(n_accounts)
    for kind in ("device", "ip", "instrument"):
        has = entity[kind] >= 0
        pairs = np.unique(entity[kind][has] * n_accounts + account[has])
        owners = np.bincount(pairs // n_accounts)
        pair_is_shared = owners[pairs // n_accounts] > 1
        np.add.at(shared, (pairs % n_accounts)[pair_is_shared], 1)
    out["shared_entity_count"] = shared[account]

    seller = entity["seller"]
    orders = (event_type == ORDER) & (seller >= 0)
    young_buyer = account_age[account] < NEW_ACCOUNT_DAYS
    n_sellers = int(seller.max()) + 1
    order_count = np.bincount(seller[orders], minlength=n_sellers)
    young_count = np.bincount(seller[orders & young_buyer], minlength=n_sellers)
    share = np.round(young_count / np.maximum(order_count, 1), 4)
    out["seller_new_buyer_share"] = np.where(seller >= 0, share[np.maximum(seller, 0)], 0.0)
    return out


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
    risk_type: list[str]
    sophisticated: np.ndarray  # generated by a sophisticated cluster or a legitimate twin (diagnostics only)
    seconds: np.ndarray  # seconds after WINDOW_START


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
    feature.update(_graph_features(entity, account_age, event_type))
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
    day, second = rng.integers(0, WINDOW_DAYS, n_events), rng.integers(0, 3600, n_events)
    return _Simulation(
        event_type=event_type,
        entity=entity,
        feature=feature,
        notes=notes,
        risk_type=[b.risk_type for b in batches for _ in range(b.n)],
        sophisticated=np.concatenate([b.sophisticated for b in batches]),
        seconds=day * 86400 + feature["hour_of_day"].astype(np.int64) * 3600 + second,
    )


def generate_events(n_events: int, seed: int) -> list[LabelledEvent]:
    """``n_events`` labelled events, in time order, fully determined by ``(n_events, seed)``."""
    sim = _simulate(n_events, seed)
    order = np.argsort(sim.seconds, kind="stable")
    matrix = np.column_stack([sim.feature[name] for name in FEATURE_NAMES])[order].tolist()
    events = []
    for row, i in enumerate(order.tolist()):
        events.append(
            LabelledEvent(
                case_id=f"syn{seed}-{row:06d}",
                event_type=EVENT_TYPES[sim.event_type[i]],
                entities=_entities(sim.entity, i),
                features=dict(zip(FEATURE_NAMES, matrix[row])),
                note=sim.notes[i],
                occurred_at=WINDOW_START + timedelta(seconds=int(sim.seconds[i])),
                label=int(sim.risk_type[i] != ""),
                risk_type=sim.risk_type[i],
            )
        )
    return events


def split_events(
    events: list[LabelledEvent], seed: int, valid_share: float = 0.15, test_share: float = 0.15
) -> dict[str, list[LabelledEvent]]:
    """Stratified (on label) random split into train / valid / test; each part keeps the input order."""
    from riskcascade.datasets.splits import stratified_split  # the datasets package imports this module

    part = stratified_split(np.array([e.label for e in events]), seed, valid_share, test_share)
    return {name: [e for e, p in zip(events, part) if p == name] for name in ("train", "valid", "test")}


# --- CSV -----------------------------------------------------------------------------------------------------

ENTITY_COLUMNS = ("account_id", "seller_id", "device_id", "ip", "payment_instrument_id")
CSV_COLUMNS: tuple[str, ...] = (
    ("case_id", "event_type", *ENTITY_COLUMNS, "occurred_at", *FEATURE_NAMES, "note", "label", "risk_type")
)


def write_events_csv(path: str | Path, events: Iterable[LabelledEvent]) -> Path:
    """Write events under the header CSV_COLUMNS: floats exactly (repr), times as ISO 8601 with offset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for e in events:
            writer.writerow(
                [
                    e.case_id,
                    e.event_type.value,
                    *(getattr(e.entities, c) for c in ENTITY_COLUMNS),
                    e.occurred_at.isoformat(),
                    *(repr(float(e.features[name])) for name in FEATURE_NAMES),
                    e.note,
                    e.label,
                    e.risk_type,
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
    return LabelledEvent(
        case_id=_parse_cell(row, "case_id", _required_text),
        event_type=_parse_cell(row, "event_type", EventType),
        entities=Entities(
            account_id=_parse_cell(row, "account_id", _required_text),
            **{c: row[c] for c in ENTITY_COLUMNS if c != "account_id"},
        ),
        features={name: _parse_cell(row, name, _feature_value) for name in FEATURE_NAMES},
        note=row["note"],
        occurred_at=_parse_cell(row, "occurred_at", _timestamp),
        label=label,
        risk_type=risk_type,
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
            if column not in header:
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
    return RiskEvent(e.case_id, e.event_type, e.entities, dict(e.features), {NOTE_FIELD: e.note} if e.note else {},
                     e.occurred_at)


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
        text={NOTE_FIELD: e.note} if e.note else {},
    )


NOTE_FIELD = "note"  # the free-text field of RiskEvent.text the generator's notes travel in


def _summary(e: LabelledEvent) -> str:
    """Display line: the event's facts with exact numbers (``retrieval.narrative.feature_facts``), then the verdict.

    The narrative a case is embedded by uses the same phrases, rounded and without the verdict.
    """
    from retrieval.narrative import feature_facts  # riskcascade does not import retrieval at module level

    verdict = f"fraud ({e.risk_type})" if e.label else "legitimate"
    return ", ".join(feature_facts(e.event_type, e.features, precise=True)) + f"; {verdict}"
