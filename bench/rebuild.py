"""Projection rebuild on PostgreSQL: replay a log of real Job, Island and ledger events
into every view table, and a baseline measured in the same run on the same log: the
same projections applied one event per transaction (what eventsourcing's
`ProjectionRunner` does: `process_event` + one tracking insert per event).

The log is written through the real command functions (admission, holds, assignment,
acceptance, settlement with earning, fee and karma; some failures and cancellations)
with group commit, ~6 events per Job.

    python -m bench rebuild [--events N] [--baseline-events N] [--live-seconds S] [--keep]

`--live-seconds S` also runs the #3 benchmark load (bench.lifecycle) for S seconds while
the views are kept current, once with the runner as a thread of the coordinator process
and once as a projector process, and reports the projection lag percentiles.
"""

from __future__ import annotations

import argparse
import os
import random
import time
import uuid
from pathlib import Path

from bench.common import ratio
from ledger.service import LedgerConfig, fund_in, open_account_in
from ledger import names
from scheduler import commands as cmd
from scheduler.admission import admit
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from store.clock import SystemClock
from store.factory import StoreConfig, max_position, open_app
from store.unit_of_work import GroupCommitter

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
CAPS = {"cargos": ["llm-chat", "llm-chat-lite"], "models": ["mistral-7b-instruct", "tinyllama-1.1b-chat"],
        "vram_mb": 24_000, "ram_mb": 64_000, "slots": 16, "region": "eu", "hardware_tier": 2}
LEDGER = LedgerConfig(hold_ttl_ms=3_600_000)
SCHED = SchedulerConfig()


def _pg_url() -> str:
    return os.environ.get("COORDINATOR_DATABASE_URL") or os.environ.get("BENCH_DATABASE_URL") or DEFAULT_URL


class Workload:
    """Writes Job lifecycles through the real command functions with group commit."""

    def __init__(self, committer: GroupCommitter, *, consumers: int = 200, islands: int = 20, seed: int = 7) -> None:
        self.committer = committer
        self.rng = random.Random(seed)
        self.catalog = Catalog.load()
        self.owner = uuid.UUID(int=seed)
        self.consumers = [uuid.UUID(int=seed * 1_000_000 + i + 1) for i in range(consumers)]
        self.islands = [str(uuid.UUID(int=seed * 2_000_000 + i + 1)) for i in range(islands)]
        self.admitted = [admit(self.catalog, "llm-chat", {"prompt": f"hello {i} " * 8, "max_tokens": 256})
                         for i in range(16)]

    def setup(self) -> None:
        c = self.committer
        c.execute(lambda uow: open_account_in(uow, self.owner, "owner@bench", kyc_verified=True))
        futs = []
        for a in self.consumers:
            def open_and_fund(uow, a=a):
                open_account_in(uow, a, f"{a}@bench", kyc_verified=True)
                fund_in(uow, a, 10**13, code=names.PURCHASE, reference="bench", reason="bench", idem_key="buy")
            futs.append(c.submit(open_and_fund))
        for i, island in enumerate(self.islands):
            futs.append(c.submit(lambda uow, i=i, island=island: cmd.register_island_in(
                uow, SCHED, uuid.UUID(island), self.owner, f"island-{i}", "x", CAPS, approve=True)))
            futs.append(c.submit(lambda uow, island=island: cmd.set_island_online_in(uow, uuid.UUID(island), True)))
        for f in futs:
            f.result()

    def _wait(self, futs) -> list:
        out = []
        for f in futs:
            try:
                out.append(f.result())
            except Exception:  # noqa: BLE001 - a refused command is part of the workload
                out.append(None)
        return out

    def round(self, jobs: int) -> None:
        c = self.committer
        rng = self.rng
        specs = []
        for _ in range(jobs):
            specs.append((uuid.uuid4(), rng.choice(self.consumers), rng.choice(self.admitted),
                          rng.choice(self.islands), rng.random()))
        self._wait([c.submit(lambda uow, j=j, a=a, ad=ad: cmd.submit_in(uow, LEDGER, SCHED, j, a, ad))
                    for j, a, ad, _, _ in specs])
        live = [s for s in specs if s[4] >= 0.03]  # 3% time out waiting (never assigned)
        self._wait([c.submit(lambda uow, j=j: cmd.timeout_in(uow, j)) for j, _, _, _, r in specs if r < 0.03])
        self._wait([c.submit(lambda uow, j=j, i=i: cmd.assign_in(uow, j, i, str(self.owner), 0, {"total": 1}, 3))
                    for j, _, _, i, _ in live])
        self._wait([c.submit(lambda uow, j=j, i=i: cmd.accept_in(uow, j, i, 0)) for j, _, _, i, _ in live])
        ends = []
        for j, _, _, i, r in live:
            if r < 0.06:
                ends.append(c.submit(lambda uow, j=j, i=i: cmd.fail_in(uow, LEDGER, SCHED, j, i, "oom",
                                                                       retryable=False, streamed=False)))
            elif r < 0.09:
                ends.append(c.submit(lambda uow, j=j: cmd.cancel_in(uow, LEDGER, self.catalog, j, account_id=None,
                                                                    by="consumer")))
            else:
                tokens = 50 + int(r * 200)
                ends.append(c.submit(lambda uow, j=j, i=i, t=tokens: cmd.complete_in(
                    uow, LEDGER, SCHED, self.catalog, j, i, {"prompt_tokens": 40, "completion_tokens": t},
                    "token " * 40, 1_500)))
        self._wait(ends)


