"""Score an eligible Island for a Job: higher is better.

Each component is a bounded, monotone function of one Island property, multiplied by its
weight (``types.Weights``):

    karma       w.karma      * k / (|k| + karma_ref_milli)          in (-1, 1), rises with karma
                (k = karma_milli - karma_mid_milli: centred on a new Island's 50, decision 0051)
    latency     w.latency    * ref / (ref + latency_ms)             in (0, 1], falls with latency
    load        w.load       * (1000 - load_permille) / 1000        in [0, 1], falls with load
    price       w.price      * ref / (ref + ask_micro[cargo])       in (0, 1], falls with the ask
    warm_model  w.warm_model if the requested model is loaded, else 0

``base = ((karma + latency) + load) + price`` depends only on the Island and the Cargo, so
the candidate index can keep Islands sorted by it. ``total = base + warm_model``; the warm
bonus is the only Job-dependent part and is bounded by ``w.warm_model``.

Everything is plain float arithmetic in a fixed order: the same inputs give bit-identical
scores in every process, which is what the index/full-scan equivalence and the simulator's
reproducibility rely on.
"""

from __future__ import annotations

import random

from routing.types import IslandView, JobNeeds, ScoreBreakdown, Weights


def components(island: IslandView, cargo: str, weights: Weights) -> tuple[float, float, float, float]:
    """Weighted (karma, latency, load, price) contributions for this Island and Cargo."""
    karma = island.karma_milli - weights.karma_mid_milli
    karma_part = weights.karma * (karma / (abs(karma) + weights.karma_ref_milli))
    latency_ref = weights.latency_ref_ms
    latency_part = weights.latency * (latency_ref / (latency_ref + island.latency_ms))
    load_part = weights.load * ((1000 - island.load_permille) / 1000)
    price_ref = weights.price_ref_micro
    price_part = weights.price * (price_ref / (price_ref + island.ask_micro.get(cargo, 0)))
    return karma_part, latency_part, load_part, price_part


def base_score(island: IslandView, cargo: str, weights: Weights) -> float:
    """Job-independent part of the score (everything but the warm-model bonus)."""
    karma_part, latency_part, load_part, price_part = components(island, cargo, weights)
    return ((karma_part + latency_part) + load_part) + price_part


def warm_bonus(island: IslandView, needs: JobNeeds, weights: Weights) -> float:
    """``weights.warm_model`` if the Job names a model and this Island has it loaded."""
    if needs.model is not None and needs.model in island.warm_models:
        return weights.warm_model
    return 0.0


def total_score(island: IslandView, needs: JobNeeds, weights: Weights) -> float:
    """``score(...).total`` without building the breakdown."""
    return base_score(island, needs.cargo, weights) + warm_bonus(island, needs, weights)


def score(island: IslandView, needs: JobNeeds, weights: Weights) -> ScoreBreakdown:
    """Full breakdown; ``total`` is bit-identical to ``total_score``."""
    karma_part, latency_part, load_part, price_part = components(island, needs.cargo, weights)
    base = ((karma_part + latency_part) + load_part) + price_part
    warm_part = warm_bonus(island, needs, weights)
    return ScoreBreakdown(
        karma=karma_part,
        latency=latency_part,
        load=load_part,
        price=price_part,
        warm_model=warm_part,
        total=base + warm_part,
    )


def tie_break(ties: list[str], rng: random.Random) -> str:
    """Deterministic tie-break shared by the index and the full scan."""
    if len(ties) == 1:
        return ties[0]
    ties.sort()
    return rng.choice(ties)
