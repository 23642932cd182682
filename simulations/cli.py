"""``coordinator simulate`` (also ``python -m simulations``).

    coordinator simulate SCENARIO.toml [--seed N] [--out DIR] [--jobs N] [--duration T] [--scale F]
    coordinator simulate --trace FILE.csv --islands N [--format azure-llm] [--seed N] [--out DIR]

Exit status: 0 all expectations met; 1 an expectation failed (each is printed); 2 bad
input (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulations.expectations import ExpectationError
from simulations.scenario import ScenarioError, load_scenario, scenario_from_dict, with_overrides
from simulations.systems import NAMES, SystemUnavailable
from simulations.traces import FORMATS, TraceError
from simulations.units import parse_duration_ms

EXIT_OK, EXIT_EXPECTATIONS, EXIT_BAD_INPUT = 0, 1, 2

#: Fleet mix used by ``--trace FILE --islands N`` (shares of N; the rest are consumer GPUs).
TRACE_FLEET_MIX = (("enterprise-gpu", 0.05), ("datacenter-gpu", 0.15), ("prosumer-gpu", 0.30))


def trace_scenario(path: str, islands: int, *, fmt: str = "azure-llm", time_scale: float = 1.0, sample: float = 1.0,
                   limit: int | None = None, seed: int = 0) -> dict:
    """A scenario (as a dict) that replays one trace on ``islands`` always-on Islands."""
    if islands < 1:
        raise ValueError("--islands must be >= 1")
    fleet = []
    left = islands
    for tier, share in TRACE_FLEET_MIX:
        n = int(islands * share)
        if n:
            fleet.append({"tier": tier, "count": n, "availability": "always"})
            left -= n
    fleet.append({"tier": "consumer-gpu", "count": left, "availability": "always"})
    demand = {"kind": "trace", "path": str(Path(path).resolve()), "format": fmt, "time_scale": time_scale,
              "sample": sample}
    if limit is not None:
        demand["limit"] = limit
    return {
        "name": f"trace-{Path(path).stem}",
        "description": f"Replay of `{Path(path).name}` ({fmt}) on {islands} always-on Islands.",
        "seed": seed,
        "fleet": fleet,
        "consumers": [{"name": "trace", "count": 1000, "kyc": True, "balance": "1000000",
                       "cargo_mix": {"llm-chat": 1.0, "sdxl": 0.0, "llm-chat-lite": 0.0}}],
        "demand": [demand],
        "expect": ["kyc_violations == 0"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coordinator simulate", description="Run the dispatch simulator.")
    p.add_argument("scenario", nargs="?", help="scenario TOML file (or the name of a packaged scenario)")
    p.add_argument("--seed", type=int, help="override the scenario's seed")
    p.add_argument("--out", help="write metrics.json, report.md and plots to this directory")
    p.add_argument("--jobs", type=int, help="stop arrivals after N Jobs (without --duration: no time limit)")
    p.add_argument("--duration", help="arrivals for this long: 3600, 90s, 15m, 2h")
    p.add_argument("--scale", type=float, help="shrink (or grow) the scenario: Islands, accounts and demand "
                                               "rates times this factor (0.1 = a tenth)")
    p.add_argument("--trace", help="replay a trace file instead of a scenario")
    p.add_argument("--islands", type=int, help="with --trace: fleet size")
    p.add_argument("--format", default="azure-llm", help=f"with --trace: {', '.join(sorted(FORMATS))}")
    p.add_argument("--time-scale", type=float, default=1.0, help="with --trace: 2.0 = twice as fast")
    p.add_argument("--sample", type=float, default=1.0, help="with --trace: keep this fraction of rows")
    p.add_argument("--system", default="auto", choices=NAMES, help="coordinator under test (default: auto)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--events", action="store_true", help="also write the event log as events.csv")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.trace:
            if args.scenario:
                raise ValueError("give either a scenario file or --trace, not both")
            if args.islands is None:
                raise ValueError("--trace needs --islands N")
            res = scenario_from_dict(trace_scenario(args.trace, args.islands, fmt=args.format,
                                                    time_scale=args.time_scale, sample=args.sample,
                                                    seed=args.seed or 0), source=f"--trace {args.trace}")
        elif args.scenario:
            res = load_scenario(args.scenario)
        else:
            raise ValueError("give a scenario file, or --trace FILE --islands N")
        duration_s = parse_duration_ms(args.duration) / 1000 if args.duration else None
        if args.jobs is not None and args.jobs < 0:
            raise ValueError("--jobs must be >= 0")
        if args.scale is not None and not args.scale > 0:
            raise ValueError("--scale must be > 0")
        res = with_overrides(res, seed=args.seed, max_jobs=args.jobs, duration_s=duration_s,
                             unlimited_duration=args.jobs is not None and duration_s is None and not args.trace,
                             scale=args.scale)
        from simulations.runner import run

        progress = not args.quiet and sys.stderr.isatty()
        result = run(res, args.system, out_dir=args.out, plots=not args.no_plots, progress=progress,
                     events_csv=args.events)
    except (ScenarioError, ExpectationError, TraceError, SystemUnavailable, ValueError, OSError) as exc:
        print(f"coordinator simulate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    m = result.metrics
    print(f"scenario {m['scenario']} | system {m['system']} | seed {m['seed']}")
    print(f"jobs {m['jobs_total']}: completed {m['jobs_completed']}, failed {m['jobs_failed']}, timeout "
          f"{m['jobs_timeout']}, cancelled {m['jobs_cancelled']}, refused {m['jobs_refused']}, unfinished "
          f"{m['jobs_unfinished']}")
    w, t = m["wait_s"], m["ttft_s"]
    print(f"wait p50/p99 {w['p50']}/{w['p99']} s | ttft p50/p99 {t['p50']}/{t['p99']} s | utilisation "
          f"{m['island_utilisation']['mean']}")
    print(f"simulated {m['sim_seconds']:.0f} s in {m['wall_seconds']:.2f} s wall ({m['jobs_per_wall_second']} Jobs/s)")
    for note in result.notes:
        print(f"note: {note}")
    if result.out_dir:
        print(f"wrote {result.out_dir}/metrics.json, report.md" + ("" if args.no_plots else " and plots"))
    print(f"log digest {m['log_digest']}")
    for o in result.outcomes:
        print(("expectation " if o.ok else "EXPECTATION ") + o.describe())
    if result.failed:
        print(f"{len(result.failed)} of {len(result.outcomes)} expectation(s) not met", file=sys.stderr)
        return EXIT_EXPECTATIONS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
