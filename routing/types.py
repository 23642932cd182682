"""Value types of routing: what the router knows about an Island, what a Job needs,
how to weigh the score, and the two possible results of a decision.

All types are frozen ``msgspec.Struct``s: cheap to build, fast attribute access (slots),
encodable as-is into the assignment event, and safe to keep inside the candidate index
(nobody can mutate an Island behind the index's back; updates go through the index).

Units are in the field names: ``_mb`` megabytes, ``_ms`` milliseconds, ``_micro``
micro-credits (1 credit = 1,000,000), ``_milli`` thousandths of a karma point,
``_permille`` thousandths (0..1000).
"""

from __future__ import annotations

import msgspec

#: ``JobNeeds.min_karma_milli`` default: no karma gate at all.
ANY_KARMA_MILLI = -(2**62)

#: Highest hardware tier (0 = CPU only ... 4 = enterprise GPU).
MAX_HARDWARE_TIER = 4

#: Refusal reasons, in the order the filters are applied. ``eligible`` reports the FIRST
#: failing one, so every refused Island is counted under exactly one reason.
REASONS: tuple[str, ...] = (
    "offline",  # not connected
    "not_approved",  # registered but not (yet) approved by an operator
    "no_free_slot",  # slots_free == 0
    "cargo",  # does not serve the Job's Cargo
    "model",  # does not have the requested model
    "region",  # not in one of the consumer's regions
    "platform",  # not on one of the consumer's platforms
    "vram",  # vram_mb < needs.vram_mb
    "ram",  # ram_mb < needs.ram_mb
    "hardware_tier",  # hardware_tier < needs.min_hardware_tier
    "latency",  # latency_ms > needs.max_latency_ms
    "price",  # ask for the Cargo > needs.bid_micro
    "karma",  # karma_milli < needs.min_karma_milli
    "excluded",  # already failed this Job
)

#: Reasons the candidate index answers structurally (by which list an Island is in),
#: without looking at the Island. The others are checked Island by Island.
STRUCTURAL_REASONS: frozenset[str] = frozenset(REASONS[:6])


class IslandView(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The router's view of one Island: static facts from registration and the
    heartbeat, live state (slots, load, latency, warm models) and karma."""

    island_id: str
    owner_account_id: str
    online: bool
    approved: bool
    slots_total: int
    slots_free: int
    cargos: frozenset[str]  # Cargo slugs it serves
    models: frozenset[str]  # models it has on disk
    warm_models: frozenset[str]  # models loaded in memory right now
    vram_mb: int
    ram_mb: int
    region: str
    platform: str  # "linux" | "macos" | "windows" | ...
    hardware_tier: int  # 0 = CPU .. 4 = enterprise GPU
    karma_milli: int
    latency_ms: int  # measured round trip coordinator <-> Island
    load_permille: int  # 0..1000
    ask_micro: dict[str, int] = {}  # Cargo slug -> asking price per Job; absent = 0

    def problems(self) -> list[str]:
        """Violated invariants (empty = valid). ``CandidateIndex.upsert`` refuses an
        invalid view; its update methods check the fields they change. Not done in
        ``__post_init__`` so that hot-path copies (``msgspec.structs.replace``) stay cheap."""
        out: list[str] = []
        if not self.island_id:
            out.append("empty island_id")
        if not 0 <= self.slots_free <= self.slots_total:
            out.append(f"slots_free={self.slots_free} outside 0..slots_total={self.slots_total}")
        if not 0 <= self.load_permille <= 1000:
            out.append(f"load_permille={self.load_permille} outside 0..1000")
        if not 0 <= self.hardware_tier <= MAX_HARDWARE_TIER:
            out.append(f"hardware_tier={self.hardware_tier} outside 0..{MAX_HARDWARE_TIER}")
        if self.latency_ms < 0 or self.vram_mb < 0 or self.ram_mb < 0:
            out.append("negative latency_ms, vram_mb or ram_mb")
        if any(v < 0 for v in self.ask_micro.values()):
            out.append("negative ask_micro")
        return out


class JobNeeds(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What one Job requires of an Island. Empty sets mean "any"."""

    cargo: str
    model: str | None = None
    vram_mb: int = 0
    ram_mb: int = 0
    regions: frozenset[str] = frozenset()
    platforms: frozenset[str] = frozenset()
    min_hardware_tier: int = 0
    max_latency_ms: int | None = None
    bid_micro: int | None = None  # None = no price limit
    min_karma_milli: int = ANY_KARMA_MILLI
    excluded: frozenset[str] = frozenset()  # Island ids that already failed this Job


class Weights(msgspec.Struct, frozen=True, kw_only=True):
    """Score weights (each component is in [0, 1] or (-1, 1) before weighting) and the
    reference values that shape the components. All weights must be >= 0; the index's
    early-stop bound relies on it."""

    karma: float = 1.0
    latency: float = 1.0
    load: float = 1.0
    warm_model: float = 1.0
    price: float = 0.5
    karma_ref_milli: int = 10_000  # karma above the mid at which the karma component is 0.5
    karma_mid_milli: int = 50_000  # karma scoring 0: a new Island's start on the 0..100 scale (decision 0051)
    latency_ref_ms: int = 50  # latency at which the latency component is 0.5
    price_ref_micro: int = 5_000_000  # ask at which the price component is 0.5

    def __post_init__(self) -> None:
        for name in ("karma", "latency", "load", "warm_model", "price"):
            value = getattr(self, name)
            assert value >= 0 and value == value and value != float("inf"), f"weight {name} must be finite and >= 0"
        assert self.karma_ref_milli > 0 and self.latency_ref_ms > 0 and self.price_ref_micro > 0


class ScoreBreakdown(msgspec.Struct, frozen=True, kw_only=True):
    """Weighted contribution of each component; ``total`` is their sum computed as
    ``(((karma + latency) + load) + price) + warm_model`` (fixed order, so bit-exact)."""

    karma: float
    latency: float
    load: float
    price: float
    warm_model: float
    total: float


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """An Island was chosen.

    Counts (identical between ``CandidateIndex.choose`` and ``full_scan_choose`` unless
    noted):

    - ``fleet_size``: Islands known to the router.
    - ``candidates_considered``: Islands that were online, approved, had a free slot,
      served the Cargo (and model, if one was requested) and were in one of the requested
      regions - the pool the winner was picked from.
    - ``candidates_examined``: Islands of that pool whose remaining filters and score were
      actually evaluated. The full scan examines the whole pool; the index stops as soon
      as no unexamined Island can reach the best score, so it is usually tiny.
      Implementation-dependent.
    - ``candidates_eligible``: examined Islands that passed every filter (exact for the
      full scan, a lower bound of the pool's eligible count for the index).
    - ``tied``: eligible Islands sharing the winning total score; ``rng`` picked one of
      them (1 = no tie). Identical in both implementations.
    """

    island_id: str
    score: ScoreBreakdown
    fleet_size: int
    candidates_considered: int
    candidates_examined: int
    candidates_eligible: int
    tied: int


class NoCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """No Island passed the filters. ``refusals`` counts every known Island under the
    FIRST filter it failed (keys from ``REASONS``, zero counts left out), so
    ``sum(refusals.values()) == fleet_size``. Exact in both implementations."""

    fleet_size: int
    refusals: dict[str, int]

    def top_reason(self) -> str | None:
        """The reason that refused the most Islands (ties: earliest filter), or None for
        an empty fleet."""
        best: str | None = None
        for reason in REASONS:
            if self.refusals.get(reason, 0) > (self.refusals.get(best, 0) if best else 0):
                best = reason
        return best
