"""Consumer endpoints (/api/v1, api-contract.md): account, workloads, jobs (create, get,
list, cancel, retry, stream), batches, API keys, health.

Reads go to the aggregates through the group committer (re-read from the store when
several processes write, so a GET after a POST never 404s on another process); another
account's id answers 404 exactly like an unknown one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec
from litestar import MediaType, Request, Response, Router, delete, get, post
from litestar.params import FromPath, JSONBody, Parameter
from litestar.response import Stream

from streams import frames as br
from api.batch import Batch, BatchSnapshot
from api.errors import ApiError, not_found, strict_decode, unauthorized, validation_failed
from api.keys import ApiKey, KeyError_, KeyInfo
from api.schemas import (
    MAX_LIST_LIMIT,
    AccountEnvelope,
    AccountOut,
    ApiKeyCreated,
    ApiKeyEnvelope,
    ApiKeyListEnvelope,
    ApiKeyOut,
    BatchJobOut,
    BatchProgressOut,
    CreateApiKeyRequest,
    CreateBatchRequest,
    CreateJobRequest,
    HealthOut,
    JobEnvelope,
    JobImageOut,
    JobListEnvelope,
    JobOut,
    JobOutputEnvelope,
    JobOutputOut,
    Usage,
    WorkloadEnvelope,
    WorkloadListEnvelope,
    WorkloadOut,
    encode,
    iso,
)
from ledger.accounts import Account
from ledger.errors import UnknownAccount
from ledger.pricing import micro_to_credits
from ledger.service import balance_of
from scheduler import commands as cmd
from scheduler.jobs import TERMINAL, Job
from scheduler.service import JobView, job_view
from store.clock import datetime_to_ms, id_from_text, ms_to_datetime
from store.unit_of_work import UnitOfWork

if TYPE_CHECKING:
    from api.services import ApiServices

LOW_BALANCE_MICRO = 10_000_000  # "low_balance" under 10 credits
TERMINAL_GRACE_S = 5.0  # a finished Job whose stream has no final event gets one synthesised after this
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
VERSION = "1"


def ok(obj: Any, status: int = 200) -> Response:
    return Response(content=encode(obj), status_code=status, media_type=MediaType.JSON)


def parse_uuid(text: str, what: str = "job") -> UUID:
    try:
        return id_from_text(text)  # an Id: it keys the write path's dicts (store.clock)
    except (ValueError, TypeError):
        raise not_found(what) from None


def _credits(micro: int) -> Decimal:
    return micro_to_credits(int(micro))


# ------------------------------------------------------------------ views
def public_status(status: str) -> str:
    return "queued" if status == "assigned" else status


def usage_of(kind: str, usage: dict[str, Any] | None, charged_micro: int) -> Usage | None:
    if usage is None:
        return None
    return msgspec.convert(br.usage_out(kind, usage, charged_micro), Usage)


def job_out(v: JobView, island_name: str | None = None) -> JobOut:
    tps = Decimal(v.tokens_per_s_milli) / 1000 if v.tokens_per_s_milli else None
    terminal = v.status in TERMINAL
    return JobOut(
        id=v.id, workload_id=v.cargo_id, workload_slug=v.cargo, status=public_status(v.status), input=v.input,
        output=v.output, error=v.error, created_at=iso(v.created_at) or "", started_at=iso(v.started_at),
        completed_at=iso(v.completed_at), duration_ms=v.duration_ms,
        usage=usage_of(v.kind, v.usage, v.charged_micro) if v.usage is not None else None,
        model=v.model or None, island_id=v.island_id or None, island_name=island_name, tokens_per_second=tps,
        credits_held=Decimal(0) if terminal else _credits(v.hold_micro), credits_charged=_credits(v.charged_micro),
        attempts=v.attempts, parent_id=v.parent_id or None, batch_index=v.batch_index if v.parent_id else None,
        **market_fields(v))


def market_fields(v: JobView) -> dict[str, Any]:
    """The exchange's extras on a Job: its budget and source, and its clearing rate once assigned."""
    if not v.budget_source:
        return {}
    return {"budget": _credits(v.budget_micro), "budget_source": v.budget_source,
            "clearing_price": _credits(v.clearing_micro) if v.clearing_micro >= 0 else None}


