"""The operator API (`/api/v1/admin/...`): accounts, Islands, Cargos, ledger, queue and
platform totals. Authenticated by the operator token (`COORDINATOR_ADMIN_TOKEN`), never by
a consumer key. Every action is an event naming the operator (`X-Operator` header,
default "operator") and the reason (required in the body).

Reads come from the projections (read models); writes go through the same commands the
CLI uses."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from decimal import Decimal
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from api.errors import ApiError, not_found, validation_failed
from api.islands import IslandViews
from api.schemas import encode
from ledger import names
from ledger.errors import AccountExists, LedgerError, UnknownAccount
from ledger.pricing import credits_to_micro, micro_to_credits
from ledger.service import account_id_for_email

MAX_REASON = 500


class ReasonBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: str


class CreateAccountBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    email: str
    credits: str | int | None = None
    kyc: bool = False


class GrantBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    amount: str | int
    reason: str
    idempotency_key: str | None = None


class KycBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    verified: bool
    reason: str
    reference: str = ""


class KarmaBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    delta: str | int  # karma, a decimal string with at most 3 places ("10", "-2.5") or an integer
    reason: str


class DrainBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: str
    draining: bool = True


class SuspendBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    suspended: bool
    reason: str


def _credits(micro: int) -> Decimal:
    return micro_to_credits(int(micro))


def _reason(text: str) -> str:
    text = (text or "").strip()
    if not text or len(text) > MAX_REASON:
        raise validation_failed({"reason": [f"is required, at most {MAX_REASON} characters"]})
    return text


def _uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise not_found(what) from None


def _amount(value: str | int, field: str = "amount") -> int:
    try:
        micro = credits_to_micro(value)
    except (TypeError, ValueError) as exc:
        raise validation_failed({field: [str(exc)]}) from None
    if micro <= 0:
        raise validation_failed({field: ["must be positive"]})
    return micro


def _ok(body: dict[str, Any], status: int = 200) -> Response:
    """JSON with credits as exact numbers (msgspec decimal_format="number", never floats)."""
    return Response(content=encode(body), status_code=status, media_type=MediaType.JSON)


def operator_name(request: Request) -> str:
    return (request.headers.get("x-operator") or "operator").strip()[:64] or "operator"


def operator_router(services: Any, *, islands: IslandViews | None = None, token: str | None = None) -> Router:
    """Routes under /api/v1/admin, guarded by the operator token (`token`, or the settings')."""
    c = services.coordinator
    token = token or services.settings.admin_token
    views = islands or IslandViews(c, lambda _island_id: False)

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        header = connection.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not token:
            raise ApiError(403, "operator_api_disabled", "set COORDINATOR_ADMIN_TOKEN to enable the operator API")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "unauthorized", "missing or invalid operator token",
                           headers={"WWW-Authenticate": 'Bearer realm="archipelag-operator"'})

    def reads() -> Any:
        if services.projections is None:
            raise ApiError(503, "unavailable", "the read models are not running", headers={"Retry-After": "1"})
        return services.projections.read

    async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except UnknownAccount:
            raise not_found("account") from None
        except LedgerError as exc:
            raise ApiError(409, exc.code, exc.message) from None

    # ---------------------------------------------------------------- accounts
    @post("/accounts", status_code=201)
    async def create_account(data: CreateAccountBody) -> Response:
        email = data.email.strip()
        if "@" not in email or len(email) > 254:
            raise validation_failed({"email": ["not an email address"]})
        grant = _amount(data.credits, "credits") if data.credits not in (None, 0, "0") else 0
        account_id = account_id_for_email(email)
        try:
            bal = await asyncio.to_thread(c.ledger.open_account, account_id, email, kyc_verified=data.kyc,
                                          initial_grant_micro=grant)
        except AccountExists:
            raise ApiError(409, "account_exists", f"an account with email {email!r} exists") from None
        key, info = await services.keys.aissue(account_id, "default", None)
        return _ok({"data": {"account_id": bal.account_id, "email": bal.email, "credits": _credits(bal.spendable_micro),
                         "kyc_verified": bal.kyc_verified, "api_key_id": info.key_id}, "api_key": key}, 201)

    @post("/accounts/{account_id:str}/credits", status_code=200)
    async def grant(request: Request, account_id: str, data: GrantBody) -> Response:
        acct = _uuid(account_id, "account")
        micro = _amount(data.amount)
        key = data.idempotency_key or f"grant:{uuid.uuid4()}"
        after = await in_thread(c.ledger.fund, acct, micro, code=names.GRANT,
                                reference=f"operator:{operator_name(request)}", reason=_reason(data.reason),
                                idem_key=key)
        return _ok({"data": {"account_id": str(acct), "granted": _credits(micro), "credits": _credits(after),
                         "idempotency_key": key}})

    @post("/accounts/{account_id:str}/kyc", status_code=200)
    async def kyc(request: Request, account_id: str, data: KycBody) -> Response:
        acct = _uuid(account_id, "account")
        changed = await in_thread(c.ledger.set_kyc, acct, data.verified, by=operator_name(request),
                                  reference=(data.reference or _reason(data.reason))[:MAX_REASON])
        return _ok({"data": {"account_id": str(acct), "kyc_verified": data.verified, "changed": changed}})

    @post("/accounts/{account_id:str}/suspension", status_code=200)
    async def suspend(request: Request, account_id: str, data: SuspendBody) -> Response:
        acct = _uuid(account_id, "account")
        changed = await in_thread(c.ledger.set_suspended, acct, data.suspended, by=operator_name(request),
                                  reason=_reason(data.reason))
        return _ok({"data": {"account_id": str(acct), "suspended": data.suspended, "changed": changed}})

    @get("/accounts/{account_id:str}")
    async def account(account_id: str) -> Response:
        acct = _uuid(account_id, "account")
        bal = await in_thread(c.ledger.balance, acct)
        return _ok({"data": {"account_id": bal.account_id, "email": bal.email, "credits": _credits(bal.spendable_micro),
                         "held": _credits(bal.held_micro), "spent": _credits(bal.spent_micro),
                         "kyc_verified": bal.kyc_verified, "suspended": bal.suspended,
                         "free_tier_remaining": _credits(bal.free_tier_remaining_micro)}})

    # ---------------------------------------------------------------- islands
    @get("/islands")
    async def islands(limit: int = 100, offset: int = 0) -> Response:
        if not 1 <= limit <= 1000 or offset < 0:
            raise validation_failed({"limit": ["1..1000"], "offset": [">= 0"]})
        rows = await asyncio.to_thread(reads().island_stats, limit=limit, offset=offset,
                                       now_ms=c.clock.now_ms())
        live = c.scheduler.core.registry.islands
        for row in rows:
            rec = live.get(str(row.get("island_id")))
            row["live"] = None if rec is None else {"online": rec.online, "active_jobs": len(rec.active),
                                                    "slots_total": rec.slots_total, "latency_ms": rec.latency_ms}
        return _ok({"data": rows})

    @get("/islands/{island_id:str}")
    async def island(island_id: str) -> Response:
        isl = await views.island(_uuid(island_id, "island"))
        if isl is None:
            raise not_found("island")
        return _ok({"data": views.out(isl)})

    async def _approval(request: Request, island_id: str, data: ReasonBody, approved: bool) -> Response:
        isl = _uuid(island_id, "island")
        from scheduler.commands import NotYourJob

        try:
            await asyncio.to_thread(c.scheduler.set_island_approval, isl, approved, by=operator_name(request),
                                    reason=_reason(data.reason))
        except NotYourJob:
            raise not_found("island") from None
        return _ok({"data": {"island_id": str(isl), "approval": "approved" if approved else "suspended"}})

    @post("/islands/{island_id:str}/approve", status_code=200)
    async def approve(request: Request, island_id: str, data: ReasonBody) -> Response:
        return await _approval(request, island_id, data, True)

    @post("/islands/{island_id:str}/suspend", status_code=200)
    async def suspend_island(request: Request, island_id: str, data: ReasonBody) -> Response:
        return await _approval(request, island_id, data, False)

    @post("/islands/{island_id:str}/drain", status_code=200)
    async def drain_island(request: Request, island_id: str, data: DrainBody) -> Response:
        """Drain (no new Jobs, running ones finish) or end a drain (`draining: false`)."""
        from scheduler.commands import NotYourJob

        isl = _uuid(island_id, "island")
        try:
            changed = await asyncio.to_thread(c.scheduler.set_island_draining, isl, data.draining,
                                              by=operator_name(request), reason=_reason(data.reason))
        except NotYourJob:
            raise not_found("island") from None
        return _ok({"data": {"island_id": str(isl), "draining": data.draining, "changed": changed}})

    @post("/islands/{island_id:str}/karma", status_code=200)
    async def adjust_karma(request: Request, island_id: str, data: KarmaBody) -> Response:
        """Decision 0041: the way back for an Island benched below a Cargo's karma gate."""
        from routing.karma import parse_karma_milli
        from scheduler.commands import BadKarmaAdjustment, NotYourJob

        isl = _uuid(island_id, "island")
        try:
            delta_milli = parse_karma_milli(data.delta)
        except ValueError as exc:
            raise validation_failed({"delta": [str(exc)]}) from None
        try:
            change = await asyncio.to_thread(c.scheduler.adjust_island_karma, isl, delta_milli,
                                             by=operator_name(request), reason=_reason(data.reason))
        except NotYourJob:
            raise not_found("island") from None
        except BadKarmaAdjustment as exc:
            raise validation_failed({"delta": [str(exc)]}) from None
        return _ok({"data": {"island_id": str(isl), "karma_before": Decimal(change.before_milli) / 1000,
                             "karma": Decimal(change.after_milli) / 1000,
                             "applied_delta": Decimal(change.after_milli - change.before_milli) / 1000}})

    # ---------------------------------------------------------------- cargos
    async def _switch(request: Request, slug: str, data: ReasonBody, enabled: bool) -> Response:
        from scheduler.cargo import UnknownCargo

        try:
            changed = await asyncio.to_thread(c.scheduler.set_cargo_enabled, slug, enabled,
                                              by=operator_name(request), reason=_reason(data.reason))
        except UnknownCargo:
            raise not_found("workload") from None
        return _ok({"data": {"slug": slug, "enabled": enabled, "changed": changed}})

    @post("/cargos/{slug:str}/enable", status_code=200)
    async def enable(request: Request, slug: str, data: ReasonBody) -> Response:
        return await _switch(request, slug, data, True)

    @post("/cargos/{slug:str}/disable", status_code=200)
    async def disable(request: Request, slug: str, data: ReasonBody) -> Response:
        return await _switch(request, slug, data, False)

    @get("/cargos")
    async def cargos() -> Response:
        return _ok({"data": [{"slug": cg.slug, "id": cg.id, "enabled": cg.enabled} for cg in c.scheduler.catalog]})

    # ---------------------------------------------------------------- ledger, queue, totals
    @get("/ledger/trial-balance")
    async def trial_balance() -> Response:
        rows = await asyncio.to_thread(reads().trial_balance)
        total = sum(int(r.get("balance_micro", 0)) for r in rows)
        return _ok({"data": {"accounts": {r["ledger_account"]: _credits(r["balance_micro"]) for r in rows},
                         "total": _credits(total), "balanced": total == 0}})

    @get("/ledger/statement/{account_id:str}")
    async def statement(account_id: str, limit: int = 1000) -> Response:
        acct = _uuid(account_id, "account")
        if not 1 <= limit <= 10_000:
            raise validation_failed({"limit": ["1..10000"]})
        rows = await asyncio.to_thread(reads().statement, str(acct), limit=limit)
        return _ok({"data": rows})

    @get("/queue")
    async def queue() -> Response:
        core = c.scheduler.core
        with core.lock:
            depths = core.queue.depths()
            oldest: dict[str, int] = {}
            now = c.clock.now_ms()
            for live in core.jobs.values():
                if live.status == "queued":
                    oldest[live.cargo] = max(oldest.get(live.cargo, 0), now - live.submitted_ms)
        return _ok({"data": {cargo: {"depth": depths.get(cargo, 0), "oldest_wait_ms": oldest.get(cargo, 0)}
                         for cargo in sorted(set(depths) | set(oldest))}})

    @get("/platform/totals")
    async def totals() -> Response:
        raw = await asyncio.to_thread(reads().platform_totals)
        return _ok({"data": {k: (_credits(v) if k.endswith("_micro") else v) for k, v in raw.items()}})

    return Router(path="/api/v1/admin", guards=[guard],
                  route_handlers=[create_account, grant, kyc, suspend, account, islands, island, approve, suspend_island, drain_island,
                                  adjust_karma, enable, disable, cargos, trial_balance, statement, queue, totals])
