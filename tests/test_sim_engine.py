"""The discrete-event engine: ordering, clock, limits, seeded sub-streams."""

from __future__ import annotations

import pytest

from simulations.engine import Engine, VirtualClock, derive_seed


def test_events_run_in_time_then_fifo_order():
    e = Engine()
    seen = []
    rec = lambda a, b: seen.append((e.now, a))  # noqa: E731
    e.schedule_at(50, rec, "late")
    e.schedule_at(10, rec, "first@10")
    e.schedule_at(10, rec, "second@10")
    e.schedule_after(0, rec, "now")
    assert e.run() == 4
    assert seen == [(0, "now"), (10, "first@10"), (10, "second@10"), (50, "late")]


def test_callbacks_get_both_arguments_and_may_schedule_more():
    e = Engine()
    out = []

    def tick(n, step):
        out.append((e.now, n))
        if n < 3:
            e.schedule_after(step, tick, n + 1, step)

    e.schedule_at(5, tick, 0, 7)
    e.run()
    assert out == [(5, 0), (12, 1), (19, 2), (26, 3)]


def test_run_until_moves_the_clock_and_keeps_later_events():
    e = Engine()
    seen = []
    e.schedule_at(100, lambda a, b: seen.append(e.now))
    assert e.run(until_ms=40) == 0
    assert e.now == 40 and e.pending == 1
    assert e.run(until_ms=100) == 1  # inclusive
    assert seen == [100]


def test_max_events_stop_and_cancel():
    e = Engine()
    seen = []
    for t in range(10):
        e.schedule_at(t, lambda a, b: seen.append(a), t)
    assert e.run(max_events=3) == 3 and seen == [0, 1, 2]
    h = e.schedule_at(5, lambda a, b: seen.append("cancelled"))
    e.cancel(h)
    e.schedule_at(6, lambda a, b: e.stop())
    e.run()
    assert "cancelled" not in seen
    assert e.now == 6 and e.pending > 0  # stopped right after the event that asked
    e.run()
    assert seen[-1] == 9


def test_scheduling_in_the_past_is_refused():
    e = Engine()
    e.schedule_at(10, lambda a, b: None)
    e.run()
    with pytest.raises(ValueError):
        e.schedule_at(5, lambda a, b: None)
    with pytest.raises(ValueError):
        e.schedule_after(-1, lambda a, b: None)


def test_named_streams_are_stable_and_independent():
    a1 = Engine(42).rng_for("demand")
    e = Engine(42)
    e.rng_for("fleet").random()  # drawing elsewhere first must not shift "demand"
    for _ in range(1000):
        e.rng_for("new-stream").random()
    a2 = e.rng_for("demand")
    assert [a1.random() for _ in range(5)] == [a2.random() for _ in range(5)]
    assert Engine(42).rng_for("x").random() != Engine(43).rng_for("x").random()
    assert e.rng_for("demand") is a2  # one object per name


def test_derive_seed_is_pinned():
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"archipelag-sim/1/demand").digest()[:16], "big")
    assert derive_seed(1, "demand") == expected


def test_virtual_clock_reads_engine_time_plus_epoch():
    e = Engine()
    clock = VirtualClock(e, epoch_ms=1_700_000_000_000)
    e.schedule_at(1234, lambda a, b: None)
    e.run()
    assert clock.now_ms() == 1_700_000_001_234
    assert clock.sim_ms() == 1234


def test_engine_throughput_smoke():
    """Not a benchmark (python -m bench sim is): just guards against an accidental
    quadratic or per-event allocation explosion."""
    import time

    e = Engine(1)
    count = [0]

    def f(a, b):
        count[0] += 1
        if count[0] < 200_000:
            e.schedule_after(3, f)

    for i in range(50):
        e.schedule_at(i, f)
    t0 = time.process_time()
    e.run()
    assert count[0] >= 200_000
    assert time.process_time() - t0 < 5.0