def batch_job_out(snap: BatchSnapshot) -> JobOut:
    b, children = snap.batch, snap.children
    started = [c.started_at for c in children if c.started_at is not None]
    started_at = min(started) if started else None
    completed_at = b.finished_at
    duration = int((completed_at - started_at).total_seconds() * 1000) if started_at and completed_at else None
    charged = sum(c.charged_micro for c in children)
    held = sum(c.hold_micro for c in children if c.status not in TERMINAL)
    return JobOut(
        id=str(b.id), workload_id=b.cargo_id, workload_slug=b.cargo, status=snap.job_status(),
        input={"inputs": [c.input for c in sorted(children, key=lambda c: c.batch_index)],
               "merge_strategy": b.merge_strategy, "fail_mode": b.fail_mode,
               "max_parallelism": b.max_parallelism or None},
        output=b.output, error=b.error, created_at=iso(b.created_on) or "", started_at=iso(started_at),
        completed_at=iso(completed_at), duration_ms=duration,
        usage=usage_of(b.kind, b.usage, b.charged_micro) if b.usage is not None else None,
        credits_held=_credits(held), credits_charged=_credits(charged), is_batch=True)


def _workload(c: Any) -> WorkloadOut:
    v = c.workload_view()
    return WorkloadOut(**v, kind=c.kind, default_model=c.model, models=sorted(c.models), requires_kyc=c.requires_kyc,
                       free_tier=c.free_tier)


def _expiry_ms(info: KeyInfo) -> str | None:
    return iso(ms_to_datetime(info.expires_at_ms)) if info.expires_at_ms else None


def key_out(info: KeyInfo, live_last_used_ms: int | None = None) -> ApiKeyOut:
    last = max(info.last_used_ms, live_last_used_ms or 0)
    return ApiKeyOut(id=info.key_id, name=info.name, prefix=info.prefix, created_at=iso(info.created_at) or "",
                     last_used_at=iso(ms_to_datetime(last)) if last else None, expires_at=_expiry_ms(info),
                     scopes=list(info.scopes), revoked_at=iso(info.revoked_at))


# ------------------------------------------------------------------ SSE
def replay_from_job(view: JobOut, after: str | None, id_lines: bool = False) -> list[bytes]:
    """The whole sequence of a finished Job whose stream has expired, from the Job itself
    (ids `0-1`, `0-2`, ... so a resume with one of them skips what was sent)."""
    events: list[bytes] = [br.status_event(view.status)]
    if view.status == "completed":
        if view.output is not None:
            image = _image_payload(view.output) if not view.is_batch else None
            events.append(br.image_event(**image) if image is not None else br.token_event(view.output))
        usage = msgspec.to_builtins(view.usage, builtin_types=(Decimal,)) if view.usage is not None else \
            {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "credits_used": 0}
        events.append(br.done_event(usage))
    else:
        events.append(br.error_event(view.error or view.status))
    start = (br.parse_id(after) or (0, 0))[1] if after and after.startswith("0-") else 0
    return [br.sse_frame(f"0-{i}", data, id_line=id_lines) for i, data in enumerate(events, 1) if i > start]


