"""Where a Job's time goes (issue #17, "a profile first").

    python -m bench profile [--jobs N] [--seconds S] [--top K] [--no-pg]

Two measurements, each against its own baseline in the same run:

1. **Simulated Jobs** (the real scheduler, ledger and routing on the simulator's virtual
   clock, baseline scenario): a cProfile pass over `--jobs` Jobs, the top `--top`
   functions by own time with microseconds per Job, the share of each code area, events
   and commands per Job, and allocations per Job (tracemalloc: bytes and blocks allocated
   and still alive at the end of the run, per Job; and gc-tracked objects created per Job,
   counted by a gc callback on generation-0 collections with the threshold set to 1, so
   every tracked allocation is seen). Baseline: the bare queue model on the same demand.
2. **PostgreSQL lifecycles** (`bench lifecycle`'s load: submit → assign → accept →
   complete, group commit): statements, round trips, transactions and commits per Job
   counted at the psycopg layer of this process (every `execute`, `executemany`, `copy`
   and `commit`), the mean commit batch, and a py-spy profile of every thread (the writer
   thread included; `--gil`, sampled from the start of the load to its end), top `--top`
   by own and by inclusive time, as shares of this process's CPU time per Job. Baseline: the same load with one command
   per transaction.

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import time
import tracemalloc
from collections import Counter
from typing import Any

from bench.common import PsycopgCounter, ratio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _where(filename: str, line: int, name: str) -> str:
    if filename.startswith(ROOT):
        filename = filename[len(ROOT) + 1:]
    elif "site-packages/" in filename:
        filename = filename.split("site-packages/", 1)[1]
    elif filename == "~":
        return name  # a C function
    return f"{name} ({filename}:{line})"


def top_by_own_time(stats: dict, jobs: int, top: int) -> tuple[list[dict[str, Any]], float]:
    rows = []
    total = 0.0
    for (filename, line, name), (_cc, ncalls, tottime, _cumtime, _callers) in stats.items():
        total += tottime
        rows.append((tottime, ncalls, _where(filename, line, name)))
    rows.sort(reverse=True)
    return ([{"function": where, "own_us_per_job": round(1e6 * t / jobs, 2), "calls_per_job": round(n / jobs, 2),
              "share": round(t / total, 4) if total else 0.0} for t, n, where in rows[:top]], total)


# ---------------------------------------------------------------------- simulator
def profile_sim(jobs: int, top: int) -> dict[str, Any]:
    from simulations.bench import AREAS, measure
    from simulations.baseline import BareQueue
    from simulations.runner import build_world
    from simulations.scenario import load_scenario, with_overrides
    from simulations.systems import make_system

    res = with_overrides(load_scenario("baseline"), max_jobs=jobs, unlimited_duration=True)
    bare = measure(res, BareQueue, 1)
    timed = measure(res, lambda: make_system("real"), 1)
    sut = timed["world"].sut
    n_jobs = timed["jobs"]
    events_per_job = (sut.committer.stats.events - timed["setup_events"]) / n_jobs
    commands_per_job = sut.committer.stats.commands / n_jobs

    # cProfile pass (slower than the timed run; shares and per-Job ratios are what count)
    world = build_world(res, make_system("real"))
    prof = cProfile.Profile()
    prof.enable()
    world.run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows, total = top_by_own_time(stats, len(world.jobs), top)
    areas: Counter[str] = Counter()
    for (filename, _line, _name), (_cc, _nc, tottime, _ct, _callers) in stats.items():
        area = next((label for label, frags in AREAS if any(f in filename for f in frags)), "other (stdlib, msgspec)")
        areas[area] += tottime

    # allocations: tracemalloc (bytes and blocks alive at the end) and gc-tracked objects created
    world = build_world(res, make_system("real"))
    created = [0]
    thresholds = gc.get_threshold()

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start" and info.get("generation") == 0:
            created[0] += 1

    gc.collect()
    gc.callbacks.append(on_gc)
    gc.set_threshold(1, thresholds[1], thresholds[2])
    tracemalloc.start()
    try:
        world.run()
        current_bytes, peak_bytes = tracemalloc.get_traced_memory()
        blocks = sum(s.count for s in tracemalloc.take_snapshot().statistics("filename"))
    finally:
        tracemalloc.stop()
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(on_gc)
    n = len(world.jobs)
    return {
        "jobs": n_jobs, "real_jobs_per_s": round(timed["jobs_per_s"]), "bare_jobs_per_s": round(bare["jobs_per_s"]),
        "ratio": ratio(timed["jobs_per_s"], bare["jobs_per_s"]),
        "real_us_per_job": round(1e6 * timed["wall_s"] / n_jobs, 1),
        "real_cpu_us_per_job": round(1e6 * timed["cpu_s"] / n_jobs, 1),
        "events_per_job": round(events_per_job, 3), "commands_per_job": round(commands_per_job, 3),
        "profiled_us_per_job": round(1e6 * total / len(world.jobs), 1),
        "top": rows, "areas": {k: round(v / total, 4) for k, v in areas.most_common()},
        "gc_tracked_objects_created_per_job": round(created[0] / n, 1),
        "bytes_alive_per_job": round(current_bytes / n), "blocks_alive_per_job": round(blocks / n, 1),
        "peak_traced_mb": round(peak_bytes / 2**20, 1),
    }


# ---------------------------------------------------------------------- PostgreSQL
def profile_pg(seconds: float, top: int) -> dict[str, Any]:
    from bench.lifecycle import _drop, _pg, run

    out: dict[str, Any] = {}
    for name, max_batch, inflight in (("group", 500, 2_000), ("single", 1, 64)):
        store = _pg("bench_prof")
        try:
            with PsycopgCounter() as counter:
                r = run(store, seconds=seconds, inflight=inflight, islands=200, max_batch=max_batch, clearing=False)
        finally:
            _drop(store)
        jobs = max(1, r["lifecycles"])
        c = counter.counts
        out[name] = {"lifecycles_per_s": round(r["per_s"]), "lifecycles": r["lifecycles"],
                     "mean_commit_batch": round(r["mean_batch"], 1), **counter.per_job(jobs),
                     "cpu_us_per_job": r["cpu_us_per_job"], "errors": r["errors"],
                     "raw_counts": dict(c)}
    out["profile"] = spy_profile_pg(seconds, top)
    return out


def _frame_name(frame: str) -> str:
    """py-spy's raw frame `name (path:line)` as `name (path-in-repo)` (lines merged)."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    if path.startswith(ROOT):
        path = path[len(ROOT) + 1:]
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{name} ({path})" if path else name


