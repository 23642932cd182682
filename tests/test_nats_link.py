"""The NATS transport against a real nats-server (tests/nats_harness.py) and the real HTTP
app: pairing, credentials and server-enforced permissions, chat and image Jobs from the
reference NATS agent (island/nats_agent.py, the published agent's protocol), cancel,
redelivery, replays, forged hosts, bad payloads, a NATS restart, and an agent process
killed mid-Job."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from island.backends import EchoBackend, ImageBackend
from island.nats_agent import NatsAgentConfig, NatsIslandAgent
from protocol import nats as pn
from routing import karma as karma_rules
from tests.island_harness import OPERATOR_TOKEN, ThreadServer, wait_for
from tests.nats_harness import AgentLoop, NatsServer, needs_nats

pytestmark = [needs_nats, pytest.mark.timeout(120)]

CHAT = {"prompt": "hello over nats", "max_tokens": 12}
IMAGE = {"prompt": "a lighthouse", "width": 512, "height": 512, "steps": 6}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, nats_server):
    env = {"COORDINATOR_DATA_DIR": str(tmp_path_factory.mktemp("natsco") / "data"), "COORDINATOR_LEASE_S": "4",
           "COORDINATOR_LEASE_RENEW_S": "1", "COORDINATOR_HEARTBEAT_S": "1", "COORDINATOR_ACK_TIMEOUT_S": "3",
           "COORDINATOR_LOG_FORMAT": "console", "COORDINATOR_LOG_LEVEL": "warning",
           "COORDINATOR_AUTO_APPROVE_ISLANDS": "true", "COORDINATOR_RATE_LIMIT_PER_MIN": "1000000",
           **nats_server.env()}
    server = ThreadServer(env)
    assert server.nats is not None
    wait_for(lambda: server.nats.connected.is_set())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def consumer(srv):
    account_id, key = srv.account(credits="1000")
    client = httpx.Client(base_url=srv.url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=20)
    yield account_id, client
    client.close()


@pytest.fixture
def agents(srv):
    loop = AgentLoop()
    loop.paired: list[str] = []
    yield loop
    loop.close()
    for host_id in loop.paired:  # no later test's Job is offered to a stopped agent
        srv.c.scheduler.set_island_approval(uuid.UUID(host_id), False, by="test", reason="test over")


def submit(client: httpx.Client, workload: str, inp: dict) -> str:
    r = client.post("/jobs", json={"workload": workload, "input": inp})
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def job(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()["data"]


def status_is(client: httpx.Client, job_id: str, *statuses: str):
    return lambda: job(client, job_id)["status"] in statuses


def stream_events(srv: ThreadServer, job_id: str) -> list[dict]:
    entries = srv.call(srv.services.broker.read(job_id, None))
    return [json.loads(data) for _, data in entries]


def balance(client: httpx.Client) -> str:
    return str(client.get("/account").json()["data"]["credits"])


def agent_config(url: str, host_id: str, **kw) -> NatsAgentConfig:
    chat = kw.pop("chat", None) or EchoBackend(tokens_per_s=300, first_token_s=0.01)
    kw.setdefault("gpu_model", "echo")
    kw.setdefault("gpu_vram_mb", 24_576)
    kw.setdefault("estimated_llm_tok_s", 60.0)
    return NatsAgentConfig(url=url, backends=[chat, ImageBackend(steps_per_s=200)], host_id=host_id,
                           heartbeat_s=0.5, lease_every_s=1.0, **kw)


def pair(srv, nats_server, agents, owner_client: httpx.Client, **kw) -> tuple[str, str]:
    """An agent with the public pairing credential asks for a code; the owner enters it;
    (auto-)approval puts its user into nats-server's authorization. -> (host id, its URL)."""
    host_id = str(uuid.uuid4())
    first = agents.start(NatsIslandAgent(agent_config(nats_server.url("pairing", "pairing"), host_id,
                                                      use_jetstream=False)))
    assert first.pairing_code, first.pairing_reply
    agents.stop(first)
    reloads = nats_server.log_text().count("Reloaded server configuration")
    r = owner_client.post("/islands/pair", json={"code": first.pairing_code.lower(), "name": "nats-island"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["data"]["id"] == host_id and body["nats"]["user"] == f"host-{host_id}"
    url = body["nats"]["url"]
    wait_for(lambda: f'"host-{host_id}"' in nats_server.auth_file.read_text(), 10)
    wait_for(lambda: nats_server.log_text().count("Reloaded server configuration") > reloads, 10)
    time.sleep(0.3)  # JetStream's account is re-enabled by the reload
    agents.paired.append(host_id)
    return host_id, url


def start_paired(srv, nats_server, agents, owner_client, **kw) -> NatsIslandAgent:
    host_id, url = pair(srv, nats_server, agents, owner_client)
    agent = agents.start(NatsIslandAgent(agent_config(url, host_id, **kw)))
    assert agent.paired and agent.jetstream
    wait_for(lambda: srv.online(host_id) and srv.c.scheduler.core.registry.islands[host_id].capabilities["cargos"])
    return agent


# ------------------------------------------------------------------ pairing and credentials
def test_pairing_binds_the_island_and_a_wrong_or_used_code_changes_nothing(srv, nats_server, consumer, agents):
    owner_id, client = consumer
    host_id = str(uuid.uuid4())
    first = agents.start(NatsIslandAgent(agent_config(nats_server.url("pairing", "pairing"), host_id,
                                                      region="eu-west", gpu_model="RTX 4090", gpu_vram_mb=24_576)))
    code = first.pairing_code
    assert code and len(code) == 8 and first.pairing_reply.expires_in_seconds > 0
    # asking again within the code's life gives the same code (rate limit per host id)
    again = agents.start(NatsIslandAgent(agent_config(nats_server.url("pairing", "pairing"), host_id,
                                                      region="eu-west", gpu_model="RTX 4090", gpu_vram_mb=24_576,
                                                      use_jetstream=False)))
    assert again.pairing_code == code
    known = set(srv.c.scheduler.core.registry.islands)
    _, other = srv.account()
    with httpx.Client(base_url=srv.url + "/api/v1", headers={"Authorization": f"Bearer {other}"}) as bad:
        r = bad.post("/islands/pair", json={"code": "ABCDEFGH"})
        assert r.status_code == 422 and "code" in r.json()["errors"]
        r = bad.post("/islands/pair", json={"code": 5})
        assert r.status_code in (400, 422)
        assert set(srv.c.scheduler.core.registry.islands) == known  # nothing was created
        for _ in range(12):
            r = bad.post("/islands/pair", json={"code": "WRONG234"})
        assert r.status_code == 429
    r = client.post("/islands/pair", json={"code": code})
    assert r.status_code == 201, r.text
    data = r.json()["data"]
    assert data["owner_account_id"] == str(owner_id) and data["capabilities"]["region"] == "eu-west"
    assert data["capabilities"]["gpu_model"] == "RTX 4090" and data["capabilities"]["vram_mb"] == 24_576
    password = r.json()["nats"]["password"]
    assert "@" not in password and "%" not in password
    isl = srv.c.committer.query(lambda uow: uow.get(uuid.UUID(host_id)))
    assert isl.transport == "nats" and isl.nats_password_hash.startswith("$2")
    assert password not in json.dumps(isl.__dict__, default=str)  # only the hash is kept
    r = client.post("/islands/pair", json={"code": code})  # single use
    assert r.status_code == 422
    # the agent asking again is told it is paired, and remembers it
    third = agents.start(NatsIslandAgent(agent_config(nats_server.url("pairing", "pairing"), host_id,
                                                      use_jetstream=False)))
    assert third.paired and third.pairing_code is None
    agents.paired.append(host_id)


def test_chat_job_streams_and_completes_over_nats(srv, nats_server, consumer, agents):
    _, client = consumer
    agent = start_paired(srv, nats_server, agents, client, asking_prices={"llm-chat": "4.5", "_default": "3"})
    # the heartbeat's asking_prices reach the exchange (Island.AsksChanged), once
    wait_for(lambda: srv.c.scheduler.core.registry.islands[agent.host_id].asks_micro ==
             {"llm-chat": 4_500_000, "_default": 3_000_000}, 10)
    assert srv.nats.stats["asks_changed"] == 1
    before = balance(client)
    jid = submit(client, "llm-chat", CHAT)
    wait_for(status_is(client, jid, "completed"), 20)
    done = job(client, jid)
    expected = "".join(EchoBackend.reply(done["input"]["model"], done["input"], 48))
    assert done["output"] == expected
    assert done["usage"]["completion_tokens"] == 12 and done["usage"]["prompt_tokens"] > 0
    tokens = [e["content"] for e in stream_events(srv, jid) if e["type"] == "token"]
    assert "".join(tokens) == expected and len(tokens) == 12
    assert balance(client) != before
    isl = srv.c.committer.query(lambda uow: uow.get(uuid.UUID(agent.host_id)))
    assert isl.jobs_completed == 1  # counted by the KarmaChanged("completed") event: the karma change is recorded
    rec = srv.c.scheduler.core.registry.islands[agent.host_id]
    assert rec.latency_ms < 1000  # nats_rtt_ms from the heartbeat is the routing latency
    assert "mistral-7b-instruct" in rec.warm_models  # from cache.warm_workload_ids


def test_image_job_with_progress_over_nats(srv, nats_server, consumer, agents):
    _, client = consumer
    start_paired(srv, nats_server, agents, client)
    iid = submit(client, "sdxl", IMAGE)
    wait_for(status_is(client, iid, "completed"), 20)
    events = stream_events(srv, iid)
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == list(range(1, 7))
    image = [e for e in events if e["type"] == "image"]
    assert len(image) == 1 and image[0]["width"] == 512
    assert job(client, iid)["usage"]["steps"] == 6


def test_cancel_reaches_the_agent(srv, nats_server, consumer, agents):
    _, client = consumer
    agent = start_paired(srv, nats_server, agents, client, chat=EchoBackend(tokens_per_s=2, first_token_s=0.01))
    jid = submit(client, "llm-chat", {"prompt": "slow", "max_tokens": 40})
    wait_for(lambda: any(e["type"] == "token" for e in stream_events(srv, jid)), 20)
    r = client.delete(f"/jobs/{jid}")
    assert r.status_code == 200, r.text
    wait_for(lambda: agent.stats["cancel_received"] >= 1 and agent.stats["cancelled"] == 1, 10)
    assert job(client, jid)["status"] == "cancelled"


# ------------------------------------------------------------------ what an honest agent never does
class _Hold:
    """A chat backend that never streams on its own: the test speaks for the agent."""

    kinds = frozenset({"chat"})
    slots = 4

    def __init__(self) -> None:
        self.started: list[str] = []

    def default_capabilities(self):
        return EchoBackend().default_capabilities()

    async def run(self, ctx):
        self.started.append(ctx.job_id)
        await asyncio.sleep(3600)

    async def aclose(self) -> None:
        pass


def raw(agents: AgentLoop, agent: NatsIslandAgent, what: str, payload, host: str | None = None) -> None:
    data = payload if isinstance(payload, bytes) else pn.encode(payload)
    agents.call(agent.nc.publish(pn.subject(host or agent.host_id, what), data))
    agents.call(agent.nc.flush())


def test_replays_redelivery_forged_hosts_and_bad_payloads_change_nothing(srv, nats_server, consumer, agents):
    _, client = consumer
    hold = _Hold()
    a = start_paired(srv, nats_server, agents, client, chat=hold)
    link = srv.nats
    jid = submit(client, "llm-chat", CHAT)
    wait_for(lambda: jid in hold.started and job(client, jid)["status"] == "running", 20)
    refused0 = link.stats["refused"]
    raw(agents, a, "output", pn.JobOutput(job_id=jid, seq=1, chunk="Hello", is_final=False))
    raw(agents, a, "output", pn.JobOutput(job_id=jid, seq=1, chunk="Hello", is_final=False))  # replayed seq
    raw(agents, a, "output", pn.JobOutput(job_id=jid, seq=5, chunk="gap", is_final=False))  # a gap
    raw(agents, a, "output", pn.JobOutput(job_id=jid, seq=2, chunk=" world", is_final=False))
    wait_for(lambda: link.stats["refused:bad_sequence"] >= 2)
    # bad JSON and missing fields on every subject: logged and counted, never a crash
    for what in ("status", "output", "progress", "image", "lease", "heartbeat"):
        raw(agents, a, what, b"{not json")
        raw(agents, a, what, b'{"job_id": 7}')
    agents.call(a.nc.publish(pn.REGISTER, b"[]"))
    agents.call(a.nc.request(pn.PAIRING, b"{}", timeout=5))
    wait_for(lambda: all(link.stats[f"bad_messages:{w}"] >= 2 for w in
                         ("status", "output", "progress", "image", "lease", "heartbeat")))
    wait_for(lambda: link.stats["bad_messages:register"] >= 1 and link.stats["bad_messages:pairing"] >= 1)
    # a heartbeat naming another host is refused
    hb = a.heartbeat()
    hb.host_id = str(uuid.uuid4())
    raw(agents, a, "heartbeat", hb)
    wait_for(lambda: link.stats["refused:wrong_host"] >= 1)
    # a second started (a redelivered assignment run again) is applied once
    raw(agents, a, "status", pn.JobStatus(job_id=jid, state="started", timestamp=0))
    raw(agents, a, "output", pn.JobOutput(job_id=jid, seq=3, chunk="", is_final=True))
    raw(agents, a, "status", pn.JobStatus(job_id=jid, state="succeeded", timestamp=0))
    wait_for(status_is(client, jid, "completed"), 10)
    charged = balance(client)
    used = job(client, jid)["credits_charged"]
    assert used > 0
    assert job(client, jid)["output"] == "Hello world"
    assert [e["content"] for e in stream_events(srv, jid) if e["type"] == "token"] == ["Hello", " world"]
    # the same messages again (redelivery after completion): nothing twice, nothing charged twice
    raw(agents, a, "status", pn.JobStatus(job_id=jid, state="started", timestamp=0))
    raw(agents, a, "output", pn.JobOutput(job_id=jid, seq=2, chunk=" world", is_final=False))
    raw(agents, a, "status", pn.JobStatus(job_id=jid, state="succeeded", timestamp=0))
    wait_for(lambda: link.stats["refused"] >= refused0 + 5)
    time.sleep(0.3)
    assert balance(client) == charged and job(client, jid)["output"] == "Hello world"
    assert job(client, jid)["credits_charged"] == used
    isl = srv.c.committer.query(lambda uow: uow.get(uuid.UUID(a.host_id)))
    assert isl.jobs_completed == 1
    # the redelivered assignment itself is not run twice by the agent
    assign = pn.AssignJob(job_id=jid, input=dict(CHAT), lease_expires=0, workload_id="llm-chat")
    a._on_job_data(pn.encode(assign))
    assert a.stats["redelivered"] == 1 and hold.started.count(jid) == 1


def test_server_refuses_publishing_as_another_host_and_the_coordinator_refuses_foreign_jobs(
        srv, nats_server, consumer, agents):
    _, client = consumer
    a = start_paired(srv, nats_server, agents, client, chat=_Hold())
    b_hold = _Hold()
    b = start_paired(srv, nats_server, agents, client, chat=b_hold)
    srv.c.scheduler.set_island_approval(uuid.UUID(a.host_id), False, by="test", reason="route to b")
    jid = submit(client, "llm-chat", CHAT)
    wait_for(lambda: jid in b_hold.started, 20)
    srv.c.scheduler.set_island_approval(uuid.UUID(a.host_id), True, by="test", reason="back")
    errors0 = a.stats["nats_errors"]
    # A publishes on B's subject: the server drops it (permissions violation)
    raw(agents, a, "output", pn.JobOutput(job_id=jid, seq=1, chunk="forged", is_final=False), host=b.host_id)
    wait_for(lambda: a.stats["nats_errors"] > errors0, 5)
    assert "Permissions Violation" in nats_server.log_text() or "Publish Violation" in nats_server.log_text()
    # A publishes on its own subject about B's Job: the coordinator refuses it and cancels it at A
    refused = srv.nats.stats["refused:not_your_job"]
    raw(agents, a, "output", pn.JobOutput(job_id=jid, seq=1, chunk="forged", is_final=False))
    raw(agents, a, "status", pn.JobStatus(job_id=jid, state="succeeded", timestamp=0))
    wait_for(lambda: srv.nats.stats["refused:not_your_job"] >= refused + 2)
    assert not any(e["type"] == "token" for e in stream_events(srv, jid))
    assert job(client, jid)["status"] == "running"
    # A may not subscribe to B's jobs either: the server refuses the subscription
    errors1 = a.stats["nats_errors"]
    agents.call(a.nc.subscribe(pn.subject(b.host_id, "jobs")))
    agents.call(a.nc.flush())
    wait_for(lambda: a.stats["nats_errors"] > errors1, 5)
    assert client.delete(f"/jobs/{jid}").status_code == 200  # leaves no hold behind for later tests


def test_suspending_an_island_cuts_its_connection(srv, nats_server, consumer, agents):
    _, client = consumer
    a = start_paired(srv, nats_server, agents, client)
    assert a.nc.is_connected
    srv.c.scheduler.set_island_approval(uuid.UUID(a.host_id), False, by="test", reason="misbehaved")
    wait_for(lambda: f'"host-{a.host_id}"' not in nats_server.auth_file.read_text(), 10)
    wait_for(lambda: not a.nc.is_connected, 10)  # the reload dropped its connection
    errors = a.stats["nats_errors"]
    time.sleep(1.5)
    assert not a.nc.is_connected and a.stats["nats_errors"] > errors  # and its reconnects are refused
    # approved again: the user is back and the agent's endless reconnects succeed
    srv.c.scheduler.set_island_approval(uuid.UUID(a.host_id), True, by="test", reason="forgiven")
    wait_for(lambda: a.nc.is_connected, 15)


def test_nats_restart_mid_run_loses_no_job(srv, nats_server, consumer, agents):
    _, client = consumer
    start_paired(srv, nats_server, agents, client, chat=EchoBackend(tokens_per_s=20, first_token_s=0.01))
    # 8 Jobs on 6 slots: some stream through the outage, some wait for a slot and run after it
    jids = [submit(client, "llm-chat", {"prompt": f"job {i}", "max_tokens": 30}) for i in range(8)]
    wait_for(lambda: any(e["type"] == "token" for e in stream_events(srv, jids[0])), 20)
    nats_server.restart(down_s=1.0)
    wait_for(lambda: all(job(client, j)["status"] in ("completed", "failed") for j in jids), 60, 0.2)
    states = [job(client, j) for j in jids]
    for j in states:  # each Job finished: completed, or failed with its hold released (nothing charged)
        assert j["status"] == "completed" or j["credits_charged"] == 0, j
    assert sum(j["status"] == "completed" for j in states) >= 1


def test_agent_process_killed_mid_job_requeues_or_fails_with_refund(srv, nats_server, consumer, agents, tmp_path):
    _, client = consumer
    host_id, url = pair(srv, nats_server, agents, client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    env.update(PYTHONUNBUFFERED="1", COORDINATOR_LOG_FORMAT="json")
    cmd = [sys.executable, "-m", "coordinator", "island", "run", "--transport", "nats", "--server", url,
           "--host-id", host_id, "--heartbeat-s", "0.5", "--lease-every-s", "1", "--tokens-per-s", "3",
           "--first-token-s", "0.01", "--state-dir", str(tmp_path / "island")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: srv.online(host_id), 20)
        before = balance(client)
        jid = submit(client, "llm-chat", {"prompt": "killed", "max_tokens": 40})
        wait_for(lambda: any(e["type"] == "token" for e in stream_events(srv, jid)), 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        # something was streamed: the lease lapses and the Job fails with its hold released
        wait_for(status_is(client, jid, "failed"), 30, 0.2)
        assert job(client, jid)["credits_charged"] == 0
        assert balance(client) == before  # nothing was charged: the hold is released in full
        isl = srv.c.committer.query(lambda uow: uow.get(uuid.UUID(host_id)))
        assert isl.jobs_failed == 1 and isl.karma_milli < karma_rules.START_MILLI  # the lapsed lease cost karma
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_reference_agent_process_pairs_and_restarted_unstreamed_job_is_requeued(srv, nats_server, consumer,
                                                                                 agents, tmp_path):
    _, client = consumer
    host_id, url = pair(srv, nats_server, agents, client)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    env.update(PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "coordinator", "island", "run", "--transport", "nats", "--server", url,
           "--host-id", host_id, "--heartbeat-s", "0.5", "--lease-every-s", "1", "--first-token-s", "60"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: srv.online(host_id), 20)
        jid = submit(client, "llm-chat", {"prompt": "never streams", "max_tokens": 10})
        wait_for(status_is(client, jid, "running"), 20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        # nothing was streamed: back to the queue (no other Island can take it: it waits there)
        wait_for(lambda: job(client, jid)["status"] == "queued", 30, 0.2)
        isl = srv.c.committer.query(lambda uow: uow.get(uuid.UUID(host_id)))
        assert isl.karma_milli < karma_rules.START_MILLI  # below a new Island's 50
        client.delete(f"/jobs/{jid}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_operator_rotates_nats_credentials_from_the_cli(srv, nats_server, consumer, agents):
    _, client = consumer
    host_id, _ = pair(srv, nats_server, agents, client)
    r = client.post(f"/islands/{host_id}/nats-credentials")
    assert r.status_code == 201 and r.json()["nats"]["user"] == f"host-{host_id}"
    from scheduler.pairing import check_password

    password = r.json()["nats"]["password"]
    wait_for(lambda: check_password(password, srv.c.scheduler.core.registry.islands[host_id].nats_password_hash))
    r2 = httpx.post(f"{srv.url}/api/v1/admin/islands/{host_id}/suspend", json={"reason": "x"},
                    headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert r2.status_code == 200


# ------------------------------------------------------------------ on both storage backends
@pytest.mark.parametrize("backend_name", ["embedded", "pg_redis"])
def test_pairing_and_a_chat_job_on_each_backend(backend_name, tmp_path):
    """Pairing codes (memory / Redis), the Island's events (SQLite / PostgreSQL) and a Job
    over NATS, end to end, with the whole server app (`create_server_app`'s wiring)."""
    from tests.api_harness import make_backend

    backend = make_backend(backend_name, tmp_path)
    ns = NatsServer(tmp_path / "nats")
    loop = AgentLoop()
    server = None
    try:
        env = backend.env(COORDINATOR_PROJECTIONS="off", COORDINATOR_AUTO_APPROVE_ISLANDS="true",
                          COORDINATOR_HEARTBEAT_S="1", COORDINATOR_RATE_LIMIT_PER_MIN="1000000", **ns.env())
        server = ThreadServer(env)
        wait_for(lambda: server.nats.connected.is_set())
        _, key = server.account(credits="100")
        loop.paired = []
        with httpx.Client(base_url=server.url + "/api/v1", headers={"Authorization": f"Bearer {key}"},
                          timeout=20) as client:
            agent = start_paired(server, ns, loop, client)
            isl = server.c.committer.query(lambda uow: uow.get(uuid.UUID(agent.host_id)))
            assert isl.transport == "nats" and isl.approval == "approved"
            jid = submit(client, "llm-chat", CHAT)
            wait_for(status_is(client, jid, "completed"), 30)
            assert job(client, jid)["usage"]["completion_tokens"] == 12
    finally:
        loop.close()
        if server is not None:
            server.stop()
        ns.close()
        backend.cleanup()


def test_coordinator_starts_while_nats_is_down_and_connects_when_it_is_back(tmp_path):
    ns = NatsServer(tmp_path / "nats")
    ns.stop()
    env = {"COORDINATOR_DATA_DIR": str(tmp_path / "data"), "COORDINATOR_LOG_LEVEL": "error", **ns.env()}
    server = ThreadServer(env)
    try:
        assert httpx.get(server.url + "/api/v1/health").status_code in (200, 503)  # the API is up without NATS
        assert not server.nats.connected.is_set()
        ns.start()
        wait_for(lambda: server.nats.connected.is_set(), 15)
        assert server.nats.stats["nats_errors"] >= 1  # the refused connection attempts were seen and retried
    finally:
        server.stop()
        ns.close()