def _image_payload(output: str) -> dict[str, Any] | None:
    try:
        obj = msgspec.json.decode(output)
    except (msgspec.DecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or "image_data" not in obj:
        return None
    extra = {k: obj[k] for k in ("width", "height", "seed") if k in obj}
    return {"image_b64": obj["image_data"], "fmt": obj.get("format", "png"), **extra}


def _terminal_only(view: JobOut) -> bytes:
    if view.status == "completed":
        usage = msgspec.to_builtins(view.usage, builtin_types=(Decimal,)) if view.usage is not None else {}
        return br.done_event(usage)
    return br.error_event(view.error or view.status)


async def sse_stream(services: ApiServices, job_id: str, last_event_id: str | None,
                     load: Callable[[], Awaitable[JobOut | None]], id_lines: bool = False) -> AsyncIterator[bytes]:
    """The Job's events from the start (or after `last_event_id`) until done/error, as SSE
    frames laid out by `streams.frames.sse_frame` (decision 0050); keep-alive comments
    while idle."""
    broker = services.broker
    keepalive_s = services.settings.api.sse_keepalive_s
    if not await broker.exists(job_id):
        view = await load()
        if view is not None and view.status in ("completed", "failed", "cancelled", "timeout"):
            for frame in replay_from_job(view, last_event_id, id_lines):
                yield frame
            return
    sub = broker.subscribe(job_id, last_event_id)
    services.sse_open.add(sub)
    last_seen = br.parse_id(last_event_id)
    terminal_seen_at: float | None = None
    try:
        while not services.draining.is_set():
            wait_s = keepalive_s if terminal_seen_at is None else min(keepalive_s, TERMINAL_GRACE_S)
            entries = await sub.next(wait_s)
            if entries is None:
                view = await load()
                if view is not None and view.status in ("completed", "failed", "cancelled", "timeout"):
                    now = time.monotonic()
                    terminal_seen_at = terminal_seen_at or now
                    if now - terminal_seen_at >= TERMINAL_GRACE_S or not await broker.exists(job_id):
                        ms, seq = last_seen or (int(time.time() * 1000), 0)
                        yield br.sse_frame(br.format_id((ms, seq + 1)), _terminal_only(view), id_line=id_lines)
                        return
                yield br.KEEPALIVE
                continue
            frames = []
            ended = False
            for eid, data in entries:
                frames.append(br.sse_frame(eid, data, id_line=id_lines))
                last_seen = br.parse_id(eid) or last_seen
                if br.is_terminal(data):
                    ended = True
                    break
            yield b"".join(frames)  # one write for everything that arrived together
            if ended:
                return
    finally:
        services.sse_open.discard(sub)
        sub.close()


# ------------------------------------------------------------------ the router
def consumer_router(services: ApiServices) -> Router:
    c = services.coordinator
    sched = c.scheduler
    committer = c.committer
    fresh = services.fresh_reads
    encoded: dict[str, Any] = {"catalog": None}

    def workload_bodies() -> tuple[bytes, dict[str, bytes]]:
        """Encoded once per catalog version (a kill switch makes a new Catalog object)."""
        catalog = sched.catalog
        if encoded["catalog"] is not catalog:
            items = {w.slug: _workload(w) for w in catalog.all()}
            encoded["all"] = encode(WorkloadListEnvelope(list(items.values())))
            encoded["one"] = {slug: encode(WorkloadEnvelope(w)) for slug, w in items.items()}
            encoded["catalog"] = catalog
        return encoded["all"], encoded["one"]

    def island_name(island_id: str) -> str | None:
        rec = sched.core.registry.islands.get(island_id) if island_id else None
        return rec.name if rec is not None else None

    async def read_any(job_id: UUID, account_id: UUID) -> JobView | BatchSnapshot | None:
        def read(uow: UnitOfWork) -> JobView | BatchSnapshot | None:
            agg = uow.get_or_none(job_id, fresh=fresh)
            if isinstance(agg, Job) and agg.account_id == str(account_id):
                return job_view(agg)
            if isinstance(agg, Batch) and agg.account_id == str(account_id):
                kids = [uow.get_or_none(UUID(cid), fresh=fresh) for cid in agg.child_ids]
                return BatchSnapshot(agg, [k for k in kids if isinstance(k, Job)])
            return None

        return await committer.aquery(read)

    def out(found: JobView | BatchSnapshot) -> JobOut:
        return batch_job_out(found) if isinstance(found, BatchSnapshot) else job_out(found, island_name(found.island_id))

    async def load_out(job_id: UUID, account_id: UUID) -> JobOut:
        found = await read_any(job_id, account_id)
        if found is None:
            raise not_found("job")
        return out(found)

    # -------------------------------------------------------------- account
    @get("/account", summary="The account of the API key")
    async def get_account(request: Request) -> Response[AccountEnvelope]:
        account_id: UUID = request.user.account_id

        def read(uow: UnitOfWork) -> AccountOut | None:
            acct = uow.get_or_none(account_id, fresh=fresh)
            if not isinstance(acct, Account):
                return None
            bal = balance_of(c.ledger.config, acct)
            return AccountOut(id=bal.account_id, email=bal.email, credits=_credits(bal.spendable_micro),
                              created_at=iso(acct.created_on) or "", held=_credits(bal.held_micro),
                              spent=_credits(bal.spent_micro), kyc_verified=bal.kyc_verified,
                              suspended=bal.suspended, free_tier_remaining=_credits(bal.free_tier_remaining_micro),
                              low_balance=bal.spendable_micro < LOW_BALANCE_MICRO)

        account = await committer.aquery(read)
        if account is None:
            raise unauthorized("the API key's account does not exist")
        return ok(AccountEnvelope(account))

    # -------------------------------------------------------------- workloads
    @get("/workloads", summary="Every workload (Cargo)")
    async def list_workloads() -> Response[WorkloadListEnvelope]:
        return Response(content=workload_bodies()[0], media_type=MediaType.JSON)

    @get("/workloads/{slug:str}", summary="One workload by slug")
    async def get_workload(slug: FromPath[str]) -> Response[WorkloadEnvelope]:
        body = workload_bodies()[1].get(slug)
        if body is None:
            raise not_found("workload")
        return Response(content=body, media_type=MediaType.JSON)

    # -------------------------------------------------------------- jobs
    @post("/jobs", status_code=201, summary="Create a Job")
    async def create_job(request: Request, data: JSONBody[CreateJobRequest]) -> Response[JobEnvelope]:
        strict_decode(await request.body(), CreateJobRequest)
        view = await sched.asubmit(request.user.account_id, data.workload, data.input, data.prefs() or None,
                                   idempotency_key=request.scope.get("idempotency_key"))
        return ok(JobEnvelope(job_out(view)), 201)

    @get("/jobs", summary="The account's Jobs, newest first")
    async def list_jobs(request: Request,
                        limit: int = Parameter(default=20, ge=1, le=MAX_LIST_LIMIT),
                        offset: int = Parameter(default=0, ge=0, le=1_000_000)) -> Response[JobListEnvelope]:
        lister = services.job_lister
        if lister is None:
            raise ApiError(503, "unavailable", "the jobs read model is not available on this server",
                           headers={"Retry-After": "5"})
        rows = await lister.list_for_account(str(request.user.account_id), limit, offset)
        return ok(JobListEnvelope([job_out(v, island_name(v.island_id)) for v in rows]))

    @get("/jobs/{job_id:str}", summary="One Job (a batch parent too)")
    async def get_job(request: Request, job_id: FromPath[str]) -> Response[JobEnvelope]:
        return ok(JobEnvelope(await load_out(parse_uuid(job_id), request.user.account_id)))

    @delete("/jobs/{job_id:str}", status_code=200, summary="Cancel a Job (idempotent)")
    async def cancel_job(request: Request, job_id: FromPath[str]) -> Response[JobEnvelope]:
        jid, account_id = parse_uuid(job_id), request.user.account_id
        found = await read_any(jid, account_id)
        if found is None:
            raise not_found("job")
        if isinstance(found, BatchSnapshot):
            return ok(JobEnvelope(batch_job_out(await services.batches.acancel(jid, account_id))))
        if found.status in TERMINAL:
            return ok(JobEnvelope(out(found)))
        try:
            view = await sched.acancel(jid, account_id=account_id, by="consumer")
        except cmd.UnknownJob:
            raise not_found("job") from None
        return ok(JobEnvelope(job_out(view, island_name(view.island_id))))

    @post("/jobs/{job_id:str}/retry", status_code=201, summary="Run a finished Job's input again as a new Job")
    async def retry_job(request: Request, job_id: FromPath[str]) -> Response[JobEnvelope]:
        jid, account_id = parse_uuid(job_id), request.user.account_id
        idem = request.scope.get("idempotency_key")

        def read(uow: UnitOfWork) -> tuple[JobView, dict] | BatchSnapshot | None:
            agg = uow.get_or_none(jid, fresh=fresh)
            if isinstance(agg, Job) and agg.account_id == str(account_id):
                return job_view(agg), dict(agg.prefs)
            if isinstance(agg, Batch) and agg.account_id == str(account_id):
                return BatchSnapshot(agg, [uow.get(UUID(cid), fresh=fresh) for cid in agg.child_ids])
            return None

        found = await committer.aquery(read)
        if found is None:
            raise not_found("job")
        if isinstance(found, BatchSnapshot):
            if not found.batch.finished:
                raise ApiError(409, "job_not_finished", "only a finished job can be retried")
            b = found.batch
            req = CreateBatchRequest(
                workload=b.cargo, inputs=[k.input for k in sorted(found.children, key=lambda k: k.batch_index)],
                merge_strategy=b.merge_strategy, fail_mode=b.fail_mode,  # type: ignore[arg-type]
                max_parallelism=b.max_parallelism or None, **_raw_prefs(b.prefs, batch=True))
            snap = await services.batches.asubmit(account_id, req, f"retry:{idem}" if idem else None)
            return ok(JobEnvelope(batch_job_out(snap)), 201)
        view, prefs = found
        if view.status not in TERMINAL:
            raise ApiError(409, "job_not_finished", f"job is {public_status(view.status)}; only a finished job "
                                                    f"can be retried")
        new = await sched.asubmit(account_id, view.cargo, view.input, _raw_prefs(prefs) or None,
                                  idempotency_key=f"retry:{jid}:{idem}" if idem else None)
        return ok(JobEnvelope(job_out(new)), 201)

    @get("/jobs/{job_id:str}/stream", summary="Server-Sent Events of a Job", media_type="text/event-stream")
    async def stream_job(request: Request, job_id: FromPath[str],
                         id_lines: bool = Parameter(default=False, description=(
                             "also write an SSE `id:` line after each `data:` line (for spec-following "
                             "readers such as EventSource; decision 0050)"))) -> Stream:
        jid, account_id = parse_uuid(job_id), request.user.account_id
        first = await read_any(jid, account_id)
        if first is None:
            raise not_found("job")
        last_id = request.headers.get("last-event-id")

        async def load() -> JobOut | None:
            found = await read_any(jid, account_id)
            return None if found is None else out(found)

        return Stream(sse_stream(services, str(jid), last_id, load, id_lines), media_type="text/event-stream",
                      headers=SSE_HEADERS)

    @get("/jobs/{job_id:str}/output", summary="A finished Job's full output (text, or the image), with usage")
    async def job_output(request: Request, job_id: FromPath[str]) -> Response[JobOutputEnvelope]:
        view = await load_out(parse_uuid(job_id), request.user.account_id)
        if view.status not in ("completed", "failed", "cancelled", "timeout"):
            raise ApiError(409, "job_not_finished", f"job is {view.status}; its output is there once it finished",
                           headers={"Retry-After": "1"})
        image = _image_payload(view.output) if view.output is not None and not view.is_batch else None
        image_out = None
        if image is not None:
            image_out = JobImageOut(image_data=image["image_b64"], format=image["fmt"], width=image.get("width"),
                                    height=image.get("height"), seed=image.get("seed"))
        return ok(JobOutputEnvelope(JobOutputOut(
            job_id=view.id, status=view.status, kind="image" if image_out is not None else "text",
            output=view.output, image=image_out, error=view.error, usage=view.usage,
            completed_at=view.completed_at)))

    # -------------------------------------------------------------- batches
    @post("/jobs/batch", status_code=201, summary="Create a batch of Jobs (1..100 inputs)")
    async def create_batch(request: Request, data: JSONBody[CreateBatchRequest]) -> Response[BatchJobOut]:
        strict_decode(await request.body(), CreateBatchRequest)
        snap = await services.batches.asubmit(request.user.account_id, data, request.scope.get("idempotency_key"))
        return ok(snap.batch_job(), 201)

    @get("/jobs/{job_id:str}/batch-status", summary="Progress of a batch")
    async def batch_status(request: Request, job_id: FromPath[str]) -> Response[BatchProgressOut]:
        snap = await services.batches.aget(parse_uuid(job_id), request.user.account_id)
        if snap is None:
            raise not_found("batch")
        return ok(snap.progress())

    # -------------------------------------------------------------- API keys
    @get("/api-keys", summary="The account's active API keys")
    async def list_keys(request: Request) -> Response[ApiKeyListEnvelope]:
        infos = await services.keys.alist(request.user.account_id)
        live = await services.limiter.last_used([i.key_id for i in infos])
        return ok(ApiKeyListEnvelope([key_out(i, live.get(i.key_id)) for i in infos]))

    @post("/api-keys", status_code=201, summary="Create an API key (the key is shown once)")
    async def create_key(request: Request, data: JSONBody[CreateApiKeyRequest]) -> Response[ApiKeyCreated]:
        expires_ms = 0
        if data.expires_at is not None:
            if data.expires_at.tzinfo is None:
                raise validation_failed({"expires_at": ["must carry a timezone (e.g. +00:00 or Z)"]})
            expires_ms = datetime_to_ms(data.expires_at)
            if expires_ms <= c.clock.now_ms():
                raise validation_failed({"expires_at": ["must be in the future"]})
        try:
            secret, info = await services.keys.aissue(request.user.account_id, data.name.strip() or data.name,
                                                      list(data.scopes) if data.scopes else None, expires_ms)
        except KeyError_ as exc:
            raise ApiError(409 if exc.code == "too_many_keys" else 422, exc.code, exc.message) from None
        except UnknownAccount:
            raise unauthorized("the API key's account does not exist") from None
        return ok(ApiKeyCreated.of(key_out(info), secret), 201)

    @delete("/api-keys/{key_id:str}", status_code=200, summary="Revoke an API key (takes effect at once)")
    async def revoke_key(request: Request, key_id: FromPath[str]) -> Response[ApiKeyEnvelope]:
        kid = parse_uuid(key_id, "API key")
        try:
            info = await services.keys.arevoke(request.user.account_id, kid, by=f"key:{request.user.key_id}")
        except KeyError_:
            raise not_found("API key") from None
        ttl = info.expires_at_ms - c.clock.now_ms() if info.expires_at_ms else None
        await services.limiter.revoke(info.key_id, ttl if ttl is None or ttl > 0 else 1)
        services.authenticator.forget_revoked(info.key_id)
        return ok(ApiKeyEnvelope(key_out(info)))

    # -------------------------------------------------------------- health
    @get("/health", summary="Database and broker reachability (no key needed)")
    async def health() -> Response[HealthOut]:
        db, brk = await asyncio.gather(_check_db(services), _check_broker(services))
        good = db == "ok" and brk == "ok"
        body = HealthOut(status="ok" if good else "degraded", database=db, broker=brk,
                         store=c.settings.store.describe(), version=VERSION)
        return Response(content=encode(body), status_code=200 if good else 503, media_type=MediaType.JSON)

    return Router(path="/api/v1", route_handlers=[
        get_account, list_workloads, get_workload, create_job, list_jobs, get_job, cancel_job, retry_job, stream_job,
        job_output, create_batch, batch_status, list_keys, create_key, revoke_key, health])


def _raw_prefs(prefs: dict[str, Any], *, batch: bool = False) -> dict[str, Any]:
    """Canonical stored preferences -> the request fields that produce them again."""
    out: dict[str, Any] = {}
    if prefs.get("regions"):
        out["region"] = list(prefs["regions"])
    if prefs.get("bid_micro") is not None:
        out["bid_price"] = str(micro_to_credits(prefs["bid_micro"]))
    if not batch:
        if prefs.get("platforms"):
            out["platform"] = list(prefs["platforms"])
        for k in ("min_hardware_tier", "max_latency_ms"):
            if prefs.get(k) is not None:
                out[k] = prefs[k]
    return out


async def _check_db(services: ApiServices) -> str:
    from store.factory import max_position

    try:
        await asyncio.wait_for(asyncio.to_thread(max_position, services.coordinator.app), 5.0)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"error: {type(exc).__name__}"


async def _check_broker(services: ApiServices) -> str:
    try:
        return "ok" if await asyncio.wait_for(services.broker.ping(), 5.0) else "error"
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}"


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


__all__ = ["ApiKey", "consumer_router", "job_out", "batch_job_out", "sse_stream", "ok"]
