"""A separate process racing to place holds on one account (used by test_ledger_concurrency).

    python tests/race_worker.py URL SCHEMA ACCOUNT_ID TAG ATTEMPTS START_AT_EPOCH_S
Prints one JSON line: {"ok": n, "refused": n}."""

from __future__ import annotations

import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ledger.errors import InsufficientCredits
from ledger.service import Ledger, LedgerConfig
from store.clock import SystemClock
from store.factory import StoreConfig, open_app
from store.unit_of_work import GroupCommitter

AMOUNT = 1_000_000


def main() -> None:
    url, schema, account, tag, attempts, start_at = sys.argv[1:7]
    app = open_app(StoreConfig(database_url=url, data_dir=Path("."), schema=schema))
    committer = GroupCommitter(app, SystemClock())
    ledger = Ledger(committer, LedgerConfig())
    acct = uuid.UUID(account)
    committer.query(lambda uow: uow.get(acct))  # warm the cache: conflicts must be detected, not avoided
    time.sleep(max(0.0, float(start_at) - time.time()))

    def attempt(i: int) -> bool:
        try:
            ledger.place_hold(acct, f"{tag}-{i}", AMOUNT, reference=f"race:{tag}")
            return True
        except InsufficientCredits:
            return False

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(attempt, range(int(attempts))))
    committer.close()
    app.close()
    print(json.dumps({"ok": sum(results), "refused": len(results) - sum(results)}))


if __name__ == "__main__":
    main()
