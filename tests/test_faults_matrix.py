"""The fault matrix (issue #16, deliverable 2): real `coordinator serve` processes, real
reference Island agents, real PostgreSQL and Redis (throwaway servers where a case stops them).
Every case ends with `coordinator ledger verify` clean, every admitted Job terminal (or
re-queued, then run) within its lease, and the consumer's credits conserved
(spendable + spent == granted, nothing held). docs/RELIABILITY.md has the table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from decimal import Decimal

import httpx
import pytest

from tests.api_harness import ServerProcess, make_backend
from tests.fault_harness import ROOT, ThrowawayPostgres, ThrowawayRedis, books_clean, cli, cli_json, free_port, until
from tests.fault_load import TERMINAL, Load, account, wait_settled

BACKENDS = ["embedded", pytest.param("pg_redis", marks=[pytest.mark.postgres, pytest.mark.redis])]
GRANT = "1000"
FAST = {"COORDINATOR_LEASE_S": "4", "COORDINATOR_LEASE_RENEW_S": "1", "COORDINATOR_ACK_TIMEOUT_S": "3",
        "COORDINATOR_HEARTBEAT_S": "1", "COORDINATOR_QUEUE_TIMEOUT_S": "60", "COORDINATOR_RATE_LIMIT_PER_MIN": "100000",
        "COORDINATOR_SHUTDOWN_GRACE_S": "10", "COORDINATOR_PROJECTIONS": "process"}


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    b = make_backend(request.param, tmp_path)
    yield b
    b.cleanup()


def agent(env: dict[str, str], url: str, token: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "island", "run", "--server", url, "--token",
                             token, "--backend", "echo", "--tokens-per-s", "40", "--reply-tokens", "12",
                             "--slots", "8", *extra], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def conserved(url: str, key: str, start: Decimal) -> None:
    """Nothing held once every Job is terminal, and spendable + spent is what the account
    could spend at the start (the grant plus the free tier): no credit created or lost."""
    acct = account(url, key)
    assert Decimal(str(acct["held"])) == 0, acct
    assert Decimal(str(acct["credits"])) + Decimal(str(acct["spent"])) == start, acct


def spendable(url: str, key: str) -> Decimal:
    acct = account(url, key)
    return Decimal(str(acct["credits"])) + Decimal(str(acct["spent"])) + Decimal(str(acct["held"]))


def setup_world(env: dict[str, str]) -> tuple[dict, dict]:
    made = cli_json(env, "accounts", "create", "--email", f"m{time.monotonic_ns()}@example.com", "--credits", GRANT,
                    "--kyc")
    isl = cli_json(env, "islands", "create", "--owner", made["account_id"], "--name", "matrix", "--approve")
    return made, isl


# ------------------------------------------------------------------ kill -9 of the serving process
@pytest.mark.slow
def test_kill9_of_serve_under_load_then_restart(backend):
    env = backend.env(**FAST)
    made, isl = setup_world(env)
    port = free_port()
    server = ServerProcess(env, port=port)
    url = server.url
    island = agent(env, url, isl["token"])
    start = spendable(url, made["api_key"])
    load = Load(lambda: url, made["api_key"], workers=6).start()
    try:
        until(lambda: len(load.admitted) >= 15, 60)
        os.kill(server.proc.pid, signal.SIGKILL)  # submits and streams in flight
        server.wait(10)
        killed_at = time.monotonic()
        time.sleep(1.0)
        t0 = time.monotonic()
        server = ServerProcess(env, port=port)
        restart_s = time.monotonic() - killed_at
        print("startup_s", round(time.monotonic() - t0, 2), [l[:160] for l in server.lines[:6]])
        until(lambda: len(load.admitted) >= 30, 60)  # the load goes on against the new process
    finally:
        load.stop()
    try:
        statuses = wait_settled(url, made["api_key"], load.admitted, 60)
        stuck = {j: s for j, s in statuses.items() if s not in TERMINAL}
        assert not stuck, stuck
        assert not load.bad, load.bad[:5]
        conserved(url, made["api_key"], start)
        print(f"kill9_serve restart_s={restart_s:.2f} admitted={len(load.admitted)} statuses={dict(load.statuses)} "
              f"errors={dict(load.errors)} outcomes={_count(statuses)}")
    finally:
        stop(island)
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    books_clean(env)


def _count(statuses: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses.values():
        out[s] = out.get(s, 0) + 1
    return out


# ------------------------------------------------------------------ SIGTERM with work in flight
@pytest.mark.slow
def test_sigterm_with_streams_chat_completions_and_queued_jobs_drains_in_time(backend):
    import threading

    env = backend.env(**FAST)
    made, isl = setup_world(env)
    port = free_port()
    server = ServerProcess(env, port=port)
    url, key = server.url, made["api_key"]
    island = agent(env, url, isl["token"], "--tokens-per-s", "4", "--reply-tokens", "40", "--slots", "2")
    start = spendable(url, key)
    h = {"Authorization": f"Bearer {key}"}
    outcomes: dict[str, object] = {}
    until(lambda: httpx.get(url + "/api/v1/islands", headers=h).json()["data"][0]["online"] if
          httpx.get(url + "/api/v1/islands", headers=h).json()["data"] else False, 30)

    def chat(name: str, stream: bool) -> None:
        try:
            with httpx.Client(base_url=url, timeout=60, headers=h) as cl:
                body = {"model": "llm-chat", "messages": [{"role": "user", "content": name}], "stream": stream}
                if stream:
                    with cl.stream("POST", "/v1/chat/completions", json=body) as r:
                        outcomes[name] = (r.status_code, "".join(r.iter_text())[-300:])
                else:
                    r = cl.post("/v1/chat/completions", json=body)
                    outcomes[name] = (r.status_code, r.headers.get("retry-after"), r.text[:300])
        except httpx.HTTPError as exc:
            outcomes[name] = exc

    def sse(job_id: str) -> None:
        try:
            with httpx.Client(base_url=url + "/api/v1", timeout=60, headers=h) as cl:
                with cl.stream("GET", f"/jobs/{job_id}/stream") as r:
                    outcomes[job_id] = (r.status_code, sum(1 for _ in r.iter_lines()))
        except httpx.HTTPError as exc:
            outcomes[job_id] = exc

    with httpx.Client(base_url=url + "/api/v1", timeout=30, headers=h) as cl:
        jobs = [cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": f"q{i}"}}).json()["data"]["id"]
                for i in range(4)]  # 2 run, 2 wait in the queue
    threads = [threading.Thread(target=sse, args=(j,), daemon=True) for j in jobs]
    threads += [threading.Thread(target=chat, args=("plain", False), daemon=True),
                threading.Thread(target=chat, args=("streamed", True), daemon=True)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    code = server.wait(60)
    stop_s = time.monotonic() - t0
    for t in threads:
        t.join(15)
    log_text = "".join(server.lines)
    assert code == 0, log_text[-3000:]
    assert stop_s < int(FAST["COORDINATOR_SHUTDOWN_GRACE_S"]) + 5, stop_s
    assert "Traceback" not in log_text and "CancelledError" not in log_text, log_text[-3000:]
    plain = outcomes["plain"]
    assert isinstance(plain, tuple) and plain[0] in (200, 503), plain
    if plain[0] == 503:
        assert plain[1] and "shutting_down" in plain[2], plain
    assert all(j in outcomes for j in jobs), outcomes  # every SSE stream was ended by the drain
    server = ServerProcess(env, port=port)  # what was in flight is finished, re-queued or refunded
    try:
        statuses = wait_settled(server.url, key, jobs, 90)
        assert all(s in TERMINAL for s in statuses.values()), statuses
        all_jobs = httpx.get(server.url + "/api/v1/jobs?limit=100", headers=h).json()["data"]
        live = [j["id"] for j in all_jobs if j["status"] not in TERMINAL]
        wait_settled(server.url, key, live, 60)
        conserved(server.url, key, start)
        print(f"sigterm stop_s={stop_s:.2f} plain={plain[0]} jobs={statuses}")
    finally:
        stop(island)
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    books_clean(env)


# ------------------------------------------------------------------ stores unreachable at start
def _serve_once(env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "serve", "--port", "0"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.postgres
def test_postgres_unreachable_at_start_is_a_clear_refusal(tmp_path):
    env = make_backend("embedded", tmp_path).env(COORDINATOR_DATABASE_URL=f"postgresql://postgres@127.0.0.1:"
                                                                          f"{free_port()}/test")
    t0 = time.monotonic()
    out = _serve_once(env)
    assert out.returncode != 0
    assert "cannot open the event store" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert time.monotonic() - t0 < 30
    print(f"pg_down_at_start exit={out.returncode} s={time.monotonic() - t0:.1f} msg={out.stderr.strip()[:160]}")


@pytest.mark.redis
def test_redis_unreachable_at_start_is_a_clear_refusal(tmp_path):
    env = make_backend("embedded", tmp_path).env(COORDINATOR_REDIS_URL=f"redis://:pw-secret@127.0.0.1:{free_port()}/0")
    out = _serve_once(env)
    assert out.returncode == 1
    assert "cannot reach Redis" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "pw-secret" not in out.stderr


def test_sqlite_locked_by_another_process_is_a_clear_error_and_the_store_survives(tmp_path):
    """Another process holds an exclusive lock on events.sqlite: writes answer 503 with
    Retry-After after the lock timeout (never 500), the server goes on once the lock is
    released, and the store verifies clean."""
    import sqlite3

    backend = make_backend("embedded", tmp_path)
    env = backend.env(**{**FAST, "COORDINATOR_PROJECTIONS": "thread"})
    made, _ = setup_world(env)
    server = ServerProcess(env)
    key = made["api_key"]
    h = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=server.url + "/api/v1", timeout=60, headers=h) as cl:
            assert cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "before"}}).status_code == 201
            holder = sqlite3.connect(backend.store.data_dir / "events.sqlite", timeout=1, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            t0 = time.monotonic()
            r = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "during"}})
            waited_s = time.monotonic() - t0
            holder.execute("ROLLBACK")
            holder.close()
            assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
            assert r.json()["error"]["code"] == "database_unavailable"
            after = until(lambda: (x := cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "after"}}))
                          .status_code == 201 and x, 30)
            assert after
            print(f"sqlite_locked status={r.status_code} waited_s={waited_s:.1f}")
    finally:
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    books_clean(env)


# ------------------------------------------------------------------ PostgreSQL restarted mid-run
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_postgres_restarted_mid_run_503_with_retry_after_then_recovers(tmp_path):
    import uuid

    from tests.api_harness import redis_cleanup
    from tests.conftest import REDIS_URL, require_redis

    require_redis()
    pg = ThrowawayPostgres(tmp_path / "pg")
    pg.start()
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    env = make_backend("embedded", tmp_path).env(**FAST, COORDINATOR_DATABASE_URL=pg.url,
                                                 COORDINATOR_DB_SCHEMA="matrix", COORDINATOR_REDIS_URL=REDIS_URL,
                                                 COORDINATOR_REDIS_PREFIX=prefix)
    island = None
    try:
        made, isl = setup_world(env)
        server = ServerProcess(env)
        url, key = server.url, made["api_key"]
        island = agent(env, url, isl["token"])
        start = spendable(url, key)
        load = Load(lambda: url, key, workers=4).start()
        try:
            until(lambda: len(load.admitted) >= 10, 60)
            pg.stop("immediate")
            down_at = time.monotonic()
            during: dict[int, int] = {}
            first_503_s = None
            while time.monotonic() - down_at < 10.0:  # fresh requests while it is down (room for a loaded machine)
                try:
                    r = httpx.post(url + "/api/v1/jobs", headers={"Authorization": f"Bearer {key}"}, timeout=3,
                                   json={"workload": "llm-chat", "input": {"prompt": "while down"}})
                    during[r.status_code] = during.get(r.status_code, 0) + 1
                    if r.status_code == 503:
                        assert r.headers.get("retry-after"), r.headers
                        first_503_s = first_503_s or time.monotonic() - down_at
                    assert r.status_code in (201, 503), (r.status_code, r.text)
                    if r.status_code == 201:
                        load.admitted.append(r.json()["data"]["id"])
                except httpx.TimeoutException:
                    during[0] = during.get(0, 0) + 1
                time.sleep(0.2)
            pg.start()
            up_at = time.monotonic()
            n = len(load.admitted)
            until(lambda: len(load.admitted) >= n + 5, 60)  # admissions resume by themselves
            recovered_s = time.monotonic() - up_at
        finally:
            load.stop()
        assert not load.bad, load.bad[:5]
        assert during.get(503, 0) > 0, during  # the outage was seen, as 503 + Retry-After
        statuses = wait_settled(url, key, load.admitted, 90)
        stuck = {j: s for j, s in statuses.items() if s not in TERMINAL}
        assert not stuck, stuck  # nothing admitted was lost
        conserved(url, key, start)
        print(f"pg_restart down_s={up_at - down_at:.1f} first_503_s={first_503_s} recovered_s={recovered_s:.2f} "
              f"during={during} "
              f"admitted={len(load.admitted)} errors={dict(load.errors)} outcomes={_count(statuses)}")
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
        books_clean(env)
    finally:
        if island is not None:
            stop(island)
        pg.close()
        redis_cleanup(prefix)


# ------------------------------------------------------------------ Redis restarted mid-run
@pytest.mark.postgres
@pytest.mark.slow
def test_redis_restarted_mid_run_503_with_retry_after_then_recovers(tmp_path):
    """Redis (the broker, the rate limiter, idempotency, the Island bus) goes away for a few
    seconds: requests answer 503 with Retry-After (never 500), admissions resume by themselves
    when it is back, and every admitted Job settles."""
    from tests.conftest import drop_schema, make_store

    store = make_store("postgres", tmp_path)
    rd = ThrowawayRedis(tmp_path / "redis")
    rd.start()
    from tests.conftest import env_for

    env = env_for(store, **{**FAST, "COORDINATOR_QUEUE_TIMEOUT_S": "20"}, COORDINATOR_REDIS_URL=rd.url,
                  COORDINATOR_REDIS_PREFIX="m:", COORDINATOR_LOG_LEVEL="warning")
    island = None
    try:
        made, isl = setup_world(env)
        server = ServerProcess(env)
        url, key = server.url, made["api_key"]
        island = agent(env, url, isl["token"])
        start = spendable(url, key)
        load = Load(lambda: url, key, workers=4).start()
        try:
            until(lambda: len(load.admitted) >= 10, 60)
            rd.stop()
            down_at = time.monotonic()
            during: dict[int, int] = {}
            while time.monotonic() - down_at < 4.0:
                try:
                    r = httpx.get(url + "/api/v1/account", headers={"Authorization": f"Bearer {key}"}, timeout=3)
                    during[r.status_code] = during.get(r.status_code, 0) + 1
                    assert r.status_code in (200, 503), (r.status_code, r.text)
                    if r.status_code == 503:
                        assert r.headers.get("retry-after")
                except httpx.TimeoutException:
                    during[0] = during.get(0, 0) + 1
                time.sleep(0.2)
            rd.start()
            up_at = time.monotonic()
            n = len(load.admitted)
            until(lambda: len(load.admitted) >= n + 5, 60)
            recovered_s = time.monotonic() - up_at
        finally:
            load.stop()
        assert not load.bad, load.bad[:5]
        assert during.get(503, 0) > 0, during
        statuses = wait_settled(url, key, load.admitted, 90)
        stuck = {j: s for j, s in statuses.items() if s not in TERMINAL}
        assert not stuck, stuck
        conserved(url, key, start)
        print(f"redis_restart recovered_s={recovered_s:.2f} during={during} admitted={len(load.admitted)} "
              f"errors={dict(load.errors)} outcomes={_count(statuses)}")
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
        books_clean(env)
    finally:
        if island is not None:
            stop(island)
        rd.close()
        drop_schema(store.schema)


# ------------------------------------------------------------------ SQLite: disk full, read-only
class Tmpfs:
    """A size-limited tmpfs (root only): the embedded store's data directory."""

    def __init__(self, path, size_kb: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}): disk-full case not run")

    def remount(self, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(self.path)], check=True)

    def fill(self) -> None:
        """Fill every free byte (a file of zeros until ENOSPC)."""
        with open(self.path / "ballast", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    def unfill(self) -> None:
        (self.path / "ballast").unlink(missing_ok=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    fs = Tmpfs(tmp_path / "small", 8 * 1024)
    yield fs
    fs.close()


@pytest.mark.slow
def test_sqlite_disk_full_is_a_clear_error_and_the_store_survives(tmpfs, tmp_path):
    from tests.conftest import env_for
    from store.factory import StoreConfig

    env = env_for(StoreConfig(database_url=None, data_dir=tmpfs.path / "data"),
                  **{**FAST, "COORDINATOR_PROJECTIONS": "thread"})
    made, _ = setup_world(env)
    server = ServerProcess(env)
    key = made["api_key"]
    try:
        with httpx.Client(base_url=server.url + "/api/v1", timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as cl:
            ok = [cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": f"a{i}"}}) for i in range(5)]
            assert all(r.status_code == 201 for r in ok)
            tmpfs.fill()
            full = [cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "x" * 20_000}})
                    for _ in range(20)]
            codes = sorted({r.status_code for r in full})
            assert all(c in (201, 503) for c in codes), [(r.status_code, r.text[:200]) for r in full]
            refused = [r for r in full if r.status_code == 503]
            assert refused, "the disk never filled"
            assert all(r.headers.get("retry-after") and r.json()["error"]["code"] == "database_unavailable"
                       for r in refused)
            tmpfs.unfill()
            after = until(lambda: (x := cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "b"}}))
                          .status_code == 201 and x, 30)
            assert after
            print(f"disk_full codes={codes} refused={len(refused)}")
    finally:
        server.signal(signal.SIGTERM)
        code = server.wait(30)
    assert code == 0, "".join(server.lines)[-2000:]
    books_clean(env)
    out = cli(env, "projections", "verify", check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sqlite_read_only_store_is_a_clear_refusal_and_stays_intact(tmpfs):
    from tests.conftest import env_for
    from store.factory import StoreConfig

    env = env_for(StoreConfig(database_url=None, data_dir=tmpfs.path / "data"),
                  **{**FAST, "COORDINATOR_PROJECTIONS": "thread"})
    made, _ = setup_world(env)
    before = books_clean(env)
    tmpfs.remount("ro")
    try:
        out = _serve_once(env, timeout_s=60)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        assert "read-only" in out.stderr or "readonly" in out.stderr, out.stderr[-1000:]
        print(f"read_only exit={out.returncode} msg={out.stderr.strip().splitlines()[-1][:200]}")
    finally:
        tmpfs.remount("rw")
    after = books_clean(env)
    assert after["heads_digest"] == before["heads_digest"]


# ------------------------------------------------------------------ 100 Islands killed at once
N_SWARM = 100


@pytest.mark.slow
def test_kill9_of_100_islands_at_once(backend, tmp_path):
    env = backend.env(**FAST, COORDINATOR_AUTO_APPROVE_ISLANDS="true")
    made, _ = setup_world(env)
    server = ServerProcess(env)
    url, key = server.url, made["api_key"]
    h = {"Authorization": f"Bearer {key}"}
    start = spendable(url, key)
    with httpx.Client(base_url=url + "/api/v1", timeout=30, headers=h) as cl:
        tokens = [cl.post("/islands", json={"name": f"swarm-{i}"}).json()["token"] for i in range(N_SWARM)]
    (tmp_path / "tokens").write_text("\n".join(tokens))
    swarm = subprocess.Popen([sys.executable, "-m", "tests.island_swarm", url, str(tmp_path / "tokens")], env=env,
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    rescuer = None
    try:
        assert swarm.stdout.readline().startswith(f"ready {N_SWARM}")

        def online() -> int:
            return sum(1 for i in httpx.get(url + "/api/v1/islands", headers=h, timeout=30).json()["data"]
                       if i["online"])

        until(lambda: online() == N_SWARM, 60)
        with httpx.Client(base_url=url + "/api/v1", timeout=30, headers=h) as cl:
            jobs = [cl.post("/jobs", json={"workload": "llm-chat-lite", "input": {"prompt": f"s{i}",
                                                                                 "max_tokens": 64}}).json()["data"]["id"]
                    for i in range(N_SWARM)]

        seen: list[dict] = []

        def running() -> int:
            from tests.fault_load import job_statuses

            seen.append(_count(job_statuses(url, key, jobs)))
            return seen[-1].get("running", 0)

        try:
            until(lambda: running() >= N_SWARM * 0.8, 60, 0.5)
        except AssertionError:
            raise AssertionError(f"jobs never ran on the swarm: {seen[-3:]}") from None
        swarm.kill()  # every socket drops at once
        swarm.wait(10)
        killed_at = time.monotonic()
        until(lambda: online() == 0, 60)
        offline_s = time.monotonic() - killed_at

        def released() -> bool:
            from tests.fault_load import job_statuses

            return all(s in TERMINAL or s == "queued" for s in job_statuses(url, key, jobs).values())

        until(released, 60)
        released_s = time.monotonic() - killed_at
        from tests.fault_load import job_statuses

        after_kill = _count(job_statuses(url, key, jobs))
        isl = cli_json(env, "islands", "create", "--owner", made["account_id"], "--name", "rescuer", "--approve")
        rescuer = agent(env, url, isl["token"], "--slots", "16", "--tokens-per-s", "500")
        statuses = wait_settled(url, key, jobs, 120)
        assert all(s in TERMINAL for s in statuses.values()), _count(statuses)
        conserved(url, key, start)
        lease_s = int(FAST["COORDINATOR_LEASE_S"])
        assert released_s < lease_s + 10, released_s
        print(f"swarm_kill offline_s={offline_s:.2f} released_s={released_s:.2f} after_kill={after_kill} "
              f"final={_count(statuses)}")
    finally:
        if swarm.poll() is None:
            swarm.kill()
        if rescuer is not None:
            stop(rescuer)
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    books_clean(env)


# ------------------------------------------------------------------ two processes, the leader killed
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_kill9_of_the_dispatch_leader_under_load_the_other_takes_over(tmp_path):
    from collections import defaultdict

    from scheduler.jobs import Job
    from store.factory import iter_log, open_app

    backend = make_backend("pg_redis", tmp_path)
    env = backend.env(**FAST)
    try:
        made, isl = setup_world(env)
        a = ServerProcess(env)
        until(lambda: any('"dispatch_leader_acquired"' in line for line in a.lines), 30)
        b = ServerProcess(env)
        assert not any('"dispatch_leader_acquired"' in line for line in b.lines)
        url, key = b.url, made["api_key"]
        island = agent(env, url, isl["token"], "--tokens-per-s", "200")
        start = spendable(url, key)
        load = Load(lambda: url, key, workers=4).start()
        try:
            until(lambda: len(load.admitted) >= 15, 60)
            os.kill(a.proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            until(lambda: any('"dispatch_leader_acquired"' in line for line in b.lines), 30, 0.01)
            takeover_s = time.monotonic() - killed_at
            n = len(load.admitted)
            until(lambda: len(load.admitted) >= n + 15, 60)
        finally:
            load.stop()
        statuses = wait_settled(url, key, load.admitted, 90)
        assert all(s in TERMINAL for s in statuses.values()), _count(statuses)
        assert not load.bad, load.bad[:5]
        conserved(url, key, start)
        stop(island)
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0
        a.wait(5)
        app = open_app(backend.store)
        events: dict[str, list] = defaultdict(list)
        for _, ev in iter_log(app):
            if isinstance(ev, Job.Event):
                events[str(ev.originator_id)].append(ev)
        for job_id in load.admitted:
            holder = None
            for ev in events[job_id]:
                if isinstance(ev, Job.Assigned):
                    assert holder is None, f"job {job_id} dispatched to {ev.island_id} while {holder} holds it"
                    holder = ev.island_id
                elif isinstance(ev, (Job.OfferDeclined, Job.Requeued)):
                    holder = None
            assert sum(isinstance(ev, Job.Completed) for ev in events[job_id]) <= 1
        print(f"leader_kill takeover_s={takeover_s:.2f} admitted={len(load.admitted)} outcomes={_count(statuses)}")
        books_clean(env)
    finally:
        backend.cleanup()


# ------------------------------------------------------------------ one Island killed mid-stream
def test_kill9_of_one_island_mid_stream(backend):
    env = backend.env(**FAST)
    made, isl = setup_world(env)
    server = ServerProcess(env)
    url, key = server.url, made["api_key"]
    h = {"Authorization": f"Bearer {key}"}
    island = agent(env, url, isl["token"], "--tokens-per-s", "3", "--first-token-s", "0", "--reply-tokens", "40")
    try:
        until(lambda: (d := httpx.get(url + "/api/v1/islands", headers=h).json()["data"]) and d[0]["online"], 30)
        start = spendable(url, key)
        with httpx.Client(base_url=url + "/api/v1", timeout=30, headers=h) as cl:
            jid = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "die"}}).json()["data"]["id"]
            with cl.stream("GET", f"/jobs/{jid}/stream") as s:
                for line in s.iter_lines():
                    if '"type":"token"' in line:
                        break
            island.kill()  # mid-stream
            killed_at = time.monotonic()
            statuses = wait_settled(url, key, [jid], 30)
            settled_s = time.monotonic() - killed_at
            assert statuses[jid] == "failed", statuses
            assert "mid-stream" in cl.get(f"/jobs/{jid}").json()["data"]["error"]
        conserved(url, key, start)  # nothing charged, nothing held
        print(f"island_kill_mid_stream settled_s={settled_s:.2f}")
    finally:
        stop(island)
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    books_clean(env)
