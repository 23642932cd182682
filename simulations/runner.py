"""Run a resolved scenario against a system: build demand, fleet and accounts from the
seed, drive the world, compute metrics, check expectations, write the outputs."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from simulations.consumers import SimAccount, build_accounts
from simulations.demand import (BurstDemand, DiurnalDemand, JobShape, PoissonDemand, ShapeSampler, TraceDemand,
                                burst_arrivals, diurnal_arrivals, poisson_arrivals)
from simulations.engine import Engine
from simulations.expectations import Outcome, check_all
from simulations.fleet import SimIsland, build_fleet
from simulations.metrics import compute_metrics, to_json
from simulations.scenario import Resolved
from simulations.system import SystemUnderTest
from simulations.systems import make_system
from simulations.traces import read_trace
from simulations.world import World


class RunResult(msgspec.Struct, kw_only=True):
    metrics: dict[str, Any]
    outcomes: list[Outcome]
    failed: list[Outcome]
    notes: list[str]
    out_dir: str | None = None
    world: Any = None
    sut_report: Any = None


def build_population(res: Resolved, engine: Engine) -> tuple[list[SimIsland], list[SimAccount]]:
    sc = res.scenario
    islands = build_fleet(sc.fleet, res.tiers, res.regions, engine.rng_for("fleet"), faults=sc.faults.islands,
                          fault_multiplier=sc.faults.rate_multiplier)
    accounts = build_accounts(sc.consumers, engine.rng_for("accounts"))
    return islands, accounts


def _stream(res: Resolved, engine: Engine, accounts: list[SimAccount], i: int) -> Iterator[JobShape]:
    sc = res.scenario
    d = sc.demand[i]
    sampler = ShapeSampler(engine.rng_for(f"shapes/{i}"), accounts, res.sizes, d.consumers, d.cargo)
    start_ms = int(d.start_s * 1000)
    ends = [x for x in (d.end_s, sc.duration_s) if x is not None]
    end_ms = float(min(ends) * 1000) if ends else float("inf")
    rng = engine.rng_for(f"demand/{i}")
    if isinstance(d, TraceDemand):
        shapes = read_trace(res.trace_paths[i], d.format, time_scale=d.time_scale, sample=d.sample, limit=d.limit,
                            seed=engine.seed)

        def replay() -> Iterator[JobShape]:
            for s in shapes:
                s.arrival_ms += start_ms
                if s.arrival_ms >= end_ms:
                    return
                yield sampler.assign(s)

        return replay()
    if isinstance(d, PoissonDemand):
        times = poisson_arrivals(rng, d.rate_per_s, start_ms, end_ms)
    elif isinstance(d, BurstDemand):
        times = burst_arrivals(rng, d.rate_per_s, d.burst_rate_per_s, d.on_s, d.off_s, start_ms, end_ms, d.fixed)
    elif isinstance(d, DiurnalDemand):
        times = diurnal_arrivals(rng, d.rate_per_s, d.hourly, res.day_offset_ms, start_ms, end_ms)
    else:  # pragma: no cover - the scenario loader knows every kind
        raise TypeError(type(d).__name__)
    return _shapes(sampler.shape, times)


def _shapes(shape: Callable[[int], JobShape], times: Iterator[int]) -> Iterator[JobShape]:
    for t in times:
        yield shape(t)


def build_demand(res: Resolved, engine: Engine, accounts: list[SimAccount]) -> Iterator[JobShape]:
    """All streams merged in arrival order (ties: stream order, then each stream's order)."""
    streams = [_stream(res, engine, accounts, i) for i in range(len(res.scenario.demand))]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda s: s.arrival_ms)


def sample_interval_ms(res: Resolved) -> int:
    sc = res.scenario
    if sc.sample_interval_s:
        return max(1, int(sc.sample_interval_s * 1000))
    span = sc.duration_s
    if span is None:
        return 10_000
    return int(min(300, max(1, round(span / 720))) * 1000)


