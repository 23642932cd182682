"""Island registration for accounts and the operator's Island API.

Account routes (behind the API-key middleware, api/auth.py; the account is
`request.user.account_id`):

    POST /api/v1/islands            {"name", "region"?, "capabilities"?} -> 201 {"data": Island, "token": "it_..."}
    GET  /api/v1/islands            -> {"data": [Island]}   (the account's own)
    GET  /api/v1/islands/{id}       -> {"data": Island}     (404 for another account's)

The token is shown once; only its SHA-256 is stored. A new Island is `pending` until an
operator approves it (or COORDINATOR_AUTO_APPROVE_ISLANDS=true, for demos).

Operator routes (Bearer COORDINATOR_OPERATOR_TOKEN; 404 when it is unset; the API-key
middleware must let `/operator/` through, see docs/ISLANDS.md "Wiring"):

    GET  /operator/v1/islands[?limit&offset]        -> {"data": [IslandSummary]}
    GET  /operator/v1/islands/{id}                  -> {"data": Island}
    POST /operator/v1/islands/{id}/approve  {"reason"?, "by"?}
    POST /operator/v1/islands/{id}/suspend  {"reason", "by"?}
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.params import FromPath, JSONBody, Parameter

from api.errors import ApiError, not_found, unauthorized, validation_failed
from api.island_protocol import make_token
from api.schemas import encode, iso
from scheduler import commands as cmd
from scheduler.islands import Island
from scheduler.registry import BadCapabilities, parse_capabilities

if TYPE_CHECKING:
    from api.island_channel import IslandChannel

MAX_NAME = 128
MAX_OPERATOR_LIST = 1_000


class IslandCreate(msgspec.Struct, kw_only=True):
    name: str
    region: str | None = None
    capabilities: dict[str, Any] | None = None


class ApprovalRequest(msgspec.Struct, kw_only=True):
    reason: str = ""
    by: str = "operator"


class IslandOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    owner_account_id: str
    approval: str
    online: bool
    connected_here: bool
    karma: Decimal
    capabilities: dict[str, Any]
    slots_total: int
    running_jobs: int
    jobs_completed: int
    jobs_failed: int
    registered_at: str | None


class IslandSummary(msgspec.Struct, kw_only=True):
    id: str
    name: str
    owner_account_id: str
    approved: bool
    online: bool
    karma: Decimal
    slots_total: int
    running_jobs: int
    region: str
    cargos: list[str]


def _ok(obj: Any, status: int = 200) -> Response:
    return Response(content=encode(obj), status_code=status, media_type=MediaType.JSON)


def _island_uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except (ValueError, TypeError):
        raise not_found("island") from None


def _karma(milli: int) -> Decimal:
    return Decimal(milli) / 1000


def account_of(request: Request) -> uuid.UUID:
    """The calling account: the principal api/auth.py put on the request."""
    user = request.scope.get("user")
    account_id = getattr(user, "account_id", None)
    if account_id is None:
        raise unauthorized()
    return account_id


def _caps_with_region(raw: dict[str, Any] | None, region: str | None) -> dict[str, Any]:
    """Registration capabilities (checked here for a 422 naming the problem)."""
    caps = dict(raw or {})
    if region is not None:
        caps["region"] = region
    try:
        parse_capabilities(caps)
    except BadCapabilities as exc:
        raise validation_failed({"capabilities": [str(exc)]}) from None
    return caps


class _Views:
    def __init__(self, channel: IslandChannel) -> None:
        self.channel = channel
        self.c = channel.c
        self.sched = channel.scheduler

    async def island(self, island_id: uuid.UUID) -> Island | None:
        fresh = self.sched.shared_store
        agg = await self.c.committer.aquery(lambda uow: uow.get_or_none(island_id, fresh=fresh))
        return agg if isinstance(agg, Island) else None

    def out(self, isl: Island) -> IslandOut:
        rec = self.sched.core.registry.islands.get(str(isl.id))
        caps = dict(isl.capabilities)
        caps["asks_micro"] = dict(caps.get("asks_micro", {}))
        return IslandOut(id=str(isl.id), name=isl.name, owner_account_id=isl.owner_account_id, approval=isl.approval,
                         online=bool(rec.online) if rec is not None else isl.online,
                         connected_here=self.channel.connected(str(isl.id)), karma=_karma(isl.karma_milli),
                         capabilities=caps, slots_total=rec.slots_total if rec is not None else caps.get("slots", 1),
                         running_jobs=len(rec.active) if rec is not None else 0, jobs_completed=isl.jobs_completed,
                         jobs_failed=isl.jobs_failed, registered_at=iso(isl.created_on))


def islands_handlers(channel: IslandChannel) -> list:
    views = _Views(channel)
    sched = channel.scheduler

    @post("/api/v1/islands", status_code=201, summary="Register an Island (its token is shown once)")
    async def create_island(request: Request, data: JSONBody[IslandCreate]) -> Response:
        owner = account_of(request)
        name = data.name.strip()
        if not 0 < len(name) <= MAX_NAME:
            raise validation_failed({"name": [f"1..{MAX_NAME} characters"]})
        caps = _caps_with_region(data.capabilities, data.region)
        island_id = uuid.uuid4()
        token = make_token(island_id)
        creds = await asyncio.to_thread(sched.register_island, owner, name, caps, island_id=island_id, token=token)
        isl = await views.island(uuid.UUID(creds.island_id))
        assert isl is not None
        return _ok({"data": views.out(isl), "token": creds.token}, 201)

    @get("/api/v1/islands", summary="The account's Islands")
    async def list_islands(request: Request) -> Response:
        owner = str(account_of(request))
        ids = [i for i, rec in list(sched.core.registry.islands.items()) if rec.owner_account_id == owner]
        out = []
        for i in sorted(ids)[:MAX_OPERATOR_LIST]:
            isl = await views.island(uuid.UUID(i))
            if isl is not None:
                out.append(views.out(isl))
        return _ok({"data": out})

    @get("/api/v1/islands/{island_id:str}", summary="One of the account's Islands")
    async def get_island(request: Request, island_id: FromPath[str]) -> Response:
        owner = str(account_of(request))
        isl = await views.island(_island_uuid(island_id))
        if isl is None or isl.owner_account_id != owner:
            raise not_found("island")
        return _ok({"data": views.out(isl)})

    return [create_island, list_islands, get_island]


def operator_handlers(channel: IslandChannel) -> list:
    views = _Views(channel)
    sched = channel.scheduler
    token = channel.settings.operator_token

    def check(request: Any, _handler: Any = None) -> None:
        """Route guard: runs before the body is read."""
        if not token:
            raise not_found("resource")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise ApiError(401, "unauthorized", "operator token required",
                           headers={"WWW-Authenticate": 'Bearer realm="archipelag-operator"'})

    @get("/operator/v1/islands", summary="Every Island (live view)", guards=[check])
    async def op_list(request: Request, limit: int = Parameter(default=100, ge=1, le=MAX_OPERATOR_LIST),
                      offset: int = Parameter(default=0, ge=0)) -> Response:
        recs = sorted(list(sched.core.registry.islands.values()), key=lambda r: r.island_id)[offset:offset + limit]
        return _ok({"data": [IslandSummary(id=r.island_id, name=r.name, owner_account_id=r.owner_account_id,
                                           approved=r.approved, online=r.online, karma=_karma(r.karma_milli),
                                           slots_total=r.slots_total, running_jobs=len(r.active),
                                           region=r.capabilities.get("region", "unknown"),
                                           cargos=list(r.capabilities.get("cargos", ()))) for r in recs]})

    @get("/operator/v1/islands/{island_id:str}", summary="One Island", guards=[check])
    async def op_get(request: Request, island_id: FromPath[str]) -> Response:
        isl = await views.island(_island_uuid(island_id))
        if isl is None:
            raise not_found("island")
        return _ok({"data": views.out(isl)})

    async def set_approval(island_id: str, approved: bool, data: ApprovalRequest) -> Response:
        iid = _island_uuid(island_id)
        reason = data.reason.strip()[:500]
        if not approved and not reason:
            raise validation_failed({"reason": ["a suspension needs a reason"]})
        try:
            await channel.c.committer.aexecute(lambda uow: cmd.set_island_approval_in(
                uow, iid, approved, by=data.by[:64] or "operator", reason=reason))
        except cmd.NotYourJob:
            raise not_found("island") from None
        isl = await views.island(iid)
        assert isl is not None
        return _ok({"data": views.out(isl)})

    @post("/operator/v1/islands/{island_id:str}/approve", status_code=200, summary="Approve an Island", guards=[check])
    async def op_approve(request: Request, island_id: FromPath[str], data: JSONBody[ApprovalRequest]) -> Response:
        return await set_approval(island_id, True, data)

    @post("/operator/v1/islands/{island_id:str}/suspend", status_code=200, summary="Suspend an Island", guards=[check])
    async def op_suspend(request: Request, island_id: FromPath[str], data: JSONBody[ApprovalRequest]) -> Response:
        return await set_approval(island_id, False, data)

    return [op_list, op_get, op_approve, op_suspend]
