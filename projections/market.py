"""Market read model (the Compute Exchange, docs/EXCHANGE.md): every clearing and every
surge switch, from the log; the history endpoint buckets them.

A clearing is recorded when the Island **starts** the Job (`Job.Started`), at the rate
its `Job.Assigned` fixed (ask, surge, clearing amount); an offer declined or a Job
cancelled or failed before it started leaves no clearing. Jobs assigned before the
exchange (no clearing in their `Assigned`) are not market clearings and are skipped.

Tables: `proj_market_offers` (assigned, not yet started: job -> its clearing),
`proj_market_clearings` (append-only: cargo, position, time, clearing, ask, surge,
Island), `proj_market_surge` (append-only: every `Surge.Switched`).
"""

from __future__ import annotations

from typing import Any

from eventsourcing.utils import get_topic

from projections.engine import Projection, Work
from projections.sql import INT, TEXT, Table
from scheduler.jobs import Job
from scheduler.market import Surge, median_micro

OFFERS = Table(
    "proj_market_offers",
    (("job_id", TEXT), ("cargo", TEXT), ("island_id", TEXT), ("ask_micro", INT), ("surge_permille", INT),
     ("clearing_micro", INT), ("position", INT)),
    key=("job_id",),
)

CLEARINGS = Table(
    "proj_market_clearings",
    (("cargo", TEXT), ("position", INT), ("time_ms", INT), ("job_id", TEXT), ("island_id", TEXT),
     ("ask_micro", INT), ("surge_permille", INT), ("clearing_micro", INT)),
    key=("cargo", "position"),
    append_only=True,
    indexes=(("cargo", "time_ms"),),
)

SURGE = Table(
    "proj_market_surge",
    (("position", INT), ("time_ms", INT), ("active", INT), ("multiplier_permille", INT), ("queued", INT),
     ("free_slots", INT)),
    key=("position",),
    append_only=True,
)

#: window -> (length, bucket size), ms
WINDOWS: dict[str, tuple[int, int]] = {
    "1h": (3_600_000, 300_000),
    "24h": (86_400_000, 3_600_000),
    "7d": (7 * 86_400_000, 6 * 3_600_000),
    "30d": (30 * 86_400_000, 86_400_000),
}
MAX_HISTORY_ROWS = 200_000  # clearings read for one history answer (the newest, if more)


class MarketProjection(Projection):
    name = "market"
    version = 1
    tables = (OFFERS, CLEARINGS, SURGE)

    def handlers(self):
        J = Job
        return {get_topic(J.Assigned): self.on_assigned, get_topic(J.Started): self.on_started,
                get_topic(J.OfferDeclined): self.on_dropped, get_topic(J.Cancelled): self.on_dropped,
                get_topic(J.Failed): self.on_dropped, get_topic(Surge.Switched): self.on_surge}

    def on_assigned(self, w: Work, pos: int, oid: str, version: int, st: dict, ms: int) -> None:
        clearing = st.get("clearing_micro", -1)
        if clearing is None or clearing < 0:
            return
        w["proj_market_offers"].put(oid, {
            "job_id": oid, "cargo": st.get("cargo", ""), "island_id": st["island_id"], "ask_micro": st["ask_micro"],
            "surge_permille": st["surge_permille"], "clearing_micro": clearing, "position": pos})

    def on_started(self, w: Work, pos: int, oid: str, version: int, st: dict, ms: int) -> None:
        offers = w["proj_market_offers"]
        offer = offers.get(oid)
        if offer is None:
            return
        offers.delete(oid)
        w["proj_market_clearings"].append((offer["cargo"], pos, ms, oid, offer["island_id"], offer["ask_micro"],
                                           offer["surge_permille"], offer["clearing_micro"]))

    def on_dropped(self, w: Work, pos: int, oid: str, version: int, st: dict, ms: int) -> None:
        offers = w["proj_market_offers"]
        if offers.get(oid) is not None:
            offers.delete(oid)

    def on_surge(self, w: Work, pos: int, oid: str, version: int, st: dict, ms: int) -> None:
        w["proj_market_surge"].append((pos, ms, 1 if st["active"] else 0, st["multiplier_permille"], st["queued"],
                                       st["free_slots"]))


# ---------------------------------------------------------------- reading
def clearings(read: Any, cargo: str, since_ms: int, until_ms: int) -> list[tuple[int, int, int, int, str]]:
    """(time_ms, clearing, ask, surge permille, island) of a Cargo's clearings in
    [since, until), oldest first; at most MAX_HISTORY_ROWS (the newest)."""
    rows = read._q("SELECT time_ms, clearing_micro, ask_micro, surge_permille, island_id FROM proj_market_clearings "
                   "WHERE cargo = ? AND time_ms >= ? AND time_ms < ? ORDER BY time_ms DESC, position DESC LIMIT ?",
                   (cargo, since_ms, until_ms, MAX_HISTORY_ROWS))
    rows.reverse()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def surge_switches(read: Any, until_ms: int) -> list[tuple[int, int, int]]:
    """(time_ms, active, multiplier permille) of every surge switch before `until`."""
    return [tuple(r) for r in read._q("SELECT time_ms, active, multiplier_permille FROM proj_market_surge "
                                      "WHERE time_ms < ? ORDER BY position", (until_ms,))]  # type: ignore[misc]


def summarise(rows: list[tuple]) -> dict[str, Any]:
    """Figures of a list of clearings: jobs, avg/min/max/median clearing, avg ask, Islands
    (distinct), the highest surge seen. Integers (micro-credits); averages floor."""
    if not rows:
        return {"jobs": 0, "avg_micro": None, "min_micro": None, "max_micro": None, "median_micro": None,
                "avg_ask_micro": None, "num_hosts": 0, "surge_permille": 1000}
    prices = sorted(r[1] for r in rows)
    return {"jobs": len(rows), "avg_micro": sum(prices) // len(prices), "min_micro": prices[0],
            "max_micro": prices[-1], "median_micro": median_micro(prices),
            "avg_ask_micro": sum(r[2] for r in rows) // len(rows), "num_hosts": len({r[4] for r in rows}),
            "surge_permille": max(r[3] for r in rows)}


def history(read: Any, cargo: str, window: str, now_ms: int) -> list[dict[str, Any]]:
    """One summary per bucket of the window, oldest first (empty buckets included), each
    with `start_ms` and whether the surge was on at any moment of it."""
    length, size = WINDOWS[window]
    end = -(-now_ms // size) * size  # the current bucket is the last
    start = end - length
    rows = clearings(read, cargo, start, end)
    switches = surge_switches(read, end)
    buckets: list[list[tuple]] = [[] for _ in range(length // size)]
    for r in rows:
        buckets[(r[0] - start) // size].append(r)
    out = []
    for i, bucket in enumerate(buckets):
        b_start = start + i * size
        summary = summarise(bucket)
        summary["start_ms"] = b_start
        summary["surge_on"] = _surge_during(switches, b_start, b_start + size)
        out.append(summary)
    return out


def _surge_during(switches: list[tuple[int, int, int]], start_ms: int, end_ms: int) -> tuple[bool, int]:
    """(was the surge on at any moment in [start, end), its highest multiplier then)."""
    active, permille = False, 1000
    on, best = False, 1000
    for t, a, m in switches:
        if t >= end_ms:
            break
        if t < start_ms:
            active, permille = bool(a), m
            continue
        if a:
            on, best = True, max(best, m)
    if active:
        on, best = True, max(best, permille)
    return on, best
