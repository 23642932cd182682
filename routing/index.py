"""Candidate index: pick the best Island for a Job without scanning the fleet.

Structure (maintained incrementally on every Island change, never rebuilt per decision)::

    pools[(cargo, None)][region]   SortedList of (-base, island_id)   all available Islands serving cargo
    pools[(cargo, model)][region]  SortedList of (-base, island_id)   ... that also have `model`
    warm[(cargo, model)][region]   SortedList of (-base, island_id)   ... that have `model` loaded

"Available" = online, approved and at least one free slot; other Islands are in no list.
(cargo, model) and warm lists exist for the pairs Jobs have asked for: a pair is
materialized from the (cargo, None) lists on its first request and maintained from then on.
``base`` is ``score.base_score(island, cargo, weights)`` (everything but the warm-model
bonus), so every list is ordered best-first, ties by island id.

``choose`` takes the lists of the Job's (cargo, model) in the requested regions (so the
structural filters offline/not_approved/no_free_slot/cargo/model/region cost nothing),
then scans best-first, checking the remaining filters Island by Island:

1. if a model is requested, the warm lists: an Island's total is ``base + w.warm_model``;
2. the (cargo, model) lists, skipping Islands that have the model warm (already seen in 1):
   their total is ``base``.

Each list scan stops at the first entry whose total (an upper bound for everything after
it, since lists are sorted by base and the bonus is constant within a list) is strictly
below the best total found so far. Stopping only on *strictly below* means every Island
tying the best total is found, so ties are broken exactly as ``full_scan_choose`` breaks
them: sort tied ids, ``rng.choice`` (only called when there is a tie).

A decision therefore costs O(#lists + #ineligible Islands ranked above the winner)
(+ O(log n) per list), independent of the fleet size in the common case. When NOTHING is
eligible the scan has to visit the whole pool to prove it (and in doing so counts every
refusal exactly); structural refusals come from counters.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import msgspec
from sortedcontainers import SortedList

from routing.filters import eligible, is_available, residual_reason
from routing.score import base_score, score, warm_bonus
from routing.types import REASONS, STRUCTURAL_REASONS, Decision, IslandView, JobNeeds, NoCandidate, Weights

_Entry = tuple[float, str]  # (-base score, island id): ascending = best first
_ByRegion = dict[str, SortedList]
_NEG_INF = float("-inf")


def _pick(ties: list[str], rng: random.Random) -> str:
    """Deterministic tie-break shared by both implementations."""
    if len(ties) == 1:
        return ties[0]
    ties.sort()
    return rng.choice(ties)


def _select(by_region: _ByRegion | None, regions: frozenset[str]) -> list[SortedList]:
    """Non-empty lists of the requested regions (all regions if none requested), best
    head first so the first scan sets a high bar (and the order is hash-independent)."""
    if not by_region:
        return []
    if regions:
        subs = [sub for region in regions if (sub := by_region.get(region)) is not None]
    else:
        subs = list(by_region.values())
    if len(subs) > 1:
        subs.sort(key=_head)
    return subs


def _head(sub: SortedList) -> _Entry:
    return sub[0]


def _size(by_region: _ByRegion | None) -> int:
    return sum(len(sub) for sub in by_region.values()) if by_region else 0


def _check(island: IslandView) -> None:
    problems = island.problems()
    if problems:
        raise ValueError(f"invalid IslandView {island.island_id!r}: {'; '.join(problems)}")


class CandidateIndex:
    """Incrementally maintained candidate lists; see the module docstring.

    Not thread-safe: one owner (the scheduler's dispatch loop) mutates and queries it.
    """

    def __init__(
        self,
        weights: Weights | None = None,
        islands: Iterable[IslandView] = (),
        pairs: Iterable[tuple[str, str]] = (),
    ) -> None:
        """``pairs``: (cargo slug, model) pairs to index up front, typically every pair of
        the Cargo catalog (see ``prepare``)."""
        self._weights = weights if weights is not None else Weights()
        self._islands: dict[str, IslandView] = {}
        # island id -> cargo -> base score, for Islands currently in the lists
        self._bases: dict[str, dict[str, float]] = {}
        self._pools: dict[tuple[str, str | None], _ByRegion] = {}
        self._warm: dict[tuple[str, str], _ByRegion] = {}
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
    ) -> None:
        """Apply a heartbeat's live state; ``None`` leaves a field unchanged. Raises
        KeyError for an unknown Island, ValueError for out-of-range values."""
        old = self._islands[island_id]
        changes: dict[str, object] = {}
        if slots_free is not None:
            if not 0 <= slots_free <= old.slots_total:
                raise ValueError(f"{island_id}: slots_free={slots_free} outside 0..{old.slots_total}")
            changes["slots_free"] = slots_free
        if load_permille is not None:
            if not 0 <= load_permille <= 1000:
                raise ValueError(f"{island_id}: load_permille={load_permille} outside 0..1000")
            changes["load_permille"] = load_permille
        if latency_ms is not None:
            if latency_ms < 0:
                raise ValueError(f"{island_id}: negative latency_ms")
            changes["latency_ms"] = latency_ms
        if warm_models is not None:
            changes["warm_models"] = frozenset(warm_models)
        if changes:
            self._replace(old, msgspec.structs.replace(old, **changes))

    def set_online(self, island_id: str, online: bool) -> None:
        """Island connected / disconnected."""
        old = self._islands[island_id]
        if old.online != online:
            self._replace(old, msgspec.structs.replace(old, online=online))

    def set_karma(self, island_id: str, karma_milli: int) -> None:
        """New karma (after a KarmaChanged event); reorders the Island's entries."""
        old = self._islands[island_id]
        if old.karma_milli != karma_milli:
            self._replace(old, msgspec.structs.replace(old, karma_milli=karma_milli))

    def take_slot(self, island_id: str) -> None:
        """An assignment was made: one slot fewer. Raises ValueError if none is free (the
        caller's view is stale; do not assign)."""
        old = self._islands[island_id]
        if old.slots_free <= 0:
            raise ValueError(f"{island_id}: no free slot to take")
        self._replace(old, msgspec.structs.replace(old, slots_free=old.slots_free - 1))

    def release_slot(self, island_id: str) -> None:
        """An assignment ended: one slot more, capped at ``slots_total`` (a heartbeat may
        already have reported the slot free; the Island's report wins)."""
        old = self._islands[island_id]
        if old.slots_free < old.slots_total:
            self._replace(old, msgspec.structs.replace(old, slots_free=old.slots_free + 1))

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
        cargo = needs.cargo
        model = needs.model
        islands = self._islands
        by_region = self._pools.get((cargo, model))
        if by_region is None and model is not None:
            by_region = self._materialize(cargo, model)
        subs = _select(by_region, needs.regions)
        considered = 0
        for sub in subs:
            considered += len(sub)

        best = _NEG_INF
        ties: list[str] = []
        examined = 0
        n_eligible = 0
        refused: dict[str, int] = {}

        if model is not None:
            bonus = self._weights.warm_model
            for sub in _select(self._warm.get((cargo, model)), needs.regions):
                for neg_base, island_id in sub:
                    total = -neg_base + bonus
                    if total < best:
                        break
                    examined += 1
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

        for sub in subs:
            for neg_base, island_id in sub:
                total = -neg_base
                if total < best:
                    break
                island = islands[island_id]
                if model is not None and model in island.warm_models:
                    continue  # scanned with its bonus above
                examined += 1
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

        if not ties:
            assert examined == considered, (examined, considered)
            return self._no_candidate(needs, considered, refused)

        tied = len(ties)
        winner = _pick(ties, rng)
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
        warm = self._warm
        models = island.models
        warm_models = island.warm_models
        bases: dict[str, float] = {}
        for cargo in island.cargos:
            base = bases[cargo] = base_score(island, cargo, weights)
            entry = (-base, island_id)
            by_region = pools.get((cargo, None))
            if by_region is None:
                by_region = pools[(cargo, None)] = {}
            _add(by_region, region, entry)
            for model in models:
                by_region = pools.get((cargo, model))
                if by_region is not None:  # materialized: someone asked for this pair
                    _add(by_region, region, entry)
                    if model in warm_models:
                        _add(warm[(cargo, model)], region, entry)
        self._bases[island_id] = bases

    def _unlink(self, island: IslandView) -> None:
        """Remove an Island from every list it is in (no-op if it is in none)."""
        bases = self._bases.pop(island.island_id, None)
        if bases is None:
            return
        island_id = island.island_id
        region = island.region
        pools = self._pools
        warm = self._warm
        models = island.models
        warm_models = island.warm_models
        for cargo, base in bases.items():
            entry = (-base, island_id)
            _discard(pools[(cargo, None)], region, entry)
            for model in models:
                by_region = pools.get((cargo, model))
                if by_region is not None:
                    _discard(by_region, region, entry)
                    if model in warm_models:
                        _discard(warm[(cargo, model)], region, entry)

    def _materialize(self, cargo: str, model: str) -> _ByRegion:
        """Create the (cargo, model) and warm lists from the (cargo, None) lists.

        Pairs are materialized on first request and then maintained like every other
        list, so Islands are never indexed under pairs nobody asks for (e.g. a Cargo
        crossed with another Cargo's model). O(pool) once per pair; the number of pairs
        is bounded by the catalog (the API accepts only catalog Cargos and models)."""
        islands = self._islands
        pools: _ByRegion = {}
        warm: _ByRegion = {}
        for region, sub in self._pools.get((cargo, None), {}).items():
            have = [entry for entry in sub if model in islands[entry[1]].models]
            if have:
                pools[region] = SortedList(have)
            loaded = [entry for entry in have if model in islands[entry[1]].warm_models]
            if loaded:
                warm[region] = SortedList(loaded)
        self._pools[(cargo, model)] = pools
        self._warm[(cargo, model)] = warm
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
            # Still in the same lists: only a changed base score moves it.
            weights = self._weights
            if all(base_score(new, cargo, weights) == base for cargo, base in bases.items()):
                self._islands[island_id] = new  # counters unchanged: available before and after
                return
        self._count(old, -1)
        self._unlink(old)
        self._islands[island_id] = new
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
        self._pools = {(cargo, None): {r: SortedList(v) for r, v in by.items()} for cargo, by in lists.items()}
        self._warm = {}
        for cargo, model in pairs:
            self._materialize(cargo, model)  # type: ignore[arg-type]

    def check_invariants(self) -> None:
        """Compare against a from-scratch rebuild (tests and debugging; O(n log n))."""
        fresh = CandidateIndex(self._weights, self._islands.values())
        for cargo, model in self._pools:
            if model is not None:
                fresh._materialize(cargo, model)

        def dump(table: dict) -> dict:
            return {k: {r: list(s) for r, s in by.items()} for k, by in table.items() if by}

        for by in [*self._pools.values(), *self._warm.values()]:
            assert all(by.values()), "empty region list kept"
        assert dump(self._pools) == dump(fresh._pools), "pools differ from a rebuild"
        assert dump(self._warm) == dump(fresh._warm), "warm lists differ from a rebuild"
        assert self._bases == fresh._bases, "cached base scores differ from a rebuild"
        assert (self._n_online, self._n_online_approved, self._n_available) == (
            fresh._n_online,
            fresh._n_online_approved,
            fresh._n_available,
        ), "counters differ from a rebuild"


def _add(by_region: _ByRegion, region: str, entry: _Entry) -> None:
    sub = by_region.get(region)
    if sub is None:
        by_region[region] = SortedList([entry])
    else:
        sub.add(entry)


def _discard(by_region: _ByRegion, region: str, entry: _Entry) -> None:
    sub = by_region[region]
    sub.remove(entry)  # ValueError here = index corrupted
    if not sub:
        del by_region[region]


def full_scan_choose(
    islands: Iterable[IslandView], needs: JobNeeds, weights: Weights, rng: random.Random
) -> Decision | NoCandidate:
    """Baseline and reference: filter every Island, score the eligible ones, take the max
    (ties: sorted ids, ``rng.choice``). Same result as ``CandidateIndex.choose``."""
    best = _NEG_INF
    ties: list[str] = []
    fleet = 0
    considered = 0
    n_eligible = 0
    refusals_by_reason: dict[str, int] = {}
    by_id: dict[str, IslandView] = {}
    for island in islands:
        fleet += 1
        reason = eligible(island, needs)
        if reason is not None:
            refusals_by_reason[reason] = refusals_by_reason.get(reason, 0) + 1
            if reason not in STRUCTURAL_REASONS:
                considered += 1
            continue
        considered += 1
        n_eligible += 1
        total = base_score(island, needs.cargo, weights) + warm_bonus(island, needs, weights)
        if total > best:
            best = total
            ties = [island.island_id]
            by_id = {island.island_id: island}
        elif total == best:
            ties.append(island.island_id)
            by_id[island.island_id] = island
    if not ties:
        refusals = {r: refusals_by_reason[r] for r in REASONS if r in refusals_by_reason}
        return NoCandidate(fleet_size=fleet, refusals=refusals)
    tied = len(ties)
    winner = _pick(ties, rng)
    breakdown = score(by_id[winner], needs, weights)
    assert breakdown.total == best
    return Decision(
        island_id=winner,
        score=breakdown,
        fleet_size=fleet,
        candidates_considered=considered,
        candidates_examined=considered,
        candidates_eligible=n_eligible,
        tied=tied,
    )
