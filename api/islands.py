"""Island registration and the owner's view of their Islands.

Account routes (behind the API-key middleware, api/auth.py; the account is
`request.user.account_id`):

    POST /api/v1/islands            {"name", "region"?, "capabilities"?} -> 201 {"data": Island, "token": "it_..."}
    GET  /api/v1/islands            -> {"data": [Island]}   (the account's own)
    GET  /api/v1/islands/{id}       -> {"data": Island}     (404 for another account's)

The token is shown once; only its SHA-256 is stored. A new Island is `pending` until an
operator approves it (or COORDINATOR_AUTO_APPROVE_ISLANDS=true, for demos).

Operator actions on Islands (approve, suspend, drain, karma) are in the one operator API,
admin/http.py (`/api/v1/admin/islands/...`).
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, get, post
from litestar.params import FromPath, JSONBody

from api.errors import not_found, unauthorized, validation_failed
from protocol.island import make_token
from api.schemas import encode, iso
from scheduler.islands import Island
from scheduler.registry import BadCapabilities, parse_capabilities


MAX_NAME = 128
MAX_OPERATOR_LIST = 1_000


class IslandCreate(msgspec.Struct, kw_only=True):
    name: str
    region: str | None = None
    capabilities: dict[str, Any] | None = None


class IslandOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    owner_account_id: str
    approval: str
    draining: bool
    online: bool
    connected_here: bool
    karma: Decimal
    capabilities: dict[str, Any]
    slots_total: int
    running_jobs: int
    jobs_completed: int
    jobs_failed: int
    registered_at: str | None


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


class IslandViews:
    """An Island as its owner and the operator see it: the aggregate plus the live registry
    record; `connected(island_id)` says whether this process holds its channel."""

    def __init__(self, coordinator: Any, connected: Callable[[str], bool]) -> None:
        self.c = coordinator
        self.sched = coordinator.scheduler
        self.connected = connected

    async def island(self, island_id: uuid.UUID) -> Island | None:
        fresh = self.sched.shared_store
        agg = await self.c.committer.aquery(lambda uow: uow.get_or_none(island_id, fresh=fresh))
        return agg if isinstance(agg, Island) else None

    def out(self, isl: Island) -> IslandOut:
        rec = self.sched.core.registry.islands.get(str(isl.id))
        caps = dict(isl.capabilities)
        caps["asks_micro"] = dict(caps.get("asks_micro", {}))
        return IslandOut(id=str(isl.id), name=isl.name, owner_account_id=isl.owner_account_id, approval=isl.approval, 
                         draining=isl.draining,
                         online=bool(rec.online) if rec is not None else isl.online,
                         connected_here=self.connected(str(isl.id)), karma=_karma(isl.karma_shown_milli),
                         capabilities=caps, slots_total=rec.slots_total if rec is not None else caps.get("slots", 1),
                         running_jobs=len(rec.active) if rec is not None else 0, jobs_completed=isl.jobs_completed,
                         jobs_failed=isl.jobs_failed, registered_at=iso(isl.created_on))


def islands_handlers(views: IslandViews) -> list:
    sched = views.sched

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
