"""Coordinator-added streaming latency over Redis: an Island chunk published -> an SSE
client receives it, p50/p99, with many concurrent streams.

    python -m bench stream [--streams N] [--rate PER_STREAM_PER_S] [--seconds S]

Three processes besides Redis: the coordinator (`coordinator serve` with
COORDINATOR_REDIS_URL set), a publisher that publishes token chunks through the same
broker code the Island channel uses (`RedisStreamBroker.publish_token`, from its event
loop), and a client process holding N SSE connections (GET /api/v1/jobs/{id}/stream).
Each token carries the publisher's CLOCK_MONOTONIC time (shared by all processes on
Linux); the client subtracts it from its own clock when the event arrives. The baseline
is Redis itself: the same publisher, read by one bare PSUBSCRIBE client (no coordinator).
Goal: p50 <= 2 ms, p99 <= 10 ms with 500 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import tempfile
import time
import uuid
from pathlib import Path

from bench.api import coordinator_env, free_port, make_accounts, start_coordinator, stop, wait_http
from bench.common import percentile

GOAL_P50_MS = 2.0
GOAL_P99_MS = 10.0
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def _uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


# ------------------------------------------------------------------ publisher process
async def _publish(prefix: str, job_ids: list[str], rate: float, seconds: float, start: mp.Event) -> int:
    from streams.redis import RedisStreamBroker

    broker = RedisStreamBroker(REDIS_URL, prefix=prefix, retention_s=600, live_ttl_s=600, max_events=100_000)
    await broker.start()
    await asyncio.to_thread(start.wait)
    interval = 1.0 / (rate * len(job_ids))  # one chunk every `interval`, round robin over the streams
    n = 0
    t0 = time.monotonic()
    stop_at = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= stop_at:
            break
        due = int((now - t0) / interval) + 1
        while n < due:
            broker.publish_token(job_ids[n % len(job_ids)], f"t:{time.monotonic_ns()}")
            n += 1
        await asyncio.sleep(interval * 8)
    await broker.flush()
    await broker.close()
    return n


def _publisher_main(prefix: str, job_ids: list[str], rate: float, seconds: float, start: mp.Event,
                    out: mp.Queue) -> None:
    _uvloop()
    out.put(asyncio.run(_publish(prefix, job_ids, rate, seconds, start)))


# ------------------------------------------------------------------ SSE client process
async def _sse_clients(port: int, paths: list[tuple[str, str]], ready: mp.Event, seconds: float,
                       warmup_s: float) -> dict:
    import msgspec

    latencies: list[float] = []
    connected = 0
    all_connected = asyncio.Event()
    t_measure: list[float] = []
    decoder = msgspec.json.Decoder()

    async def one(path: str, key: str) -> None:
        nonlocal connected
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     f"Accept: text/event-stream\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        buf = b""
        first = True
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            now = time.monotonic_ns()
            buf += chunk
            while b"\n\n" in buf:
                frame, buf = buf.split(b"\n\n", 1)
                i = frame.find(b"data: ")
                if i < 0:
                    continue
                event = decoder.decode(frame[i + 6:].split(b"\n", 1)[0])
                if first:
                    first = False
                    connected += 1
                    if connected == len(paths):
                        all_connected.set()
                if event.get("type") == "token":
                    sent = int(event["content"][2:])
                    if t_measure and time.monotonic() >= t_measure[0]:
                        latencies.append((now - sent) / 1e6)

    tasks = [asyncio.ensure_future(one(p, k)) for p, k in paths]
    await asyncio.wait_for(all_connected.wait(), 120)
    t_measure.append(time.monotonic() + warmup_s)
    ready.set()
    await asyncio.sleep(warmup_s + seconds + 1.0)
    for t in tasks:
        t.cancel()
    return _summary(latencies)


def _summary(latencies: list[float]) -> dict:
    if not latencies:
        return {"events": 0, "p50_ms": None, "p99_ms": None}
    return {"events": len(latencies), "p50_ms": round(percentile(latencies, 50), 3),
            "p99_ms": round(percentile(latencies, 99), 3), "max_ms": round(max(latencies), 3)}


def _clients_main(port: int, paths: list[tuple[str, str]], ready: mp.Event, seconds: float, warmup_s: float,
                  out: mp.Queue) -> None:
    _uvloop()
    out.put(asyncio.run(_sse_clients(port, paths, ready, seconds, warmup_s)))


# ------------------------------------------------------------------ baseline: bare Redis subscriber
async def _bare_reader(prefix: str, job_ids: list[str], ready: mp.Event, seconds: float, warmup_s: float) -> dict:
    """The same notifications read straight from Redis (one PSUBSCRIBE, no coordinator):
    the latency of the publisher, Redis and this machine's scheduling alone."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(REDIS_URL)
    ps = r.pubsub()
    await ps.psubscribe(f"{prefix}ch:*")
    latencies: list[float] = []
    start_measure = time.monotonic() + warmup_s
    ready.set()
    stop_at = start_measure + seconds + 1.0
    while time.monotonic() < stop_at:
        msg = await ps.get_message(timeout=0.2)
        if msg is None or msg["type"] != "pmessage":
            continue
        now = time.monotonic_ns()
        data = msg["data"]
        i = data.find(b'"t:')
        if i >= 0 and time.monotonic() >= start_measure:
            latencies.append((now - int(data[i + 3:data.find(b'"', i + 3)])) / 1e6)
    await ps.aclose()
    await r.aclose()
    return _summary(latencies)


