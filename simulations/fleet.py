"""Simulated Islands: hardware tiers, speeds, regions, availability and failure rates.

``build_fleet`` turns the scenario's fleet groups into a list of ``SimIsland`` specs
(frozen, one per Island). Runtime state (online, busy slots) lives in the world.

Speed model (per slot; slots of one Island do not slow each other down):

* chat: ``decode tokens/s`` = tier median x Island factor x per-Job jitter; prefill runs
  at ``prefill_ratio`` times that. Run time = overhead + prompt/prefill + completion/decode.
  The first token is ready after overhead + prompt/prefill + one decode step.
* image: ``speed`` is in 1024x1024-steps per second; a Job costs
  ``steps x width x height / 1024^2`` of them. Run time = overhead + that / speed; the
  first progress report comes after overhead + one step.

Island factor: lognormal (``speed_sigma``) drawn once per Island, shared by all its
Cargos (a fast machine is fast at everything). Per-Job jitter: lognormal (``job_sigma``).

Availability: a 24-value curve ``a(h)`` (share of the group online at hour ``h``, UTC).
Each Island draws ``u ~ U(0,1)`` and a personal minute offset once; it is scheduled online
in hour ``h`` iff ``u < a(h)``. So the expected share online follows the curve exactly,
and each Island has one contiguous evening window instead of flapping every hour.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import msgspec

from simulations.units import credits_to_micro

HOUR_MS = 3_600_000

TIER_NAMES: tuple[str, ...] = ("cpu", "consumer-gpu", "prosumer-gpu", "datacenter-gpu", "enterprise-gpu")

#: Named availability curves: share of a group online per UTC hour.
AVAILABILITY: dict[str, tuple[float, ...]] = {
    "always": (1.0,) * 24,
    # Home machines: some always on, most in the evening.
    "evening": (0.30, 0.22, 0.16, 0.12, 0.10, 0.10, 0.12, 0.15, 0.15, 0.15, 0.15, 0.15,
                0.17, 0.17, 0.17, 0.20, 0.25, 0.40, 0.60, 0.80, 0.90, 0.90, 0.75, 0.50),
    # Office machines lent out during working hours.
    "daytime": (0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.10, 0.30, 0.70, 0.90, 0.90, 0.90,
                0.85, 0.90, 0.90, 0.90, 0.85, 0.60, 0.30, 0.10, 0.05, 0.05, 0.05, 0.05),
}


class TierSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One hardware tier. Every field can be overridden in the scenario's
    ``[tiers.<name>]`` table."""

    index: int  # 0 = CPU only .. 4 = enterprise GPU (routing's hardware_tier)
    slots: int  # concurrent Jobs
    vram_mb: int
    ram_mb: int
    cargos: list[str]  # Cargo slugs served
    speed: dict[str, float]  # Cargo -> median units/s per slot (tokens/s, or 1024^2-steps/s for images)
    speed_sigma: float = 0.25  # spread of the per-Island factor (lognormal sigma)
    job_sigma: float = 0.10  # per-Job jitter (lognormal sigma)
    prefill_ratio: float = 25.0  # prompt tokens/s = ratio x decode tokens/s
    overhead_ms: int = 60  # per-Job fixed cost (load input, set up the run)
    ask: dict[str, str | int] = {}  # Cargo | "_default" -> ask in credits per the Cargo's billing unit; {} = list rate
    availability: str | list[float] = "always"
    platform: str = "linux"
    # failure behaviour (applied only when [faults] islands = true)
    crash_per_job: float = 0.0  # probability that a Job crashes mid-run on this Island
    missed_ack: float = 0.0  # probability that an offer is never acknowledged
    hang_per_job: float = 0.0  # probability that a Job goes silent (lease lapses)
    disconnects_per_hour: float = 0.0  # while online
    offline_mean_s: float = 600.0  # mean length of a disconnect
    slow_heartbeats_per_hour: float = 0.0  # episodes of late heartbeats while online


