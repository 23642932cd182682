"""No orphans, one projector (issue #16, deliverable 1): the projector child of
`coordinator serve` dies with the server however the server dies, is restarted with
back-off when it dies alone, and a second projector for one store refuses to run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from coordinator.server import Projector
from projections.lock import EXIT_BUSY
from tests.api_harness import ServerProcess, make_backend
from tests.fault_harness import ROOT, alive, books_clean, cli_json, projector_children, until

BACKENDS = ["embedded", pytest.param("pg_redis", marks=[pytest.mark.postgres, pytest.mark.redis])]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    b = make_backend(request.param, tmp_path)
    yield b
    b.cleanup()


def _env(backend, **extra):
    return backend.env(COORDINATOR_PROJECTIONS="process", **extra)


def _submit_some(server: ServerProcess, key: str, n: int = 5) -> list[str]:
    with server.client(key) as cl:
        return [cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": f"p{i}"}}).json()["data"]["id"]
                for i in range(n)]


def test_kill9_of_serve_takes_its_projector_with_it_and_a_restart_runs_one(backend):
    env = _env(backend)
    key = cli_json(env, "accounts", "create", "--email", "k9@example.com", "--credits", "50", "--kyc")["api_key"]
    server = ServerProcess(env)
    child = until(lambda: projector_children(server.proc.pid), 20)[0]
    jobs = _submit_some(server, key)
    os.kill(server.proc.pid, signal.SIGKILL)
    server.wait(10)
    started = time.monotonic()
    until(lambda: not alive(child), 10)
    gone_s = time.monotonic() - started
    assert gone_s < 5, f"projector outlived its server by {gone_s:.1f} s"

    again = ServerProcess(env)  # one projector after the restart, and the books hold
    try:
        kids = until(lambda: projector_children(again.proc.pid), 20)
        time.sleep(1.5)
        assert len(projector_children(again.proc.pid)) == 1 == len(kids)
        with again.client(key) as cl:
            for jid in jobs:
                assert cl.get(f"/jobs/{jid}").json()["data"]["status"] == "queued"
    finally:
        again.signal(signal.SIGTERM)
        assert again.wait(30) == 0
    assert not alive(kids[0])
    books_clean(env)


def test_projector_killed_alone_is_restarted_and_the_server_keeps_serving(backend):
    env = _env(backend)
    key = cli_json(env, "accounts", "create", "--email", "pk@example.com", "--credits", "50", "--kyc")["api_key"]
    server = ServerProcess(env)
    try:
        first = until(lambda: projector_children(server.proc.pid), 20)[0]
        os.kill(first, signal.SIGKILL)
        jobs = _submit_some(server, key, 3)  # requests keep working while it is down
        second = until(lambda: [p for p in projector_children(server.proc.pid) if p != first], 15)[0]
        assert second != first
        with server.client(key) as cl:  # the views catch up (GET /jobs reads them)
            until(lambda: set(jobs) <= {j["id"] for j in cl.get("/jobs").json()["data"]}, 20)
        assert any('"projector_exited"' in line for line in server.lines)
    finally:
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    books_clean(env)


def test_a_second_projector_for_one_store_refuses_with_a_clear_message(backend):
    env = _env(backend)
    cli_json(env, "accounts", "create", "--email", "p2@example.com", "--credits", "1", "--kyc")
    first = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "projections", "run"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # it holds the lock
        assert first.poll() is None
        second = subprocess.run([sys.executable, "-m", "coordinator.cli", "projections", "run"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == EXIT_BUSY
        assert "another projector is already running" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err[-2000:]
    third = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "projections", "run"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)  # the lock was released with the first: a new projector runs
    assert third.poll() is None
    third.send_signal(signal.SIGTERM)
    third.communicate(timeout=30)
    assert third.returncode == 0


def test_a_projector_whose_parent_is_gone_at_start_stops_at_once(tmp_path):
    b = make_backend("embedded", tmp_path)
    env = {**_env(b), "COORDINATOR_PARENT_PID": "1"}  # "our parent is init": not the real one
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "coordinator.cli", "projections", "run"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 20


def test_supervisor_back_off_doubles_up_to_its_bound_and_resets_after_a_healthy_run():
    delays, d = [], Projector.FIRST_DELAY_S / 2
    for _ in range(8):
        d = Projector.next_delay_s(d, ran_s=0.1)
        delays.append(d)
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert max(delays) == Projector.MAX_DELAY_S == delays[-1]
    assert Projector.next_delay_s(Projector.MAX_DELAY_S, ran_s=Projector.HEALTHY_S) == Projector.FIRST_DELAY_S
