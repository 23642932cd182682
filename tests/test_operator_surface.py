"""One operator surface (decision 0043): every operator action is under `/api/v1/admin`
and under `coordinator admin`; the Island drain is an audited event that stops new
offers while running Jobs finish; the old `/operator/v1` surface is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest

from scheduler.commands import NotYourJob
from scheduler.islands import Island
from tests.api_harness import LiveServer, make_backend
from tests.test_scheduler import World

ADMIN = "admin-token-for-tests-0123456789"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step(world: World, n: int = 3) -> None:
    for _ in range(n):
        world.clock.advance(10)
        world.sched.step(world.clock.now_ms())


def test_drained_island_gets_no_new_jobs_and_comes_back_when_undrained():
    world = World()
    island = world.island()
    iid = uuid.UUID(island)
    acct = world.account("d@x", kyc=True, credits_micro=100_000_000)
    assert world.sched.set_island_draining(iid, True, by="alice", reason="GPU swap tonight") is True
    assert world.sched.set_island_draining(iid, True, by="alice", reason="again") is False  # no second event
    job = world.sched.submit(acct, "llm-chat", {"prompt": "hello", "max_tokens": 16})
    _step(world)
    assert world.sched.get_job(uuid.UUID(job.id)).status == "queued"  # drained: not offered
    assert world.sched.set_island_draining(iid, False, by="alice", reason="swap done") is True
    _step(world, 1)
    view = world.sched.get_job(uuid.UUID(job.id))
    assert view.status == "assigned" and view.island_id == island
    events = [e for e in world.app.events.get(iid) if isinstance(e, Island.DrainChanged)]
    assert [(e.draining, e.by, e.reason) for e in events] == [(True, "alice", "GPU swap tonight"),
                                                              (False, "alice", "swap done")]
    with pytest.raises(NotYourJob):
        world.sched.set_island_draining(uuid.uuid4(), True, by="alice", reason="x")


def test_a_running_job_finishes_on_a_draining_island():
    world = World()
    island = world.island()
    acct = world.account("r@x", kyc=True, credits_micro=100_000_000)
    job = world.sched.submit(acct, "llm-chat", {"prompt": "hello", "max_tokens": 16})
    _step(world, 1)
    jid = uuid.UUID(job.id)
    assert world.sched.get_job(jid).island_id == island
    world.sched.set_island_draining(uuid.UUID(island), True, by="alice", reason="maintenance")
    world.sched.accept(island, jid)
    world.sched.complete(island, jid, {"prompt_tokens": 2, "completion_tokens": 1}, "hi", 100)
    assert world.sched.get_job(jid).status == "completed"


@pytest.fixture(params=["embedded", "pg_redis"])
def server(request, tmp_path):
    srv = LiveServer(make_backend(request.param, tmp_path), COORDINATOR_ADMIN_TOKEN=ADMIN)
    yield srv
    srv.stop()


def test_operator_api_drains_and_shows_one_island(server):
    island = server.island()
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN}", "X-Operator": "alice"}) as a:
        r = a.post(f"/api/v1/admin/islands/{island.island_id}/drain", json={"reason": "maintenance"})
        assert r.status_code == 200, r.text
        assert r.json()["data"] == {"island_id": island.island_id, "draining": True, "changed": True}
        shown = a.get(f"/api/v1/admin/islands/{island.island_id}").json()["data"]
        assert shown["draining"] is True and shown["approval"] == "approved"
        assert a.post(f"/api/v1/admin/islands/{island.island_id}/drain", json={}).status_code in (400, 422)
        assert a.post(f"/api/v1/admin/islands/{island.island_id}/drain",
                      json={"reason": "x", "extra": 1}).status_code in (400, 422)
        assert a.post(f"/api/v1/admin/islands/{uuid.uuid4()}/drain", json={"reason": "x"}).status_code == 404
        undone = a.post(f"/api/v1/admin/islands/{island.island_id}/drain",
                        json={"reason": "done", "draining": False})
        assert undone.json()["data"]["draining"] is False
        assert a.get(f"/api/v1/admin/islands/{uuid.uuid4()}").status_code == 404
        # the superseded surface is gone
        assert a.get(f"/operator/v1/islands/{island.island_id}").status_code in (401, 404)


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_admin_cli_group_runs_every_operator_action(tmp_path):
    from tests.conftest import env_for, make_store

    env = env_for(make_store("sqlite", tmp_path))
    acct = _last_json(_cli(env, "accounts", "create", "--email", "ops@example.com"))["account_id"]
    island = _last_json(_cli(env, "islands", "create", "--owner", acct, "--name", "rack-1"))["island_id"]

    assert _last_json(_cli(env, "admin", "islands", "approve", island, "--reason", "ok"))["approval"] == "approved"
    assert _last_json(_cli(env, "admin", "islands", "drain", island, "--reason", "swap"))["draining"] is True
    assert _last_json(_cli(env, "admin", "islands", "undrain", island, "--reason", "done"))["draining"] is False
    assert _last_json(_cli(env, "admin", "islands", "karma", island, "-2", "--reason", "late"))["karma"] == 48  # decision 0051: from the start at 50
    assert _last_json(_cli(env, "admin", "islands", "suspend", island, "--reason", "abuse"))["approval"] == "suspended"
    assert _last_json(_cli(env, "admin", "cargos", "disable", "sdxl", "--reason", "bad model"))["enabled"] is False
    assert _last_json(_cli(env, "admin", "cargos", "enable", "sdxl", "--reason", "fixed"))["enabled"] is True
    assert _last_json(_cli(env, "admin", "accounts", "kyc", acct, "--verified", "--reason", "case 7"))["kyc_verified"]
    assert _last_json(_cli(env, "admin", "accounts", "ban", acct, "--reason", "fraud"))["suspended"] is True
    assert _last_json(_cli(env, "admin", "accounts", "unban", acct, "--reason", "appeal"))["suspended"] is False
    granted = _last_json(_cli(env, "admin", "credits", "grant", acct, "2.5", "--reason", "ticket 1"))
    assert granted["granted"] == 2.5
    # the older spelling runs the same action
    assert _last_json(_cli(env, "credits", "grant", acct, "1", "--reason", "ticket 2"))["granted"] == 1

    for bad in (("admin", "islands", "drain", island), ("admin", "islands", "drain", "not-an-id", "--reason", "x"),
                ("admin", "cargos", "disable", "no-such-cargo", "--reason", "x"),
                ("admin", "accounts", "ban", acct), ("admin", "credits", "grant", acct, "-1", "--reason", "x")):
        proc = _cli(env, *bad)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
