"""Candidate index: pick the best Island for a Job without scanning the fleet.

Structure (maintained incrementally on every Island change, never rebuilt per decision)::

    pools[(cargo, None)][region]   _Pool: SortedList of (-base, island_id) + bounds   available Islands serving cargo
    pools[(cargo, model)][region]  _Pool                                              ... that also have `model`
    warm[(cargo, model)][region]   SortedList of (-base, island_id)                   ... that have `model` loaded

"Available" = online, approved and at least one free slot; other Islands are in no list.
(cargo, model) and warm lists exist for the pairs Jobs have asked for: a pair is
materialized from the (cargo, None) lists on its first request (or up front through
``prepare``) and maintained from then on. ``base`` is ``score.base_score(island, cargo,
weights)`` (everything but the warm-model bonus), so every list is ordered best-first,
ties by island id.

``choose`` takes the lists of the Job's (cargo, model) in the requested regions (so the
structural filters offline/not_approved/no_free_slot/cargo/model/region cost nothing),
then scans best-first, checking the remaining filters Island by Island:

1. if a model is requested, the warm lists: an Island's total is ``base + w.warm_model``;
2. the (cargo, model) lists, skipping Islands that have the model warm (already seen in 1):
   their total is ``base``.

Early stop: each list scan stops at the first entry whose total (an upper bound for
everything after it, since lists are sorted by base and the bonus is constant within a
list) is strictly below the best total found so far. Stopping only on *strictly below*
means every Island tying the best total is found, so ties are broken exactly as
``full_scan_choose`` breaks them: sort tied ids, ``rng.choice`` (only called on a tie).

Hopeless lists: when nothing is eligible the scan would have to visit the whole pool to
prove it. Each ``_Pool`` therefore keeps conservative bounds of the attributes the
remaining filters test (platforms seen; lo/hi of VRAM, RAM, tier, latency, ask, karma):
widened on every insert, never narrowed on removal (so always sound), recomputed exactly
whenever a scan walks a list to its end. From them, ``_Pool.uniform_refusal`` can prove
"every Island in this list passes the filters before R and fails R", and the whole list
is counted under R without visiting it - exact, so refusal counts stay identical to the
full scan. The proofs are only tried when a scan exceeds ``SCAN_BUDGET`` examined
Islands (the scan then restarts with proofs on), so ordinary decisions never pay for them.

Cost: O(#lists + #ineligible Islands ranked above the winner) per decision, independent
of the fleet size in the common case; O(pool) only for a Job nothing can run whose
refusal reasons differ inside a list (and the bounds are re-tightened by that scan).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import msgspec
from sortedcontainers import SortedList

from routing.filters import is_available, residual_reason
from routing.score import base_score, score, tie_break
from routing.types import REASONS, STRUCTURAL_REASONS, Decision, IslandView, JobNeeds, NoCandidate, Weights

_Entry = tuple[float, str]  # (-base score, island id): ascending = best first
_NEG_INF = float("-inf")

#: Islands a decision may examine before it restarts with whole-list proofs enabled.
SCAN_BUDGET = 64


class _Pool:
    """One (cargo[, model], region) list plus sound bounds of its members' attributes."""

    __slots__ = (
        "entries",
        "region",
        "cargo",
        "platforms",
        "vram_lo",
        "vram_hi",
        "ram_lo",
        "ram_hi",
        "tier_lo",
        "tier_hi",
        "latency_lo",
        "latency_hi",
        "ask_lo",
        "ask_hi",
        "karma_lo",
        "karma_hi",
    )

    def __init__(self, region: str, cargo: str, entries: list[_Entry], islands: dict[str, IslandView]) -> None:
        assert entries
        self.region = region
        self.cargo = cargo
        self.entries = SortedList(entries)
        self.tighten(islands)

    def __len__(self) -> int:
        return len(self.entries)

    def tighten(self, islands: dict[str, IslandView]) -> None:
        """Recompute exact bounds from the current members. O(len)."""
        cargo = self.cargo
        members = [islands[island_id] for _, island_id in self.entries]
        self.platforms = {i.platform for i in members}
        vram = [i.vram_mb for i in members]
        ram = [i.ram_mb for i in members]
        tier = [i.hardware_tier for i in members]
        latency = [i.latency_ms for i in members]
        ask = [i.ask_micro.get(cargo, 0) for i in members]
        karma = [i.karma_milli for i in members]
        self.vram_lo, self.vram_hi = min(vram), max(vram)
        self.ram_lo, self.ram_hi = min(ram), max(ram)
        self.tier_lo, self.tier_hi = min(tier), max(tier)
        self.latency_lo, self.latency_hi = min(latency), max(latency)
        self.ask_lo, self.ask_hi = min(ask), max(ask)
        self.karma_lo, self.karma_hi = min(karma), max(karma)

    def add(self, entry: _Entry, island: IslandView) -> None:
        self.entries.add(entry)
        self.platforms.add(island.platform)
        v = island.vram_mb
        if v < self.vram_lo:
            self.vram_lo = v
        elif v > self.vram_hi:
            self.vram_hi = v
        v = island.ram_mb
        if v < self.ram_lo:
            self.ram_lo = v
        elif v > self.ram_hi:
            self.ram_hi = v
        v = island.hardware_tier
        if v < self.tier_lo:
            self.tier_lo = v
        elif v > self.tier_hi:
            self.tier_hi = v
        v = island.latency_ms
        if v < self.latency_lo:
            self.latency_lo = v
        elif v > self.latency_hi:
            self.latency_hi = v
        v = island.ask_micro.get(self.cargo, 0)
        if v < self.ask_lo:
            self.ask_lo = v
        elif v > self.ask_hi:
            self.ask_hi = v
        v = island.karma_milli
        if v < self.karma_lo:
            self.karma_lo = v
        elif v > self.karma_hi:
            self.karma_hi = v

    def uniform_refusal(self, needs: JobNeeds) -> str | None:
        """A reason R such that, provably from the bounds, every member passes every
        residual filter before R and fails R (so R is every member's first failing
        reason); None if the bounds cannot prove that."""
        if needs.platforms:
            if self.platforms.isdisjoint(needs.platforms):
                return "platform"
            if not self.platforms <= needs.platforms:
                return None
        if needs.vram_mb > self.vram_lo:
            return "vram" if needs.vram_mb > self.vram_hi else None
        if needs.ram_mb > self.ram_lo:
            return "ram" if needs.ram_mb > self.ram_hi else None
        if needs.min_hardware_tier > self.tier_lo:
            return "hardware_tier" if needs.min_hardware_tier > self.tier_hi else None
        limit = needs.max_latency_ms
        if limit is not None and self.latency_hi > limit:
            return "latency" if self.latency_lo > limit else None
        bid = needs.bid_micro
        if bid is not None and self.ask_hi > bid:
            return "price" if self.ask_lo > bid else None
        if needs.min_karma_milli > self.karma_lo:
            return "karma" if needs.min_karma_milli > self.karma_hi else None
        return None  # everyone passes all but possibly `excluded`

    def check_bounds(self, islands: dict[str, IslandView]) -> None:
        for _, island_id in self.entries:
            i = islands[island_id]
            assert i.platform in self.platforms
            assert self.vram_lo <= i.vram_mb <= self.vram_hi
            assert self.ram_lo <= i.ram_mb <= self.ram_hi
            assert self.tier_lo <= i.hardware_tier <= self.tier_hi
            assert self.latency_lo <= i.latency_ms <= self.latency_hi
            assert self.ask_lo <= i.ask_micro.get(self.cargo, 0) <= self.ask_hi
            assert self.karma_lo <= i.karma_milli <= self.karma_hi


