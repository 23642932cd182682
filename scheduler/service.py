"""The scheduler's public face: consumer commands (submit, cancel, read), Island
commands (register, heartbeat, accept, output, complete, fail), and the loop that drives
the dispatch core. Sync methods block; `a*` methods await (for the HTTP layer)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import msgspec
import structlog

from ledger.errors import LedgerError
from ledger.service import LedgerConfig, fingerprint
from scheduler import commands as cmd
from scheduler import market as mkt
from scheduler.admission import (
    NO_ISLAND_WITHIN_BUDGET,
    QUEUE_FULL,
    AdmissionRefused,
    Admitted,
    RefusalCounter,
    admit,
    refusal_from_ledger,
)
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.dispatcher import SCHEDULER_TOPICS, DispatchCore, LeaderLock, SchedulerListener
from scheduler.islands import Island
from scheduler.jobs import Job
from scheduler.registry import parse_capabilities
from protocol.island import make_token
from store.clock import Clock, IdSource
from store.unit_of_work import GroupCommitter, UnitOfWork

log = structlog.get_logger("scheduler")
T = TypeVar("T")

JOB_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0002")
ISLAND_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0003")


class JobView(msgspec.Struct, frozen=True, kw_only=True):
    """A Job as readers see it (internal status; the API maps `assigned` to `queued`)."""

    id: str
    account_id: str
    cargo: str
    cargo_id: int
    kind: str
    model: str
    status: str
    input: dict[str, Any]
    output: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    usage: dict[str, Any] | None
    hold_micro: int
    charged_micro: int
    island_id: str
    tokens_per_s_milli: int
    compute_ms: int
    parent_id: str
    batch_index: int
    attempts: int
    score: dict[str, Any] | None
    budget_micro: int = 0
    budget_source: str = ""  # bid | preference | market | list ("" for a Job from before the exchange)
    clearing_micro: int = -1  # the clearing rate once assigned (-1: not yet, or list pricing)
    ask_micro: int = -1
    surge_permille: int = 1000

    @property
    def duration_ms(self) -> int | None:
        if self.started_at and self.completed_at:
            return int((self.completed_at - self.started_at).total_seconds() * 1000)
        return None


def job_view(job: Job) -> JobView:
    return JobView(id=str(job.id), account_id=job.account_id, cargo=job.cargo, cargo_id=job.cargo_id,
                   kind=job.kind, model=job.model, status=job.status, input=job.input, output=job.output,
                   error=job.error, created_at=job.created_on, started_at=job.started_at,
                   completed_at=job.completed_at, usage=job.usage, hold_micro=job.hold_micro,
                   charged_micro=job.charged_micro, island_id=job.island_id,
                   tokens_per_s_milli=job.tokens_per_s_milli, compute_ms=job.compute_ms, parent_id=job.parent_id,
                   batch_index=job.batch_index, attempts=job.attempts, score=job.score,
                   budget_micro=job.budget_micro, budget_source=job.budget_source,
                   clearing_micro=job.clearing_micro, ask_micro=job.ask_micro, surge_permille=job.surge_permille)


def job_view_if(job: Job, view: bool) -> JobView | None:
    """The Job's view, or None when the caller said it will not read it (`view=False`):
    building a view costs more than some commands' own work."""
    return job_view(job) if view else None


