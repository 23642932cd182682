"""A real nats-server (the Debian package, /usr/sbin/nats-server) for the NATS tests: its
own free port, JetStream store and pid file in a temporary directory, the coordinator's
generated authorization include (islandlink/nats_auth.py), restartable on the same port
and store. Plus the reference NATS agent on its own event loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
COORD_USER, COORD_PASS = "coordinator", "coord-test-pass"

needs_nats = pytest.mark.skipif(not os.path.exists(NATS_SERVER), reason="nats-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    def __init__(self, root: Path) -> None:
        from islandlink import nats_auth

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.auth_file = self.root / "auth.conf"
        self.pid_file = self.root / "nats.pid"
        self.conf = self.root / "nats.conf"
        self.conf.write_text(nats_auth.main_config(port=self.port, store_dir=str(self.root / "js"),
                                                   auth_file="auth.conf", pid_file=str(self.pid_file)))
        if not self.auth_file.exists():
            self.auth_file.write_text(nats_auth.render(
                nats_auth.NatsUser(COORD_USER, nats_auth.stable_hash(COORD_PASS)),
                nats_auth.NatsUser("pairing", nats_auth.stable_hash("pairing")), []))
        self.proc: subprocess.Popen | None = None
        self.log = open(self.root / "nats.log", "ab")
        self.start()

    @property
    def coordinator_url(self) -> str:
        return f"nats://{COORD_USER}:{COORD_PASS}@127.0.0.1:{self.port}"

    def url(self, user: str, password: str) -> str:
        return f"nats://{user}:{password}@127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"COORDINATOR_NATS_URL": self.coordinator_url, "COORDINATOR_NATS_AUTH_FILE": str(self.auth_file),
                "COORDINATOR_NATS_PID_FILE": str(self.pid_file)}

    def start(self) -> None:
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {(self.root / 'nats.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                if self.pid_file.exists() and self._jetstream_ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def _jetstream_ready(self) -> bool:
        async def check() -> bool:
            import nats

            try:
                nc = await nats.connect(f"nats://127.0.0.1:{self.port}", user=COORD_USER, password=COORD_PASS,
                                        connect_timeout=1, allow_reconnect=False)
            except Exception:  # noqa: BLE001
                return False
            try:
                await nc.jetstream(timeout=1).account_info()
                return True
            except Exception:  # noqa: BLE001
                return False
            finally:
                await nc.close()

        return asyncio.run(check())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        self.log.close()

    def log_text(self) -> str:
        return (self.root / "nats.log").read_text(errors="replace")


class AgentLoop:
    """NATS reference agents (and raw nats-py clients) on an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runs: list[tuple[Any, Any]] = []

    def call(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, agent: Any) -> Any:
        fut = asyncio.run_coroutine_threadsafe(agent.run(), self.loop)
        self.runs.append((agent, fut))
        deadline = time.monotonic() + 15
        while not agent.ready.is_set():
            if fut.done():
                fut.result()
            if time.monotonic() > deadline:
                raise AssertionError("agent not ready")
            time.sleep(0.02)
        return agent

    def stop(self, agent: Any) -> None:
        self.loop.call_soon_threadsafe(agent.request_stop)
        for a, fut in self.runs:
            if a is agent:
                fut.result(15)

    def close(self) -> None:
        for agent, fut in self.runs:
            if not fut.done():
                self.loop.call_soon_threadsafe(agent.request_stop)
                try:
                    fut.result(15)
                except Exception:  # noqa: BLE001
                    pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
