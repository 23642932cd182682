"""Several coordinator processes on one PostgreSQL and one Redis: an Island connected to
a follower (which never dispatches) gets the leader's offers through Redis, its
heartbeats, renewals and output progress reach the leader's dispatch core, a consumer's
cancel reaches it, it may move to the other process mid-Job and resume its stream
exactly, and the newer connection replaces the older one across processes.

The two "processes" are two complete coordinators (each its own committer, dispatch
core, broker and bus) in this test process, on separate event loops: what they share is
only PostgreSQL and Redis, as between real processes. The leader is fixed (an explicit
lock) so the test knows which one dispatches."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from protocol import island as p
from islandlink.state import BAD_SEQUENCE, OK, TOO_LARGE, MemoryChannelState, RedisChannelState
from scheduler.dispatcher import AlwaysLeader
from tests.conftest import REDIS_URL, drop_schema, make_store, require_redis
from tests.island_harness import RawIsland, ThreadServer, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(90)]

LITE = {"cargos": ["llm-chat-lite"], "models": ["tinyllama-1.1b-chat"], "ram_mb": 16_000, "slots": 4}
INPUT = {"prompt": "hello across processes", "max_tokens": 12}


class NeverLeader:
    def is_leader(self) -> bool:
        return False


def redis_cleanup(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    require_redis()
    store = make_store("postgres", tmp_path_factory.mktemp("bus"))
    prefix = f"t{uuid.uuid4().hex[:10]}:"
    env = {"COORDINATOR_DATABASE_URL": store.database_url, "COORDINATOR_DB_SCHEMA": store.schema,
           "COORDINATOR_DATA_DIR": str(store.data_dir), "COORDINATOR_REDIS_URL": REDIS_URL,
           "COORDINATOR_REDIS_PREFIX": prefix, "COORDINATOR_LEASE_S": "2", "COORDINATOR_LEASE_RENEW_S": "1",
           "COORDINATOR_HEARTBEAT_S": "1", "COORDINATOR_ACK_TIMEOUT_S": "3", "COORDINATOR_LOG_FORMAT": "console",
           "COORDINATOR_LOG_LEVEL": "warning", "COORDINATOR_RATE_LIMIT_PER_MIN": "1000000"}
    leader = ThreadServer(env, leader=AlwaysLeader())
    follower = ThreadServer(env, leader=NeverLeader())
    yield leader, follower
    follower.stop()
    leader.stop()
    drop_schema(store.schema)
    redis_cleanup(prefix)


def submit(client: httpx.Client, inp: dict) -> str:
    r = client.post("/jobs", json={"workload": "llm-chat-lite", "input": inp})
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def job(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()["data"]


def test_an_island_on_the_follower_works_with_the_leader(pair):
    leader, follower = pair
    _, key = leader.account(credits="500")
    iid, token = leader.island("on-follower")
    a = RawIsland(follower.url, token, caps=LITE)  # heartbeats reach the leader through Redis
    client = httpx.Client(base_url=leader.url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=20)
    try:
        wait_for(lambda: leader.online(iid), timeout_s=10)
        assert not leader.channel.connected(iid) and follower.channel.connected(iid)
        jid = submit(client, INPUT)
        offer = a.expect(p.Offer, lambda o: o.job_id == jid)  # made by the leader, delivered by the follower
        assert offer.ack_timeout_ms > 0
        a.send(p.Accept(job_id=jid))
        a.expect(p.Accepted)
        a.send(p.Output(job_id=jid, seq=1, tokens=["one", " two"]))
        # renewals via the follower keep the lease (2 s) alive on the leader for 3.5 s
        for _ in range(7):
            a.send(p.Renew(job_ids=[jid]))
            asyncio.run(asyncio.sleep(0.5))
        assert job(client, jid)["status"] == "running"
        live = leader.c.scheduler.core.live_job(uuid.UUID(jid))
        assert live.streamed and live.delivered_tokens == 2  # output progress reached the leader's core
        # the Island moves to the leader's process mid-Job and resumes exactly where it was
        b = RawIsland(leader.url, token, caps=LITE, running=[jid])
        assert a.wait_closed()[0] == p.CLOSE_REPLACED  # the follower's older connection was replaced
        (state,) = b.welcome.jobs
        assert (state.status, state.last_seq) == ("running", 1)
        b.send(p.Output(job_id=jid, seq=1, tokens=["one", " two"]))
        assert b.expect(p.Error).code == "bad_sequence"
        b.send(p.Output(job_id=jid, seq=2, tokens=[" three"]))
        b.send(p.Complete(job_id=jid, usage={"prompt_tokens": 4, "completion_tokens": 3}, compute_ms=9))
        assert b.expect(p.Finished).status == "completed"
        done = job(client, jid)
        assert done["status"] == "completed" and done["output"] == "one two three"
        # the stream (Redis Streams) holds each token batch once, whichever process published it
        events = leader.call(leader.services.broker.read(jid, None))
        assert [e for _, e in events if b'"token"' in e] == [b'{"type":"token","content":"one two"}',
                                                            b'{"type":"token","content":" three"}']
        b.close()
    finally:
        a.close()
        client.close()


def test_cancel_and_a_lapse_reach_an_island_on_the_follower(pair):
    leader, follower = pair
    _, key = leader.account(credits="500")
    iid, token = leader.island("cancel-on-follower")
    a = RawIsland(follower.url, token, caps=LITE)
    client = httpx.Client(base_url=follower.url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=20)
    try:
        wait_for(lambda: leader.online(iid), timeout_s=10)
        jid = submit(client, INPUT)
        a.expect(p.Offer, lambda o: o.job_id == jid)
        a.send(p.Accept(job_id=jid))
        a.expect(p.Accepted)
        a.send(p.Output(job_id=jid, seq=1, tokens=["x"]))
        assert client.delete(f"/jobs/{jid}").json()["data"]["status"] == "cancelled"
        assert a.expect(p.Cancel, lambda c: c.job_id == jid).reason == "cancelled"
        # streamed, then silent: the leader lapses the lease and fails the Job (not re-queued)
        jid2 = submit(client, INPUT)
        a.expect(p.Offer, lambda o: o.job_id == jid2)
        a.send(p.Accept(job_id=jid2))
        a.expect(p.Accepted)
        a.send(p.Output(job_id=jid2, seq=1, tokens=["partial"]))
        cancel = a.expect(p.Cancel, lambda c: c.job_id == jid2, timeout=10)
        assert cancel.reason == "failed"
        got = job(client, jid2)
        assert got["status"] == "failed" and "mid-stream" in got["error"]
    finally:
        a.close()
        client.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_channel_state_sequences(kind):
    async def run() -> None:
        if kind == "redis":
            require_redis()
            state = RedisChannelState(REDIS_URL, f"t{uuid.uuid4().hex[:10]}:", ttl_s=60)
        else:
            state = MemoryChannelState()
        try:
            assert await state.advance("j", "i", 1, "append", "ab") == (OK, 1)
            assert await state.advance("j", "i", 1, "append", "ab") == (BAD_SEQUENCE, 1)  # replay
            assert await state.advance("j", "i", 3, "append", "zz") == (BAD_SEQUENCE, 1)  # gap
            assert await state.advance("j", "i", 2, "none", "") == (OK, 2)
            assert await state.advance("j", "i", 3, "append", "x" * 10, limit=5) == (TOO_LARGE, 2)
            assert await state.advance("j", "i", 3, "append", "cd") == (OK, 3)
            assert await state.advance("j", "other", 1, "append", "q") == (OK, 1)  # another attempt: its own
            assert await state.result("j", "i") == "abcd" and await state.last_seq("j", "i") == 3
            await state.forget("j", "i")
            assert await state.result("j", "i") is None and await state.last_seq("j", "i") == 0
            await state.forget("j", "other")
        finally:
            await state.close()

    asyncio.run(run())
