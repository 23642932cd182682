"""Karma arithmetic on the 0..100 scale (decision 0051): integer milli-karma, exact carry of
fractional earnings, the floor (0) and the ceiling (100), latency and uptime rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routing.karma import (
    DEFAULT_RATES,
    KarmaRates,
    can_withdraw,
    for_completed,
    for_failure,
    for_lapsed_lease,
    for_missed_ack,
    for_slow,
    for_uptime,
    is_slow,
    rebased_milli,
    score_of,
)

HOUR_MS = 3_600_000
R = DEFAULT_RATES


def test_defaults() -> None:
    assert R.start_milli == 50_000
    assert R.floor_milli == 0 and R.ceiling_milli == 100_000


def test_an_hour_of_compute_earns_one_karma_above_sixty() -> None:
    assert for_completed(60_000, HOUR_MS) == (1_000, 0)
    assert for_completed(90_000, 2 * HOUR_MS) == (2_000, 0)


def test_earning_stops_at_the_ceiling() -> None:
    assert for_completed(99_500, HOUR_MS) == (500, 0)  # cannot pass 100; no carry at the top
    assert for_completed(100_000, 10 * HOUR_MS) == (0, 0)


def test_newcomers_earn_one_and_a_half() -> None:
    assert for_completed(50_000, HOUR_MS) == (1_500, 0)
    assert for_completed(30_000, HOUR_MS) == (1_500, 0)
    assert for_completed(58_500, HOUR_MS) == (1_500, 0)  # ends exactly at 60 karma


def test_boost_stops_at_the_threshold_within_a_job() -> None:
    # 59.5 karma: 0.5 karma at 1.5/h takes 20 min, then 40 min at 1/h = 666.67 milli
    delta, carry = for_completed(59_500, HOUR_MS)
    assert delta == 500 + 666
    assert carry == 2 * R.units_per_milli // 3  # the 2/3 milli carried, not lost


def test_fractions_are_carried_not_dropped() -> None:
    one_minute = 60_000  # 1/60 karma = 16.67 milli above the boost
    delta, carry = for_completed(70_000, one_minute)
    assert delta == 16 and carry > 0
    total = 0
    karma, carry = 70_000, 0
    for _ in range(60):
        delta, carry = for_completed(karma, one_minute, R, carry)
        karma += delta
        total += delta
    assert total == 1_000 and carry == 0  # 60 one-minute Jobs == one hour


def test_dropping_the_carry_loses_less_than_a_milli_per_job() -> None:
    karma = 70_000
    for _ in range(60):
        karma += for_completed(karma, 60_000).delta_milli  # carry ignored
    assert 1_000 - 60 < karma - 70_000 < 1_000


@given(
    start=st.integers(0, 100_000),
    chunks=st.lists(st.integers(0, 2 * HOUR_MS), min_size=1, max_size=30),
    carry_seed=st.integers(0, 10**9),
)
def test_many_small_jobs_add_up_exactly_to_one_big_job(start: int, chunks: list[int], carry_seed: int) -> None:
    carry0 = carry_seed % R.units_per_milli
    karma, carry = start, carry0
    for compute_ms in chunks:
        delta, carry = for_completed(karma, compute_ms, R, carry)
        assert delta >= 0 and 0 <= carry < R.units_per_milli
        karma += delta
    whole_delta, whole_carry = for_completed(start, sum(chunks), R, carry0)
    assert (karma, carry) == (start + whole_delta, whole_carry)


@given(karma=st.integers(0, 80_000), a=st.integers(0, 10 * HOUR_MS), b=st.integers(0, 10 * HOUR_MS))
def test_earning_is_monotone_and_bounded_by_the_rates(karma: int, a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert for_completed(karma, lo).delta_milli <= for_completed(karma, hi).delta_milli
    delta = for_completed(karma, hi).delta_milli
    assert hi * 1_000 // HOUR_MS <= delta <= hi * 1_500 // HOUR_MS


def test_penalties() -> None:
    assert for_failure(50_000) == -500
    assert for_missed_ack(50_000) == -250
    assert for_lapsed_lease(50_000) == -500
    assert for_failure(55_000) == -500
    assert for_slow(50_000) == -250


def test_karma_never_goes_below_the_floor() -> None:
    assert for_failure(200) == -200
    assert for_missed_ack(100) == -100
    assert for_lapsed_lease(0) == 0
    assert for_failure(-50_000) == 0  # already below (floor raised by config): no further loss, no gain


@given(karma=st.integers(0, 100_000), kind=st.sampled_from([for_failure, for_missed_ack, for_lapsed_lease, for_slow]))
def test_penalty_never_crosses_the_floor(karma: int, kind) -> None:  # type: ignore[no-untyped-def]
    delta = kind(karma)
    assert delta <= 0
    assert karma + delta >= R.floor_milli


def test_withdrawal_unlocks_at_sixty_karma() -> None:
    assert not can_withdraw(59_999)
    assert can_withdraw(60_000)
    assert not can_withdraw(50_000)  # a new Island (as before the re-base: 10 karma above the start)


def test_slow_is_judged_against_the_reported_speed_in_integers() -> None:
    # 100 tokens at a reported 50 tokens/s should take 2 s; slow means more than 2x that
    assert not is_slow(100, 4_000, 50)
    assert is_slow(100, 4_001, 50)
    assert not is_slow(100, 10_000, 0)  # no reported speed: not judged
    assert not is_slow(0, 10_000, 50)


def test_uptime_earns_one_karma_a_day_up_to_the_ceiling() -> None:
    day = 86_400_000
    assert for_uptime(50_000, day) == 1_000
    assert for_uptime(50_000, day // 2) == 500
    assert for_uptime(50_000, 86_399) == 0  # less than a whole milli-karma
    assert for_uptime(99_900, 3 * day) == 100
    assert for_uptime(50_000, -5) == 0


@given(old=st.integers(-100_000, 10**7))
def test_old_scale_karma_is_shown_moved_up_by_fifty_and_held_in_range(old: int) -> None:
    new = rebased_milli(old)
    assert 0 <= new <= 100_000
    assert new == old + 50_000 if -50_000 <= old <= 50_000 else new in (0, 100_000)
    assert 0 <= score_of(new) <= 100


def test_rates_are_configurable() -> None:
    rates = KarmaRates(
        earn_milli=2_000,
        earn_per_compute_ms=HOUR_MS,
        boost_below_milli=0,
        failure_milli=1_000,
        missed_ack_milli=1,
        lapsed_lease_milli=7,
        floor_milli=-10_000,
        start_milli=0,
        withdraw_min_milli=1,
    )
    assert for_completed(0, HOUR_MS, rates) == (2_000, 0)  # no boost at or above 0
    assert for_completed(-1_000, HOUR_MS, rates).delta_milli == 1_000 + 1_333  # 1000 at 1.5x (1/3 h), then 2/3 h at 2/h
    assert for_failure(0, rates) == -1_000
    assert for_missed_ack(0, rates) == -1
    assert for_lapsed_lease(0, rates) == -7
    assert for_failure(-9_500, rates) == -500
    assert can_withdraw(1, rates)


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        for_completed(0, -1)
    with pytest.raises(ValueError):
        for_completed(0, 1, R, R.units_per_milli)
    with pytest.raises(ValueError):
        for_completed(0, 1, R, -1)
