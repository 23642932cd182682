"""Decision 0041: an Island below a Cargo's karma gate gets no Jobs until an operator
adjusts its karma; the adjustment is an audited event, bounded, floored, and brings the
Island back into routing at once (live view, projections, CLI, operator API)."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from routing.karma import DEFAULT_RATES, parse_karma_milli
from scheduler.commands import BadKarmaAdjustment, NotYourJob
from scheduler.islands import Island
from tests.api_harness import LiveServer, make_backend
from tests.test_scheduler import World

ADMIN = "admin-token-for-tests-0123456789"


@pytest.mark.parametrize(("text", "milli"), [("10", 10_000), ("-2.5", -2_500), ("0.001", 1), (7, 7_000),
                                             (" 3.25 ", 3_250), ("-0.125", -125)])
def test_parse_karma_milli_accepts_decimals_with_three_places(text, milli):
    assert parse_karma_milli(text) == milli


@pytest.mark.parametrize("bad", ["", "abc", "0.0005", "1e3", "NaN", "--1", 1.5, True, None, "1_000"])
def test_parse_karma_milli_refuses_everything_else(bad):
    with pytest.raises(ValueError):
        parse_karma_milli(bad)


def _karma(world: World, island: str) -> int:
    return world.committer.query(lambda uow: uow.get(uuid.UUID(island)).karma_milli)


def test_benched_island_gets_no_jobs_until_an_operator_adjusts_its_karma():
    world = World()
    island = world.island()
    gate = world.sched.catalog.get("llm-chat").min_karma_milli
    assert 0 < gate < DEFAULT_RATES.start_milli  # decision 0051: 40 on the 0..100 scale, a new Island has 50
    down = world.sched.adjust_island_karma(uuid.UUID(island), gate - 5_000 - DEFAULT_RATES.start_milli, by="alice",
                                           reason="test: bench it")
    assert (down.before_milli, down.after_milli) == (DEFAULT_RATES.start_milli, gate - 5_000)
    assert _karma(world, island) == gate - 5_000

    acct = world.account("c@x", kyc=True, credits_micro=100_000_000)
    job = world.sched.submit(acct, "llm-chat", {"prompt": "hello", "max_tokens": 16})
    for _ in range(3):
        world.clock.advance(10)
        world.sched.step(world.clock.now_ms())
    assert world.sched.get_job(uuid.UUID(job.id)).status == "queued"  # benched: routing refuses it

    up = world.sched.adjust_island_karma(uuid.UUID(island), 6_000, by="alice", reason="owner replaced the GPU")
    assert up.after_milli == gate + 1_000
    world.sched.step(world.clock.now_ms())
    view = world.sched.get_job(uuid.UUID(job.id))
    assert view.status == "assigned" and view.island_id == island

    events = [e for e in world.app.events.get(uuid.UUID(island)) if isinstance(e, Island.KarmaAdjusted)]
    assert [(e.delta_milli, e.by, e.note, e.reason) for e in events] == [
        (gate - 5_000 - DEFAULT_RATES.start_milli, "alice", "test: bench it", "operator_adjustment"),
        (6_000, "alice", "owner replaced the GPU", "operator_adjustment")]
    assert all(isinstance(e, Island.KarmaChanged) for e in events)  # one karma history for every reader


def test_adjustments_are_bounded_floored_and_refusals_write_nothing():
    world = World()
    island = uuid.UUID(world.island())
    before = world.app.recorder.max_notification_id()
    for delta in (0, 100_001, -100_001):
        with pytest.raises(BadKarmaAdjustment):
            world.sched.adjust_island_karma(island, delta, by="alice", reason="x")
    with pytest.raises(BadKarmaAdjustment):
        world.sched.adjust_island_karma(island, 5, by="alice", reason="")
    with pytest.raises(NotYourJob):
        world.sched.adjust_island_karma(uuid.uuid4(), 5, by="alice", reason="x")
    assert world.app.recorder.max_notification_id() == before

    floored = world.sched.adjust_island_karma(island, -100_000, by="alice", reason="typo")
    assert floored.after_milli == DEFAULT_RATES.floor_milli  # never below the floor, like every penalty
    with pytest.raises(BadKarmaAdjustment):  # at the floor already: nothing would change
        world.sched.adjust_island_karma(island, -1, by="alice", reason="again")
    carry = world.committer.query(lambda uow: uow.get(island).karma_carry)
    world.sched.adjust_island_karma(island, 100_000, by="alice", reason="undo the typo")
    assert _karma(world, str(island)) == DEFAULT_RATES.ceiling_milli  # held at the ceiling (100)
    with pytest.raises(BadKarmaAdjustment):  # at the ceiling already: nothing would change
        world.sched.adjust_island_karma(island, 1, by="alice", reason="again")
    assert world.committer.query(lambda uow: uow.get(island).karma_carry) == carry


@pytest.fixture(params=["embedded", "pg_redis"])
def server(request, tmp_path):
    srv = LiveServer(make_backend(request.param, tmp_path), COORDINATOR_ADMIN_TOKEN=ADMIN)
    yield srv
    srv.stop()


def test_operator_api_adjusts_karma_and_the_islands_read_model_shows_it(server):
    island = server.island()
    with httpx.Client(base_url=server.url + "/api/v1/admin", timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN}", "X-Operator": "alice"}) as a:
        url = f"/islands/{island.island_id}/karma"
        r = a.post(url, json={"delta": "-12.5", "reason": "benched after incident 4"})
        assert r.status_code == 200, r.text
        assert r.json()["data"] == {"island_id": island.island_id, "karma_before": 50, "karma": 37.5,
                                    "applied_delta": -12.5}
        for body in ({"delta": "0.0001", "reason": "x"}, {"delta": "1", "reason": ""}, {"delta": 0, "reason": "x"},
                     {"delta": "500", "reason": "x"}, {"delta": "1"}):
            bad = a.post(url, json=body)
            assert bad.status_code in (400, 422), (body, bad.text)
        assert a.post(f"/islands/{uuid.uuid4()}/karma", json={"delta": "1", "reason": "x"}).status_code == 404
        assert a.post("/islands/not-an-id/karma", json={"delta": "1", "reason": "x"}).status_code == 404
        deadline = time.monotonic() + 15
        row: dict = {}
        while time.monotonic() < deadline:
            row = next((x for x in a.get("/islands").json()["data"] if x["island_id"] == island.island_id), {})
            if row.get("karma_milli") == 37_500:
                break
            time.sleep(0.1)
        assert row.get("karma_milli") == 37_500, row


def test_cli_adjusts_karma_and_refuses_bad_input_with_exit_2(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import env_for, make_store

    env = env_for(make_store("sqlite", tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, capture_output=True, text=True,
                              timeout=60, cwd=root)

    owner = json.loads(cli("accounts", "create", "--email", "owner@example.com").stdout.strip().splitlines()[-1])
    made = cli("islands", "create", "--owner", owner["account_id"], "--name", "rack-1", "--approve")
    island_id = json.loads(made.stdout.strip().splitlines()[-1])["island_id"]
    ok = cli("islands", "karma", island_id, "-11.5", "--reason", "incident 9", "--by", "bob")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.strip().splitlines()[-1])["karma"] == 38.5
    for args in ((island_id, "0.0001", "--reason", "x"), (island_id, "2"), (island_id, "0", "--reason", "x"),
                 ("not-an-id", "1", "--reason", "x")):
        bad = cli("islands", "karma", *args)
        assert bad.returncode == 2, (args, bad.stdout, bad.stderr)
    listed = json.loads(cli("islands", "list", "--json").stdout)
    assert [r["karma_milli"] for r in listed if r["island_id"] == island_id] == [38_500]
