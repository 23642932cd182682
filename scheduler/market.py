"""The Compute Exchange's rules (docs/EXCHANGE.md, decision 0044): units, asks, the budget
chain, clearing and surge, plus the two small aggregates the market writes (an account's
saved bids, the surge switch).

Units. Every ask, budget and clearing amount is a *rate* in integer micro-credits per the
Cargo's **billing unit**: 1,000 completion tokens for a chat Cargo, one megapixel-step
(1024x1024 pixels x 1 step) for an image Cargo. The Cargo's list rate (its
`per_1k_completion_tokens` / `per_megapixel_step`) is the default ask; a Cargo whose list
rate is 0 is billed per typical Job (`price_per_job`). A Job's price at a rate R is its
list price (the Cargo's whole rule: base, prompt and completion tokens, steps, min/max
band) scaled by R / list rate and rounded **up** once to the micro-credit:

    price_at(R) = ceil(list_price * R / list_rate)

so at the list rate every price is exactly today's, and token and step counts stay exact
integers. Clearing = min(ceil(ask * surge_permille / 1000), budget).

Pure functions plus aggregates; imports only ledger pricing and the store's aggregate base."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import UUID

from ledger.pricing import MICRO_PER_CREDIT, ChatPricing, ImagePricing, micro_to_credits
from scheduler.cargo import Cargo
from store.chain import ChainedAggregate
from store.clock import datetime_to_ms

DEFAULT_KEY = "_default"
MAX_ASK_ENTRIES = 64  # slugs per asks map (plus `_default`)
MAX_PRICE_TEXT = 40
PERMILLE = 1000
SUGGESTED_BID_PERMILLE = 1050  # suggested bid = current rate x 1.05

BID, PREFERENCE, MARKET, LIST = "bid", "preference", "market", "list"
BUDGET_SOURCES = (BID, PREFERENCE, MARKET, LIST)

#: Suggested ask multipliers by hardware tier (0 CPU only .. 4 enterprise), permille.
TIER_MULTIPLIER_PERMILLE = {0: 500, 1: 1000, 2: 1200, 3: 1500, 4: 2000}
TIER_NAMES = {0: "cpu-only", 1: "entry", 2: "mid-range", 3: "high-end", 4: "enterprise"}

MARKET_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0e0c")
SURGE_ID = uuid.uuid5(MARKET_NAMESPACE, "surge")


class BadAsk(ValueError):
    """Asking prices that were refused; `errors` maps each bad field to its reasons."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(errors.items()))[:1000])
        self.errors = errors


class BadPrice(ValueError):
    pass


_PLAIN = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def parse_price_micro(value: Any, *, max_micro: int | None = None) -> int:
    """A price in credits -> micro-credits, exactly. Accepts a decimal string (exponent
    forms such as "1e-5" too, as the JS SDK's `String(n)` may send) or an int; refuses
    floats, negatives, NaN/inf, more than 6 decimal places and anything over `max_micro`."""
    if isinstance(value, bool) or isinstance(value, float):
        raise BadPrice("must be a decimal string such as \"0.5\", not a JSON float")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > MAX_PRICE_TEXT or not _PLAIN.fullmatch(text.lstrip("+")):
            if text.startswith("-"):
                raise BadPrice("must not be negative")
            raise BadPrice(f"must be a non-negative decimal number such as \"0.5\", got {value[:MAX_PRICE_TEXT]!r}")
        try:
            amount = Decimal(text)
        except InvalidOperation:
            raise BadPrice(f"not a decimal number: {value[:MAX_PRICE_TEXT]!r}") from None
    else:
        raise BadPrice("must be a decimal string")
    if not amount.is_finite():
        raise BadPrice("must be finite")
    if amount < 0:
        raise BadPrice("must not be negative")
    if amount and amount.adjusted() > 12:  # before int(): "1e999999" must not build a huge integer
        raise BadPrice("is too large")
    scaled = amount * MICRO_PER_CREDIT
    if scaled != scaled.to_integral_value():
        raise BadPrice("at most 6 decimal places (1 micro-credit = 0.000001 credit)")
    micro = int(scaled)
    if max_micro is not None and micro > max_micro:
        raise BadPrice(f"must be at most {micro_to_credits(max_micro)} credits")
    return micro


