"""Routing benchmark: CandidateIndex.choose vs full_scan_choose on seeded random fleets.

For 1k, 10k and 100k Islands: build a fleet (several Cargos/models, regions, platforms,
hardware tiers, ~50% of Islands with a free slot), then run decisions for random Jobs.
Between decisions the index is maintained incrementally the way the scheduler would:
heartbeats (load, latency, sometimes free slots and warm models), take_slot on every
winner, release_slot as earlier assignments finish, occasional karma changes.

Every baseline decision runs on exactly the same fleet state and rng seed as the index
decision before it, and the two results are compared (same Island, same score).

Per-decision latency is measured with time.perf_counter_ns around the call only.
Ratios are baseline / index of the same percentile, measured in the same run.

    python -m bench routing [--seed N] [--decisions N] [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import collections
import random
import time

from bench.common import percentile, ratio
from routing.full_scan import full_scan_choose
from routing.index import CandidateIndex
from routing.types import Decision, IslandView, JobNeeds, NoCandidate, Weights

# slug -> (models, vram_mb, ram_mb, typical ask in micro-credits, min hardware tier)
CARGOS: dict[str, tuple[tuple[str, ...], int, int, int, int]] = {
    "llm-chat": (("mistral-7b-instruct", "llama-3.1-8b-instruct", "qwen2.5-7b-instruct"), 6144, 8192, 6_000_000, 1),
    "llm-chat-lite": (("tinyllama-1.1b-chat", "qwen2.5-0.5b-instruct"), 0, 2048, 1_500_000, 0),
    "sdxl": (("sdxl-base-1.0",), 12288, 16384, 12_000_000, 2),
    "llm-code": (("qwen2.5-coder-14b", "deepseek-coder-6.7b"), 10240, 16384, 8_000_000, 2),
    "whisper": (("whisper-large-v3", "whisper-small"), 4096, 8192, 2_000_000, 1),
}
CARGO_DEMAND = {"llm-chat": 40, "llm-chat-lite": 25, "sdxl": 15, "llm-code": 10, "whisper": 10}
REGIONS = {"eu-west": 25, "eu-central": 15, "us-east": 25, "us-west": 15, "ap-south": 8, "ap-east": 8, "sa-east": 4}
PLATFORMS = {"linux": 60, "windows": 25, "macos": 15}
TIERS = {0: 20, 1: 30, 2: 30, 3: 15, 4: 5}
VRAM_BY_TIER = {0: (0,), 1: (8192,), 2: (12288, 16384), 3: (24576,), 4: (49152, 81920)}

DEFAULT_SIZES = (1_000, 10_000, 100_000)
INDEX_DECISIONS = 5_000
INFEASIBLE_DECISIONS = 20
BASELINE_DECISIONS = {1_000: 1_000, 10_000: 300, 100_000: 60}
HEARTBEATS_PER_DECISION = 4


def _weighted(rng: random.Random, table: dict) -> object:
    return rng.choices(list(table), weights=list(table.values()))[0]


def make_island(rng: random.Random, n: int) -> IslandView:
    tier = int(_weighted(rng, TIERS))  # type: ignore[arg-type]
    capable = [slug for slug, spec in CARGOS.items() if spec[4] <= tier]
    cargos = frozenset(rng.sample(capable, rng.randint(1, len(capable))))
    models: set[str] = set()
    for slug in sorted(cargos):  # sorted: set order depends on PYTHONHASHSEED
        names = CARGOS[slug][0]
        models.update(rng.sample(names, rng.randint(1, len(names))))
    warm = frozenset(rng.sample(sorted(models), rng.randint(0, min(2, len(models)))))
    slots_total = rng.randint(1, 4)
    slots_free = 0 if rng.random() < 0.5 else rng.randint(1, slots_total)
    return IslandView(
        island_id=f"isl-{n:06d}",
        owner_account_id=f"acct-{n // 3:06d}",
        online=rng.random() < 0.95,
        approved=rng.random() < 0.97,
        slots_total=slots_total,
        slots_free=slots_free,
        cargos=cargos,
        models=frozenset(models),
        warm_models=warm,
        vram_mb=rng.choice(VRAM_BY_TIER[tier]),
        ram_mb=rng.choice((8192, 16384, 32768, 65536)),
        region=str(_weighted(rng, REGIONS)),
        platform=str(_weighted(rng, PLATFORMS)),
        hardware_tier=tier,
        karma_milli=max(-100_000, int(rng.gauss(15_000, 20_000))),
        latency_ms=int(rng.gammavariate(2.0, 40.0)) + 5,
        load_permille=rng.randint(0, 1000),
        ask_micro={slug: int(CARGOS[slug][3] * rng.uniform(0.5, 2.0)) for slug in sorted(cargos)},
    )


def make_needs(rng: random.Random, recent_winners: list[str]) -> JobNeeds:
    cargo = str(_weighted(rng, CARGO_DEMAND))
    names, vram_mb, ram_mb, typical_ask, _ = CARGOS[cargo]
    model = rng.choice(names) if rng.random() < 0.7 else None
    roll = rng.random()
    regions = frozenset() if roll < 0.65 else frozenset(rng.sample(sorted(REGIONS), 1 if roll < 0.9 else 2))
    platforms = frozenset() if rng.random() < 0.9 else frozenset([str(_weighted(rng, PLATFORMS))])
    roll = rng.random()
    min_tier = 0 if roll < 0.8 else (2 if roll < 0.95 else 3)
    max_latency_ms = None if rng.random() < 0.7 else rng.choice((60, 100, 200, 300))
    bid_micro = None if rng.random() < 0.5 else int(typical_ask * rng.uniform(0.8, 2.5))
    roll = rng.random()
    min_karma_milli = 0 if roll < 0.9 else rng.choice((5_000, 10_000, 20_000))
    excluded = frozenset(recent_winners[-rng.randint(1, 3) :]) if recent_winners and rng.random() < 0.1 else frozenset()
    return JobNeeds(
        cargo=cargo,
        model=model,
        vram_mb=vram_mb,
        ram_mb=ram_mb,
        regions=regions,
        platforms=platforms,
        min_hardware_tier=min_tier,
        max_latency_ms=max_latency_ms,
        bid_micro=bid_micro,
        min_karma_milli=min_karma_milli,
        excluded=excluded,
    )


def heartbeat(index: CandidateIndex, rng: random.Random, ids: list[str]) -> None:
    island_id = rng.choice(ids)
    island = index.get(island_id)
    assert island is not None
    slots_free = rng.randint(0, island.slots_total) if rng.random() < 0.1 else None
    warm = None
    if rng.random() < 0.05 and island.models:
        warm = frozenset(rng.sample(sorted(island.models), rng.randint(0, min(2, len(island.models)))))
    index.update_live(
        island_id,
        slots_free=slots_free,
        load_permille=min(1000, max(0, island.load_permille + rng.randint(-100, 100))),
        latency_ms=max(1, island.latency_ms + rng.randint(-10, 10)),
        warm_models=warm,
    )


def run_size(n_islands: int, seed: int, n_decisions: int, n_baseline: int) -> dict:
    rng = random.Random(seed * 1_000_003 + n_islands)
    weights = Weights()
    islands = [make_island(rng, i) for i in range(n_islands)]
    ids = [island.island_id for island in islands]
    t0 = time.perf_counter()
    catalog_pairs = [(slug, model) for slug, spec in CARGOS.items() for model in spec[0]]
    index = CandidateIndex(weights, islands, pairs=catalog_pairs)  # as the scheduler would, from the catalog
    build_s = time.perf_counter() - t0
    free_share = sum(1 for island in islands if island.slots_free > 0) / n_islands

    index_ns: list[int] = []
    baseline_ns: list[int] = []
    baseline_index_ns: list[int] = []  # index latency of the decisions that also ran the baseline
    update_ns: list[int] = []
    examined: list[int] = []
    no_candidate = 0
    mismatches = 0
    running: collections.deque[str] = collections.deque()
    recent_winners: list[str] = []
    baseline_every = max(1, n_decisions // max(1, n_baseline))
    perf = time.perf_counter_ns

    for i in range(n_decisions):
        # incremental maintenance between decisions (timed separately)
        for _ in range(HEARTBEATS_PER_DECISION):
            t = perf()
            heartbeat(index, rng, ids)
            update_ns.append(perf() - t)
        if running and (len(running) > 200 or rng.random() < 0.5):
            t = perf()
            index.release_slot(running.popleft())
            update_ns.append(perf() - t)
        if i % 5 == 0:
            island_id = rng.choice(ids)
            t = perf()
            index.set_karma(island_id, max(-100_000, index.get(island_id).karma_milli + rng.randint(-500, 500)))  # type: ignore[union-attr]
            update_ns.append(perf() - t)

        needs = make_needs(rng, recent_winners)
        decision_seed = rng.getrandbits(32)
        tie_rng = random.Random(decision_seed)
        t = perf()
        result = index.choose(needs, weights, tie_rng)
        elapsed = perf() - t
        index_ns.append(elapsed)

        if i % baseline_every == 0 and len(baseline_ns) < n_baseline:
            fleet = index.islands()
            base_rng = random.Random(decision_seed)
            t = perf()
            expected = full_scan_choose(fleet, needs, weights, base_rng)
            baseline_ns.append(perf() - t)
            baseline_index_ns.append(elapsed)
            if isinstance(result, Decision) != isinstance(expected, Decision):
                mismatches += 1
            elif isinstance(result, Decision) and isinstance(expected, Decision):
                if (result.island_id, result.score.total) != (expected.island_id, expected.score.total):
                    mismatches += 1
            elif isinstance(result, NoCandidate) and isinstance(expected, NoCandidate):
                if result.refusals != expected.refusals:
                    mismatches += 1

        if isinstance(result, Decision):
            examined.append(result.candidates_examined)
            t = perf()
            index.take_slot(result.island_id)
            update_ns.append(perf() - t)
            running.append(result.island_id)
            recent_winners.append(result.island_id)
            del recent_winners[:-10]
        else:
            no_candidate += 1

    # A Job nothing can run (more VRAM than any Island has): without the pools' bounds the
    # index would have to visit the whole pool to prove it and count refusals exactly.
    infeasible = JobNeeds(cargo="llm-chat", vram_mb=10**7)
    infeasible_ns: list[int] = []
    infeasible_baseline_ns: list[int] = []
    fleet = index.islands()
    for k in range(INFEASIBLE_DECISIONS):
        t = perf()
        result = index.choose(infeasible, weights, random.Random(k))
        infeasible_ns.append(perf() - t)
        assert isinstance(result, NoCandidate) and result.refusals.get("vram", 0) > 0
        t = perf()
        expected = full_scan_choose(fleet, infeasible, weights, random.Random(k))
        infeasible_baseline_ns.append(perf() - t)
        mismatches += result != expected

    us = lambda ns: ns / 1000.0  # noqa: E731
    row = {
        "islands": n_islands,
        "free_share": round(free_share, 3),
        "build_s": round(build_s, 3),
        "decisions": n_decisions,
        "no_candidate": no_candidate,
        "index_p50_us": us(percentile(index_ns, 50)),
        "index_p99_us": us(percentile(index_ns, 99)),
        "index_max_us": us(max(index_ns)),
        "baseline_decisions": len(baseline_ns),
        "baseline_p50_us": us(percentile(baseline_ns, 50)),
        "baseline_p99_us": us(percentile(baseline_ns, 99)),
        # index percentiles over the same decisions the baseline ran on
        "paired_index_p50_us": us(percentile(baseline_index_ns, 50)),
        "paired_index_p99_us": us(percentile(baseline_index_ns, 99)),
        "mismatches": mismatches,
        "examined_p50": percentile(examined, 50) if examined else 0,
        "examined_p99": percentile(examined, 99) if examined else 0,
        "infeasible_p50_us": us(percentile(infeasible_ns, 50)),
        "infeasible_baseline_p50_us": us(percentile(infeasible_baseline_ns, 50)),
        "update_p50_us": us(percentile(update_ns, 50)),
        "update_p99_us": us(percentile(update_ns, 99)),
    }
    return row


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench routing")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--decisions", type=int, default=INDEX_DECISIONS)
    parser.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    rows = {}
    for n in sizes:
        rows[n] = run_size(n, args.seed, args.decisions, BASELINE_DECISIONS.get(n, max(50, 1_000_000 // n)))

    header = (
        f"{'islands':>8} {'free':>5} {'build s':>7} {'index p50/p99/max us':>22} "
        f"{'scan p50/p99 us':>18} {'x p50':>6} {'x p99':>6} {'examined p50/p99':>16} "
        f"{'update p50/p99 us':>17} {'none':>5} {'diff':>4}"
    )
    print("routing: CandidateIndex.choose vs full_scan_choose (same fleet state, same seeds)")
    print(header)
    for n, r in rows.items():
        print(
            f"{n:>8} {r['free_share']:>5.2f} {r['build_s']:>7.2f} "
            f"{r['index_p50_us']:>7.1f}/{r['index_p99_us']:>6.1f}/{r['index_max_us']:>7.1f} "
            f"{r['baseline_p50_us']:>9.0f}/{r['baseline_p99_us']:>8.0f} "
            f"{ratio(r['baseline_p50_us'], r['paired_index_p50_us']):>6.0f} "
            f"{ratio(r['baseline_p99_us'], r['paired_index_p99_us']):>6.0f} "
            f"{r['examined_p50']:>7}/{r['examined_p99']:>8} "
            f"{r['update_p50_us']:>8.1f}/{r['update_p99_us']:>8.1f} "
            f"{r['no_candidate']:>5} {r['mismatches']:>4}"
        )
    for n, r in rows.items():
        print(
            f"{n:>8} islands, Job nothing can run (NoCandidate, vram too big): "
            f"index p50 {r['infeasible_p50_us']:.0f} us, full scan p50 {r['infeasible_baseline_p50_us']:.0f} us"
        )
    print(
        "x p50 / x p99 = baseline percentile / index percentile over the decisions both ran on; "
        "none = decisions with NoCandidate; diff = index and full scan disagreed (must be 0)"
    )

    def get(n: int, key: str) -> float | None:
        return round(rows[n][key], 1) if n in rows else None

    result: dict = {"bench": "routing", "seed": args.seed, "decisions": args.decisions}
    for n, tag in ((1_000, "1k"), (10_000, "10k"), (100_000, "100k")):
        if n not in rows:
            continue
        r = rows[n]
        result[f"p50_us_{tag}"] = get(n, "index_p50_us")
        result[f"p99_us_{tag}"] = get(n, "index_p99_us")
        result[f"baseline_p50_us_{tag}"] = get(n, "baseline_p50_us")
        result[f"baseline_p99_us_{tag}"] = get(n, "baseline_p99_us")
        result[f"ratio_{tag}"] = ratio(r["baseline_p50_us"], r["paired_index_p50_us"])  # p50 / p50
        result[f"ratio_p99_{tag}"] = ratio(r["baseline_p99_us"], r["paired_index_p99_us"])
        result[f"update_p99_us_{tag}"] = get(n, "update_p99_us")
        result[f"nocandidate_p50_us_{tag}"] = get(n, "infeasible_p50_us")
        result[f"mismatches_{tag}"] = r["mismatches"]
    result["ratio_basis"] = "baseline_pXX / index_pXX over the same decisions; ratio_* uses p50"
    return result