_Pools = dict[str, _Pool]  # region -> pool
_Warm = dict[str, SortedList]  # region -> warm list


def _head(pool: _Pool) -> _Entry:
    return pool.entries[0]


def _select(by_region: _Pools | None, regions: frozenset[str]) -> list[_Pool]:
    """Pools of the requested regions (all regions if none requested), best head first
    so the first scan sets a high bar (and the order does not depend on set hashing)."""
    if not by_region:
        return []
    if regions:
        pools = [pool for region in regions if (pool := by_region.get(region)) is not None]
    else:
        pools = list(by_region.values())
    if len(pools) > 1:
        pools.sort(key=_head)
    return pools


def _size(by_region: _Pools | None) -> int:
    return sum(len(pool) for pool in by_region.values()) if by_region else 0


def _check(island: IslandView) -> None:
    problems = island.problems()
    if problems:
        raise ValueError(f"invalid IslandView {island.island_id!r}: {'; '.join(problems)}")


class _Budget(Exception):
    """Raised inside a scan that examined more than its budget."""


class CandidateIndex:
    """Incrementally maintained candidate lists; see the module docstring.

    Not thread-safe: one owner (the scheduler's dispatch loop) mutates and queries it.
    """

    def __init__(
        self,
        weights: Weights | None = None,
        islands: Iterable[IslandView] = (),
        pairs: Iterable[tuple[str, str]] = (),
        scan_budget: int = SCAN_BUDGET,
    ) -> None:
        """``pairs``: (cargo slug, model) pairs to index up front, typically every pair of
        the Cargo catalog (see ``prepare``). ``scan_budget``: Islands a decision examines
        before retrying with whole-list proofs (0 = always use proofs; results are the
        same either way, only the cost differs)."""
        assert scan_budget >= 0
        self._scan_budget = scan_budget
        self._weights = weights if weights is not None else Weights()
        self._islands: dict[str, IslandView] = {}
        # island id -> cargo -> base score, for Islands currently in the lists
        self._bases: dict[str, dict[str, float]] = {}
        self._pools: dict[tuple[str, str | None], _Pools] = {}
        self._warm: dict[tuple[str, str], _Warm] = {}
        # cargo -> [(model, pools[(cargo, model)], warm[(cargo, model)])] of the materialized
        # pairs: linking visits the pairs that exist, not every model an Island has.
        self._pairs: dict[str, list[tuple[str, _Pools, _Warm]]] = {}
        self._n_online = 0
        self._n_online_approved = 0
        self._n_available = 0
        for island in islands:
            _check(island)
            if island.island_id in self._islands:
                raise ValueError(f"duplicate island {island.island_id!r}")
            self._islands[island.island_id] = island
            self._count(island, 1)
        self._rebuild()
        self.prepare(pairs)

    # ------------------------------------------------------------------ reads
    @property
    def weights(self) -> Weights:
        return self._weights

    def __len__(self) -> int:
        return len(self._islands)

    def __contains__(self, island_id: object) -> bool:
        return island_id in self._islands

    def get(self, island_id: str) -> IslandView | None:
        return self._islands.get(island_id)

    def islands(self) -> list[IslandView]:
        """Current view of every Island (insertion order)."""
        return list(self._islands.values())

    # ----------------------------------------------------------------- writes
    def upsert(self, island: IslandView) -> None:
        """Add an Island or replace everything known about it (registration, reconnect,
        full heartbeat). Raises ValueError on an invalid view."""
        _check(island)
        old = self._islands.get(island.island_id)
        if old is None:
            self._islands[island.island_id] = island
            self._count(island, 1)
            self._link(island)
        else:
            self._replace(old, island)

    def remove(self, island_id: str) -> bool:
        """Forget an Island (deregistered / evicted). Returns False if it was unknown."""
        old = self._islands.pop(island_id, None)
        if old is None:
            return False
        self._count(old, -1)
        self._unlink(old)
        return True

    def update_live(
        self,
        island_id: str,
        *,
        slots_free: int | None = None,
        load_permille: int | None = None,
        latency_ms: int | None = None,
        warm_models: frozenset[str] | None = None,
        slots_total: int | None = None,
        online: bool | None = None,
    ) -> None:
        """Apply a heartbeat's live state; ``None`` leaves a field unchanged, and so does
        a value equal to the current one (nothing to do if nothing differs). Raises
        KeyError for an unknown Island, ValueError for out-of-range values."""
        old = self._islands[island_id]
        changes: dict[str, object] = {}
        if slots_total is not None and slots_total != old.slots_total:
            if slots_total < 0:
                raise ValueError(f"{island_id}: negative slots_total={slots_total}")
            changes["slots_total"] = slots_total
        total = old.slots_total if slots_total is None else slots_total
        if slots_free is not None:
            if not 0 <= slots_free <= total:
                raise ValueError(f"{island_id}: slots_free={slots_free} outside 0..{total}")
            if slots_free != old.slots_free:
                changes["slots_free"] = slots_free
        elif not old.slots_free <= total:
            raise ValueError(f"{island_id}: slots_free={old.slots_free} outside 0..slots_total={total}")
        if load_permille is not None and load_permille != old.load_permille:
            if not 0 <= load_permille <= 1000:
                raise ValueError(f"{island_id}: load_permille={load_permille} outside 0..1000")
            changes["load_permille"] = load_permille
        if latency_ms is not None and latency_ms != old.latency_ms:
            if latency_ms < 0:
                raise ValueError(f"{island_id}: negative latency_ms")
            changes["latency_ms"] = latency_ms
        if warm_models is not None and warm_models != old.warm_models:
            changes["warm_models"] = frozenset(warm_models)
        if online is not None and online != old.online:
            changes["online"] = online
        if changes:
            self._replace(old, msgspec.structs.replace(old, **changes))

    def set_online(self, island_id: str, online: bool) -> None:
        """Island connected / disconnected."""
        old = self._islands[island_id]
        if old.online != online:
            self._replace(old, msgspec.structs.replace(old, online=online))

    def set_karma(self, island_id: str, karma_milli: int) -> None:
        """New karma (after a karma event); reorders the Island's entries."""
        old = self._islands[island_id]
        if old.karma_milli != karma_milli:
            self._replace(old, msgspec.structs.replace(old, karma_milli=karma_milli))

    def take_slot(self, island_id: str) -> None:
        """An assignment was made: one slot fewer. Raises ValueError if none is free (the
        caller's view is stale; do not assign)."""
        old = self._islands[island_id]
        if old.slots_free <= 0:
            raise ValueError(f"{island_id}: no free slot to take")
        self.set_slots_free(island_id, old.slots_free - 1)

    def release_slot(self, island_id: str) -> None:
        """An assignment ended: one slot more, capped at ``slots_total`` (a heartbeat may
        already have reported the slot free; the Island's report wins)."""
        old = self._islands[island_id]
        if old.slots_free < old.slots_total:
            self.set_slots_free(island_id, old.slots_free + 1)

    def set_slots_free(self, island_id: str, slots_free: int) -> None:
        """Free slots as the caller counts them (the registry, on every reservation and
        release). Scores and list bounds do not depend on free slots, only availability
        does: an Island that stays available (or unavailable) costs one dict write, one
        that becomes (un)available is linked (unlinked). Raises KeyError for an unknown
        Island, ValueError outside 0..slots_total."""
        old = self._islands[island_id]
        if old.slots_free == slots_free:
            return
        if not 0 <= slots_free <= old.slots_total:
            raise ValueError(f"{island_id}: slots_free={slots_free} outside 0..{old.slots_total}")
        new = msgspec.structs.replace(old, slots_free=slots_free)
        if is_available(new) == is_available(old):
            self._islands[island_id] = new  # same lists, same counters, same bounds
        else:
            self._relink(old, new)

    def set_slots_and_karma(self, island_id: str, slots_free: int, karma_milli: int) -> None:
        """`set_slots_free` and `set_karma` as one change: an Island that becomes available
        with a new karma (a completion frees its slot and moves its karma) is linked once
        with its new score, instead of linked and then moved. The same index as the two
        calls in either order. Raises KeyError for an unknown Island, ValueError outside
        0..slots_total."""
        old = self._islands[island_id]
        if old.karma_milli == karma_milli:
            self.set_slots_free(island_id, slots_free)
            return
        if not 0 <= slots_free <= old.slots_total:
            raise ValueError(f"{island_id}: slots_free={slots_free} outside 0..{old.slots_total}")
        self._replace(old, msgspec.structs.replace(old, slots_free=slots_free, karma_milli=karma_milli))

    def set_weights(self, weights: Weights) -> None:
        """Change the score weights: re-sorts every list (O(n log n); configuration reload
        only, never per decision)."""
        if weights != self._weights:
            self._weights = weights
            self._rebuild()

    def prepare(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Index these (cargo, model) pairs now rather than on their first request (which
        costs one O(pool) pass inside that ``choose``). Call at startup with the catalog."""
        for cargo, model in pairs:
            if (cargo, model) not in self._pools:
                self._materialize(cargo, model)

    # ----------------------------------------------------------------- choose
    def choose(self, needs: JobNeeds, weights: Weights | None, rng: random.Random) -> Decision | NoCandidate:
        """Best eligible Island for ``needs`` (ties broken by ``rng``), or the refusal
        counts. ``weights`` None or equal to the index's weights costs nothing; different
        weights trigger ``set_weights`` first."""
        if weights is not None and weights is not self._weights and weights != self._weights:
            self.set_weights(weights)
        by_region = self._pools.get((needs.cargo, needs.model))
        if by_region is None and needs.model is not None:
            by_region = self._materialize(needs.cargo, needs.model)
        pools = _select(by_region, needs.regions)
        if self._scan_budget:
            try:
                return self._scan(needs, pools, rng, prove=False, budget=self._scan_budget)
            except _Budget:
                pass
        return self._scan(needs, pools, rng, prove=True, budget=-1)

    def _scan(
        self, needs: JobNeeds, pools: list[_Pool], rng: random.Random, *, prove: bool, budget: int
    ) -> Decision | NoCandidate:
        """One decision over ``pools``; raises _Budget when more than ``budget`` (>= 0)
        Islands were examined. With ``prove``, lists the bounds prove hopeless are
        counted without being visited, and fully walked lists get exact bounds."""
        islands = self._islands
        model = needs.model
        considered = 0
        for pool in pools:
            considered += len(pool)
        refused: dict[str, int] = {}
        skipped = 0
        if prove:
            hopeful = []
            for pool in pools:
                reason = pool.uniform_refusal(needs)
                if reason is None:
                    hopeful.append(pool)
                else:
                    refused[reason] = refused.get(reason, 0) + len(pool)
                    skipped += len(pool)
            pools = hopeful

        best = _NEG_INF
        ties: list[str] = []
        examined = 0
        n_eligible = 0

        if model is not None and pools:
            warm_by_region = self._warm.get((needs.cargo, model))
            if warm_by_region:
                warm = [w for pool in pools if (w := warm_by_region.get(pool.region)) is not None]
                if len(warm) > 1:
                    warm.sort(key=lambda w: w[0])
                bonus = self._weights.warm_model
                for entries in warm:
                    for neg_base, island_id in entries:
                        total = -neg_base + bonus
                        if total < best:
                            break
                        examined += 1
                        if examined == budget:
                            raise _Budget
                        reason = residual_reason(islands[island_id], needs)
                        if reason is not None:
                            refused[reason] = refused.get(reason, 0) + 1
                            continue
                        n_eligible += 1
                        if total > best:
                            best = total
                            ties = [island_id]
                        else:
                            ties.append(island_id)

        for pool in pools:
            walked_to_end = True
            for neg_base, island_id in pool.entries:
                total = -neg_base
                if total < best:
                    walked_to_end = False
                    break
                island = islands[island_id]
                if model is not None and model in island.warm_models:
                    continue  # scanned with its bonus above
                examined += 1
                if examined == budget:
                    raise _Budget
                reason = residual_reason(island, needs)
                if reason is not None:
                    refused[reason] = refused.get(reason, 0) + 1
                    continue
                n_eligible += 1
                if total > best:
                    best = total
                    ties = [island_id]
                else:
                    ties.append(island_id)
            if prove and walked_to_end:
                pool.tighten(islands)

        if not ties:
            assert examined + skipped == considered, (examined, skipped, considered)
            return self._no_candidate(needs, considered, refused)

        tied = len(ties)
        winner = tie_break(ties, rng)
        breakdown = score(islands[winner], needs, self._weights)
        assert breakdown.total == best, (winner, breakdown.total, best)
        return Decision(
            island_id=winner,
            score=breakdown,
            fleet_size=len(islands),
            candidates_considered=considered,
            candidates_examined=examined,
            candidates_eligible=n_eligible,
            tied=tied,
        )

    def _no_candidate(self, needs: JobNeeds, considered: int, refused: dict[str, int]) -> NoCandidate:
        cargo_pool = _size(self._pools.get((needs.cargo, None)))
        model_pool = cargo_pool if needs.model is None else _size(self._pools.get((needs.cargo, needs.model)))
        structural = {
            "offline": len(self._islands) - self._n_online,
            "not_approved": self._n_online - self._n_online_approved,
            "no_free_slot": self._n_online_approved - self._n_available,
            "cargo": self._n_available - cargo_pool,
            "model": cargo_pool - model_pool,
            "region": model_pool - considered,
        }
        refusals = {}
        for reason in REASONS:
            count = structural[reason] if reason in STRUCTURAL_REASONS else refused.get(reason, 0)
            assert count >= 0, (reason, count)
            if count:
                refusals[reason] = count
        assert sum(refusals.values()) == len(self._islands), refusals
        return NoCandidate(fleet_size=len(self._islands), refusals=refusals)

    # -------------------------------------------------------------- internals
    def _count(self, island: IslandView, sign: int) -> None:
        if island.online:
            self._n_online += sign
            if island.approved:
                self._n_online_approved += sign
                if island.slots_free > 0:
                    self._n_available += sign

    def _link(self, island: IslandView) -> None:
        """Insert an available Island into every list it belongs in."""
        if not is_available(island):
            return
        island_id = island.island_id
        region = island.region
        weights = self._weights
        pools = self._pools
        islands = self._islands
        pairs = self._pairs
        models = island.models
        warm_models = island.warm_models
        bases: dict[str, float] = {}
        for cargo in island.cargos:
            base = bases[cargo] = base_score(island, cargo, weights)
            entry = (-base, island_id)
            by_region = pools.get((cargo, None))
            if by_region is None:
                by_region = pools[(cargo, None)] = {}
            _add(by_region, region, cargo, entry, island, islands)
            for model, by_region, by_warm in pairs.get(cargo, ()):  # materialized: someone asked for it
                if model in models:
                    _add(by_region, region, cargo, entry, island, islands)
                    if model in warm_models:
                        entries = by_warm.get(region)
                        if entries is None:
                            by_warm[region] = SortedList([entry])
                        else:
                            entries.add(entry)
        self._bases[island_id] = bases

    def _unlink(self, island: IslandView) -> None:
        """Remove an Island from every list it is in (no-op if it is in none)."""
        bases = self._bases.pop(island.island_id, None)
        if bases is None:
            return
        island_id = island.island_id
        region = island.region
        pools = self._pools
        pairs = self._pairs
        models = island.models
        warm_models = island.warm_models
        for cargo, base in bases.items():
            entry = (-base, island_id)
            _discard(pools[(cargo, None)], region, entry)
            for model, by_region, by_warm in pairs.get(cargo, ()):
                if model in models:
                    _discard(by_region, region, entry)
                    if model in warm_models:
                        entries = by_warm[region]
                        entries.remove(entry)
                        if not entries:
                            del by_warm[region]

    def _materialize(self, cargo: str, model: str) -> _Pools:
        """Create the (cargo, model) and warm lists from the (cargo, None) lists.

        Pairs are materialized on first request and then maintained like every other
        list, so Islands are never indexed under pairs nobody asks for (e.g. a Cargo
        crossed with another Cargo's model). O(pool) once per pair; the number of pairs
        is bounded by the catalog (the API accepts only catalog Cargos and models)."""
        assert (cargo, model) not in self._pools, (cargo, model)
        islands = self._islands
        pools: _Pools = {}
        warm: _Warm = {}
        for region, pool in self._pools.get((cargo, None), {}).items():
            have = [entry for entry in pool.entries if model in islands[entry[1]].models]
            if have:
                pools[region] = _Pool(region, cargo, have, islands)
            loaded = [entry for entry in have if model in islands[entry[1]].warm_models]
            if loaded:
                warm[region] = SortedList(loaded)
        self._pools[(cargo, model)] = pools
        self._warm[(cargo, model)] = warm
        self._pairs.setdefault(cargo, []).append((model, pools, warm))
        return pools

    def _replace(self, old: IslandView, new: IslandView) -> None:
        island_id = old.island_id
        assert new.island_id == island_id
        bases = self._bases.get(island_id)
        if (
            bases is not None
            and is_available(new)
            and new.warm_models == old.warm_models
            and new.cargos == old.cargos
            and new.models == old.models
            and new.region == old.region
        ):
            # Available before and after, in the same lists (counters unchanged): at most
            # its entries move within them (karma, load, latency, ask changed).
            if (
                # attributes the pools' bounds cover
                new.latency_ms == old.latency_ms
                and new.karma_milli == old.karma_milli
                and new.vram_mb == old.vram_mb
                and new.ram_mb == old.ram_mb
                and new.hardware_tier == old.hardware_tier
                and new.platform == old.platform
                and new.ask_micro == old.ask_micro
            ):
                # Same bounds: only a changed base score would move it.
                weights = self._weights
                if all(base_score(new, cargo, weights) == base for cargo, base in bases.items()):
                    self._islands[island_id] = new
                    return
            self._move(new, bases)
            return
        self._relink(old, new)

    def _move(self, new: IslandView, bases: dict[str, float]) -> None:
        """Re-sort an available Island inside the lists it already is in (same cargos,
        models, warm models and region; only scores or bounded attributes changed):
        cheaper than unlinking and linking it. Bounds are widened with the new values."""
        island_id = new.island_id
        region = new.region
        weights = self._weights
        pools = self._pools
        models = new.models
        warm_models = new.warm_models
        moved: dict[str, float] = {}
        for cargo, old_base in bases.items():
            base = moved[cargo] = base_score(new, cargo, weights)
            old_entry = (-old_base, island_id)
            entry = (-base, island_id)
            _resort(pools[(cargo, None)][region], old_entry, entry, new)
            for model, by_region, by_warm in self._pairs.get(cargo, ()):
                if model in models:
                    _resort(by_region[region], old_entry, entry, new)
                    if model in warm_models:
                        entries = by_warm[region]
                        entries.remove(old_entry)
                        entries.add(entry)
        self._islands[island_id] = new
        self._bases[island_id] = moved

    def _relink(self, old: IslandView, new: IslandView) -> None:
        """Replace ``old`` by ``new`` the general way: out of every list and counter, in again."""
        self._count(old, -1)
        self._unlink(old)
        self._islands[new.island_id] = new
        self._count(new, 1)
        self._link(new)

    def _rebuild(self) -> None:
        """Bulk (re)build of every list from ``_islands`` (construction, new weights),
        keeping the set of materialized (cargo, model) pairs."""
        pairs = [key for key in self._pools if key[1] is not None]
        self._bases = {}
        weights = self._weights
        lists: dict[str, dict[str, list[_Entry]]] = {}
        for island in self._islands.values():
            if not is_available(island):
                continue
            bases = {cargo: base_score(island, cargo, weights) for cargo in island.cargos}
            self._bases[island.island_id] = bases
            for cargo, base in bases.items():
                lists.setdefault(cargo, {}).setdefault(island.region, []).append((-base, island.island_id))
        self._pools = {
            (cargo, None): {region: _Pool(region, cargo, entries, self._islands) for region, entries in by.items()}
            for cargo, by in lists.items()
        }
        self._warm = {}
        self._pairs = {}
        for cargo, model in pairs:
            self._materialize(cargo, model)  # type: ignore[arg-type]

    def check_invariants(self) -> None:
        """Compare against a from-scratch rebuild (tests and debugging; O(n log n))."""
        fresh = CandidateIndex(self._weights, self._islands.values(), scan_budget=self._scan_budget)
        for cargo, model in self._pools:
            if model is not None:
                fresh._materialize(cargo, model)

        def dump(table: dict) -> dict:
            return {
                key: {region: list(getattr(lst, "entries", lst)) for region, lst in by.items()}
                for key, by in table.items()
                if by
            }

        for by in [*self._pools.values(), *self._warm.values()]:
            assert all(len(lst) for lst in by.values()), "empty region list kept"
        for by_region in self._pools.values():
            for pool in by_region.values():
                pool.check_bounds(self._islands)
        assert dump(self._pools) == dump(fresh._pools), "pools differ from a rebuild"
        assert dump(self._warm) == dump(fresh._warm), "warm lists differ from a rebuild"
        assert self._bases == fresh._bases, "cached base scores differ from a rebuild"
        assert (self._n_online, self._n_online_approved, self._n_available) == (
            fresh._n_online,
            fresh._n_online_approved,
            fresh._n_available,
        ), "counters differ from a rebuild"


def _add(
    by_region: _Pools, region: str, cargo: str, entry: _Entry, island: IslandView, islands: dict[str, IslandView]
) -> None:
    pool = by_region.get(region)
    if pool is None:
        by_region[region] = _Pool(region, cargo, [entry], islands)
    else:
        pool.add(entry, island)


def _resort(pool: _Pool, old_entry: _Entry, entry: _Entry, island: IslandView) -> None:
    """Move an Island's entry within one pool (its score changed; bounds widen with it)."""
    pool.entries.remove(old_entry)  # ValueError here = index corrupted
    pool.add(entry, island)


def _discard(by_region: _Pools, region: str, entry: _Entry) -> None:
    pool = by_region[region]
    pool.entries.remove(entry)  # ValueError here = index corrupted
    if not pool.entries:
        del by_region[region]
