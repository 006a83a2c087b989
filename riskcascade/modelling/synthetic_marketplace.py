"""The simulated marketplace behind ``riskcascade.modelling.synthetic``: entities, legitimate behaviour, sampling
primitives.

Part of the synthetic generator (see that module's docstring for the whole picture). Events are built in
columns (numpy arrays, one entry per event) because a Python loop per event would take seconds for 60,000
events; entities are plain integer ids until ``riskcascade.modelling.synthetic`` turns them into strings.

Legitimate life here is deliberately messy, because every everyday exception below is also a fraud signal:
households share home IPs, family devices and cards; carrier-grade NAT puts dozens of strangers on one IP;
libraries and internet cafés put many accounts on one device; small companies share one card between staff;
people travel (new IP on hotel Wi-Fi), buy new phones (new device), send gifts (shipping differs from billing),
forget passwords (failed logins, a reset), buy in a hurry (short sessions), browse heavily (many clicks),
write three-word five-star reviews; new users redeem welcome promos and flock to trending new sellers.

Time: an ordinary account's events fall on random days of the window at hours drawn from a daily profile; a share
follow the account's previous event within minutes (log in, then order), users of a public computer queue one
after another and travellers on one lounge's Wi-Fi overlap. Clusters (fraud rings, batches, farms and their
legitimate twins) act within one active period in sittings: see ``Tempo`` and ``cluster_times``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from riskcascade.core.domain import EventType

WINDOW_DAYS = 30  # every event falls within this many days of the window's start
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86400
WINDOW_SECONDS = WINDOW_DAYS * SECONDS_PER_DAY
WINDOW_OVERHANG_SHARE = 0.65  # share of a cluster's active period that may fall outside the window and be cut
SITTING_GAP_SIGMA = 1.0  # lognormal spread of the time between consecutive events of a cluster's sitting
NEW_ACCOUNT_DAYS = 30  # an account younger than this is "new" (seller_new_buyer_share, young buyers)
EVENTS_PER_LEGIT_ACCOUNT = 5.0  # average legitimate activity per account over the window
EVENTS_PER_SELLER = 150.0  # legitimate events per legitimate seller
MIN_LEGIT_ACCOUNTS = 50
MIN_LEGIT_SELLERS = 20

LEGIT_YOUNG_ACCOUNT_SHARE = 0.12  # genuine new users
LEGIT_YOUNG_SELLER_SHARE = 0.12  # sellers under three months old
LEGIT_TRENDING_SELLER_SHARE = 0.5  # share of a new user's purchases that go to young sellers
LEGIT_SHARED_DEVICE_HOUSEHOLD_SHARE = 0.35  # households using one family device
LEGIT_SHARED_CARD_HOUSEHOLD_SHARE = 0.20
LEGIT_NAT_HOUSEHOLD_SHARE = 0.20  # households behind a carrier-grade NAT IP
LEGIT_ACCOUNTS_PER_NAT_IP = 35
LEGIT_COMPANY_CARD_ACCOUNT_SHARE = 0.04  # accounts paying with a card shared by their company's staff
LEGIT_ACCOUNTS_PER_COMPANY_CARD = 8
LEGIT_PUBLIC_DEVICE_SHARE = 0.02  # events from a library / internet-café computer
LEGIT_EVENTS_PER_PUBLIC_DEVICE = 20
LEGIT_TRAVEL_SHARE = 0.07  # events from hotel / airport Wi-Fi
LEGIT_EVENTS_PER_PUBLIC_WIFI_IP = 12
LEGIT_NEW_DEVICE_SHARE = 0.05  # events from a new phone or laptop
LEGIT_GIFT_SHARE = 0.09  # orders shipped to someone else
LEGIT_GIFT_AMOUNT_FACTOR = 1.8  # gifts cost more than the buyer's usual order
LEGIT_OTHER_MISMATCH_SHARE = 0.02  # orders shipped elsewhere for other reasons (work address, pickup point)
LEGIT_PROMO_ORDER_SHARE = 0.10  # orders with a promo code, established accounts
LEGIT_YOUNG_PROMO_ORDER_SHARE = 0.35  # orders with a promo code, new users (welcome offers)
LEGIT_FORGETFUL_SHARE = 0.05  # events after failed logins and often a password reset
LEGIT_FORGETFUL_RESET_SHARE = 0.6  # forgetful users who end up resetting the password
LEGIT_CHANGE_AFTER_LOCKOUT_SHARE = 0.15  # account changes made right after a lock-out
LEGIT_OTHER_RESET_SHARE = 0.02  # routine password changes
LEGIT_QUICK_BUYER_SHARE = 0.12  # very short sessions
LEGIT_HEAVY_BROWSER_SHARE = 0.04  # very many clicks
LEGIT_POWER_SHOPPER_SHARE = 0.05  # many orders a day
LEGIT_TERSE_REVIEW_SHARE = 0.20
LEGIT_NIGHT_SHARE = 0.08  # events drawn from the night-time hour profile
LEGIT_FOLLOW_UP_SHARE = 0.25  # events that continue the account's previous activity (log in, then order)
LEGIT_FOLLOW_UP_GAP_SECONDS = 240.0  # median time from the previous event to a follow-up (lognormal)
LEGIT_KIOSK_QUEUE_SHARE = 0.8  # events on a public computer that come right after its previous user's
LEGIT_KIOSK_QUEUE_GAP_SECONDS = 300.0
LEGIT_LOUNGE_SHARE = 0.5  # events on hotel / airport Wi-Fi that come right after another traveller's there
LEGIT_LOUNGE_GAP_SECONDS = 400.0
LEGIT_SHADY_WORDING_SHARE = 0.05  # notes worded like a fraudster's ("ship to freight forwarder")
LEGIT_MIX = {
    EventType.ORDER: 0.45,
    EventType.LOGIN: 0.24,
    EventType.REVIEW: 0.11,
    EventType.PROMO_REDEMPTION: 0.07,
    EventType.PAYOUT: 0.05,
    EventType.ACCOUNT_CHANGE: 0.08,
}

HOUSEHOLD_SIZES = np.array([1, 1, 1, 2, 2, 3, 4])
DAY_HOUR_WEIGHTS = np.array([2, 1, 1, 1, 1, 1, 2, 3, 4, 5, 5, 5, 6, 6, 5, 5, 5, 6, 7, 8, 8, 7, 5, 3], dtype=float)
NIGHT_HOUR_WEIGHTS = np.array([6, 7, 7, 7, 6, 5, 4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 5, 6], dtype=float)
LEGIT_RATING_PROBABILITIES = np.array([0.08, 0.05, 0.10, 0.27, 0.50])  # P(1..5 stars)

EVENT_TYPES: tuple[EventType, ...] = tuple(EventType)
CODE = {t: i for i, t in enumerate(EVENT_TYPES)}  # event type -> integer code used in the columns
ORDER, LOGIN, PAYOUT = CODE[EventType.ORDER], CODE[EventType.LOGIN], CODE[EventType.PAYOUT]
REVIEW, PROMO = CODE[EventType.REVIEW], CODE[EventType.PROMO_REDEMPTION]
ACCOUNT_CHANGE = CODE[EventType.ACCOUNT_CHANGE]
WITH_SELLER = (ORDER, REVIEW, PROMO)
WITH_INSTRUMENT = (ORDER, PAYOUT, PROMO)
ENTITY_KINDS = ("account", "device", "ip", "instrument", "seller")
SITTING_STAGES = (EventType.LOGIN, EventType.ACCOUNT_CHANGE, EventType.PROMO_REDEMPTION, EventType.ORDER,
                  EventType.REVIEW, EventType.PAYOUT)  # the order of a sitting's events: log in first, cash out last
SITTING_STAGE = np.array([SITTING_STAGES.index(t) for t in EVENT_TYPES])  # event type code -> place in a sitting
DRAWN_FEATURES = (  # features a pattern draws per event; the rest are derived after assembly
    "amount",
    "orders_last_24h",
    "failed_logins_24h",
    "password_reset_recent",
    "new_device",
    "new_ip",
    "promo_used",
    "session_seconds",
    "clicks_per_session",
    "review_rating",
    "shipping_billing_mismatch",
)  # hour_of_day is derived from the event's time
PLAIN, SHADY = 0, 1  # wording style of an event's free-text note


class Population:
    """Hands out integer entity ids and remembers per-account and per-seller attributes."""

    def __init__(self) -> None:
        self._next = {kind: 0 for kind in ENTITY_KINDS}
        self._account_age: list[np.ndarray] = []
        self._typical_amount: list[np.ndarray] = []
        self._seller_age: list[np.ndarray] = []

    def new_ids(self, kind: str, n: int) -> np.ndarray:
        start = self._next[kind]
        self._next[kind] += n
        return np.arange(start, start + n, dtype=np.int64)

    def new_accounts(self, rng: np.random.Generator, age_days: np.ndarray) -> np.ndarray:
        """Accounts of the given ages; each gets a typical order value (what amount_to_typical_ratio divides by)."""
        self._account_age.append(np.maximum(np.round(age_days), 0))
        self._typical_amount.append(np.round(lognormal(rng, len(age_days), median=45, sigma=0.7), 2) + 5.0)
        return self.new_ids("account", len(age_days))

    def new_sellers(self, age_days: np.ndarray) -> np.ndarray:
        self._seller_age.append(np.maximum(np.round(age_days), 1))
        return self.new_ids("seller", len(age_days))

    def account_age(self) -> np.ndarray:
        return np.concatenate(self._account_age)

    def typical_amount(self) -> np.ndarray:
        return np.concatenate(self._typical_amount)

    def seller_age(self) -> np.ndarray:
        return np.concatenate(self._seller_age)


@dataclass(frozen=True)
class LegitWorld:
    """The legitimate population; fraud patterns pick victims and promoted sellers from it."""

    accounts: np.ndarray
    activity: np.ndarray  # probability that an event belongs to each account
    home_device: np.ndarray
    home_ip: np.ndarray
    home_instrument: np.ndarray
    nat_ips: np.ndarray  # carrier-grade NAT IPs shared by many households
    public_wifi: np.ndarray  # hotel / airport IPs that travellers share
    public_devices: np.ndarray  # library / internet-café computers
    sellers: np.ndarray
    seller_popularity: np.ndarray  # probabilities, sum 1
    young_sellers: np.ndarray  # the trending new sellers new users flock to

    def popular_sellers(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.sellers[rng.choice(len(self.sellers), size=n, p=self.seller_popularity)]

    def residential_ips(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Home IPs of random legitimate accounts: what a residential proxy network exits through."""
        return self.home_ip[rng.integers(0, len(self.home_ip), n)]


