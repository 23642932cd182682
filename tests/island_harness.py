"""Test harness for the Island channel (tests/test_island_*.py): the coordinator's real
HTTP app (coordinator/app.py) with the Island routes mounted (what the lead will wire into
coordinator/app.py), served by uvicorn on 127.0.0.1:<ephemeral> in a thread, or as a separate
process (`python -m tests.island_harness serve`, which prints one JSON line with its URL).

When `coordinator serve` mounts the Island routes itself, the process tests switch to it
and `serve_main` below goes away.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import uvicorn

OPERATOR_TOKEN = "op-test-token-0123456789"


def mount_islands(services: Any, *, operator_token: str | None = OPERATOR_TOKEN,
                  env: dict[str, str] | None = None) -> tuple[Any, Any]:
    """The API app with the Island channel, registration and operator routes (and the
    NATS transport when `env` has COORDINATOR_NATS_URL)."""
    from admin.http import operator_router
    from coordinator.app import create_app, island_routes, island_views, nats_transport
    from islandlink.channel import ChannelSettings, build_island_channel

    channel = build_island_channel(services.coordinator, services.broker, ChannelSettings.from_env())
    views = island_views(channel)
    nats = nats_transport(services, channel, views, env if env is not None else {})
    admin = operator_router(services, islands=views, token=operator_token)
    app = create_app(services, extra_handlers=[admin], open_paths=("/api/v1/admin",))
    for handler in island_routes(channel, views):
        app.register(handler)
    app.on_startup.append(channel.start)
    if nats is not None:
        app.on_startup.append(nats.start)
        app.on_shutdown.append(nats.close)
    app.on_shutdown.append(channel.close)
    return app, channel


def make_island_server(services: Any, host: str = "127.0.0.1", port: int = 0,
                       env: dict[str, str] | None = None) -> tuple[Any, Any]:
    from coordinator.server import CoordinatorServer

    app, channel = mount_islands(services, env=env)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_config=None, access_log=False,
                            loop="asyncio", timeout_graceful_shutdown=5, server_header=False)
    return CoordinatorServer(config, services), channel


class ThreadServer:
    """The coordinator with the Island routes, in a thread of the test process."""

    def __init__(self, env: dict[str, str], *, with_projections: bool = False, **build_kwargs: Any) -> None:
        from coordinator.app import build_services
        from config.settings import Settings

        self.settings = Settings.from_env(env)
        self.services = build_services(self.settings, with_projections=with_projections, **build_kwargs)
        self.c = self.services.coordinator
        self.server, self.channel = make_island_server(self.services, env=env)
        self.nats = self.c.nats_link
        self.thread = threading.Thread(target=self.server.run, name="island-test-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not (self.server.started and self.server.bound):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        self.port = self.server.bound[0][1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(30)
        self.c.close()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the server's event loop (e.g. channel internals)."""
        return asyncio.run_coroutine_threadsafe(coro, self.server.loop).result(timeout)

    # -- helpers on the Coordinator
    def account(self, credits: str = "100", kyc: bool = True) -> tuple[uuid.UUID, str]:
        from ledger.pricing import credits_to_micro

        account_id = uuid.uuid4()
        self.c.ledger.open_account(account_id, f"{account_id.hex[:8]}@test.example", kyc_verified=kyc,
                                   initial_grant_micro=credits_to_micro(credits))
        secret, _ = self.services.keys.issue(account_id, "test")
        return account_id, secret

    def island(self, name: str = "isl", *, approve: bool = True, owner: uuid.UUID | None = None) -> tuple[str, str]:
        from protocol.island import make_token

        if owner is None:
            owner = uuid.uuid4()
            self.c.ledger.open_account(owner, f"owner-{owner.hex[:8]}@test.example", kyc_verified=True)
        island_id = uuid.uuid4()
        creds = self.c.scheduler.register_island(owner, name, {}, approve=approve, island_id=island_id,
                                                 token=make_token(island_id))
        return creds.island_id, creds.token

    def online(self, island_id: str) -> bool:
        rec = self.c.scheduler.core.registry.islands.get(island_id)
        return bool(rec and rec.online)


def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval_s)


def serve_main() -> int:
    """A coordinator process with the Island routes on 127.0.0.1:<free port>; prints
    {"url": ...} once listening; SIGTERM / SIGINT stop it gracefully."""
    from coordinator.app import build_services
    from coordinator.logs import configure_logging
    from config.settings import Settings

    settings = Settings.from_env()
    configure_logging(settings.log_format, settings.log_level)
    services = build_services(settings, with_projections=False)
    server, _channel = make_island_server(services, env=dict(os.environ))

    def announce() -> None:
        while not (server.started and server.bound):
            time.sleep(0.01)
        print(json.dumps({"url": f"http://127.0.0.1:{server.bound[0][1]}"}), flush=True)

    threading.Thread(target=announce, daemon=True).start()
    import signal

    from coordinator.server import _raise_stop, _Stop

    # as coordinator/server.py: uvicorn shuts down gracefully, then re-raises the signal; we exit 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    try:
        server.run()
    except _Stop:
        pass
    finally:
        services.coordinator.close()
    return 0