# ------------------------------------------------------------------ units
def list_rate_micro(cargo: Cargo) -> int:
    """The Cargo's list price per billing unit: its default ask."""
    pricing = cargo.pricing
    if isinstance(pricing, ChatPricing):
        rate = pricing.per_1k_completion_tokens_micro
    else:
        assert isinstance(pricing, ImagePricing)
        rate = pricing.per_megapixel_step_micro
    return rate if rate > 0 else cargo.typical_price_micro


def billing_unit(cargo: Cargo) -> str:
    pricing = cargo.pricing
    if isinstance(pricing, ChatPricing) and pricing.per_1k_completion_tokens_micro > 0:
        return "1000 completion tokens"
    if isinstance(pricing, ImagePricing) and pricing.per_megapixel_step_micro > 0:
        return "megapixel-step"
    return "job"


def price_at_rate(list_price_micro: int, rate_micro: int, list_rate: int) -> int:
    """A list price scaled to a rate: ceil(list_price * rate / list_rate). Exact integers;
    the rate equal to the list rate gives the list price. A list rate of 0 (a free Cargo)
    leaves the price as it is."""
    if list_rate <= 0 or rate_micro == list_rate:
        return list_price_micro
    return -(-(list_price_micro * rate_micro) // list_rate)


def surged_micro(ask_micro: int, surge_permille: int) -> int:
    """ask x surge, rounded up to the micro-credit."""
    return -(-(ask_micro * surge_permille) // PERMILLE)


def clearing_micro(ask_micro: int, surge_permille: int, budget_micro: int) -> int:
    """The clearing rate: the selected Island's ask times the surge multiplier (rounded
    up), never above the Job's budget."""
    return min(surged_micro(ask_micro, surge_permille), budget_micro)


def resolve_ask(asks: Mapping[str, int], slug: str, list_rate: int) -> int:
    """An Island's ask for a Cargo: its own, else its `_default`, else the list rate."""
    own = asks.get(slug)
    if own is not None:
        return own
    default = asks.get(DEFAULT_KEY)
    return default if default is not None else list_rate


def median_micro(values: list[int]) -> int:
    """The median of sorted integers; for an even count the lower-middle and upper-middle
    mean, rounded up."""
    n = len(values)
    mid = n // 2
    if n % 2:
        return values[mid]
    return -(-(values[mid - 1] + values[mid]) // 2)


def suggested_bid_micro(rate_micro: int) -> int:
    return -(-(rate_micro * SUGGESTED_BID_PERMILLE) // PERMILLE)


def suggested_ask_micro(rate_micro: int, hardware_tier: int) -> int:
    return -(-(rate_micro * TIER_MULTIPLIER_PERMILLE.get(hardware_tier, 1000)) // PERMILLE)


def validate_asks(catalog: Any, prices: Any, max_ask_micro: int) -> dict[str, int]:
    """Asking prices from an owner or a heartbeat -> {slug | "_default": micro}. Every bad
    entry is reported (`BadAsk.errors`, keyed `prices.<slug>`); nothing partial is kept."""
    if not isinstance(prices, Mapping):
        raise BadAsk({"prices": ["must be an object of workload slug -> decimal string"]})
    if len(prices) > MAX_ASK_ENTRIES + 1:
        raise BadAsk({"prices": [f"at most {MAX_ASK_ENTRIES} workloads plus {DEFAULT_KEY}"]})
    errors: dict[str, list[str]] = {}
    out: dict[str, int] = {}
    for slug, value in prices.items():
        key = f"prices.{str(slug)[:64]}"
        if not isinstance(slug, str) or (slug != DEFAULT_KEY and catalog.get(slug) is None):
            errors.setdefault(key, []).append("unknown workload")
            continue
        try:
            out[slug] = parse_price_micro(value, max_micro=max_ask_micro)
        except BadPrice as exc:
            errors.setdefault(key, []).append(str(exc))
    if errors:
        raise BadAsk(errors)
    return dict(sorted(out.items()))


def asks_as_text(asks: Mapping[str, int]) -> dict[str, str]:
    return {k: str(micro_to_credits(v)) for k, v in sorted(asks.items())}


# ------------------------------------------------------------------ aggregates
def bids_id(account_id: str) -> UUID:
    return uuid.uuid5(MARKET_NAMESPACE, f"bids:{account_id}")


class BidPreferences(ChainedAggregate):
    """An account's saved per-Cargo bids (budget link 2). One per account, id
    `bids_id(account_id)`."""

    class Created(ChainedAggregate.Created):
        account_id: str

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.bids_micro: dict[str, int] = {}

    class BidSet(ChainedAggregate.Event):
        slug: str
        max_price_micro: int
        by: str

        def apply(self, prefs: BidPreferences) -> None:
            prefs.bids_micro = {**prefs.bids_micro, self.slug: self.max_price_micro}

    class BidCleared(ChainedAggregate.Event):
        slug: str
        by: str

        def apply(self, prefs: BidPreferences) -> None:
            prefs.bids_micro = {k: v for k, v in prefs.bids_micro.items() if k != self.slug}


class Surge(ChainedAggregate):
    """The market's one surge switch (global, decision 0045): on when queued Jobs exceed
    `surge_ratio` x the free slots of approved online Islands, re-evaluated at most every
    `surge_hold_ms`. Id `SURGE_ID`."""

    class Created(ChainedAggregate.Created):
        pass

    def __init__(self) -> None:
        self.active = False
        self.multiplier_permille = PERMILLE

    class Switched(ChainedAggregate.Event):
        active: bool
        multiplier_permille: int
        queued: int
        free_slots: int

        def apply(self, surge: Surge) -> None:
            surge.active = self.active
            surge.multiplier_permille = self.multiplier_permille


def surge_wanted(queued: int, free_slots: int, ratio: int) -> bool:
    """The surge rule: more queued Jobs than `ratio` x free slots (queued > ratio x free)."""
    return queued > ratio * free_slots


class MarketState:
    """The live market (kept by the dispatch core from the log): saved bids per account and
    the surge switch."""

    def __init__(self) -> None:
        self.bids: dict[str, dict[str, int]] = {}  # account id -> slug -> micro
        self._owners: dict[UUID, str] = {}  # BidPreferences id -> account id
        self.surge_active = False
        self.surge_permille = PERMILLE
        self.surge_changed_ms = 0
        self.last_eval_ms: int | None = None

    def preference(self, account_id: str, slug: str) -> int | None:
        bids = self.bids.get(account_id)
        return bids.get(slug) if bids else None

    def apply(self, ev: Any) -> None:
        if isinstance(ev, BidPreferences.Created):
            self._owners[ev.originator_id] = ev.account_id
            self.bids.setdefault(ev.account_id, {})
        elif isinstance(ev, BidPreferences.BidSet):
            self.bids.setdefault(self._owners.get(ev.originator_id, ""), {})[ev.slug] = ev.max_price_micro
        elif isinstance(ev, BidPreferences.BidCleared):
            self.bids.get(self._owners.get(ev.originator_id, ""), {}).pop(ev.slug, None)
        elif isinstance(ev, Surge.Switched):
            self.surge_active = ev.active
            self.surge_permille = ev.multiplier_permille if ev.active else PERMILLE
            self.surge_changed_ms = datetime_to_ms(ev.timestamp)


class Budget:
    """A Job's resolved budget: the rate, which link of the chain decided, the Cargo's
    list rate and the hold that covers the worst case at the budget."""

    __slots__ = ("budget_micro", "source", "list_rate_micro", "hold_micro")

    def __init__(self, budget_micro: int, source: str, list_rate_micro: int, hold_micro: int) -> None:
        assert source in BUDGET_SOURCES, source
        self.budget_micro = budget_micro
        self.source = source
        self.list_rate_micro = list_rate_micro
        self.hold_micro = hold_micro
