"""Full in-process Job lifecycles per second: submit (Job + hold) -> assign -> accept ->
complete (settlement + earning + fee + karma) through the real scheduler, ledger and
routing code, on PostgreSQL and on the embedded SQLite default. Baseline, same run:
the same lifecycles with one command per transaction (group commit off).

    python -m bench lifecycle [--seconds S] [--repeat R] [--inflight N] [--islands N] [--no-market]

PostgreSQL runs R rounds (default 3), each group commit then its baseline, interleaved, so
both see the same machine; the figures reported are the medians (the machine is shared and
its speed moves within minutes), with every run's figure printed.

With the market in play (the default): Islands ask 2.4..3.0 credits per 1000 completion
tokens (seven price levels), a third of the consumers have a saved bid of 3.2, every third
Job carries its own bid_price of 3.5, the rest take the market rate; each Job is cleared
at its Island's ask. The cost of clearing per Job (budget chain + refusal check + hold
at the budget, the clearing rate and the price at it) is measured apart, on the same
scheduler, after the run.

The collector is tuned as the server tunes it (`coordinator.server.tune_gc`: startup
objects frozen, young collections every 50,000 allocations): without it full collections
over the cached aggregates cost 35-45 % of the CPU per lifecycle (docs/PERFORMANCE.md).

Each PostgreSQL run prints this process's CPU time per lifecycle (every thread) and, as
counted at the psycopg layer (`bench.common.PsycopgCounter`), statements and round trips
per lifecycle; the closing JSON line carries both for group commit and its baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.common import PsycopgCounter, median, ratio
from coordinator.server import tune_gc
from ledger.service import Ledger, LedgerConfig
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.dispatcher import JobOffer, NullListener
from scheduler.service import Scheduler
from store.clock import RandomIds, SystemClock
from store.factory import StoreConfig, open_app
from store.unit_of_work import GroupCommitter

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
CAPS = {"cargos": ["llm-chat", "llm-chat-lite"], "models": ["mistral-7b-instruct", "tinyllama-1.1b-chat"],
        "vram_mb": 24_000, "ram_mb": 64_000, "slots": 16, "region": "eu", "hardware_tier": 2}


def clearing_cost_us(sched: Scheduler, consumers: list[uuid.UUID], n: int = 20_000) -> dict:
    """Microseconds per Job of the exchange's work on the submit and settle path, against
    the same loop without it (admission only), medians of 5 rounds."""
    from scheduler import market as mkt
    from scheduler.admission import admit

    catalog = sched.catalog
    inp = {"prompt": "hello " * 20, "max_tokens": 512}
    admitted = [admit(catalog, "llm-chat", inp, {"bid_price": "3.5"} if i % 3 == 0 else None) for i in range(3)]
    accounts = [str(c) for c in consumers]

    def with_market() -> float:
        t = time.perf_counter()
        for i in range(n):
            b = sched.resolve_budget(accounts[i % len(accounts)], admitted[i % 3])
            rate = mkt.clearing_micro(2_700_000, 1000, b.budget_micro)
            mkt.price_at_rate(5_500_000, rate, b.list_rate_micro)
        return (time.perf_counter() - t) / n * 1e6

    def without() -> float:
        t = time.perf_counter()
        for i in range(n):
            admitted[i % 3].hold_micro  # noqa: B018 - the same loop, no market work
        return (time.perf_counter() - t) / n * 1e6

    on = sorted(with_market() for _ in range(5))[2]
    off = sorted(without() for _ in range(5))[2]
    return {"clearing_us_per_job": round(on - off, 3), "loop_us": round(off, 3)}


def run(store: StoreConfig, *, seconds: float, inflight: int, islands: int, max_batch: int,
        market: bool = True, clearing: bool = True, server_gc: bool = True, on_started: Callable[[], None] | None = None) -> dict:
    """Lifecycles for `seconds`; with `clearing` (and the market), the exchange's cost per
    Job is measured after the run (`clearing_cost_us`). `cpu_us_per_job`: this process's
    CPU time (every thread) during the run, per completed lifecycle. `on_started` is called
    when the load starts (after setup), e.g. to attach a profiler."""
    app = open_app(store)
    clock = SystemClock()
    committer = GroupCommitter(app, clock, max_batch=max_batch)
    ledger_config = LedgerConfig()
    ledger = Ledger(committer, ledger_config)
    done = [0]
    errors = [0]
    lock = threading.Lock()
    stop_at = [float("inf")]
    slots_free = threading.Semaphore(0)
    sched: Scheduler

    class Fleet(NullListener):
        def offer(self, island_id: str, offer: JobOffer) -> None:
            if time.perf_counter() >= stop_at[0]:
                return
            job_id = uuid.UUID(offer.job_id)
            f = sched.accept_future(island_id, job_id)
            f.add_done_callback(lambda _f: finish(_f, island_id, job_id))

    def finish(f, island_id: str, job_id: uuid.UUID) -> None:
        if time.perf_counter() >= stop_at[0]:
            return  # the run is over: leave the Job running
        if f.exception():
            with lock:
                errors[0] += 1
            slots_free.release()
            return
        g = sched.complete_future(island_id, job_id, {"prompt_tokens": 200, "completion_tokens": 300}, "x" * 64,
                                  2_000)
        g.add_done_callback(completed)

    def submitted(f) -> None:
        if f.exception():
            with lock:
                errors[0] += 1
            slots_free.release()

    def completed(g) -> None:
        with lock:
            if g.exception():
                errors[0] += 1
            else:
                done[0] += 1
        slots_free.release()

    sched = Scheduler(committer, Catalog.load(), ledger_config, SchedulerConfig(dispatch_batch_max=1_000), clock,
                      RandomIds(), listener=Fleet(), single_writer=not store.is_postgres)
    consumers = [uuid.uuid4() for _ in range(100)]
    owner = uuid.uuid4()
    ledger.open_account(owner, "owner@bench", kyc_verified=True)
    for c in consumers:
        ledger.open_account(c, f"{c}@bench", kyc_verified=True, initial_grant_micro=10**13)
    ids = [sched.register_island(owner, f"i{i}", CAPS, approve=True).island_id for i in range(islands)]
    if market:
        for i, island in enumerate(ids):
            sched.set_asking_prices(uuid.UUID(island), {"llm-chat": ("2.4", "2.5", "2.6", "2.7", "2.8", "2.9", "3")[i % 7]}, by="bench")
        for c in consumers[::3]:
            sched.set_bid(c, "llm-chat", "3.2", by="bench")
    sched.start(idle_wait_s=0.002)
    for island in ids:
        sched.heartbeat(island)
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.is_set():
            for island in ids:
                sched.heartbeat(island)
            stop.wait(2.0)

    threading.Thread(target=heartbeats, daemon=True).start()
    for _ in range(inflight):
        slots_free.release()
    n = 0
    if server_gc:
        tune_gc()  # as `coordinator serve` does once its services are built (decision 0019)
    if on_started is not None:
        on_started()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    while time.perf_counter() < stop_at[0]:
        if not slots_free.acquire(timeout=0.5):
            continue
        acct = consumers[n % len(consumers)]
        n += 1
        try:
            fut = sched.submit_future(acct, "llm-chat", {"prompt": "hello " * 20, "max_tokens": 512},
                                      {"bid_price": "3.5"} if market and n % 3 == 0 else None)
        except Exception:  # noqa: BLE001 - queue bound reached
            slots_free.release()
            time.sleep(0.001)
            continue
        fut.add_done_callback(submitted)
    elapsed = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0
    completed_count = done[0]
    stop.set()
    sched.stop()
    cost = clearing_cost_us(sched, consumers) if market and clearing else {}
    stats = committer.stats
    committer.close()
    app.close()
    return {"lifecycles": completed_count, "seconds": elapsed, "per_s": completed_count / elapsed,
            "cpu_us_per_job": round(1e6 * cpu_s / max(1, completed_count), 1), "cpu_s": cpu_s,
            "errors": errors[0], "mean_batch": stats.commands / max(1, stats.batches), **cost}


def _pg(schema_prefix: str) -> StoreConfig:
    url = os.environ.get("COORDINATOR_DATABASE_URL") or DEFAULT_URL
    return StoreConfig(database_url=url, data_dir=Path("."), schema=f"{schema_prefix}_{uuid.uuid4().hex[:8]}")


def _drop(store: StoreConfig) -> None:
    import psycopg

    from store.factory import parse_postgres_url

    p = parse_postgres_url(store.database_url or "")
    with psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                         user=p["POSTGRES_USER"], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{store.schema}" CASCADE')


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench lifecycle")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=3,
                    help="PostgreSQL rounds, each group commit then its baseline; medians are reported")
    ap.add_argument("--inflight", type=int, default=2_000)
    ap.add_argument("--islands", type=int, default=200)
    ap.add_argument("--no-market", action="store_true", help="no asks and no bids (every Job at the market rate)")
    ap.add_argument("--default-gc", action="store_true",
                    help="keep Python's default collector thresholds (not what the server runs)")
    args = ap.parse_args(argv)
    assert 1 <= args.repeat <= 20, "--repeat between 1 and 20"
    market = not args.no_market
    runs: dict[str, list[dict]] = {"group": [], "single": []}
    for round_no in range(args.repeat):
        for name, max_batch in (("group", 500), ("single", 1)):
            store = _pg("bench_lc")
            try:
                with PsycopgCounter() as counter:
                    r = run(store, seconds=args.seconds, inflight=args.inflight if max_batch > 1 else 64,
                            islands=args.islands, max_batch=max_batch, market=market,
                            clearing=round_no == 0 and name == "group", server_gc=not args.default_gc)
            finally:
                _drop(store)
            r.update(counter.per_job(r["lifecycles"]))
            runs[name].append(r)
            print(f"PostgreSQL {name:>6} #{round_no + 1}: {r['per_s']:8.0f} lifecycles/s  ({r['cpu_us_per_job']:.0f} us CPU "
                  f"per Job, {r['round_trips_per_job']:.3f} round trips, {r['statements_per_job']:.3f} statements per "
                  f"Job; mean batch {r['mean_batch']:.1f}, errors {r['errors']})")
    results = {f"pg_{name}": _median_run(rs) for name, rs in runs.items()}
    g, b = results["pg_group"], results["pg_single"]
    print(f"PostgreSQL medians of {args.repeat}: group {g['per_s']:.0f} lifecycles/s ({g['cpu_us_per_job']:.0f} us CPU, "
          f"{g['round_trips_per_job']:.3f} round trips per Job), one per transaction {b['per_s']:.0f}/s "
          f"({b['cpu_us_per_job']:.0f} us, {b['round_trips_per_job']:.3f} round trips); ratio {ratio(g['per_s'], b['per_s'])}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-lc-"))
    try:
        results["sqlite"] = r = run(StoreConfig(database_url=None, data_dir=tmp), seconds=args.seconds,
                                    inflight=args.inflight, islands=args.islands, max_batch=500, market=market,
                                    clearing=False, server_gc=not args.default_gc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"SQLite     group: {r['per_s']:8.0f} lifecycles/s  ({r['cpu_us_per_job']:.0f} us CPU per Job; "
          f"mean batch {r['mean_batch']:.1f})")
    first = runs["group"][0]
    if market:
        print(f"clearing per Job: {first['clearing_us_per_job']:.2f} us (budget chain, refusal check, hold at the budget, "
              f"clearing rate, price at it; loop alone {first['loop_us']:.2f} us)")
    return {"bench": "lifecycle", "ops_per_s": round(g["per_s"]),
            "unit": f"complete lifecycles/s on PostgreSQL (median of {args.repeat})",
            "baseline_ops_per_s": round(b["per_s"]),
            "ratio": ratio(g["per_s"], b["per_s"]),
            "runs_ops_per_s": [round(r["per_s"]) for r in runs["group"]],
            "runs_baseline_ops_per_s": [round(r["per_s"]) for r in runs["single"]],
            "sqlite_ops_per_s": round(results["sqlite"]["per_s"]),
            "cpu_us_per_job": g["cpu_us_per_job"],
            "baseline_cpu_us_per_job": b["cpu_us_per_job"],
            "round_trips_per_job": g["round_trips_per_job"],
            "baseline_round_trips_per_job": b["round_trips_per_job"],
            "statements_per_job": g["statements_per_job"],
            "errors": sum(r["errors"] for r in runs["group"]), "market": market, "server_gc": not args.default_gc,
            "clearing_us_per_job": first.get("clearing_us_per_job")}


def _median_run(rs: list[dict]) -> dict:
    """Per-field medians of several runs (each figure its own median)."""
    keys = ("per_s", "cpu_us_per_job", "round_trips_per_job", "statements_per_job", "mean_batch")
    return {k: median([r[k] for r in rs]) for k in keys}
