"""The Compute Exchange's rules on the real scheduler and ledger (in-memory store, manual
clock): units and rounding, asks (validation, events only on change), the budget chain
(each link decides once), clearing = the selected Island's ask x surge <= budget, the
hold at the budget and the refund of what is unused, surge on at > 2x and off again with
the 30 s hold, refusal at submit for budget, the queue timeout's full refund, old events
without the market's fields, and the ledger audit after a run with surge."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import audit
from ledger.pricing import chat_price_micro, credits_to_micro
from ledger.service import balance_of, load_account
from scheduler import market as mkt
from scheduler.admission import AdmissionRefused
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.islands import Island
from scheduler.jobs import Job
from store.factory import iter_log as _iter_log
from tests.test_scheduler import CHAT, World

CATALOG = Catalog.load()
CHAT_CARGO = CATALOG.by_slug("llm-chat")
LIST = mkt.list_rate_micro(CHAT_CARGO)  # 3 credits per 1000 completion tokens
PROMPT = {"prompt": "hello there", "max_tokens": 100}


def iter_log(app, **kw):
    return (ev for _, ev in _iter_log(app, **kw))


def credits(text: str) -> int:
    return credits_to_micro(text)


def balance(world: World, acct: uuid.UUID) -> int:
    return world.committer.query(lambda uow: balance_of(world.ledger_config, load_account(uow, acct))).spendable_micro


def island(world: World, asks: dict[str, str] | None = None, caps: dict = CHAT) -> str:
    iid = world.island(caps)
    if asks is not None:
        assert world.sched.set_asking_prices(uuid.UUID(iid), asks, by="test")
    return iid


def run_one(world: World, job_id: str, completion_tokens: int, prompt_tokens: int = 5):
    """Dispatch, accept and complete the Job on whichever Island it was offered to."""
    world.sched.step()
    view = world.sched.get_job(uuid.UUID(job_id))
    assert view.status == "assigned", view.status
    world.sched.accept(view.island_id, uuid.UUID(job_id))
    return world.sched.complete(view.island_id, uuid.UUID(job_id),
                                {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}, "ok", 10)


# ---------------------------------------------------------------- units and rounding
def test_list_rate_is_the_billing_unit_rate_of_each_seed_cargo():
    assert mkt.list_rate_micro(CATALOG.by_slug("llm-chat")) == credits("3")
    assert mkt.list_rate_micro(CATALOG.by_slug("llm-chat-lite")) == credits("0.75")
    assert mkt.list_rate_micro(CATALOG.by_slug("sdxl")) == credits("0.4")
    assert mkt.billing_unit(CATALOG.by_slug("sdxl")) == "megapixel-step"


@given(st.integers(0, 10**9), st.integers(0, 10**8), st.integers(1, 10**8))
def test_price_at_rate_rounds_up_once_and_is_exact_at_the_list_rate(price, rate, list_rate):
    got = mkt.price_at_rate(price, rate, list_rate)
    assert got * list_rate >= price * rate > (got - 1) * list_rate or (price * rate == 0 and got == 0)
    assert mkt.price_at_rate(price, list_rate, list_rate) == price


@given(st.integers(0, 10**9), st.integers(1000, 10_000), st.integers(0, 10**10))
def test_clearing_is_ask_times_surge_rounded_up_never_above_the_budget(ask, surge, budget):
    got = mkt.clearing_micro(ask, surge, budget)
    assert got <= budget
    exact_up = -(-(ask * surge) // 1000)
    assert got == min(exact_up, budget)
    assert got * 1000 >= min(ask * surge, budget * 1000)


def test_rounding_examples():
    assert mkt.clearing_micro(1, 1250, 10) == 2  # 1.25 micro rounds up to 2
    assert mkt.clearing_micro(4, 1250, 10) == 5
    assert mkt.clearing_micro(9, 1250, 10) == 10  # 11.25 -> 12, capped at the budget
    assert mkt.price_at_rate(7, 1, 3) == 3  # 7/3 = 2.33 -> 3
    assert mkt.median_micro([1, 2]) == 2 and mkt.median_micro([1, 2, 9]) == 2


@pytest.mark.parametrize("value,ok", [("0.5", 500_000), ("1e-5", 10), ("3", 3_000_000), (2, 2_000_000),
                                      ("0.0000001", None), ("-1", None), ("abc", None), ("1e400", None),
                                      (0.5, None), ("NaN", None), ("", None), (True, None)])
def test_parse_price(value, ok):
    if ok is None:
        with pytest.raises(mkt.BadPrice):
            mkt.parse_price_micro(value)
    else:
        assert mkt.parse_price_micro(value) == ok


# ---------------------------------------------------------------- asks
def test_asks_are_validated_all_at_once_and_nothing_is_written():
    world = World(SchedulerConfig(max_ask_micro=credits("100")))
    iid = island(world)
    before = world.app.recorder.max_notification_id()
    with pytest.raises(mkt.BadAsk) as info:
        world.sched.set_asking_prices(uuid.UUID(iid), {"llm-chat": "-1", "sdxl": "abc", "nope": "1",
                                                        "llm-chat-lite": "0.0000001", "_default": "101"}, by="t")
    assert set(info.value.errors) == {"prices.llm-chat", "prices.sdxl", "prices.nope", "prices.llm-chat-lite",
                                      "prices._default"}
    assert isinstance(info.value, ValueError)
    assert world.app.recorder.max_notification_id() == before
    assert world.sched.set_asking_prices(uuid.UUID(iid), {"llm-chat": "2.5", "_default": "0.5"}, by="t") is True
    after = world.app.recorder.max_notification_id()
    assert world.sched.set_asking_prices(uuid.UUID(iid), {"_default": "0.50", "llm-chat": "2.500"}, by="t") is False
    assert world.app.recorder.max_notification_id() == after  # unchanged: no event
    rec = world.sched.core.registry.islands[iid]
    assert rec.ask_for("llm-chat") == credits("2.5") and rec.ask_for("llm-chat-lite") == credits("0.5")
    events = [e for e in iter_log(world.app) if isinstance(e, Island.AsksChanged)]
    assert len(events) == 1 and events[0].asks_micro == {"_default": 500_000, "llm-chat": 2_500_000}


def test_an_island_without_asks_asks_the_list_rate():
    world = World()
    iid = island(world)
    assert world.sched.core.registry.islands[iid].ask_for("llm-chat") == LIST


# ---------------------------------------------------------------- the budget chain
def test_each_link_of_the_budget_chain_decides_once():
    world = World()
    acct = world.account("a@x", kyc=True, credits_micro=credits("1000"))
    # (4) list: no Island online yet
    v = world.sched.submit(acct, "llm-chat", PROMPT)
    assert (v.budget_source, v.budget_micro) == ("list", LIST)
    island(world, {"llm-chat": "2"})
    island(world, {"llm-chat": "2.4"})
    island(world, {"llm-chat": "2.8"})
    # (3) market: median ask of online approved Islands (2.4)
    v = world.sched.submit(acct, "llm-chat", PROMPT)
    assert (v.budget_source, v.budget_micro) == ("market", credits("2.4"))
    # (2) preference beats the market
    world.sched.set_bid(acct, "llm-chat", "2.9", by="t")
    v = world.sched.submit(acct, "llm-chat", PROMPT)
    assert (v.budget_source, v.budget_micro) == ("preference", credits("2.9"))
    # (1) the Job's own bid beats the preference
    v = world.sched.submit(acct, "llm-chat", PROMPT, {"bid_price": "2.1"})
    assert (v.budget_source, v.budget_micro) == ("bid", credits("2.1"))
    # deleting the preference falls back to the market again
    world.sched.set_bid(acct, "llm-chat", None, by="t")
    v = world.sched.submit(acct, "llm-chat", PROMPT)
    assert v.budget_source == "market"
    subs = [e for e in iter_log(world.app) if isinstance(e, Job.Submitted)]
    assert [e.budget_source for e in subs] == ["list", "market", "preference", "bid", "market"]
    # the hold covers the worst case at the budget
    worst = chat_price_micro(CHAT_CARGO.pricing, 3 + 4, 100)  # "hello there" -> 3 tokens + 4 per message
    for e in subs:
        assert e.hold_micro == mkt.price_at_rate(worst, e.budget_micro, LIST)


def test_a_job_no_island_can_serve_within_its_budget_is_refused_with_the_rate():
    world = World()
    acct = world.account("a@x", kyc=True, credits_micro=credits("1000"))
    island(world, {"llm-chat": "2.5"})
    before = world.app.recorder.max_notification_id()
    with pytest.raises(AdmissionRefused) as info:
        world.sched.submit(acct, "llm-chat", PROMPT, {"bid_price": "2"})
    r = info.value
    assert r.reason == "no_island_within_budget"
    assert r.rate_micro == credits("2.5") and r.budget_micro == credits("2") and r.budget_source == "bid"
    assert "2.5" in r.message
    assert world.app.recorder.max_notification_id() == before
    assert world.sched.refusals.counts["no_island_within_budget"] == 1


# ---------------------------------------------------------------- clearing and settlement
def test_clearing_is_the_selected_asks_and_the_unused_hold_is_refunded():
    world = World()
    acct = world.account("a@x", kyc=True, credits_micro=credits("1000"))
    cheap = island(world, {"llm-chat": "2"})
    island(world, {"llm-chat": "3.5"})  # above the budget: never eligible
    start = balance(world, acct)
    v = world.sched.submit(acct, "llm-chat", PROMPT, {"bid_price": "3"})
    assert balance(world, acct) == start - v.hold_micro
    done = run_one(world, v.id, completion_tokens=40)
    assert done.island_id == cheap and done.clearing_micro == credits("2") <= done.budget_micro
    list_price = chat_price_micro(CHAT_CARGO.pricing, 5, 40)
    expected = mkt.price_at_rate(list_price, credits("2"), LIST)
    assert done.charged_micro == expected < v.hold_micro
    assert balance(world, acct) == start - expected  # the rest of the hold came back
    completed = [e for e in iter_log(world.app) if isinstance(e, Job.Completed)][-1]
    assert completed.list_price_micro == list_price and completed.clearing_micro == credits("2")
    assigned = [e for e in iter_log(world.app) if isinstance(e, Job.Assigned)][-1]
    assert (assigned.ask_micro, assigned.surge_permille, assigned.clearing_micro) == (credits("2"), 1000,
                                                                                      credits("2"))
    # earning + fee == the clearing amount charged (fee 10 %, floor)
    assert completed.earning_micro + completed.fee_micro == expected
    assert completed.fee_micro == expected * 1000 // 10_000


def test_queue_timeout_fails_with_a_reason_and_refunds_the_whole_hold():
    world = World(SchedulerConfig(queue_timeout_ms=5_000))
    acct = world.account("a@x", kyc=True, credits_micro=credits("100"))
    start = balance(world, acct)
    v = world.sched.submit(acct, "llm-chat", PROMPT)  # no Island: it waits
    assert balance(world, acct) == start - v.hold_micro > 0
    world.clock.advance(5_001)
    world.sched.step()
    world.sched.step()
    done = world.sched.get_job(uuid.UUID(v.id))
    assert done.status == "timeout" and "no Island took the job" in done.error
    assert balance(world, acct) == start


# ---------------------------------------------------------------- surge
def test_surge_switches_on_over_twice_capacity_and_off_after_the_hold():
    world = World(SchedulerConfig(queue_timeout_ms=3_600_000))
    acct = world.account("a@x", kyc=True, credits_micro=credits("10000"))
    iid = island(world, {"llm-chat": "2"})  # one slot
    core = world.sched.core
    jobs = [world.sched.submit(acct, "llm-chat", PROMPT, {"bid_price": "5"}) for _ in range(3)]
    world.sched.step()  # 3 queued > 2 x 1 free slot: surge on (and one Job assigned at the old rate)
    world.sched.step()
    assert core.market.surge_active and core.market.surge_permille == 1250
    switches = [e for e in iter_log(world.app) if isinstance(e, mkt.Surge.Switched)]
    assert len(switches) == 1 and switches[0].active and switches[0].queued == 3 and switches[0].free_slots == 1
    # the first Job was assigned before the switch; finish it, the next one clears at x1.25
    first = world.sched.get_job(uuid.UUID(jobs[0].id))
    world.sched.accept(iid, uuid.UUID(first.id))
    world.sched.complete(iid, uuid.UUID(first.id), {"prompt_tokens": 5, "completion_tokens": 10}, "ok", 5)
    world.sched.step()
    second = next(world.sched.get_job(uuid.UUID(j.id)) for j in jobs[1:]
                  if world.sched.get_job(uuid.UUID(j.id)).status == "assigned")
    assert second.surge_permille == 1250 and second.clearing_micro == credits("2.5")
    # demand falls away (cancel the waiting Job and finish the assigned one) but the
    # switch holds for 30 s from its last evaluation
    for j in jobs[1:]:
        if j.id != second.id:
            world.sched.cancel(uuid.UUID(j.id), account_id=None, by="test")
    world.sched.accept(iid, uuid.UUID(second.id))
    world.sched.complete(iid, uuid.UUID(second.id), {"prompt_tokens": 5, "completion_tokens": 10}, "ok", 5)
    world.clock.advance(29_000)
    world.sched.step()
    assert core.market.surge_active  # not re-evaluated yet
    world.clock.advance(1_500)
    world.sched.step()
    world.sched.step()
    assert not core.market.surge_active
    switches = [e for e in iter_log(world.app) if isinstance(e, mkt.Surge.Switched)]
    assert [s.active for s in switches] == [True, False]
    gap_ms = (switches[1].timestamp - switches[0].timestamp).total_seconds() * 1000
    assert gap_ms >= 30_000
    # the ledger still balances and every hold is closed
    f = audit.fold(_iter_log(world.app, topics=audit.LEDGER_TOPICS), check=True)
    assert not f.violations and f.summary()["sum_micro"] == 0


def test_the_market_rate_and_budget_include_the_surge():
    world = World(SchedulerConfig(queue_timeout_ms=3_600_000))
    acct = world.account("a@x", kyc=True, credits_micro=credits("10000"))
    island(world, {"llm-chat": "2"})
    for _ in range(3):
        world.sched.submit(acct, "llm-chat", PROMPT)
    world.sched.step()
    world.sched.step()
    assert world.sched.market_rate_micro("llm-chat") == credits("2.5")
    v = world.sched.submit(acct, "llm-chat", PROMPT)
    assert (v.budget_source, v.budget_micro) == ("market", credits("2.5"))


# ---------------------------------------------------------------- old events
def test_events_written_before_the_exchange_still_load_and_price_at_list():
    world = World()
    acct = world.account("a@x", kyc=True, credits_micro=credits("100"))
    iid = island(world)
    v = world.sched.submit(acct, "llm-chat", PROMPT)
    # rewrite the Job as a pre-exchange Job: no budget, no clearing on its events
    job = world.committer.query(lambda uow: uow.get(uuid.UUID(v.id)))
    job.budget_source, job.budget_micro, job.list_rate_micro = "", 0, 0
    world.sched.step()
    view = world.sched.get_job(uuid.UUID(v.id))
    world.sched.accept(iid, uuid.UUID(v.id))
    done = world.sched.complete(iid, uuid.UUID(v.id), {"prompt_tokens": 5, "completion_tokens": 40}, "ok", 5)
    assert view.status == "assigned"
    assert done.charged_micro == chat_price_micro(CHAT_CARGO.pricing, 5, 40)  # list price
    # an event state without the new fields decodes with the defaults
    ev = Job.Assigned.__new__(Job.Assigned)
    ev.__dict__.update({"island_id": iid, "owner_account_id": "", "ack_deadline_ms": 0, "score": {},
                        "candidates": 1})
    assert (ev.ask_micro, ev.surge_permille, ev.clearing_micro, ev.cargo) == (-1, 1000, -1, "")


def test_a_declined_offer_clears_again_at_the_next_islands_ask():
    world = World()
    acct = world.account("a@x", kyc=True, credits_micro=credits("1000"))
    a = island(world, {"llm-chat": "2"})
    b = island(world, {"llm-chat": "2.6"})
    v = world.sched.submit(acct, "llm-chat", PROMPT, {"bid_price": "3"})
    world.sched.step()
    first = world.sched.get_job(uuid.UUID(v.id))
    assert first.island_id == a and first.clearing_micro == credits("2")  # the price term prefers the cheaper
    world.sched.reject(a, uuid.UUID(v.id))
    back = world.sched.get_job(uuid.UUID(v.id))
    assert back.status == "queued" and back.clearing_micro == -1
    world.sched.step()
    second = world.sched.get_job(uuid.UUID(v.id))
    assert second.island_id == b and second.clearing_micro == credits("2.6") and second.ask_micro == credits("2.6")


def test_market_settings_from_the_environment():
    from config.settings import Settings, SettingsError

    s = Settings.from_env({"COORDINATOR_MAX_ASK_CREDITS": "12.5", "COORDINATOR_SURGE_RATIO": "3",
                           "COORDINATOR_SURGE_MULTIPLIER_PERMILLE": "1500", "COORDINATOR_SURGE_HOLD_S": "60"})
    cfg = s.scheduler
    assert (cfg.max_ask_micro, cfg.surge_ratio, cfg.surge_multiplier_permille, cfg.surge_hold_ms) == (
        12_500_000, 3, 1500, 60_000)
    for bad in ({"COORDINATOR_MAX_ASK_CREDITS": "0"}, {"COORDINATOR_MAX_ASK_CREDITS": "x"},
                {"COORDINATOR_SURGE_MULTIPLIER_PERMILLE": "999"}, {"COORDINATOR_SURGE_RATIO": "0"}):
        with pytest.raises(SettingsError):
            Settings.from_env(bad)
