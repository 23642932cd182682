"""Dispatcher shortcuts that must not change what happens: `next_timer_ms` skips timers
that can no longer act (their Job moved on or ended), and Island commands called with
`view=False` do the same work without building a JobView."""

from __future__ import annotations

import uuid

from tests.test_scheduler import World


def submit_chat(world: World) -> uuid.UUID:
    acct = world.account(f"{uuid.uuid4()}@x", kyc=True, credits_micro=1_000_000)
    return uuid.UUID(world.sched.submit(acct, "llm-chat", {"prompt": "hi", "max_tokens": 10}).id)


def live_timer_due_ms(world: World) -> int | None:
    """The earliest timer `_due_timer_commands` would not skip as stale (reference)."""
    core = world.sched.core
    due = [t[0] for t in core._timers if (live := core.jobs.get(t[3])) is not None and live.epoch == t[4]]
    return min(due) if due else None


def test_next_timer_skips_timers_of_jobs_that_moved_on_or_ended():
    world = World()
    cfg = world.sched.config
    island = world.island()
    core = world.sched.core
    assert core.next_timer_ms() is None
    job_id = submit_chat(world)
    t0 = world.clock.now_ms()
    core.catch_up(t0)  # the live view has the queued Job (not dispatched yet)
    assert core.next_timer_ms() == live_timer_due_ms(world) == t0 + cfg.queue_timeout_ms
    world.sched.step()
    # Assigned: the queue timeout is dead, the ack timer is the next one.
    assert core.next_timer_ms() == live_timer_due_ms(world) == t0 + cfg.ack_timeout_ms
    world.sched.accept(island, job_id)
    world.sched.step()
    assert core.next_timer_ms() == live_timer_due_ms(world) == t0 + cfg.lease_ms
    world.sched.complete(island, job_id, {"prompt_tokens": 5, "completion_tokens": 5}, "ok", 10)
    world.sched.step()
    assert core.jobs == {}
    assert core.next_timer_ms() is None and core._timers == []  # every dead timer dropped


def test_island_commands_without_a_view_do_the_same_work():
    def run(view: bool) -> tuple[list, list]:
        world = World()
        island = world.island()
        job_id = submit_chat(world)
        world.sched.step()
        results = [world.sched.accept(island, job_id, view=view)]
        world.sched.step()
        results.append(world.sched.complete(island, job_id, {"prompt_tokens": 5, "completion_tokens": 5}, "ok", 10,
                                            view=view))
        rejected = submit_chat(world)
        world.sched.step()
        results.append(world.sched.reject(island, rejected, view=view))
        world.sched.step()
        topics = [n.topic for n in world.app.recorder.select_notifications(start=1, limit=1_000)]
        return results, topics

    with_views, topics = run(True)
    without, same_topics = run(False)
    assert without == [None, None, None]
    assert [v.status for v in with_views] == ["running", "completed", "queued"]
    assert topics == same_topics
