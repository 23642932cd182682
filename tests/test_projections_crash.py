"""A crash between the event write and the projection update loses nothing and counts
nothing twice after a restart: the view rows and the tracking position commit in one
transaction, so a page is either wholly applied or not at all."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from projections.rebuild import rebuild, verify
from projections.runner import InjectedFault, ProjectionRunner
from projections.service import Projections
from projections.sql import Database
from store.factory import max_position
from tests.test_projections_jobs import World
from tests.test_projections_rebuild import dump

ROOT = Path(__file__).resolve().parent.parent


def workload(world: World, n: int = 6) -> uuid.UUID:
    acct = world.account(f"a{uuid.uuid4().hex[:6]}@x", 100)
    for i in range(n):
        world.submit(acct, prompt=f"p{i}")
        if i % 2:
            world.run_assigned()
    return acct


def expected_tables(world: World, config) -> dict:
    """The truth: a clean rebuild from the log, in scratch tables of its own runner."""
    db = Database(config)
    runner = ProjectionRunner(world.app, db, suffix="__truth", track=False, page_size=10_000)
    try:
        runner.create_tables(drop=True)
        runner.catch_up()
        return dump(runner.conn, "__truth")
    finally:
        for ts in runner.work.tables.values():
            runner.conn.execute(f"DROP TABLE IF EXISTS {ts.physical}")
        runner.close()
        db.close()


def test_fault_after_view_update_before_commit(store_config):
    world = World(store_config)
    try:
        acct = workload(world)
        db = Database(store_config)
        runner = ProjectionRunner(world.app, db, page_size=7, max_page_size=7)
        runner.setup()
        runner.catch_up(stop=max_position(world.app) // 2)
        half = runner.position
        calls = []

        def fault(stage: str) -> None:
            calls.append(stage)
            raise InjectedFault(stage)

        runner.fault = fault
        with pytest.raises(InjectedFault):
            runner.step()  # rows written inside the transaction, then the "crash"
        assert calls == ["after_flush"]
        assert runner.position == half  # nothing committed
        # a second process sees the views exactly as before the failed page
        other = Projections(world.app, db, setup=False)
        assert other.read.position() == half
        other.read.close()
        # the same runner recovers (it forgot its cache, reloaded its position) ...
        runner.fault = None
        runner.catch_up()
        assert dump(runner.conn) == expected_tables(world, store_config)
        # ... and a restarted one carries on from the committed position
        runner.close()
        workload(world, 3)
        restarted = ProjectionRunner(world.app, db)
        restarted.setup()
        assert restarted.position == runner.position
        restarted.catch_up()
        assert dump(restarted.conn) == expected_tables(world, store_config)
        proj = Projections(world.app, db, setup=False)
        lines = proj.read.statement(str(acct))
        assert sum(ln["amount_micro"] for ln in lines) == world.ledger.balance(acct).spendable_micro
        assert proj.read.queue_depths()["llm-chat"]["submitted"] == 9
        proj.read.close()
        restarted.close()
    finally:
        world.close()


CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from projections.runner import ProjectionRunner
    from projections.sql import Database
    from store.factory import StoreConfig, open_app
    config = StoreConfig(database_url={url!r}, data_dir=Path({data_dir!r}), schema={schema!r})
    app = open_app(config)
    runner = ProjectionRunner(app, Database(config), page_size=int(sys.argv[1]), max_page_size=int(sys.argv[1]))
    runner.setup()
    runner.step()  # one clean page
    def die(stage):
        os._exit(17)  # a hard crash inside the open transaction: no rollback, no cleanup
    runner.fault = die
    runner.step()
    os._exit(0)
""")


def test_hard_crash_inside_projection_transaction(store_config):
    world = World(store_config)
    try:
        workload(world, 8)
        code = CHILD.format(root=str(ROOT), url=store_config.database_url, data_dir=str(store_config.data_dir),
                            schema=store_config.schema)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
        proc = subprocess.run([sys.executable, "-c", code, "9"], env=env, capture_output=True, timeout=120)
        assert proc.returncode == 17, proc.stderr.decode()[-2000:]
        db = Database(store_config)
        runner = ProjectionRunner(world.app, db)
        runner.setup()
        assert runner.position == 9  # the first page only
        runner.catch_up()
        assert dump(runner.conn) == expected_tables(world, store_config)
        assert verify(world.app, db).ok
        runner.close()
    finally:
        world.close()


def test_events_written_while_no_runner_is_alive(store_config):
    """The coordinator commits events and dies before its runner caught up: the next
    start catches up from the tracked position."""
    world = World(store_config)
    try:
        workload(world, 2)
        proj = Projections(world.app, Database(store_config))
        proj.attach(world.committer)
        proj.start()
        assert proj.read.wait_for(max_position(world.app), 5.0)
        proj.close()  # the process "dies"; events keep coming from elsewhere
        workload(world, 5)
        proj = Projections(world.app, Database(store_config))
        assert proj.read.position() < max_position(world.app)
        proj.start()
        assert proj.read.wait_for(max_position(world.app), 5.0)
        assert dump(proj.runner.conn) == expected_tables(world, store_config)
        proj.close()
    finally:
        world.close()


def test_crash_during_rebuild_leaves_live_tables(store_config):
    world = World(store_config)
    try:
        workload(world, 4)
        db = Database(store_config)
        proj = Projections(world.app, db)
        proj.catch_up()
        before = dump(proj.runner.conn)
        status = proj.read.status()

        def fault(stage: str) -> None:
            raise InjectedFault(stage)

        with pytest.raises(InjectedFault):
            rebuild(world.app, db, fault=fault)
        assert dump(proj.runner.conn) == before
        assert proj.read.status() == status
        assert not proj.runner.conn.table_exists("proj_jobs__rebuild")
        rebuild(world.app, db)
        assert dump(proj.runner.conn) == before
        proj.close()
    finally:
        world.close()


def test_two_runners_never_double_count(store_config):
    """Two runners (two coordinator processes) on one database: each page is applied once."""
    world = World(store_config)
    try:
        db = Database(store_config)
        a = ProjectionRunner(world.app, db, page_size=4, max_page_size=4)
        b = ProjectionRunner(world.app, db, page_size=5, max_page_size=5)
        a.setup()
        b.setup()
        for _ in range(4):
            workload(world, 3)
            a.step()
            b.step()
            b.step()
            a.step()
        a.catch_up()
        b.catch_up()
        assert a.resets + b.resets > 0
        assert dump(a.conn) == expected_tables(world, store_config)
        a.close()
        b.close()
    finally:
        world.close()
