"""POST /api/v1/jobs throughput and latency of one coordinator server process, against a
minimal Litestar handler that does no work (same server stack, same client, same run).

    python -m bench api [--seconds S] [--concurrency N] [--accounts N] [--postgres]

Each server runs as its own process (`coordinator serve`, uvicorn + uvloop + httptools;
the baseline is a one-handler Litestar app under the same uvicorn settings). The load
comes from another process: N keep-alive HTTP/1.1 connections, each sending one request
after the other (closed loop), through a small raw-socket client so that the client is
not the bottleneck. Jobs are admitted for real (validation, pricing, hold, JobSubmitted,
group commit) and stay queued (no Islands). Goal: >= 1,500 jobs/s with p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import percentile, ratio

GOAL_PER_S = 1_500
GOAL_P99_MS = 20.0
PG_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
JOB_BODY = b'{"workload":"llm-chat","input":{"prompt":"Summarise the plot of Hamlet in two lines.","max_tokens":256}}'


# ------------------------------------------------------------------ baseline app
def baseline_app():
    """A Litestar app whose POST /api/v1/jobs does no work (uvicorn --factory target)."""
    from litestar import Litestar, MediaType, Response, post

    @post("/api/v1/jobs", status_code=201, signature_namespace={"Response": Response})
    async def create() -> Response:
        return Response(content=b'{"data":{}}', status_code=201, media_type=MediaType.JSON)

    return Litestar([create], logging_config=None, openapi_config=None)


# ------------------------------------------------------------------ client (own process)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_request(path: str, body: bytes, key: str | None, port: int) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
            f"Content-Length: {len(body)}"]
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.find(b"content-length:")
    if i >= 0:
        j = lower.find(b"\r\n", i)
        await reader.readexactly(int(lower[i + 15:j]))
    return status


async def _load(port: int, requests: list[bytes], concurrency: int, warmup_s: float, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    t_start = time.perf_counter()
    measure_from = t_start + warmup_s
    stop_at = measure_from + seconds

    async def worker(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            writer.write(requests[(i + n * concurrency) % len(requests)])
            n += 1
            status = await _read_response(reader)
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)
                statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    ok = sum(v for k, v in statuses.items() if 200 <= k < 300)
    return {"requests": len(latencies), "ok": ok, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "per_s": round(ok / seconds, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 2) if latencies else None,
            "p99_ms": round(percentile(latencies, 99) * 1000, 2) if latencies else None}


def _client_main(port: int, requests: list[bytes], concurrency: int, warmup_s: float, seconds: float,
                 out: mp.Queue) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_load(port, requests, concurrency, warmup_s, seconds)))


def run_client(port: int, requests: list[bytes], concurrency: int, warmup_s: float, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_client_main, args=(port, requests, concurrency, warmup_s, seconds, out))
    proc.start()
    result = out.get(timeout=warmup_s + seconds + 120)
    proc.join(30)
    return result


# ------------------------------------------------------------------ servers
def wait_http(port: int, proc: subprocess.Popen, path: str = "/api/v1/health", timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def coordinator_env(data_dir: Path, postgres: bool, schema: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    env.update({"COORDINATOR_DATA_DIR": str(data_dir), "COORDINATOR_LOG_LEVEL": "warning",
                "COORDINATOR_LOG_FORMAT": "json", "COORDINATOR_RATE_LIMIT_PER_MIN": "1000000",
                "COORDINATOR_MAX_QUEUED_PER_ACCOUNT": "200000"})
    if postgres:
        env["COORDINATOR_DATABASE_URL"] = PG_URL
        env["COORDINATOR_DB_SCHEMA"] = schema
    env.update(extra)
    return env


def make_accounts(env: dict[str, str], n: int) -> list[str]:
    """Accounts with plenty of credits and an API key each, written before the server starts."""
    from api.keys import KeyStore
    from config.settings import Settings
    from coordinator.wiring import build

    c = build(Settings.from_env(env))
    keys = []
    try:
        for _ in range(n):
            account = uuid.uuid4()
            c.ledger.open_account(account, f"{account.hex[:10]}@bench.example", kyc_verified=True,
                                  initial_grant_micro=10**14)
            keys.append(KeyStore(c.committer, fresh_reads=False).issue(account, "bench")[0])
    finally:
        c.close()
    return keys


def start_coordinator(env: dict[str, str], port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL)


def start_baseline(port: int) -> subprocess.Popen:
    loop = "uvloop"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        loop = "asyncio"
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.api:baseline_app", "--factory", "--port",
                             str(port), "--loop", loop, "--http", "httptools", "--no-access-log", "--log-level",
                             "warning"], stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench api")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--accounts", type=int, default=32)
    p.add_argument("--postgres", action="store_true", help="PostgreSQL instead of the embedded SQLite store")
    args = p.parse_args(argv)

    # 1. baseline: a Litestar handler that does no work
    port = free_port()
    proc = start_baseline(port)
    try:
        wait_http(port, proc, path="/")
        base = run_client(port, [build_request("/api/v1/jobs", JOB_BODY, None, port)], args.concurrency,
                          args.warmup, args.seconds)
    finally:
        stop(proc)
    print(f"baseline (no-op Litestar handler): {base['per_s']:.0f}/s p50 {base['p50_ms']} ms p99 {base['p99_ms']} ms")

    # 2. the coordinator: read models kept by another machine's projector (the server process
    #    alone), then with the projector as a child process on this same 2-core machine.
    runs = {}
    for mode in ("external", "process"):
        schema = f"bench_api_{uuid.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory() as tmp:
            env = coordinator_env(Path(tmp), args.postgres, schema, COORDINATOR_PROJECTIONS=mode)
            keys = make_accounts(env, args.accounts)
            port = free_port()
            proc = start_coordinator(env, port)
            try:
                wait_http(port, proc)
                reqs = [build_request("/api/v1/jobs", JOB_BODY, k, port) for k in keys]
                runs[mode] = run_client(port, reqs, args.concurrency, args.warmup, args.seconds)
            finally:
                stop(proc)
                if args.postgres:
                    _drop_schema(schema)
        r = runs[mode]
        print(f"coordinator POST /jobs, projections={mode:<8}: {r['per_s']:.0f}/s p50 {r['p50_ms']} ms "
              f"p99 {r['p99_ms']} ms  statuses {r['statuses']}")
    coord, shared = runs["external"], runs["process"]
    return {"bench": "api", "store": "postgres" if args.postgres else "sqlite",
            "concurrency": args.concurrency, "seconds": args.seconds,
            "jobs_per_s": coord["per_s"], "p50_ms": coord["p50_ms"], "p99_ms": coord["p99_ms"],
            "statuses": coord["statuses"],
            "baseline_per_s": base["per_s"], "baseline_p50_ms": base["p50_ms"], "baseline_p99_ms": base["p99_ms"],
            "ratio_to_baseline": ratio(coord["per_s"], base["per_s"]),
            "with_projector_on_same_machine": {"jobs_per_s": shared["per_s"], "p50_ms": shared["p50_ms"],
                                               "p99_ms": shared["p99_ms"]},
            "goal": {"jobs_per_s": GOAL_PER_S, "p99_ms": GOAL_P99_MS},
            "goal_met": bool(coord["per_s"] >= GOAL_PER_S and (coord["p99_ms"] or 1e9) <= GOAL_P99_MS)}


def _drop_schema(schema: str) -> None:
    import psycopg

    from store.factory import parse_postgres_url

    p = parse_postgres_url(PG_URL)
    with psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                         user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

