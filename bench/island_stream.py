"""Coordinator-added latency from an Island's chunk to the SSE client, over NATS and over
the WebSocket channel side by side in one run, and assignments/s through JetStream.

    python -m bench island_stream [--streams 1,100,500] [--rate PER_STREAM_PER_S] [--seconds S]
                                  [--assign-islands 1000] [--assignments 20000]

One `coordinator serve` (embedded store, in-process broker, COORDINATOR_NATS_URL set: both
transports) and one nats-server (JetStream, generated authorization) started here on free
ports. For each transport and each stream count N: an Island process (a hand-driven Island:
WebSocket `accept` / `output`, or NATS `started` / `host.{id}.output` exactly as the
published agent sends them) takes N chat Jobs, then sends token chunks round robin at
`rate` per stream, each carrying its CLOCK_MONOTONIC send time; a client process holds N
SSE streams and subtracts the send time on arrival. So the figure is the whole
coordinator-added path: transport, the link's checks (sequence, ownership), the stream
broker, SSE. Baseline in the same run: a bare NATS subscriber on `host.*.output` (no
coordinator) reading the same chunks of the NATS phase.

Assignments/s: 1,000 Islands' durable consumers `host-{id}` on the `JOBS` stream; the
coordinator's assignment publish (AssignJob, `Nats-Msg-Id`, awaited PubAck, as
islandlink/nats.py `_assign`) from one connection, and the Islands' pull-and-ack from
another; the rate is assignments acked by the consumers per second (baseline: the same
messages on core NATS, no JetStream).
Goal: p50 <= 2 ms, p99 <= 10 ms at 500 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.api import coordinator_env, free_port, start_coordinator, stop, wait_http
from bench.stream import _clients_main, _summary, _uvloop

GOAL_P50_MS = 2.0
GOAL_P99_MS = 10.0
CHAT_MODELS = ["mistral-7b-instruct", "llama-3.1-8b-instruct", "qwen2.5-7b-instruct"]


# ------------------------------------------------------------------ the Islands (one process per phase)
async def _ws_island(url: str, token: str, n: int, accepted: Any, go: Any, rate: float, seconds: float) -> int:
    import websockets

    from protocol import island as p

    ws = await websockets.connect(p.ws_url(url), additional_headers={"Authorization": f"Bearer {token}"},
                                  max_size=32 * 1024 * 1024, open_timeout=30)
    await ws.send(p.encode(p.Hello(protocol=p.PROTOCOL_VERSION, agent="bench", capabilities=p.Capabilities(
        cargos=["llm-chat"], models=CHAT_MODELS, vram_mb=80_000, ram_mb=512_000, cpu_cores=64, hardware_tier=4,
        slots=1024))))
    jobs: list[str] = []

    async def reader() -> None:
        async for raw in ws:
            msg = p.decode_server(raw)
            if isinstance(msg, p.Offer) and len(jobs) < n:
                await ws.send(p.encode(p.Accept(job_id=msg.job_id)))
            elif isinstance(msg, p.Accepted):
                jobs.append(msg.job_id)
                if len(jobs) == n:
                    accepted.set()

    async def beats() -> None:
        seq = 0
        while True:
            seq += 1
            await ws.send(p.encode(p.Heartbeat(seq=seq, slots_total=1024, free_slots=1024 - len(jobs))))
            if jobs:
                await ws.send(p.encode(p.Renew(job_ids=list(jobs))))
            await asyncio.sleep(1.0)

    tasks = [asyncio.ensure_future(reader()), asyncio.ensure_future(beats())]
    await asyncio.to_thread(go.wait)
    sent = await _pace(jobs, rate, seconds, lambda job_id, seq, text: ws.send(p.encode(
        p.Output(job_id=job_id, seq=seq, tokens=[text]))))
    done, jobs[:] = list(jobs), []  # (no renewals for finished Jobs)
    for job_id in done:
        await ws.send(p.encode(p.Complete(job_id=job_id, usage={"prompt_tokens": 1, "completion_tokens": 1})))
    await asyncio.sleep(0.5)
    await ws.send(p.encode(p.Bye()))
    for t in tasks:
        t.cancel()
    await ws.close()
    return sent


async def _pace(jobs: list[str], rate: float, seconds: float, send: Any) -> int:
    seqs = dict.fromkeys(jobs, 0)
    interval = 1.0 / (rate * len(jobs))
    n, t0 = 0, time.monotonic()
    stop_at = t0 + seconds
    while True:
        now = time.monotonic()
        if now >= stop_at:
            return n
        due = int((now - t0) / interval) + 1
        while n < due:
            job_id = jobs[n % len(jobs)]
            seqs[job_id] += 1
            await send(job_id, seqs[job_id], f"t:{time.monotonic_ns()}")
            n += 1
        await asyncio.sleep(interval * 8)


async def _nats_island(url: str, host_id: str, n: int, accepted: Any, go: Any, rate: float, seconds: float) -> int:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    from protocol import nats as pn

    bare, user, password = pn.split_url(url)
    nc = await nats.connect(servers=[bare], user=user, password=password, name=f"island-{host_id[:8]}")
    js = nc.jetstream(timeout=10)
    name = pn.consumer_name(host_id)
    try:
        await js.consumer_info(pn.STREAM, name)
    except Exception:  # noqa: BLE001
        await js.add_consumer(pn.STREAM, ConsumerConfig(durable_name=name, name=name, ack_policy=AckPolicy.EXPLICIT,
                                                        filter_subject=pn.subject(host_id, "jobs"), max_deliver=5,
                                                        ack_wait=60.0))
    sub = await js.pull_subscribe_bind(durable=name, stream=pn.STREAM)
    jobs: list[str] = []

    def heartbeat() -> bytes:
        return pn.encode(pn.Heartbeat(host_id=host_id, status="online", active_jobs=len(jobs),
                                      timestamp=int(time.time() * 1000), agent_version="bench",
                                      gpus=[pn.GpuMetrics(memory_total_mb=80_000)],
                                      system=pn.SystemMetrics(memory_total_mb=512_000),
                                      performance_estimates=pn.PerformanceEstimates(
                                          estimated_llm_tok_s=150.0, max_concurrent_containers=1024,
                                          supported_runtimes=["container", "wasm"], nats_rtt_ms=0.5)))

    async def beats() -> None:
        while True:
            await nc.publish(pn.subject(host_id, "heartbeat"), heartbeat())
            for job_id in list(jobs):
                await nc.publish(pn.subject(host_id, "lease"), pn.encode(pn.LeaseRenewal(job_id=job_id,
                                                                                         extend_seconds=60)))
            await asyncio.sleep(1.0)

    async def fetch() -> None:
        while len(jobs) < n:
            try:
                msgs = await sub.fetch(200, timeout=1)
            except Exception:  # noqa: BLE001 - timeout: nothing yet
                continue
            for m in msgs:
                await m.ack()
                job = pn.decode_assign(m.data)
                if job.job_id in jobs:
                    continue
                await nc.publish(pn.subject(host_id, "status"), pn.encode(pn.JobStatus(
                    job_id=job.job_id, state="started", timestamp=int(time.time() * 1000))))
                jobs.append(job.job_id)
        await nc.flush()

    tasks = [asyncio.ensure_future(beats())]
    await fetch()
    await asyncio.sleep(1.0)  # the `started` statuses are applied
    accepted.set()
    await asyncio.to_thread(go.wait)
    sent = await _pace(jobs, rate, seconds, lambda job_id, seq, text: nc.publish(
        pn.subject(host_id, "output"), pn.encode(pn.JobOutput(job_id=job_id, seq=seq, chunk=text, is_final=False))))
    done, jobs[:] = list(jobs), []
    for job_id in done:
        await nc.publish(pn.subject(host_id, "status"), pn.encode(pn.JobStatus(job_id=job_id, state="succeeded",
                                                                               timestamp=0)))
    await nc.flush()
    for t in tasks:
        t.cancel()
    await nc.close()
    return sent


def _island_main(kind: str, args: tuple, out: mp.Queue) -> None:
    _uvloop()
    fn = _ws_island if kind == "ws" else _nats_island
    out.put(asyncio.run(fn(*args)))


# ------------------------------------------------------------------ bare NATS subscriber (baseline)
async def _bare(url: str, ready: Any, seconds: float, warmup_s: float) -> dict:
    import nats

    from protocol import nats as pn

    bare, user, password = pn.split_url(url)
    nc = await nats.connect(servers=[bare], user=user, password=password)
    lat: list[float] = []
    start_measure = time.monotonic() + warmup_s

    async def cb(msg: Any) -> None:
        now = time.monotonic_ns()
        i = msg.data.find(b'"t:')
        if i >= 0 and time.monotonic() >= start_measure:
            lat.append((now - int(msg.data[i + 3:msg.data.find(b'"', i + 3)])) / 1e6)

    await nc.subscribe("host.*.output", cb=cb)  # a plain subscriber beside the coordinators' queue group
    await nc.flush()
    ready.set()
    await asyncio.sleep(warmup_s + seconds + 1.0)
    await nc.close()
    return _summary(lat)


def _bare_main(url: str, ready: Any, seconds: float, warmup_s: float, out: mp.Queue) -> None:
    _uvloop()
    out.put(asyncio.run(_bare(url, ready, seconds, warmup_s)))


# ------------------------------------------------------------------ assignments/s through JetStream
async def _assign_rate(url: str, islands: int, total: int, concurrency: int) -> dict:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    from protocol import nats as pn

    bare, user, password = pn.split_url(url)
    pub = await nats.connect(servers=[bare], user=user, password=password)
    sub = await nats.connect(servers=[bare], user=user, password=password)
    js_pub, js_sub = pub.jetstream(timeout=30), sub.jetstream(timeout=30)
    hosts = [str(uuid.uuid4()) for _ in range(islands)]
    t = time.monotonic()
    for h in hosts:
        await js_sub.add_consumer(pn.STREAM, ConsumerConfig(
            durable_name=pn.consumer_name(h), name=pn.consumer_name(h), ack_policy=AckPolicy.EXPLICIT,
            filter_subject=pn.subject(h, "jobs"), max_deliver=5, ack_wait=60.0))
    setup_s = time.monotonic() - t
    subs = [await js_sub.pull_subscribe_bind(durable=pn.consumer_name(h), stream=pn.STREAM) for h in hosts]
    per = total // islands
    acked = 0
    done = asyncio.Event()

    async def consume(s: Any, want: int) -> None:
        nonlocal acked
        got = 0
        while got < want:
            try:
                msgs = await s.fetch(min(200, want - got), timeout=5)
            except Exception:  # noqa: BLE001
                continue
            for m in msgs:
                await m.ack()
                got += 1
            acked += len(msgs)
        if acked >= per * islands:
            done.set()

    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        h = hosts[i % islands]
        job_id = str(uuid.uuid4())
        data = pn.encode(pn.AssignJob(job_id=job_id, input={"prompt": "bench", "max_tokens": 16},
                                      lease_expires=int(time.time()) + 60, workload_id="llm-chat"))
        async with sem:
            await js_pub.publish(pn.subject(h, "jobs"), data, stream=pn.STREAM, headers={"Nats-Msg-Id": job_id})

    # 1. the coordinator's side: every assignment published and stored (PubAck awaited)
    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(per * islands)))
    published_s = time.monotonic() - t0
    # 2. the Islands' side: every consumer pulls and acks its assignments
    t1 = time.monotonic()
    consumers = [asyncio.ensure_future(consume(s, per)) for s in subs]
    await asyncio.wait_for(done.wait(), 600)
    acked_s = time.monotonic() - t1
    for c in consumers:
        c.cancel()
    # baseline: the same messages on core NATS to one subscriber (no stream, no consumer, no ack)
    got = 0
    base_done = asyncio.Event()

    async def cb(_msg: Any) -> None:
        nonlocal got
        got += 1
        if got >= per * islands:
            base_done.set()

    await sub.subscribe("bench.core.*", cb=cb)
    await sub.flush()
    t1 = time.monotonic()
    sample = pn.encode(pn.AssignJob(job_id=str(uuid.uuid4()), input={"prompt": "bench", "max_tokens": 16},
                                    lease_expires=int(time.time()) + 60, workload_id="llm-chat"))
    for i in range(per * islands):
        await pub.publish(f"bench.core.{i % islands}", sample)
    await pub.flush()
    await asyncio.wait_for(base_done.wait(), 120)
    core_s = time.monotonic() - t1
    for h in hosts:
        try:
            await js_sub.delete_consumer(pn.STREAM, pn.consumer_name(h))
        except Exception:  # noqa: BLE001
            pass
    await pub.close()
    await sub.close()
    n = per * islands
    return {"islands": islands, "assignments": n, "consumer_setup_s": round(setup_s, 2),
            "published_per_s": round(n / published_s), "pulled_and_acked_per_s": round(n / acked_s),
            "end_to_end_per_s": round(n / (published_s + acked_s)),
            "baseline_core_nats_per_s": round(n / core_s), "publish_concurrency": concurrency}


# ------------------------------------------------------------------ driver
def _register(env: dict[str, str], nats_dir: Path) -> tuple[list[str], str, str, str]:
    """Consumer keys, a WebSocket Island (token) and a NATS Island (paired, credential issued)."""
    from api.keys import KeyStore
    from config.settings import Settings
    from coordinator.wiring import build
    from protocol.island import make_token
    from protocol.nats import nats_user
    from scheduler.pairing import hash_password, make_password

    c = build(Settings.from_env(env))
    try:
        keys = []
        for _ in range(5):
            account = uuid.uuid4()
            c.ledger.open_account(account, f"{account.hex[:10]}@bench.example", kyc_verified=True,
                                  initial_grant_micro=10**14)
            keys.append(KeyStore(c.committer, fresh_reads=False).issue(account, "bench")[0])
        owner = uuid.uuid4()
        c.ledger.open_account(owner, "owner@bench.example", kyc_verified=True)
        ws_id = uuid.uuid4()
        token = make_token(ws_id)
        c.scheduler.register_island(owner, "ws", {}, approve=True, island_id=ws_id, token=token)
        host = uuid.uuid4()
        password = make_password()
        c.scheduler.pair_island(host, owner, "nats", {"cargos": ["llm-chat"], "models": CHAT_MODELS},
                                agent_version="bench", nats_user=nats_user(str(host)),
                                password_hash=hash_password(password), by="bench")
        c.scheduler.set_island_approval(host, True, by="bench", reason="bench")
    finally:
        c.close()
    return keys, token, str(host), password


def _phase(kind: str, n: int, port: int, keys: list[str], island_args: tuple, rate: float, seconds: float,
           warmup_s: float, bare_url: str | None) -> dict:
    import httpx

    ctx = mp.get_context("spawn")
    accepted, go, out_i, out_c = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Queue()
    island = ctx.Process(target=_island_main, args=(kind, (*island_args, n, accepted, go, rate, seconds + warmup_s),
                                                    out_i))
    island.start()
    time.sleep(2.0)  # connected and heartbeating
    paths = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30) as cl:
        for i in range(n):
            key = keys[i % len(keys)]
            r = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "bench", "max_tokens": 4096}},
                        headers={"Authorization": f"Bearer {key}"})
            r.raise_for_status()
            paths.append((f"/api/v1/jobs/{r.json()['data']['id']}/stream", key))
    if not accepted.wait(120):
        island.kill()
        raise RuntimeError(f"{kind}: the Island did not get {n} Jobs")
    bare = None
    if bare_url is not None:
        bready, out_b = ctx.Event(), ctx.Queue()
        bare = ctx.Process(target=_bare_main, args=(bare_url, bready, seconds, warmup_s, out_b))
        bare.start()
        bready.wait(30)
    client = ctx.Process(target=_clients_main, args=(port, paths, go, seconds, warmup_s, out_c))
    client.start()
    result = out_c.get(timeout=seconds + warmup_s + 240)
    sent = out_i.get(timeout=120)
    base = out_b.get(timeout=60) if bare is not None else None
    for p in (client, island, bare):
        if p is not None:
            p.join(30)
    result["sent"] = sent
    if base is not None:
        result["bare_nats"] = base
    return result


def main(argv: list[str]) -> dict:
    import shutil

    from islandlink import nats_auth

    NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"

    ap = argparse.ArgumentParser(prog="python -m bench island_stream")
    ap.add_argument("--streams", default="1,100,500")
    ap.add_argument("--rate", type=float, default=10.0, help="token chunks per second per stream")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--assign-islands", type=int, default=1000)
    ap.add_argument("--assignments", type=int, default=20_000)
    ap.add_argument("--assign-concurrency", type=int, default=256)
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.streams.split(",") if x and x != "0"]
    if not Path(NATS_SERVER).exists():
        print("nats-server is not installed (apt-get install nats-server)")
        return {"bench": "island_stream", "skipped": "nats-server not installed"}
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nats_dir = root / "nats"
        (nats_dir / "js").mkdir(parents=True)
        nport = free_port()
        coord_pw = uuid.uuid4().hex
        coord_url = f"nats://coordinator:{coord_pw}@127.0.0.1:{nport}"
        (nats_dir / "nats.conf").write_text(nats_auth.main_config(
            port=nport, store_dir=str(nats_dir / "js"), auth_file="auth.conf", pid_file=str(nats_dir / "nats.pid")))
        (nats_dir / "auth.conf").write_text(nats_auth.render(
            nats_auth.NatsUser("coordinator", nats_auth.stable_hash(coord_pw)),
            nats_auth.NatsUser("pairing", nats_auth.stable_hash("pairing")), []))
        nats_proc = subprocess.Popen([NATS_SERVER, "-c", str(nats_dir / "nats.conf")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        env = coordinator_env(root / "data", False, "", COORDINATOR_NATS_URL=coord_url,
                              COORDINATOR_NATS_DIR=str(nats_dir), COORDINATOR_PROJECTIONS="off",
                              COORDINATOR_LEASE_S="600", COORDINATOR_LEASE_RENEW_S="30",
                              COORDINATOR_ACK_TIMEOUT_S="30", COORDINATOR_MAX_QUEUED_PER_ACCOUNT="200000",
                              COORDINATOR_HEARTBEAT_S="1")
        keys, token, host, password = _register(env, nats_dir)
        port = free_port()
        proc = start_coordinator(env, port)
        rows: dict[str, dict[int, dict]] = {"websocket": {}, "nats": {}}
        assign: dict = {}
        try:
            wait_http(port, proc)
            time.sleep(2.5)  # the NATS link wrote the Island's user and reloaded the server
            island_url = f"nats://host-{host}:{password}@127.0.0.1:{nport}"
            for n in counts:
                rows["websocket"][n] = _phase("ws", n, port, keys, (f"http://127.0.0.1:{port}", token), args.rate,
                                              args.seconds, args.warmup, None)
                time.sleep(4.0)  # the idle Island is offline (3 missed 1 s heartbeats): Jobs go to the other
                rows["nats"][n] = _phase("nats", n, port, keys, (island_url, host), args.rate, args.seconds,
                                         args.warmup, coord_url)
                time.sleep(4.0)
                for t in ("websocket", "nats"):
                    r = rows[t][n]
                    print(f"{t:9s} {n:4d} streams: p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  max {r.get('max_ms')} "
                          f"ms  ({r['events']} events of {r['sent']} sent)", flush=True)
                b = rows["nats"][n].get("bare_nats", {})
                print(f"bare NATS {n:4d} streams: p50 {b.get('p50_ms')} ms  p99 {b.get('p99_ms')} ms", flush=True)
        finally:
            stop(proc)
        try:
            assign = asyncio.run(_assign_rate(coord_url, args.assign_islands, args.assignments,
                                              args.assign_concurrency))
            print(f"JetStream assignments to {assign['islands']} Islands: {assign['published_per_s']}/s published "
                  f"and stored, {assign['pulled_and_acked_per_s']}/s pulled and acked by the Islands' consumers; "
                  f"core NATS baseline {assign['baseline_core_nats_per_s']}/s")
        finally:
            nats_proc.terminate()
            nats_proc.wait(10)
    if not counts:
        return {"bench": "island_stream", "assignments": assign}
    top = max(counts)
    goal = all(rows[t][top]["p50_ms"] is not None and rows[t][top]["p50_ms"] <= GOAL_P50_MS
               and rows[t][top]["p99_ms"] <= GOAL_P99_MS for t in rows)
    return {"bench": "island_stream", "rate_per_stream_per_s": args.rate, "seconds": args.seconds,
            "latency": {t: {str(n): {k: v for k, v in r.items() if k != "bare_nats"} for n, r in rows[t].items()}
                        for t in rows},
            "baseline_bare_nats": {str(n): rows["nats"][n].get("bare_nats") for n in counts},
            "ratio_nats_to_ws_p50": {str(n): (round(rows["nats"][n]["p50_ms"] / rows["websocket"][n]["p50_ms"], 2)
                                              if rows["nats"][n]["p50_ms"] and rows["websocket"][n]["p50_ms"]
                                              else None) for n in counts},
            "assignments": assign, "goal": {"p50_ms": GOAL_P50_MS, "p99_ms": GOAL_P99_MS, "streams": top},
            "goal_met": goal}

