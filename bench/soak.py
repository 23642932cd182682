"""`python -m bench soak [--seconds 600] [--store sqlite|postgres] [--rate 30]`: a steady mixed
load against a real `coordinator serve` (projector child, a reference echo Island agent) for a
long time, to see that nothing degrades: throughput, p50/p99 latency per operation, error counts
by status, projection lag (events behind, sampled), and resident memory of the server and its
projector at the start (after the warm-up) and at the end; memory growth must stay under 10%.

The load is open-loop at `--rate` operations per second (so it stays steady whatever the
latency), drawn in a fixed mix: submit + follow the SSE stream to the end (35%), submit only
(20%), batch of 5 (5%), GET one Job (20%), GET /account (10%), GET /jobs (10%). The baseline
the end is compared with is the first window of the same run (`first` vs `last`, each
`--window-s`): the ratios of their p99s and throughputs are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.api import _drop_schema, coordinator_env, free_port, make_accounts, start_coordinator, stop, wait_http

MIX = [("stream", 35), ("submit", 20), ("batch", 5), ("get_job", 20), ("account", 10), ("list", 10)]


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, int(round(q / 100 * len(s) + 0.5)) - 1))] * 1000, 2)


def cli_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


async def run_load(url: str, keys: list[str], seconds: float, rate: float, window_s: float,
                   samples: list[tuple[float, str, float, int]], stop_at: float) -> None:
    import httpx

    rng = random.Random(16)
    kinds = [k for k, w in MIX for _ in range(w)]
    jobs: list[tuple[str, str]] = []
    clients = [httpx.AsyncClient(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {k}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=64)) for k in keys]
    pending: set[asyncio.Task] = set()
    t0 = time.monotonic()

    async def one(kind: str, n: int) -> None:
        ci = n % len(clients)
        cl = clients[ci]
        started = time.monotonic()
        status = 0
        try:
            if kind in ("stream", "submit"):
                r = await cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": f"soak {n}",
                                                                                   "max_tokens": 16}})
                status = r.status_code
                if status == 201:
                    jid = r.json()["data"]["id"]
                    jobs.append((jid, keys[ci]))
                    if len(jobs) > 5000:
                        del jobs[:1000]
                    if kind == "stream":
                        async with cl.stream("GET", f"/jobs/{jid}/stream") as s:
                            status = s.status_code
                            async for line in s.aiter_lines():
                                if '"type":"done"' in line or '"type":"error"' in line:
                                    break
            elif kind == "batch":
                r = await cl.post("/jobs/batch", json={"workload": "llm-chat", "inputs": [
                    {"prompt": f"b{n}.{i}", "max_tokens": 8} for i in range(5)]})
                status = r.status_code
            elif kind == "get_job":
                mine = [j for j, k in jobs[-200:] if k == keys[ci]]
                r = await cl.get(f"/jobs/{mine[-1]}" if mine else "/account")
                status = r.status_code
            elif kind == "account":
                status = (await cl.get("/account")).status_code
            else:
                status = (await cl.get("/jobs?limit=20")).status_code
        except Exception:  # noqa: BLE001 - counted as status 0
            status = 0
        samples.append((started - t0, kind, time.monotonic() - started, status))

    n = 0
    interval = 1.0 / rate
    next_at = time.monotonic()
    while time.monotonic() < stop_at:
        n += 1
        task = asyncio.get_running_loop().create_task(one(rng.choice(kinds), n))
        pending.add(task)
        task.add_done_callback(pending.discard)
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    if pending:
        await asyncio.wait(pending, timeout=60)
    for cl in clients:
        await cl.aclose()


def window(samples: list, lo: float, hi: float) -> dict[str, Any]:
    part = [s for s in samples if lo <= s[0] < hi]
    lat = [s[2] for s in part if s[1] != "stream"]
    return {"ops": len(part), "ops_per_s": round(len(part) / max(1e-9, hi - lo), 2), "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99)}


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench soak")
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--rate", type=float, default=30.0, help="operations per second (open loop)")
    ap.add_argument("--window-s", type=float, default=60.0, help="first/last window compared")
    ap.add_argument("--warmup-s", type=float, default=60.0, help="memory is measured from the end of the warm-up")
    ap.add_argument("--cache-aggregates", type=int, default=1_000,
                    help="COORDINATOR_COMMIT_CACHE_AGGREGATES (default 200000 in production)")
    ap.add_argument("--projection-cache-rows", type=int, default=1_000,
                    help="COORDINATOR_PROJECTION_CACHE_ROWS (default 100000 in production)")
    ap.add_argument("--stream-retention-s", type=int, default=30,
                    help="COORDINATOR_STREAM_RETENTION_S (default 3600 in production)")
    args = ap.parse_args(argv)
    schema = f"soak_{uuid.uuid4().hex[:8]}"
    data_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    # The server's caches are bounded (aggregates, finished streams, idempotency answers) but large by
    # default; small bounds let them reach their steady size during the warm-up, so what grows after
    # it is a leak, not a cache filling up.
    env = coordinator_env(data_dir, args.store == "postgres", schema, COORDINATOR_PROJECTIONS="process",
                          COORDINATOR_COMMIT_CACHE_AGGREGATES=str(args.cache_aggregates),
                          COORDINATOR_STREAM_RETENTION_S=str(args.stream_retention_s),
                          COORDINATOR_PROJECTION_CACHE_ROWS=str(args.projection_cache_rows))
    keys = make_accounts(env, 4)
    owner = cli_json(env, "accounts", "create", "--email", "soak-owner@example.com", "--kyc")
    isl = cli_json(env, "islands", "create", "--owner", owner["account_id"], "--name", "soak", "--approve")
    port = free_port()
    proc = start_coordinator(env, port)
    agent = None
    try:
        wait_http(port, proc)
        url = f"http://127.0.0.1:{port}"
        agent = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "island", "run", "--server", url,
                                  "--token", isl["token"], "--backend", "echo", "--tokens-per-s", "400",
                                  "--reply-tokens", "16", "--slots", "32"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(2.0)
        samples: list[tuple[float, str, float, int]] = []
        lag: list[tuple[float, int]] = []
        rss: dict[str, int] = {}
        start = time.monotonic()
        stop_at = start + args.seconds

        def memory() -> dict[str, int]:
            kids = [c for c in children(proc.pid) if c != (agent.pid if agent else 0)]
            return {"server": rss_kb(proc.pid), "projector": sum(rss_kb(c) for c in kids)}

        async def monitor() -> None:
            warm = min(args.warmup_s, args.seconds / 5)
            await asyncio.sleep(warm)
            rss["start"] = memory()
            while time.monotonic() < stop_at:
                st = await asyncio.to_thread(cli_json, env, "projections", "status")
                lag.append((time.monotonic() - start, max(p["behind"] for p in st["projections"])))
                await asyncio.sleep(min(30.0, max(5.0, args.seconds / 20)))
            rss["end"] = memory()

        async def both() -> None:
            await asyncio.gather(run_load(url, keys, args.seconds, args.rate, args.window_s, samples, stop_at),
                                 monitor())

        asyncio.run(both())
        elapsed = time.monotonic() - start
    finally:
        if agent is not None:
            agent.send_signal(2)
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
        stop(proc)
        if args.store == "postgres":
            _drop_schema(schema)
    by_kind: dict[str, list[float]] = defaultdict(list)
    statuses: Counter = Counter()
    for _, kind, lat, status in samples:
        by_kind[kind].append(lat)
        statuses[status] += 1
    span = min(elapsed, args.seconds)  # operations are stamped by start; none start after `--seconds`
    w = min(args.window_s, span / 4)
    first, last = window(samples, 0, w), window(samples, span - w, span)
    start_kb = sum(rss.get("start", {}).values())
    end_kb = sum(rss.get("end", {}).values())
    growth = (end_kb - start_kb) / max(1, start_kb) * 100
    ok_statuses = {200, 201}
    result = {
        "bench": "soak", "store": args.store, "seconds": round(elapsed, 1), "rate_target": args.rate,
        "ops": len(samples), "ops_per_s": round(len(samples) / elapsed, 2),
        "latency_ms": {k: {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99)} for k, v in sorted(by_kind.items())},
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": sum(v for k, v in statuses.items() if k not in ok_statuses),
        "first_window": first, "last_window": last,
        "p99_ratio_last_over_first": round(last["p99_ms"] / first["p99_ms"], 2) if first["p99_ms"] else None,
        "throughput_ratio_last_over_first": round(last["ops_per_s"] / first["ops_per_s"], 2)
        if first["ops_per_s"] else None,
        "projection_lag_events": {"samples": len(lag), "max": max((b for _, b in lag), default=0),
                                  "last": lag[-1][1] if lag else None},
        "rss_kb": {"start": start_kb, "end": end_kb, **rss}, "rss_growth_pct": round(growth, 2),
        "rss_growth_ok": growth < 10.0, "cache_aggregates": args.cache_aggregates,
        "stream_retention_s": args.stream_retention_s, "projection_cache_rows": args.projection_cache_rows,
    }
    print(f"soak {args.store} {elapsed:.0f}s: {result['ops_per_s']} ops/s, errors {result['errors']}, "
          f"p99 last/first {result['p99_ratio_last_over_first']}, rss {rss} ({growth:+.1f}%)")
    return result
