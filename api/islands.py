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

from api.errors import ApiError, not_found, unauthorized, validation_failed
from protocol.island import make_token
from api.schemas import encode, iso
from scheduler.islands import Island
from protocol.nats import nats_user
from scheduler.commands import IslandExists
from scheduler.pairing import hash_password, make_password, normalize_code
from scheduler.registry import BadCapabilities, parse_capabilities


MAX_NAME = 128
MAX_OPERATOR_LIST = 1_000


class IslandCreate(msgspec.Struct, kw_only=True):
    name: str
    region: str | None = None
    capabilities: dict[str, Any] | None = None


class PairBody(msgspec.Struct, kw_only=True):
    code: str
    name: str | None = None


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
        self.pairing: Any = None  # scheduler/pairing.py codes, when the NATS transport is on
        self.nats_url = ""  # COORDINATOR_NATS_URL (its host part is shown in the Island's URL hint)

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

    @post("/api/v1/islands/pair", status_code=201,
          summary="Pair an Island of the published agent (NATS) with the code it printed")
    async def pair_island(request: Request, data: JSONBody[PairBody]) -> Response:
        """Binds the Island to the calling account; it then waits for operator approval.
        The answer holds the Island's NATS password, shown once (decision 0055)."""
        owner = account_of(request)
        pairing = views.pairing
        if pairing is None:
            raise ApiError(404, "not_found", "pairing is not enabled on this coordinator (COORDINATOR_NATS_URL)")
        code = normalize_code(data.code)
        if not 4 <= len(code) <= 16:
            raise validation_failed({"code": ["the pairing code the Island printed (8 letters and digits)"]})
        name = (data.name or "").strip()
        if len(name) > MAX_NAME:
            raise validation_failed({"name": [f"at most {MAX_NAME} characters"]})
        if await pairing.blocked(str(owner)):
            raise ApiError(429, "rate_limited", "too many wrong pairing codes; try again in a minute",
                           headers={"Retry-After": "60"})
        pending = await pairing.redeem(code)
        if pending is None:
            await pairing.failed_attempt(str(owner))
            raise validation_failed({"code": ["unknown, used or expired pairing code"]})
        island_id = uuid.UUID(pending.host_id)
        password = make_password()
        pw_hash = await asyncio.to_thread(hash_password, password)
        caps = dict(pending.capabilities) or {"transport": "nats"}
        try:
            await asyncio.to_thread(sched.pair_island, island_id, owner, name or f"island-{pending.host_id[:8]}",
                                    caps, agent_version=pending.agent_version, nats_user=nats_user(pending.host_id),
                                    password_hash=pw_hash, by=f"account:{owner}")
        except IslandExists:
            raise ApiError(409, "conflict", "this Island is already paired") from None
        except BadCapabilities as exc:
            raise validation_failed({"capabilities": [str(exc)]}) from None
        isl = await views.island(island_id)
        assert isl is not None
        return _ok({"data": views.out(isl), "nats": _nats_credentials(views.nats_url, pending.host_id, password)}, 201)

    @post("/api/v1/islands/{island_id:str}/nats-credentials", status_code=201,
          summary="A new NATS password for one of the account's NATS Islands (shown once)")
    async def rotate_nats(request: Request, island_id: FromPath[str]) -> Response:
        owner = str(account_of(request))
        iid = _island_uuid(island_id)
        isl = await views.island(iid)
        if isl is None or isl.owner_account_id != owner:
            raise not_found("island")
        if getattr(isl, "transport", "websocket") != "nats":
            raise ApiError(409, "conflict", "this Island does not use the NATS transport")
        password = make_password()
        pw_hash = await asyncio.to_thread(hash_password, password)
        await asyncio.to_thread(sched.issue_nats_credential, iid, nats_user=nats_user(str(iid)),
                                password_hash=pw_hash, by=f"account:{owner}")
        return _ok({"data": {"island_id": str(iid)}, "nats": _nats_credentials(views.nats_url, str(iid), password)},
                   201)

    return [create_island, list_islands, get_island, pair_island, rotate_nats]


def _nats_credentials(coordinator_url: str, host_id: str, password: str) -> dict[str, str]:
    """The Island's NATS user and password, and the URL to put in its config."""
    from protocol.nats import split_url

    bare = split_url(coordinator_url)[0] if coordinator_url else "nats://HOST:4222"
    scheme, _, hostport = bare.partition("://")
    user = nats_user(host_id)
    return {"user": user, "password": password, "url": f"{scheme}://{user}:{password}@{hostport}"}
