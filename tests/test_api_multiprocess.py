"""Several coordinator processes on one PostgreSQL and one Redis (the production shape):
a Job created on one process is readable at once on another, streamed by any process
while an Island on another runs it, one rate limit and one idempotency record per key,
and a revocation on one process refuses the key on the other at once."""

from __future__ import annotations

import threading
import uuid

import pytest

from tests.api_harness import LiveServer, ServerProcess, make_backend, read_sse


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    backend = make_backend("pg_redis", tmp_path_factory.mktemp("mp"))
    a = LiveServer(backend)  # started first: it holds the dispatch leader lock
    a.chat_island = a.island(name="island-on-a")
    b = ServerProcess(backend.env(COORDINATOR_PROJECTIONS="off"))
    yield a, b
    b.signal(15)
    try:
        b.wait(30)
    finally:
        b.kill()
        a.stop()
        backend.cleanup()


def test_read_your_writes_across_processes(pair):
    a, b = pair
    _, key = a.account()
    with a.client(key) as ca, b.client(key) as cb:
        for writer, reader in ((cb, ca), (ca, cb)):
            job = writer.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "hi"}})
            assert job.status_code == 201
            got = reader.get(f"/jobs/{job.json()['data']['id']}")
            assert got.status_code == 200, got.text


def test_any_process_serves_any_stream(pair):
    # The hold is placed by B and settled by A, which has the consumer's Account cached
    # from before (it created it): the settlement must see B's hold.
    a, b = pair
    _, key = a.account()
    with b.client(key) as cb:
        a.chat_island.gate.clear()
        job = cb.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "echo:from A"}}).json()["data"]
        events = []
        reader = threading.Thread(target=lambda: events.extend(read_sse(cb, f"/jobs/{job['id']}/stream")))
        reader.start()
        a.chat_island.gate.set()
        reader.join(30)
        kinds = [e.data["type"] for e in events]
        assert kinds[-1] == "done", kinds
        assert [e.data["content"] for e in events if e.data["type"] == "token"] == ["from A"]
        statuses = [e.data["content"] for e in events if e.data["type"] == "status"]
        assert statuses[:3] == ["queued", "assigned", "running"]
        assert cb.get(f"/jobs/{job['id']}").json()["data"]["output"] == "from A"


def test_rate_limit_is_shared(pair):
    a, b = pair
    _, key = a.account()
    with a.client(key) as ca, b.client(key) as cb:
        codes = [(ca if i % 2 else cb).get("/workloads").status_code for i in range(100)]
        assert codes == [200] * 100
        assert ca.get("/workloads").status_code == 429
        assert cb.get("/workloads").status_code == 429


def test_revocation_on_one_process_is_at_once_on_the_other(pair):
    a, b = pair
    _, key = a.account()
    with a.client(key) as ca, b.client(None) as cb:
        made = ca.post("/api-keys", json={"name": "second"}).json()
        second = {"Authorization": f"Bearer {made['key']}"}
        assert cb.get("/account", headers=second).status_code == 200  # cached on B now
        assert ca.delete(f"/api-keys/{made['data']['id']}").status_code == 200
        assert cb.get("/account", headers=second).status_code == 401


def test_idempotency_key_across_processes(pair):
    a, b = pair
    _, key = a.account()
    h = {"Idempotency-Key": str(uuid.uuid4())}
    with a.client(key) as ca, b.client(key) as cb:
        first = ca.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "once"}}, headers=h)
        second = cb.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "once"}}, headers=h)
        assert first.status_code == second.status_code == 201
        assert first.json()["data"]["id"] == second.json()["data"]["id"]
        assert second.headers.get("Idempotent-Replayed") == "true"
