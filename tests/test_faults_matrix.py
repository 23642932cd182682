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
        until(lambda: len(load.admitted) >= 30, 60)
        os.kill(server.proc.pid, signal.SIGKILL)  # submits and streams in flight
        server.wait(10)
        killed_at = time.monotonic()
        time.sleep(1.0)
        server = ServerProcess(env, port=port)
        restart_s = time.monotonic() - killed_at
        until(lambda: len(load.admitted) >= 60, 60)  # the load goes on against the new process
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