DEFAULT_TIERS: dict[str, dict] = {
    "cpu": {
        "index": 0, "slots": 1, "vram_mb": 0, "ram_mb": 16_384, "cargos": ["llm-chat-lite"],
        "speed": {"llm-chat-lite": 15.0}, "prefill_ratio": 8.0, "overhead_ms": 100,
        "availability": "evening", "platform": "linux",
        "crash_per_job": 0.002, "missed_ack": 0.005, "hang_per_job": 0.001,
        "disconnects_per_hour": 0.2, "offline_mean_s": 1200, "slow_heartbeats_per_hour": 0.2,
    },
    "consumer-gpu": {  # RTX 3060 12 GB class
        "index": 1, "slots": 1, "vram_mb": 12_288, "ram_mb": 32_768,
        "cargos": ["llm-chat", "llm-chat-lite", "sdxl"],
        "speed": {"llm-chat": 40.0, "llm-chat-lite": 140.0, "sdxl": 1.2}, "prefill_ratio": 25.0,
        "overhead_ms": 60,
        "availability": "evening", "platform": "windows",
        "crash_per_job": 0.01, "missed_ack": 0.01, "hang_per_job": 0.002,
        "disconnects_per_hour": 0.5, "offline_mean_s": 900, "slow_heartbeats_per_hour": 0.5,
    },
    "prosumer-gpu": {  # RTX 4090 24 GB class
        "index": 2, "slots": 2, "vram_mb": 24_576, "ram_mb": 65_536,
        "cargos": ["llm-chat", "llm-chat-lite", "sdxl"],
        "speed": {"llm-chat": 110.0, "llm-chat-lite": 300.0, "sdxl": 5.0}, "prefill_ratio": 30.0,
        "overhead_ms": 50,
        "availability": "evening", "platform": "linux",
        "crash_per_job": 0.005, "missed_ack": 0.005, "hang_per_job": 0.001,
        "disconnects_per_hour": 0.3, "offline_mean_s": 900, "slow_heartbeats_per_hour": 0.3,
    },
    "datacenter-gpu": {  # A100 80 GB class
        "index": 3, "slots": 4, "vram_mb": 81_920, "ram_mb": 262_144,
        "cargos": ["llm-chat", "llm-chat-lite", "sdxl"],
        "speed": {"llm-chat": 80.0, "llm-chat-lite": 250.0, "sdxl": 4.5}, "prefill_ratio": 40.0,
        "overhead_ms": 40,
        "availability": "always", "platform": "linux",
        "crash_per_job": 0.001, "missed_ack": 0.001, "hang_per_job": 0.0005,
        "disconnects_per_hour": 0.02, "offline_mean_s": 300, "slow_heartbeats_per_hour": 0.05,
    },
    "enterprise-gpu": {  # H100 80 GB class
        "index": 4, "slots": 8, "vram_mb": 81_920, "ram_mb": 524_288,
        "cargos": ["llm-chat", "llm-chat-lite", "sdxl"],
        "speed": {"llm-chat": 130.0, "llm-chat-lite": 350.0, "sdxl": 8.0}, "prefill_ratio": 50.0,
        "overhead_ms": 30,
        "availability": "always", "platform": "linux",
        "crash_per_job": 0.0005, "missed_ack": 0.0005, "hang_per_job": 0.0002,
        "disconnects_per_hour": 0.01, "offline_mean_s": 300, "slow_heartbeats_per_hour": 0.02,
    },
}


class RegionSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Round-trip time coordinator <-> Islands of a region: lognormal around ``latency_ms``."""

    latency_ms: float
    sigma: float = 0.3
    min_ms: int = 2


DEFAULT_REGIONS: dict[str, dict] = {
    "eu-west": {"latency_ms": 25},
    "eu-central": {"latency_ms": 35},
    "us-east": {"latency_ms": 90},
    "us-west": {"latency_ms": 150},
    "ap-southeast": {"latency_ms": 220},
}


class FleetGroup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``count`` Islands of one tier. Optional fields override the tier for this group."""

    tier: str
    count: int
    name: str = ""  # label in reports; default = tier
    regions: dict[str, float] = {}  # region -> weight; {} = all scenario regions alike
    availability: str | list[float] | None = None
    slots: int | None = None
    speed_factor: float = 1.0  # multiplies the tier's speeds
    ask: dict[str, str | int] | None = None


class SimIsland(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One simulated Island (static facts; the world keeps its live state)."""

    no: int  # index in the fleet
    island_id: str
    group: str
    tier: str
    tier_index: int
    region: str
    latency_ms: int  # round trip to the coordinator
    slots: int
    vram_mb: int
    ram_mb: int
    platform: str
    cargos: tuple[str, ...]
    speed: dict[str, float]  # Cargo -> units/s per slot (this Island's factor applied)
    prefill_ratio: float
    overhead_ms: int
    job_sigma: float
    ask_micro: dict[str, int]
    availability: tuple[float, ...]  # 24 hourly shares of the group
    avail_u: float  # online in hour h iff avail_u < availability[h]
    avail_offset_ms: int  # personal shift of the hour boundaries (0..1 h)
    crash_per_job: float
    missed_ack: float
    hang_per_job: float
    disconnects_per_hour: float
    offline_mean_ms: int
    slow_heartbeats_per_hour: float

    def online_in_hour(self, hour_of_day: int) -> bool:
        return self.avail_u < self.availability[hour_of_day % 24]


def availability_curve(value: str | Sequence[float], what: str) -> tuple[float, ...]:
    if isinstance(value, str):
        curve = AVAILABILITY.get(value)
        if curve is None:
            raise ValueError(f"{what}: unknown availability {value!r}; known: {', '.join(AVAILABILITY)} "
                             f"or a list of 24 shares")
        return curve
    if len(value) != 24 or any(not 0.0 <= float(v) <= 1.0 for v in value):
        raise ValueError(f"{what}: availability must be a name or 24 shares in [0, 1]")
    return tuple(float(v) for v in value)


def resolve_tiers(overrides: dict[str, dict]) -> dict[str, TierSpec]:
    """Default tiers with the scenario's overrides merged key by key; new tiers allowed
    (they must then give every required field)."""
    tiers: dict[str, TierSpec] = {}
    for name in list(DEFAULT_TIERS) + [n for n in overrides if n not in DEFAULT_TIERS]:
        merged = dict(DEFAULT_TIERS.get(name, {}))
        merged.update(overrides.get(name, {}))
        try:
            tiers[name] = msgspec.convert(merged, TierSpec)
        except msgspec.ValidationError as exc:
            raise ValueError(f"tiers.{name}: {exc}") from None
        t = tiers[name]
        if t.slots < 1:
            raise ValueError(f"tiers.{name}.slots must be >= 1")
        for slug in t.cargos:
            if t.speed.get(slug, 0) <= 0:
                raise ValueError(f"tiers.{name}: serves {slug!r} but has no speed for it (speed.{slug} > 0)")
        availability_curve(t.availability, f"tiers.{name}")
    return tiers


def resolve_regions(overrides: dict[str, dict]) -> dict[str, RegionSpec]:
    regions = {}
    names = list(DEFAULT_REGIONS) + [n for n in overrides if n not in DEFAULT_REGIONS]
    for name in names:
        merged = dict(DEFAULT_REGIONS.get(name, {}))
        merged.update(overrides.get(name, {}))
        try:
            regions[name] = msgspec.convert(merged, RegionSpec)
        except msgspec.ValidationError as exc:
            raise ValueError(f"regions.{name}: {exc}") from None
    return regions


def build_fleet(groups: Sequence[FleetGroup], tiers: dict[str, TierSpec], regions: dict[str, RegionSpec],
                rng: random.Random, *, faults: bool = False, fault_multiplier: float = 1.0) -> list[SimIsland]:
    """The Islands of all groups, numbered in group order. Draws only from ``rng``."""
    fleet: list[SimIsland] = []
    for gi, g in enumerate(groups):
        what = f"fleet[{gi}]"
        tier = tiers.get(g.tier)
        if tier is None:
            raise ValueError(f"{what}: unknown tier {g.tier!r}; known: {', '.join(tiers)}")
        if g.count < 0:
            raise ValueError(f"{what}: count must be >= 0")
        region_w = g.regions or {r: 1.0 for r in regions}
        for r in region_w:
            if r not in regions:
                raise ValueError(f"{what}: unknown region {r!r}; known: {', '.join(regions)}")
        rnames = list(region_w)
        rweights = [float(region_w[r]) for r in rnames]
        if any(w < 0 for w in rweights) or sum(rweights) <= 0:
            raise ValueError(f"{what}: region weights must be >= 0 with a positive sum")
        curve = availability_curve(g.availability if g.availability is not None else tier.availability, what)
        asks_src = g.ask if g.ask is not None else tier.ask
        ask_micro = {slug: credits_to_micro(v, what=f"{what}.ask.{slug}") for slug, v in asks_src.items()}
        slots = g.slots if g.slots is not None else tier.slots
        if slots < 1:
            raise ValueError(f"{what}: slots must be >= 1")
        m = fault_multiplier if faults else 0.0
        for _ in range(g.count):
            no = len(fleet)
            region = rng.choices(rnames, rweights)[0]
            rs = regions[region]
            latency = max(rs.min_ms, int(rs.latency_ms * math.exp(rs.sigma * rng.gauss(0.0, 1.0)) + 0.5))
            factor = g.speed_factor * math.exp(tier.speed_sigma * rng.gauss(0.0, 1.0))
            avail_u = rng.random()
            offset = rng.randrange(HOUR_MS)
            fleet.append(SimIsland(
                no=no, island_id=f"isl-{no:05d}", group=g.name or g.tier, tier=g.tier, tier_index=tier.index,
                region=region, latency_ms=latency, slots=slots, vram_mb=tier.vram_mb, ram_mb=tier.ram_mb,
                platform=tier.platform, cargos=tuple(tier.cargos),
                speed={slug: tier.speed[slug] * factor for slug in tier.cargos},
                prefill_ratio=tier.prefill_ratio, overhead_ms=tier.overhead_ms, job_sigma=tier.job_sigma,
                ask_micro=ask_micro, availability=curve, avail_u=avail_u, avail_offset_ms=offset,
                crash_per_job=min(1.0, tier.crash_per_job * m), missed_ack=min(1.0, tier.missed_ack * m),
                hang_per_job=min(1.0, tier.hang_per_job * m), disconnects_per_hour=tier.disconnects_per_hour * m,
                offline_mean_ms=int(tier.offline_mean_s * 1000),
                slow_heartbeats_per_hour=tier.slow_heartbeats_per_hour * m))
    return fleet


def run_time_ms(island: SimIsland, cargo: str, prompt_tokens: int, completion_tokens: int, width: int, height: int,
                steps: int, jitter: float) -> tuple[int, int]:
    """(time to first output, total run time) in ms on one slot of ``island``, measured
    from the moment the Island starts the Job. ``jitter`` multiplies the speed."""
    speed = island.speed[cargo] * jitter
    if steps:  # image
        step_ms = (width * height / 1_048_576.0) / speed * 1000.0
        first = island.overhead_ms + step_ms
        return int(first + 0.5), int(island.overhead_ms + steps * step_ms + 0.5)
    token_ms = 1000.0 / speed
    prefill_ms = prompt_tokens * token_ms / island.prefill_ratio
    first = island.overhead_ms + prefill_ms + token_ms
    return int(first + 0.5), int(island.overhead_ms + prefill_ms + max(1, completion_tokens) * token_ms + 0.5)
