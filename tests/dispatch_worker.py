"""A coordinator process for test_dispatch_multiprocess: a Scheduler with the PostgreSQL
leader lock, acting also as the (shared) test Islands: every offer it gets it accepts
and completes. Heartbeats for all Islands are fed to every process (what the Redis
fan-out of the Island channel does in production).

    python tests/dispatch_worker.py URL SCHEMA ISLAND_IDS(comma) SECONDS
Prints one JSON line of counts when done."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ledger.service import LedgerConfig
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.dispatcher import JobOffer, NullListener
from scheduler.leader import PostgresLeaderLock
from scheduler.service import Scheduler
from store.clock import RandomIds, SystemClock
from store.factory import StoreConfig, open_app
from store.unit_of_work import GroupCommitter

CONFIG = SchedulerConfig(ack_timeout_ms=2_000, lease_ms=4_000, lease_renew_ms=1_000, queue_timeout_ms=120_000,
                         heartbeat_interval_ms=1_000, missed_heartbeats_offline=5)


def main() -> None:
    url, schema, islands_arg, seconds = sys.argv[1:5]
    islands = islands_arg.split(",")
    store = StoreConfig(database_url=url, data_dir=Path("."), schema=schema)
    app = open_app(store)
    clock = SystemClock()
    committer = GroupCommitter(app, clock)
    counts = {"offers": 0, "completed": 0, "errors": 0, "leader": False}
    pool = ThreadPoolExecutor(8)

    class Islands(NullListener):
        def offer(self, island_id: str, offer: JobOffer) -> None:
            counts["offers"] += 1
            pool.submit(run_job, island_id, uuid.UUID(offer.job_id))

    sched = Scheduler(committer, Catalog.load(), LedgerConfig(), CONFIG, clock, RandomIds(), listener=Islands(),
                      leader=PostgresLeaderLock(store, retry_ms=300, check_ms=300), single_writer=False)

    def run_job(island_id: str, job_id: uuid.UUID) -> None:
        try:
            sched.accept(island_id, job_id)
            time.sleep(0.01)
            sched.complete(island_id, job_id, {"prompt_tokens": 10, "completion_tokens": 20}, "ok", 10)
            counts["completed"] += 1
        except Exception:  # noqa: BLE001 - races with the other process are expected
            counts["errors"] += 1

    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.is_set():
            for island in islands:
                sched.heartbeat(island)
            stop.wait(0.5)

    threading.Thread(target=heartbeats, daemon=True).start()
    sched.start(idle_wait_s=0.01)
    deadline = time.monotonic() + float(seconds)
    idle_since = None
    while time.monotonic() < deadline:
        counts["leader"] = counts["leader"] or sched.core.leader.is_leader()
        if counts["leader"] and not sched.core.jobs:  # every Job it knows of has ended
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 2.0:
                break
        else:
            idle_since = None
        time.sleep(0.1)
    stop.set()
    sched.stop()
    pool.shutdown(wait=True)
    committer.close()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
