"""Two coordinator processes on one PostgreSQL, one Redis and one nats-server (decision
0058): both receive the Islands' messages, the dispatch leader applies them (in order);
Jobs submitted through either process complete exactly once with the right output; when
the leader goes, the other process takes over the Island's messages."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from island.backends import EchoBackend
from island.nats_agent import NatsIslandAgent
from tests.api_harness import make_backend
from tests.island_harness import wait_for
from tests.nats_harness import AgentLoop, NatsServer, needs_nats
from tests.test_nats_link import CHAT, agent_config

pytestmark = [needs_nats, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[1]


def test_two_coordinators_share_one_nats_island(tmp_path):
    from api.keys import KeyStore
    from config.settings import Settings
    from coordinator.wiring import build
    from protocol.nats import nats_user
    from scheduler.pairing import hash_password, make_password

    backend = make_backend("pg_redis", tmp_path)
    ns = NatsServer(tmp_path / "nats")
    loop = AgentLoop()
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        base = backend.env(COORDINATOR_PROJECTIONS="off", COORDINATOR_HEARTBEAT_S="1", COORDINATOR_LOG_LEVEL="info",
                           COORDINATOR_LOG_FORMAT="json", COORDINATOR_RATE_LIMIT_PER_MIN="1000000",
                           PYTHONUNBUFFERED="1")
        c = build(Settings.from_env(base))
        try:
            consumer, owner, host = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
            c.ledger.open_account(consumer, "c@test.example", kyc_verified=True, initial_grant_micro=10**12)
            c.ledger.open_account(owner, "o@test.example", kyc_verified=True)
            key, _ = KeyStore(c.committer, fresh_reads=False).issue(consumer, "test")
            password = make_password()
            c.scheduler.pair_island(host, owner, "shared", {}, agent_version="test", nats_user=nats_user(str(host)),
                                    password_hash=hash_password(password), by="test")
            c.scheduler.set_island_approval(host, True, by="test", reason="test")
        finally:
            c.close()
        urls = []
        for i in range(2):  # only the first manages nats-server's authorization
            env = dict(base, COORDINATOR_NATS_URL=ns.coordinator_url)
            if i == 0:
                env.update(COORDINATOR_NATS_AUTH_FILE=str(ns.auth_file), COORDINATOR_NATS_PID_FILE=str(ns.pid_file))
            log_path = tmp_path / f"coord-{i}.log"
            log = open(log_path, "wb")  # noqa: SIM115
            proc = subprocess.Popen([sys.executable, "-m", "tests.island_harness", "serve"], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=log)
            procs.append((proc, log_path))
            urls.append(json.loads(proc.stdout.readline())["url"])
        wait_for(lambda: f'"host-{host}"' in ns.auth_file.read_text(), 20)
        agent = loop.start(NatsIslandAgent(agent_config(ns.url(f"host-{host}", password), str(host))))
        assert agent.paired and agent.jetstream
        jids = []
        for i in range(12):
            with httpx.Client(base_url=urls[i % 2] + "/api/v1", headers={"Authorization": f"Bearer {key}"},
                              timeout=20) as cl:
                r = cl.post("/jobs", json={"workload": "llm-chat", "input": {**CHAT, "prompt": f"job {i}"}})
                assert r.status_code == 201, r.text
                jids.append(r.json()["data"]["id"])
        with httpx.Client(base_url=urls[1] + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=20) as cl:
            wait_for(lambda: all(cl.get(f"/jobs/{j}").json()["data"]["status"] == "completed" for j in jids), 90, 0.3)
            for j in jids:
                done = cl.get(f"/jobs/{j}").json()["data"]
                assert done["output"] == "".join(EchoBackend.reply(done["input"]["model"], done["input"], 48))
                assert done["usage"]["completion_tokens"] == 12
        assert agent.stats["succeeded"] == 12
        completed_by = []
        for _, log_path in procs:
            lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
            completed_by.append(sum(1 for e in lines if e.get("event") == "island_job_completed"))
        # one process (the dispatch leader) applied every Island message, in order
        assert sorted(completed_by) == [0, 12], completed_by
        leader = completed_by.index(12)
        procs[leader][0].terminate()  # the leader goes: the other takes the lead and the Island's messages
        procs[leader][0].wait(30)
        other = urls[1 - leader]
        with httpx.Client(base_url=other + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=20) as cl:
            more = [cl.post("/jobs", json={"workload": "llm-chat", "input": {**CHAT, "prompt": f"after {i}"}})
                    .json()["data"]["id"] for i in range(3)]
            wait_for(lambda: all(cl.get(f"/jobs/{j}").json()["data"]["status"] == "completed" for j in more), 60, 0.3)
    finally:
        loop.close()
        for proc, _ in procs:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        ns.close()
        backend.cleanup()
