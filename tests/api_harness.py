"""Test harness for the HTTP API: a real server (uvicorn on an ephemeral port, in a
thread) over the embedded default or PostgreSQL + Redis, accounts with API keys, an
in-process test Island that runs offered Jobs through the real scheduler, and an SSE
reader. Used by tests/test_api_*.py."""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from api.services import ApiServices
from coordinator.app import build_services
from coordinator.server import CoordinatorServer, make_server
from config.settings import Settings
from store.factory import StoreConfig
from tests.conftest import REDIS_URL, drop_schema, env_for, make_store, require_redis

# A new Island has karma 0 and one failure takes it below llm-chat's minimum (0): the
# main chat Island never fails; tests of failures use "llm-chat-lite" and an Island of
# their own (LITE_CAPS).
LITE_CAPS = {"cargos": ["llm-chat-lite"], "models": ["tinyllama-1.1b-chat", "qwen2.5-0.5b-instruct"],
             "vram_mb": 0, "ram_mb": 16_000, "slots": 4, "region": "eu", "hardware_tier": 1}
CHAT_CAPS = {"cargos": ["llm-chat"],
             "models": ["mistral-7b-instruct", "llama-3.1-8b-instruct", "tinyllama-1.1b-chat"],
             "vram_mb": 24_000, "ram_mb": 64_000, "slots": 4, "region": "eu", "hardware_tier": 2}
IMAGE_CAPS = {"cargos": ["sdxl"], "models": ["sdxl-base-1.0"], "vram_mb": 24_000, "ram_mb": 64_000, "slots": 2,
              "region": "us", "hardware_tier": 3}
PNG_1PX = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()