def generate(app, target_events: int, *, seed: int = 7, progress: bool = True) -> int:
    committer = GroupCommitter(app, SystemClock(), max_batch=1_000)
    try:
        w = Workload(committer, seed=seed)
        w.setup()
        t0 = time.perf_counter()
        while max_position(app) < target_events:
            w.round(2_000)
            if progress:
                n = max_position(app)
                print(f"  generated {n:,} events ({n / (time.perf_counter() - t0):,.0f}/s)", flush=True)
    finally:
        committer.close()
    return max_position(app)


def _settle(schema: str) -> None:
    """What a production log has had long ago: VACUUM ANALYZE of the events table and a
    checkpoint, so the rebuild is not timed against autovacuum working on a log that was
    written seconds before."""
    import psycopg

    from store.factory import parse_postgres_url

    p = parse_postgres_url(_pg_url())
    with psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                         user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None, autocommit=True) as c:
        c.execute(f'VACUUM ANALYZE "{schema}".coordinator_events')
        try:
            c.execute("CHECKPOINT")
        except psycopg.Error:
            pass  # not a superuser: fine


def _drop_schema(schema: str) -> None:
    import psycopg

    from store.factory import parse_postgres_url

    p = parse_postgres_url(_pg_url())
    with psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                         user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None, autocommit=True) as c:
        c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def run_baseline(app, db, events: int) -> dict:
    """The same projections, one event per transaction (tracking row written per event)."""
    from projections.runner import ProjectionRunner

    runner = ProjectionRunner(app, db, suffix="__baseline", page_size=1, max_page_size=1)
    try:
        runner.setup()
        t0 = time.perf_counter()
        runner.catch_up(stop=events)
        seconds = time.perf_counter() - t0
        n = runner.events_applied
    finally:
        conn = runner.conn
        for ts in runner.work.tables.values():
            conn.execute(f"DROP TABLE IF EXISTS {ts.physical}")
        runner.close()
    return {"events": n, "seconds": round(seconds, 3), "events_per_s": round(n / seconds, 1)}


def _commit_lag(commits: list[tuple[int, float]], timeline: list[list]) -> dict:
    """Per write commit: time until the projector committed a position covering it."""
    from bisect import bisect_left

    from projections.service import lag_summary

    positions = [p for p, _ in timeline]
    lags = []
    for pos, t in commits:
        i = bisect_left(positions, pos)
        if i < len(timeline):
            lags.append(max(0.0, timeline[i][1] - t))
    return lag_summary(lags)