@dataclass(frozen=True)
class IslandCredentials:
    island_id: str
    token: str  # shown once; only its hash is stored


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Scheduler:
    def __init__(self, committer: GroupCommitter, catalog: Catalog, ledger_config: LedgerConfig,
                 config: SchedulerConfig, clock: Clock, ids: IdSource, *, listener: SchedulerListener | None = None,
                 leader: LeaderLock | None = None, single_writer: bool = True) -> None:
        self.committer = committer
        self._file_catalog = catalog
        self.ledger_config = ledger_config
        self.config = config
        self.clock = clock
        self.ids = ids
        self.refusals = RefusalCounter()
        app = committer.app

        topics = frozenset(SCHEDULER_TOPICS)

        def read_log(start: int) -> tuple[int, list[tuple[int, Any]]]:
            """One page of the log from `start`: the last position read, and the scheduler
            events in it (other events are skipped without decoding)."""
            notifications = app.recorder.select_notifications(start=start, limit=config.log_poll_page)
            if not notifications:
                return start - 1, []
            events = [(n.id, app.mapper.to_domain_event(n)) for n in notifications if n.topic in topics]
            return notifications[-1].id, events

        self.core = DispatchCore(committer, catalog, ledger_config, config, read_log=read_log, listener=listener,
                                 leader=leader)
        self.shared_store = not single_writer  # other processes may write: reads go to the database
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def catalog(self) -> Catalog:
        """The Cargo catalog as admission sees it: the file, with kill switches applied."""
        return self.core.catalog

    def set_cargo_enabled(self, slug: str, enabled: bool, *, by: str, reason: str) -> bool:
        changed = self._run(lambda uow: cmd.set_cargo_enabled_in(uow, self.catalog, slug, enabled, by=by,
                                                                 reason=reason))
        self.core.catch_up(self.clock.now_ms(), force_db=True)
        return changed

    # ------------------------------------------------------------ running
    def recover(self) -> int:
        """Rebuild the live view (queued and running Jobs, Islands) from the whole log."""
        return self.core.catch_up(self.clock.now_ms(), force_db=True)

    def start(self, *, idle_wait_s: float = 0.05) -> None:
        """Drive the dispatch core from a background thread (the server's mode)."""
        self.recover()
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.core.step(self.clock.now_ms())
                except Exception:  # noqa: BLE001
                    log.exception("dispatch_step_failed")
                nxt = self.core.next_timer_ms()
                wait_s = idle_wait_s
                if nxt is not None:
                    wait_s = max(0.0, min(wait_s, (nxt - self.clock.now_ms()) / 1000))
                self.core.wake.wait(wait_s)
                self.core.wake.clear()

        self._thread = threading.Thread(target=loop, name="dispatch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.core.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def step(self, now_ms: int | None = None) -> int:
        return self.core.step(self.clock.now_ms() if now_ms is None else now_ms)

    # ------------------------------------------------------------ plumbing
    def _run(self, command: Callable[[UnitOfWork], T]) -> T:
        return self.committer.execute(command)

    async def _arun(self, command: Callable[[UnitOfWork], T]) -> T:
        return await self.committer.aexecute(command)

    def _future(self, command: Callable[[UnitOfWork], T]) -> Future:
        return self.committer.submit(command)

    # ------------------------------------------------------------ consumers
    def _submit_command(self, account_id: UUID, cargo_slug: str, raw_input: Any, prefs: dict[str, Any] | None,
                        idempotency_key: str | None, parent_id: str, batch_index: int,
                        pending: bool) -> Callable[[UnitOfWork], JobView]:
        try:
            admitted = admit(self.catalog, cargo_slug, raw_input, prefs)
            account_key = str(account_id)
            if self.core.queue.account_backlog(account_key) >= self.config.max_queued_per_account:
                raise AdmissionRefused(QUEUE_FULL, f"at most {self.config.max_queued_per_account} queued jobs "
                                                   f"per account")
            budget = self.resolve_budget(account_key, admitted)
        except AdmissionRefused as refusal:
            self.refusals.record(refusal)
            raise
        if idempotency_key:
            job_id = uuid.uuid5(JOB_NAMESPACE, f"{account_id}:{idempotency_key}")
            idem_fp = fingerprint(cargo_slug, msgspec.json.encode(admitted.input_dict).decode(),
                                  msgspec.json.encode(admitted.prefs).decode(), parent_id, batch_index)
        else:
            job_id, idem_fp = self.ids.new_uuid(), ""

        def command(uow: UnitOfWork) -> JobView:
            try:
                job = cmd.submit_in(uow, self.ledger_config, self.config, job_id, account_id, admitted,
                                    parent_id=parent_id, batch_index=batch_index, pending=pending, idem_fp=idem_fp,
                                    budget=budget)
            except LedgerError as exc:
                raise refusal_from_ledger(exc) from None
            return job_view(job)

        return command

    # ------------------------------------------------------------ the market
    def resolve_budget(self, account_id: str, admitted: Admitted, *, check: bool = True) -> mkt.Budget:
        """The budget chain (first hit wins): the Job's own bid, the account's saved bid for
        the Cargo, the current market rate, the Cargo's list rate. With `check`, refuses
        (`no_island_within_budget`, with the current rate) when approved Islands serve the
        Cargo but every one of them asks more than the budget."""
        cargo = admitted.cargo
        list_rate = mkt.list_rate_micro(cargo)
        preference, rate, lowest = self.core.budget_inputs(account_id, cargo.slug)
        bid = admitted.prefs.get("bid_micro")
        if bid is not None:
            budget, source = bid, mkt.BID
        elif preference is not None:
            budget, source = preference, mkt.PREFERENCE
        elif rate is not None:
            budget, source = rate, mkt.MARKET
        else:
            budget, source = list_rate, mkt.LIST
        if check and lowest is not None and lowest > budget:
            current = rate if rate is not None else list_rate
            raise AdmissionRefused(
                NO_ISLAND_WITHIN_BUDGET,
                f"no approved Island serves {cargo.slug!r} within the budget of {mkt.micro_to_credits(budget)} "
                f"credits per {mkt.billing_unit(cargo)} ({source}); the current rate is "
                f"{mkt.micro_to_credits(current)}", rate_micro=current, budget_micro=budget, budget_source=source)
        hold = mkt.price_at_rate(admitted.hold_micro, budget, list_rate)
        return mkt.Budget(budget, source, list_rate, hold)

    def budgets_for(self, account_id: str, admitted: list[Admitted]) -> list[mkt.Budget]:
        """One budget for a batch (same Cargo and prefs for every child: one resolution,
        one refusal check), with each child's own hold."""
        first = self.resolve_budget(account_id, admitted[0])
        return [first] + [mkt.Budget(first.budget_micro, first.source, first.list_rate_micro,
                                     mkt.price_at_rate(a.hold_micro, first.budget_micro, first.list_rate_micro))
                          for a in admitted[1:]]

    def market_rate_micro(self, slug: str) -> int | None:
        return self.core.market_rate_micro(slug)

    def set_asking_prices(self, island_id: UUID, prices: Any, *, by: str) -> bool:
        """Replace an Island's asks (slug | "_default" -> decimal string of credits per the
        Cargo's billing unit). Raises `BadAsk` (nothing written) for a bad map; False when
        unchanged (no event)."""
        asks = mkt.validate_asks(self.catalog, prices, self.config.max_ask_micro)
        changed = self._run(lambda uow: cmd.set_asks_in(uow, island_id, asks, by=by))
        if changed:
            self.core.catch_up(self.clock.now_ms())
        return changed

    async def aset_asking_prices(self, island_id: UUID, prices: Any, *, by: str) -> bool:
        asks = mkt.validate_asks(self.catalog, prices, self.config.max_ask_micro)
        changed = await self._arun(lambda uow: cmd.set_asks_in(uow, island_id, asks, by=by))
        if changed:
            await asyncio.to_thread(self.core.catch_up, self.clock.now_ms())
        return changed

    def island_asks(self, island_id: str) -> dict[str, int] | None:
        with self.core.lock:
            rec = self.core.registry.islands.get(island_id)
            return dict(rec.asks_micro) if rec is not None else None

    def _bid_command(self, account_id: UUID, slug: str, max_price: str | None, by: str):
        self.catalog.by_slug(slug)  # UnknownCargo
        micro = None if max_price is None else mkt.parse_price_micro(max_price, max_micro=self.config.max_ask_micro)
        return lambda uow: cmd.set_bid_in(uow, str(account_id), slug, micro, by=by)

    def set_bid(self, account_id: UUID, slug: str, max_price: str | None, *, by: str) -> bool:
        """Save (None: delete) the account's bid for a Cargo. `UnknownCargo`, `BadPrice`."""
        changed = self._run(self._bid_command(account_id, slug, max_price, by))
        self.core.catch_up(self.clock.now_ms())
        return changed

    async def aset_bid(self, account_id: UUID, slug: str, max_price: str | None, *, by: str) -> bool:
        changed = await self._arun(self._bid_command(account_id, slug, max_price, by))
        await asyncio.to_thread(self.core.catch_up, self.clock.now_ms())  # the next submit sees it
        return changed

    def _read_bids(self, account_id: UUID) -> Callable[[UnitOfWork], dict[str, int]]:
        def read(uow: UnitOfWork) -> dict[str, int]:
            prefs = uow.get_or_none(mkt.bids_id(str(account_id)), fresh=self.shared_store)
            return dict(prefs.bids_micro) if isinstance(prefs, mkt.BidPreferences) else {}

        return read

    def bids(self, account_id: UUID) -> dict[str, int]:
        """The account's saved bids, from its aggregate (read-your-writes on any process)."""
        return self.committer.query(self._read_bids(account_id))

    async def abids(self, account_id: UUID) -> dict[str, int]:
        return await self.committer.aquery(self._read_bids(account_id))

    def _count_refusal(self, exc: BaseException) -> None:
        if isinstance(exc, AdmissionRefused):
            self.refusals.record(exc)

    def submit(self, account_id: UUID, cargo_slug: str, raw_input: Any, prefs: dict[str, Any] | None = None, *,
               idempotency_key: str | None = None, parent_id: str = "", batch_index: int = -1,
               pending: bool = False) -> JobView:
        command = self._submit_command(account_id, cargo_slug, raw_input, prefs, idempotency_key, parent_id,
                                       batch_index, pending)
        try:
            return self._run(command)
        except AdmissionRefused as exc:
            self._count_refusal(exc)
            raise

    async def asubmit(self, account_id: UUID, cargo_slug: str, raw_input: Any,
                      prefs: dict[str, Any] | None = None, *, idempotency_key: str | None = None,
                      parent_id: str = "", batch_index: int = -1, pending: bool = False) -> JobView:
        command = self._submit_command(account_id, cargo_slug, raw_input, prefs, idempotency_key, parent_id,
                                       batch_index, pending)
        try:
            return await self._arun(command)
        except AdmissionRefused as exc:
            self._count_refusal(exc)
            raise

    def submit_future(self, account_id: UUID, cargo_slug: str, raw_input: Any,
                      prefs: dict[str, Any] | None = None) -> Future:
        """Non-blocking submit (benchmarks, simulator): the future holds a JobView."""
        return self._future(self._submit_command(account_id, cargo_slug, raw_input, prefs, None, "", -1, False))

    def _cancel_command(self, job_id: UUID, account_id: UUID | None, by: str) -> Callable[[UnitOfWork], JobView]:
        live = self.core.live_job(job_id)
        delivered = live.delivered_tokens if live is not None else 0

        def command(uow: UnitOfWork) -> JobView:
            return job_view(cmd.cancel_in(uow, self.ledger_config, self.catalog, job_id,
                                          account_id=str(account_id) if account_id else None, by=by,
                                          delivered_tokens=delivered))

        return command

    def cancel(self, job_id: UUID, *, account_id: UUID | None, by: str) -> JobView:
        return self._run(self._cancel_command(job_id, account_id, by))

    async def acancel(self, job_id: UUID, *, account_id: UUID | None, by: str) -> JobView:
        return await self._arun(self._cancel_command(job_id, account_id, by))

    def release_pending(self, job_id: UUID) -> JobView:
        return self._run(lambda uow: job_view(cmd.release_pending_in(uow, job_id)))

    async def arelease_pending(self, job_id: UUID) -> JobView:
        return await self._arun(lambda uow: job_view(cmd.release_pending_in(uow, job_id)))

    def _read_job(self, job_id: UUID, account_id: UUID | None) -> Callable[[UnitOfWork], JobView | None]:
        def read(uow: UnitOfWork) -> JobView | None:
            job = uow.get_or_none(job_id, fresh=self.shared_store)
            if not isinstance(job, Job) or (account_id is not None and job.account_id != str(account_id)):
                return None
            return job_view(job)

        return read

    def get_job(self, job_id: UUID, account_id: UUID | None = None) -> JobView | None:
        """A Job by id; None if unknown or owned by another account (never leak existence)."""
        return self.committer.query(self._read_job(job_id, account_id))

    async def aget_job(self, job_id: UUID, account_id: UUID | None = None) -> JobView | None:
        return await self.committer.aquery(self._read_job(job_id, account_id))

    # ------------------------------------------------------------ islands
    def register_island(self, owner_account_id: UUID, name: str, capabilities: dict[str, Any], *,
                        approve: bool = False, island_id: UUID | None = None, token: str | None = None
                        ) -> IslandCredentials:
        caps = parse_capabilities(capabilities)
        island_id = island_id or self.ids.new_uuid()
        token = token or make_token(island_id)
        self._run(lambda uow: cmd.register_island_in(uow, self.config, island_id, owner_account_id, name[:128],
                                                     hash_token(token), caps, approve=approve))
        return IslandCredentials(str(island_id), token)

    def pair_island(self, island_id: UUID, owner_account_id: UUID, name: str, capabilities: dict[str, Any], *,
                    agent_version: str, nats_user: str, password_hash: str, by: str) -> None:
        """Register a paired Island of the published agent (NATS). Capabilities are
        canonicalised here (BadCapabilities); IslandExists if it is already paired."""
        caps = parse_capabilities({**capabilities, "transport": "nats"})
        token_hash = hash_token(make_token(island_id))  # never shown: NATS Islands authenticate to nats-server
        self._run(lambda uow: cmd.pair_island_in(uow, self.config, island_id, owner_account_id, name[:128],
                                                 token_hash, caps, agent_version=agent_version,
                                                 nats_user=nats_user, password_hash=password_hash, by=by))

    def issue_nats_credential(self, island_id: UUID, *, nats_user: str, password_hash: str, by: str) -> None:
        self._run(lambda uow: cmd.issue_nats_credential_in(uow, island_id, nats_user=nats_user,
                                                           password_hash=password_hash, by=by))

    def set_island_approval(self, island_id: UUID, approved: bool, *, by: str, reason: str) -> None:
        self._run(lambda uow: cmd.set_island_approval_in(uow, island_id, approved, by=by, reason=reason))

    def set_island_draining(self, island_id: UUID, draining: bool, *, by: str, reason: str) -> bool:
        return self._run(lambda uow: cmd.set_island_draining_in(uow, island_id, draining, by=by, reason=reason))

    def adjust_island_karma(self, island_id: UUID, delta_milli: int, *, by: str,
                            reason: str) -> cmd.KarmaAdjustment:
        """An operator's karma adjustment (decision 0041); refusals raise BadKarmaAdjustment."""
        return self._run(lambda uow: cmd.adjust_karma_in(uow, self.config.karma, island_id, delta_milli, by=by,
                                                         reason=reason))

    def island_by_token(self, island_id: UUID, token: str) -> Island | None:
        def read(uow: UnitOfWork) -> Island | None:
            island = uow.get_or_none(island_id, fresh=self.shared_store)
            if not isinstance(island, Island) or not hmac.compare_digest(island.token_hash, hash_token(token)):
                return None
            return island

        return self.committer.query(read)

    def heartbeat(self, island_id: str, *, slots_total: int | None = None, load_permille: int | None = None,
                  latency_ms: int | None = None, warm_models: frozenset[str] | None = None) -> None:
        self.core.heartbeat(island_id, self.clock.now_ms(), slots_total=slots_total, load_permille=load_permille,
                            latency_ms=latency_ms, warm_models=warm_models)

    def accept(self, island_id: str, job_id: UUID, *, view: bool = True) -> JobView | None:
        """The Island takes the offered Job. ``view=False``: return None (no JobView built)."""
        deadline = self.clock.now_ms() + self.config.lease_ms
        return self._run(lambda uow: job_view_if(cmd.accept_in(uow, job_id, island_id, deadline), view))

    def accept_future(self, island_id: str, job_id: UUID) -> Future:
        deadline = self.clock.now_ms() + self.config.lease_ms
        return self._future(lambda uow: job_view(cmd.accept_in(uow, job_id, island_id, deadline)))

    def reject(self, island_id: str, job_id: UUID, *, view: bool = True) -> JobView | None:
        return self._run(lambda uow: job_view_if(cmd.reject_in(uow, self.config, job_id, island_id), view))

    def renew_lease(self, island_id: str, job_id: UUID) -> bool:
        return self.core.renew_lease(island_id, job_id, self.clock.now_ms())

    def output(self, island_id: str, job_id: UUID, tokens: int) -> bool:
        return self.core.output_progress(island_id, job_id, tokens)

    def _complete_command(self, island_id: str, job_id: UUID, usage: dict[str, Any], output: str,
                          compute_ms: int, view: bool = True) -> Callable[[UnitOfWork], JobView | None]:
        return lambda uow: job_view_if(cmd.complete_in(uow, self.ledger_config, self.config, self.catalog, job_id,
                                                       island_id, usage, output, compute_ms), view)

    def complete(self, island_id: str, job_id: UUID, usage: dict[str, Any], output: str,
                 compute_ms: int, *, view: bool = True) -> JobView | None:
        return self._run(self._complete_command(island_id, job_id, usage, output, compute_ms, view))

    def complete_future(self, island_id: str, job_id: UUID, usage: dict[str, Any], output: str,
                        compute_ms: int) -> Future:
        return self._future(self._complete_command(island_id, job_id, usage, output, compute_ms))

    def _fail_command(self, island_id: str, job_id: UUID, reason: str, retryable: bool, view: bool = True):
        live = self.core.live_job(job_id)
        streamed = bool(live and live.streamed)
        return lambda uow: job_view_if(cmd.fail_in(uow, self.ledger_config, self.config, job_id, island_id, reason,
                                                   retryable=retryable, streamed=streamed), view)

    def fail(self, island_id: str, job_id: UUID, reason: str, *, retryable: bool = False,
             view: bool = True) -> JobView | None:
        return self._run(self._fail_command(island_id, job_id, reason, retryable, view))

    # async variants for the HTTP / channel layer
    async def aaccept(self, island_id: str, job_id: UUID) -> JobView:
        deadline = self.clock.now_ms() + self.config.lease_ms
        return await self._arun(lambda uow: job_view(cmd.accept_in(uow, job_id, island_id, deadline)))

    async def areject(self, island_id: str, job_id: UUID) -> JobView:
        return await self._arun(lambda uow: job_view(cmd.reject_in(uow, self.config, job_id, island_id)))

    async def acomplete(self, island_id: str, job_id: UUID, usage: dict[str, Any], output: str,
                        compute_ms: int) -> JobView:
        return await self._arun(self._complete_command(island_id, job_id, usage, output, compute_ms))

    async def afail(self, island_id: str, job_id: UUID, reason: str, *, retryable: bool = False) -> JobView:
        return await self._arun(self._fail_command(island_id, job_id, reason, retryable))
