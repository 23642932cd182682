"""Filter rules: may this Island run this Job at all?

One predicate per rule (True = passes), listed in ``RULES`` in the order of
``types.REASONS``. ``eligible`` returns the first failing reason (or None) and is written
as one inlined chain because it is the hot path of the full scan and of the index scan;
``tests/test_routing.py`` checks it agrees with applying ``RULES`` one by one.
"""

from __future__ import annotations

from collections.abc import Callable

from routing.types import REASONS, IslandView, JobNeeds


def is_online(island: IslandView, needs: JobNeeds) -> bool:
    return island.online


def is_approved(island: IslandView, needs: JobNeeds) -> bool:
    return island.approved


def has_free_slot(island: IslandView, needs: JobNeeds) -> bool:
    return island.slots_free > 0


def serves_cargo(island: IslandView, needs: JobNeeds) -> bool:
    return needs.cargo in island.cargos


def has_model(island: IslandView, needs: JobNeeds) -> bool:
    return needs.model is None or needs.model in island.models


def in_region(island: IslandView, needs: JobNeeds) -> bool:
    return not needs.regions or island.region in needs.regions


def on_platform(island: IslandView, needs: JobNeeds) -> bool:
    return not needs.platforms or island.platform in needs.platforms


def enough_vram(island: IslandView, needs: JobNeeds) -> bool:
    return island.vram_mb >= needs.vram_mb


def enough_ram(island: IslandView, needs: JobNeeds) -> bool:
    return island.ram_mb >= needs.ram_mb


def meets_hardware_tier(island: IslandView, needs: JobNeeds) -> bool:
    return island.hardware_tier >= needs.min_hardware_tier


def within_latency(island: IslandView, needs: JobNeeds) -> bool:
    return needs.max_latency_ms is None or island.latency_ms <= needs.max_latency_ms


def ask_micro(island: IslandView, cargo: str) -> int:
    """The Island's asking price for a Cargo; an Island that states none asks 0."""
    return island.ask_micro.get(cargo, 0)


def within_bid(island: IslandView, needs: JobNeeds) -> bool:
    return needs.bid_micro is None or ask_micro(island, needs.cargo) <= needs.bid_micro


def meets_karma(island: IslandView, needs: JobNeeds) -> bool:
    return island.karma_milli >= needs.min_karma_milli


def not_excluded(island: IslandView, needs: JobNeeds) -> bool:
    return island.island_id not in needs.excluded


Rule = Callable[[IslandView, JobNeeds], bool]

RULES: tuple[tuple[str, Rule], ...] = (
    ("offline", is_online),
    ("not_approved", is_approved),
    ("no_free_slot", has_free_slot),
    ("cargo", serves_cargo),
    ("model", has_model),
    ("region", in_region),
    ("platform", on_platform),
    ("vram", enough_vram),
    ("ram", enough_ram),
    ("hardware_tier", meets_hardware_tier),
    ("latency", within_latency),
    ("price", within_bid),
    ("karma", meets_karma),
    ("excluded", not_excluded),
)
assert tuple(reason for reason, _ in RULES) == REASONS


def first_failing_rule(island: IslandView, needs: JobNeeds) -> str | None:
    """Reference implementation of ``eligible``: apply ``RULES`` in order."""
    for reason, rule in RULES:
        if not rule(island, needs):
            return reason
    return None


def is_available(island: IslandView) -> bool:
    """Job-independent part of the structural filters: may take any Job right now."""
    return island.online and island.approved and island.slots_free > 0


def residual_reason(island: IslandView, needs: JobNeeds) -> str | None:
    """First failing NON-structural rule (platform .. excluded), or None. The candidate
    index calls this on Islands it already knows pass the structural rules."""
    if needs.platforms and island.platform not in needs.platforms:
        return "platform"
    if island.vram_mb < needs.vram_mb:
        return "vram"
    if island.ram_mb < needs.ram_mb:
        return "ram"
    if island.hardware_tier < needs.min_hardware_tier:
        return "hardware_tier"
    if needs.max_latency_ms is not None and island.latency_ms > needs.max_latency_ms:
        return "latency"
    if needs.bid_micro is not None and island.ask_micro.get(needs.cargo, 0) > needs.bid_micro:
        return "price"
    if island.karma_milli < needs.min_karma_milli:
        return "karma"
    if island.island_id in needs.excluded:
        return "excluded"
    return None


def eligible(island: IslandView, needs: JobNeeds) -> str | None:
    """The first filter (in ``REASONS`` order) this Island fails for this Job, or None if
    it may run the Job."""
    if not island.online:
        return "offline"
    if not island.approved:
        return "not_approved"
    if island.slots_free <= 0:
        return "no_free_slot"
    if needs.cargo not in island.cargos:
        return "cargo"
    if needs.model is not None and needs.model not in island.models:
        return "model"
    if needs.regions and island.region not in needs.regions:
        return "region"
    return residual_reason(island, needs)
