"""The network's hosts (api-contract.md "Network endpoints"): Islands as the published
clients see them (`GET /api/v1/hosts`, `/hosts/{id}`), their karma on the 0..100 scale and
its history.

What is public and what is the owner's (decision 0052):
- anyone with a read key sees an **approved** Island: id, name, status (online, offline,
  busy), region, the capabilities routing uses (cargos, models, memory, slots, platform,
  hardware tier, reported speed, asks), live free slots and warm models, karma score, last
  heartbeat, and its karma history without Job ids;
- the Island's owner also sees it while `pending` or `suspended`, plus an `owner` block
  (approval, draining, running Jobs) and the Job id of each karma change;
- never shown: the owner's account id, the token hash, earnings (those are the owner's
  statements) — for anyone else an Island that is not approved answers 404 like an unknown id.

Live state (online, busy, heartbeat, karma) comes from the dispatch core's registry (every
process applies every Island event and heartbeat); the history comes from the Islands
projection (read-your-writes like GET /jobs).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec
from litestar import Request, Response, get
from litestar.params import FromPath, Parameter

from api.errors import ApiError, not_found, validation_failed
from api.schemas import MAX_LIST_LIMIT, encode, iso
from routing.karma import score_of
from scheduler.islands import Island
from scheduler.registry import IslandRecord
from store.clock import ms_to_datetime
from store.unit_of_work import UnitOfWork

if TYPE_CHECKING:
    from api.services import ApiServices

HOST_STATUSES = ("online", "offline", "busy", "suspended", "pending")
PUBLIC_CAPABILITIES = ("cargos", "models", "vram_mb", "ram_mb", "cpu_cores", "gpu_model", "slots", "region",
                       "platform", "hardware_tier", "tokens_per_s", "asks_micro")
MAX_REGION_CHARS = 64
READ_YOUR_WRITES_WAIT_S = 2.0


class HostOwnerOut(msgspec.Struct, kw_only=True):
    approval: str
    draining: bool
    running_jobs: int


class HostOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    name: str
    status: str
    region: str
    capabilities: dict[str, Any]
    karma_score: Decimal
    last_heartbeat_at: str | None
    slots_free: int = 0
    warm_models: list[str] = []
    owner: HostOwnerOut | None = None


class HostEnvelope(msgspec.Struct):
    data: HostOut


class HostListEnvelope(msgspec.Struct):
    data: list[HostOut]


class KarmaOut(msgspec.Struct, kw_only=True):
    host_id: str
    karma_score: Decimal
    updated_at: str | None
    scale_min: int = 0
    scale_max: int = 100


class KarmaEnvelope(msgspec.Struct):
    data: KarmaOut


class KarmaChangeOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    delta: Decimal
    reason: str
    karma_score: Decimal
    at: str
    job_id: str | None = None


class KarmaHistoryEnvelope(msgspec.Struct):
    data: list[KarmaChangeOut]


def host_status(rec: IslandRecord) -> str:
    if rec.approval != "approved":
        return rec.approval if rec.approval in ("pending", "suspended") else "pending"
    if not rec.online:
        return "offline"
    return "busy" if rec.slots_free() == 0 else "online"


def host_out(rec: IslandRecord, caller: str) -> HostOut:
    caps = rec.capabilities if isinstance(rec.capabilities, dict) else {}
    owned = rec.owner_account_id == caller
    return HostOut(
        id=rec.island_id, name=rec.name, status=host_status(rec), region=str(caps.get("region", "unknown")),
        capabilities={k: caps[k] for k in PUBLIC_CAPABILITIES if k in caps}, karma_score=score_of(rec.karma_milli),
        last_heartbeat_at=iso(ms_to_datetime(rec.last_heartbeat_ms)) if rec.last_heartbeat_ms else None,
        slots_free=rec.slots_free() if rec.online else 0, warm_models=sorted(rec.warm_models),
        owner=HostOwnerOut(approval=rec.approval, draining=rec.draining, running_jobs=len(rec.active))
        if owned else None)


def _ok(obj: Any) -> Response:
    return Response(content=encode(obj), media_type="application/json")


def hosts_handlers(services: ApiServices) -> list[Any]:
    sched = services.coordinator.scheduler
    committer = services.coordinator.committer
    fresh = services.fresh_reads

    def snapshot() -> list[IslandRecord]:
        core = sched.core
        with core.lock:
            return [_copy(r) for r in core.registry.islands.values()]

    def visible(rec: IslandRecord | None, caller: str) -> bool:
        return rec is not None and (rec.approval == "approved" or rec.owner_account_id == caller)

    def find(host_id: str, caller: str) -> IslandRecord:
        try:
            key = str(UUID(host_id))
        except (ValueError, TypeError):
            raise not_found("host") from None
        core = sched.core
        with core.lock:
            rec = core.registry.islands.get(key)
            rec = _copy(rec) if rec is not None else None
        if not visible(rec, caller):
            raise not_found("host")
        assert rec is not None
        return rec

    @get("/api/v1/hosts", summary="Approved Islands of the network (yours too while pending or suspended)")
    async def list_hosts(request: Request,
                         limit: int = Parameter(default=20, ge=1, le=MAX_LIST_LIMIT),
                         offset: int = Parameter(default=0, ge=0, le=1_000_000),
                         region: str | None = Parameter(default=None, max_length=MAX_REGION_CHARS),
                         status: str | None = Parameter(default=None)) -> Response:
        if status is not None and status not in HOST_STATUSES:
            raise validation_failed({"status": [f"must be one of {', '.join(HOST_STATUSES)}"]})
        caller = str(request.user.account_id)
        rows = [r for r in snapshot() if visible(r, caller)]
        if region is not None:
            want = region.strip().lower()
            rows = [r for r in rows if str(r.capabilities.get("region", "unknown")).lower() == want]
        outs = [host_out(r, caller) for r in rows]
        if status is not None:
            outs = [h for h in outs if h.status == status]
        outs.sort(key=lambda h: (-h.karma_score, h.id))
        return _ok(HostListEnvelope(outs[offset:offset + limit]))

    @get("/api/v1/hosts/{host_id:str}", summary="One host")
    async def get_host(request: Request, host_id: FromPath[str]) -> Response:
        caller = str(request.user.account_id)
        return _ok(HostEnvelope(host_out(find(host_id, caller), caller)))

    @get("/api/v1/hosts/{host_id:str}/karma", summary="A host's karma (0..100) now")
    async def host_karma(request: Request, host_id: FromPath[str]) -> Response:
        rec = find(host_id, str(request.user.account_id))

        def read(uow: UnitOfWork) -> tuple[int, Any] | None:
            agg = uow.get_or_none(UUID(rec.island_id), fresh=fresh)
            return (agg.karma_shown_milli, agg.karma_updated_at) if isinstance(agg, Island) else None

        found = await committer.aquery(read)
        if found is None:
            raise not_found("host")
        return _ok(KarmaEnvelope(KarmaOut(host_id=rec.island_id, karma_score=score_of(found[0]),
                                          updated_at=iso(found[1]))))

    @get("/api/v1/hosts/{host_id:str}/karma/history", summary="A host's karma changes, newest first")
    async def host_karma_history(request: Request, host_id: FromPath[str],
                                 limit: int = Parameter(default=20, ge=1, le=MAX_LIST_LIMIT),
                                 offset: int = Parameter(default=0, ge=0, le=1_000_000)) -> Response:
        caller = str(request.user.account_id)
        rec = find(host_id, caller)
        projections = services.projections
        if projections is None:
            raise ApiError(503, "unavailable", "the karma read model is not available on this server",
                           headers={"Retry-After": "5"})
        position = getattr(services.job_lister, "last_position", None)

        def read() -> list[dict[str, Any]]:
            if position is not None:
                projections.read.wait_for(position(), READ_YOUR_WRITES_WAIT_S)
            return projections.read.karma_history(rec.island_id, limit=limit, offset=offset)

        try:
            rows = await asyncio.to_thread(read)
        except Exception:  # noqa: BLE001 - e.g. the read models are still being created
            raise ApiError(503, "unavailable", "the karma read model is not available yet; retry shortly",
                           headers={"Retry-After": "1"}) from None
        owned = rec.owner_account_id == caller
        out = [KarmaChangeOut(delta=Decimal(r["delta_milli"]) / 1000, reason=r["reason"],
                              karma_score=score_of(r["karma_after_milli"]),
                              at=iso(ms_to_datetime(r["time_ms"])) or "",
                              job_id=(r["job_id"] or None) if owned else None) for r in rows]
        return _ok(KarmaHistoryEnvelope(out))

    return [list_hosts, get_host, host_karma, host_karma_history]


def _copy(rec: IslandRecord) -> IslandRecord:
    """A snapshot of a registry record taken under the dispatch lock (the live one keeps moving)."""
    return replace(rec, active=set(rec.active))