def _bare_main(prefix: str, job_ids: list[str], ready: mp.Event, seconds: float, warmup_s: float,
               out: mp.Queue) -> None:
    _uvloop()
    out.put(asyncio.run(_bare_reader(prefix, job_ids, ready, seconds, warmup_s)))


def _run_pair(reader_target, reader_args: tuple, prefix: str, job_ids: list[str], rate: float, seconds: float,
              warmup_s: float) -> tuple[dict, int]:
    ctx = mp.get_context("spawn")
    ready, out_r, out_p = ctx.Event(), ctx.Queue(), ctx.Queue()
    reader = ctx.Process(target=reader_target, args=(*reader_args, ready, seconds, warmup_s, out_r))
    reader.start()
    pub = ctx.Process(target=_publisher_main, args=(prefix, job_ids, rate, seconds + warmup_s, ready, out_p))
    pub.start()
    published = out_p.get(timeout=seconds + warmup_s + 180)
    result = out_r.get(timeout=seconds + warmup_s + 180)
    pub.join(30)
    reader.join(30)
    return result, published


def _cleanup(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.close()


def main(argv: list[str]) -> dict:
    import httpx

    p = argparse.ArgumentParser(prog="python -m bench stream")
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--rate", type=float, default=10.0, help="token chunks per second per stream")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args(argv)
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001 - say why instead of a traceback
        print(f"Redis unreachable at {REDIS_URL} ({exc!r}): set BENCH_REDIS_URL or run scripts/services.sh")
        return {"bench": "stream", "skipped": f"Redis unreachable at {REDIS_URL}"}
    prefix = f"bench{uuid.uuid4().hex[:8]}:"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = coordinator_env(Path(tmp), False, "", COORDINATOR_REDIS_URL=REDIS_URL,
                                  COORDINATOR_REDIS_PREFIX=prefix, COORDINATOR_PROJECTIONS="off")
            keys = make_accounts(env, 5)
            port = free_port()
            proc = start_coordinator(env, port)
            try:
                wait_http(port, proc)
                job_ids: list[str] = []
                paths: list[tuple[str, str]] = []
                with httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30) as cl:
                    for i in range(args.streams):
                        key = keys[i % len(keys)]
                        r = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "bench"}},
                                    headers={"Authorization": f"Bearer {key}"})
                        r.raise_for_status()
                        job_ids.append(r.json()["data"]["id"])
                        paths.append((f"/api/v1/jobs/{job_ids[-1]}/stream", key))
                coord, published = _run_pair(_clients_main, (port, paths), prefix, job_ids, args.rate, args.seconds,
                                             args.warmup)
            finally:
                stop(proc)
        base, _ = _run_pair(_bare_main, (prefix, job_ids), prefix, job_ids, args.rate, args.seconds, args.warmup)
    finally:
        _cleanup(prefix)
    print(f"bare Redis subscriber:   p50 {base['p50_ms']} ms  p99 {base['p99_ms']} ms  ({base['events']} events)")
    print(f"coordinator SSE, {args.streams} streams: p50 {coord['p50_ms']} ms  p99 {coord['p99_ms']} ms  "
          f"max {coord.get('max_ms')} ms  ({coord['events']} events of {published} published)")
    return {"bench": "stream", "streams": args.streams, "rate_per_stream_per_s": args.rate,
            "events_per_s": round(args.streams * args.rate), "seconds": args.seconds,
            "events_measured": coord["events"], "p50_ms": coord["p50_ms"], "p99_ms": coord["p99_ms"],
            "max_ms": coord.get("max_ms"), "baseline_redis_p50_ms": base["p50_ms"],
            "baseline_redis_p99_ms": base["p99_ms"],
            "goal": {"p50_ms": GOAL_P50_MS, "p99_ms": GOAL_P99_MS},
            "goal_met": bool(coord["p50_ms"] is not None and coord["p50_ms"] <= GOAL_P50_MS
                             and coord["p99_ms"] <= GOAL_P99_MS)}
