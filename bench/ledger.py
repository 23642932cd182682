"""Ledger benchmark on PostgreSQL: hold+post cycles through group commit, against
(1) the same commands saved one per transaction and (2) a row-locking SQL design.

Each cycle is one hold (1 transfer) and one settlement (post, earning, fee, release:
4 transfers), i.e. 5 ledger transfers and 2 events.

    python -m bench ledger [--seconds S] [--accounts N] [--inflight N]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg

from bench.common import ratio
from ledger.service import Ledger, LedgerConfig, open_account_in, place_hold_in, post_hold_in
from store.clock import SystemClock
from store.factory import StoreConfig, open_app, parse_postgres_url
from store.unit_of_work import GroupCommitter

TRANSFERS_PER_CYCLE = 5
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_url() -> str:
    return os.environ.get("COORDINATOR_DATABASE_URL") or os.environ.get("BENCH_DATABASE_URL") or DEFAULT_URL


def run_event_store(max_batch: int, seconds: float, accounts: int, inflight: int) -> dict:
    schema = f"bench_ledger_{uuid.uuid4().hex[:8]}"
    app = open_app(StoreConfig(database_url=_pg_url(), data_dir=None, schema=schema, pool_size=4))  # type: ignore[arg-type]
    config = LedgerConfig(hold_ttl_ms=3_600_000)
    committer = GroupCommitter(app, SystemClock(), max_batch=max_batch)
    ledger = Ledger(committer, config)
    ids = [uuid.uuid4() for _ in range(accounts)]
    owner = uuid.uuid4()
    ledger.open_account(owner, "owner@bench", kyc_verified=True, free_tier_grant=False)
    futs = [committer.submit(lambda uow, a=a: open_account_in(
        uow, a, f"{a}@bench", kyc_verified=True)) for a in ids]
    for f in futs:
        f.result()
    for a in ids:
        ledger.fund(a, 10**12, code="purchase", reference="bench", reason="bench", idem_key="fund")
    stop_at = time.monotonic() + seconds
    done = 0
    lock = threading.Lock()
    finished = threading.Event()
    counter = [0]
    active = [0]

    def start_cycle(slot: int) -> None:
        if time.monotonic() >= stop_at:
            with lock:
                active[0] -= 1
                if active[0] == 0:
                    finished.set()
            return
        acct = ids[slot % accounts]
        with lock:
            counter[0] += 1
            hold_id = f"h{counter[0]}"
        f = committer.submit(lambda uow: place_hold_in(uow, config, acct, hold_id, 7_000_000, reference="job:b"))

        def after_hold(_f, acct=acct, hold_id=hold_id, slot=slot):
            if _f.exception():
                raise _f.exception()
            g = committer.submit(lambda uow: post_hold_in(uow, config, acct, hold_id, 5_000_000, owner))

            def after_post(_g):
                nonlocal done
                if _g.exception():
                    print("post failed:", _g.exception())
                with lock:
                    done += 1
                start_cycle(slot + inflight)

            g.add_done_callback(after_post)

        f.add_done_callback(after_hold)

    t0 = time.perf_counter()
    active[0] = inflight
    for slot in range(inflight):
        start_cycle(slot)
    finished.wait(seconds + 60)
    elapsed = time.perf_counter() - t0
    stats = committer.stats
    committer.close()
    app.close()
    _drop_schema(schema)
    mean_batch = stats.commands / max(1, stats.batches)
    return {"cycles": done, "seconds": elapsed, "transfers_per_s": done * TRANSFERS_PER_CYCLE / elapsed,
            "events_per_s": stats.events / elapsed, "mean_batch": mean_batch, "conflicts": stats.conflicts}


def _connect():
    p = parse_postgres_url(_pg_url())
    return psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                           user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None, autocommit=False)


def _drop_schema(schema: str) -> None:
    with _connect() as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.commit()


def run_row_lock(seconds: float, accounts: int, threads: int) -> dict:
    """UPDATE balance ... WHERE balance >= amount; one transfer row, two entry rows, per transaction."""
    schema = f"bench_rowlock_{uuid.uuid4().hex[:8]}"
    with _connect() as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".accounts (id text PRIMARY KEY, balance bigint NOT NULL, '
                     f'held bigint NOT NULL DEFAULT 0)')
        conn.execute(f'CREATE TABLE "{schema}".transfers (id bigserial PRIMARY KEY, debit text, credit text, '
                     f'amount bigint, code text, reference text, idem text UNIQUE, at timestamptz DEFAULT now())')
        conn.execute(f'CREATE TABLE "{schema}".entries (id bigserial PRIMARY KEY, transfer_id bigint, '
                     f'account text, amount bigint)')
        with conn.cursor() as cur:
            cur.executemany(f'INSERT INTO "{schema}".accounts VALUES (%s, %s, 0)',
                            [(f"a{i}", 10**12) for i in range(accounts)] + [("owner", 0), ("fees", 0)])
        conn.commit()
    stop_at = time.monotonic() + seconds
    totals = [0] * threads

    def transfer(cur, debit: str, credit: str, amount: int, code: str, idem: str, check: bool) -> None:
        if check:
            cur.execute(f'UPDATE "{schema}".accounts SET balance = balance - %s, held = held + %s '
                        f'WHERE id = %s AND balance >= %s', (amount, amount, debit, amount))
            assert cur.rowcount == 1
        else:
            cur.execute(f'UPDATE "{schema}".accounts SET balance = balance + %s WHERE id = %s', (amount, credit))
        cur.execute(f'INSERT INTO "{schema}".transfers (debit, credit, amount, code, reference, idem) '
                    f'VALUES (%s, %s, %s, %s, %s, %s) RETURNING id', (debit, credit, amount, code, "job:b", idem))
        tid = cur.fetchone()[0]
        cur.execute(f'INSERT INTO "{schema}".entries (transfer_id, account, amount) VALUES (%s, %s, %s), '
                    f'(%s, %s, %s)', (tid, debit, -amount, tid, credit, amount))

    def worker(w: int) -> None:
        n = 0
        with _connect() as conn:
            while time.monotonic() < stop_at:
                acct = f"a{(w * 7919 + n) % accounts}"
                key = f"{w}-{n}"
                with conn.cursor() as cur:  # hold
                    transfer(cur, acct, f"held:{acct}", 7_000_000, "hold", f"h{key}", True)
                conn.commit()
                with conn.cursor() as cur:  # settle: post+earning+fee+release in one transaction
                    cur.execute(f'UPDATE "{schema}".accounts SET held = held - %s, balance = balance + %s '
                                f'WHERE id = %s AND held >= %s', (7_000_000, 2_000_000, acct, 7_000_000))
                    assert cur.rowcount == 1
                    transfer(cur, f"held:{acct}", "clearing", 5_000_000, "post", f"p{key}", False)
                    transfer(cur, "clearing", "owner", 4_500_000, "earning", f"e{key}", False)
                    transfer(cur, "clearing", "fees", 500_000, "fee", f"f{key}", False)
                    transfer(cur, f"held:{acct}", acct, 2_000_000, "release", f"r{key}", False)
                conn.commit()
                n += 1
        totals[w] = n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    elapsed = time.perf_counter() - t0
    _drop_schema(schema)
    cycles = sum(totals)
    return {"cycles": cycles, "seconds": elapsed, "transfers_per_s": cycles * TRANSFERS_PER_CYCLE / elapsed}


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench ledger")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--accounts", type=int, default=2_000)
    ap.add_argument("--inflight", type=int, default=1_000)
    ap.add_argument("--threads", type=int, default=8, help="row-lock design client threads")
    args = ap.parse_args(argv)
    print(f"PostgreSQL {_pg_url()}; {args.seconds:.0f} s per design; {TRANSFERS_PER_CYCLE} transfers per cycle")
    group = run_event_store(max_batch=500, seconds=args.seconds, accounts=args.accounts, inflight=args.inflight)
    print(f"group commit     : {group['transfers_per_s']:>9.0f} transfers/s  {group['events_per_s']:>8.0f} events/s"
          f"  mean batch {group['mean_batch']:.1f}  conflicts {group['conflicts']}")
    single = run_event_store(max_batch=1, seconds=args.seconds, accounts=args.accounts, inflight=min(64, args.inflight))
    print(f"one per txn      : {single['transfers_per_s']:>9.0f} transfers/s  {single['events_per_s']:>8.0f} events/s")
    rowlock = run_row_lock(args.seconds, args.accounts, args.threads)
    print(f"row-lock SQL     : {rowlock['transfers_per_s']:>9.0f} transfers/s  ({args.threads} client threads)")
    return {
        "bench": "ledger",
        "ops_per_s": round(group["transfers_per_s"]),
        "unit": "ledger transfers/s (hold+post cycles x5)",
        "cycles_per_s": round(group["cycles"] / group["seconds"]),
        "events_per_s": round(group["events_per_s"]),
        "mean_batch": round(group["mean_batch"], 1),
        "baseline_ops_per_s": round(single["transfers_per_s"]),
        "ratio": ratio(group["transfers_per_s"], single["transfers_per_s"]),
        "rowlock_ops_per_s": round(rowlock["transfers_per_s"]),
        "ratio_vs_rowlock": ratio(group["transfers_per_s"], rowlock["transfers_per_s"]),
    }
