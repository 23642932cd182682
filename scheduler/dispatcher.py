"""The dispatch core: an in-memory view of live Jobs and Islands kept from the event log,
the fair queue, timers (ack, lease, queue timeout), and the loop that matches queued
Jobs to Islands.

State changes only through events: the core reads the log in order (its own commits
arrive through a commit listener without a database read; other processes' commits are
read from the log), and everything it decides is a command whose outcome comes back as
events. This is what makes several coordinator processes safe: decisions are
optimistic commands on the Job aggregate, so a Job can be assigned at most once, and
the dispatcher that holds the leader lock is the only one that dispatches and runs
timers (see docs/ARCHITECTURE.md). `step(now_ms)` does one round; the server calls it
from a thread, the simulator from its virtual clock.
"""

from __future__ import annotations

import heapq
import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import msgspec
import structlog
from eventsourcing.utils import get_topic

from ledger.service import LedgerConfig
from routing.index import CandidateIndex
from routing.karma import rebased_milli
from routing.types import Decision, JobNeeds
from scheduler import commands as cmd
from scheduler.cargo_switch import CargoSwitch, switch_id
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.fair_queue import FairQueue
from scheduler.islands import APPROVED, Island
from scheduler.market import (
    BidPreferences,
    MarketState,
    Surge,
    list_rate_micro,
    median_micro,
    surge_wanted,
    surged_micro,
)
from scheduler.jobs import ASSIGNED, PENDING, QUEUED, RUNNING, IllegalTransition, Job
from scheduler.registry import Registry
from store.clock import datetime_to_ms
from store.unit_of_work import GroupCommitter

log = structlog.get_logger("scheduler")

ACK = 1
LEASE = 2
QUEUE_TIMEOUT = 3

JOB_TOPICS = tuple(get_topic(c) for c in (
    Job.Submitted, Job.Queued, Job.Assigned, Job.OfferDeclined, Job.Started, Job.Requeued, Job.Completed,
    Job.Failed, Job.Cancelled, Job.TimedOut, Job.ExclusionsCleared))
ISLAND_TOPICS = tuple(get_topic(c) for c in (
    Island.Registered, Island.Approved, Island.Suspended, Island.CapabilitiesChanged, Island.WentOnline,
    Island.WentOffline, Island.KarmaChanged, Island.KarmaAdjusted, Island.KarmaRebased, Island.TokenRotated,
    Island.AsksChanged, Island.DrainChanged, Island.Paired, Island.NatsCredentialIssued))
CARGO_TOPICS = (get_topic(CargoSwitch.Switched),)
MARKET_TOPICS = tuple(get_topic(c) for c in (
    BidPreferences.Created, BidPreferences.BidSet, BidPreferences.BidCleared, Surge.Switched))
SCHEDULER_TOPICS = JOB_TOPICS + ISLAND_TOPICS + CARGO_TOPICS + MARKET_TOPICS
_SCHEDULER_EVENTS = (Job.Event, Island.Event, CargoSwitch.Switched, BidPreferences.Event, Surge.Event)
EXPECTED_RACES = (IllegalTransition, cmd.NotYourJob, cmd.UnknownJob)
_TERMINAL_STATUS = {Job.Completed: "completed", Job.Failed: "failed", Job.Cancelled: "cancelled",
                    Job.TimedOut: "timeout"}


@dataclass(frozen=True)
class JobOffer:
    """What an Island is sent when it is offered a Job."""

    job_id: str
    cargo: str
    model: str
    kind: str
    input: dict[str, Any]
    ack_deadline_ms: int
    lease_ms: int


class SchedulerListener(Protocol):
    def offer(self, island_id: str, offer: JobOffer) -> None: ...
    def cancel(self, island_id: str, job_id: str) -> None: ...
    def job_changed(self, job_id: str, status: str, event: Any) -> None: ...


class NullListener:
    def offer(self, island_id: str, offer: JobOffer) -> None:
        pass

    def cancel(self, island_id: str, job_id: str) -> None:
        pass

    def job_changed(self, job_id: str, status: str, event: Any) -> None:
        pass


