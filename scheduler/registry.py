"""The live Island registry: static facts from Island events, live state from heartbeats
(never events), the Jobs each Island holds, and the routing index kept in step with it
incrementally."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from ledger.pricing import credits_to_micro
from routing.index import CandidateIndex
from routing.types import IslandView
from scheduler.market import resolve_ask

MAX_CARGOS = 64
MAX_MODELS = 256
#: Bound of the heartbeat heap, in entries per known Island (plus a constant): beyond it
#: the heap is rebuilt from the records (one entry per online Island). Steady state is
#: about ``missed_heartbeats_offline + 1`` entries per Island, so a rebuild is rare.
MAX_BEATS_PER_ISLAND = 8


class BadCapabilities(ValueError):
    pass


def parse_capabilities(raw: dict[str, Any]) -> dict[str, Any]:
    """Canonical capabilities (what an Island serves and has) from a hello/registration."""
    if not isinstance(raw, dict):
        raise BadCapabilities("capabilities must be an object")

    def strings(key: str, limit: int) -> list[str]:
        v = raw.get(key, [])
        if not isinstance(v, list) or len(v) > limit or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in v):
            raise BadCapabilities(f"{key} must be a list of at most {limit} strings")
        return sorted(set(v))

    def integer(key: str, default: int, low: int, high: int) -> int:
        v = raw.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            raise BadCapabilities(f"{key} must be an integer within {low}..{high}")
        return v

    def text(key: str, default: str) -> str:
        v = raw.get(key, default)
        if not isinstance(v, str) or len(v) > 64:
            raise BadCapabilities(f"{key} must be a string of at most 64 characters")
        return v

    asks_raw = raw.get("asks", {})
    if not isinstance(asks_raw, dict) or len(asks_raw) > MAX_CARGOS:
        raise BadCapabilities("asks must be an object of Cargo slug -> price in credits")
    asks: dict[str, int] = {}
    for slug, price in asks_raw.items():
        try:
            if isinstance(price, float):
                raise TypeError("prices are decimal strings, not floats")
            asks[str(slug)] = credits_to_micro(price)
        except (TypeError, ValueError) as exc:
            raise BadCapabilities(f"asks.{slug}: {exc}") from None
    out = {
        "cargos": strings("cargos", MAX_CARGOS),
        "models": strings("models", MAX_MODELS),
        "vram_mb": integer("vram_mb", 0, 0, 10_000_000),
        "ram_mb": integer("ram_mb", 0, 0, 100_000_000),
        "cpu_cores": integer("cpu_cores", 1, 1, 4096),
        "gpu_model": text("gpu_model", ""),
        "region": text("region", "unknown"),
        "platform": text("platform", "linux"),
        "hardware_tier": integer("hardware_tier", 0, 0, 4),
        "slots": integer("slots", 1, 1, 1024),
        "asks_micro": asks,
        **({"transport": "nats"} if raw.get("transport") == "nats" else {}),
    }
    if "tokens_per_s" in raw:  # the Island's own speed report: karma's `slow` rule (decision 0051)
        out["tokens_per_s"] = integer("tokens_per_s", 0, 0, 1_000_000)
    return out


@dataclass
class IslandRecord:
    island_id: str
    owner_account_id: str
    name: str
    capabilities: dict[str, Any]
    approved: bool
    karma_milli: int = 0
    online: bool = False  # live: heartbeats arriving
    last_heartbeat_ms: int = 0
    slots_total: int = 1
    load_permille: int = 0
    latency_ms: int = 50
    warm_models: frozenset[str] = frozenset()
    active: set[UUID] = field(default_factory=set)  # Jobs assigned to or running on it
    ordinal: int = 0  # registration order (stale Islands are reported in this order)
    draining: bool = False  # an operator's drain: no new Jobs, running ones finish
    nats_user: str = ""  # the Island's NATS user (transport "nats"), from NatsCredentialIssued
    nats_password_hash: str = ""  # its bcrypt hash (never the password)
    approval: str = "approved"  # pending | approved | suspended (the Island aggregate's, for the hosts API)
    asks_micro: dict[str, int] = field(default_factory=dict)  # the Island's own asks (slug | "_default")
    list_rates: dict[str, int] = field(default_factory=dict)  # the catalog's list rates (shared)

    def ask_for(self, slug: str) -> int:
        """The ask for a Cargo: own, else `_default`, else the list rate (scheduler/market.py)."""
        return resolve_ask(self.asks_micro, slug, self.list_rates.get(slug, 0))

    def slots_free(self) -> int:
        if self.draining:
            return 0
        return max(0, self.slots_total - len(self.active))

    def view(self) -> IslandView:
        caps = self.capabilities
        return IslandView(
            island_id=self.island_id, owner_account_id=self.owner_account_id, online=self.online,
            approved=self.approved, slots_total=self.slots_total, slots_free=self.slots_free(),
            cargos=frozenset(caps.get("cargos", ())), models=frozenset(caps.get("models", ())),
            warm_models=self.warm_models, vram_mb=caps.get("vram_mb", 0), ram_mb=caps.get("ram_mb", 0),
            region=caps.get("region", "unknown"), platform=caps.get("platform", "linux"),
            hardware_tier=caps.get("hardware_tier", 0), karma_milli=self.karma_milli,
            latency_ms=self.latency_ms, load_permille=self.load_permille,
            ask_micro={slug: self.ask_for(slug) for slug in caps.get("cargos", ())})


class _Deferring:
    """`with registry.deferring:` = `defer_slots_and_karma()`, then `flush_deferred()`
    however the block ends (a plain object: no generator per use, it runs on every read
    of the log)."""

    __slots__ = ("_registry",)

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __enter__(self) -> None:
        self._registry.defer_slots_and_karma()

    def __exit__(self, *exc: object) -> None:
        self._registry.flush_deferred()


class Registry:
    def __init__(self, index: CandidateIndex, list_rates: dict[str, int] | None = None) -> None:
        self.index = index
        self.islands: dict[str, IslandRecord] = {}
        self.list_rates = dict(list_rates or {})
        # Bumped whenever an Island's asks, approval, Cargos, drain or online state change:
        # the per-Cargo market summary (`cargo_asks`) is recomputed only then.
        self.market_version = 0
        self._asks_cache: dict[str, tuple[int, list[int], list[int]]] = {}
        # Min-heap of (last_heartbeat_ms, island_id), lazily invalidated: an entry is live
        # while its Island is online with that very last_heartbeat_ms. Invariant: every
        # online Island has its live entry in the heap. Lets `stale` look only at the
        # oldest heartbeats instead of scanning the fleet on every dispatch step.
        self._beats: list[tuple[int, str]] = []
        # While not None (`defer_slots_and_karma`): Islands whose free slots or karma moved
        # and are not yet in the index. `flush_deferred` applies each once.
        self._deferred: dict[str, None] | None = None
        self.deferring = _Deferring(self)

    def defer_slots_and_karma(self) -> None:
        """From now until `flush_deferred`, reservations, releases and karma changes update
        the records at once and the index once per Island at the flush. The dispatch core
        defers while it applies one read of the log: a completion's release and karma
        change then cost one link of the Island rather than a link and a move. Nothing may
        query the index in between (the core holds its lock throughout). Used as
        `with registry.deferring:`."""
        assert self._deferred is None, "already deferring"
        self._deferred = {}

    def flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        assert deferred is not None, "not deferring"
        for island_id in deferred:
            rec = self.islands.get(island_id)
            if rec is not None:
                self._to_index(rec)

    def _slots_or_karma_moved(self, rec: IslandRecord) -> None:
        if self._deferred is not None:
            self._deferred[rec.island_id] = None
        else:
            self._to_index(rec)

    def _to_index(self, rec: IslandRecord) -> None:
        self.index.set_slots_and_karma(rec.island_id, rec.slots_free(), rec.karma_milli)

    def _sync(self, rec: IslandRecord) -> None:
        """Everything about the Island to the index (registration, approval, capabilities)."""
        self.index.upsert(rec.view())

    def _sync_live(self, rec: IslandRecord) -> None:
        """Only the live fields to the index (heartbeats, offline): no view is rebuilt and
        unchanged fields cost nothing there."""
        self.index.update_live(rec.island_id, online=rec.online, slots_total=rec.slots_total,
                               slots_free=rec.slots_free(), load_permille=rec.load_permille,
                               latency_ms=rec.latency_ms, warm_models=rec.warm_models)

    def check_index(self) -> None:
        """The index holds exactly every record's view (tests and debugging; O(n))."""
        assert len(self.index) == len(self.islands), (len(self.index), len(self.islands))
        for island_id, rec in self.islands.items():
            assert self.index.get(island_id) == rec.view(), island_id

    def register(self, island_id: str, owner: str, name: str, capabilities: dict[str, Any], approved: bool) -> None:
        rec = self.islands.get(island_id)
        if rec is None:
            rec = IslandRecord(island_id, owner, name, capabilities, approved,
                               slots_total=capabilities.get("slots", 1), ordinal=len(self.islands),
                               asks_micro=dict(capabilities.get("asks_micro", {})), list_rates=self.list_rates)
            self.islands[island_id] = rec
        else:
            rec.capabilities, rec.approved = capabilities, approved
        self.market_version += 1
        self._sync(rec)

    def set_asks(self, island_id: str, asks_micro: dict[str, int]) -> None:
        rec = self.islands.get(island_id)
        if rec is not None and rec.asks_micro != asks_micro:
            rec.asks_micro = dict(asks_micro)
            self.market_version += 1
            self._sync(rec)

    def cargo_asks(self, slug: str) -> tuple[list[int], list[int]]:
        """(asks of approved Islands serving the Cargo, asks of those of them online and
        not draining), each sorted. Cached until `market_version` moves."""
        hit = self._asks_cache.get(slug)
        if hit is not None and hit[0] == self.market_version:
            return hit[1], hit[2]
        approved: list[int] = []
        online: list[int] = []
        for rec in self.islands.values():
            if not rec.approved or slug not in rec.capabilities.get("cargos", ()):
                continue
            ask = rec.ask_for(slug)
            approved.append(ask)
            if rec.online and not rec.draining:
                online.append(ask)
        approved.sort()
        online.sort()
        if len(self._asks_cache) > 4096:
            self._asks_cache.clear()
        self._asks_cache[slug] = (self.market_version, approved, online)
        return approved, online

    def free_slots_online(self) -> int:
        """Free slots of approved, online Islands (the surge rule's capacity). O(Islands)."""
        return sum(r.slots_free() for r in self.islands.values() if r.online and r.approved)

    def set_approved(self, island_id: str, approved: bool) -> None:
        rec = self.islands.get(island_id)
        if rec is not None and rec.approved != approved:
            rec.approved = approved
            self.market_version += 1
            self._sync(rec)

    def set_draining(self, island_id: str, draining: bool) -> None:
        rec = self.islands.get(island_id)
        if rec is not None and rec.draining != draining:
            rec.draining = draining
            self.market_version += 1
            self._sync(rec)

    def set_capabilities(self, island_id: str, capabilities: dict[str, Any]) -> None:
        rec = self.islands.get(island_id)
        if rec is not None:
            rec.capabilities = capabilities
            rec.slots_total = capabilities.get("slots", rec.slots_total)
            self.market_version += 1
            self._sync(rec)

    def set_nats_credential(self, island_id: str, user: str, password_hash: str) -> None:
        rec = self.islands.get(island_id)
        if rec is not None:
            rec.nats_user, rec.nats_password_hash = user, password_hash

    def set_karma(self, island_id: str, karma_milli: int) -> None:
        rec = self.islands.get(island_id)
        if rec is not None and rec.karma_milli != karma_milli:
            rec.karma_milli = karma_milli
            self._slots_or_karma_moved(rec)

    def heartbeat(self, island_id: str, now_ms: int, *, slots_total: int | None = None,
                  load_permille: int | None = None, latency_ms: int | None = None,
                  warm_models: frozenset[str] | None = None) -> bool:
        """Live state from a heartbeat. Returns True if the Island just came online."""
        rec = self.islands.get(island_id)
        if rec is None:
            return False
        came_online = not rec.online
        if came_online:
            self.market_version += 1
        if came_online or rec.last_heartbeat_ms != now_ms:  # else its live entry is in the heap already
            self._push_beat(now_ms, island_id)
        rec.online = True
        rec.last_heartbeat_ms = now_ms
        changed = came_online
        if slots_total is not None and slots_total != rec.slots_total:
            rec.slots_total = slots_total
            changed = True
        if load_permille is not None and load_permille != rec.load_permille:
            rec.load_permille = load_permille
            changed = True
        if latency_ms is not None and latency_ms != rec.latency_ms:
            rec.latency_ms = latency_ms
            changed = True
        if warm_models is not None and warm_models != rec.warm_models:
            rec.warm_models = frozenset(warm_models)  # as the index keeps it
            changed = True
        if changed:  # most heartbeats only say "still here": nothing for the index
            self._sync_live(rec)
        return came_online

    def set_offline(self, island_id: str) -> None:
        rec = self.islands.get(island_id)
        if rec is not None and rec.online:
            rec.online = False
            self.market_version += 1
            self.index.set_online(island_id, False)

    def stale(self, now_ms: int, offline_after_ms: int) -> list[str]:
        """Online Islands whose last heartbeat is older than ``offline_after_ms``, in
        registration order. O((stale + dead entries) log n): only the heap's old head is
        visited. The reported Islands' entries are pushed back, so an Island the caller
        leaves online is reported again next time (same answer as a full scan)."""
        beats = self._beats
        islands = self.islands
        # Keyed by id: a live entry may have a twin (offline, then back in the same ms).
        found: dict[str, IslandRecord] = {}
        while beats and now_ms - beats[0][0] > offline_after_ms:
            beat_ms, island_id = heapq.heappop(beats)
            rec = islands[island_id]
            if rec.online and rec.last_heartbeat_ms == beat_ms:
                found[island_id] = rec
        if not found:
            return []
        for rec in found.values():
            heapq.heappush(beats, (rec.last_heartbeat_ms, rec.island_id))
        return [r.island_id for r in sorted(found.values(), key=lambda r: r.ordinal)]

    def _push_beat(self, now_ms: int, island_id: str) -> None:
        beats = self._beats
        if len(beats) >= MAX_BEATS_PER_ISLAND * len(self.islands) + 64:
            # Rebuild from the records: drops every dead entry, keeps the invariant.
            beats[:] = [(r.last_heartbeat_ms, r.island_id) for r in self.islands.values() if r.online]
            heapq.heapify(beats)
        heapq.heappush(beats, (now_ms, island_id))
        assert len(beats) <= MAX_BEATS_PER_ISLAND * len(self.islands) + 64, len(beats)

    def reserve(self, island_id: str, job_id: UUID) -> None:
        rec = self.islands.get(island_id)
        if rec is not None and job_id not in rec.active:
            rec.active.add(job_id)
            self._slots_or_karma_moved(rec)

    def release(self, island_id: str, job_id: UUID) -> None:
        rec = self.islands.get(island_id)
        if rec is not None and job_id in rec.active:
            rec.active.discard(job_id)
            self._slots_or_karma_moved(rec)
