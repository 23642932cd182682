"""The jobs read model: JobsView lists an account's Jobs newest first, each equal to the
aggregate's JobView; queue depth per Cargo; read-your-writes through wait_for."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from ledger.service import Ledger, LedgerConfig
from projections.jobs import as_jobview_kwargs
from projections.jobs_view import JobsView
from projections.service import Projections
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.service import JobView, Scheduler
from store.clock import ManualClock, SeededIds
from store.factory import StoreConfig, open_app
from store.unit_of_work import GroupCommitter

LEDGER = LedgerConfig(hold_ttl_ms=600_000)
SCHED = SchedulerConfig(ack_timeout_ms=10_000, lease_ms=60_000, lease_renew_ms=30_000, queue_timeout_ms=120_000,
                        max_attempts=3, heartbeat_interval_ms=10_000)
CAPS = {"cargos": ["llm-chat", "llm-chat-lite"], "models": ["mistral-7b-instruct", "tinyllama-1.1b-chat"],
        "vram_mb": 24_000, "ram_mb": 64_000, "slots": 2, "region": "eu", "hardware_tier": 2}


class World:
    """The real ledger + scheduler on a manual clock, inline group commit (tests only)."""

    def __init__(self, config: StoreConfig, *, seed: int = 1, islands: int = 1) -> None:
        self.config = config
        self.clock = ManualClock()
        self.app = open_app(config)
        self.committer = GroupCommitter(self.app, self.clock, inline=True)
        self.ledger = Ledger(self.committer, LEDGER)
        self.sched = Scheduler(self.committer, Catalog.load(), LEDGER, SCHED, self.clock, SeededIds(seed),
                               single_writer=not config.is_postgres)
        self.owner = uuid.UUID(int=seed * 1000 + 1)
        self.ledger.open_account(self.owner, "owner@x", kyc_verified=True)
        self.islands = [self.sched.register_island(self.owner, f"island-{i}", CAPS, approve=True).island_id
                        for i in range(islands)]
        self.sched.recover()
        for island in self.islands:
            self.sched.heartbeat(island)

    def account(self, email: str, credits: int = 100, kyc: bool = True) -> uuid.UUID:
        acct = uuid.uuid5(uuid.NAMESPACE_DNS, email)
        self.ledger.open_account(acct, email, kyc_verified=kyc, initial_grant_micro=credits * 1_000_000)
        return acct

    def submit(self, acct: uuid.UUID, prompt: str = "hello", max_tokens: int = 64) -> str:
        view = self.sched.submit(acct, "llm-chat", {"prompt": prompt, "max_tokens": max_tokens})
        self.clock.advance(5)
        self.sched.step()
        return view.id

    def assigned(self) -> list[tuple[str, str]]:
        return sorted((str(j.job_id), j.island_id) for j in self.sched.core.jobs.values() if j.status == "assigned")

    def run_assigned(self, output: str = "hi there", tokens: int = 20) -> int:
        done = 0
        for job_id, island in self.assigned():
            self.sched.accept(island, uuid.UUID(job_id))
            self.clock.advance(50)
            self.sched.complete(island, uuid.UUID(job_id), {"prompt_tokens": 5, "completion_tokens": tokens},
                                output, 400)
            self.clock.advance(5)
            done += 1
        self.sched.step()
        return done

    def close(self) -> None:
        self.sched.stop()
        self.committer.close()
        self.app.close()


@pytest.fixture
def world(store_config):
    w = World(store_config)
    yield w
    w.close()


def test_list_for_account_newest_first_equal_to_aggregate(world: World) -> None:
    alice, bob = world.account("alice@x"), world.account("bob@x")
    alice_jobs = [world.submit(alice, prompt=f"p{i}") for i in range(5)]
    bob_job = world.submit(bob)
    world.run_assigned(output="done")
    world.run_assigned(output="done too")
    world.sched.cancel(uuid.UUID(alice_jobs[-1]), account_id=alice, by="consumer")

    proj = Projections.open(world.app, world.config)
    try:
        proj.catch_up()
        view = JobsView(proj.read)
        rows = view.list_for_account(str(alice), limit=10, offset=0)
        assert [r["id"] for r in rows] == list(reversed(alice_jobs))
        for r in rows:
            assert JobView(**as_jobview_kwargs(r)) == world.sched.get_job(uuid.UUID(r["id"]))
        statuses = {r["status"] for r in rows}
        assert "completed" in statuses and "cancelled" in statuses
        # paging
        assert [r["id"] for r in view.list_for_account(str(alice), 2, 1)] == list(reversed(alice_jobs))[1:3]
        assert view.count_for_account(str(alice)) == 5
        # isolation
        assert [r["id"] for r in view.list_for_account(str(bob), 10, 0)] == [bob_job]
        assert view.get(alice_jobs[0], account_id=str(bob)) is None
        assert view.get(alice_jobs[0], account_id=str(alice))["id"] == alice_jobs[0]
        completed = [r for r in rows if r["status"] == "completed"]
        assert all(r["started_at"] <= r["completed_at"] and r["output"].startswith("done") for r in completed)
        assert all(r["usage"]["completion_tokens"] == 20 and r["charged_micro"] > 0 for r in completed)
        # queue depth: nothing waiting or running, lifetime counts add up
        depth = proj.read.queue_depths()["llm-chat"]
        assert depth["submitted"] == 6
        assert depth["queued"] + depth["assigned"] + depth["running"] + depth["pending"] + depth["completed"] + \
            depth["cancelled"] + depth["failed"] + depth["timeout"] == 6
        truth = [world.sched.get_job(uuid.UUID(j)).status for j in [*alice_jobs, bob_job]]
        for status in ("queued", "assigned", "running", "completed", "cancelled"):
            assert depth[status] == truth.count(status), status
    finally:
        proj.close()


def test_read_your_writes_with_background_runner(world: World) -> None:
    alice = world.account("alice@x")
    proj = Projections.open(world.app, world.config, poll_interval_s=1.0)  # only the commit listener wakes it fast
    positions: list[int] = []
    world.committer.add_listener(lambda recs: positions.append(recs[-1].notification.id) if recs else None)
    proj.attach(world.committer)
    proj.start()
    try:
        for i in range(5):
            job_id = world.submit(alice, prompt=f"p{i}")
            assert proj.read.wait_for(positions[-1], timeout_s=5.0)
            rows = proj.jobs.list_for_account(str(alice), 1, 0)
            assert rows and rows[0]["id"] == job_id
        assert proj.read.position() >= positions[-1]
        assert not proj.read.wait_for(positions[-1] + 1000, timeout_s=0.05)  # bounded
    finally:
        proj.close()


def test_open_from_config_only(world: World) -> None:
    """JobsView.open(config): a reader process without a runner sees what a runner wrote."""
    alice = world.account("alice@x")
    job_id = world.submit(alice)
    proj = Projections.open(world.app, world.config)
    proj.catch_up()
    view = JobsView.open(world.config)
    try:
        assert [r["id"] for r in view.list_for_account(str(alice), 5, 0)] == [job_id]
    finally:
        view._rm.close()
        proj.close()


def test_bounded_output(tmp_path: Path) -> None:
    from projections.jobs import OUTPUT_MAX_CHARS

    w = World(StoreConfig(database_url=None, data_dir=tmp_path / "d"))
    try:
        alice = w.account("alice@x")
        w.submit(alice, max_tokens=4096)
        w.run_assigned(output="x" * (OUTPUT_MAX_CHARS + 10), tokens=30)
        proj = Projections.open(w.app, w.config)
        proj.catch_up()
        (row,) = proj.jobs.list_for_account(str(alice), 5, 0)
        assert len(row["output"]) == OUTPUT_MAX_CHARS and row["output_truncated"]
        proj.close()
    finally:
        w.close()
