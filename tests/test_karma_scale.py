"""Decision 0051: karma on the 0..100 scale, and logs recorded on the old scale (start 0,
floor -100, no ceiling) stay readable. An old-scale Island is written here the way the
code before the re-base wrote it (a `Registered` without `karma_start_milli`, then
`KarmaChanged` with old-scale balances, hash-chained), on SQLite and PostgreSQL; every
reader (aggregate, dispatcher's live view, Islands projection, CLI listing) shows it moved
up by 50 and held within [0, 100]; its first change under the new rules writes one
`KarmaRebased`; the chains still verify."""

from __future__ import annotations

import uuid

import pytest
from eventsourcing.utils import get_topic

from projections.service import Projections
from projections.sql import Database
from routing.karma import DEFAULT_RATES
from scheduler.islands import Island
from store.chain import GENESIS, chain_hash, verify_chains
from store.clock import ms_to_datetime
from store.factory import iter_log
from tests.test_projections_jobs import CAPS, World


def legacy_island(world: World, old_karma_after: list[int]) -> uuid.UUID:
    """An Island as recorded before decision 0051, with old-scale karma balances."""
    island_id = uuid.uuid4()
    fields = {"owner_account_id": str(world.owner), "name": "old-rack", "token_hash": "x" * 64,
              "capabilities": dict(CAPS), "approval": "approved"}
    topic = get_topic(Island.Registered)
    ts = ms_to_datetime(world.clock.now_ms())
    kwargs = dict(originator_id=island_id, originator_version=1, timestamp=ts,
                  originator_topic=get_topic(Island), **fields)
    kwargs["chain"] = chain_hash(GENESIS, topic, island_id, 1, {k: v for k, v in kwargs.items()
                                                                 if k not in ("originator_id", "originator_version")})
    # the event class now names karma_start_milli; an old event lacks it, exactly as the
    # store decodes one (object.__new__ and the recorded attributes, no __init__)
    created = object.__new__(Island.Registered)
    created.__dict__.update(kwargs)
    island = created.mutate(None)
    assert island.karma_legacy and island.karma_milli == 0
    before = 0
    for after in old_karma_after:
        island.trigger_event(Island.KarmaChanged, delta_milli=after - before, reason="failure" if after < before
                             else "completed", job_id="", karma_after_milli=after, carry=0, compute_ms=0,
                             timestamp=ts)
        before = after
    pending = island.collect_events()
    world.app.save(created, *pending)
    return island_id


@pytest.mark.parametrize(("old", "shown"), [([-12_000], 38_000), ([3_000, 80_000], 100_000),
                                            ([-70_000], 0), ([], 50_000)])
def test_old_scale_island_is_shown_rebased_and_first_change_rebases_it(store_config, tmp_path, old, shown):
    world = World(store_config)
    try:
        iid = legacy_island(world, old)
        agg = world.committer.query(lambda uow: uow.get(iid, fresh=True))
        assert agg.karma_legacy and agg.karma_milli == (old[-1] if old else 0) and agg.karma_shown_milli == shown

        world.sched.recover()
        world.sched.step()
        assert world.sched.core.registry.islands[str(iid)].karma_milli == shown  # routing sees the 0..100 value

        proj = Projections(world.app, Database(store_config))
        proj.catch_up()
        row = next(r for r in proj.read.island_stats(now_ms=world.clock.now_ms()) if r["island_id"] == str(iid))
        assert row["karma_milli"] == shown
        hist = proj.read.karma_history(str(iid))
        assert [h["karma_after_milli"] for h in hist] == [max(0, min(100_000, k + 50_000)) for k in reversed(old)]

        # the first change under the new rules: one KarmaRebased, then the change itself, on the new scale
        delta = -1_000 if shown > 0 else 1_000
        change = world.sched.adjust_island_karma(iid, delta, by="ops", reason="first change after the re-base")
        assert (change.before_milli, change.after_milli) == (shown, shown + delta)
        events = list(world.app.events.get(iid))
        rebased = [e for e in events if isinstance(e, Island.KarmaRebased)]
        assert len(rebased) == 1 and rebased[0].karma_after_milli == shown and rebased[0].reason == "rebase_0_100"
        agg = world.committer.query(lambda uow: uow.get(iid, fresh=True))
        assert not agg.karma_legacy and agg.karma_milli == agg.karma_shown_milli == shown + delta
        world.sched.adjust_island_karma(iid, delta, by="ops", reason="second")
        assert sum(isinstance(e, Island.KarmaRebased) for e in world.app.events.get(iid)) == 1

        world.sched.step()
        assert world.sched.core.registry.islands[str(iid)].karma_milli == shown + 2 * delta
        proj.catch_up()
        row = next(r for r in proj.read.island_stats(now_ms=world.clock.now_ms()) if r["island_id"] == str(iid))
        assert row["karma_milli"] == shown + 2 * delta and row["karma_legacy"] == 0
        hist = proj.read.karma_history(str(iid))
        assert [h["reason"] for h in hist[:3]] == ["operator_adjustment", "operator_adjustment", "rebase_0_100"]
        proj.close()

        report = verify_chains(iter_log(world.app))
        assert report.ok, report
    finally:
        world.close()