def run_live(seconds: float, mode: str) -> dict:
    """The #3 benchmark load (bench.lifecycle.run: full Job lifecycles through the real
    scheduler, saturating) with the views kept current, and the projection lag measured:
    mode "thread": the runner in the coordinator process, woken by the commit listener;
    mode "process": a projector process (`coordinator projections run`) woken by
    PostgreSQL LISTEN/NOTIFY, lag from event timestamps."""
    import json
    import signal
    import subprocess
    import sys

    import bench.lifecycle as lc
    from projections.service import Projections, lag_summary

    schema = f"bench_lag_{uuid.uuid4().hex[:8]}"
    store = StoreConfig(database_url=_pg_url(), data_dir=Path("."), schema=schema)
    result: dict = {"mode": mode}
    try:
        if mode == "thread":
            holder: list = []
            base = lc.GroupCommitter

            class Attached(base):  # type: ignore[misc, valid-type]
                def __init__(self, app, clock, **kw):
                    super().__init__(app, clock, **kw)
                    proj = Projections.open(app, store)
                    proj.attach(self)
                    proj.start()
                    holder.append(proj)

                def close(self, timeout: float = 10.0) -> None:
                    super().close(timeout)
                    proj = holder[0]
                    proj.runner.stop()
                    proj.catch_up()

            lc.GroupCommitter = Attached
            try:
                load = lc.run(store, seconds=seconds, inflight=2_000, islands=200, max_batch=500)
            finally:
                lc.GroupCommitter = base
            proj = holder[0]
            result["lag"] = lag_summary(list(proj.runner.lag_samples))
            proj.close()
        else:
            open_app(store).close()  # create the schema and the events table
            env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
            env.update(COORDINATOR_DATABASE_URL=_pg_url(), COORDINATOR_DB_SCHEMA=schema)
            proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "projections", "run"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            commits: list[tuple[int, float]] = []
            base = lc.GroupCommitter

            class Recorded(base):  # type: ignore[misc, valid-type]
                def __init__(self, app, clock, **kw):
                    super().__init__(app, clock, **kw)
                    self.add_listener(lambda recs: commits.append((recs[-1].notification.id, time.time()))
                                      if recs else None)

            time.sleep(2.0)  # the projector opens the store and creates its tables
            lc.GroupCommitter = Recorded
            try:
                load = lc.run(store, seconds=seconds, inflight=2_000, islands=200, max_batch=500)
            finally:
                lc.GroupCommitter = base
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if not lines:
                raise RuntimeError(f"projector failed: {err[-2000:]}")
            report = json.loads(lines[-1])
            result["lag_by_event_timestamp"] = report["lag"]
            result["lag"] = _commit_lag(commits, report["timeline"])
        result["lifecycles_per_s"] = round(load["per_s"])
        result["events_per_s_approx"] = round(load["per_s"] * 6)
        return result
    finally:
        _drop_schema(schema)


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench rebuild")
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--baseline-events", type=int, default=10_000)
    ap.add_argument("--live-seconds", type=float, default=0.0)
    ap.add_argument("--keep", action="store_true", help="keep the bench schema")
    args = ap.parse_args(argv)

    from projections.rebuild import rebuild, verify
    from projections.sql import Database

    schema = f"bench_rebuild_{uuid.uuid4().hex[:8]}"
    config = StoreConfig(database_url=_pg_url(), data_dir=Path("."), schema=schema, pool_size=4)
    app = open_app(config)
    db = Database(config)
    try:
        print(f"writing ~{args.events:,} events into {config.describe()}", flush=True)
        total = generate(app, args.events)
        print(f"log: {total:,} events", flush=True)
        _settle(schema)

        t0 = time.perf_counter()
        result = rebuild(app, db, progress=None)
        seconds = time.perf_counter() - t0
        eps = result.events / seconds
        print(f"rebuild: {result.events:,} events in {seconds:.2f} s = {eps:,.0f} events/s; rows {result.rows}",
              flush=True)
        t1 = time.perf_counter()
        check = verify(app, db)
        verify_s = time.perf_counter() - t1
        print(f"verify: {'ok' if check.ok else check.difference.describe()} in {verify_s:.2f} s", flush=True)

        base = run_baseline(app, db, args.baseline_events)
        print(f"baseline (one event per transaction): {base['events']:,} events in {base['seconds']} s = "
              f"{base['events_per_s']:,.0f} events/s", flush=True)
        out = {"bench": "rebuild", "backend": "postgresql", "events": result.events,
               "seconds": round(seconds, 3), "events_per_s": round(eps), "goal_events_per_s": 50_000,
               "goal_met": eps >= 50_000, "verify_ok": check.ok, "verify_s": round(verify_s, 3),
               "baseline": "one event per transaction", "baseline_events": base["events"],
               "baseline_events_per_s": base["events_per_s"], "ratio": ratio(eps, base["events_per_s"])}
        if args.live_seconds > 0:
            for mode in ("thread", "process"):
                live = run_live(args.live_seconds, mode)
                print(f"live lag under the #3 load ({mode}): {live}", flush=True)
                out[f"lag_{mode}"] = live
        return out
    finally:
        db.close()
        app.close()
        if not args.keep:
            _drop_schema(schema)
