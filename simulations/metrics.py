"""From a finished world to the metrics.json dict, and a stable JSON encoding of it.

Percentiles are nearest-rank on the sorted integer milliseconds (rank = ceil(q x n)),
reported in seconds; nothing is interpolated, so the numbers are exact and bit-stable.

Definitions (all from the consumer's side, measured from the Job's arrival):

* ``wait_s``: arrival -> the offer that led to the last attempt (Jobs that were offered
  at least once, whatever their outcome);
* ``ttft_s``: arrival -> first token (chat) / first progress (image) at the coordinator,
  completed Jobs only;
* ``e2e_s``: arrival -> completion seen by the coordinator, completed Jobs only.

``island_utilisation``: busy slot-time / online slot-time over the whole run (a slot is
busy from the offer until the coordinator learns it is free).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from simulations.units import micro_to_credits

if TYPE_CHECKING:
    from simulations.world import World

PERCENTILES: tuple[tuple[str, int], ...] = (("p50", 500), ("p90", 900), ("p95", 950), ("p99", 990), ("p999", 999))
#: Fields that depend on the machine, not the scenario: left out of determinism checks.
WALL_KEYS = ("wall_seconds", "jobs_per_wall_second", "events_per_wall_second")

_ENCODER = msgspec.json.Encoder(decimal_format="number")


def nearest_rank(sorted_values: list[int], permille: int) -> int:
    """The nearest-rank percentile (``permille`` of 1000) of a non-empty sorted list."""
    n = len(sorted_values)
    rank = -(-permille * n // 1000)  # ceil
    return sorted_values[min(max(rank, 1), n) - 1]


def _s(ms: int) -> float:
    return ms / 1000.0


def summary_s(values_ms: list[int]) -> dict[str, Any]:
    """Percentiles, mean and max of millisecond samples, in seconds (``n`` = count;
    all null when there is no sample)."""
    if not values_ms:
        out: dict[str, Any] = {"n": 0}
        out.update({name: None for name, _ in PERCENTILES})
        out.update({"mean": None, "max": None})
        return out
    v = sorted(values_ms)
    out = {"n": len(v)}
    for name, q in PERCENTILES:
        out[name] = _s(nearest_rank(v, q))
    out["mean"] = round(sum(v) / len(v) / 1000.0, 6)
    out["max"] = _s(v[-1])
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def _credits(micro: int) -> Any:
    return micro_to_credits(micro)


def job_samples(world: World) -> tuple[list[int], list[int], list[int]]:
    from simulations.world import COMPLETED

    waits, ttfts, e2es = [], [], []
    for j in world.jobs:
        if j.assigned >= 0:
            waits.append(j.assigned - j.arrival)
        if j.status == COMPLETED:
            ttfts.append(j.first - j.arrival)
            e2es.append(j.ended - j.arrival)
    return waits, ttfts, e2es


def compute_metrics(world: World, sut_report: dict[str, Any], *, scenario: str, system: str, seed: int,
                    wall_seconds: float) -> dict[str, Any]:
    from simulations.world import CANCELLED, COMPLETED, FAILED, REFUSED, TIMEOUT

    counts = {COMPLETED: 0, FAILED: 0, TIMEOUT: 0, CANCELLED: 0, REFUSED: 0}
    for j in world.jobs:
        if j.status in counts:
            counts[j.status] += 1
    total = len(world.jobs)
    unfinished = total - sum(counts.values())
    admitted = total - counts[REFUSED]
    waits, ttfts, e2es = job_samples(world)

    tiers = world.tier_names
    by_tier_util = {t: _ratio(world.tier_busy_ms[i], world.tier_online_ms[i]) for i, t in enumerate(tiers)}
    mean_util = _ratio(sum(world.tier_busy_ms), sum(world.tier_online_ms))
    slots_total = sum(st.spec.slots for st in world.ist)

    q = world.s_queue
    over = [qd / sum(on) for qd, on in zip(q, world.s_online) if sum(on) > 0]
    credits = sut_report.get("credits")
    if credits is not None:
        credits = {k: _credits(v) for k, v in credits.items()}
    karma = sut_report.get("karma")
    sim_ms = world.engine.now
    events = world.engine.events_run
    system_digest = sut_report.get("log_digest")
    digest = world.log_digest()

    m: dict[str, Any] = {
        "scenario": scenario,
        "system": system,
        "seed": seed,
        "jobs_total": total,
        "jobs_completed": counts[COMPLETED],
        "jobs_failed": counts[FAILED],
        "jobs_timeout": counts[TIMEOUT],
        "jobs_cancelled": counts[CANCELLED],
        "jobs_refused": counts[REFUSED],
        "jobs_unfinished": unfinished,
        "success_rate": _ratio(counts[COMPLETED], admitted),
        "refusals": dict(sorted(world.refusals.items())),
        "end_reasons": dict(sorted(world.end_reasons.items())),
        "wait_s": summary_s(waits),
        "ttft_s": summary_s(ttfts),
        "e2e_s": summary_s(e2es),
        "island_utilisation": {"mean": mean_util, "by_tier": by_tier_util},
        "islands": {"total": len(world.ist), "slots": slots_total,
                    "by_tier": {t: world.tier_islands[i] for i, t in enumerate(tiers)}},
        "queue_depth": {"max": max(q) if q else 0, "mean": round(sum(q) / len(q), 3) if q else 0,
                        "max_over_capacity": round(max(over), 3) if over else None},
        "faults": dict(world.fault_counts),
        "credits": credits,
        "karma": karma,
        "kyc_violations": world.kyc_violations,
        "free_tier_violations": world.free_tier_violations if world.charges_reported else None,
        "ledger_balanced": sut_report.get("ledger_balanced"),
        "protocol_errors": len(world.protocol_errors),
        "log_digest": digest,
        "log_events": world.log_events,
        "system_log_digest": system_digest,
        "engine_events": events,
        "sim_seconds": _s(sim_ms),
        "wall_seconds": round(wall_seconds, 3),
        "jobs_per_wall_second": round(total / wall_seconds, 1) if wall_seconds > 0 else None,
        "events_per_wall_second": round(events / wall_seconds, 1) if wall_seconds > 0 else None,
    }
    extra = sut_report.get("system")
    if extra:
        m["system_details"] = extra
    return m


def deterministic_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without the wall-clock fields: identical for the same scenario and seed."""
    return {k: v for k, v in metrics.items() if k not in WALL_KEYS}


def to_json(metrics: dict[str, Any]) -> bytes:
    """Stable, human-readable JSON (fixed key order, 2-space indent, trailing newline)."""
    return msgspec.json.format(_ENCODER.encode(metrics), indent=2) + b"\n"