class EventBatch:
    """Columns of a block of generated events (the legitimate block or one fraud pattern); -1 = no entity."""

    def __init__(self, n: int, risk_type: str = "") -> None:
        self.n = n
        self.risk_type = risk_type
        self.event_type = np.zeros(n, dtype=np.int64)
        self.entity = {kind: np.full(n, -1, dtype=np.int64) for kind in ENTITY_KINDS}
        self.feature = {name: np.zeros(n) for name in DRAWN_FEATURES}
        self.style = np.full(n, PLAIN, dtype=np.int64)
        self.terse = np.zeros(n, dtype=bool)  # review text is a few words
        self.sophisticated = np.zeros(n, dtype=bool)  # made by a cluster imitating legitimate users
        self.seconds = np.zeros(n, dtype=np.int64)  # when the event happened: seconds after the window's start
        self.cluster = np.full(n, -1, dtype=np.int64)  # the batch's cluster that made it; -1 for none

    def is_type(self, *codes: int) -> np.ndarray:
        return np.isin(self.event_type, codes)


# --- Sampling primitives -------------------------------------------------------------------------------------


def lognormal(rng: np.random.Generator, n: int, median: float | np.ndarray, sigma: float) -> np.ndarray:
    return median * np.exp(sigma * rng.standard_normal(n))


