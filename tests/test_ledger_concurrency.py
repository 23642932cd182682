"""Many threads in several processes race to place holds on one account funded for
exactly K of them: exactly K succeed, the balance ends at zero, no hold is lost."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ledger import audit, names
from ledger.errors import InsufficientCredits
from ledger.service import Ledger, LedgerConfig
from store.clock import SystemClock
from store.factory import iter_log, open_app
from store.unit_of_work import GroupCommitter

K = 60
AMOUNT = 1_000_000
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.postgres
def test_holds_race_across_threads_and_processes(pg_store_config):
    config = LedgerConfig(free_tier_grant_micro=0)
    app = open_app(pg_store_config)
    committers = [GroupCommitter(app, SystemClock()), GroupCommitter(open_app(pg_store_config), SystemClock())]
    acct = uuid.uuid4()
    Ledger(committers[0], config).open_account(acct, "race@x", kyc_verified=True, free_tier_grant=False,
                                               initial_grant_micro=K * AMOUNT)
    for c in committers:
        c.query(lambda uow: uow.get(acct))  # both caches hold version N: they will conflict
    start_at = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "race_worker.py"), pg_store_config.database_url,
                               pg_store_config.schema, str(acct), f"p{i}", "40", str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(2)]

    def attempt(i: int) -> bool:
        ledger = Ledger(committers[i % 2], config)
        try:
            ledger.place_hold(acct, f"t-{i}", AMOUNT, reference="race:threads")
            return True
        except InsufficientCredits:
            return False

    time.sleep(max(0.0, start_at - time.time()))
    with ThreadPoolExecutor(16) as pool:
        local_ok = sum(pool.map(attempt, range(60)))
    remote_ok = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        remote_ok += json.loads(out.strip().splitlines()[-1])["ok"]
    try:
        assert local_ok + remote_ok == K
        bal = Ledger(committers[0], config).balance(acct)
        fresh = committers[0].query(lambda uow: uow.get(acct, fresh=True))
        assert fresh.spendable_micro == 0 and fresh.held_micro == K * AMOUNT
        assert len(fresh.open_holds()) == K
        f = audit.fold(iter_log(app, topics=audit.LEDGER_TOPICS))
        f.finish(None, 0)
        assert not f.violations
        assert f.balances[names.spendable(acct)] == 0
        assert sum(1 for (a, _), h in f.holds.items() if a == str(acct) and h[2] == "open") == K
        assert bal is not None
    finally:
        for c in committers:
            c.close()
