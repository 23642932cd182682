"""The registry's incremental paths (heartbeat heap, live-only index updates) must give
the answers of the plain versions: `stale` = a scan of every record, the routing index =
one full view per record, and decisions = a full scan over those views."""

from __future__ import annotations

import random
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.full_scan import full_scan_choose
from routing.index import CandidateIndex
from routing.types import Decision, JobNeeds, NoCandidate, Weights
from scheduler import registry as registry_module
from scheduler.registry import Registry

IDS = [f"island-{k}" for k in range(4)]
JOBS = [uuid.UUID(int=k) for k in range(6)]
CARGOS = ["llm-chat", "sdxl"]
MODELS = ["m1", "m2"]
OFFLINE_AFTER_MS = 30


def caps(slots: int, cargos: frozenset[str], region: str) -> dict:
    return {"cargos": sorted(cargos), "models": MODELS, "vram_mb": 8, "ram_mb": 8, "cpu_cores": 1,
            "gpu_model": "", "region": region, "platform": "linux", "hardware_tier": 1, "slots": slots,
            "asks_micro": {}}


caps_st = st.builds(caps, st.integers(1, 3), st.frozensets(st.sampled_from(CARGOS), min_size=1),
                    st.sampled_from(["r1", "r2"]))

mutation_st = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(IDS), caps_st, st.just(True) | st.booleans()),
    st.tuples(st.just("approve"), st.sampled_from(IDS), st.booleans()),
    st.tuples(st.just("capabilities"), st.sampled_from(IDS), caps_st),
    st.tuples(st.just("karma"), st.sampled_from(IDS), st.sampled_from([-1_000, 0, 5_000, 20_000])),
    st.tuples(
        st.just("heartbeat"),
        st.sampled_from(IDS),
        st.none() | st.integers(1, 3),
        st.none() | st.sampled_from([0, 500, 1000]),
        st.none() | st.sampled_from([10, 50, 200]),
        st.none() | st.frozensets(st.sampled_from(MODELS)),
    ),
    st.tuples(st.just("offline"), st.sampled_from(IDS)),
    st.tuples(st.just("reserve"), st.sampled_from(IDS), st.sampled_from(JOBS)),
    st.tuples(st.just("release"), st.sampled_from(IDS), st.sampled_from(JOBS)),
)
op_st = st.one_of(
    mutation_st,
    # changes applied while the registry defers slot and karma updates (the dispatch core's
    # log read), then flushed: the index must end as if each had gone through at once
    st.tuples(st.just("deferred"), st.lists(mutation_st, max_size=8)),
    st.tuples(st.just("tick"), st.integers(0, 40)),
    st.tuples(st.just("stale"), st.booleans()),
    st.tuples(st.just("choose"), st.sampled_from(CARGOS), st.none() | st.sampled_from(MODELS)),
)


def reference_stale(reg: Registry, now_ms: int) -> list[str]:
    return [r.island_id for r in reg.islands.values() if r.online and now_ms - r.last_heartbeat_ms > OFFLINE_AFTER_MS]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleet=st.lists(caps_st, min_size=1, max_size=len(IDS)), ops=st.lists(op_st, min_size=10, max_size=80),
       small_heap=st.booleans())
def test_registry_incremental_paths_match_full_recomputation(fleet: list[dict], ops: list[tuple],
                                                             small_heap: bool) -> None:
    saved = registry_module.MAX_BEATS_PER_ISLAND
    if small_heap:  # rebuild the heartbeat heap often
        registry_module.MAX_BEATS_PER_ISLAND = 1
    try:
        run_ops(fleet, ops)
    finally:
        registry_module.MAX_BEATS_PER_ISLAND = saved


