"""Full in-process Job lifecycles per second: submit (Job + hold) -> assign -> accept ->
complete (settlement + earning + fee + karma) through the real scheduler, ledger and
routing code, on PostgreSQL and on the embedded SQLite default. Baseline, same run:
the same lifecycles with one command per transaction (group commit off).

    python -m bench lifecycle [--seconds S] [--inflight N] [--islands N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.common import ratio
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


def run(store: StoreConfig, *, seconds: float, inflight: int, islands: int, max_batch: int) -> dict:
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
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    while time.perf_counter() < stop_at[0]:
        if not slots_free.acquire(timeout=0.5):
            continue
        acct = consumers[n % len(consumers)]
        n += 1
        try:
            fut = sched.submit_future(acct, "llm-chat", {"prompt": "hello " * 20, "max_tokens": 512})
        except Exception:  # noqa: BLE001 - queue bound reached
            slots_free.release()
            time.sleep(0.001)
            continue
        fut.add_done_callback(submitted)
    elapsed = time.perf_counter() - t0
    completed_count = done[0]
    stop.set()
    sched.stop()
    stats = committer.stats
    committer.close()
    app.close()
    return {"lifecycles": completed_count, "seconds": elapsed, "per_s": completed_count / elapsed,
            "errors": errors[0], "mean_batch": stats.commands / max(1, stats.batches)}


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
    ap.add_argument("--inflight", type=int, default=2_000)
    ap.add_argument("--islands", type=int, default=200)
    args = ap.parse_args(argv)
    results = {}
    for name, max_batch in (("group", 500), ("single", 1)):
        store = _pg("bench_lc")
        try:
            results[f"pg_{name}"] = r = run(store, seconds=args.seconds, inflight=args.inflight if max_batch > 1
                                            else 64, islands=args.islands, max_batch=max_batch)
        finally:
            _drop(store)
        print(f"PostgreSQL {name:>6}: {r['per_s']:8.0f} lifecycles/s  (mean batch {r['mean_batch']:.1f}, "
              f"errors {r['errors']})")
    tmp = Path(tempfile.mkdtemp(prefix="bench-lc-"))
    try:
        results["sqlite"] = r = run(StoreConfig(database_url=None, data_dir=tmp), seconds=args.seconds,
                                    inflight=args.inflight, islands=args.islands, max_batch=500)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"SQLite     group: {r['per_s']:8.0f} lifecycles/s  (mean batch {r['mean_batch']:.1f})")
    return {"bench": "lifecycle", "ops_per_s": round(results["pg_group"]["per_s"]),
            "unit": "complete lifecycles/s on PostgreSQL",
            "baseline_ops_per_s": round(results["pg_single"]["per_s"]),
            "ratio": ratio(results["pg_group"]["per_s"], results["pg_single"]["per_s"]),
            "sqlite_ops_per_s": round(results["sqlite"]["per_s"]),
            "errors": results["pg_group"]["errors"]}
