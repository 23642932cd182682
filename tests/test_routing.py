"""Routing: filters, score, determinism, candidate index maintenance and its equivalence
with the full-scan baseline."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.filters import RULES, eligible, first_failing_rule
from routing.full_scan import full_scan_choose
from routing.index import CandidateIndex
from routing.score import base_score, score, total_score
from routing.types import REASONS, Decision, IslandView, JobNeeds, NoCandidate, Weights

W = Weights()


def isl(island_id: str = "a", **overrides: object) -> IslandView:
    fields: dict[str, object] = dict(
        island_id=island_id,
        owner_account_id="acct-1",
        online=True,
        approved=True,
        slots_total=2,
        slots_free=1,
        cargos=frozenset({"llm-chat"}),
        models=frozenset({"mistral-7b", "llama-8b"}),
        warm_models=frozenset(),
        vram_mb=8192,
        ram_mb=16384,
        region="eu-west",
        platform="linux",
        hardware_tier=2,
        karma_milli=5_000,
        latency_ms=40,
        load_permille=300,
        ask_micro={"llm-chat": 4_000_000},
    )
    fields.update(overrides)
    return IslandView(**fields)  # type: ignore[arg-type]


def job(**overrides: object) -> JobNeeds:
    fields: dict[str, object] = dict(cargo="llm-chat")
    fields.update(overrides)
    return JobNeeds(**fields)  # type: ignore[arg-type]


def pick(result: Decision | NoCandidate) -> str:
    assert isinstance(result, Decision), result
    return result.island_id


# ---------------------------------------------------------------- filters

# (reason, island overrides, job overrides) that fail exactly that rule
FAILING = [
    ("offline", {"online": False}, {}),
    ("not_approved", {"approved": False}, {}),
    ("no_free_slot", {"slots_free": 0}, {}),
    ("cargo", {}, {"cargo": "sdxl"}),
    ("model", {}, {"model": "qwen-7b"}),
    ("region", {}, {"regions": frozenset({"us-east", "ap-south"})}),
    ("platform", {}, {"platforms": frozenset({"macos"})}),
    ("vram", {}, {"vram_mb": 8193}),
    ("ram", {}, {"ram_mb": 16385}),
    ("hardware_tier", {}, {"min_hardware_tier": 3}),
    ("latency", {}, {"max_latency_ms": 39}),
    ("price", {}, {"bid_micro": 3_999_999}),
    ("karma", {}, {"min_karma_milli": 5_001}),
    ("excluded", {}, {"excluded": frozenset({"a", "zz"})}),
]

# the same limits, met exactly (boundaries are inclusive)
PASSING_AT_LIMIT = {
    "model": {"model": "llama-8b"},
    "region": {"regions": frozenset({"eu-west", "us-east"})},
    "platform": {"platforms": frozenset({"linux", "macos"})},
    "vram": {"vram_mb": 8192},
    "ram": {"ram_mb": 16384},
    "hardware_tier": {"min_hardware_tier": 2},
    "latency": {"max_latency_ms": 40},
    "price": {"bid_micro": 4_000_000},
    "karma": {"min_karma_milli": 5_000},
    "excluded": {"excluded": frozenset({"b"})},
}


def test_reference_island_passes_every_rule() -> None:
    assert eligible(isl(), job()) is None
    assert all(rule(isl(), job()) for _, rule in RULES)


@pytest.mark.parametrize("reason,island_over,job_over", FAILING, ids=[f[0] for f in FAILING])
def test_each_filter_refuses_with_its_reason(reason: str, island_over: dict, job_over: dict) -> None:
    island, needs = isl(**island_over), job(**job_over)
    assert eligible(island, needs) == reason
    rule = dict(RULES)[reason]
    assert rule(island, needs) is False
    # every other rule still passes: the case isolates exactly one rule
    assert [r for r, fn in RULES if not fn(island, needs)] == [reason]


@pytest.mark.parametrize("reason", sorted(PASSING_AT_LIMIT))
def test_filter_limits_are_inclusive(reason: str) -> None:
    assert eligible(isl(), job(**PASSING_AT_LIMIT[reason])) is None


def test_failing_cases_cover_every_reason() -> None:
    assert [f[0] for f in FAILING] == list(REASONS)


def test_first_failing_reason_wins() -> None:
    island = isl(online=False, slots_free=0, vram_mb=0)
    assert eligible(island, job(vram_mb=1)) == "offline"
    assert eligible(isl(slots_free=0, vram_mb=0), job(vram_mb=1)) == "no_free_slot"
    assert eligible(isl(vram_mb=0, latency_ms=999), job(vram_mb=1, max_latency_ms=10)) == "vram"


def test_missing_ask_counts_as_free_and_unbounded_bid_accepts_any_ask() -> None:
    assert eligible(isl(ask_micro={}), job(bid_micro=0)) is None
    assert eligible(isl(ask_micro={"llm-chat": 10**12}), job(bid_micro=None)) is None


def test_model_none_accepts_island_without_models() -> None:
    assert eligible(isl(models=frozenset()), job(model=None)) is None


islands_st = st.builds(
    isl,
    island_id=st.sampled_from(["a", "b", "c"]),
    online=st.booleans(),
    approved=st.booleans(),
    slots_free=st.integers(0, 2),
    cargos=st.frozensets(st.sampled_from(["llm-chat", "sdxl"])),
    models=st.frozensets(st.sampled_from(["m1", "m2"])),
    vram_mb=st.integers(0, 3),
    ram_mb=st.integers(0, 3),
    region=st.sampled_from(["r1", "r2"]),
    platform=st.sampled_from(["linux", "macos"]),
    hardware_tier=st.integers(0, 4),
    karma_milli=st.integers(-3, 3),
    latency_ms=st.integers(0, 3),
    ask_micro=st.dictionaries(st.sampled_from(["llm-chat", "sdxl"]), st.integers(0, 3)),
)
needs_st = st.builds(
    JobNeeds,
    cargo=st.sampled_from(["llm-chat", "sdxl"]),
    model=st.none() | st.sampled_from(["m1", "m2"]),
    vram_mb=st.integers(0, 3),
    ram_mb=st.integers(0, 3),
    regions=st.frozensets(st.sampled_from(["r1", "r2", "r3"])),
    platforms=st.frozensets(st.sampled_from(["linux", "macos"])),
    min_hardware_tier=st.integers(0, 4),
    max_latency_ms=st.none() | st.integers(0, 3),
    bid_micro=st.none() | st.integers(0, 3),
    min_karma_milli=st.integers(-3, 3),
    excluded=st.frozensets(st.sampled_from(["a", "b", "c"])),
)


@given(islands_st, needs_st)
def test_inlined_eligible_matches_rule_by_rule_reference(island: IslandView, needs: JobNeeds) -> None:
    assert eligible(island, needs) == first_failing_rule(island, needs)


# ------------------------------------------------------------------ score


@pytest.mark.parametrize(
    "better,worse",
    [
        ({"karma_milli": 20_000}, {"karma_milli": 19_000}),
        ({"karma_milli": 0}, {"karma_milli": -1_000}),
        ({"karma_milli": -5_000}, {"karma_milli": -90_000}),
        ({"latency_ms": 20}, {"latency_ms": 21}),
        ({"load_permille": 100}, {"load_permille": 101}),
        ({"ask_micro": {"llm-chat": 3_000_000}}, {"ask_micro": {"llm-chat": 3_000_001}}),
        ({"warm_models": frozenset({"llama-8b"})}, {"warm_models": frozenset()}),
    ],
    ids=["karma", "karma-at-zero", "negative-karma", "latency", "load", "price", "warm"],
)
def test_each_component_moves_the_score_the_right_way(better: dict, worse: dict) -> None:
    needs = job(model="llama-8b")
    good, bad = score(isl(**better), needs, W), score(isl(**worse), needs, W)
    assert good.total > bad.total
    changed = [f for f in ("karma", "latency", "load", "price", "warm_model") if getattr(good, f) != getattr(bad, f)]
    assert len(changed) == 1  # only the component under test moved


def test_warm_bonus_needs_a_requested_model_that_is_loaded() -> None:
    warm = isl(warm_models=frozenset({"llama-8b"}))
    assert score(warm, job(model="llama-8b"), W).warm_model == W.warm_model
    assert score(warm, job(model="mistral-7b"), W).warm_model == 0.0
    assert score(warm, job(model=None), W).warm_model == 0.0


def test_price_uses_the_ask_for_the_jobs_cargo() -> None:
    island = isl(cargos=frozenset({"llm-chat", "sdxl"}), ask_micro={"llm-chat": 1_000_000, "sdxl": 20_000_000})
    assert score(island, job(cargo="llm-chat"), W).price > score(island, job(cargo="sdxl"), W).price


def test_zero_weight_removes_a_component() -> None:
    weights = Weights(latency=0.0)
    assert score(isl(latency_ms=5), job(), weights).total == score(isl(latency_ms=500), job(), weights).total
    assert score(isl(latency_ms=5), job(), W).total > score(isl(latency_ms=500), job(), W).total


def test_weights_trade_components_off() -> None:
    cheap_slow = isl(latency_ms=300, ask_micro={"llm-chat": 1_000_000})
    dear_fast = isl(latency_ms=10, ask_micro={"llm-chat": 20_000_000})
    price_first = Weights(price=5.0, latency=0.1)
    speed_first = Weights(price=0.1, latency=5.0)
    assert score(cheap_slow, job(), price_first).total > score(dear_fast, job(), price_first).total
    assert score(cheap_slow, job(), speed_first).total < score(dear_fast, job(), speed_first).total


def test_total_is_bit_exact_sum_of_parts() -> None:
    island, needs = isl(warm_models=frozenset({"llama-8b"})), job(model="llama-8b")
    s = score(island, needs, W)
    assert s.total == ((((s.karma + s.latency) + s.load) + s.price) + s.warm_model)
    assert s.total == total_score(island, needs, W) == base_score(island, "llm-chat", W) + W.warm_model


def test_negative_weight_is_refused() -> None:
    with pytest.raises(AssertionError):
        Weights(karma=-1.0)


# ------------------------------------------------------------ determinism


def identical_fleet(n: int) -> list[IslandView]:
    return [isl(f"i{k:02d}") for k in range(n)]


def test_same_seed_same_pick_and_ties_broken_by_seed() -> None:
    fleet = identical_fleet(30)
    index = CandidateIndex(W, fleet)
    picks = set()
    for seed in range(20):
        first = index.choose(job(), W, random.Random(seed))
        again = index.choose(job(), W, random.Random(seed))
        baseline = full_scan_choose(fleet, job(), W, random.Random(seed))
        assert isinstance(first, Decision) and first.tied == 30
        assert pick(first) == pick(again) == pick(baseline)
        picks.add(pick(first))
    assert len(picks) >= 5  # different seeds spread the ties


def test_tie_break_does_not_depend_on_insertion_order() -> None:
    fleet = identical_fleet(10)
    forward = CandidateIndex(W, fleet)
    backward = CandidateIndex()
    for island in reversed(fleet):
        backward.upsert(island)
    for seed in range(10):
        assert pick(forward.choose(job(), W, random.Random(seed))) == pick(backward.choose(job(), W, random.Random(seed)))
        assert pick(full_scan_choose(fleet, job(), W, random.Random(seed))) == pick(
            full_scan_choose(list(reversed(fleet)), job(), W, random.Random(seed))
        )


def test_routing_never_touches_global_random() -> None:
    index = CandidateIndex(W, identical_fleet(5))
    state = random.getstate()
    index.choose(job(), W, random.Random(1))
    full_scan_choose(identical_fleet(5), job(), W, random.Random(1))
    assert random.getstate() == state


def test_unique_best_does_not_consume_rng() -> None:
    index = CandidateIndex(W, [isl("a", karma_milli=9_000), isl("b")])
    rng = random.Random(3)
    state = rng.getstate()
    assert pick(index.choose(job(), W, rng)) == "a"
    assert rng.getstate() == state


# ---------------------------------------------------------- index updates


def test_best_island_is_chosen_and_counts_are_reported() -> None:
    fleet = [
        isl("best", karma_milli=50_000),
        isl("good", karma_milli=20_000),
        isl("far", karma_milli=90_000, region="us-east"),
        isl("busy", karma_milli=90_000, slots_free=0),
        isl("small", karma_milli=90_000, vram_mb=1024),
    ]
    index = CandidateIndex(W, fleet)
    needs = job(regions=frozenset({"eu-west"}), vram_mb=4096)
    result = index.choose(needs, W, random.Random(0))
    assert isinstance(result, Decision)
    assert result.island_id == "best"
    assert result.fleet_size == 5
    assert result.candidates_considered == 3  # best, good, small: available, cargo, region
    assert result.candidates_examined == 2  # small (refused: vram), best; good is outranked
    assert result.candidates_eligible == 1
    assert result.tied == 1
    assert result.score == score(fleet[0], needs, W)
    baseline = full_scan_choose(fleet, needs, W, random.Random(0))
    assert isinstance(baseline, Decision)
    assert (baseline.candidates_considered, baseline.candidates_examined, baseline.candidates_eligible) == (3, 3, 2)


def test_island_losing_its_last_free_slot_is_not_chosen() -> None:
    index = CandidateIndex(W, [isl("top", karma_milli=50_000, slots_free=1), isl("other")])
    assert pick(index.choose(job(), W, random.Random(0))) == "top"
    index.take_slot("top")
    assert pick(index.choose(job(), W, random.Random(0))) == "other"
    with pytest.raises(ValueError):
        index.take_slot("top")
    index.release_slot("top")
    assert pick(index.choose(job(), W, random.Random(0))) == "top"
    index.update_live("top", slots_free=0)
    assert pick(index.choose(job(), W, random.Random(0))) == "other"
    index.check_invariants()


def test_take_slot_keeps_island_while_slots_remain_and_release_is_capped() -> None:
    index = CandidateIndex(W, [isl("top", karma_milli=50_000, slots_total=2, slots_free=2), isl("other")])
    index.take_slot("top")
    assert pick(index.choose(job(), W, random.Random(0))) == "top"
    index.release_slot("top")
    index.release_slot("top")  # already all free (heartbeat won): stays at slots_total
    assert index.get("top").slots_free == 2  # type: ignore[union-attr]
    index.check_invariants()


def test_removed_island_is_never_chosen() -> None:
    fleet = [isl("top", karma_milli=90_000)] + identical_fleet(5)
    index = CandidateIndex(W, fleet)
    assert pick(index.choose(job(), W, random.Random(0))) == "top"
    assert index.remove("top") is True
    assert index.remove("top") is False
    for seed in range(50):
        assert pick(index.choose(job(), W, random.Random(seed))) != "top"
    assert "top" not in index and len(index) == 5
    index.check_invariants()


def test_karma_update_reorders() -> None:
    index = CandidateIndex(W, [isl("a", karma_milli=20_000), isl("b", karma_milli=10_000)])
    assert pick(index.choose(job(), W, random.Random(0))) == "a"
    index.set_karma("b", 30_000)
    assert pick(index.choose(job(), W, random.Random(0))) == "b"
    index.set_karma("a", 40_000)
    assert pick(index.choose(job(), W, random.Random(0))) == "a"
    index.check_invariants()


def test_live_updates_reorder() -> None:
    index = CandidateIndex(W, [isl("a", load_permille=100), isl("b", load_permille=200)])
    assert pick(index.choose(job(), W, random.Random(0))) == "a"
    index.update_live("a", load_permille=900)
    assert pick(index.choose(job(), W, random.Random(0))) == "b"
    index.update_live("b", latency_ms=5_000, load_permille=950)
    assert pick(index.choose(job(), W, random.Random(0))) == "a"
    index.check_invariants()


def test_warm_model_update_changes_the_pick_for_that_model_only() -> None:
    index = CandidateIndex(W, [isl("a", karma_milli=6_000), isl("b")])
    assert pick(index.choose(job(model="llama-8b"), W, random.Random(0))) == "a"
    index.update_live("b", warm_models=frozenset({"llama-8b"}))
    assert pick(index.choose(job(model="llama-8b"), W, random.Random(0))) == "b"
    assert pick(index.choose(job(model="mistral-7b"), W, random.Random(0))) == "a"
    assert pick(index.choose(job(), W, random.Random(0))) == "a"
    index.update_live("b", warm_models=frozenset())
    assert pick(index.choose(job(model="llama-8b"), W, random.Random(0))) == "a"
    index.check_invariants()


def test_offline_and_reconnect() -> None:
    index = CandidateIndex(W, [isl("a", karma_milli=50_000), isl("b")])
    index.set_online("a", False)
    assert pick(index.choose(job(), W, random.Random(0))) == "b"
    index.set_online("a", True)
    assert pick(index.choose(job(), W, random.Random(0))) == "a"


def test_upsert_replaces_everything() -> None:
    index = CandidateIndex(W, [isl("a", karma_milli=50_000), isl("b")])
    index.upsert(isl("a", karma_milli=50_000, region="us-east", cargos=frozenset({"sdxl"})))
    assert pick(index.choose(job(), W, random.Random(0))) == "b"
    assert pick(index.choose(job(cargo="sdxl", regions=frozenset({"us-east"})), W, random.Random(0))) == "a"
    index.check_invariants()


def test_invalid_updates_are_refused() -> None:
    index = CandidateIndex(W, [isl("a")])
    with pytest.raises(ValueError):
        index.upsert(isl("a", slots_free=3, slots_total=2))
    with pytest.raises(ValueError):
        index.update_live("a", load_permille=1001)
    with pytest.raises(ValueError):
        index.update_live("a", slots_free=-1)
    with pytest.raises(KeyError):
        index.update_live("nope", load_permille=1)
    with pytest.raises(ValueError):
        CandidateIndex(W, [isl("a"), isl("a")])
    index.check_invariants()


def test_no_candidate_reports_refusals_by_first_failing_reason() -> None:
    fleet = [
        isl("off", online=False),
        isl("new", approved=False),
        isl("full1", slots_free=0),
        isl("full2", slots_free=0, region="us-east"),
        isl("img", cargos=frozenset({"sdxl"})),
        isl("nomodel", models=frozenset({"mistral-7b"})),
        isl("us", region="us-east"),
        isl("mac", platform="macos"),
        isl("small", vram_mb=1024),
        isl("dear", ask_micro={"llm-chat": 9_000_000}),
        isl("failed"),
    ]
    needs = job(
        model="llama-8b",
        regions=frozenset({"eu-west"}),
        platforms=frozenset({"linux"}),
        vram_mb=4096,
        bid_micro=5_000_000,
        excluded=frozenset({"failed"}),
    )
    expected = {
        "offline": 1,
        "not_approved": 1,
        "no_free_slot": 2,
        "cargo": 1,
        "model": 1,
        "region": 1,
        "platform": 1,
        "vram": 1,
        "price": 1,
        "excluded": 1,
    }
    for result in (
        CandidateIndex(W, fleet).choose(needs, W, random.Random(0)),
        full_scan_choose(fleet, needs, W, random.Random(0)),
    ):
        assert isinstance(result, NoCandidate)
        assert result.refusals == expected
        assert result.fleet_size == len(fleet)
        assert result.top_reason() == "no_free_slot"
    empty = CandidateIndex().choose(needs, W, random.Random(0))
    assert isinstance(empty, NoCandidate) and empty.refusals == {} and empty.top_reason() is None


def test_decision_is_encodable_for_the_assignment_event() -> None:
    result = CandidateIndex(W, [isl("a")]).choose(job(), W, random.Random(0))
    decoded = msgspec.json.decode(msgspec.json.encode(result), type=Decision)
    assert decoded == result


def test_changed_weights_reorder_the_index() -> None:
    fast = isl("fast", latency_ms=5, ask_micro={"llm-chat": 20_000_000})
    cheap = isl("cheap", latency_ms=300, ask_micro={"llm-chat": 500_000})
    index = CandidateIndex(Weights(latency=5.0, price=0.1), [fast, cheap])
    assert pick(index.choose(job(), None, random.Random(0))) == "fast"
    price_first = Weights(latency=0.1, price=5.0)
    assert pick(index.choose(job(), price_first, random.Random(0))) == "cheap"
    assert index.weights == price_first
    index.check_invariants()


def test_index_examines_few_islands_on_a_large_fleet() -> None:
    """The point of the index: the scan stops early instead of visiting the pool."""
    rng = random.Random(7)
    fleet = [
        isl(f"i{k:05d}", karma_milli=rng.randint(-5_000, 50_000), latency_ms=rng.randint(5, 300),
            load_permille=rng.randint(0, 1000), region=rng.choice(["eu-west", "us-east"]))
        for k in range(5_000)
    ]  # fmt: skip
    index = CandidateIndex(W, fleet)
    result = index.choose(job(regions=frozenset({"eu-west"})), W, random.Random(0))
    assert isinstance(result, Decision)
    assert result.candidates_considered > 2_000
    assert result.candidates_examined <= 3
    baseline = full_scan_choose(fleet, job(regions=frozenset({"eu-west"})), W, random.Random(0))
    assert isinstance(baseline, Decision)
    assert (result.island_id, result.score) == (baseline.island_id, baseline.score)
    assert baseline.candidates_examined == result.candidates_considered


# ------------------------------------------- index == full scan (hypothesis)

CARGOS = ["llm-chat", "sdxl"]
MODELS = ["m1", "m2", "m3"]
IDS = [f"i{k}" for k in range(12)]

fleet_island_st = st.builds(
    lambda **kw: IslandView(owner_account_id="o", vram_mb=kw.pop("vram"), ram_mb=8, **kw),
    island_id=st.sampled_from(IDS),
    online=st.booleans() | st.just(True),
    approved=st.just(True) | st.booleans(),
    slots_total=st.just(2),
    slots_free=st.integers(0, 2),
    cargos=st.frozensets(st.sampled_from(CARGOS), min_size=1),
    models=st.frozensets(st.sampled_from(MODELS)),
    warm_models=st.frozensets(st.sampled_from(MODELS)),
    vram=st.sampled_from([0, 8, 16]),
    region=st.sampled_from(["r1", "r2", "r3"]),
    platform=st.sampled_from(["linux", "macos"]),
    hardware_tier=st.integers(0, 2),
    karma_milli=st.sampled_from([-1_000, 0, 5_000, 20_000]),
    latency_ms=st.sampled_from([10, 50, 200]),
    load_permille=st.sampled_from([0, 500, 1000]),
    ask_micro=st.fixed_dictionaries({}, optional={c: st.sampled_from([1_000_000, 5_000_000]) for c in CARGOS}),
)

fleet_needs_st = st.builds(
    JobNeeds,
    cargo=st.sampled_from(CARGOS),
    model=st.none() | st.sampled_from(MODELS + ["m9"]),
    vram_mb=st.sampled_from([0, 0, 8, 16]),
    regions=st.just(frozenset()) | st.frozensets(st.sampled_from(["r1", "r2", "r9"]), max_size=2),
    platforms=st.just(frozenset()) | st.frozensets(st.sampled_from(["linux", "macos"]), max_size=1),
    min_hardware_tier=st.integers(0, 2),
    max_latency_ms=st.none() | st.sampled_from([20, 100]),
    bid_micro=st.none() | st.sampled_from([500_000, 2_000_000]),
    min_karma_milli=st.sampled_from([-(2**62), 0, 10_000]),
    excluded=st.frozensets(st.sampled_from(IDS), max_size=3),
)

weights_st = st.builds(
    Weights,
    karma=st.sampled_from([0.0, 1.0, 2.5]),
    latency=st.sampled_from([0.0, 1.0]),
    load=st.sampled_from([0.0, 1.0, 0.3]),
    warm_model=st.sampled_from([0.0, 0.5, 3.0]),
    price=st.sampled_from([0.0, 0.5]),
)

op_st = st.one_of(
    st.tuples(st.just("upsert"), fleet_island_st),
    st.tuples(st.just("remove"), st.sampled_from(IDS)),
    st.tuples(
        st.just("live"),
        st.sampled_from(IDS),
        st.none() | st.integers(0, 2),
        st.none() | st.sampled_from([0, 500, 1000]),
        st.none() | st.sampled_from([10, 50, 200]),
        st.none() | st.frozensets(st.sampled_from(MODELS)),
    ),
    st.tuples(st.just("karma"), st.sampled_from(IDS), st.sampled_from([-1_000, 0, 5_000, 20_000, 60_000])),
    st.tuples(st.just("take"), st.sampled_from(IDS)),
    st.tuples(st.just("release"), st.sampled_from(IDS)),
    st.tuples(st.just("online"), st.sampled_from(IDS), st.booleans()),
    st.tuples(st.just("slots"), st.sampled_from(IDS), st.integers(0, 3)),
    st.tuples(
        st.just("live_all"),
        st.sampled_from(IDS),
        st.none() | st.booleans(),
        st.none() | st.integers(1, 3),
        st.none() | st.integers(0, 3),
        st.none() | st.sampled_from([0, 500, 1000]),
        st.none() | st.sampled_from([10, 50, 200]),
        st.none() | st.frozensets(st.sampled_from(MODELS)),
    ),
    st.tuples(st.just("choose"), fleet_needs_st),
)


def apply(index: CandidateIndex, op: tuple) -> None:
    kind, *args = op
    if kind == "upsert":
        index.upsert(args[0])
        return
    if kind == "remove":
        index.remove(args[0])
        return
    if kind == "choose":
        index.choose(args[0], None, random.Random(0))  # materializes (cargo, model) pairs mid-history
        return
    island_id = args[0]
    island = index.get(island_id)
    if island is None:
        return
    if kind == "live":
        slots_free, load, latency, warm = args[1:]
        kwargs = dict(slots_free=slots_free, load_permille=load, latency_ms=latency, warm_models=warm)
        if slots_free is None or slots_free <= island.slots_total:
            index.update_live(island_id, **kwargs)
        else:  # a "live_all" op lowered slots_total below what this op asks for
            with pytest.raises(ValueError):
                index.update_live(island_id, **kwargs)
            assert index.get(island_id) is island  # a refused update changes nothing
    elif kind == "karma":
        index.set_karma(island_id, args[1])
    elif kind == "take":
        if island.slots_free > 0:
            index.take_slot(island_id)
    elif kind == "release":
        index.release_slot(island_id)
    elif kind == "online":
        index.set_online(island_id, args[1])
    elif kind == "slots":
        if args[1] <= island.slots_total:
            index.set_slots_free(island_id, args[1])
        else:
            with pytest.raises(ValueError):
                index.set_slots_free(island_id, args[1])
            assert index.get(island_id) is island  # a refused update changes nothing
    elif kind == "live_all":
        online, slots_total, slots_free, load, latency, warm = args[1:]
        total = island.slots_total if slots_total is None else slots_total
        free = island.slots_free if slots_free is None else slots_free
        kwargs = dict(online=online, slots_total=slots_total, slots_free=slots_free, load_permille=load,
                      latency_ms=latency, warm_models=warm)
        if free <= total:
            index.update_live(island_id, **kwargs)
        else:
            with pytest.raises(ValueError):
                index.update_live(island_id, **kwargs)
            assert index.get(island_id) is island  # a refused update changes nothing


def assert_same(index_result: Decision | NoCandidate, scan_result: Decision | NoCandidate) -> None:
    assert type(index_result) is type(scan_result), (index_result, scan_result)
    if isinstance(index_result, Decision):
        assert isinstance(scan_result, Decision)
        assert index_result.island_id == scan_result.island_id
        assert index_result.score == scan_result.score
        assert index_result.tied == scan_result.tied
        assert index_result.fleet_size == scan_result.fleet_size
        assert index_result.candidates_considered == scan_result.candidates_considered
        assert 1 <= index_result.candidates_eligible <= scan_result.candidates_eligible
        assert index_result.candidates_examined <= scan_result.candidates_examined
    else:
        assert index_result == scan_result


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=weights_st,
    initial=st.lists(fleet_island_st, max_size=12, unique_by=lambda i: i.island_id),
    ops=st.lists(op_st, max_size=25),
    jobs=st.lists(fleet_needs_st, min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
    scan_budget=st.sampled_from([0, 1, 3, 128]),
)
def test_index_matches_full_scan_on_random_fleets(
    weights: Weights, initial: list[IslandView], ops: list[tuple], jobs: list[JobNeeds], seed: int, scan_budget: int
) -> None:
    index = CandidateIndex(weights, initial, scan_budget=scan_budget)
    for op in ops:
        apply(index, op)
    index.check_invariants()
    fleet = index.islands()
    for k, needs in enumerate(jobs):
        assert_same(
            index.choose(needs, weights, random.Random(seed + k)),
            full_scan_choose(fleet, needs, weights, random.Random(seed + k)),
        )
    index.check_invariants()  # bounds tightened by the scans are still sound


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_index_matches_full_scan_on_larger_fleets_with_many_ties(seed: int) -> None:
    rng = random.Random(seed)
    fleet = [
        isl(
            f"i{k:03d}",
            karma_milli=rng.choice([0, 10_000]),
            latency_ms=rng.choice([20, 40]),
            load_permille=rng.choice([0, 500]),
            region=rng.choice(["eu-west", "us-east"]),
            warm_models=frozenset(rng.sample(["llama-8b", "mistral-7b"], rng.randint(0, 2))),
            vram_mb=rng.choice([4096, 8192]),
        )
        for k in range(300)
    ]
    index = CandidateIndex(W, fleet, scan_budget=rng.choice([0, 5, 128]))
    for _ in range(5):
        needs = job(
            model=rng.choice([None, "llama-8b", "mistral-7b"]),
            vram_mb=rng.choice([0, 8192]),
            regions=rng.choice([frozenset(), frozenset({"us-east"})]),
        )
        decision_seed = rng.getrandbits(32)
        assert_same(
            index.choose(needs, W, random.Random(decision_seed)),
            full_scan_choose(fleet, needs, W, random.Random(decision_seed)),
        )


def test_hopeless_job_is_refused_without_visiting_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Job nothing can run must not cost a walk over the whole pool: list bounds prove
    it, and the refusal counts stay exact."""
    import routing.index as index_module

    rng = random.Random(3)
    fleet = [
        isl(f"i{k:05d}", karma_milli=rng.randint(0, 50_000), latency_ms=rng.randint(5, 300),
            region=rng.choice(["eu-west", "us-east"]), vram_mb=rng.choice([8192, 16384]),
            ask_micro={"llm-chat": rng.randint(1_000_000, 9_000_000)})
        for k in range(3_000)
    ]  # fmt: skip
    index = CandidateIndex(W, fleet)
    calls = 0
    real = index_module.residual_reason

    def counting(island: IslandView, needs: JobNeeds) -> str | None:
        nonlocal calls
        calls += 1
        return real(island, needs)

    monkeypatch.setattr(index_module, "residual_reason", counting)
    for needs, reason in [
        (job(vram_mb=32_768), "vram"),
        (job(bid_micro=999_999), "price"),
        (job(min_karma_milli=60_000), "karma"),
        (job(platforms=frozenset({"windows"})), "platform"),
        (job(max_latency_ms=4), "latency"),
    ]:
        calls = 0
        result = index.choose(needs, W, random.Random(0))
        assert result == full_scan_choose(fleet, needs, W, random.Random(0))
        assert isinstance(result, NoCandidate) and result.refusals == {reason: 3_000}
        assert calls <= index_module.SCAN_BUDGET  # the budgeted first try, then proofs only
    # mixed reasons cannot be proven list-wide: the pool is walked, counts still exact
    mixed = job(vram_mb=16_384, bid_micro=999_999)
    result = index.choose(mixed, W, random.Random(0))
    assert result == full_scan_choose(fleet, mixed, W, random.Random(0))
    assert isinstance(result, NoCandidate) and set(result.refusals) == {"vram", "price"}