def subprocess_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COORDINATOR_", "ISLAND_"))}
    env.update(COORDINATOR_DATA_DIR=str(data_dir), COORDINATOR_LOG_FORMAT="json", COORDINATOR_LOG_LEVEL="info",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        sys.exit(serve_main())
    print("usage: python -m tests.island_harness serve", file=sys.stderr)
    sys.exit(2)


class RawIsland:
    """A hand-driven Island on the real channel (websockets' sync client): sends exactly
    what a test says, records everything it receives, heartbeats in the background."""

    def __init__(self, url: str, token: str, *, caps: dict[str, Any] | None = None, running: list[str] | None = None,
                 heartbeat_s: float = 0.3, protocol: int | None = None, hello: bool = True) -> None:
        import queue

        from websockets.sync.client import connect

        from protocol import island as p

        self.p = p
        self.ws = connect(p.ws_url(url), additional_headers={"Authorization": f"Bearer {token}"},
                          open_timeout=10, max_size=32 * 1024 * 1024).__enter__()
        self.inbox: queue.Queue = queue.Queue()
        self.seen: list[Any] = []
        self.closed: tuple[int | None, str] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.welcome: Any = None
        if hello:
            caps_obj = p.Capabilities(**(caps or {"cargos": ["llm-chat", "llm-chat-lite"],
                                                   "models": ["mistral-7b-instruct", "tinyllama-1.1b-chat"],
                                                   "vram_mb": 24_000, "ram_mb": 32_000, "slots": 4}))
            self.send(p.Hello(protocol=protocol or p.PROTOCOL_VERSION, agent="raw-test", capabilities=caps_obj,
                              running=[p.ResumeJob(job_id=j) for j in (running or [])]))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if hello and protocol is None:
            self.welcome = self.expect(p.Welcome)
            self._hb = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
            self._hb.start()

    def send(self, msg: Any) -> None:
        with self._lock:
            self.ws.send(self.p.encode(msg))

    def send_raw(self, text: str) -> None:
        with self._lock:
            self.ws.send(text)

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for raw in self.ws:
                msg = self.p.decode_server(raw)
                self.seen.append(msg)
                self.inbox.put(msg)
        except ConnectionClosed as exc:
            self.closed = (exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "")
        except Exception as exc:  # noqa: BLE001
            self.closed = (None, repr(exc))
        finally:
            if self.closed is None:
                self.closed = (self.ws.close_code, self.ws.close_reason or "")
            self.inbox.put(None)

    def _beat(self, period: float) -> None:
        seq = 0
        while not self._stop.wait(period):
            seq += 1
            try:
                self.send(self.p.Heartbeat(seq=seq, slots_total=4, free_slots=4))
            except Exception:  # noqa: BLE001
                return

    def expect(self, kind: Any, pred: Any = None, timeout: float = 10.0) -> Any:
        """The next received message of type `kind` (matching `pred`); others are skipped
        (they stay in `seen`)."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout} s; seen {self.seen[-10:]}")
            try:
                msg = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                self.inbox.put(None)
                raise AssertionError(f"connection closed {self.closed} while waiting for {kind.__name__}")
            if isinstance(msg, kind) and (pred is None or pred(msg)):
                return msg

    def nothing(self, kind: Any, seconds: float) -> None:
        time.sleep(seconds)
        got = [m for m in self.seen if isinstance(m, kind)]
        assert not got, f"unexpected {got}"

    def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        self._reader.join(timeout)
        assert self.closed is not None, "still open"
        return self.closed

    def close(self) -> None:
        self._stop.set()
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass


class FakeOpenAI:
    """An OpenAI-compatible chat server on 127.0.0.1 (streams `words`, then usage)."""

    def __init__(self, words: list[str], *, usage: dict[str, int] | None = None, status: int = 200) -> None:
        self.words = words
        self.usage = usage
        self.status = status
        self.requests: list[dict[str, Any]] = []
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, lifespan="off", log_config=None,
                                access_log=False, loop="asyncio", interface="asgi3")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not (self.server.started and self.server.servers):
            if time.monotonic() > deadline:
                raise RuntimeError("fake OpenAI server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.requests.append({"path": scope["path"], "auth": dict(scope["headers"]).get(b"authorization"),
                              "body": json.loads(body or b"{}")})
        if self.status != 200:
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error": {"message": "boom"}}'})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for w in self.words:
            chunk = {"choices": [{"index": 0, "delta": {"content": w}}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
            await asyncio.sleep(0.005)
        if self.usage is not None:
            await send({"type": "http.response.body", "more_body": True,
                        "body": f"data: {json.dumps({'choices': [], 'usage': self.usage})}\n\n".encode()})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
