"""Several coordinator processes on one PostgreSQL: a Job is never assigned to two
Islands at once, never lost, and dispatch goes on when the leader process is killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from ledger import audit
from ledger.service import Ledger, LedgerConfig
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.jobs import Job
from scheduler.service import Scheduler
from store.clock import RandomIds, SystemClock
from store.factory import iter_log, open_app
from store.unit_of_work import GroupCommitter

ROOT = Path(__file__).resolve().parent.parent
CAPS = {"cargos": ["llm-chat-lite"], "models": ["tinyllama-1.1b-chat"], "ram_mb": 16_000, "slots": 4,
        "region": "eu"}
N_JOBS = 120


@pytest.mark.postgres
@pytest.mark.slow
def test_leader_killed_mid_run_loses_no_job_and_assigns_none_twice(pg_store_config):
    app = open_app(pg_store_config)
    committer = GroupCommitter(app, SystemClock())
    ledger = Ledger(committer, LedgerConfig())
    sched = Scheduler(committer, Catalog.load(), LedgerConfig(), SchedulerConfig(), SystemClock(), RandomIds(),
                      single_writer=False)
    consumer, owner = uuid.uuid4(), uuid.uuid4()
    ledger.open_account(consumer, "c@x", kyc_verified=True, initial_grant_micro=10**12)
    ledger.open_account(owner, "o@x", kyc_verified=True)
    islands = [sched.register_island(owner, f"i{i}", CAPS, approve=True).island_id for i in range(3)]
    job_ids = [sched.submit(consumer, "llm-chat-lite", {"prompt": f"job {i}", "max_tokens": 50}).id
               for i in range(N_JOBS)]

    def worker(seconds: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "dispatch_worker.py"),
                                 pg_store_config.database_url, pg_store_config.schema, ",".join(islands),
                                 str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    first = worker(60)
    time.sleep(1.5)  # the first process takes the lock
    second = worker(25)
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)  # the leader dies mid-run
    first.wait(10)
    out, err = second.communicate(timeout=90)
    assert second.returncode == 0, err[-2000:]
    counts = json.loads(out.strip().splitlines()[-1])
    try:
        assert counts["leader"], "the surviving process never took over dispatch"
        events: dict[str, list] = defaultdict(list)
        for _, ev in iter_log(app):
            if isinstance(ev, Job.Event):
                events[str(ev.originator_id)].append(ev)
        for job_id in job_ids:
            evs = events[job_id]
            holder = None
            for ev in evs:
                if isinstance(ev, Job.Assigned):
                    assert holder is None, f"job {job_id} assigned to {ev.island_id} while {holder} holds it"
                    holder = ev.island_id
                elif isinstance(ev, (Job.OfferDeclined, Job.Requeued)):
                    holder = None
            completions = [ev for ev in evs if isinstance(ev, Job.Completed)]
            assert len(completions) == 1, f"job {job_id}: {[type(e).__name__ for e in evs]}"
        f = audit.fold(iter_log(app, topics=audit.LEDGER_TOPICS))
        f.finish(None, 0)
        assert not f.violations and f.summary()["open_holds"] == 0
    finally:
        committer.close()