def mutate(reg: Registry, op: tuple, now_ms: int) -> None:
    kind, *args = op
    if kind == "register":
        reg.register(args[0], "owner", args[0], args[1], args[2])
    elif kind == "approve":
        reg.set_approved(args[0], args[1])
    elif kind == "capabilities":
        reg.set_capabilities(args[0], args[1])
    elif kind == "karma":
        reg.set_karma(args[0], args[1])
    elif kind == "heartbeat":
        island_id, slots_total, load, latency, warm = args
        reg.heartbeat(island_id, now_ms, slots_total=slots_total, load_permille=load, latency_ms=latency,
                      warm_models=warm)
    elif kind == "offline":
        reg.set_offline(args[0])
    elif kind == "reserve":
        reg.reserve(args[0], args[1])
    elif kind == "release":
        reg.release(args[0], args[1])
    else:
        raise AssertionError(f"not a mutation: {op}")


def run_ops(fleet: list[dict], ops: list[tuple]) -> None:
    weights = Weights()
    reg = Registry(CandidateIndex(weights))
    now_ms = 0
    for island_id, capabilities in zip(IDS, fleet):  # an approved fleet, online, then anything goes
        reg.register(island_id, "owner", island_id, capabilities, True)
        reg.heartbeat(island_id, now_ms)
    for k, op in enumerate(ops):
        kind, *args = op
        if kind == "deferred":
            reg.defer_slots_and_karma()
            for sub in args[0]:
                mutate(reg, sub, now_ms)
            reg.flush_deferred()
        elif kind == "tick":
            now_ms += args[0]
        elif kind == "stale":
            expected = reference_stale(reg, now_ms)
            assert reg.stale(now_ms, OFFLINE_AFTER_MS) == expected
            if args[0]:  # the dispatcher's use: report, then take offline
                for island_id in expected:
                    reg.set_offline(island_id)
            assert reg.stale(now_ms, OFFLINE_AFTER_MS) == reference_stale(reg, now_ms)
        elif kind == "choose":
            needs = JobNeeds(cargo=args[0], model=args[1])
            views = [rec.view() for rec in reg.islands.values()]
            got = reg.index.choose(needs, None, random.Random(k))
            want = full_scan_choose(views, needs, weights, random.Random(k))
            assert type(got) is type(want)
            if isinstance(got, Decision):
                assert isinstance(want, Decision)
                assert (got.island_id, got.score, got.tied) == (want.island_id, want.score, want.tied)
            else:
                assert isinstance(want, NoCandidate) and got == want
        else:
            mutate(reg, op, now_ms)
        reg.check_index()
        reg.index.check_invariants()
    assert reg.stale(now_ms, OFFLINE_AFTER_MS) == reference_stale(reg, now_ms)
    assert len(reg._beats) <= registry_module.MAX_BEATS_PER_ISLAND * len(reg.islands) + 64


def test_stale_reports_in_registration_order_and_until_taken_offline() -> None:
    reg = Registry(CandidateIndex(Weights()))
    for island_id in ("c", "a", "b"):
        reg.register(island_id, "owner", island_id, caps(1, frozenset({"llm-chat"}), "r1"), True)
    reg.heartbeat("b", 0)
    reg.heartbeat("a", 5)
    reg.heartbeat("c", 10)
    assert reg.stale(34, OFFLINE_AFTER_MS) == ["b"]
    assert reg.stale(100, OFFLINE_AFTER_MS) == ["c", "a", "b"]
    assert reg.stale(100, OFFLINE_AFTER_MS) == ["c", "a", "b"]  # still online: reported again
    reg.set_offline("a")
    reg.heartbeat("c", 90)
    assert reg.stale(100, OFFLINE_AFTER_MS) == ["b"]


def test_heartbeat_heap_stays_bounded() -> None:
    reg = Registry(CandidateIndex(Weights()))
    for k in range(3):
        reg.register(f"i{k}", "owner", "", caps(1, frozenset({"llm-chat"}), "r1"), True)
    limit = registry_module.MAX_BEATS_PER_ISLAND * 3 + 64
    for t in range(10 * limit):  # never stale: nothing is ever popped by `stale`
        reg.heartbeat(f"i{t % 3}", t)
        assert len(reg._beats) <= limit
    assert reg.stale(10 * limit, 10**9) == []
    assert reg.stale(10 * limit + 10, 5) == ["i0", "i1", "i2"]
