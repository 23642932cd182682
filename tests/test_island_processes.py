"""Real processes on loopback: a coordinator process (the HTTP API with the Island
routes: `python -m tests.island_harness serve`, to be replaced by `coordinator serve` once
it mounts them) and reference agents started with `coordinator island run`, killed with
SIGKILL or stopped with SIGINT like a person would. Jobs go in through the consumer API
and come out of its SSE stream.

Settings are short so that leases lapse quickly: lease 2 s (renewed every 1 s),
heartbeats every 1 s, offers expire after 3 s.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol import island as p
from tests.island_harness import OPERATOR_TOKEN, RawIsland, subprocess_env, wait_for

pytestmark = pytest.mark.timeout(120)

COORDINATOR = str(Path(sys.executable).parent / "coordinator")
ROOT = Path(__file__).resolve().parent.parent
LITE_ARGS = ["--cargos", "llm-chat-lite", "--models", "tinyllama-1.1b-chat,qwen2.5-0.5b-instruct", "--vram-mb", "0"]
CHAT_ARGS = ["--cargos", "llm-chat", "--models", "mistral-7b-instruct"]


class Agent:
    """`coordinator island run ...` as a child process; its JSON log lines are read back."""

    def __init__(self, world: World, island: str, *args: str, backend: str = "echo") -> None:
        self.island_id, token = world.islands[island]
        self.log_path = world.tmp / f"agent-{island}-{uuid.uuid4().hex[:6]}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [COORDINATOR, "island", "run", "--server", world.url, "--token", token, "--backend", backend, *args],
            env=world.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def saw(self, event: str, **fields: Any) -> bool:
        return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in self.events())

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self.log.close()


@dataclass
class World:
    tmp: Path
    env: dict[str, str]
    url: str
    server: subprocess.Popen
    key: str
    account_id: str
    islands: dict[str, tuple[str, str]]
    data_dir: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url + "/api/v1", headers={"Authorization": f"Bearer {self.key}"},
                            timeout=20)

    def operator(self) -> httpx.Client:
        return httpx.Client(base_url=self.url + "/api/v1/admin",
                            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}, timeout=10)

    def online(self, name: str) -> bool:
        with self.operator() as op:
            return op.get(f"/islands/{self.islands[name][0]}").json()["data"]["online"]

    def karma_events(self, name: str) -> list[Any]:
        """The Island's KarmaChanged events, read from the event store (SQLite allows a
        second reader while the coordinator writes)."""
        from eventsourcing.utils import get_topic

        from scheduler.islands import Island
        from store.factory import StoreConfig, iter_log, open_app

        app = open_app(StoreConfig(database_url=None, data_dir=self.data_dir))
        try:
            return [ev for _, ev in iter_log(app, topics=(get_topic(Island.KarmaChanged),))
                    if str(ev.originator_id) == self.islands[name][0]]
        finally:
            app.close()


ISLANDS = ("echo-a", "echo-b", "image", "lite-killed", "lite-slow", "suspect", "intruder")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from protocol.island import make_token
    from api.keys import KeyStore
    from config.settings import Settings
    from coordinator.wiring import build
    from ledger.pricing import credits_to_micro

    tmp = tmp_path_factory.mktemp("isl-proc")
    data = tmp / "data"
    env = subprocess_env(data, COORDINATOR_LEASE_S="2", COORDINATOR_LEASE_RENEW_S="1", COORDINATOR_HEARTBEAT_S="1",
                         COORDINATOR_ACK_TIMEOUT_S="3", COORDINATOR_ADMIN_TOKEN=OPERATOR_TOKEN,
                         COORDINATOR_RATE_LIMIT_PER_MIN="1000000")
    # accounts, an API key and the Islands, written before the coordinator process starts
    c = build(Settings.from_env(env))
    try:
        consumer, owner = uuid.uuid4(), uuid.uuid4()
        c.ledger.open_account(consumer, "consumer@test.example", kyc_verified=True,
                              initial_grant_micro=credits_to_micro("1000"))
        c.ledger.open_account(owner, "owner@test.example", kyc_verified=True)
        key, _ = KeyStore(c.committer, fresh_reads=False).issue(consumer, "test")
        islands = {}
        for name in ISLANDS:
            iid = uuid.uuid4()
            creds = c.scheduler.register_island(owner, name, {}, approve=True, island_id=iid, token=make_token(iid))
            islands[name] = (creds.island_id, creds.token)
    finally:
        c.close()
    server_log = open(tmp / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen([sys.executable, "-m", "tests.island_harness", "serve"], env=env,
                              stdout=subprocess.PIPE, stderr=server_log, cwd=ROOT)
    try:
        line = server.stdout.readline()
        url = json.loads(line)["url"]
    except Exception:
        server.kill()
        raise RuntimeError(f"coordinator did not start: {(tmp / 'server.log').read_text()[-3000:]}") from None
    yield World(tmp, env, url, server, key, str(consumer), islands, data)
    server.send_signal(signal.SIGTERM)
    try:
        assert server.wait(20) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server_log.close()


def submit(client: httpx.Client, workload: str, inp: dict) -> str:
    r = client.post("/jobs", json={"workload": workload, "input": inp})
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def status(client: httpx.Client, job_id: str) -> str:
    return client.get(f"/jobs/{job_id}").json()["data"]["status"]


def sse(client: httpx.Client, job_id: str, *, until_token: bool = False, timeout: float = 20) -> list[dict]:
    events = []
    with client.stream("GET", f"/jobs/{job_id}/stream", timeout=timeout) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                if until_token and events[-1]["type"] == "token":
                    break
    return events


def test_chat_and_image_jobs_complete_through_two_agent_processes(world):
    echo = Agent(world, "echo-b", *CHAT_ARGS, "--tokens-per-s", "200")
    image = Agent(world, "image", "--steps-per-s", "200", backend="image")
    try:
        wait_for(lambda: world.online("echo-b") and world.online("image"), timeout_s=15)
        with world.client() as client:
            jid = submit(client, "llm-chat", {"prompt": "tell me about islands", "max_tokens": 30})
            events = sse(client, jid)
            assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 30
            text = "".join(e["content"] for e in events if e["type"] == "token")
            assert text.startswith("Echo: tell me about islands")
            assert client.get(f"/jobs/{jid}").json()["data"]["output"] == text

            iid = submit(client, "sdxl", {"prompt": "harbour at dusk", "width": 512, "height": 768, "steps": 5})
            events = sse(client, iid)
            kinds = [e["type"] for e in events]
            assert kinds.count("progress") == 5 and "image" in kinds and kinds[-1] == "done"
            img = next(e for e in events if e["type"] == "image")
            from island.png import read_png_header

            import base64

            assert read_png_header(base64.b64decode(img["image_data"])) == (512, 768)
            assert status(client, iid) == "completed"
    finally:
        assert echo.stop() == 0 and image.stop() == 0  # Ctrl-C: drain, bye, exit 0
    wait_for(lambda: echo.saw("job_finished", job_id=jid, status="completed"), timeout_s=5)


def test_killed_agent_with_nothing_streamed_requeues_to_the_other(world):
    slow = Agent(world, "echo-a", *CHAT_ARGS, "--first-token-s", "60")
    other = None
    try:
        wait_for(lambda: world.online("echo-a"), timeout_s=15)
        with world.client() as client:
            jid = submit(client, "llm-chat", {"prompt": "who takes over?", "max_tokens": 10})
            wait_for(lambda: status(client, jid) == "running", timeout_s=10)
            wait_for(lambda: slow.saw("job_started", job_id=jid), timeout_s=5)
            other = Agent(world, "echo-b", *CHAT_ARGS, "--tokens-per-s", "200")
            wait_for(lambda: world.online("echo-b"), timeout_s=15)
            slow.kill()
            wait_for(lambda: status(client, jid) == "completed", timeout_s=15)
            wait_for(lambda: other.saw("job_finished", job_id=jid, status="completed"), timeout_s=5)
            events = sse(client, jid)
            assert [e["content"] for e in events if e["type"] == "status"].count("running") == 2
        karma = world.karma_events("echo-a")
        assert [(k.reason, k.job_id) for k in karma] == [("lapsed_lease", jid)] and karma[0].delta_milli < 0
    finally:
        if slow.proc.poll() is None:
            slow.kill()
        if other is not None:
            assert other.stop() == 0


def test_killed_agent_mid_stream_fails_the_job_with_a_full_release(world):
    agent = Agent(world, "lite-killed", *LITE_ARGS, "--tokens-per-s", "3", "--first-token-s", "0")
    try:
        wait_for(lambda: world.online("lite-killed"), timeout_s=15)
        with world.client() as client:
            before = client.get("/account").json()["data"]
            jid = submit(client, "llm-chat-lite", {"prompt": "stream then die", "max_tokens": 40})
            events = sse(client, jid, until_token=True)
            assert events[-1]["type"] == "token"
            agent.kill()
            wait_for(lambda: status(client, jid) == "failed", timeout_s=15)
            done = client.get(f"/jobs/{jid}").json()["data"]
            assert "mid-stream" in done["error"]
            after = client.get("/account").json()["data"]
            assert after["credits"] == before["credits"] and after["held"] == before["held"]  # nothing charged
            assert sse(client, jid)[-1]["type"] == "error"
        karma = world.karma_events("lite-killed")
        assert [(k.reason, k.job_id) for k in karma] == [("lapsed_lease", jid)]
    finally:
        if agent.proc.poll() is None:
            agent.kill()


def test_cancel_reaches_the_agent_and_another_island_cannot_complete_the_job(world):
    agent = Agent(world, "lite-slow", *LITE_ARGS, "--tokens-per-s", "5", "--first-token-s", "0")
    try:
        wait_for(lambda: world.online("lite-slow"), timeout_s=15)
        with world.client() as client:
            jid = submit(client, "llm-chat-lite", {"prompt": "slow and steady", "max_tokens": 40})
            wait_for(lambda: status(client, jid) == "running", timeout_s=10)
            intruder = RawIsland(world.url, world.islands["intruder"][1],
                                 caps={"cargos": ["sdxl"], "models": ["sdxl-base-1.0"], "vram_mb": 24_000})
            try:
                intruder.send(p.Complete(job_id=jid, usage={"prompt_tokens": 1, "completion_tokens": 1}))
                assert intruder.expect(p.Error, lambda e: e.job_id == jid).code == "not_your_job"
                intruder.send(p.Output(job_id=jid, seq=1, tokens=["forged"]))
                assert intruder.expect(p.Error, lambda e: e.job_id == jid and e.seq == 1).code == "not_your_job"
            finally:
                intruder.close()
            assert status(client, jid) == "running"
            r = client.delete(f"/jobs/{jid}")
            assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
            wait_for(lambda: agent.saw("job_cancelled", job_id=jid, reason="cancelled"), timeout_s=10)
            tokens = "".join(e["content"] for e in sse(client, jid) if e["type"] == "token")
            assert "forged" not in tokens
    finally:
        assert agent.stop() == 0


def test_a_suspended_island_gets_nothing(world):
    sid = world.islands["suspect"][0]
    with world.operator() as op:
        assert op.post(f"/islands/{sid}/suspend", json={"reason": "under review"}).status_code == 200
    agent = Agent(world, "suspect", *LITE_ARGS, "--tokens-per-s", "200")
    try:
        wait_for(lambda: world.online("suspect"), timeout_s=15)
        assert agent.saw("island_connected", approval="suspended")
        with world.client() as client:
            jid = submit(client, "llm-chat-lite", {"prompt": "anyone?", "max_tokens": 5})
            time.sleep(2.0)
            assert status(client, jid) == "queued"
            assert not agent.saw("job_started") and not agent.saw("offer_rejected")
            with world.operator() as op:
                assert op.post(f"/islands/{sid}/approve", json={"reason": "ok"}).status_code == 200
            wait_for(lambda: status(client, jid) == "completed", timeout_s=10)
            wait_for(lambda: agent.saw("job_finished", job_id=jid, status="completed"), timeout_s=5)
    finally:
        assert agent.stop() == 0


def test_an_agent_with_a_bad_token_stops_at_once(world):
    iid = world.islands["intruder"][0]
    bad = Agent.__new__(Agent)
    bad.island_id = iid
    bad.log_path = world.tmp / "agent-bad-token.log"
    bad.log = open(bad.log_path, "wb")  # noqa: SIM115
    forged = p.make_token(uuid.UUID(iid))  # the right Island id, the wrong secret
    bad.proc = subprocess.Popen([COORDINATOR, "island", "run", "--server", world.url, "--token", forged],
                                env=world.env, stdout=bad.log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert bad.proc.wait(15) == 3  # refused for good: no retry loop against a wrong token
        assert bad.saw("island_refused")
    finally:
        if bad.proc.poll() is None:
            bad.kill()
        bad.log.close()