def aggregate_spy(raw_lines: list[str], jobs: int, cpu_s: float, top: int) -> dict[str, Any]:
    """Own and inclusive sample shares by function from py-spy's raw (collapsed) output;
    microseconds per Job are the shares of this process's CPU time in the sampled window."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw_lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")[1:]]  # [0] is the thread
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    us = 1e6 * cpu_s / max(1, jobs)

    def rows(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(n / total, 4), "own_us_per_job": round(us * n / total, 2),
                 "calls_per_job": None} for f, n in c.most_common(top)] if total else []

    return {"samples": total, "top": rows(own), "inclusive": rows(inclusive)}


def spy_profile_pg(seconds: float, top: int) -> dict[str, Any] | None:
    """The group-commit load sampled by py-spy attached to this process (every thread,
    `--gil`: only the thread holding the interpreter lock, i.e. where Python CPU goes),
    from when the load starts to when it stops: setup is not in it. None without py-spy."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from bench.lifecycle import _drop, _pg, run

    # on PATH, or installed beside this interpreter (a venv's python run without activating it)
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if spy is None:
        print("  (py-spy not found on PATH nor beside this Python: no PostgreSQL profile)")
        return None
    tmp = tempfile.NamedTemporaryFile(suffix=".txt", delete=False)
    tmp.close()
    proc: list[subprocess.Popen] = []
    cpu = [0.0]

    def started() -> None:
        cpu[0] = time.process_time()
        proc.append(subprocess.Popen([spy, "record", "--pid", str(os.getpid()), "--gil", "--nonblocking",
                                      "--rate", "250", "--duration", str(max(1, int(seconds) - 1)),
                                      "--format", "raw", "--output", tmp.name],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    store = _pg("bench_prof")
    try:
        r = run(store, seconds=seconds, inflight=2_000, islands=200, max_batch=500, clearing=False,
                on_started=started)
    finally:
        _drop(store)
    if not proc:
        return None
    _out, err = proc[0].communicate(timeout=60)
    with open(tmp.name) as f:
        lines = f.readlines()
    os.unlink(tmp.name)
    if proc[0].returncode != 0 or not lines:
        print(f"  (py-spy failed: {err.decode(errors='replace').strip()[-200:]})")
        return None
    result = aggregate_spy(lines, r["lifecycles"], r["cpu_s"], top)
    result.update(lifecycles=r["lifecycles"], cpu_us_per_job=r["cpu_us_per_job"],
                  lifecycles_per_s=round(r["per_s"]))
    return result


def _print_top(title: str, rows: list[dict[str, Any]], label: str = "own us/Job") -> None:
    print(title)
    print(f"  {label:>10} {'calls/Job':>9} {'share':>6}  function")
    for r in rows:
        calls = "-" if r["calls_per_job"] is None else f"{r['calls_per_job']:.2f}"
        print(f"  {r['own_us_per_job']:10.2f} {calls:>9} {100 * r['share']:5.1f}%  {r['function']}")


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench profile")
    ap.add_argument("--jobs", type=int, default=5_000, help="simulated Jobs profiled")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds of PostgreSQL lifecycles per run")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL part")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    sim = profile_sim(args.jobs, args.top)
    print(f"simulated Jobs: {sim['real_jobs_per_s']:,} Jobs/s real rules vs {sim['bare_jobs_per_s']:,} bare queue "
          f"(ratio {sim['ratio']}); {sim['real_us_per_job']} us wall, {sim['real_cpu_us_per_job']} us CPU per Job; "
          f"{sim['events_per_job']} events and {sim['commands_per_job']} commands per Job")
    print(f"  allocations per Job: {sim['gc_tracked_objects_created_per_job']} gc-tracked objects created; "
          f"{sim['bytes_alive_per_job']} bytes / {sim['blocks_alive_per_job']} blocks still alive at the end")
    print("  areas (share of own time): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sim["areas"].items()))
    _print_top(f"  top {args.top} by own time (cProfile, {sim['profiled_us_per_job']} us per Job profiled):",
               sim["top"])
    result: dict[str, Any] = {"bench": "profile", "sim_jobs_per_s": sim["real_jobs_per_s"],
                              "baseline_sim_jobs_per_s": sim["bare_jobs_per_s"], "ratio": sim["ratio"],
                              "sim_us_per_job": sim["real_us_per_job"], "sim_cpu_us_per_job": sim["real_cpu_us_per_job"],
                              "sim_events_per_job": sim["events_per_job"],
                              "sim_commands_per_job": sim["commands_per_job"],
                              "sim_objects_per_job": sim["gc_tracked_objects_created_per_job"]}
    if not args.no_pg:
        pg = profile_pg(args.seconds, args.top)
        g, s = pg["group"], pg["single"]
        for name, r in (("group commit", g), ("one per transaction", s)):
            print(f"PostgreSQL {name}: {r['lifecycles_per_s']:,} lifecycles/s; per Job {r['statements_per_job']} "
                  f"statements, {r['round_trips_per_job']} round trips, {r['transactions_per_job']} transactions; "
                  f"mean commit batch {r['mean_commit_batch']} commands")
        if pg.get("profile"):
            prof = pg["profile"]
            title = (f"lifecycles sampled by py-spy --gil ({prof['samples']} samples over {prof['lifecycles']} "
                     f"lifecycles at {prof['lifecycles_per_s']:,}/s, {prof['cpu_us_per_job']} us CPU per Job)")
            _print_top(f"  top {args.top} by own time, {title}:", prof["top"])
            _print_top(f"  top {args.top} by inclusive time:", prof["inclusive"], "incl us/Job")
        result.update(pg_lifecycles_per_s=g["lifecycles_per_s"], baseline_pg_lifecycles_per_s=s["lifecycles_per_s"],
                      pg_ratio=ratio(g["lifecycles_per_s"], s["lifecycles_per_s"]),
                      pg_round_trips_per_job=g["round_trips_per_job"],
                      pg_statements_per_job=g["statements_per_job"],
                      pg_transactions_per_job=g["transactions_per_job"], pg_mean_commit_batch=g["mean_commit_batch"],
                      pg_cpu_us_per_job=(pg.get("profile") or {}).get("cpu_us_per_job"))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