def redis_cleanup(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.close()


@dataclass
class Backend:
    name: str
    store: StoreConfig
    redis_prefix: str | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = env_for(self.store, **{"COORDINATOR_LOG_FORMAT": "console", "COORDINATOR_LOG_LEVEL": "warning",
                                     "COORDINATOR_PROJECTIONS": "thread", **extra})
        if self.redis_prefix:
            env["COORDINATOR_REDIS_URL"] = REDIS_URL
            env["COORDINATOR_REDIS_PREFIX"] = self.redis_prefix
        return env

    def cleanup(self) -> None:
        if self.store.schema:
            drop_schema(self.store.schema)
        if self.redis_prefix:
            redis_cleanup(self.redis_prefix)


def make_backend(name: str, tmp_path: Path) -> Backend:
    if name == "embedded":
        return Backend(name, make_store("sqlite", tmp_path))
    store = make_store("postgres", tmp_path)
    require_redis()
    return Backend(name, store, redis_prefix=f"t{uuid.uuid4().hex[:10]}:")


class LiveServer:
    """The coordinator's HTTP server on 127.0.0.1:<ephemeral>, run in a thread."""

    def __init__(self, backend: Backend, **env: str) -> None:
        self.backend = backend
        self.settings = Settings.from_env(backend.env(**env))
        self.services: ApiServices = build_services(self.settings)
        self.c = self.services.coordinator
        self.server: CoordinatorServer = make_server(self.services, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.run, name="test-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.bound[0][1]}"
        self.islands: list[FakeIsland] = []

    def stop(self) -> None:
        for island in self.islands:
            island.stop()
        self.server.stop()
        self.thread.join(30)
        self.c.close()

    # ------------------------------------------------------------ helpers
    def account(self, *, credits: str | int = 100, kyc: bool = True, scopes: list[str] | None = None,
                email: str | None = None) -> tuple[uuid.UUID, str]:
        from ledger.pricing import credits_to_micro

        account_id = uuid.uuid4()
        self.c.ledger.open_account(account_id, email or f"{account_id.hex[:8]}@test.example", kyc_verified=kyc,
                                   initial_grant_micro=credits_to_micro(credits))
        secret, _ = self.services.keys.issue(account_id, "test", scopes)
        return account_id, secret

    def client(self, key: str | None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=30, **kw)

    def island(self, caps: dict[str, Any] | None = None, **kw: Any) -> FakeIsland:
        owner = uuid.uuid4()
        self.c.ledger.open_account(owner, f"owner-{owner.hex[:8]}@test.example", kyc_verified=True)
        island = FakeIsland(self, owner, caps or CHAT_CAPS, **kw)
        self.islands.append(island)
        return island


@dataclass
class FakeIsland:
    """Runs offered Jobs through the real scheduler: accept, tokens (or progress and an
    image) published on the broker as the Island channel will, complete with usage."""

    server: LiveServer
    owner: uuid.UUID
    caps: dict[str, Any]
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    token_delay_s: float = 0.005
    name: str = "test-island"
    fail: bool = False

    def __post_init__(self) -> None:
        sched = self.server.c.scheduler
        self.island_id = sched.register_island(self.owner, self.name, self.caps, approve=True).island_id
        self.offers: queue.Queue = queue.Queue()
        self.running = 0
        self.max_running = 0
        self.completed: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.server.services.listener.add(self)
        self._threads = [threading.Thread(target=self._heartbeats, daemon=True)]
        self._threads += [threading.Thread(target=self._work, daemon=True) for _ in range(self.caps.get("slots", 1))]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 10
        while not self.online():
            if time.monotonic() > deadline:
                raise RuntimeError("test island did not come online")
            time.sleep(0.01)

    def online(self) -> bool:
        rec = self.server.c.scheduler.core.registry.islands.get(self.island_id)
        return rec is not None and rec.online

    # SchedulerListener
    def offer(self, island_id: str, offer: Any) -> None:
        if island_id == self.island_id:
            self.offers.put(offer)

    def cancel(self, island_id: str, job_id: str) -> None:
        pass

    def job_changed(self, job_id: str, status: str, event: Any) -> None:
        pass

    def _heartbeats(self) -> None:
        sched = self.server.c.scheduler
        while not self._stop.is_set():
            sched.heartbeat(self.island_id, slots_total=self.caps.get("slots", 1))
            self._stop.wait(0.5)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                offer = self.offers.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self._run(offer)
            except Exception as exc:  # noqa: BLE001 - a race (cancelled meanwhile) is fine in tests
                print(f"test island: {offer.job_id}: {exc!r}")

    def _run(self, offer: Any) -> None:
        sched = self.server.c.scheduler
        pub = self.server.services.broker
        job_id = uuid.UUID(offer.job_id)
        sched.accept(self.island_id, job_id)
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.gate.wait(30)
            messages = offer.input.get("messages") or []
            prompt = str(offer.input.get("prompt") or (messages[-1]["content"] if messages else ""))
            if self.fail or prompt.startswith("fail"):
                sched.fail(self.island_id, job_id, "test island failure")
                return
            started = time.monotonic()
            if offer.kind == "image":
                steps = int(offer.input.get("steps", 4))
                for step in range(1, steps + 1, max(1, steps // 4)):
                    pub.publish_progress(offer.job_id, step, steps)
                pub.publish_progress(offer.job_id, steps, steps)
                width, height, seed = offer.input["width"], offer.input["height"], offer.input.get("seed") or 42
                pub.publish_image(offer.job_id, PNG_1PX, "png", width=width, height=height, seed=seed)
                output = json.dumps({"image_data": PNG_1PX, "format": "png", "width": width, "height": height,
                                     "seed": seed})
                usage: dict[str, Any] = {"steps": steps}
            else:
                words = [prompt[5:]] if prompt.startswith("echo:") else self.tokens
                delay = 0.03 if prompt.startswith("slow") else self.token_delay_s
                for word in words:
                    pub.publish_token(offer.job_id, word)
                    sched.output(self.island_id, job_id, 1)
                    if delay:
                        time.sleep(delay)
                output = "".join(words)
                usage = {"prompt_tokens": 7, "completion_tokens": len(words)}
            sched.complete(self.island_id, job_id, usage, output, int((time.monotonic() - started) * 1000) + 1)
            self.completed.append(offer.job_id)
        finally:
            with self._lock:
                self.running -= 1

    def stop(self) -> None:
        self._stop.set()
        self.gate.set()
        for t in self._threads:
            t.join(5)


# ------------------------------------------------------------------ SSE
@dataclass
class SseEvent:
    id: str | None
    data: dict[str, Any]


def read_sse(client: httpx.Client, path: str, *, last_event_id: str | None = None, limit: int | None = None,
             timeout_s: float = 20.0) -> list[SseEvent]:
    """Read a stream until it ends (after done/error) or `limit` events; a real
    line-by-line SSE parse (id:, data:, comments, blank line ends an event)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[SseEvent] = []
    with client.stream("GET", path, headers=headers, timeout=timeout_s) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        cur_id: str | None = None
        data_lines: list[str] = []
        for line in resp.iter_lines():
            if line.startswith(":"):
                continue
            if line == "":
                if data_lines:
                    data = json.loads("\n".join(data_lines))
                    # decision 0050: the id rides in the JSON (and, with ?id_lines=true, on an id: line too)
                    json_id = data.pop("id", None)
                    assert cur_id is None or cur_id == json_id, (cur_id, json_id)
                    events.append(SseEvent(cur_id or json_id, data))
                    data_lines, cur_id = [], None
                    if limit is not None and len(events) >= limit:
                        break
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                cur_id = value
            elif name == "data":
                data_lines.append(value)
    return events


def wait_for(predicate: Any, timeout_s: float = 15.0, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval_s)


# ------------------------------------------------------------------ `coordinator serve` as a process
class ServerProcess:
    """`coordinator serve --port 0` in a process of its own; the address comes from its
    "serving" log line."""

    def __init__(self, env: dict[str, str], *, timeout_s: float = 60.0) -> None:
        import os
        import subprocess
        import sys

        env = {**env, "COORDINATOR_LOG_FORMAT": "json", "COORDINATOR_LOG_LEVEL": "info"}
        self.proc = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "serve", "--port", "0"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.lines: list[str] = []
        self.url = ""
        found = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if not found.is_set() and '"serving"' in line:
                    try:
                        self.url = json.loads(line)["addresses"][0]
                    except (ValueError, KeyError, IndexError):
                        continue
                    found.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not found.wait(timeout_s):
            self.proc.kill()
            raise RuntimeError("server process did not start:\n" + "".join(self.lines[-30:]))

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=30)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        code = self.proc.wait(timeout_s)
        self._pump.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
