"""The five fraud patterns of the synthetic generator (mechanisms documented in ``riskcascade.modelling.synthetic``).

Each pattern builds an ``EventBatch`` of its own events. Fraud here is organised: crews, rings, batches,
brushing sellers and farms are clusters that share devices, IPs, cards or a seller, which is what the graph
features see. A share of clusters per pattern (``SOPHISTICATED_SHARE``) imitates legitimate users on most
signals at once (residential proxy IPs, one device per account, aged accounts, established sellers), and the
others still mimic one signal or another at random.

Each pattern also runs as its own *legitimate twin* (``twin=True``, see ``legit_twins``): the same mechanism,
every cluster sophisticated, labelled legitimate. The twins are real-world look-alikes: an owner back from a
trip on a new phone who resets the password and withdraws (account takeover), a family shop whose relatives
share devices and buy from each other (collusion), a student dorm signing up in one week for the welcome promo
(promo abuse), a new seller's launch where friends buy cheap items and leave short five-star reviews
(brushing), flash-sale deal hunters clicking fast on a mobile network (click farm). Sophisticated fraud and
its twin cannot be told apart from the features: that is the genuinely uncertain band the cascade escalates.

Each cluster also acts at a tempo (``TEMPO``, laid out by ``cluster_times``): one active period placed at random
in the window, worked in sittings whose events follow each other seconds to minutes apart. Plain clusters burst;
sophisticated ones spread the same work out several times longer, except a share (``SOPHISTICATED_BURST_SHARE``)
that a deadline keeps to the burst tempo. The twins are sophisticated clusters too, so they get the same mix of
tempos: a dorm's promo night, a launch day, a flash-sale evening burst like a batch, a ring or a farm; velocity
raises suspicion without settling it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from riskcascade.core.domain import RISK_TYPES, EventType
from riskcascade.modelling.synthetic_marketplace import (
    ORDER,
    PAYOUT,
    PLAIN,
    PROMO,
    REVIEW,
    SECONDS_PER_HOUR,
    SHADY,
    WINDOW_OVERHANG_SHARE,
    WINDOW_SECONDS,
    EventBatch,
    LegitWorld,
    Population,
    Tempo,
    chance,
    cluster_times,
    clusters,
    draw_event_types,
    draw_ratings,
    draw_sessions,
    id_pool,
    lognormal,
    pick,
    place_periods,
)

SOPHISTICATED_SHARE = {  # share of clusters per pattern that imitate legitimate users on most signals
    "account_takeover": 0.45,
    "collusion": 0.45,
    "promo_abuse": 0.45,
    "brushing": 0.45,
    "click_farm": 0.40,
}
TWIN_EVENT_RATIO = 1.2  # legitimate look-alike events generated per fraud event of each pattern
TWIN_SHADY_WORDING_SHARE = 0.1
ATO_VICTIMS_PER_CREW = 6
ATO_EVENTS_PER_VICTIM = 2.5
ATO_MIN_VICTIM_AGE_DAYS = 90  # takeovers target established accounts
COLLUSION_EVENTS_PER_RING = 30
COLLUSION_RING_SIZES = (3, 8)
PROMO_EVENTS_PER_BATCH = 25
PROMO_BATCH_SIZES = (8, 25)
BRUSHING_EVENTS_PER_SELLER = 25
BRUSHING_ACCOUNTS_PER_SELLER = (5, 15)
BRUSHING_ESTABLISHED_SELLER_SHARE = 0.5  # brushers that are real sellers with real customers
CLICK_FARM_EVENTS_PER_FARM = 120
CLICK_FARM_SIZES = (40, 120)
CLICK_FARM_CAMPAIGNS = 3  # promoted sellers per farm, one campaign each
# Tempo (see the module docstring): pattern -> (burst tempo of plain clusters, slow tempo of sophisticated ones).
TEMPO: dict[str, tuple[Tempo, Tempo]] = {
    # per victim: logins, changes and the drain within hours to a day, one sitting after another; slowly over days
    "account_takeover": (Tempo((0.5, 24), 1.5, 90), Tempo((48, 120), 1.0, 600)),
    # a ring's trades over one to two weeks, a few at a sitting; sleepers one at a time over three to four weeks
    "collusion": (Tempo((168, 336), 3.0, 150), Tempo((504, 648), 1.0, 600)),
    # a batch's sign-ups and redemptions in a few hours, one account after another; over half a day to two days
    "promo_abuse": (Tempo((1, 5), 12.0, 40), Tempo((12, 48), 1.0, 300)),
    # a seller's campaign over a few days, several fake orders and reviews a sitting; over ten to twenty days
    "brushing": (Tempo((48, 120), 5.0, 60), Tempo((240, 480), 1.5, 600)),
    # per campaign: bursts of the racks' phones firing in sequence within one to two days; at human pace over a week
    "click_farm": (Tempo((24, 48), 15.0, 6), Tempo((120, 240), 2.0, 120)),
}
ATO_CAMPAIGN_HOURS = ((24, 96), (168, 336))  # a crew works through its victims over this (plain, slow crews)
SOPHISTICATED_BURST_SHARE = 0.25  # sophisticated clusters that still act at the burst tempo (a promo's deadline)


class FraudPattern(Protocol):
    """Builds n events of one pattern; with twin=True, its legitimate look-alikes instead."""

    def __call__(
        self, world: LegitWorld, pop: Population, rng: np.random.Generator, n: int, twin: bool = False
    ) -> EventBatch: ...

def _either(flag: np.ndarray, sophisticated: float, plain: float) -> np.ndarray:
    """Per-entry probability: ``sophisticated`` where flag is set, ``plain`` elsewhere."""
    return np.where(flag, sophisticated, plain)


def _slow(rng: np.random.Generator, sophisticated: np.ndarray) -> np.ndarray:
    """Per cluster: whether it takes the slow tempo (sophisticated, and no deadline forcing a burst)."""
    return sophisticated & ~chance(rng, SOPHISTICATED_BURST_SHARE, len(sophisticated))


def account_takeover(
    world: LegitWorld, pop: Population, rng: np.random.Generator, n: int, twin: bool = False
) -> EventBatch:
    """Crews working taken-over aged accounts; twin: owners recovering their own account after a trip."""
    b = EventBatch(n, "" if twin else "account_takeover")
    sophisticated_share = 1.0 if twin else SOPHISTICATED_SHARE["account_takeover"]
    aged = np.flatnonzero(pop.account_age()[world.accounts] >= ATO_MIN_VICTIM_AGE_DAYS)
    n_victims = min(len(aged), max(1, round(n / ATO_EVENTS_PER_VICTIM)))
    victims = rng.choice(aged, size=n_victims, replace=False)
    victim = rng.integers(0, n_victims, n)
    who = victims[victim]
    crew_of_victim = np.arange(n_victims) // ATO_VICTIMS_PER_CREW
    crew, n_crews = crew_of_victim[victim], int(crew_of_victim[-1]) + 1
    pro_crew = chance(rng, sophisticated_share, n_crews)
    pro_victim = pro_crew[crew_of_victim]
    pro = b.sophisticated = pro_victim[victim]
    spoof_device = chance(rng, _either(pro_victim, 0.9, 0.15), n_victims)[victim]
    victim_ip = chance(rng, _either(pro_victim, 0.9, 0.15), n_victims)[victim]  # residential proxy
    stuffed = chance(rng, _either(pro_victim, 0.15, 0.7), n_victims)[victim]  # credential stuffing, not phishing
    mix = {EventType.LOGIN: 0.35, EventType.ACCOUNT_CHANGE: 0.22, EventType.PAYOUT: 0.25, EventType.ORDER: 0.18}
    b.event_type = draw_event_types(rng, n, mix)
    order, payout = b.is_type(ORDER), b.is_type(PAYOUT)
    b.entity["account"] = world.accounts[who]
    crew_device = pick(rng, id_pool(pop, "device", n_crews, 3), crew)
    b.entity["device"] = np.where(spoof_device, world.home_device[who], crew_device)
    crew_ip = pick(rng, id_pool(pop, "ip", n_crews, 3), crew)
    b.entity["ip"] = np.where(victim_ip, world.home_ip[who], crew_ip)
    # Mule bank accounts: sophisticated crews use a fresh one per victim, others share a few across victims.
    own_mule = pop.new_ids("instrument", n_victims)[victim]
    mule = np.where(pro, own_mule, pick(rng, id_pool(pop, "instrument", n_crews, 2), crew))
    b.entity["instrument"] = np.where(payout, mule, np.where(order, world.home_instrument[who], -1))
    b.entity["seller"] = np.where(order, world.popular_sellers(rng, n), -1)
    b.feature["new_device"] = (~spoof_device) * 1.0
    b.feature["new_ip"] = (~victim_ip) * 1.0

    typical = pop.typical_amount()[b.entity["account"]]
    drain = np.where(
        payout, lognormal(rng, n, median=450, sigma=0.9), typical * lognormal(rng, n, median=3.5, sigma=0.7)
    )
    modest = np.where(
        payout, lognormal(rng, n, median=180, sigma=0.9), typical * lognormal(rng, n, median=1.6, sigma=0.6)
    )
    b.feature["amount"] = np.where(order | payout, np.round(np.where(pro, modest, drain), 2), 0.0)
    b.feature["shipping_billing_mismatch"] = (order & chance(rng, _either(pro, 0.25, 0.55), n)) * 1.0
    b.feature["orders_last_24h"] = (rng.poisson(np.where(order, 1.2, 0.4)) + order).astype(float)
    b.feature["failed_logins_24h"] = (rng.poisson(np.where(stuffed, 3.0, 0.15)) + stuffed).astype(float)
    b.feature["password_reset_recent"] = chance(rng, _either(pro, 0.15, 0.65), n) * 1.0
    b.feature["promo_used"] = (order & chance(rng, 0.05, n)) * 1.0
    draw_sessions(b, rng, seconds=(170, 0.8), clicks=(9, 0.6))
    _takeover_times(rng, b, victim, crew_of_victim, pro_crew)
    b.style = np.where(chance(rng, _either(pro, 0.25, 0.6), n), SHADY, PLAIN)
    return b


def _takeover_times(
    rng: np.random.Generator, b: EventBatch, victim: np.ndarray, crew_of_victim: np.ndarray, pro_crew: np.ndarray
) -> None:
    """Each crew works through its victims within one campaign (ATO_CAMPAIGN_HOURS); each victim's takeover is a
    cluster of its own inside it. Plain crews strike at night more often."""
    n_crews = len(pro_crew)
    slow_crew = _slow(rng, pro_crew)
    campaign = np.where(slow_crew, rng.uniform(*ATO_CAMPAIGN_HOURS[1], n_crews),
                        rng.uniform(*ATO_CAMPAIGN_HOURS[0], n_crews)) * SECONDS_PER_HOUR
    window = np.zeros(n_crews), np.full(n_crews, float(WINDOW_SECONDS))
    start, campaign = place_periods(rng, campaign, *window, WINDOW_OVERHANG_SHARE)
    cluster_times(rng, b, victim, TEMPO["account_takeover"], slow_crew[crew_of_victim],
                  night_share=_either(pro_crew[crew_of_victim], 0.15, 0.55),
                  within=(start[crew_of_victim], (start + campaign)[crew_of_victim]))


def collusion(
    world: LegitWorld, pop: Population, rng: np.random.Generator, n: int, twin: bool = False
) -> EventBatch:
    """Rings trading with a colluding seller; twin: a family shop whose relatives buy from each other."""
    b = EventBatch(n, "" if twin else "collusion")
    sophisticated_share = 1.0 if twin else SOPHISTICATED_SHARE["collusion"]
    ring, member, ring_of_member = clusters(rng, n, COLLUSION_EVENTS_PER_RING, COLLUSION_RING_SIZES)
    n_rings, n_members = int(ring_of_member.max()) + 1, len(ring_of_member)
    pro_ring = chance(rng, sophisticated_share, n_rings)
    pro_member = pro_ring[ring_of_member]
    pro = b.sophisticated = pro_ring[ring]
    sleeper = chance(rng, _either(pro_member, 0.8, 0.25), n_members)
    age = np.where(
        sleeper, lognormal(rng, n_members, median=400, sigma=0.7), lognormal(rng, n_members, median=35, sigma=0.8)
    )
    accounts = pop.new_accounts(rng, age)
    own_device = chance(rng, _either(pro_ring, 0.9, 0.25), n_rings)[ring_of_member]
    ring_device = pick(rng, id_pool(pop, "device", n_rings, 2), ring_of_member)
    member_device = np.where(own_device, pop.new_ids("device", n_members), ring_device)
    # Sophisticated members each sit behind a residential proxy exit (a legitimate household's IP).
    ring_ip = pick(rng, id_pool(pop, "ip", n_rings, 3), ring_of_member)
    member_ip = np.where(pro_member, world.residential_ips(rng, n_members), ring_ip)
    own_card = chance(rng, _either(pro_member, 0.85, 0.1), n_members)
    ring_card = pick(rng, id_pool(pop, "instrument", n_rings, 2), ring_of_member)
    member_card = np.where(own_card, pop.new_ids("instrument", n_members), ring_card)
    # Sophisticated rings launder through an established seller that also has real customers.
    own_seller = pop.new_sellers(lognormal(rng, n_rings, median=120, sigma=0.9))
    ring_seller = np.where(pro_ring, world.popular_sellers(rng, n_rings), own_seller)

    mix = {EventType.ORDER: 0.62, EventType.REVIEW: 0.22, EventType.PAYOUT: 0.16}
    b.event_type = draw_event_types(rng, n, mix)
    order, payout = b.is_type(ORDER), b.is_type(PAYOUT)
    b.entity["account"] = accounts[member]
    b.entity["device"] = member_device[member]
    b.entity["ip"] = member_ip[member]
    b.entity["instrument"] = np.where(order | payout, member_card[member], -1)
    b.entity["seller"] = np.where(b.is_type(ORDER, REVIEW), ring_seller[ring], -1)
    b.feature["new_device"] = chance(rng, 0.10, n) * 1.0
    b.feature["new_ip"] = chance(rng, 0.15, n) * 1.0
    trade = lognormal(rng, n, median=np.where(pro, 80, 150), sigma=0.8)
    amount = np.where(payout, lognormal(rng, n, median=250, sigma=0.9), trade)
    b.feature["amount"] = np.where(order | payout, np.round(amount, 2), 0.0)
    b.feature["shipping_billing_mismatch"] = (order & chance(rng, 0.15, n)) * 1.0
    b.feature["orders_last_24h"] = (rng.poisson(np.where(pro, 0.5, 1.2)) + order).astype(float)
    b.feature["failed_logins_24h"] = rng.poisson(0.15, n).astype(float)
    b.feature["password_reset_recent"] = chance(rng, 0.04, n) * 1.0
    b.feature["promo_used"] = (order & chance(rng, 0.05, n)) * 1.0
    b.feature["review_rating"] = np.where(b.is_type(REVIEW), draw_ratings(rng, n, five_star_share=0.7), 0.0)
    b.terse = chance(rng, 0.3, n)
    draw_sessions(b, rng, seconds=(220, 0.8), clicks=(11, 0.6))
    cluster_times(rng, b, ring, TEMPO["collusion"], _slow(rng, pro_ring), night_share=np.full(n_rings, 0.2))
    b.style = np.where(chance(rng, 0.25, n), SHADY, PLAIN)
    return b


def promo_abuse(
    world: LegitWorld, pop: Population, rng: np.random.Generator, n: int, twin: bool = False
) -> EventBatch:
    """Batches of new accounts farming promos; twin: a student dorm signing up for the welcome offer."""
    b = EventBatch(n, "" if twin else "promo_abuse")
    sophisticated_share = 1.0 if twin else SOPHISTICATED_SHARE["promo_abuse"]
    batch, member, batch_of_member = clusters(rng, n, PROMO_EVENTS_PER_BATCH, PROMO_BATCH_SIZES)
    n_batches, n_members = int(batch_of_member.max()) + 1, len(batch_of_member)
    pro_batch = chance(rng, sophisticated_share, n_batches)
    pro_member = pro_batch[batch_of_member]
    pro = b.sophisticated = pro_batch[batch]
    age = np.where(pro_member, rng.uniform(15, 200, n_members), rng.uniform(0, 14, n_members))
    accounts = pop.new_accounts(rng, age)
    spoofing = chance(rng, _either(pro_batch, 0.9, 0.3), n_batches)[batch_of_member]  # one fingerprint per account
    batch_device = pop.new_ids("device", n_batches)[batch_of_member]
    member_device = np.where(spoofing, pop.new_ids("device", n_members), batch_device)
    rotating = chance(rng, _either(pro_batch, 0.0, 0.25), n_batches)[batch]  # a fresh proxy IP per event
    sticky_ip = world.residential_ips(rng, n_members)[member]  # one residential proxy exit per account
    own_card = chance(rng, _either(pro_member, 0.9, 0.4), n_members)
    batch_card = pick(rng, id_pool(pop, "instrument", n_batches, 3), batch_of_member)
    member_card = np.where(own_card, pop.new_ids("instrument", n_members), batch_card)
    b.event_type = draw_event_types(rng, n, {EventType.PROMO_REDEMPTION: 0.6, EventType.ORDER: 0.4})
    b.entity["account"] = accounts[member]
    b.entity["device"] = member_device[member]
    batch_ip = np.where(rotating, pop.new_ids("ip", n), pop.new_ids("ip", n_batches)[batch])
    b.entity["ip"] = np.where(pro, sticky_ip, batch_ip)
    b.entity["instrument"] = member_card[member]
    b.entity["seller"] = world.popular_sellers(rng, n)
    b.feature["new_device"] = chance(rng, 0.15, n) * 1.0
    b.feature["new_ip"] = (rotating | chance(rng, 0.2, n)) * 1.0
    b.feature["amount"] = np.round(lognormal(rng, n, median=np.where(pro, 40, 28), sigma=0.5), 2)
    b.feature["promo_used"] = (b.is_type(PROMO) | chance(rng, 0.85, n)) * 1.0
    b.feature["shipping_billing_mismatch"] = (b.is_type(ORDER) & chance(rng, 0.2, n)) * 1.0
    b.feature["orders_last_24h"] = (rng.poisson(np.where(pro, 0.4, 0.9)) + 1).astype(float)
    b.feature["failed_logins_24h"] = rng.poisson(0.12, n).astype(float)
    b.feature["password_reset_recent"] = chance(rng, 0.03, n) * 1.0
    draw_sessions(b, rng, seconds=(110, 0.7), clicks=(10, 0.5))
    cluster_times(rng, b, batch, TEMPO["promo_abuse"], _slow(rng, pro_batch),
                  night_share=_either(pro_batch, 0.1, 0.4))
    b.style = np.where(chance(rng, _either(pro, 0.3, 0.6), n), SHADY, PLAIN)
    return b


def brushing(
    world: LegitWorld, pop: Population, rng: np.random.Generator, n: int, twin: bool = False
) -> EventBatch:
    """A seller's own accounts placing fake orders and reviews; twin: a launch with friends' reviews."""
    b = EventBatch(n, "" if twin else "brushing")
    sophisticated_share = 1.0 if twin else SOPHISTICATED_SHARE["brushing"]
    seller_idx, member, seller_of_member = clusters(
        rng, n, BRUSHING_EVENTS_PER_SELLER, BRUSHING_ACCOUNTS_PER_SELLER
    )
    n_sellers, n_members = int(seller_of_member.max()) + 1, len(seller_of_member)
    pro_seller = chance(rng, sophisticated_share, n_sellers)
    pro_member = pro_seller[seller_of_member]
    pro = b.sophisticated = pro_seller[seller_idx]
    established = chance(rng, _either(pro_seller, 1.0, BRUSHING_ESTABLISHED_SELLER_SHARE), n_sellers)
    new_sellers = pop.new_sellers(lognormal(rng, n_sellers, median=150, sigma=1.0))
    sellers = np.where(established, world.popular_sellers(rng, n_sellers), new_sellers)
    age = np.where(
        pro_member, lognormal(rng, n_members, median=300, sigma=0.8), lognormal(rng, n_members, median=20, sigma=1.0)
    )
    accounts = pop.new_accounts(rng, age)
    own_device = chance(rng, _either(pro_member, 0.9, 0.3), n_members)
    seller_device = pick(rng, id_pool(pop, "device", n_sellers, 3), seller_of_member)
    member_device = np.where(own_device, pop.new_ids("device", n_members), seller_device)
    proxied = chance(rng, 0.3, n) & ~pro  # a fresh proxy IP for this event
    sticky_ip = world.residential_ips(rng, n_members)[member]
    b.event_type = draw_event_types(rng, n, {EventType.ORDER: 0.5, EventType.REVIEW: 0.5})
    order, review = b.is_type(ORDER), b.is_type(REVIEW)
    b.entity["account"] = accounts[member]
    b.entity["device"] = member_device[member]
    seller_ip = np.where(proxied, pop.new_ids("ip", n), pick(rng, id_pool(pop, "ip", n_sellers, 2), seller_idx))
    b.entity["ip"] = np.where(pro, sticky_ip, seller_ip)
    b.entity["instrument"] = np.where(order, pop.new_ids("instrument", n_members)[member], -1)
    b.entity["seller"] = sellers[seller_idx]
    b.feature["new_device"] = chance(rng, 0.1, n) * 1.0
    b.feature["new_ip"] = (proxied | chance(rng, 0.1, n)) * 1.0
    amount = lognormal(rng, n, median=np.where(pro, 22, 6), sigma=0.7)
    b.feature["amount"] = np.where(order, np.round(amount, 2), 0.0)
    b.feature["orders_last_24h"] = (rng.poisson(np.where(pro, 0.5, 2.0)) + order).astype(float)
    b.feature["failed_logins_24h"] = rng.poisson(0.1, n).astype(float)
    rating = draw_ratings(rng, n, five_star_share=_either(pro, 0.6, 0.95))
    b.feature["review_rating"] = np.where(review, rating, 0.0)
    b.terse = chance(rng, _either(pro, 0.25, 0.8), n)
    draw_sessions(b, rng, seconds=(60, 0.6), clicks=(5, 0.5))
    unhurried = np.round(lognormal(rng, n, median=200, sigma=0.8))
    b.feature["session_seconds"] = np.where(pro, unhurried, b.feature["session_seconds"])
    cluster_times(rng, b, seller_idx, TEMPO["brushing"], _slow(rng, pro_seller),
                  night_share=_either(pro_seller, 0.1, 0.45))
    return b


def click_farm(
    world: LegitWorld, pop: Population, rng: np.random.Generator, n: int, twin: bool = False
) -> EventBatch:
    """Phone racks generating engagement; twin: flash-sale deal hunters on a mobile network."""
    b = EventBatch(n, "" if twin else "click_farm")
    sophisticated_share = 1.0 if twin else SOPHISTICATED_SHARE["click_farm"]
    farm, member, farm_of_member = clusters(rng, n, CLICK_FARM_EVENTS_PER_FARM, CLICK_FARM_SIZES)
    n_farms, n_members = int(farm_of_member.max()) + 1, len(farm_of_member)
    pro_farm = chance(rng, sophisticated_share, n_farms)
    pro = b.sophisticated = pro_farm[farm]
    accounts = pop.new_accounts(rng, lognormal(rng, n_members, median=60, sigma=1.0))
    rack_device = pick(rng, id_pool(pop, "device", n_farms, 10), farm_of_member)
    pro_member = pro_farm[farm_of_member]
    own_phone = pro_member & chance(rng, 0.6, n_members)
    member_device = np.where(own_phone, pop.new_ids("device", n_members), rack_device)
    mobile_ips = world.nat_ips[rng.integers(0, len(world.nat_ips), n)]  # SIM-card farms exit via carrier NAT
    mix = {EventType.LOGIN: 0.4, EventType.REVIEW: 0.3, EventType.ORDER: 0.3}
    b.event_type = draw_event_types(rng, n, mix)
    order = b.is_type(ORDER)
    b.entity["account"] = accounts[member]
    b.entity["device"] = member_device[member]
    b.entity["ip"] = np.where(pro, mobile_ips, pick(rng, id_pool(pop, "ip", n_farms, 2), farm))
    b.entity["instrument"] = np.where(order, pick(rng, id_pool(pop, "instrument", n_farms, 4), farm), -1)
    # Each campaign promotes one seller and is a cluster of its own in time: farms are hired per campaign.
    promoted = world.sellers[rng.integers(0, len(world.sellers), (n_farms, CLICK_FARM_CAMPAIGNS))]
    campaign = rng.integers(0, CLICK_FARM_CAMPAIGNS, n)
    b.entity["seller"] = np.where(b.is_type(ORDER, REVIEW), promoted[farm, campaign], -1)
    b.feature["new_device"] = chance(rng, 0.1, n) * 1.0
    b.feature["new_ip"] = chance(rng, 0.2, n) * 1.0
    b.feature["amount"] = np.where(order, np.round(lognormal(rng, n, median=12, sigma=0.6), 2), 0.0)
    b.feature["orders_last_24h"] = (rng.poisson(0.6, n) + order).astype(float)
    b.feature["failed_logins_24h"] = rng.poisson(0.3, n).astype(float)
    b.feature["review_rating"] = np.where(b.is_type(REVIEW), draw_ratings(rng, n, five_star_share=0.7), 0.0)
    b.terse = chance(rng, 0.6, n)
    draw_sessions(b, rng, seconds=(25, 0.6), clicks=(70, 0.5))
    throttled = pro | chance(rng, 0.15, n)
    b.feature["session_seconds"] = np.where(
        throttled, np.round(lognormal(rng, n, median=110, sigma=0.6)), b.feature["session_seconds"]
    )
    b.feature["clicks_per_session"] = np.where(
        throttled, np.round(lognormal(rng, n, median=24, sigma=0.5)), b.feature["clicks_per_session"]
    )
    pro_campaign = np.repeat(pro_farm, CLICK_FARM_CAMPAIGNS)
    cluster_times(rng, b, farm * CLICK_FARM_CAMPAIGNS + campaign, TEMPO["click_farm"], _slow(rng, pro_campaign),
                  night_share=_either(pro_campaign, 0.1, 0.35))
    return b


def legit_twins(
    world: LegitWorld, pop: Population, rng: np.random.Generator, risk_type: str, n: int
) -> EventBatch:
    """n legitimate events built by a pattern's mechanism, every cluster sophisticated, worded plainly."""
    b = FRAUD_PATTERNS[risk_type](world, pop, rng, n, twin=True)
    b.style = np.where(chance(rng, TWIN_SHADY_WORDING_SHARE, n), SHADY, PLAIN)
    return b


FRAUD_PATTERNS: dict[str, FraudPattern] = {
    "account_takeover": account_takeover,
    "collusion": collusion,
    "promo_abuse": promo_abuse,
    "brushing": brushing,
    "click_farm": click_farm,
}
if set(FRAUD_PATTERNS) != set(RISK_TYPES):
    raise ImportError("FRAUD_PATTERNS must cover exactly domain.RISK_TYPES")
