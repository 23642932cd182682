"""Karma arithmetic: integers in milli-karma (1 karma = 1000 milli), pure functions.

Each function returns the DELTA to record in a karma event (with its reason); the
scheduler applies it. Nothing here reads a clock or keeps state.

Karma is on the network's 0..100 scale (decision 0051): the rules before it (start 0,
floor -100, no ceiling) are moved up by ``LEGACY_OFFSET_MILLI`` = 50 karma, so every
threshold keeps its distance from the start and routing ranks Islands as before.

Rules (defaults of ``KarmaRates``):

- a new Island starts at 50;
- completed work earns 1 karma per 60 compute-minutes (1000 milli per 3,600,000 ms),
  at 1.5x while karma is below 60 karma (the newcomer boost); the boost applies per
  compute-millisecond, so a Job that crosses the threshold is boosted only up to it;
- latency against what the Island reported: a chat Job that ran more than
  ``slow_factor`` times longer than the Island's reported `tokens_per_s` allows costs
  0.25 karma (reason `slow`); an Island that reports no speed is not judged;
- uptime: a closed online interval earns 1 karma per 24 online hours (reason `uptime`),
  written when the Island goes offline;
- failure that is the Island's fault: -0.5 karma; missed ack: -0.25; lapsed lease: -0.5;
- karma stays within [0, 100]: penalties are cut short at the floor (0), earning at the
  ceiling (100, where the carry is dropped);
- 60 karma or more unlocks withdrawal of earnings.

Exactness. Earning is a rational rate (e.g. 1000/3,600,000 milli per ms), so a Job rarely
earns a whole number of milli. The remainder is carried, not dropped: ``for_completed``
takes and returns ``carry`` in *units* (``rates.units_per_milli`` units = 1 milli, i.e.
a common denominator of both rates). The (karma_milli, carry) pair is an exact integer
state, so N small Jobs earn exactly what one Job of the summed compute time earns: not
within +-1 milli but bit-identical, as long as the caller persists ``carry`` per Island
(it fits in the karma event). Dropping the carry costs < 1 milli per Job.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import NamedTuple

import msgspec

REASON_COMPLETED = "completed"
REASON_FAILURE = "failure"
REASON_MISSED_ACK = "missed_ack"
REASON_LAPSED_LEASE = "lapsed_lease"
REASON_OPERATOR = "operator_adjustment"  # decision 0041: the way back below a Cargo's gate
REASON_SLOW = "slow"  # ran much slower than the Island's reported speed
REASON_UPTIME = "uptime"  # a closed online interval
REASON_REBASE = "rebase_0_100"  # decision 0051: a recorded old-scale Island moved onto 0..100
MAX_ADJUST_MILLI = 100_000  # an operator's adjustment moves karma by at most the whole scale
SCALE_MIN_MILLI = 0
SCALE_MAX_MILLI = 100_000
START_MILLI = 50_000
LEGACY_OFFSET_MILLI = 50_000  # old scale (start 0) + this = the 0..100 scale
_KARMA_TEXT = re.compile(r"-?[0-9]{1,7}(\.[0-9]{1,3})?")


class KarmaRates(msgspec.Struct, frozen=True, kw_only=True):
    """Karma rules; every amount is in milli-karma, every duration in milliseconds."""

    start_milli: int = START_MILLI
    earn_milli: int = 1_000  # earned per `earn_per_compute_ms` of compute ...
    earn_per_compute_ms: int = 3_600_000  # ... i.e. 1 karma per 60 compute-minutes
    boost_below_milli: int = 60_000  # newcomer boost while karma < this
    boost_num: int = 3  # boost factor = boost_num / boost_den = 1.5x
    boost_den: int = 2
    failure_milli: int = 500
    missed_ack_milli: int = 250
    lapsed_lease_milli: int = 500
    slow_milli: int = 250
    slow_factor: int = 2  # slower than this many times the reported speed allows: `slow`
    uptime_milli: int = 1_000  # earned per `uptime_per_ms` online ...
    uptime_per_ms: int = 86_400_000  # ... i.e. 1 karma per 24 online hours
    floor_milli: int = SCALE_MIN_MILLI
    ceiling_milli: int = SCALE_MAX_MILLI
    withdraw_min_milli: int = 60_000

    def __post_init__(self) -> None:
        assert self.earn_milli >= 0 and self.earn_per_compute_ms > 0
        assert self.boost_num >= 0 and self.boost_den > 0
        assert min(self.failure_milli, self.missed_ack_milli, self.lapsed_lease_milli, self.slow_milli) >= 0
        assert self.uptime_milli >= 0 and self.uptime_per_ms > 0 and self.slow_factor >= 1
        assert self.floor_milli <= self.start_milli <= self.ceiling_milli

    @property
    def units_per_milli(self) -> int:
        """Carry denominator: 1 milli-karma = this many units."""
        return self.earn_per_compute_ms * self.boost_den

    @property
    def normal_units_per_ms(self) -> int:
        return self.earn_milli * self.boost_den

    @property
    def boosted_units_per_ms(self) -> int:
        return self.earn_milli * self.boost_num


DEFAULT_RATES = KarmaRates()


class Accrual(NamedTuple):
    """Result of ``for_completed``: karma delta and the new carry to persist."""

    delta_milli: int
    carry: int  # 0 <= carry < rates.units_per_milli


def for_completed(karma_milli: int, compute_ms: int, rates: KarmaRates = DEFAULT_RATES, carry: int = 0) -> Accrual:
    """Karma earned by ``compute_ms`` of completed work, given current karma and carry.

    Each compute-millisecond earns at the boosted rate if the exact karma (milli plus
    carried fraction) before it is below ``boost_below_milli``, else at the normal rate.
    """
    if compute_ms < 0:
        raise ValueError("compute_ms must be >= 0")
    per_milli = rates.units_per_milli
    if not 0 <= carry < per_milli:
        raise ValueError(f"carry must be in 0..{per_milli - 1}")
    state = karma_milli * per_milli + carry
    remaining_ms = compute_ms
    threshold = rates.boost_below_milli * per_milli
    boosted = rates.boosted_units_per_ms
    if state < threshold and remaining_ms:
        if boosted > 0:
            to_threshold_ms = -(-(threshold - state) // boosted)  # ceil
            boosted_ms = min(remaining_ms, to_threshold_ms)
        else:
            boosted_ms = remaining_ms
        state += boosted_ms * boosted
        remaining_ms -= boosted_ms
    state += remaining_ms * rates.normal_units_per_ms
    new_milli, new_carry = divmod(state, per_milli)
    assert new_milli >= karma_milli and 0 <= new_carry < per_milli
    if new_milli >= rates.ceiling_milli:  # cannot pass the ceiling; nothing to carry there
        return Accrual(max(0, rates.ceiling_milli - karma_milli), 0 if karma_milli < rates.ceiling_milli else carry)
    return Accrual(new_milli - karma_milli, new_carry)


def _penalty(karma_milli: int, amount_milli: int, rates: KarmaRates) -> int:
    """``-amount``, cut short so karma stays >= floor; never positive."""
    return min(0, max(-amount_milli, rates.floor_milli - karma_milli))


def for_failure(karma_milli: int, rates: KarmaRates = DEFAULT_RATES) -> int:
    """Delta for a Job that failed through the Island's fault."""
    return _penalty(karma_milli, rates.failure_milli, rates)


