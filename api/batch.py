"""Batches: one request, many child Jobs (1..100), one merged answer.

The parent is a `Batch` aggregate; each input is an ordinary child Job (with `parent_id`
and `batch_index`) admitted, held and run like any other Job. Creation is one atomic
save: the Batch and every child with its hold (a batch is admitted whole or not at all).
Children beyond `max_parallelism` are created `pending` and released (`Job.Queued`) as
earlier ones finish.

Orchestration (`advance_in`, one command on the Batch and its children, so optimistic
concurrency keeps it right with several processes): release pending children up to the
parallelism; under `fail_fast`, cancel what is left once a child failed; when every
child is terminal, merge the outputs and finish the Batch. It runs when a child's
terminal event is committed by this process (commit listener) and, as a safety net, for
every unfinished Batch every `batch_sweep_s` (a crash between a child's completion and
the advance loses nothing).

States (BatchJob / BatchProgress): children `pending, queued, running, succeeded, failed,
cancelled`; the parent `queued, running` then `succeeded, failed, cancelled`. best_effort:
succeeded if at least one child succeeded; fail_fast: failed as soon as one child failed.
Merge: `concat` joins the succeeded outputs in index order with "\\n"; `flatten` makes
one JSON array (a child output that is a JSON array is spliced in, any other output is
one element; failed children contribute nothing). docs/decisions/0016-batches.md.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec
import structlog
from eventsourcing.domain import Aggregate
from eventsourcing.utils import get_topic

from streams.frames import done_event, error_event, progress_event, status_event, usage_out
from api.errors import ApiError, from_refusal, validation_failed
from api.schemas import (
    BatchChildOut,
    BatchInfo,
    BatchJobOut,
    BatchProgressOut,
    CreateBatchRequest,
    iso,
)
from ledger.errors import LedgerError
from ledger.service import LedgerConfig
from scheduler import commands as cmd
from scheduler.admission import QUEUE_FULL, AdmissionRefused, admit, refusal_from_ledger
from scheduler.commands import MAX_OUTPUT_CHARS
from scheduler.jobs import ASSIGNED, CANCELLED, COMPLETED, FAILED, PENDING, QUEUED, RUNNING, TERMINAL, TIMEOUT, Job
from scheduler.service import Scheduler
from store.clock import ms_to_datetime
from store.factory import iter_log
from store.unit_of_work import GroupCommitter, UnitOfWork

log = structlog.get_logger("api.batch")

BATCH_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0011")
CHILD_STATE = {PENDING: "pending", QUEUED: "queued", ASSIGNED: "queued", RUNNING: "running", COMPLETED: "succeeded",
               FAILED: "failed", TIMEOUT: "failed", CANCELLED: "cancelled"}
PARENT_JOB_STATUS = {"succeeded": "completed", "failed": "failed", "cancelled": "cancelled"}
CONCAT_SEPARATOR = "\n"


class Batch(Aggregate):
    class Created(Aggregate.Created):
        account_id: str
        cargo: str
        cargo_id: int
        kind: str
        child_ids: list
        merge_strategy: str
        fail_mode: str
        max_parallelism: int
        prefs: dict
        fingerprint: str

    def __init__(self, account_id: str, cargo: str, cargo_id: int, kind: str, child_ids: list, merge_strategy: str,
                 fail_mode: str, max_parallelism: int, prefs: dict, fingerprint: str) -> None:
        self.account_id = account_id
        self.cargo = cargo
        self.cargo_id = cargo_id
        self.kind = kind
        self.child_ids = list(child_ids)
        self.merge_strategy = merge_strategy
        self.fail_mode = fail_mode
        self.max_parallelism = max_parallelism
        self.prefs = prefs
        self.fingerprint = fingerprint
        self.done = 0
        self.state = ""  # "" while running; then succeeded | failed | cancelled
        self.output: str | None = None
        self.error: str | None = None
        self.usage: dict | None = None
        self.charged_micro = 0
        self.finished_at = None

    class Progressed(Aggregate.Event):
        """`done` of `total` children are terminal."""

        done: int
        total: int

        def apply(self, batch: Batch) -> None:
            batch.done = self.done

    class Finished(Aggregate.Event):
        state: str
        output: str | None
        error: str | None
        usage: dict
        charged_micro: int
        succeeded: int
        failed: int
        cancelled: int

        def apply(self, batch: Batch) -> None:
            batch.state = self.state
            batch.output = self.output
            batch.error = self.error
            batch.usage = self.usage
            batch.charged_micro = self.charged_micro
            batch.done = len(batch.child_ids)
            batch.finished_at = self.timestamp

    @property
    def finished(self) -> bool:
        return bool(self.state)


BATCH_TOPICS = (get_topic(Batch.Created), get_topic(Batch.Finished))


# ------------------------------------------------------------------ commands
def _merge(strategy: str, outputs: list[str]) -> str:
    if strategy == "concat":
        return CONCAT_SEPARATOR.join(outputs)
    merged: list[Any] = []
    for out in outputs:
        try:
            value = msgspec.json.decode(out)
        except (msgspec.DecodeError, ValueError):
            value = out
        if isinstance(value, list):
            merged.extend(value)
        else:
            merged.append(value)
    return msgspec.json.encode(merged).decode()


def _finish(uow: UnitOfWork, batch: Batch, children: list[Job], *, cancelled_by_consumer: bool) -> None:
    succeeded = [c for c in children if c.status == COMPLETED]
    failed = [c for c in children if c.status in (FAILED, TIMEOUT)]
    cancelled = [c for c in children if c.status == CANCELLED]
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    steps = 0
    for c in children:
        u = c.usage or {}
        for k in usage:
            usage[k] += int(u.get(k, 0))
        steps += int(u.get("steps", 0))
    if batch.kind == "image":
        usage["steps"] = steps
    charged = sum(c.charged_micro for c in children)
    if cancelled_by_consumer:
        state, error = "cancelled", "cancelled by consumer"
    elif batch.fail_mode == "fail_fast" and failed:
        first = min(failed, key=lambda c: c.batch_index)
        state, error = "failed", f"child {first.batch_index} failed: {first.error or 'failed'}"
    elif succeeded:
        state = "succeeded"
        error = None if not failed else f"{len(failed)} of {len(children)} children failed"
    else:
        state, error = "failed", "every child failed"
    outputs = [c.output or "" for c in sorted(succeeded, key=lambda c: c.batch_index)]
    output: str | None = _merge(batch.merge_strategy, outputs) if outputs else None
    if output is not None and len(output) > MAX_OUTPUT_CHARS:
        output, error = None, f"merged output exceeds {MAX_OUTPUT_CHARS} characters; read the children's outputs"
    ts = ms_to_datetime(uow.now_ms)
    if batch.done != len(children):
        batch.trigger_event(Batch.Progressed, done=len(children), total=len(children), timestamp=ts)
    batch.trigger_event(Batch.Finished, state=state, output=output, error=error, usage=usage, charged_micro=charged,
                        succeeded=len(succeeded), failed=len(failed), cancelled=len(cancelled), timestamp=ts)


def _children(uow: UnitOfWork, batch: Batch, fresh: bool) -> list[Job]:
    return [cmd.load_job(uow, UUID(cid)) if not fresh else _fresh_job(uow, UUID(cid)) for cid in batch.child_ids]


def _fresh_job(uow: UnitOfWork, job_id: UUID) -> Job:
    job = uow.get_or_none(job_id, fresh=True)
    if not isinstance(job, Job):
        raise cmd.UnknownJob(f"unknown job {job_id}")
    return job


def advance_in(uow: UnitOfWork, ledger_config: LedgerConfig, catalog: Any, batch_id: UUID, fresh: bool,
               delivered: dict[str, int] | None = None) -> Batch | None:
    batch = uow.get_or_none(batch_id, fresh=fresh)
    if not isinstance(batch, Batch) or batch.finished:
        return batch if isinstance(batch, Batch) else None
    children = _children(uow, batch, fresh)
    if batch.fail_mode == "fail_fast" and any(c.status in (FAILED, TIMEOUT) for c in children):
        for c in children:
            if c.status not in TERMINAL:
                cmd.cancel_in(uow, ledger_config, catalog, c.id, account_id=None, by="batch fail_fast",
                              delivered_tokens=(delivered or {}).get(str(c.id), 0))
    done = sum(1 for c in children if c.status in TERMINAL)
    if done == len(children):
        _finish(uow, batch, children, cancelled_by_consumer=False)
        return batch
    limit = batch.max_parallelism or len(children)
    active = sum(1 for c in children if c.status in (QUEUED, ASSIGNED, RUNNING))
    for c in sorted((c for c in children if c.status == PENDING), key=lambda c: c.batch_index)[: max(0, limit - active)]:
        cmd.release_pending_in(uow, c.id)
    if done != batch.done:
        batch.trigger_event(Batch.Progressed, done=done, total=len(children), timestamp=ms_to_datetime(uow.now_ms))
    return batch


def cancel_in(uow: UnitOfWork, ledger_config: LedgerConfig, catalog: Any, batch_id: UUID, account_id: str,
              fresh: bool, delivered: dict[str, int]) -> Batch:
    batch = uow.get_or_none(batch_id, fresh=fresh)
    if not isinstance(batch, Batch) or batch.account_id != account_id:
        raise cmd.UnknownJob(f"unknown job {batch_id}")
    if batch.finished:
        return batch
    children = _children(uow, batch, fresh)
    for c in children:
        if c.status not in TERMINAL:
            cmd.cancel_in(uow, ledger_config, catalog, c.id, account_id=None, by="consumer",
                          delivered_tokens=delivered.get(str(c.id), 0))
    _finish(uow, batch, children, cancelled_by_consumer=True)
    return batch


def advance_for_child_in(uow: UnitOfWork, ledger_config: LedgerConfig, catalog: Any, job_id: UUID,
                         fresh: bool) -> None:
    job = uow.get_or_none(job_id)
    if isinstance(job, Job) and job.parent_id:
        advance_in(uow, ledger_config, catalog, UUID(job.parent_id), fresh)


# ------------------------------------------------------------------ views
@dataclass(frozen=True)
class BatchSnapshot:
    batch: Batch
    children: list[Job]

    @property
    def state(self) -> str:
        if self.batch.finished:
            return self.batch.state
        return "running" if any(c.status in (RUNNING, ASSIGNED) or c.status in TERMINAL for c in self.children) \
            else "queued"

    def child_out(self) -> list[BatchChildOut]:
        return [BatchChildOut(id=str(c.id), batch_index=c.batch_index, state=CHILD_STATE.get(c.status, c.status),
                              error=c.error, host_id=c.island_id or None)
                for c in sorted(self.children, key=lambda c: c.batch_index)]

    def counts(self) -> dict[str, int]:
        out = {"pending": 0, "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
        for c in self.children:
            out[CHILD_STATE.get(c.status, c.status)] = out.get(CHILD_STATE.get(c.status, c.status), 0) + 1
        return out

    def batch_job(self) -> BatchJobOut:
        counts = self.counts()
        b = self.batch
        return BatchJobOut(id=str(b.id), state=self.state, workload=b.cargo,
                           batch=BatchInfo(chunk_count=len(b.child_ids), merge_strategy=b.merge_strategy,
                                           fail_mode=b.fail_mode, completed=counts["succeeded"],
                                           failed=counts["failed"], cancelled=counts["cancelled"],
                                           running=counts["running"], max_parallelism=b.max_parallelism or None),
                           children=self.child_out(), created_at=iso(b.created_on) or "")

    def progress(self) -> BatchProgressOut:
        b = self.batch
        return BatchProgressOut(parent_id=str(b.id), parent_state=self.state, chunk_count=len(b.child_ids),
                                merge_strategy=b.merge_strategy, fail_mode=b.fail_mode, child_states=self.counts(),
                                children=self.child_out())

    def job_status(self) -> str:
        if self.batch.finished:
            return PARENT_JOB_STATUS[self.batch.state]
        return self.state


# ------------------------------------------------------------------ stream events of the parent
def batch_stream_events(ev: Any) -> list[tuple[str, bytes]]:
    if not isinstance(ev, Batch.Event):
        return []
    batch_id = str(ev.originator_id)
    if isinstance(ev, Batch.Created):
        return [(batch_id, status_event("queued"))]
    if isinstance(ev, Batch.Progressed):
        return [(batch_id, progress_event(ev.done, ev.total))]
    if isinstance(ev, Batch.Finished):
        out = [(batch_id, status_event(PARENT_JOB_STATUS[ev.state]))]
        if ev.state == "succeeded":
            kind = "image" if "steps" in ev.usage else "chat"
            out.append((batch_id, done_event(usage_out(kind, ev.usage, ev.charged_micro))))
        else:
            out.append((batch_id, error_event(ev.error or ev.state)))
        return out
    return []


# ------------------------------------------------------------------ service
class BatchService:
    def __init__(self, committer: GroupCommitter, scheduler: Scheduler, *, fresh_reads: bool) -> None:
        self.committer = committer
        self.scheduler = scheduler
        self.ledger_config = scheduler.ledger_config
        self.fresh = fresh_reads
        self.unfinished: set[UUID] = set()
        self.log_position = 0

    @property
    def catalog(self) -> Any:
        """The live catalog (kill switches applied), never a copy taken at start."""
        return self.scheduler.catalog

    # -- creation
    async def asubmit(self, account_id: UUID, req: CreateBatchRequest, idempotency_key: str | None) -> BatchSnapshot:
        admitted = []
        errors: dict[str, list[str]] = {}
        for i, raw in enumerate(req.inputs):
            try:
                admitted.append(admit(self.catalog, req.workload, raw, req.prefs()))
            except AdmissionRefused as refusal:
                if refusal.reason != "invalid_input":
                    raise from_refusal(refusal) from None
                err = from_refusal(refusal, field_prefix=f"inputs[{i}]")
                if err.status == 413:
                    raise err from None
                for k, v in (err.errors or {}).items():
                    errors.setdefault(k, []).extend(v)
        if errors:
            raise validation_failed(errors)
        sched = self.scheduler
        backlog = sched.core.queue.account_backlog(str(account_id))
        if backlog + len(admitted) > sched.config.max_queued_per_account:
            raise from_refusal(AdmissionRefused(QUEUE_FULL, f"at most {sched.config.max_queued_per_account} "
                                                            f"queued jobs per account"))
        try:
            budgets = sched.budgets_for(str(account_id), admitted)
        except AdmissionRefused as refusal:
            sched.refusals.record(refusal)
            raise from_refusal(refusal) from None
        max_par = req.max_parallelism or 0
        fingerprint = msgspec.json.encode([req.workload, req.inputs, req.merge_strategy, req.fail_mode, max_par,
                                           req.prefs()]).decode()
        fp = uuid.uuid5(BATCH_NAMESPACE, fingerprint).hex
        batch_id = (uuid.uuid5(BATCH_NAMESPACE, f"{account_id}:{idempotency_key}") if idempotency_key
                    else sched.ids.new_uuid())
        child_ids = [uuid.uuid5(batch_id, str(i)) for i in range(len(admitted))]
        cargo = admitted[0].cargo

        def command(uow: UnitOfWork) -> BatchSnapshot:
            existing = uow.get_or_none(batch_id)
            if existing is not None:
                if not isinstance(existing, Batch) or existing.account_id != str(account_id) \
                        or existing.fingerprint != fp:
                    raise cmd.IdempotencyMismatch(f"batch {batch_id} exists with different content")
                return BatchSnapshot(existing, _children(uow, existing, False))
            _precheck_funds(uow, self.ledger_config, account_id, sum(b.hold_micro for b in budgets), cargo)
            children = []
            try:
                for i, (jid, a, b) in enumerate(zip(child_ids, admitted, budgets, strict=True)):
                    children.append(cmd.submit_in(uow, self.ledger_config, sched.config, jid, account_id, a,
                                                  parent_id=str(batch_id), batch_index=i,
                                                  pending=bool(max_par) and i >= max_par, budget=b))
            except LedgerError as exc:
                raise refusal_from_ledger(exc) from None
            batch = Batch._create(Batch.Created, id=batch_id, account_id=str(account_id), cargo=cargo.slug,
                                  cargo_id=cargo.id, kind=cargo.kind, child_ids=[str(c) for c in child_ids],
                                  merge_strategy=req.merge_strategy, fail_mode=req.fail_mode,
                                  max_parallelism=max_par, prefs=admitted[0].prefs, fingerprint=fp,
                                  timestamp=ms_to_datetime(uow.now_ms))
            uow.add(batch)
            return BatchSnapshot(batch, children)

        try:
            snap = await self.committer.aexecute(command)
        except AdmissionRefused as refusal:
            raise from_refusal(refusal) from None
        self.unfinished.add(batch_id)
        return snap

    # -- reads and commands
    async def aget(self, batch_id: UUID, account_id: UUID | None) -> BatchSnapshot | None:
        fresh = self.fresh

        def read(uow: UnitOfWork) -> BatchSnapshot | None:
            batch = uow.get_or_none(batch_id, fresh=fresh)
            if not isinstance(batch, Batch) or (account_id is not None and batch.account_id != str(account_id)):
                return None
            return BatchSnapshot(batch, _children(uow, batch, fresh))

        return await self.committer.aquery(read)

    def _delivered(self, batch: Batch | None) -> dict[str, int]:
        out: dict[str, int] = {}
        if batch is None:
            return out
        for cid in batch.child_ids:
            live = self.scheduler.core.live_job(UUID(cid))
            if live is not None and live.delivered_tokens:
                out[cid] = live.delivered_tokens
        return out

    async def acancel(self, batch_id: UUID, account_id: UUID) -> BatchSnapshot:
        current = await self.aget(batch_id, account_id)
        if current is None:
            raise ApiError(404, "not_found", "job not found")
        delivered = self._delivered(current.batch)
        fresh = self.fresh

        def command(uow: UnitOfWork) -> BatchSnapshot:
            batch = cancel_in(uow, self.ledger_config, self.catalog, batch_id, str(account_id), fresh, delivered)
            return BatchSnapshot(batch, _children(uow, batch, False))

        return await self.committer.aexecute(command)

    def advance(self, batch_id: UUID) -> None:
        """Non-blocking: queue an advance of this batch (any thread)."""
        fresh = self.fresh
        try:
            fut = self.committer.submit(lambda uow: advance_in(uow, self.ledger_config, self.catalog, batch_id,
                                                               fresh))
        except Exception as exc:  # noqa: BLE001 - the sweeper retries
            log.warning("batch_advance_not_queued", batch_id=str(batch_id), error=repr(exc))
            return
        fut.add_done_callback(self._advanced(batch_id))

    def _advanced(self, batch_id: UUID):
        def done(fut) -> None:
            exc = fut.exception()
            if exc is not None:
                log.warning("batch_advance_failed", batch_id=str(batch_id), error=repr(exc))
            elif isinstance(fut.result(), Batch) and fut.result().finished:
                self.unfinished.discard(batch_id)
        return done

    # -- commit listener: a child's terminal event -> advance its batch
    def on_commit(self, recordings: list[Any]) -> None:
        for rec in recordings:
            ev = rec.domain_event
            if isinstance(ev, (Job.Completed, Job.Failed, Job.Cancelled, Job.TimedOut)):
                if getattr(ev, "by", "") == "batch fail_fast":
                    continue
                try:
                    self.committer.submit(lambda uow, j=ev.originator_id, f=self.fresh: advance_for_child_in(
                        uow, self.ledger_config, self.catalog, j, f))
                except Exception:  # noqa: BLE001 - the sweeper catches up
                    pass
            elif isinstance(ev, Batch.Created):
                self.unfinished.add(ev.originator_id)
            elif isinstance(ev, Batch.Finished):
                self.unfinished.discard(ev.originator_id)

    # -- sweeper
    def scan_log(self) -> None:
        """Learn unfinished batches from the log (blocking: run in a thread)."""
        for pos, ev in iter_log(self.committer.app, start=self.log_position + 1, topics=BATCH_TOPICS):
            self.log_position = pos
            if isinstance(ev, Batch.Created):
                self.unfinished.add(ev.originator_id)
            elif isinstance(ev, Batch.Finished):
                self.unfinished.discard(ev.originator_id)

    async def sweep(self) -> int:
        await asyncio.to_thread(self.scan_log)
        for batch_id in list(self.unfinished):
            self.advance(batch_id)
        return len(self.unfinished)


def _precheck_funds(uow: UnitOfWork, config: LedgerConfig, account_id: UUID, total_micro: int, cargo: Any) -> None:
    """The whole batch's worst case must fit, or nothing is admitted (402 with the total)."""
    from ledger.errors import FreeTierExhausted, InsufficientCredits
    from ledger.service import load_account

    try:
        acct = load_account(uow, account_id)
    except LedgerError as exc:
        raise refusal_from_ledger(exc) from None
    if acct.suspended or (not acct.kyc_verified and (cargo.requires_kyc or not cargo.free_tier)):
        return  # the per-child hold gives the precise refusal (suspended / KYC)
    if not acct.kyc_verified:
        remaining = config.free_tier_limit_micro - acct.free_tier_used_micro()
        if 0 < remaining < total_micro:
            raise refusal_from_ledger(FreeTierExhausted(total_micro, remaining))
    if total_micro > acct.spendable_micro:
        raise refusal_from_ledger(InsufficientCredits(total_micro, acct.spendable_micro))


def job_ids(children: Iterable[Job]) -> list[str]:
    return [str(c.id) for c in children]
