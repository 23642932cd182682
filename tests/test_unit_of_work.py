"""Group commit: batching, per-command outcomes, isolation of failures, conflict retry."""

from __future__ import annotations

import threading
import uuid

import pytest

from ledger.errors import InsufficientCredits
from ledger.service import Ledger, LedgerConfig, fund_in, open_account_in, place_hold_in
from store.clock import ManualClock
from store.factory import open_app
from store.unit_of_work import GroupCommitter, UnitOfWork

CONFIG = LedgerConfig(free_tier_grant_micro=0)


@pytest.fixture
def parts(store_config):
    app = open_app(store_config)
    committer = GroupCommitter(app, ManualClock(), max_batch=200, window_ms=5)
    yield app, committer
    committer.close()
    app.close()


def test_concurrent_commands_share_transactions_and_each_gets_its_own_outcome(parts):
    app, committer = parts
    ledger = Ledger(committer, CONFIG)
    acct = uuid.uuid4()
    ledger.open_account(acct, "a@x", kyc_verified=True, free_tier_grant=False, initial_grant_micro=5_000)
    futures = [committer.submit(lambda uow, i=i: place_hold_in(uow, CONFIG, acct, f"h{i}", 1_000, reference="r"))
               for i in range(8)]
    outcomes = []
    for f in futures:
        try:
            outcomes.append(f.result(10))
        except InsufficientCredits as exc:
            outcomes.append(exc)
    assert [o for o in outcomes if isinstance(o, str)] == ["h0", "h1", "h2", "h3", "h4"]
    assert all(isinstance(o, InsufficientCredits) for o in outcomes[5:])
    assert committer.stats.batches < committer.stats.commands  # batching happened
    assert ledger.balance(acct).spendable_micro == 0


def test_a_command_failing_after_mutation_does_not_fail_the_others(parts):
    app, committer = parts
    a, b = uuid.uuid4(), uuid.uuid4()

    def good(uow: UnitOfWork):
        open_account_in(uow, a, "a@x", kyc_verified=True)
        fund_in(uow, a, 10, code="grant", reference="r", reason="r", idem_key="k")
        return "ok"

    def bad(uow: UnitOfWork):
        open_account_in(uow, b, "b@x", kyc_verified=True)
        raise RuntimeError("boom after mutation")

    barrier = threading.Event()
    blocker = committer.submit(lambda uow: barrier.wait(5))  # hold the writer so both land in one batch
    f_bad = committer.submit(bad)
    f_good = committer.submit(good)
    barrier.set()
    blocker.result(10)
    assert f_good.result(10) == "ok"
    with pytest.raises(RuntimeError):
        f_bad.result(10)
    assert committer.query(lambda uow: uow.get_or_none(b)) is None
    assert committer.query(lambda uow: uow.get(a).spendable_micro) == 10


def test_conflicting_writers_in_two_committers_are_retried_not_lost(store_config):
    """Two committers (as two processes would) share one store; each caches the account."""
    app1, app2 = open_app(store_config), open_app(store_config)
    c1 = GroupCommitter(app1, ManualClock())
    c2 = GroupCommitter(app2, ManualClock())
    try:
        acct = uuid.uuid4()
        Ledger(c1, CONFIG).open_account(acct, "a@x", kyc_verified=True, free_tier_grant=False)
        c2.query(lambda uow: uow.get(acct))  # warm c2's cache
        for i in range(5):
            c1.execute(lambda uow, i=i: fund_in(uow, acct, 1, code="grant", reference="r", reason="r",
                                                 idem_key=f"c1-{i}"))
            c2.execute(lambda uow, i=i: fund_in(uow, acct, 100, code="grant", reference="r", reason="r",
                                                 idem_key=f"c2-{i}"))
        assert c2.stats.conflicts >= 1
        assert c1.query(lambda uow: uow.get(acct, fresh=True).spendable_micro) == 505
        assert c2.query(lambda uow: uow.get(acct, fresh=True).spendable_micro) == 505
    finally:
        c1.close(), c2.close(), app1.close(), app2.close()


def test_a_full_queue_refuses_with_overloaded_and_the_queued_commands_still_run(store_config):
    from store.unit_of_work import Overloaded

    app = open_app(store_config)
    committer = GroupCommitter(app, ManualClock(), max_batch=2, max_queue=4)
    try:
        barrier = threading.Event()
        started = threading.Event()
        blocker = committer.submit(lambda uow: (started.set(), barrier.wait(10)))
        assert started.wait(10)  # the writer is inside the blocker: the queue is empty now
        queued = [committer.submit(lambda uow, i=i: i) for i in range(4)]
        with pytest.raises(Overloaded, match="more than 4 commands waiting"):
            committer.submit(lambda uow: "refused")
        barrier.set()
        blocker.result(10)
        assert [f.result(10) for f in queued] == [0, 1, 2, 3]
        assert committer.submit(lambda uow: "after").result(10) == "after"  # room again
    finally:
        committer.close()
        app.close()