def test_new_islands_start_at_fifty_and_earn_up_to_one_hundred(store_config):
    world = World(store_config)
    try:
        iid = uuid.UUID(world.islands[0])
        agg = world.committer.query(lambda uow: uow.get(iid))
        assert not agg.karma_legacy and agg.karma_milli == DEFAULT_RATES.start_milli == 50_000
        world.sched.adjust_island_karma(iid, 49_900, by="ops", reason="near the top")
        change = world.sched.adjust_island_karma(iid, 5_000, by="ops", reason="cannot pass 100")
        assert change.after_milli == 100_000
    finally:
        world.close()


def _karma_events(sched_world, island: str) -> list:
    return [e for e in sched_world.app.events.get(uuid.UUID(island)) if isinstance(e, Island.KarmaChanged)]


def test_a_chat_job_much_slower_than_the_reported_speed_costs_karma():
    from tests.test_scheduler import CHAT, World as SchedWorld

    world = SchedWorld()
    island = world.island({**CHAT, "tokens_per_s": 10})  # 5 tokens should take 0.5 s
    acct = world.account("c@x", kyc=True, credits_micro=100_000_000)
    reasons = []
    for ran_ms, prompt in ((1_000, "fast enough"), (1_001, "too slow")):  # the limit is 2 x 0.5 s
        job = world.sched.submit(acct, "llm-chat-lite", {"prompt": prompt})
        world.sched.step()
        world.sched.accept(island, uuid.UUID(job.id))
        world.clock.advance(ran_ms)
        world.sched.complete(island, uuid.UUID(job.id), {"prompt_tokens": 5, "completion_tokens": 5}, "ok", 10)
        world.sched.step()
        reasons.append([e.reason for e in _karma_events(world, island)][-1])
    assert reasons == ["completed", "slow"]
    slow = _karma_events(world, island)[-1]
    assert slow.delta_milli == -DEFAULT_RATES.slow_milli and slow.job_id == job.id


def test_closing_an_online_interval_earns_uptime_karma():
    from tests.test_scheduler import World as SchedWorld

    world = SchedWorld()
    island = world.island()  # online now (heartbeat)
    world.sched.step()
    before = world.committer.query(lambda uow: uow.get(uuid.UUID(island)).karma_milli)
    world.clock.advance(2 * 86_400_000)  # two days online, then silence: marked offline
    world.sched.heartbeat(island)
    world.clock.advance(world.sched.config.offline_after_ms + 1)
    for _ in range(3):
        world.sched.step()
    events = _karma_events(world, island)
    assert [e.reason for e in events] == ["uptime"] and events[0].delta_milli == 2_000
    after = world.committer.query(lambda uow: uow.get(uuid.UUID(island)))
    assert not after.online and after.karma_milli == before + 2_000
