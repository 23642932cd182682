"""The full scan: filter every Island, score the eligible ones, take the best. The
baseline the candidate index (routing/index.py) is measured against and the reference it
must agree with (tests/test_routing.py)."""

from __future__ import annotations

import random
from collections.abc import Iterable

from routing.filters import eligible
from routing.score import base_score, score, tie_break, warm_bonus
from routing.types import REASONS, STRUCTURAL_REASONS, Decision, IslandView, JobNeeds, NoCandidate, Weights

_NEG_INF = float("-inf")


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
    winner = tie_break(ties, rng)
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