def chance(rng: np.random.Generator, p: float | np.ndarray, n: int) -> np.ndarray:
    """n Bernoulli draws (p may be per-entry)."""
    return rng.random(n) < p


def draw_event_types(rng: np.random.Generator, n: int, mix: dict[EventType, float]) -> np.ndarray:
    codes = np.array([CODE[t] for t in mix])
    p = np.array(list(mix.values()), dtype=float)
    return codes[rng.choice(len(codes), size=n, p=p / p.sum())]


def draw_hours(rng: np.random.Generator, n: int, night_share: float | np.ndarray) -> np.ndarray:
    """Hour of day: a mixture of the daytime and the night-time profile."""
    day = rng.choice(24, size=n, p=DAY_HOUR_WEIGHTS / DAY_HOUR_WEIGHTS.sum())
    night = rng.choice(24, size=n, p=NIGHT_HOUR_WEIGHTS / NIGHT_HOUR_WEIGHTS.sum())
    return np.where(chance(rng, night_share, n), night, day).astype(float)


def draw_sessions(
    b: EventBatch, rng: np.random.Generator, seconds: tuple[float, float], clicks: tuple[float, float]
) -> None:
    """Session length and clicks, each lognormal with (median, sigma)."""
    b.feature["session_seconds"] = np.clip(np.round(lognormal(rng, b.n, *seconds)), 3, 7200)
    b.feature["clicks_per_session"] = np.clip(np.round(lognormal(rng, b.n, *clicks)), 1, 500)