def for_missed_ack(karma_milli: int, rates: KarmaRates = DEFAULT_RATES) -> int:
    """Delta for an offer the Island did not acknowledge in time."""
    return _penalty(karma_milli, rates.missed_ack_milli, rates)


def for_lapsed_lease(karma_milli: int, rates: KarmaRates = DEFAULT_RATES) -> int:
    """Delta for a running Job whose Island stopped reporting (lease lapsed)."""
    return _penalty(karma_milli, rates.lapsed_lease_milli, rates)


def for_slow(karma_milli: int, rates: KarmaRates = DEFAULT_RATES) -> int:
    """Delta for a Job that ran much slower than the Island's reported speed."""
    return _penalty(karma_milli, rates.slow_milli, rates)


def is_slow(tokens: int, ran_ms: int, reported_tokens_per_s: int, rates: KarmaRates = DEFAULT_RATES) -> bool:
    """Whether `tokens` in `ran_ms` is more than `slow_factor` times slower than the
    reported speed allows (integers only: tokens * 1000 * factor < ran_ms * speed ...
    rearranged so nothing is divided). No reported speed, no tokens: never slow."""
    if reported_tokens_per_s <= 0 or tokens <= 0 or ran_ms <= 0:
        return False
    allowed_ms_x_speed = tokens * 1000 * rates.slow_factor  # = allowed_ms * reported speed
    return ran_ms * reported_tokens_per_s > allowed_ms_x_speed


def for_uptime(karma_milli: int, online_ms: int, rates: KarmaRates = DEFAULT_RATES) -> int:
    """Delta for a closed online interval of `online_ms` (whole milli only, up to the ceiling)."""
    if online_ms <= 0:
        return 0
    earned = online_ms * rates.uptime_milli // rates.uptime_per_ms
    return max(0, min(earned, rates.ceiling_milli - karma_milli))


def rebased_milli(old_scale_milli: int) -> int:
    """Decision 0051: karma recorded on the old scale (start 0, floor -100, no ceiling)
    shown on the 0..100 scale: moved up by 50 karma, then held within [0, 100]."""
    return max(SCALE_MIN_MILLI, min(SCALE_MAX_MILLI, old_scale_milli + LEGACY_OFFSET_MILLI))


def score_of(karma_milli: int) -> Decimal:
    """The published `karma_score` (a JSON number, 0..100) from milli-karma."""
    return Decimal(max(SCALE_MIN_MILLI, min(SCALE_MAX_MILLI, karma_milli))) / 1000


def can_withdraw(karma_milli: int, rates: KarmaRates = DEFAULT_RATES) -> bool:
    """Whether the Island's owner may withdraw earnings."""
    return karma_milli >= rates.withdraw_min_milli


def for_adjustment(karma_milli: int, delta_milli: int, rates: KarmaRates = DEFAULT_RATES) -> int:
    """The delta an operator's adjustment of ``delta_milli`` applies: held within the
    floor and the ceiling like every change. 0 means nothing would change."""
    assert abs(delta_milli) <= MAX_ADJUST_MILLI, delta_milli
    if delta_milli < 0:
        return min(0, max(delta_milli, rates.floor_milli - karma_milli))
    return max(0, min(delta_milli, rates.ceiling_milli - karma_milli))


def parse_karma_milli(value: object) -> int:
    """Karma as text ("12", "-0.5", at most 3 decimals) or an integer -> milli-karma.
    Floats and anything else are refused with a reason (karma is exact, like money)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("karma must be a decimal string with at most 3 places, or an integer")
    if isinstance(value, int):
        return value * 1000
    text = value.strip()
    if not _KARMA_TEXT.fullmatch(text):
        raise ValueError(f"karma must be a decimal with at most 3 places, e.g. \"12\" or \"-0.5\"; got {value!r}")
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    milli = int(whole) * 1000 + int(frac.ljust(3, "0") or "0")
    return -milli if negative else milli
