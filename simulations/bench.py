"""``python -m bench sim``: simulated Jobs per second of wall time, real rules vs none.

Runs the baseline scenario (simulations/scenarios/baseline.toml) for the first ``--jobs``
Jobs twice on the same demand (same scenario, seed and Jobs): with the bare queue model
(no business rules: the baseline) and with the real scheduler, ledger and routing
(``simulations.real``), and reports both rates and their ratio, so the cost of the real
rules is visible. The target for the real system is >= 20,000 Jobs/s on one core.

Rates are Jobs / wall seconds of ``World.run`` without the system's one-time setup
(opening the accounts, registering the Islands), which is reported on its own; each
system runs ``--repeat`` times and the best run counts. CPU seconds are reported next to
wall seconds: when other processes compete for the core, wall time grows, CPU time much
less. ``--profile`` adds a cProfile pass of the real system and prints where its time
goes (by module area).

``bench/sim.py`` is ``from simulations.bench import main``; ``python -m bench sim`` prints
the returned dict as the closing JSON line.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eventsourcing.domain import Aggregate

from simulations.baseline import BareQueue
from simulations.runner import build_world
from simulations.scenario import Resolved, load_scenario, with_overrides
from simulations.systems import make_system, real_available
from store.chain import ChainedAggregate
from store.factory import MEMORY_URL, StoreConfig, open_app

TARGET_REAL_JOBS_PER_S = 20_000


class _Timed:
    """Wraps a system under test to time its one-time ``start`` (setup)."""

    def __init__(self, sut: Any) -> None:
        self.sut = sut
        self.setup_s = 0.0
        self.setup_cpu_s = 0.0
        self.setup_events = 0
        start = sut.start

        def timed_start(ctx: Any) -> None:
            t, c = time.perf_counter(), time.process_time()
            start(ctx)
            self.setup_s = time.perf_counter() - t
            self.setup_cpu_s = time.process_time() - c
            committer = getattr(sut, "committer", None)  # the real system's: events of the setup
            self.setup_events = committer.stats.events if committer is not None else 0

        sut.start = timed_start


def measure(res: Resolved, make: Callable[[], Any], repeat: int) -> dict[str, Any]:
    """Best of ``repeat`` runs (by wall time without setup)."""
    best: dict[str, Any] | None = None
    for _ in range(max(1, repeat)):
        gc.collect()
        timed = _Timed(make())
        world = build_world(res, timed.sut)
        t, c = time.perf_counter(), time.process_time()
        world.run()
        wall = time.perf_counter() - t - timed.setup_s
        cpu = time.process_time() - c - timed.setup_cpu_s
        jobs, events = len(world.jobs), world.engine.events_run
        if best is None or wall < best["wall_s"]:
            best = {"jobs": jobs, "events": events, "wall_s": wall, "cpu_s": cpu, "setup_s": timed.setup_s,
                    "jobs_per_s": jobs / wall, "cpu_jobs_per_s": jobs / cpu if cpu > 0 else None,
                    "events_per_s": events / wall, "setup_events": timed.setup_events,
                    "log_digest": world.log_digest(), "world": world}
    assert best is not None
    return best


class _Probe(Aggregate):
    """The floor probe: a plain library aggregate with one two-field event."""

    def __init__(self, n: int) -> None:
        self.n = n

    class Bumped(Aggregate.Event):
        amount: int
        note: str

        def apply(self, agg: Any) -> None:
            agg.n += self.amount


class _ChainedProbe(ChainedAggregate):
    """The same probe with the hash chain every aggregate of ours carries (decision 0040)."""

    def __init__(self, n: int) -> None:
        self.n = n

    class Bumped(ChainedAggregate.Event):
        amount: int
        note: str

        def apply(self, agg: Any) -> None:
            agg.n += self.amount


def event_floor_us(events: int = 30_000, repeat: int = 5, *, chained: bool = False) -> dict[str, float]:
    """What one event costs with no rule at all, in microseconds (median of ``repeat``): a
    plain ``eventsourcing`` aggregate with one two-field event (``chained``: with our hash
    chain, as every aggregate of ours), no unit of work - trigger (event object, chain hash,
    apply), collect, map (``to_stored_event``: encode) and insert into the simulator's
    in-memory recorder in batches of 5, through the store's own mapper and recorder, the
    cyclic collector paused as in ``World.run``. Multiplied by the real system's events per
    Job it gives a ceiling on Jobs/s that no work on the rules can pass while every Job is
    ~7 such events (see docs/SIMULATOR.md, "Speed")."""
    runs: list[dict[str, float]] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(max(1, repeat)):
            runs.append(_floor_once(_ChainedProbe if chained else _Probe, events))
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {k: 1e6 * statistics.median(r[k] for r in runs) / events for k in runs[0]}
    out["total"] = sum(out.values())
    return out


def _floor_once(probe: Any, events: int) -> dict[str, float]:
    app = open_app(StoreConfig(database_url=MEMORY_URL, data_dir=Path(".")))
    aggs = [probe(0) for _ in range(100)]
    for a in aggs:
        a.collect_events()  # the creation events are not measured
    t0 = time.perf_counter()
    for i in range(events):
        aggs[i % 100].trigger_event(probe.Bumped, amount=1, note="x")
    t1 = time.perf_counter()
    pending = [e for a in aggs for e in a.collect_events()]
    t2 = time.perf_counter()
    stored = [app.mapper.to_stored_event(e) for e in pending]
    t3 = time.perf_counter()
    for k in range(0, len(stored), 5):
        app.recorder.insert_events(stored[k:k + 5])
    t4 = time.perf_counter()
    assert len(stored) == events
    return {"trigger": t1 - t0, "collect": t2 - t1, "map": t3 - t2, "insert": t4 - t3}


AREAS = (  # (label, path fragment) for --profile, first match wins
    ("event store + unit of work (store/, eventsourcing)", ("/store/", "/eventsourcing/")),
    ("ledger", ("/ledger/",)),
    ("routing index", ("/routing/", "sortedcontainers")),
    ("scheduler core, registry, commands", ("/scheduler/",)),
    ("simulator world + adapter", ("/simulations/",)),
)


def profile_real(res: Resolved) -> list[tuple[str, float]]:
    """Share of the real system's run time per code area (cProfile self time)."""
    import cProfile
    import pstats

    world = build_world(res, make_system("real"))
    prof = cProfile.Profile()
    prof.enable()
    world.run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.items():
        area = next((label for label, frags in AREAS if any(f in filename for f in frags)), "other (stdlib, msgspec)")
        totals[area] = totals.get(area, 0.0) + tottime
    grand = sum(totals.values()) or 1.0
    return sorted(((k, v / grand) for k, v in totals.items()), key=lambda kv: -kv[1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench sim")
    p.add_argument("--jobs", type=int, default=20_000, help="Jobs per run, the same for both systems")
    p.add_argument("--scenario", default="baseline")
    p.add_argument("--repeat", type=int, default=3, help="runs per system; the best counts")
    p.add_argument("--seed", type=int)
    p.add_argument("--profile", action="store_true", help="also profile the real system and print the split")
    args = p.parse_args(argv)
    res = with_overrides(load_scenario(args.scenario), seed=args.seed, max_jobs=args.jobs, unlimited_duration=True)
    result: dict[str, Any] = {"bench": "sim", "scenario": args.scenario, "jobs": args.jobs, "seed": res.scenario.seed,
                              "target_real_jobs_per_s": TARGET_REAL_JOBS_PER_S}
    bare = measure(res, BareQueue, args.repeat)
    print(f"sim {args.scenario}, first {args.jobs:,} Jobs, best of {args.repeat}: bare queue {bare['jobs_per_s']:,.0f} "
          f"Jobs/s ({bare['events_per_s']:,.0f} events/s, {bare['cpu_jobs_per_s']:,.0f} Jobs per CPU second)")
    result.update(bare_queue_jobs_per_s=round(bare["jobs_per_s"]), bare_queue_events_per_s=round(bare["events_per_s"]),
                  bare_queue_cpu_jobs_per_s=round(bare["cpu_jobs_per_s"] or 0), real_jobs_per_s=None,
                  real_vs_bare=None, meets_target=None)
    if not real_available():
        print("sim real rules: not available (simulations.real missing)")
        return result
    real = measure(res, lambda: make_system("real"), args.repeat)
    assert real["jobs"] == bare["jobs"], "both systems must see the same demand"
    ratio = real["jobs_per_s"] / bare["jobs_per_s"]
    m = real["world"].sut
    print(f"sim real rules: {real['jobs_per_s']:,.0f} Jobs/s ({real['cpu_jobs_per_s']:,.0f} per CPU second; "
          f"{ratio:.4f}x the bare queue, i.e. {1 / ratio:,.0f}x slower); setup {real['setup_s']:.2f} s not counted; "
          f"target {TARGET_REAL_JOBS_PER_S:,} Jobs/s")
    print(f"  per Job: {1e6 * real['wall_s'] / real['jobs']:,.0f} us wall; {m.stats['steps'] / real['jobs']:.2f} "
          f"dispatch steps, {m.stats['wakes'] / real['jobs']:.2f} timer wake-ups, "
          f"{m.committer.stats.commands / real['jobs']:.2f} commands, "
          f"{(m.committer.stats.events - real['setup_events']) / real['jobs']:.2f} events; "
          f"system log digest {m.finish(real['world'].engine.now)['log_digest']}")
    result.update(real_jobs_per_s=round(real["jobs_per_s"]), real_cpu_jobs_per_s=round(real["cpu_jobs_per_s"] or 0),
                  real_events_per_s=round(real["events_per_s"]), real_setup_s=round(real["setup_s"], 3),
                  real_us_per_job=round(1e6 * real["wall_s"] / real["jobs"]), real_vs_bare=round(ratio, 5),
                  meets_target=real["jobs_per_s"] >= TARGET_REAL_JOBS_PER_S, log_digest_bare=bare["log_digest"],
                  log_digest_real=real["log_digest"])
    events_per_job = (m.committer.stats.events - real["setup_events"]) / real["jobs"]
    for label, chained in (("library", False), ("chained", True)):
        floor = event_floor_us(chained=chained)
        ceiling = 1e6 / (floor["total"] * events_per_job)
        print(f"  {label} event floor: {floor['total']:.2f} us per event (trigger {floor['trigger']:.2f}, collect "
              f"{floor['collect']:.2f}, map {floor['map']:.2f}, insert {floor['insert']:.2f}) x {events_per_job:.2f} "
              f"events per Job = {floor['total'] * events_per_job:.0f} us per Job before any rule runs: ceiling "
              f"{ceiling:,.0f} Jobs/s; the real rules reach {real['jobs_per_s'] / ceiling:.2f} of it")
        result.update({f"{label}_event_floor_us": round(floor["total"], 3),
                       f"{label}_event_floor_ceiling_jobs_per_s": round(ceiling),
                       f"real_vs_{label}_ceiling": round(real["jobs_per_s"] / ceiling, 4)})
    result["events_per_job"] = round(events_per_job, 3)
    if args.profile:
        split = profile_real(res)
        print("  where the real system's time goes (cProfile self time):")
        for label, share in split:
            print(f"    {100 * share:5.1f} %  {label}")
        result["real_profile_split"] = {label: round(share, 3) for label, share in split}
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main()))
