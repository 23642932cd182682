"""``python -m bench sim``: simulated Jobs per second of wall time.

Runs the baseline scenario (simulations/scenarios/baseline.toml) for ``--jobs`` Jobs
twice: with the bare queue model (no business rules: the baseline) and, when it is
available, with the real scheduler/ledger/routing (``simulations.real``). Prints both
rates and their ratio; the target for the real system is >= 20,000 Jobs/s on one core.

Wire-up (bench/ is not part of simulations/): ``bench/sim.py`` is just::

    from simulations.bench import main  # noqa: F401
"""

from __future__ import annotations

import argparse
import time

from simulations.baseline import BareQueue
from simulations.runner import build_world
from simulations.scenario import load_scenario, with_overrides
from simulations.systems import make_system, real_available

TARGET_REAL_JOBS_PER_S = 20_000


def _measure(res, make, repeat: int) -> tuple[float, float, str]:
    """Best of ``repeat`` runs: (Jobs/s, engine events/s, log digest)."""
    best = None
    for _ in range(repeat):
        world = build_world(res, make())
        t0 = time.perf_counter()
        world.run()
        dt = time.perf_counter() - t0
        jobs, events = len(world.jobs), world.engine.events_run
        if best is None or dt < best[0]:
            best = (dt, jobs, events, world.log_digest())
    dt, jobs, events, digest = best
    return jobs / dt, events / dt, digest


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench sim")
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--scenario", default="baseline")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    res = with_overrides(load_scenario(args.scenario), seed=args.seed, max_jobs=args.jobs, unlimited_duration=True)
    bare_jobs, bare_events, digest = _measure(res, BareQueue, args.repeat)
    print(f"sim baseline ({args.scenario}, {args.jobs:,} Jobs): bare queue {bare_jobs:,.0f} Jobs/s, "
          f"{bare_events:,.0f} events/s (log digest {digest})")
    result: dict = {"bench": "sim", "scenario": args.scenario, "jobs": args.jobs,
                    "bare_queue_jobs_per_s": round(bare_jobs), "bare_queue_events_per_s": round(bare_events),
                    "real_jobs_per_s": None, "real_vs_bare": None, "target_real_jobs_per_s": TARGET_REAL_JOBS_PER_S,
                    "meets_target": None}
    if real_available():
        real_jobs, real_events, _ = _measure(res, lambda: make_system("real"), args.repeat)
        ratio = real_jobs / bare_jobs
        print(f"sim real rules: {real_jobs:,.0f} Jobs/s ({ratio:.2f}x the bare queue); target "
              f"{TARGET_REAL_JOBS_PER_S:,} Jobs/s")
        result.update(real_jobs_per_s=round(real_jobs), real_vs_bare=round(ratio, 3),
                      meets_target=real_jobs >= TARGET_REAL_JOBS_PER_S)
    else:
        print("sim real rules: not available yet (simulations.real missing)")
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main()))