class FanoutListener:
    """Several listeners as one (e.g. the SSE publisher and the Island channel)."""

    def __init__(self, *listeners: SchedulerListener) -> None:
        self.listeners: list[SchedulerListener] = list(listeners)

    def add(self, listener: SchedulerListener) -> None:
        self.listeners.append(listener)

    def offer(self, island_id: str, offer: JobOffer) -> None:
        for listener in self.listeners:
            listener.offer(island_id, offer)

    def cancel(self, island_id: str, job_id: str) -> None:
        for listener in self.listeners:
            listener.cancel(island_id, job_id)

    def job_changed(self, job_id: str, status: str, event: Any) -> None:
        for listener in self.listeners:
            listener.job_changed(job_id, status, event)


@dataclass
class LiveJob:
    job_id: UUID
    account_id: str
    cargo: str
    kind: str
    model: str
    input: dict[str, Any]
    needs: JobNeeds
    submitted_ms: int
    status: str
    excluded: frozenset[str] = frozenset()
    island_id: str = ""
    ack_deadline_ms: int = 0
    lease_deadline_ms: int = 0
    streamed: bool = False
    delivered_tokens: int = 0
    epoch: int = 0  # bumped on each transition; timers carry it to detect staleness
    queued_ms: int = 0  # when it entered the queue (submission, or a batch child's release)
    parent_id: str = ""
    key: str = ""  # str(job_id), computed once: listeners are called with it on every event
    budget_micro: int = -1  # the market budget (-1: a Job from before the exchange)
    stranded_ms: int = 0  # since when only excluded Islands could take it (0: not stranded)
    exclusion_clears: int = 0  # ExclusionsCleared events applied


class LeaderLock(Protocol):
    def is_leader(self) -> bool: ...


class AlwaysLeader:
    def is_leader(self) -> bool:
        return True

    def held(self) -> bool:
        return True


