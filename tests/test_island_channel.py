"""The Island channel in one process (embedded store, in-process bus): the real HTTP app
with the Island routes on 127.0.0.1, reference agents on their own event loop, and
hand-driven Islands (RawIsland) for everything an honest agent never does."""

from __future__ import annotations

import asyncio
import threading
import uuid
from decimal import Decimal

import httpx
import pytest

from protocol import island as p
from island.agent import AgentConfig, IslandAgent
from island.backends import EchoBackend, ImageBackend
from tests.island_harness import OPERATOR_TOKEN, RawIsland, ThreadServer, wait_for

pytestmark = pytest.mark.timeout(60)

LITE = {"cargos": ["llm-chat-lite"], "models": ["tinyllama-1.1b-chat", "qwen2.5-0.5b-instruct"], "ram_mb": 16_000,
        "slots": 4}
CHAT_INPUT = {"prompt": "hello island", "max_tokens": 12}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    env = {"COORDINATOR_DATA_DIR": str(tmp_path_factory.mktemp("chan") / "data"), "COORDINATOR_LEASE_S": "2",
           "COORDINATOR_LEASE_RENEW_S": "1", "COORDINATOR_HEARTBEAT_S": "1", "COORDINATOR_ACK_TIMEOUT_S": "3",
           "COORDINATOR_LOG_FORMAT": "console", "COORDINATOR_LOG_LEVEL": "warning",
           "COORDINATOR_RATE_LIMIT_PER_MIN": "1000000"}
    server = ThreadServer(env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def consumer(srv):
    account_id, key = srv.account(credits="1000")
    client = httpx.Client(base_url=srv.url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=20)
    yield account_id, client
    client.close()


class AgentLoop:
    """Reference agents on an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runs: list[tuple[IslandAgent, object]] = []

    def start(self, agent: IslandAgent) -> IslandAgent:
        fut = asyncio.run_coroutine_threadsafe(agent.run(), self.loop)
        self.runs.append((agent, fut))
        return agent

    def stop(self, agent: IslandAgent, force: bool = False) -> int:
        fut = next(f for a, f in self.runs if a is agent)
        self.loop.call_soon_threadsafe(agent.request_stop, force)
        return fut.result(15)

    def close(self) -> None:
        for agent, fut in self.runs:
            if not fut.done():
                self.loop.call_soon_threadsafe(agent.request_stop, True)
                try:
                    fut.result(10)
                except Exception:  # noqa: BLE001
                    pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def agents():
    loop = AgentLoop()
    yield loop
    loop.close()


def submit(client: httpx.Client, workload: str, inp: dict) -> str:
    r = client.post("/jobs", json={"workload": workload, "input": inp})
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def job(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/jobs/{job_id}").json()["data"]


def stream_events(srv: ThreadServer, job_id: str) -> list[dict]:
    import json

    entries = srv.call(srv.services.broker.read(job_id, None))
    return [json.loads(data) for _, data in entries]


def status_is(client: httpx.Client, job_id: str, *statuses: str):
    return lambda: job(client, job_id)["status"] in statuses


# ------------------------------------------------------------------ honest agents
def test_chat_and_image_complete_through_reference_agents_and_stream(srv, consumer, agents):
    _, client = consumer
    chat_id, chat_tok = srv.island("echo")
    img_id, img_tok = srv.island("image")
    agents.start(IslandAgent(AgentConfig(server=srv.url, token=chat_tok, backend=EchoBackend(tokens_per_s=400),
                                         batch_tokens=4)))
    agents.start(IslandAgent(AgentConfig(server=srv.url, token=img_tok, backend=ImageBackend(steps_per_s=400))))
    wait_for(lambda: srv.online(chat_id) and srv.online(img_id))

    jid = submit(client, "llm-chat", CHAT_INPUT)
    wait_for(status_is(client, jid, "completed"))
    done = job(client, jid)
    expected = "".join(EchoBackend.reply(done["input"].get("model") or "mistral-7b-instruct", done["input"], 48))
    assert done["output"] == expected
    assert done["usage"]["completion_tokens"] == 12
    events = stream_events(srv, jid)
    tokens = [e["content"] for e in events if e["type"] == "token"]
    assert len(tokens) >= 3 and "".join(tokens) == expected  # batched, in order, nothing twice
    assert events[-1]["type"] == "done"

    iid = submit(client, "sdxl", {"prompt": "a lighthouse", "width": 512, "height": 512, "steps": 6, "seed": 7})
    wait_for(status_is(client, iid, "completed"))
    out = job(client, iid)
    import base64
    import json

    from island.png import procedural_png, read_png_header

    image = json.loads(out["output"])
    png = base64.b64decode(image["image_data"])
    assert read_png_header(png) == (512, 512) and image["seed"] == 7
    assert png == procedural_png("a lighthouse", 7, 512, 512, 6)  # deterministic from prompt and seed
    kinds = [e["type"] for e in stream_events(srv, iid)]
    assert kinds.count("progress") == 6 and kinds.index("image") > kinds.index("progress")
    assert out["usage"]["steps"] == 6 if "steps" in out["usage"] else True


def test_ctrl_c_returns_a_job_that_did_not_start_streaming(srv, consumer, agents):
    _, client = consumer
    slow_id, slow_tok = srv.island("slow-lite")
    slow = agents.start(IslandAgent(AgentConfig(server=srv.url, token=slow_tok, grace_s=0.3,
                                                capabilities=p.Capabilities(**LITE),
                                                backend=EchoBackend(first_token_s=30))))
    wait_for(lambda: srv.online(slow_id))
    jid = submit(client, "llm-chat-lite", CHAT_INPUT)
    wait_for(status_is(client, jid, "running"))
    assert agents.stop(slow) == 0  # drains: the Job does not finish in 0.3 s, so it is returned
    assert slow.stats["returned"] == 1
    wait_for(lambda: not srv.online(slow_id))
    assert job(client, jid)["status"] == "queued"  # nothing was streamed: back in the queue
    fast_id, fast_tok = srv.island("fast-lite")
    agents.start(IslandAgent(AgentConfig(server=srv.url, token=fast_tok, capabilities=p.Capabilities(**LITE),
                                         backend=EchoBackend(tokens_per_s=500))))
    wait_for(status_is(client, jid, "completed"))


# ------------------------------------------------------------------ refused, never applied
def test_bad_token_and_unsupported_version_are_refused(srv):
    iid, token = srv.island("tok")
    bad = RawIsland(srv.url, token[:-4] + "AAAA", hello=False)
    assert bad.expect(p.Error).code == "unauthorized"
    assert bad.wait_closed()[0] == p.CLOSE_UNAUTHORIZED
    bad2 = RawIsland(srv.url, "ak_not_an_island_token", hello=False)
    assert bad2.wait_closed()[0] == p.CLOSE_UNAUTHORIZED
    old = RawIsland(srv.url, token, protocol=99)
    assert old.expect(p.Error).code == "unsupported_version"
    assert old.wait_closed()[0] == p.CLOSE_UNSUPPORTED_VERSION


def test_forged_ids_replays_gaps_and_foreign_jobs_are_refused(srv, consumer):
    _, client = consumer
    a_id, a_tok = srv.island("honest")
    b_id, b_tok = srv.island("intruder")
    a = RawIsland(srv.url, a_tok, caps=LITE)
    wait_for(lambda: srv.online(a_id))
    jid = submit(client, "llm-chat-lite", CHAT_INPUT)
    offer = a.expect(p.Offer)
    assert offer.job_id == jid and offer.kind == "chat" and offer.input["prompt"] == "hello island"
    b = RawIsland(srv.url, b_tok, caps=LITE)
    try:
        # the intruder cannot take, feed, fail or complete A's Job, nor a made-up one
        b.send(p.Accept(job_id=jid))
        assert b.expect(p.Error, lambda e: e.job_id == jid).code == "not_your_job"
        a.send(p.Accept(job_id=jid))
        a.expect(p.Accepted)
        a.send(p.Output(job_id=jid, seq=1, tokens=["Hello", ","]))
        for msg in (p.Output(job_id=jid, seq=2, tokens=["forged"]), p.Fail(job_id=jid, reason="x"),
                    p.Complete(job_id=jid, usage={"prompt_tokens": 1, "completion_tokens": 1}),
                    p.Accept(job_id=str(uuid.uuid4())), p.Output(job_id="not-a-uuid", seq=1, tokens=["x"])):
            b.send(msg)
            assert b.expect(p.Error, lambda e, m=msg: e.job_id == m.job_id).code == "not_your_job"
        b.send(p.Renew(job_ids=[jid]))
        assert b.expect(p.Cancel).reason == "not_yours"
        # A's own stream: a replay and a gap are refused and change nothing
        a.send(p.Output(job_id=jid, seq=1, tokens=["Hello", ","]))
        err = a.expect(p.Error)
        assert (err.code, err.seq) == ("bad_sequence", 1) and "replay" in err.message
        a.send(p.Output(job_id=jid, seq=5, tokens=["skipped"]))
        assert "gap" in a.expect(p.Error).message
        a.send_raw('{"type": "output", "job_id": 3}')
        assert a.expect(p.Error).code == "bad_message"
        a.send(p.Output(job_id=jid, seq=2, tokens=[" world"]))
        a.send(p.Complete(job_id=jid, usage={"prompt_tokens": 3, "completion_tokens": 3}, compute_ms=10))
        assert a.expect(p.Finished).status == "completed"
        done = job(client, jid)
        assert done["status"] == "completed" and done["output"] == "Hello, world"
        assert [e["content"] for e in stream_events(srv, jid) if e["type"] == "token"] == ["Hello,", " world"]
        # after completion, nothing more is accepted for it
        a.send(p.Output(job_id=jid, seq=3, tokens=["late"]))
        assert a.expect(p.Error, lambda e: e.seq == 3).code == "not_your_job"
        assert job(client, jid)["output"] == "Hello, world"
    finally:
        a.close()
        b.close()


def test_message_after_the_lease_moved_is_refused(srv, consumer):
    _, client = consumer
    a_id, a_tok = srv.island("lapser")
    a = RawIsland(srv.url, a_tok, caps=LITE)
    try:
        wait_for(lambda: srv.online(a_id))
        jid = submit(client, "llm-chat-lite", CHAT_INPUT)
        a.expect(p.Offer, lambda o: o.job_id == jid)
        a.send(p.Accept(job_id=jid))
        a.expect(p.Accepted)
        # A never renews: the lease (2 s) lapses, nothing was streamed -> re-queued; A is told
        cancel = a.expect(p.Cancel, lambda c: c.job_id == jid, timeout=8)
        assert cancel.reason == "lease_lapsed"
        assert job(client, jid)["status"] in ("queued", "assigned")
        a.send(p.Output(job_id=jid, seq=1, tokens=["too late"]))
        assert a.expect(p.Error, lambda e: e.job_id == jid).code == "not_your_job"
        a.send(p.Complete(job_id=jid, usage={"prompt_tokens": 1, "completion_tokens": 1}))
        assert a.expect(p.Error, lambda e: e.job_id == jid and e.seq == 0).code == "not_your_job"
        assert not any(e["type"] == "token" for e in stream_events(srv, jid))
        srv.c.scheduler.cancel(uuid.UUID(jid), account_id=None, by="test")  # tidy up: no other lite Island
    finally:
        a.close()


def test_resume_after_reconnect_and_lost_jobs_are_returned(srv, consumer):
    _, client = consumer
    a_id, a_tok = srv.island("resumer")
    a = RawIsland(srv.url, a_tok, caps=LITE)
    wait_for(lambda: srv.online(a_id))
    jid = submit(client, "llm-chat-lite", CHAT_INPUT)
    a.expect(p.Offer, lambda o: o.job_id == jid)
    a.send(p.Accept(job_id=jid))
    a.expect(p.Accepted)
    a.send(p.Output(job_id=jid, seq=1, tokens=["one"]))
    a.send(p.Heartbeat(seq=99, running=[jid]))
    a.expect(p.HeartbeatAck, lambda h: h.seq == 99)
    a.close()
    # a new connection (it could be another coordinator process) resumes where the stream was
    a2 = RawIsland(srv.url, a_tok, caps=LITE, running=[jid])
    try:
        (state,) = a2.welcome.jobs
        assert (state.job_id, state.status, state.last_seq) == (jid, "running", 1)
        a2.send(p.Output(job_id=jid, seq=1, tokens=["one"]))  # resent by mistake: refused, not duplicated
        assert a2.expect(p.Error).code == "bad_sequence"
        a2.send(p.Output(job_id=jid, seq=2, tokens=[" two"]))
        a2.send(p.Complete(job_id=jid, usage={"prompt_tokens": 2, "completion_tokens": 2}, compute_ms=5))
        assert a2.expect(p.Finished).status == "completed"
        assert job(client, jid)["output"] == "one two"
        # a Job the Island holds but does not name when it reconnects was lost: returned at once
        jid2 = submit(client, "llm-chat-lite", CHAT_INPUT)
        a2.expect(p.Offer, lambda o: o.job_id == jid2)
        a2.send(p.Accept(job_id=jid2))
        a2.expect(p.Accepted)
    finally:
        a2.close()
    a3 = RawIsland(srv.url, a_tok, caps=LITE, running=[])
    try:
        wait_for(lambda: job(client, jid2)["status"] in ("queued", "assigned"))
        a3.nothing(p.Offer, 0.3)  # the Island that lost it is excluded from this Job
    finally:
        a3.close()
        srv.c.scheduler.cancel(uuid.UUID(jid2), account_id=None, by="test")


def test_cancel_reaches_the_island_and_a_second_connection_replaces_the_first(srv, consumer):
    _, client = consumer
    a_id, a_tok = srv.island("cancelled")
    a = RawIsland(srv.url, a_tok, caps=LITE)
    try:
        wait_for(lambda: srv.online(a_id))
        jid = submit(client, "llm-chat-lite", CHAT_INPUT)
        a.expect(p.Offer, lambda o: o.job_id == jid)
        a.send(p.Accept(job_id=jid))
        a.expect(p.Accepted)
        a.send(p.Output(job_id=jid, seq=1, tokens=["a", " b"]))
        r = client.delete(f"/jobs/{jid}")
        assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
        assert a.expect(p.Cancel, lambda c: c.job_id == jid).reason == "cancelled"
        twin = RawIsland(srv.url, a_tok, caps=LITE)
        assert a.wait_closed()[0] == p.CLOSE_REPLACED
        twin.close()
    finally:
        a.close()


def test_suspended_island_gets_nothing_and_operator_api(srv, consumer):
    _, client = consumer
    s_id, s_tok = srv.island("suspect")
    op = httpx.Client(base_url=srv.url + "/api/v1/admin", timeout=10)
    assert op.post(f"/islands/{s_id}/suspend", json={"reason": "x"}).status_code == 401
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    assert op.post(f"/islands/{s_id}/suspend", json={}, headers=headers).status_code == 422  # a reason is required
    r = op.post(f"/islands/{s_id}/suspend", json={"reason": "abuse report"}, headers={**headers, "X-Operator": "ops"})
    assert r.status_code == 200 and r.json()["data"]["approval"] == "suspended"
    s = RawIsland(srv.url, s_tok, caps=LITE)
    try:
        assert s.welcome.approval == "suspended"
        wait_for(lambda: srv.online(s_id))
        jid = submit(client, "llm-chat-lite", CHAT_INPUT)
        s.nothing(p.Offer, 1.0)
        assert job(client, jid)["status"] == "queued"
        shown = op.get(f"/islands/{s_id}", headers=headers).json()["data"]
        assert shown["id"] == s_id and shown["approval"] == "suspended"
        r = op.post(f"/islands/{s_id}/approve", json={"reason": "cleared"}, headers=headers)
        assert r.json()["data"]["approval"] == "approved"
        assert s.expect(p.Offer).job_id == jid  # approved: offers flow again
        s.send(p.Reject(job_id=jid, reason="test"))
        srv.c.scheduler.cancel(uuid.UUID(jid), account_id=None, by="test")
    finally:
        s.close()
        op.close()


def test_register_island_over_http_and_connect_with_its_token(srv, consumer):
    account_id, client = consumer
    r = client.post("/islands", json={"name": "my gaming pc", "region": "eu-west",
                                      "capabilities": {"cargos": ["llm-chat-lite"], "slots": 2}})
    assert r.status_code == 201, r.text
    body = r.json()
    island, token = body["data"], body["token"]
    assert island["approval"] == "pending" and island["owner_account_id"] == str(account_id)
    assert island["capabilities"]["region"] == "eu-west" and token.startswith("it_")
    assert p.token_island_id(token) == uuid.UUID(island["id"])
    assert client.post("/islands", json={"name": "x", "capabilities": {"slots": 0}}).status_code == 422
    assert client.post("/islands", json={"name": ""}).status_code == 422
    assert httpx.post(srv.url + "/api/v1/islands", json={"name": "anon"}).status_code == 401
    mine = client.get("/islands").json()["data"]
    assert [i["id"] for i in mine] == [island["id"]]
    assert client.get(f"/islands/{island['id']}").json()["data"]["name"] == "my gaming pc"
    other, _ = srv.island("someone else's")
    assert client.get(f"/islands/{other}").status_code == 404
    raw = RawIsland(srv.url, token, caps=LITE)
    try:
        assert raw.welcome.approval == "pending" and raw.welcome.island_id == island["id"]
        wait_for(lambda: srv.online(island["id"]))
        got = client.get(f"/islands/{island['id']}").json()["data"]
        assert got["online"] and got["connected_here"] and got["karma"] == 50  # decision 0051: a new Island starts at 50
        assert Decimal(str(got["karma"])) == 50
    finally:
        raw.close()


def test_openai_backend_agent_forwards_chat_jobs_with_real_usage(srv, consumer, agents):
    from island.backends import OpenAIBackend
    from tests.island_harness import FakeOpenAI

    _, client = consumer
    fake = FakeOpenAI(["Bonjour", ",", " monde"], usage={"prompt_tokens": 21, "completion_tokens": 3})
    try:
        iid, tok = srv.island("llama-box")
        backend = OpenAIBackend(base_url=fake.url, model="llama3.2:1b", models=["tinyllama-1.1b-chat"],
                                cargos=["llm-chat-lite"])
        agents.start(IslandAgent(AgentConfig(server=srv.url, token=tok, backend=backend)))
        wait_for(lambda: srv.online(iid))
        jid = submit(client, "llm-chat-lite", {"prompt": "say hello in French", "max_tokens": 10})
        wait_for(status_is(client, jid, "completed"))
        done = job(client, jid)
        assert done["output"] == "Bonjour, monde"
        assert (done["usage"]["prompt_tokens"], done["usage"]["completion_tokens"]) == (21, 3)
        assert fake.requests[-1]["body"]["model"] == "llama3.2:1b"
    finally:
        fake.stop()


def test_agent_reconnects_and_resumes_its_running_job_exactly(srv, consumer, agents):
    from islandlink.channel import _Close

    _, client = consumer
    iid, tok = srv.island("flaky-link")
    agent = agents.start(IslandAgent(AgentConfig(server=srv.url, token=tok, capabilities=p.Capabilities(**LITE),
                                                 backend=EchoBackend(tokens_per_s=20, first_token_s=0),
                                                 backoff_initial_s=0.2, batch_tokens=2)))
    wait_for(lambda: srv.online(iid))
    jid = submit(client, "llm-chat-lite", {"prompt": "keep going", "max_tokens": 30})
    wait_for(lambda: any(e["type"] == "token" for e in stream_events(srv, jid)))

    def drop_connection() -> None:  # as if the coordinator process restarted under the Island
        for s in srv.channel.sessions.values():
            if s.island_id == iid:
                s.closing = _Close(1012, "restart")
                s.out.put_nowait(None)

    srv.server.loop.call_soon_threadsafe(drop_connection)
    wait_for(lambda: agent.stats["connects"] >= 2)
    wait_for(lambda: agent.welcome is not None and agent.welcome.jobs)
    assert [(j.job_id, j.status) for j in agent.welcome.jobs] == [(jid, "running")]  # resumed mid-stream
    wait_for(status_is(client, jid, "completed"))
    done = job(client, jid)
    tokens = "".join(e["content"] for e in stream_events(srv, jid) if e["type"] == "token")
    assert done["usage"]["completion_tokens"] == 30 and tokens == done["output"]  # nothing lost, nothing twice
    assert done["output"] == "".join(EchoBackend.reply("tinyllama-1.1b-chat", done["input"], 48))


def test_heartbeat_asking_prices_are_applied_once_and_bad_ones_refused(srv):
    from eventsourcing.utils import get_topic

    from scheduler.islands import Island
    from store.factory import iter_log

    a_id, a_tok = srv.island("asker")
    a = RawIsland(srv.url, a_tok, caps=LITE, heartbeat_s=30)
    topic = (get_topic(Island.AsksChanged),)

    def changes() -> list:
        return [e for _, e in iter_log(srv.c.app, topics=topic) if str(e.originator_id) == a_id]

    try:
        rec = srv.c.scheduler.core.registry.islands[a_id]
        prices = {"llm-chat-lite": "0.5", "_default": "0.6"}
        for seq in (1, 2, 3):  # the same map three times: one event
            a.send(p.Heartbeat(seq=seq, slots_total=4, free_slots=4, asking_prices=prices))
            a.expect(p.HeartbeatAck, lambda h, s=seq: h.seq == s)
        wait_for(lambda: rec.ask_for("llm-chat-lite") == 500_000)
        assert len(changes()) == 1 and changes()[0].asks_micro == {"_default": 600_000, "llm-chat-lite": 500_000}
        a.send(p.Heartbeat(seq=4, slots_total=4, free_slots=4, asking_prices={"llm-chat-lite": "-1"}))
        err = a.expect(p.Error)
        assert err.code == "bad_asks" and "llm-chat-lite" in err.message
        assert len(changes()) == 1 and rec.ask_for("llm-chat-lite") == 500_000  # nothing changed
        a.send(p.Heartbeat(seq=5, slots_total=4, free_slots=4, asking_prices={"llm-chat-lite": "0.7"}))
        wait_for(lambda: rec.ask_for("llm-chat-lite") == 700_000)
        assert len(changes()) == 2
    finally:
        a.close()
