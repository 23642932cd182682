"""The ledger read model against the log: point-in-time balances at every position,
statement lines that sum to the balance, platform totals, holds, trial balance."""

from __future__ import annotations

import uuid

from ledger import audit, names
from projections.service import Projections
from projections.sql import Database
from scheduler.admission import AdmissionRefused
from store.factory import iter_log
from tests.test_projections_jobs import World


def test_ledger_views_match_the_fold_at_every_position(store_config):
    world = World(store_config, islands=2)
    try:
        a = world.account("a@x", 50)
        free = world.account("free@x", 0, kyc=False)
        jobs = [world.submit(a), world.submit(free), world.submit(a)]
        world.run_assigned(tokens=40)
        world.sched.cancel(uuid.UUID(jobs[-1]), account_id=None, by="consumer")
        world.ledger.fund(a, 3_000_000, code=names.REFUND, reference="ticket:1", reason="sorry", idem_key="r1")
        world.ledger.debit(a, 1_000_000, reference="ticket:2", reason="correction", idem_key="d1")
        try:
            world.submit(free)
        except AdmissionRefused:
            pass  # the free tier is used up: a refusal writes nothing
        world.run_assigned(tokens=5)

        proj = Projections(world.app, Database(store_config))
        proj.catch_up()
        read = proj.read
        log = list(iter_log(world.app, topics=audit.LEDGER_TOPICS))
        accounts = [a, free, world.owner]
        for position in sorted({p for p, _ in log}):
            f = audit.fold(iter(log), check=False, upto_position=position)
            for acct in accounts:
                at = read.balance_at(str(acct), position=position)
                if str(acct) not in f.accounts:
                    assert at is None
                    continue
                assert (at["spendable_micro"], at["held_micro"], at["earned_micro"]) == (
                    f.balances.get(names.spendable(acct), 0), f.balances.get(names.held(acct), 0),
                    f.balances.get(names.earnings(acct), 0)), (position, acct)

        full = audit.fold(iter(log), check=True)
        assert not full.violations
        for acct in accounts:
            for ledger_account in (names.spendable(acct), names.held(acct), names.earnings(acct)):
                lines = read.statement(ledger_account=ledger_account)
                assert sum(ln["amount_micro"] for ln in lines) == full.balances.get(ledger_account, 0)
                running = 0
                for ln in lines:
                    running += ln["amount_micro"]
                    assert ln["balance_after_micro"] == running
                expected = audit.statement(iter(log), ledger_account)
                assert [(ln["position"], ln["code"], ln["counterparty"], ln["reference"], ln["amount_micro"],
                         ln["balance_after_micro"]) for ln in lines] == \
                    [(x.position, x.code, x.counterparty, x.reference, x.amount_micro, x.balance_after_micro)
                     for x in expected]

        totals = read.platform_totals()
        b = full.balances
        assert totals["revenue_micro"] == b[names.PLATFORM_FEES]
        assert totals["earnings_owed_micro"] == sum(v for k, v in b.items() if k.startswith("earnings:"))
        assert totals["held_micro"] == sum(v for k, v in b.items() if k.startswith("held:"))
        assert totals["spendable_micro"] == sum(v for k, v in b.items() if k.startswith("spendable:"))
        assert totals["free_tier_granted_micro"] == -b[names.PLATFORM_FREE_TIER]
        assert totals["grants_micro"] == -b[names.PLATFORM_GRANTS]
        assert totals["refunds_micro"] == 3_000_000 and totals["adjustments_out_micro"] == 1_000_000
        assert totals["gross_settled_micro"] == totals["fees_micro"] + totals["earnings_micro"]
        free_view = read.balance(str(free))
        agg = world.ledger.balance(free)
        assert free_view["free_tier_spent_micro"] + free_view["free_tier_held_micro"] == agg.free_tier_used_micro
        assert totals["free_tier_spent_micro"] == free_view["free_tier_spent_micro"] > 0
        assert sum(r["balance_micro"] for r in read.trial_balance()) == 0
        holds = read.holds(str(a))
        assert {h["state"] for h in holds} <= {"posted", "released", "open"}
        assert len(holds) == 2 and all(h["reference"].startswith("job:") for h in holds)
        islands = read.island_stats(now_ms=world.clock.now_ms())
        assert sum(i["jobs_ok"] for i in islands) == sum(1 for _ in read.list_jobs(str(a)) if _["status"] ==
                                                         "completed") + sum(
            1 for j in read.list_jobs(str(free)) if j["status"] == "completed")
        for i in islands:
            hist = read.karma_history(i["island_id"])
            start = 50_000  # decision 0051: a new Island starts at 50 on the 0..100 scale
            assert (hist[0]["karma_after_milli"] if hist else start) == i["karma_milli"]
            assert start + sum(h["delta_milli"] for h in hist) == i["karma_milli"]
        proj.close()
    finally:
        world.close()