def draw_ratings(rng: np.random.Generator, n: int, five_star_share: float | np.ndarray) -> np.ndarray:
    """Star ratings: five stars with the given share, otherwise the legitimate rating profile."""
    legit = rng.choice(5, size=n, p=LEGIT_RATING_PROBABILITIES) + 1.0
    return np.where(chance(rng, five_star_share, n), 5.0, legit)


def clusters(
    rng: np.random.Generator, n_events: int, events_per_cluster: float, sizes: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spread events over clusters of members (rings, batches, farms) of sizes in ``sizes`` (inclusive).

    Returns the cluster of each event, the member (index over all members) of each event, and the cluster of
    each member.
    """
    n_clusters = max(1, round(n_events / events_per_cluster))
    size = rng.integers(sizes[0], sizes[1] + 1, n_clusters)
    first = np.concatenate([[0], np.cumsum(size)[:-1]])
    cluster = rng.integers(0, n_clusters, n_events)
    member = first[cluster] + (rng.random(n_events) * size[cluster]).astype(np.int64)
    return cluster, member, np.repeat(np.arange(n_clusters), size)


@dataclass(frozen=True)
class Tempo:
    """How a cluster spreads its events in time: one active period, worked in sittings (bursts of activity)."""

    span_hours: tuple[float, float]  # length of the cluster's active period, uniform in this range
    events_per_sitting: float  # average events per sitting; the cluster's events divide into sittings of about this
    gap_seconds: float  # median time between consecutive events of a sitting (lognormal, SITTING_GAP_SIGMA)


def cluster_times(
    rng: np.random.Generator,
    b: EventBatch,
    cluster: np.ndarray,
    tempo: tuple[Tempo, Tempo],
    slow: np.ndarray,
    night_share: np.ndarray,
    within: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Set ``b.seconds`` and ``b.cluster``: each cluster acts within one active period, in sittings.

    ``cluster`` is each event's cluster; ``slow`` and ``night_share`` are per cluster. A cluster takes the second
    tempo of ``tempo`` where ``slow`` is set, the first elsewhere. Its active period lies in the window, placed by
    ``place_periods``, or inside its own bounds ``within`` (per cluster: earliest start, latest end), e.g. a
    crew's campaign. Its sittings fall at random moments of the period: a period shorter than a day starts at an
    hour drawn from the day/night profile with ``night_share``; on longer ones each sitting moves to such an hour
    of its own day. A sitting's events follow each other in ``SITTING_STAGES`` order, lognormal gaps apart. A
    cluster whose last sitting runs past the window's end moves back by as much.
    """
    fast_tempo, slow_tempo = tempo
    n_clusters = len(slow)
    span = np.where(slow, rng.uniform(*slow_tempo.span_hours, n_clusters), rng.uniform(*fast_tempo.span_hours,
                    n_clusters)) * SECONDS_PER_HOUR
    if within is None:
        lo, hi, overhang = np.zeros(n_clusters), np.full(n_clusters, float(WINDOW_SECONDS)), WINDOW_OVERHANG_SHARE
    else:
        (lo, hi), overhang = within, 0.0
    start, span = place_periods(rng, span, lo, hi, overhang)
    short = span < SECONDS_PER_DAY
    start = np.where(short, np.clip(_at_profile_hour(rng, start, night_share), lo, hi - span), start)
    per_sitting = np.where(slow, slow_tempo.events_per_sitting, fast_tempo.events_per_sitting)
    sitting, owner = _deal_to_sittings(rng, cluster, np.round(np.bincount(cluster, minlength=n_clusters) / per_sitting))
    opens = start[owner] + rng.random(len(owner)) * span[owner]
    opens = np.where(short[owner], opens, _at_profile_hour(rng, opens, night_share[owner]))

    order = np.lexsort((rng.random(b.n), SITTING_STAGE[b.event_type], sitting))  # each sitting's events in turn
    s = sitting[order]
    first = np.r_[True, s[1:] != s[:-1]]
    gap = np.where(slow, slow_tempo.gap_seconds, fast_tempo.gap_seconds)[cluster[order]]
    elapsed = np.cumsum(np.where(first, 0.0, lognormal(rng, b.n, median=gap, sigma=SITTING_GAP_SIGMA)))
    seconds = np.empty(b.n, dtype=np.int64)
    seconds[order] = np.floor(opens[s] + elapsed - elapsed[first][np.cumsum(first) - 1])
    last = np.zeros(n_clusters, dtype=np.int64)
    np.maximum.at(last, cluster, seconds)
    overrun = np.maximum(last - (WINDOW_SECONDS - 1), 0)
    b.seconds = np.maximum(seconds - overrun[cluster], 0)
    b.cluster = cluster.astype(np.int64)


def _deal_to_sittings(
    rng: np.random.Generator, cluster: np.ndarray, n_sittings: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Deal each cluster's events in random order to its ``n_sittings`` (at least one) sittings, evenly.

    Returns each event's sitting (numbered over all clusters) and each sitting's cluster.
    """
    n_sittings = np.maximum(1, n_sittings).astype(np.int64)
    size = np.bincount(cluster, minlength=len(n_sittings))
    dealt = np.lexsort((rng.random(len(cluster)), cluster))
    place = np.empty(len(cluster), dtype=np.int64)
    place[dealt] = np.arange(len(cluster)) - (np.cumsum(size) - size)[cluster[dealt]]
    sitting = (np.cumsum(n_sittings) - n_sittings)[cluster] + place % n_sittings[cluster]
    return sitting, np.repeat(np.arange(len(n_sittings)), n_sittings)


def place_periods(
    rng: np.random.Generator, span: np.ndarray, lo: np.ndarray, hi: np.ndarray, overhang: float
) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of active periods of length ``span`` (seconds), each cut to its bounds [``lo``, ``hi``).

    A period starts uniformly where it overlaps its bounds by at least ``1 - overhang`` of its length (``overhang``
    0: where it fits; a period longer than its bounds fills them) and is cut to the bounds, as an extract of a
    longer history would cut it. Placed over the window with ``WINDOW_OVERHANG_SHARE``, periods of a week or more
    keep activity within about a fifth of even up to the window's edges, where periods that had to fit whole would
    thin it out over the first and last ``span``.
    """
    room = np.maximum(hi - lo - span, 0)
    start = lo - overhang * span + rng.random(len(span)) * (room + 2 * overhang * span)
    end = np.minimum(start + span, hi)
    start = np.maximum(start, lo)
    return start, end - start


def _at_profile_hour(rng: np.random.Generator, seconds: np.ndarray, night_share: np.ndarray) -> np.ndarray:
    """The same days as ``seconds``, at a random moment of an hour drawn from the day/night profile."""
    day = seconds // SECONDS_PER_DAY
    hour = draw_hours(rng, len(seconds), night_share)
    return day * SECONDS_PER_DAY + (hour + rng.random(len(seconds))) * SECONDS_PER_HOUR


def id_pool(pop: Population, kind: str, owners: int, per_owner: int) -> np.ndarray:
    """Fresh ids, one row of ``per_owner`` for each of ``owners``."""
    return pop.new_ids(kind, owners * per_owner).reshape(owners, per_owner)


def pick(rng: np.random.Generator, pool: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each entry of ``rows``, a random id from that row of ``pool``."""
    return pool[rows, rng.integers(0, pool.shape[1], len(rows))]


# --- Legitimate behaviour ------------------------------------------------------------------------------------


def build_legit_world(pop: Population, rng: np.random.Generator, n_events: int) -> LegitWorld:
    """Accounts in households, their devices, IPs and cards, the shared public ones, and the sellers."""
    n = max(MIN_LEGIT_ACCOUNTS, round(n_events / EVENTS_PER_LEGIT_ACCOUNT))
    young = chance(rng, LEGIT_YOUNG_ACCOUNT_SHARE, n)
    aged = np.clip(lognormal(rng, n, median=420, sigma=0.9), NEW_ACCOUNT_DAYS, 4000)
    accounts = pop.new_accounts(rng, np.where(young, rng.uniform(1, NEW_ACCOUNT_DAYS, n), aged))

    household = np.repeat(np.arange(n), rng.choice(HOUSEHOLD_SIZES, n))[:n]
    n_households = int(household[-1]) + 1
    family_device = pop.new_ids("device", n_households)
    shares_device = chance(rng, LEGIT_SHARED_DEVICE_HOUSEHOLD_SHARE, n_households)[household]
    home_device = np.where(shares_device, family_device[household], pop.new_ids("device", n))
    nat_ips = pop.new_ids("ip", max(1, round(n * LEGIT_NAT_HOUSEHOLD_SHARE / LEGIT_ACCOUNTS_PER_NAT_IP)))
    household_ip = np.where(
        chance(rng, LEGIT_NAT_HOUSEHOLD_SHARE, n_households),
        nat_ips[rng.integers(0, len(nat_ips), n_households)],
        pop.new_ids("ip", n_households),
    )
    family_card = pop.new_ids("instrument", n_households)
    shares_card = chance(rng, LEGIT_SHARED_CARD_HOUSEHOLD_SHARE, n_households)[household]
    home_instrument = np.where(shares_card, family_card[household], pop.new_ids("instrument", n))
    n_company_cards = max(1, round(n * LEGIT_COMPANY_CARD_ACCOUNT_SHARE / LEGIT_ACCOUNTS_PER_COMPANY_CARD))
    company_cards = pop.new_ids("instrument", n_company_cards)
    home_instrument = np.where(
        chance(rng, LEGIT_COMPANY_CARD_ACCOUNT_SHARE, n),
        company_cards[rng.integers(0, len(company_cards), n)],
        home_instrument,
    )

    n_sellers = max(MIN_LEGIT_SELLERS, round(n_events / EVENTS_PER_SELLER))
    young_seller = chance(rng, LEGIT_YOUNG_SELLER_SHARE, n_sellers)
    young_seller[0] = True  # at least one trending seller
    established_age = lognormal(rng, n_sellers, median=700, sigma=0.9)
    seller_age = np.where(young_seller, rng.uniform(1, 90, n_sellers), established_age)
    sellers = pop.new_sellers(seller_age)
    popularity = lognormal(rng, n_sellers, median=1.0, sigma=1.2)
    activity = lognormal(rng, n, median=1.0, sigma=0.8)
    # Shared public pools are sized from n_events, an upper bound on legitimate events that is close enough.
    n_wifi_ips = max(3, round(n_events * LEGIT_TRAVEL_SHARE / LEGIT_EVENTS_PER_PUBLIC_WIFI_IP))
    n_public_devices = max(3, round(n_events * LEGIT_PUBLIC_DEVICE_SHARE / LEGIT_EVENTS_PER_PUBLIC_DEVICE))
    return LegitWorld(
        accounts=accounts,
        activity=activity / activity.sum(),
        home_device=home_device,
        home_ip=household_ip[household],
        nat_ips=nat_ips,
        home_instrument=home_instrument,
        public_wifi=pop.new_ids("ip", n_wifi_ips),
        public_devices=pop.new_ids("device", n_public_devices),
        sellers=sellers,
        seller_popularity=popularity / popularity.sum(),
        young_sellers=sellers[young_seller],
    )


def legit_events(world: LegitWorld, pop: Population, rng: np.random.Generator, n: int) -> EventBatch:
    """n legitimate events, with every everyday exception listed in the module docstring."""
    b = EventBatch(n)
    b.event_type = draw_event_types(rng, n, LEGIT_MIX)
    who = rng.choice(len(world.accounts), size=n, p=world.activity)
    account = world.accounts[who]
    young = pop.account_age()[account] < NEW_ACCOUNT_DAYS
    typical = pop.typical_amount()[account]
    b.entity["account"] = account

    new_phone = chance(rng, LEGIT_NEW_DEVICE_SHARE, n)
    public_device = chance(rng, LEGIT_PUBLIC_DEVICE_SHARE, n)
    device = np.where(new_phone, pop.new_ids("device", n), world.home_device[who])
    kiosk = world.public_devices[rng.integers(0, len(world.public_devices), n)]
    b.entity["device"] = np.where(public_device, kiosk, device)
    travelling = chance(rng, LEGIT_TRAVEL_SHARE, n)
    wifi = world.public_wifi[rng.integers(0, len(world.public_wifi), n)]
    b.entity["ip"] = np.where(travelling, wifi, world.home_ip[who])
    b.entity["instrument"] = np.where(b.is_type(*WITH_INSTRUMENT), world.home_instrument[who], -1)
    trending = young & chance(rng, LEGIT_TRENDING_SELLER_SHARE, n)
    seller = np.where(
        trending, world.young_sellers[rng.integers(0, len(world.young_sellers), n)], world.popular_sellers(rng, n)
    )
    b.entity["seller"] = np.where(b.is_type(*WITH_SELLER), seller, -1)
    b.feature["new_device"] = (new_phone | public_device) * 1.0
    b.feature["new_ip"] = travelling * 1.0

    order, payout, promo = b.is_type(ORDER), b.is_type(PAYOUT), b.is_type(PROMO)
    gift = order & chance(rng, LEGIT_GIFT_SHARE, n)
    amount = typical * lognormal(rng, n, median=1.0, sigma=0.6) * np.where(gift, LEGIT_GIFT_AMOUNT_FACTOR, 1.0)
    amount = np.where(payout, lognormal(rng, n, median=120, sigma=1.0), amount)
    b.feature["amount"] = np.where(order | payout | promo, np.round(amount, 2), 0.0)
    b.feature["shipping_billing_mismatch"] = (gift | (order & chance(rng, LEGIT_OTHER_MISMATCH_SHARE, n))) * 1.0
    promo_share = np.where(young, LEGIT_YOUNG_PROMO_ORDER_SHARE, LEGIT_PROMO_ORDER_SHARE)
    b.feature["promo_used"] = (promo | (order & chance(rng, promo_share, n))) * 1.0

    power = chance(rng, LEGIT_POWER_SHOPPER_SHARE, n)
    b.feature["orders_last_24h"] = (rng.poisson(np.where(power, 4.0, 0.4)) + (order | promo)).astype(float)
    lockout = b.is_type(ACCOUNT_CHANGE) & chance(rng, LEGIT_CHANGE_AFTER_LOCKOUT_SHARE, n)
    forgetful = chance(rng, LEGIT_FORGETFUL_SHARE, n) | lockout
    b.feature["failed_logins_24h"] = rng.poisson(np.where(forgetful, 2.5, 0.1)).astype(float)
    reset = (forgetful & chance(rng, LEGIT_FORGETFUL_RESET_SHARE, n)) | chance(rng, LEGIT_OTHER_RESET_SHARE, n)
    b.feature["password_reset_recent"] = reset * 1.0

    draw_sessions(b, rng, seconds=(280, 0.8), clicks=(14, 0.6))
    quick = chance(rng, LEGIT_QUICK_BUYER_SHARE, n)
    b.feature["session_seconds"] = np.where(
        quick, np.round(lognormal(rng, n, median=45, sigma=0.5)) + 3, b.feature["session_seconds"]
    )
    heavy = chance(rng, LEGIT_HEAVY_BROWSER_SHARE, n)
    b.feature["clicks_per_session"] = np.where(
        heavy, np.round(lognormal(rng, n, median=55, sigma=0.4)), b.feature["clicks_per_session"]
    )
    b.feature["review_rating"] = np.where(b.is_type(REVIEW), draw_ratings(rng, n, five_star_share=0.0), 0.0)
    b.terse = chance(rng, LEGIT_TERSE_REVIEW_SHARE, n)
    # Who an event follows in time: the previous user of a public computer, another traveller in the same lounge,
    # otherwise the account's own previous activity.
    kind = np.where(public_device, 2, np.where(travelling, 1, 0))  # 0 account, 1 lounge (IP), 2 public computer
    key = np.where(public_device, b.entity["device"], np.where(travelling, b.entity["ip"], account))
    follow_share = np.array([LEGIT_FOLLOW_UP_SHARE, LEGIT_LOUNGE_SHARE, LEGIT_KIOSK_QUEUE_SHARE])[kind]
    gap = np.array([LEGIT_FOLLOW_UP_GAP_SECONDS, LEGIT_LOUNGE_GAP_SECONDS, LEGIT_KIOSK_QUEUE_GAP_SECONDS])[kind]
    b.seconds = _legit_times(rng, kind * (int(key.max()) + 1) + key, follow_share, gap)
    b.style = np.where(chance(rng, LEGIT_SHADY_WORDING_SHARE, n), SHADY, PLAIN)
    return b


def _legit_times(
    rng: np.random.Generator, key: np.ndarray, follow_share: np.ndarray, gap_seconds: np.ndarray
) -> np.ndarray:
    """Times of ordinary events: a random day of the window at a day/night-profile hour; with probability
    ``follow_share`` instead right after another event of the same ``key``, a lognormal ``gap_seconds`` later
    (per event: the median)."""
    n = len(key)
    day = rng.integers(0, WINDOW_DAYS, n)
    seconds = _at_profile_hour(rng, day * SECONDS_PER_DAY, np.full(n, LEGIT_NIGHT_SHARE)).astype(np.int64)
    # Each key's events in random order; a follow-up comes after the one before it in that order. (In time order,
    # follow-ups would pull later events forward and thin out the end of the window.)
    order = np.lexsort((rng.random(n), key))
    sorted_key = key[order]
    follows = chance(rng, follow_share[order], n) & np.r_[False, sorted_key[1:] == sorted_key[:-1]]
    gap = np.where(follows, np.round(lognormal(rng, n, median=gap_seconds[order], sigma=1.0)) + 1, 0)
    anchor = ~follows  # a follow-up is timed from the last event before it that is not one
    elapsed = np.cumsum(gap)
    group = np.cumsum(anchor) - 1
    timed = seconds[order][anchor][group] + elapsed - elapsed[anchor][group]
    out = np.empty(n, dtype=np.int64)
    out[order] = np.minimum(timed, WINDOW_SECONDS - 1)
    return out
