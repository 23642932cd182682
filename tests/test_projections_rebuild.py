"""Rebuild equals live after a random workload (hypothesis), on SQLite and PostgreSQL.

The workload goes through the real Ledger / Scheduler facade (admission, holds, dispatch,
acceptance, completion with settlement and karma, failures, cancellations, timeouts,
grants, Islands going silent). Meanwhile a live runner applies the log in small pages at
random moments (so pages split transactions and Jobs in every way). At the end:
- `verify` (replay into scratch tables, compare row by row) finds no difference;
- `rebuild` swaps in tables identical, row for row, to the live ones;
- the views agree with the aggregates and with the audit fold of the log.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import audit, names
from projections.rebuild import rebuild, verify
from projections.catalog import all_projections
from projections.runner import ProjectionRunner
from projections.service import Projections
from projections.sql import Database
from scheduler.admission import AdmissionRefused
from scheduler.commands import NotYourJob
from scheduler.jobs import IllegalTransition
from store.factory import StoreConfig, iter_log
from tests.conftest import PG_URL, drop_schema, require_postgres
from tests.test_projections_jobs import World

RACES = (IllegalTransition, NotYourJob, AdmissionRefused)

op = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 2), st.sampled_from(["llm-chat", "llm-chat", "llm-chat-lite", "sdxl"]),
              st.integers(1, 2048)),
    st.tuples(st.just("step")),
    st.tuples(st.just("answer"), st.integers(0, 50), st.sampled_from(["accept", "accept", "accept", "reject"])),
    st.tuples(st.just("finish"), st.integers(0, 50),
              st.sampled_from(["complete", "complete", "complete", "fail", "retry", "cancel"])),
    st.tuples(st.just("flow"), st.integers(0, 2)),
    st.tuples(st.just("advance"), st.sampled_from([1_000, 15_000, 70_000, 130_000])),
    st.tuples(st.just("grant"), st.integers(0, 2), st.integers(1, 50)),
    st.tuples(st.just("project"), st.integers(1, 7)),
    st.tuples(st.just("cancel"), st.integers(0, 100)),
)
ops_strategy = st.lists(op, min_size=20, max_size=150)


def dump(conn, suffix: str = "") -> dict[str, list[tuple]]:
    out = {}
    for p in all_projections():
        for t in p.tables:
            out[t.name] = conn.query(f"SELECT {', '.join(t.column_names)} FROM {t.name}{suffix} "
                                     f"ORDER BY {', '.join(t.key)}")
    return out


def run_workload(world: World, ops: list[tuple], runner: ProjectionRunner) -> list[uuid.UUID]:
    accounts = [world.account("kyc@x", 200), world.account("free@x", 0, kyc=False), world.account("poor@x", 1)]
    sched = world.sched
    jobs: list[uuid.UUID] = []
    for o in ops:
        kind = o[0]
        try:
            if kind == "submit":
                _, who, cargo, max_tokens = o
                payload = ({"prompt": "draw", "width": 512, "height": 512, "steps": 20} if cargo == "sdxl"
                           else {"prompt": "hello", "max_tokens": max_tokens})
                jobs.append(uuid.UUID(sched.submit(accounts[who], cargo, payload).id))
                sched.step()
            elif kind == "step":
                sched.step()
            elif kind == "answer":
                offers = world.assigned()
                if offers:
                    job_id, island = offers[o[1] % len(offers)]
                    (sched.accept if o[2] == "accept" else sched.reject)(island, uuid.UUID(job_id))
            elif kind == "finish":
                running = sorted((str(j.job_id), j.island_id) for j in sched.core.jobs.values()
                                 if j.status == "running")
                if running:
                    job_id, island = running[o[1] % len(running)]
                    jid = uuid.UUID(job_id)
                    if o[2] == "complete":
                        sched.complete(island, jid, {"prompt_tokens": 7, "completion_tokens": 11 + o[1]},
                                       f"out {o[1]}", 300 + o[1])
                    elif o[2] == "fail":
                        sched.fail(island, jid, "boom")
                    elif o[2] == "retry":
                        sched.fail(island, jid, "flaky", retryable=True)
                    else:
                        sched.cancel(jid, account_id=None, by="operator")
            elif kind == "advance":
                world.clock.advance(o[1])
                if o[1] < 60_000:
                    for island in world.islands:
                        sched.heartbeat(island)
                sched.step()
            elif kind == "flow":  # a whole happy path: submit, dispatch, accept, complete
                jobs.append(uuid.UUID(sched.submit(accounts[o[1]], "llm-chat", {"prompt": "hi", "max_tokens": 64}).id))
                sched.step()
                world.run_assigned()
            elif kind == "cancel":
                if jobs:
                    sched.cancel(jobs[o[1] % len(jobs)], account_id=None, by="consumer")
            elif kind == "grant":
                world.ledger.fund(accounts[o[1]], o[2] * 1_000_000, code=names.GRANT, reference="op",
                                  reason="test", idem_key=f"g{uuid.uuid4()}")
            elif kind == "project":
                runner.page_size = runner.max_page_size = o[1]
                runner.step()
        except RACES:
            pass
    return accounts


def check_world(config: StoreConfig, ops: list[tuple]) -> None:
    world = World(config, islands=2)
    db = Database(config)
    runner = ProjectionRunner(world.app, db, page_size=3, max_page_size=3)
    try:
        runner.setup()
        accounts = run_workload(world, ops, runner)
        runner.page_size = runner.max_page_size = 50
        runner.catch_up()
        conn = runner.conn
        live = dump(conn)

        # verify: replay into scratch, compare with live
        result = verify(world.app, db)
        assert result.ok, result.difference.describe()

        # the views agree with the aggregates and the audit fold
        proj = Projections(world.app, db)
        read = proj.read
        fold = audit.fold(iter_log(world.app, topics=audit.LEDGER_TOPICS), check=False)
        for acct in [*accounts, world.owner]:
            agg = world.ledger.balance(acct)
            view = read.balance(str(acct))
            assert (view["spendable_micro"], view["held_micro"], view["spent_micro"]) == \
                (agg.spendable_micro, agg.held_micro, agg.spent_micro)
            assert view["earned_micro"] == fold.balances.get(names.earnings(acct), 0)
            lines = read.statement(str(acct))
            assert sum(ln["amount_micro"] for ln in lines) == agg.spendable_micro
            assert (lines[-1]["balance_after_micro"] if lines else 0) == agg.spendable_micro
        trial = read.trial_balance()
        assert sum(r["balance_micro"] for r in trial) == 0
        assert {r["ledger_account"]: r["balance_micro"] for r in trial if r["balance_micro"]} == \
            {k: v for k, v in fold.balances.items() if v}
        for job in read.list_jobs(str(accounts[0]), limit=1000):
            agg = world.sched.get_job(uuid.UUID(job["id"]))
            assert (job["status"], job["charged_micro"], job["attempts"]) == (agg.status, agg.charged_micro,
                                                                             agg.attempts)
        proj.runner.close()

        # rebuild: the swapped-in tables equal the live ones row for row
        rebuild(world.app, db)
        assert dump(conn) == live
    finally:
        runner.close()
        db.close()
        world.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=ops_strategy)
def test_rebuild_equals_live_sqlite(ops):
    with tempfile.TemporaryDirectory() as tmp:
        check_world(StoreConfig(database_url=None, data_dir=Path(tmp) / "d"), ops)


@pytest.mark.postgres
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=ops_strategy)
def test_rebuild_equals_live_postgres(ops):
    require_postgres()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        check_world(StoreConfig(database_url=PG_URL, data_dir=Path("."), schema=schema), ops)
    finally:
        drop_schema(schema)


def test_verify_names_first_differing_row(store_config):
    world = World(store_config)
    try:
        acct = world.account("a@x", 50)
        world.submit(acct)
        world.run_assigned()
        proj = Projections(world.app, Database(store_config))
        proj.catch_up()
        assert verify(world.app, proj.db).ok
        conn = proj.runner.conn
        conn.execute("UPDATE proj_accounts SET spendable_micro = spendable_micro + 1 WHERE account_id = ?",
                     (str(acct),))
        result = verify(world.app, proj.db, ["ledger"])
        assert not result.ok
        d = result.difference
        assert (d.table, d.key, d.column) == ("proj_accounts", (str(acct),), "spendable_micro")
        assert d.live == d.rebuilt + 1
        assert "proj_accounts" in d.describe() and str(acct) in d.describe()
        conn.execute("DELETE FROM proj_ledger_entries WHERE position = (SELECT max(position) FROM "
                     "proj_ledger_entries)")
        result = verify(world.app, proj.db, ["ledger"])
        assert not result.ok and result.difference.table in ("proj_accounts", "proj_ledger_entries")
        # rebuild repairs it
        rebuild(world.app, proj.db, ["ledger"])
        assert verify(world.app, proj.db).ok
        proj.close()
    finally:
        world.close()


def test_live_runner_follows_a_rebuild(store_config):
    """A live runner whose tables are swapped under it notices, reloads, and carries on."""
    world = World(store_config)
    try:
        acct = world.account("a@x", 50)
        proj = Projections(world.app, Database(store_config))
        proj.catch_up()
        gen0 = {r["name"]: r["generation"] for r in proj.read.status()}
        world.submit(acct)
        rebuild(world.app, proj.db)  # another process, in effect
        world.submit(acct)
        world.run_assigned()
        proj.catch_up()
        assert {r["name"]: r["generation"] for r in proj.read.status()} == {k: v + 1 for k, v in gen0.items()}
        assert proj.jobs.count_for_account(str(acct)) == 2
        assert verify(world.app, proj.db).ok
        proj.close()
    finally:
        world.close()


def test_rebuild_twice_and_single_projection(store_config):
    world = World(store_config)
    try:
        acct = world.account("a@x", 50)
        for _ in range(3):
            world.submit(acct)
        world.run_assigned()
        proj = Projections(world.app, Database(store_config))
        proj.catch_up()
        before = dump(proj.runner.conn)
        for names_ in (None, ["jobs"], ["islands"], ["ledger"], None):
            rebuild(world.app, proj.db, names_)
            assert dump(proj.runner.conn) == before
        with pytest.raises(KeyError):
            rebuild(world.app, proj.db, ["nope"])
        proj.close()
    finally:
        world.close()


def test_parallel_rebuild_equals_single(pg_store_config):
    world = World(pg_store_config)
    try:
        acct = world.account("a@x", 500)
        for _ in range(8):
            world.submit(acct)
            world.run_assigned()
        proj = Projections(world.app, Database(pg_store_config))
        proj.catch_up()
        before = dump(proj.runner.conn)
        rebuild(world.app, proj.db, parallel=True)
        assert dump(proj.runner.conn) == before
        rebuild(world.app, proj.db, parallel=False)
        assert dump(proj.runner.conn) == before
        proj.close()
    finally:
        world.close()


def test_version_change_triggers_rebuild(store_config, monkeypatch):
    from projections.jobs import JobsProjection

    world = World(store_config)
    try:
        acct = world.account("a@x", 50)
        world.submit(acct)
        proj = Projections(world.app, Database(store_config))
        proj.catch_up()
        proj.close()
        bumped = JobsProjection.version + 1
        monkeypatch.setattr(JobsProjection, "version", bumped)
        proj = Projections(world.app, Database(store_config))
        assert proj.runner.needs_rebuild == ["jobs"]
        proj.catch_up()
        status = {r["name"]: r for r in proj.read.status()}
        assert status["jobs"]["version"] == bumped and status["jobs"]["generation"] == 1
        assert proj.jobs.count_for_account(str(acct)) == 1
        proj.close()
    finally:
        world.close()

