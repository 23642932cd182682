"""Scheduler rules one at a time: admission refusals, idempotent submission, fair share,
the Cargo kill switch, Islands acting only on their own Jobs, the assignment's
explanation, settlement arithmetic."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from ledger.service import Ledger, LedgerConfig
from scheduler.admission import AdmissionRefused
from scheduler.catalog import Catalog
from scheduler.commands import IdempotencyMismatch, NotYourJob
from scheduler.config import SchedulerConfig
from scheduler.service import Scheduler
from store.clock import ManualClock, SeededIds
from store.factory import MEMORY_URL, StoreConfig, open_app
from store.unit_of_work import GroupCommitter

CHAT = {"cargos": ["llm-chat", "llm-chat-lite"], "models": ["mistral-7b-instruct", "tinyllama-1.1b-chat"],
        "vram_mb": 24_000, "ram_mb": 64_000, "slots": 1, "region": "eu"}


class World:
    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.clock = ManualClock()
        self.app = open_app(StoreConfig(database_url=MEMORY_URL, data_dir=Path(".")))
        self.committer = GroupCommitter(self.app, self.clock, inline=True)
        self.ledger_config = LedgerConfig(fee_bps=1_000)
        self.ledger = Ledger(self.committer, self.ledger_config)
        self.sched = Scheduler(self.committer, Catalog.load(), self.ledger_config, config or SchedulerConfig(),
                               self.clock, SeededIds(11))
        self.owner = self.account("owner@x", kyc=True)

    def account(self, email: str, *, kyc: bool, credits_micro: int = 0) -> uuid.UUID:
        acct = uuid.uuid4()
        self.ledger.open_account(acct, email, kyc_verified=kyc, initial_grant_micro=credits_micro)
        return acct

    def island(self, caps: dict = CHAT) -> str:
        island = self.sched.register_island(self.owner, "i", caps, approve=True).island_id
        self.sched.recover()
        self.sched.heartbeat(island)
        return island


@pytest.fixture
def world():
    return World()


def test_refusals_carry_typed_reasons_and_change_nothing(world):
    rich = world.account("rich@x", kyc=True, credits_micro=1_000_000)
    free = world.account("free@x", kyc=False)
    cases = [
        (rich, "no-such-cargo", {"prompt": "x"}, "unknown_cargo"),
        (rich, "llm-chat", {"prompt": "x", "max_tokens": 0}, "invalid_input"),
        (rich, "llm-chat", {"prompt": "x", "temperature": 3}, "invalid_input"),
        (free, "sdxl", {"prompt": "cat", "width": 1024, "height": 1024, "steps": 30, "guidance_scale": 7},
         "kyc_required"),
        (free, "llm-chat", {"prompt": "x", "max_tokens": 4096}, "free_tier_exhausted"),
        (rich, "llm-chat", {"prompt": "x"}, "insufficient_credits"),
    ]
    before = world.app.recorder.max_notification_id()
    for acct, cargo, payload, reason in cases:
        with pytest.raises(AdmissionRefused) as info:
            world.sched.submit(acct, cargo, payload)
        assert info.value.reason == reason, (cargo, payload, info.value.message)
        if reason in ("insufficient_credits", "free_tier_exhausted"):
            assert info.value.required_micro > info.value.available_micro >= 0
        if reason == "invalid_input":
            assert info.value.errors
    assert world.app.recorder.max_notification_id() == before  # nothing was written
    assert sum(world.sched.refusals.counts.values()) == len(cases)


def test_idempotency_key_returns_the_first_job_and_refuses_other_content(world):
    acct = world.account("a@x", kyc=True, credits_micro=100_000_000)
    first = world.sched.submit(acct, "llm-chat", {"prompt": "hi"}, idempotency_key="k1")
    again = world.sched.submit(acct, "llm-chat", {"prompt": "hi"}, idempotency_key="k1")
    assert again.id == first.id
    assert world.ledger.balance(acct).held_micro == first.hold_micro  # held once
    with pytest.raises(IdempotencyMismatch):
        world.sched.submit(acct, "llm-chat", {"prompt": "something else"}, idempotency_key="k1")


def test_one_account_flooding_the_queue_does_not_starve_another(world):
    flood = world.account("flood@x", kyc=True, credits_micro=10**10)
    polite = world.account("polite@x", kyc=True, credits_micro=10**9)
    island = world.island()
    for i in range(30):
        world.sched.submit(flood, "llm-chat-lite", {"prompt": f"flood {i}"})
    mine = world.sched.submit(polite, "llm-chat-lite", {"prompt": "just one"})
    served = []
    for _ in range(4):  # one slot: the Island takes one Job per round
        world.sched.step()
        (job_id, live), = [(j, v) for j, v in world.sched.core.jobs.items() if v.status == "assigned"]
        served.append(live.account_id)
        world.sched.accept(island, job_id)
        world.sched.complete(island, job_id, {"prompt_tokens": 5, "completion_tokens": 5}, "ok", 100)
        world.sched.step()
    assert str(polite) in served[:2], served
    assert world.sched.get_job(uuid.UUID(mine.id)).status == "completed"


def test_cargo_kill_switch_is_an_event_every_process_sees(world):
    acct = world.account("a@x", kyc=True, credits_micro=100_000_000)
    assert world.sched.set_cargo_enabled("llm-chat", False, by="ops", reason="bad model build")
    with pytest.raises(AdmissionRefused) as info:
        world.sched.submit(acct, "llm-chat", {"prompt": "x"})
    assert info.value.reason == "cargo_disabled"
    other = Scheduler(world.committer, Catalog.load(), world.ledger_config, SchedulerConfig(), world.clock,
                      SeededIds(12))
    other.recover()  # another process, rebuilt from the log
    assert not other.catalog.by_slug("llm-chat").enabled
    assert world.sched.set_cargo_enabled("llm-chat", True, by="ops", reason="fixed")
    assert world.sched.submit(acct, "llm-chat", {"prompt": "x"}).status == "queued"


def test_an_island_cannot_act_on_another_islands_job_and_settlement_splits_the_price(world):
    acct = world.account("a@x", kyc=True, credits_micro=100_000_000)
    mine = world.island()
    other = world.island()
    job = world.sched.submit(acct, "llm-chat", {"prompt": "hello", "max_tokens": 100})
    world.sched.step()
    view = world.sched.get_job(uuid.UUID(job.id))
    holder = view.island_id
    intruder = other if holder == mine else mine
    assert view.score and view.score["considered"] == 2 and "total" in view.score
    with pytest.raises(NotYourJob):
        world.sched.accept(intruder, uuid.UUID(job.id))
    world.sched.accept(holder, uuid.UUID(job.id))
    with pytest.raises(NotYourJob):
        world.sched.complete(intruder, uuid.UUID(job.id), {"prompt_tokens": 1, "completion_tokens": 1}, "x", 1)
    done = world.sched.complete(holder, uuid.UUID(job.id), {"prompt_tokens": 100, "completion_tokens": 9_999},
                                "text", 1_000)
    assert done.usage["completion_tokens"] == 100  # never billed beyond max_tokens
    assert 0 < done.charged_micro <= done.hold_micro
    bal = world.ledger.balance(acct)
    assert bal.spendable_micro == 100_000_000 + world.ledger_config.free_tier_grant_micro - done.charged_micro
    assert bal.held_micro == 0


def test_a_job_only_excluded_islands_could_take_is_offered_again_after_the_grace_a_bounded_number_of_times(world):
    """A lone Island misses the ack (say, its transport was down): the Job is excluded from
    it and nothing else can take it. After `stranded_grace_ms` the exclusions are cleared
    (Job.ExclusionsCleared) and it is offered again, at most `max_exclusion_clears` times;
    then it waits out its queue timeout and ends `timeout` with its hold released."""
    cfg = world.sched.config
    acct = world.account("s@x", kyc=True, credits_micro=100_000_000)
    isl = world.island()
    jid = uuid.UUID(world.sched.submit(acct, "llm-chat", {"prompt": "hi", "max_tokens": 10}).id)

    def status() -> str:
        return world.sched.get_job(jid).status

    def tick(ms: int) -> None:
        world.clock.advance(ms)
        world.sched.heartbeat(isl)
        for _ in range(3):
            world.sched.step()

    offers = 0
    for clears in range(cfg.max_exclusion_clears + 1):
        tick(0)
        assert status() == "assigned" and world.sched.get_job(jid).island_id == isl
        offers += 1
        tick(cfg.ack_timeout_ms + 1)  # missed ack: declined, the only Island excluded
        assert status() == "queued"
        tick(cfg.stranded_grace_ms // 2)
        assert status() == "queued"  # within the grace: not offered again
        assert world.app.repository.get(jid).exclusion_clears == clears
        tick(cfg.stranded_grace_ms)
        if clears < cfg.max_exclusion_clears:
            assert world.app.repository.get(jid).exclusion_clears == clears + 1
    assert status() == "queued" and offers == cfg.max_exclusion_clears + 1
    assert world.app.repository.get(jid).excluded == [isl]  # the bound held: excluded for good
    tick(cfg.stranded_grace_ms * 3)
    assert status() == "queued"
    tick(cfg.queue_timeout_ms)
    assert status() == "timeout"
    assert world.ledger.balance(acct).held_micro == 0