def build_world(res: Resolved, sut: SystemUnderTest, *, log_sink: Callable | None = None) -> World:
    sc = res.scenario
    engine = Engine(sc.seed)
    islands, accounts = build_population(res, engine)
    demand = build_demand(res, engine, accounts)
    return World(
        engine=engine, sut=sut, islands=islands, accounts=accounts, cargos=res.cargos, config=sc.coordinator,
        demand=demand, start_epoch_ms=res.start_epoch_ms, day_offset_ms=res.day_offset_ms,
        duration_ms=int(sc.duration_s * 1000) if sc.duration_s is not None else None,
        drain_ms=int(sc.drain_s * 1000), max_jobs=sc.max_jobs, sample_ms=sample_interval_ms(res),
        faults=sc.faults.islands and sc.faults.rate_multiplier > 0,
        restarts_ms=[int(t * 1000) for t in sc.faults.coordinator_restarts_s],
        restart_downtime_ms=int(sc.faults.restart_downtime_s * 1000),
        slow_heartbeat_ms=int(sc.faults.slow_heartbeat_s * 1000), free_tier_micro=res.free_tier_micro,
        log_sink=log_sink)


def _progress_bar(res: Resolved) -> tuple[Callable[[World], None], Callable[[], None]]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    sc = res.scenario
    total = (sc.duration_s + sc.drain_s) * 1000 if sc.duration_s else None
    bar = Progress(TextColumn("[bold]simulating[/] {task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), transient=True)
    task = bar.add_task(sc.name, total=total or (sc.max_jobs or 1), info="")
    bar.start()

    def update(world: World) -> None:
        done = world.engine.now if total else len(world.jobs)
        bar.update(task, completed=done, info=f"{len(world.jobs):,} Jobs, t={world.engine.now / 1000:,.0f} s")

    return update, bar.stop


def run(res: Resolved, system: str | SystemUnderTest = "auto", *, out_dir: str | Path | None = None,
        plots: bool = True, progress: bool = False, events_csv: bool = False) -> RunResult:
    sut = make_system(system) if isinstance(system, str) else system
    notes: list[str] = []
    if sut.name == "bare-queue":
        notes.append("System under test: the bare queue model (no admission, ledger, routing or karma rules). "
                     "Metrics that need those rules are null; KYC violations count what the rules would have refused.")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    sink_file = None
    log_sink = None
    if out is not None and events_csv:
        from simulations.world import LOG_KINDS, decode_log_word

        sink_file = (out / "events.csv").open("w", encoding="utf-8")
        sink_file.write("t_ms,job,island,kind\n")

        def log_sink(buf) -> None:
            w = sink_file.write
            for k in range(0, len(buf), 2):
                job, island, kind = decode_log_word(buf[k + 1])
                w(f"{buf[k]},{job},{island},{LOG_KINDS[kind]}\n")

    world = build_world(res, sut, log_sink=log_sink)
    t0 = time.perf_counter()
    stop_bar = None
    if progress:
        update, stop_bar = _progress_bar(res)
        chunk = max(1_000, int(((res.scenario.duration_s or 3600) + res.scenario.drain_s) * 1000 / 200))
        try:
            world.run(progress=update, chunk_ms=chunk)
        finally:
            stop_bar()
    else:
        world.run()
    sut_report = dict(sut.finish(world.engine.now))
    wall = time.perf_counter() - t0
    metrics = compute_metrics(world, sut_report, scenario=res.scenario.name, system=sut.name, seed=res.scenario.seed,
                              wall_seconds=wall)
    if sink_file is not None:
        sink_file.close()
    for r in (sut_report.get("system") or {}).get("restarts") or ():
        notes.append(f"Coordinator restart at t={r['t_s']:g} s: {r['events_replayed']} events replayed, "
                     f"{r['recovered_jobs']} of {r['open_jobs']} open Jobs recovered ({r['lost_jobs']} lost), "
                     f"credit mismatches across the restart: {r['credit_mismatches']}.")
    if world.protocol_errors:
        notes.append(f"The system broke the simulator protocol {len(world.protocol_errors)} time(s); "
                     f"first: {world.protocol_errors[0]}")
    outcomes = check_all(res.expectations, metrics)
    failed = [o for o in outcomes if not o.ok]
    if out is not None:
        (out / "metrics.json").write_bytes(to_json(metrics))
        sut_report["_system"] = sut.name
        if plots:
            from simulations.report import write_plots

            write_plots(world, sut_report, out)
        from simulations.report import write_report

        write_report(out / "report.md", metrics, outcomes, description=res.scenario.description, source=res.source,
                     notes=notes, protocol_errors=world.protocol_errors, plots=plots)
    return RunResult(metrics=metrics, outcomes=outcomes, failed=failed, notes=notes,
                     out_dir=str(out) if out else None, world=world, sut_report=sut_report)