def test_list_bounds_stay_sound_under_updates() -> None:
    index = CandidateIndex(W, [isl("a", latency_ms=10), isl("b", latency_ms=20)], scan_budget=0)
    assert isinstance(index.choose(job(max_latency_ms=5), W, random.Random(0)), NoCandidate)
    index.update_live("b", latency_ms=3)
    assert pick(index.choose(job(max_latency_ms=5), W, random.Random(0))) == "b"
    index.set_karma("a", 90_000)
    index.update_live("b", latency_ms=300)
    assert pick(index.choose(job(min_karma_milli=80_000), W, random.Random(0))) == "a"
    index.upsert(isl("a", karma_milli=90_000, ask_micro={"llm-chat": 1}))
    assert pick(index.choose(job(bid_micro=1), W, random.Random(0))) == "a"
    index.check_invariants()


_HASH_SEED_SCRIPT = """
import random, hashlib, msgspec
from routing.index import CandidateIndex
from routing.types import Decision, IslandView, JobNeeds, Weights
rng = random.Random(4)
models = ["m1", "m2", "m3", "m4"]
fleet = [
    IslandView(island_id=f"i{k}", owner_account_id="o", online=True, approved=rng.random() < 0.9,
               slots_total=2, slots_free=rng.randint(0, 2), cargos=frozenset(rng.sample(["a", "b", "c"], 2)),
               models=frozenset(rng.sample(models, 2)), warm_models=frozenset(rng.sample(models, 1)),
               vram_mb=rng.choice([0, 8]), ram_mb=8, region=rng.choice(["r1", "r2", "r3", "r4"]),
               platform=rng.choice(["linux", "macos"]), hardware_tier=rng.randint(0, 4),
               karma_milli=rng.choice([0, 1000, 5000]), latency_ms=rng.choice([10, 20]),
               load_permille=rng.choice([0, 500]), ask_micro={"a": 1, "b": rng.choice([1, 2]), "c": 3})
    for k in range(400)
]
index = CandidateIndex(Weights(), fleet, scan_budget=4)
digest = hashlib.sha256()
for k in range(300):
    needs = JobNeeds(cargo=rng.choice("abc"), model=rng.choice([None] + models),
                     regions=frozenset(rng.sample(["r1", "r2", "r3", "r4"], rng.randint(0, 3))),
                     vram_mb=rng.choice([0, 8, 16]), min_hardware_tier=rng.randint(0, 3))
    result = index.choose(needs, None, random.Random(k))
    digest.update(msgspec.json.encode(result))
    if isinstance(result, Decision):
        index.take_slot(result.island_id)
    index.update_live(f"i{rng.randrange(400)}", load_permille=rng.choice([0, 500, 1000]))
print(digest.hexdigest())
"""


def test_decisions_do_not_depend_on_the_hash_seed() -> None:
    """Same calls, same results bit for bit in any process (the simulator's promise):
    nothing may depend on set iteration order, which PYTHONHASHSEED changes."""
    import os
    import subprocess
    import sys

    outputs = set()
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", _HASH_SEED_SCRIPT], env=env, capture_output=True, text=True, check=True)
        outputs.add(done.stdout.strip())
    assert len(outputs) == 1, outputs