class DispatchCore:
    def __init__(self, committer: GroupCommitter, catalog: Catalog, ledger_config: LedgerConfig,
                 config: SchedulerConfig, *, read_log: Callable[[int], tuple[int, list[tuple[int, Any]]]],
                 listener: SchedulerListener | None = None, leader: LeaderLock | None = None) -> None:
        self.committer = committer
        self.catalog = catalog  # the file's Cargos with the kill switches applied
        self._switch_slugs = {switch_id(c.slug): c.slug for c in catalog}
        self.ledger_config = ledger_config
        self.config = config
        self.read_log = read_log  # start -> (last position read, [(position, scheduler event)])
        self.listener: SchedulerListener = listener or NullListener()
        self.leader = leader or AlwaysLeader()
        self.index = CandidateIndex(weights=config.weights)
        self.list_rates = {c.slug: list_rate_micro(c) for c in catalog}
        self.registry = Registry(self.index, self.list_rates)
        self.market = MarketState()
        self._karma_legacy: set[str] = set()  # Islands still on the old karma scale (decision 0051)
        self.queue = FairQueue(config.max_queued_per_account, config.max_queued_total)
        self.jobs: dict[UUID, LiveJob] = {}
        self._handlers: dict[type, Callable[[Any, int], None]] = {}  # event class -> what _apply does
        self.rng = random.Random(config.routing_seed)
        self.position = 0  # last scheduler event applied
        self._timers: list[tuple[int, int, int, UUID, int]] = []
        # Work a dispatch round could act on appeared after this step's round (its own
        # timer commands re-queued Jobs or freed slots, or the round hit its batch
        # limit): `next_timer_ms` asks for another round at once instead of leaving it
        # to whatever step comes next.
        self._dispatchable_changes = 0
        self._redispatch_ms: int | None = None
        self._timer_seq = 0
        self.log_position = 0  # every event up to here has been seen (applied or not ours)
        self._buffer: deque[tuple[int, int, list[tuple[int, Any]]]] = deque()
        self._buffer_lock = threading.Lock()
        self._stranded_cmds: list[Callable] = []  # clear_exclusions commands decided this round
        self._catch_up_lock = threading.Lock()  # taken before `lock`, never after it
        self._last_db_read_ms = -(10**15)
        self.lock = threading.RLock()  # guards everything above; never held across a commit wait
        self.wake = threading.Event()
        self.stats = {"assigned": 0, "dispatch_rounds": 0, "no_candidate": 0, "timers": 0, "lost_races": 0,
                      "exclusions_cleared": 0}
        self._ours: dict[type, bool] = {}  # one entry per event class seen (a fixed small set)
        committer.add_listener(self._on_commit)

    # ------------------------------------------------------------ log intake
    def _on_commit(self, recordings: list[Any]) -> None:
        """Writer thread: keep each of our commits (its position range and its scheduler
        events) so the core can apply it without reading it back from the database."""
        if recordings:
            ours = self._ours  # event class -> is it a scheduler event (isinstance, decided once per class)
            mine = []
            for r in recordings:
                ev = r.domain_event
                cls = type(ev)
                flag = ours.get(cls)
                if flag is None:
                    flag = ours[cls] = issubclass(cls, _SCHEDULER_EVENTS)
                if flag:
                    mine.append((r.notification.id, ev))
            with self._buffer_lock:
                self._buffer.append((recordings[0].notification.id, recordings[-1].notification.id, mine))
        if not self.wake.is_set():  # set() takes a lock and notifies; most commits find it set already
            self.wake.set()

    def catch_up(self, now_ms: int, *, force_db: bool = False) -> int:
        """Apply every scheduler event after `log_position`, in log order; return how many.

        A buffered commit of our own is applied straight from memory when it starts right
        after `log_position` (then nothing can lie between). Otherwise — another process
        wrote, or a failed insert left a gap in the id sequence — and on a timer, the log
        is read from the database (commit order = position order under the recorder's
        table lock, so a reader at `log_position` never skips anything)."""
        if (not force_db and not self._buffer and not self._catch_up_lock.locked()
                and now_ms - self._last_db_read_ms < self.config.log_poll_ms):
            # Nothing buffered, no other reader mid-way, no poll due: what the locked pass
            # below would find (no commit to apply, no gap, no read). The order of the
            # tests matters: a commit leaves the buffer only under `_catch_up_lock`, so an
            # empty buffer seen *before* a free lock means every commit buffered so far
            # has been applied (a caller's own commit included). A commit buffered after
            # these reads is applied by the next call, as after the locked pass.
            return 0
        applied = 0
        with self._catch_up_lock:  # one reader of the log at a time; `log_position` moves only here
            with self.lock:
                # Slot and karma changes reach the index once per Island per read (a
                # completion frees a slot and moves karma: one link, not a link and a move).
                with self.registry.deferring:
                    while not force_db:
                        with self._buffer_lock:
                            while self._buffer and self._buffer[0][1] <= self.log_position:
                                self._buffer.popleft()
                            if not self._buffer or self._buffer[0][0] != self.log_position + 1:
                                break
                            first, last, events = self._buffer.popleft()
                        for pos, ev in events:
                            self._apply(pos, ev, now_ms)
                            applied += 1
                        self.log_position = last
                with self._buffer_lock:
                    gap = bool(self._buffer)
                read_db = force_db or gap or now_ms - self._last_db_read_ms >= self.config.log_poll_ms
                if read_db:
                    self._last_db_read_ms = now_ms
            while read_db:
                # The database read runs outside the core lock: while the store is slow or
                # down (a pool checkout waits, the library retries), the request path
                # (admission, quotes) must not wait behind it on the event loop.
                last, page = self.read_log(self.log_position + 1)
                with self.lock:
                    with self.registry.deferring:
                        for pos, ev in page:
                            self._apply(pos, ev, now_ms)
                            applied += 1
                    if last <= self.log_position:
                        break
                    self.log_position = last
        return applied

    # ------------------------------------------------------------ applying events
    def _apply(self, position: int, ev: Any, now_ms: int) -> None:
        assert position > self.position, (position, self.position)
        self.position = position
        handler = self._handlers.get(type(ev))
        if handler is None:
            handler = self._handlers[type(ev)] = self._handler_for(type(ev))
        handler(ev, now_ms)

    def _handler_for(self, cls: type) -> Callable[[Any, int], None]:
        """What `_apply` does with events of class `cls`: the isinstance chain, decided once
        per class (`_handlers` holds one entry per event class seen, a fixed small set)."""
        if issubclass(cls, Job.Event):
            if issubclass(cls, Job.Submitted):
                return self._on_submitted
            if issubclass(cls, Job.Queued):
                return self._on_queued
            if issubclass(cls, Job.Assigned):
                return self._on_assigned
            if issubclass(cls, (Job.OfferDeclined, Job.Requeued)):
                return self._on_declined
            if issubclass(cls, Job.ExclusionsCleared):
                return self._on_exclusions_cleared
            if issubclass(cls, Job.Started):
                return self._on_started
            return self._on_terminal
        if issubclass(cls, Island.Event):
            return self._on_island
        if issubclass(cls, CargoSwitch.Switched):
            return self._on_switched
        if issubclass(cls, (BidPreferences.Event, Surge.Event)):
            return self._on_market
        return _ignore

    def _on_market(self, ev: Any, now_ms: int) -> None:
        self.market.apply(ev)

    def _on_switched(self, ev: Any, now_ms: int) -> None:
        slug = self._switch_slugs.get(ev.originator_id)
        if slug is None:
            slug = next((c.slug for c in self.catalog if switch_id(c.slug) == ev.originator_id), None)
        if slug is not None:
            self.catalog = self.catalog.with_enabled(slug, ev.enabled)

    def _needs(self, ev: Job.Submitted) -> JobNeeds:
        cargo = self.catalog.get(ev.cargo)
        prefs = ev.prefs
        return JobNeeds(
            cargo=ev.cargo, model=ev.model, vram_mb=cargo.required_vram_mb if cargo else 0,
            ram_mb=cargo.required_ram_mb if cargo else 0, regions=frozenset(prefs.get("regions", ())),
            platforms=frozenset(prefs.get("platforms", ())), min_hardware_tier=prefs.get("min_hardware_tier", 0),
            max_latency_ms=prefs.get("max_latency_ms"),
            bid_micro=ev.budget_micro if ev.budget_source else prefs.get("bid_micro"),
            min_karma_milli=cargo.min_karma_milli if cargo else 0)

    def _on_submitted(self, ev: Any, now_ms: int) -> None:
        job_id = ev.originator_id
        live = LiveJob(job_id=job_id, account_id=ev.account_id, cargo=ev.cargo, kind=ev.kind, model=ev.model,
                       input=ev.input, needs=self._needs(ev), submitted_ms=datetime_to_ms(ev.timestamp),
                       status=ev.status, parent_id=ev.parent_id, key=str(job_id),
                       budget_micro=ev.budget_micro if ev.budget_source else -1)
        self.jobs[job_id] = live
        live.queued_ms = live.submitted_ms
        if ev.status == QUEUED:
            self._enqueue(live)
        self.listener.job_changed(live.key, ev.status, ev)

    def _moved(self, ev: Any) -> LiveJob | None:
        """The live Job a later event of it moves on (its epoch bumped: its timers are
        stale now); None for a Job that ended before we started watching, or unknown."""
        live = self.jobs.get(ev.originator_id)
        if live is not None:
            live.epoch += 1
        return live

    def _on_queued(self, ev: Any, now_ms: int) -> None:
        live = self._moved(ev)
        if live is None:
            return
        live.status = QUEUED
        live.queued_ms = datetime_to_ms(ev.timestamp)  # the queue timeout counts from the release
        self._enqueue(live)
        self.listener.job_changed(live.key, live.status, ev)

    def _on_assigned(self, ev: Any, now_ms: int) -> None:
        live = self._moved(ev)
        if live is None:
            return
        job_id = live.job_id
        self.queue.remove(job_id)
        if live.island_id and live.island_id != ev.island_id:
            self.registry.release(live.island_id, job_id)
        live.status = ASSIGNED
        live.island_id = ev.island_id
        live.ack_deadline_ms = ev.ack_deadline_ms
        self.registry.reserve(ev.island_id, job_id)
        self._timer(ev.ack_deadline_ms, ACK, live)
        if self.leader.is_leader():
            self.listener.offer(ev.island_id, JobOffer(live.key, live.cargo, live.model, live.kind,
                                                       live.input, ev.ack_deadline_ms, self.config.lease_ms))
        self.listener.job_changed(live.key, live.status, ev)

    def _on_declined(self, ev: Any, now_ms: int) -> None:  # OfferDeclined or Requeued
        live = self._moved(ev)
        if live is None:
            return
        self.registry.release(ev.island_id, live.job_id)  # _enqueue below notes it
        live.excluded = live.excluded | {ev.island_id}
        live.stranded_ms = 0
        live.island_id = ""
        live.status = QUEUED
        live.streamed = False
        live.delivered_tokens = 0
        self._enqueue(live, front=True)
        self.listener.job_changed(live.key, live.status, ev)

    def _on_exclusions_cleared(self, ev: Any, now_ms: int) -> None:
        live = self.jobs.get(ev.originator_id)  # not `_moved`: the Job stays queued, its queue timer holds
        if live is None:
            return
        live.excluded = frozenset()
        live.exclusion_clears += 1
        live.stranded_ms = 0
        self._dispatchable_changes += 1  # it may be offered at once

    def _on_started(self, ev: Any, now_ms: int) -> None:
        live = self._moved(ev)
        if live is None:
            return
        live.status = RUNNING
        live.lease_deadline_ms = max(ev.lease_deadline_ms, now_ms + self.config.lease_ms // 2)
        self._timer(live.lease_deadline_ms, LEASE, live)
        self.listener.job_changed(live.key, live.status, ev)

    def _on_terminal(self, ev: Any, now_ms: int) -> None:
        live = self._moved(ev)
        if live is None:
            return
        job_id = live.job_id
        self.queue.remove(job_id)
        if live.island_id:
            self.registry.release(live.island_id, job_id)
            self._dispatchable_changes += 1
            if isinstance(ev, Job.Cancelled) and ev.stage in (ASSIGNED, RUNNING):
                self.listener.cancel(live.island_id, live.key)
        self.listener.job_changed(live.key, _TERMINAL_STATUS[type(ev)], ev)  # listeners may still look the Job up
        del self.jobs[job_id]

    def _enqueue(self, live: LiveJob, front: bool = False) -> None:
        self._dispatchable_changes += 1
        self.queue.push(live.cargo, live.account_id, live.job_id, front=front)
        self._timer(live.queued_ms + self.config.queue_timeout_ms, QUEUE_TIMEOUT, live)

    def _on_island(self, ev: Any, now_ms: int) -> None:
        self._apply_island(ev)

    def _apply_island(self, ev: Any) -> None:
        island_id = str(ev.originator_id)
        if isinstance(ev, Island.Registered):
            self.registry.register(island_id, ev.owner_account_id, ev.name, ev.capabilities, ev.approval == APPROVED)
            self.registry.islands[island_id].approval = ev.approval
            start = getattr(ev, "karma_start_milli", None)
            if start is None:
                self._karma_legacy.add(island_id)
            self.registry.set_karma(island_id, rebased_milli(0) if start is None else start)
        elif isinstance(ev, Island.Approved):
            self.registry.set_approved(island_id, True)
            self._set_approval(island_id, "approved")
        elif isinstance(ev, Island.Suspended):
            self.registry.set_approved(island_id, False)
            self._set_approval(island_id, "suspended")
        elif isinstance(ev, Island.DrainChanged):
            self.registry.set_draining(island_id, ev.draining)
        elif isinstance(ev, Island.CapabilitiesChanged):
            self.registry.set_capabilities(island_id, ev.capabilities)
        elif isinstance(ev, Island.KarmaChanged):
            # decision 0051: an old-scale Island's numbers are shown rebased until its KarmaRebased
            legacy = island_id in self._karma_legacy and not isinstance(ev, Island.KarmaRebased)
            if not legacy:
                self._karma_legacy.discard(island_id)
            self.registry.set_karma(island_id, rebased_milli(ev.karma_after_milli) if legacy
                                    else ev.karma_after_milli)
        elif isinstance(ev, Island.WentOffline):
            self.registry.set_offline(island_id)
        elif isinstance(ev, Island.NatsCredentialIssued):
            self.registry.set_nats_credential(island_id, ev.user, ev.password_hash)
        elif isinstance(ev, Island.AsksChanged):
            self.registry.set_asks(island_id, ev.asks_micro)

    def _set_approval(self, island_id: str, approval: str) -> None:
        rec = self.registry.islands.get(island_id)
        if rec is not None:
            rec.approval = approval

    # ------------------------------------------------------------ timers
    def _timer(self, due_ms: int, kind: int, live: LiveJob) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (due_ms, self._timer_seq, kind, live.job_id, live.epoch))

    def next_timer_ms(self) -> int | None:
        """When the earliest timer that can still act is due (None: no timer). Dead
        heads - their Job gone or moved on (epoch) - are dropped here rather than waking
        the caller for nothing; `_due_timer_commands` would skip exactly these."""
        timers = self._timers
        jobs = self.jobs
        with self.lock:
            while timers:
                _, _, _, job_id, epoch = timers[0]
                live = jobs.get(job_id)
                if live is not None and live.epoch == epoch:
                    due = timers[0][0]
                    return due if self._redispatch_ms is None else min(due, self._redispatch_ms)
                heapq.heappop(timers)
        return self._redispatch_ms

    def _due_timer_commands(self, now_ms: int) -> list[Callable]:
        out: list[Callable] = []
        while self._timers and self._timers[0][0] <= now_ms:
            _, _, kind, job_id, epoch = heapq.heappop(self._timers)
            live = self.jobs.get(job_id)
            if live is None or live.epoch != epoch:
                continue  # stale: the Job moved on since the timer was set
            self.stats["timers"] += 1
            if kind == ACK and live.status == ASSIGNED:
                out.append(lambda uow, j=job_id, i=live.island_id: cmd.decline_in(uow, self.config, j, i,
                                                                                  "ack_timeout"))
            elif kind == LEASE and live.status == RUNNING:
                if live.lease_deadline_ms > now_ms:  # renewed meanwhile
                    self._timer(live.lease_deadline_ms, LEASE, live)
                    continue
                out.append(lambda uow, j=job_id, i=live.island_id, s=live.streamed: cmd.lapse_in(
                    uow, self.ledger_config, self.config, j, i, streamed=s))
            elif kind == QUEUE_TIMEOUT and live.status in (QUEUED, PENDING):
                if live.queued_ms + self.config.queue_timeout_ms > now_ms:
                    continue
                out.append(lambda uow, j=job_id: cmd.timeout_in(uow, j))
        return out

    # ------------------------------------------------------------ dispatch
    def _decide(self, now_ms: int) -> list[tuple[LiveJob, Decision]]:
        decisions: list[tuple[LiveJob, Decision]] = []
        budget = self.config.dispatch_batch_max
        for cargo in self.queue.cargos():
            misses: list[LiveJob] = []
            while len(decisions) < budget and len(misses) < self.config.dispatch_misses_per_cargo:
                job_id = self.queue.pop(cargo)
                if job_id is None:
                    break
                live = self.jobs.get(job_id)
                if live is None or live.status != QUEUED:
                    continue
                needs = live.needs if not live.excluded else _with_excluded(live.needs, live.excluded)
                choice = self.index.choose(needs, None, self.rng)
                if not isinstance(choice, Decision):
                    self.stats["no_candidate"] += 1
                    if live.excluded and choice.refusals.get("excluded"):
                        self._note_stranded(live, now_ms)
                    misses.append(live)
                    continue
                self.registry.reserve(choice.island_id, job_id)
                live.island_id = choice.island_id
                decisions.append((live, choice))
            for live in reversed(misses):  # back at the head of their account's line
                self.queue.push(live.cargo, live.account_id, live.job_id, front=True)
            if len(decisions) >= budget:
                break
        return decisions

    def _note_stranded(self, live: LiveJob, now_ms: int) -> None:
        """Only Islands that already failed this Job could take it now. After
        `stranded_grace_ms` (another Island may free a slot meanwhile) ask to forget them."""
        if live.stranded_ms == 0:
            live.stranded_ms = now_ms
            return
        waited_ms = now_ms - live.stranded_ms
        if waited_ms < self.config.stranded_grace_ms or live.exclusion_clears >= self.config.max_exclusion_clears:
            return
        live.stranded_ms = now_ms  # asked: if the command loses a race, ask again after another grace
        self.stats["exclusions_cleared"] += 1
        self._stranded_cmds.append(
            lambda uow, j=live.job_id, w=waited_ms: cmd.clear_exclusions_in(uow, self.config, j, w))

    def step(self, now_ms: int) -> int:
        """One round: read the log, run due timers, dispatch, read the log again.
        Returns the number of commands issued."""
        self.catch_up(now_ms)
        if not self.leader.is_leader():
            return 0
        issued = 0
        with self.lock:
            self._redispatch_ms = None
            self._offline_check(now_ms)
            timer_cmds = self._due_timer_commands(now_ms)
            surge_cmd = self._surge_check(now_ms)
            if surge_cmd is not None:
                timer_cmds.append(surge_cmd)
            decisions = self._decide(now_ms)
            if self._stranded_cmds:
                timer_cmds.extend(self._stranded_cmds)
                self._stranded_cmds = []
            surge_permille = self.market.surge_permille
            # the selected Islands' asks, read with the decisions (an ask may change right after)
            asks = [self.registry.islands[d.island_id].ask_for(live.cargo) if live.budget_micro >= 0 else -1
                    for live, d in decisions]
        futures: list[tuple[Future, Any]] = [(self.committer.submit(c), None) for c in timer_cmds]
        for (live, d), ask in zip(decisions, asks):
            score = {"karma": d.score.karma, "latency": d.score.latency, "load": d.score.load,
                     "price": d.score.price, "warm_model": d.score.warm_model, "total": d.score.total,
                     "considered": d.candidates_considered, "examined": d.candidates_examined,
                     "eligible": d.candidates_eligible, "fleet": d.fleet_size, "tied": d.tied}
            owner = self.registry.islands[d.island_id].owner_account_id
            futures.append((self.committer.submit(
                lambda uow, j=live.job_id, i=d.island_id, o=owner, s=score, n=d.candidates_considered, a=ask,
                sp=surge_permille: cmd.assign_in(uow, j, i, o, now_ms + self.config.ack_timeout_ms, s, n,
                                                ask_micro=a, surge_permille=sp)), (live, d.island_id)))
        issued = len(futures)
        self.stats["dispatch_rounds"] += 1
        for fut, ctx in futures:
            try:
                fut.result()
                if ctx is not None:
                    self.stats["assigned"] += 1
            except EXPECTED_RACES:
                self.stats["lost_races"] += 1
                if ctx is not None:
                    self._undo_reservation(*ctx)
            except Exception:  # noqa: BLE001 - a failed command must not stop dispatch
                log.exception("scheduler_command_failed")
                if ctx is not None:
                    self._undo_reservation(*ctx)
        if issued:
            before = self._dispatchable_changes
            self.catch_up(now_ms)
            with self.lock:
                if self._dispatchable_changes != before or len(decisions) >= self.config.dispatch_batch_max:
                    self._redispatch_ms = now_ms
        return issued

    def _undo_reservation(self, live: LiveJob, island_id: str) -> None:
        with self.lock:
            if live.status == QUEUED and live.island_id == island_id:
                self.registry.release(island_id, live.job_id)
                live.island_id = ""

    def _surge_check(self, now_ms: int) -> Callable | None:
        """The surge rule, evaluated at most once per `surge_hold_ms` (so the switch can
        move at most that often): a command when the state should change, else None."""
        last = self.market.last_eval_ms
        if last is not None and now_ms - last < self.config.surge_hold_ms:
            return None
        self.market.last_eval_ms = now_ms
        queued = len(self.queue)
        free = self.registry.free_slots_online()
        wanted = surge_wanted(queued, free, self.config.surge_ratio)
        if wanted == self.market.surge_active:
            return None
        permille = self.config.surge_multiplier_permille
        return lambda uow: cmd.set_surge_in(uow, wanted, permille, queued, free)

    # ------------------------------------------------------------ market reads
    def market_rate_micro(self, slug: str) -> int | None:
        """The current market rate of a Cargo: the median ask of the approved, online
        Islands serving it, times the surge multiplier (rounded up); None when none is online."""
        with self.lock:
            online = self.registry.cargo_asks(slug)[1]
            if not online:
                return None
            return surged_micro(median_micro(online), self.market.surge_permille)

    def budget_inputs(self, account_id: str, slug: str) -> tuple[int | None, int | None, int | None]:
        """For the budget chain, in one look under the lock: the account's saved bid for
        the Cargo, the current market rate, and the lowest ask of an approved Island
        serving it (None: no approved Island serves it)."""
        with self.lock:
            approved, online = self.registry.cargo_asks(slug)
            rate = surged_micro(median_micro(online), self.market.surge_permille) if online else None
            return self.market.preference(account_id, slug), rate, (approved[0] if approved else None)

    def online_asks(self, slug: str, regions: frozenset[str] = frozenset()) -> list[int]:
        """Sorted asks of the approved, online, not draining Islands serving a Cargo (in one
        of `regions`, when given). O(Islands): for quotes, not for the submit path."""
        with self.lock:
            return sorted(rec.ask_for(slug) for rec in self.registry.islands.values()
                          if rec.approved and rec.online and not rec.draining
                          and slug in rec.capabilities.get("cargos", ())
                          and (not regions or rec.capabilities.get("region", "unknown") in regions))

    def market_snapshot(self, slug: str) -> tuple[list[int], list[int], int]:
        """(asks of approved Islands, asks of those online, surge permille) for a Cargo."""
        with self.lock:
            approved, online = self.registry.cargo_asks(slug)
            return list(approved), list(online), self.market.surge_permille

    def _offline_check(self, now_ms: int) -> None:
        for island_id in self.registry.stale(now_ms, self.config.offline_after_ms):
            self.registry.set_offline(island_id)  # live view first: no new offers
            self.committer.submit(lambda uow, i=island_id: cmd.set_island_online_in(
                uow, UUID(i), False, "missed heartbeats", self.config.karma))

    # ------------------------------------------------------------ live inputs (not events)
    def heartbeat(self, island_id: str, now_ms: int, **live: Any) -> None:
        with self.lock:
            came_online = self.registry.heartbeat(island_id, now_ms, **live)
        if came_online:
            self.committer.submit(lambda uow: cmd.set_island_online_in(uow, UUID(island_id), True))
        self.wake.set()

    def renew_lease(self, island_id: str, job_id: UUID, now_ms: int) -> bool:
        with self.lock:
            live = self.jobs.get(job_id)
            if live is None or live.island_id != island_id or live.status != RUNNING:
                return False
            live.lease_deadline_ms = now_ms + self.config.lease_ms
            return True

    def output_progress(self, island_id: str, job_id: UUID, tokens: int) -> bool:
        """The Island streamed output for a Job it runs (tokens delivered so far)."""
        with self.lock:
            live = self.jobs.get(job_id)
            # ASSIGNED too: the Island's accept may be committed by another process whose
            # Started event this process has not applied yet.
            if live is None or live.island_id != island_id or live.status not in (ASSIGNED, RUNNING):
                return False
            live.streamed = True
            live.delivered_tokens += max(0, tokens)
            return True

    def live_job(self, job_id: UUID) -> LiveJob | None:
        return self.jobs.get(job_id)

    def queue_depths(self) -> dict[str, int]:
        with self.lock:
            return self.queue.depths()


def _ignore(ev: Any, now_ms: int) -> None:
    """Events of other aggregates: nothing live to change."""


def _with_excluded(needs: JobNeeds, excluded: frozenset[str]) -> JobNeeds:
    return msgspec.structs.replace(needs, excluded=excluded)
