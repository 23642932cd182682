"""The Job lifecycle under random Island failures, missed acks, lapsed leases, cancels,
timeouts and submits: every Job ends terminal or queued, every hold resolves once, the
ledger verifies, no Job is held by two Islands, no KYC or free-tier rule is ever broken."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ledger import audit
from ledger.service import Ledger, LedgerConfig
from scheduler.admission import AdmissionRefused
from scheduler.catalog import Catalog
from scheduler.commands import NotYourJob
from scheduler.config import SchedulerConfig
from scheduler.jobs import ASSIGNED, QUEUED, RUNNING, TERMINAL, IllegalTransition
from scheduler.service import Scheduler
from store.clock import ManualClock, SeededIds
from store.factory import MEMORY_URL, StoreConfig, iter_log, open_app
from store.unit_of_work import GroupCommitter
from tests.conftest import drop_schema, make_store

LEDGER = LedgerConfig(free_tier_limit_micro=5_000_000, free_tier_grant_micro=5_000_000, hold_ttl_ms=600_000,
                      expiry_grace_ms=0)
SCHED = SchedulerConfig(ack_timeout_ms=10_000, lease_ms=60_000, lease_renew_ms=30_000, queue_timeout_ms=120_000,
                        max_attempts=3, heartbeat_interval_ms=10_000)
CATALOG = Catalog.load()
CHAT_CAPS = {"cargos": ["llm-chat", "llm-chat-lite"], "models": ["mistral-7b-instruct", "tinyllama-1.1b-chat"],
             "vram_mb": 24_000, "ram_mb": 64_000, "slots": 2, "region": "eu", "hardware_tier": 2}
IMAGE_CAPS = {"cargos": ["sdxl"], "models": ["sdxl-base-1.0"], "vram_mb": 24_000, "ram_mb": 64_000, "slots": 1,
              "region": "us", "hardware_tier": 3}
RACES = (IllegalTransition, NotYourJob)


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.store = self.fresh()
        self.app = open_app(self.store)
        self.committer = GroupCommitter(self.app, self.clock, inline=True)
        self.ledger = Ledger(self.committer, LEDGER)
        self.sched = Scheduler(self.committer, CATALOG, LEDGER, SCHED, self.clock, SeededIds(7),
                               single_writer=not self.store.is_postgres)
        self.kyc_acct, self.free_acct, self.owner = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        self.ledger.open_account(self.kyc_acct, "kyc@x", kyc_verified=True, initial_grant_micro=500_000_000)
        self.ledger.open_account(self.free_acct, "free@x", kyc_verified=False)
        self.ledger.open_account(self.owner, "owner@x", kyc_verified=True)
        self.islands: list[str] = []
        self.silent: set[str] = set()
        self.jobs: dict[str, str] = {}  # job id -> account kind
        self.image_jobs_of_free = 0

    @classmethod
    def fresh(cls) -> StoreConfig:
        base: StoreConfig = cls.base_store  # type: ignore[attr-defined]
        if base.is_postgres:
            return dataclasses.replace(base, schema=f"t_{uuid.uuid4().hex[:12]}")
        if base.is_memory:
            return base
        return dataclasses.replace(base, data_dir=base.data_dir / uuid.uuid4().hex[:8])

    def teardown(self) -> None:
        try:
            # Let every timer fire with silent Islands: every Job must end terminal.
            for _ in range(2 * SCHED.max_attempts + 4):
                self.clock.advance(SCHED.queue_timeout_ms)
                self.sched.step()
            for job_id in self.jobs:
                view = self.sched.get_job(uuid.UUID(job_id))
                assert view.status in TERMINAL, (job_id, view.status)
            f = audit.fold(iter_log(self.app, topics=audit.LEDGER_TOPICS))
            f.finish(self.clock.now_ms(), 0)
            assert not f.violations, f.violations[:3]
            assert f.summary()["open_holds"] == 0
            assert f.summary()["sum_micro"] == 0
        finally:
            self.committer.close()
            self.app.close()
            if self.store.schema:
                drop_schema(self.store.schema)

    def _step(self) -> None:
        self.sched.step()

    @initialize(n_chat=st.integers(1, 3), image=st.booleans())
    def islands_join(self, n_chat, image):
        for i in range(n_chat + int(image)):
            caps = IMAGE_CAPS if (image and i == n_chat) else CHAT_CAPS
            cred = self.sched.register_island(self.owner, f"island-{i}", caps, approve=True)
            self.islands.append(cred.island_id)
        self.sched.recover()
        for island in self.islands:
            self.sched.heartbeat(island, slots_total=None)

    @rule(who=st.sampled_from(["kyc", "free"]), cargo=st.sampled_from(["llm-chat", "llm-chat-lite", "sdxl"]),
          max_tokens=st.integers(1, 4096))
    def submit(self, who, cargo, max_tokens):
        acct = self.kyc_acct if who == "kyc" else self.free_acct
        payload = ({"prompt": "draw a cat", "width": 1024, "height": 1024, "steps": 30, "guidance_scale": 7.0}
                   if cargo == "sdxl" else {"prompt": "hello there", "max_tokens": max_tokens})
        try:
            view = self.sched.submit(acct, cargo, payload)
        except AdmissionRefused as refusal:
            if who == "free" and cargo == "sdxl":
                assert refusal.reason == "kyc_required"
            assert refusal.reason in ("kyc_required", "free_tier_exhausted", "insufficient_credits")
            return
        assert view.status == QUEUED
        self.jobs[view.id] = who
        if who == "free" and cargo == "sdxl":
            self.image_jobs_of_free += 1
        self._step()  # the dispatcher runs continuously in the server

    @rule()
    def dispatch(self):
        self._step()

    def _in(self, status: str) -> list[tuple[str, str]]:
        return sorted((str(j.job_id), j.island_id) for j in self.sched.core.jobs.values() if j.status == status)

    @precondition(lambda self: self._in(ASSIGNED))
    @rule(data=st.data(), accept=st.booleans())
    def island_answers_offer(self, data, accept):
        job_id, island = data.draw(st.sampled_from(self._in(ASSIGNED)))
        try:
            if accept:
                self.sched.accept(island, uuid.UUID(job_id))
            else:
                self.sched.reject(island, uuid.UUID(job_id))
        except RACES:
            pass
        self._step()

    @precondition(lambda self: self._in(ASSIGNED))
    @rule()
    def healthy_islands_accept_every_offer(self):
        for job_id, island in self._in(ASSIGNED):
            if island not in self.silent:
                self.sched.accept(island, uuid.UUID(job_id))
        self._step()

    @precondition(lambda self: self._in(RUNNING))
    @rule(data=st.data(), tokens=st.integers(1, 50))
    def island_streams(self, data, tokens):
        job_id, island = data.draw(st.sampled_from(self._in(RUNNING)))
        self.sched.output(island, uuid.UUID(job_id), tokens)
        self.sched.renew_lease(island, uuid.UUID(job_id))

    @precondition(lambda self: self._in(RUNNING))
    @rule(data=st.data(), completion=st.integers(0, 5000), prompt=st.integers(0, 3000))
    def island_completes(self, data, completion, prompt):
        job_id, island = data.draw(st.sampled_from(self._in(RUNNING)))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "steps": 30}
        view = self.sched.complete(island, uuid.UUID(job_id), usage, "output", 1_000 + completion)
        assert view.status == "completed"
        assert 0 <= view.charged_micro <= view.hold_micro
        self._step()

    @precondition(lambda self: self._in(RUNNING) or self._in(ASSIGNED))
    @rule(data=st.data(), retryable=st.booleans())
    def island_fails(self, data, retryable):
        job_id, island = data.draw(st.sampled_from(self._in(RUNNING) + self._in(ASSIGNED)))
        view = self.sched.fail(island, uuid.UUID(job_id), "out of memory", retryable=retryable)
        assert view.status in (QUEUED, "failed")
        self._step()

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def consumer_cancels(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.jobs)))
        acct = self.kyc_acct if self.jobs[job_id] == "kyc" else self.free_acct
        view = self.sched.cancel(uuid.UUID(job_id), account_id=acct, by="consumer")
        again = self.sched.cancel(uuid.UUID(job_id), account_id=acct, by="consumer")
        assert view.status in TERMINAL and again.status == view.status  # idempotent
        self._step()

    @precondition(lambda self: self.islands)
    @rule(data=st.data())
    def island_goes_silent(self, data):
        self.silent.add(data.draw(st.sampled_from(self.islands)))

    @rule(ms=st.sampled_from([1_000, 2_000, 5_000, 11_000, 31_000, 61_000, 130_000]), work=st.booleans())
    def time_passes(self, ms, work):
        """Time passes; healthy Islands heartbeat and, if `work`, take and finish Jobs."""
        step = min(ms, 5_000)
        moved = 0
        while moved < ms:
            self.clock.advance(step)
            moved += step
            for island in self.islands:
                if island not in self.silent:
                    self.sched.heartbeat(island)
            if work:
                for job_id, island in self._in(RUNNING):
                    if island not in self.silent:
                        usage = {"prompt_tokens": 20, "completion_tokens": 40, "steps": 30}
                        self.sched.complete(island, uuid.UUID(job_id), usage, "done", step)
                for job_id, island in self._in(ASSIGNED):
                    if island not in self.silent:
                        self.sched.accept(island, uuid.UUID(job_id))
            self._step()

    @invariant()
    def no_job_on_two_islands(self):
        holders: dict[uuid.UUID, str] = {}
        for rec in self.sched.core.registry.islands.values():
            for job_id in rec.active:
                assert job_id not in holders, f"job {job_id} held by {holders[job_id]} and {rec.island_id}"
                holders[job_id] = rec.island_id
        for live in self.sched.core.jobs.values():
            if live.status in (ASSIGNED, RUNNING):
                assert holders.get(live.job_id) == live.island_id

    @invariant()
    def free_tier_never_exceeded(self):
        bal = self.ledger.balance(self.free_acct)
        assert bal.free_tier_used_micro <= LEDGER.free_tier_limit_micro
        assert bal.spendable_micro >= 0
        assert self.image_jobs_of_free == 0


def _run(kind: str, tmp_path, examples: int, steps: int) -> None:
    Lifecycle.base_store = (StoreConfig(database_url=MEMORY_URL, data_dir=tmp_path) if kind == "memory"
                            else make_store(kind, tmp_path))  # type: ignore[attr-defined]
    test = Lifecycle.TestCase
    test.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                             suppress_health_check=list(HealthCheck))
    test().runTest()


def test_lifecycle_state_machine_memory(tmp_path):
    _run("memory", tmp_path, examples=150, steps=50)


def test_lifecycle_state_machine_sqlite(tmp_path):
    _run("sqlite", tmp_path, examples=15, steps=30)


@pytest.mark.postgres
def test_lifecycle_state_machine_postgres(tmp_path):
    _run("postgres", tmp_path, examples=15, steps=30)


def test_non_kyc_account_racing_small_jobs_never_exceeds_its_allowance(store_config):
    """Many threads submit small chat Jobs for one non-KYC account at once (group commit
    batches them): the free-tier allowance holds, counting holds."""
    clock = ManualClock()
    app = open_app(store_config)
    committer = GroupCommitter(app, clock, max_batch=64, window_ms=2)
    ledger = Ledger(committer, LEDGER)
    sched = Scheduler(committer, CATALOG, LEDGER, SCHED, clock, SeededIds(3))
    acct = uuid.uuid4()
    ledger.open_account(acct, "racer@x", kyc_verified=False, initial_grant_micro=100_000_000)
    admitted, refused = [], []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        try:
            view = sched.submit(acct, "llm-chat-lite", {"prompt": f"hi {i}", "max_tokens": 200})
            with lock:
                admitted.append(view.hold_micro)
        except AdmissionRefused as refusal:
            with lock:
                refused.append(refusal.reason)

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(attempt, range(80)))
        bal = ledger.balance(acct)
        assert sum(admitted) == bal.held_micro <= LEDGER.free_tier_limit_micro
        assert bal.free_tier_used_micro <= LEDGER.free_tier_limit_micro
        assert refused and set(refused) <= {"free_tier_exhausted", "kyc_required"}
        assert len(admitted) >= 1
    finally:
        committer.close()
        app.close()
