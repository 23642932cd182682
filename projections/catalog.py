"""Every projection this coordinator keeps, by name (the runner, rebuild and the CLI choose
from here)."""

from __future__ import annotations

from collections.abc import Iterable

from projections.engine import Projection


def all_projections() -> list[Projection]:
    from projections.islands import IslandsProjection
    from projections.jobs import JobsProjection
    from projections.ledger import LedgerProjection
    from projections.market import MarketProjection

    return [JobsProjection(), IslandsProjection(), LedgerProjection(), MarketProjection()]


def projection_names() -> list[str]:
    return [p.name for p in all_projections()]


def select_projections(names: Iterable[str] | None) -> list[Projection]:
    every = all_projections()
    if not names:
        return every
    wanted = list(names)
    known = {p.name for p in every}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise KeyError(f"unknown projection {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return [p for p in every if p.name in wanted]
