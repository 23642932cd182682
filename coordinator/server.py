"""`coordinator serve [--host H] [--port P]`: the HTTP API with every loop of the
coordinator (dispatch, lease and queue timers, hold sweeper, batch sweeper, projections),
on the embedded default or on PostgreSQL + Redis when their URLs are set.

Shutdown (SIGTERM or Ctrl-C), in order:
1. stop accepting connections; SSE streams end at once (they are resumable: clients
   reconnect with Last-Event-ID, to this server after a restart or to another process);
2. in-flight requests finish (up to COORDINATOR_SHUTDOWN_GRACE_S);
3. the sweepers stop, the dispatch thread stops after its current round (every decision
   it made is committed), the stream publisher flushes what it holds;
4. the group committer drains its queue and the store is closed.
Nothing is lost: every answer that was sent was committed first; Jobs still queued or
running are in the log and are picked up again by the next start (`Scheduler.recover`).
A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import structlog
import uvicorn

from api.services import ApiServices
from coordinator.app import build_services, create_server_app
from config.settings import Settings
from config.parts import Coordinator

log = structlog.get_logger("coordinator.server")


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


class _Stop(Exception):
    """Raised by our signal handler after uvicorn finished its graceful shutdown."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


class CoordinatorServer(uvicorn.Server):
    """uvicorn's server, telling the API to drain the moment a stop is asked for."""

    def __init__(self, config: uvicorn.Config, services: ApiServices) -> None:
        super().__init__(config)
        self.services = services
        self.loop: asyncio.AbstractEventLoop | None = None
        self.bound: list[tuple[str, int]] = []

    async def startup(self, sockets: list | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        for srv in self.servers:
            for sock in srv.sockets:
                addr = sock.getsockname()
                self.bound.append((addr[0], addr[1]))
        if self.started:
            log.info("serving", addresses=[f"http://{h}:{p}" for h, p in self.bound],
                     store=self.services.coordinator.settings.store.describe(), broker=self.services.broker.kind)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.loop is not None and not self.should_exit:
            try:
                self.loop.call_soon_threadsafe(self.services.begin_drain)
            except RuntimeError:
                pass
        super().handle_exit(sig, frame)

    def stop(self) -> None:
        """Ask for a graceful stop from another thread (tests)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.services.begin_drain)
        self.should_exit = True


GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Fewer, cheaper collector pauses for a long-running server: everything built at start
    (modules, the app, the catalog) is frozen out of collection, young collections run every
    50,000 allocations instead of 700, and full collections (which walk every live object:
    queued Jobs, cached aggregates; 50-200 ms stalls measured under load) about 100x less
    often. Measured: POST /jobs p99 116 ms -> 29 ms at 24 connections (docs/decisions/0019)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def make_server(services: ApiServices, host: str, port: int) -> CoordinatorServer:
    api = services.settings.api
    config = uvicorn.Config(
        create_server_app(services), host=host, port=port, lifespan="on", log_config=None, access_log=False,
        loop="uvloop" if _has("uvloop") else "asyncio", http="httptools" if _has("httptools") else "h11",
        timeout_graceful_shutdown=api.shutdown_grace_s, server_header=False, timeout_keep_alive=30,
        backlog=4096, proxy_headers=False)
    return CoordinatorServer(config, services)


class Projector:
    """The read-model runner as a child process of `coordinator serve` (COORDINATOR_PROJECTIONS
    =process): its CPU work runs beside the request path, not under its GIL.

    - The child dies with the server however the server dies (`COORDINATOR_PARENT_PID`:
      parent-death signal and a parent watch, coordinator/children.py).
    - A child that dies alone is restarted with exponential back-off: 1 s, 2 s, 4 s ... at
      most `MAX_DELAY_S`; a child that ran `HEALTHY_S` or longer starts the sequence again.
    - A child that finds another projector holding the store's lock exits with
      `EXIT_BUSY` (projections/lock.py); it is retried on the same back-off, so this server's
      projector takes over when the other one ends (a standby, never a second writer).
    - Stopped (SIGTERM, it finishes its page) after the HTTP server stopped."""

    FIRST_DELAY_S = 1.0
    MAX_DELAY_S = 30.0
    HEALTHY_S = 60.0

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="projector-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen:
        # `coordinator projections run` (projections/service.py run_until), same environment.
        from coordinator.children import PARENT_PID_ENV

        return subprocess.Popen([sys.executable, "-m", "coordinator.cli", "projections", "run"],
                                env={**os.environ, PARENT_PID_ENV: str(os.getpid())}, stdout=subprocess.DEVNULL)

    @classmethod
    def next_delay_s(cls, delay_s: float, ran_s: float) -> float:
        """The wait before the next start, after a child that ran `ran_s` seconds."""
        if ran_s >= cls.HEALTHY_S:
            return cls.FIRST_DELAY_S
        return min(cls.MAX_DELAY_S, max(cls.FIRST_DELAY_S, delay_s * 2))

    def _supervise(self) -> None:
        import time

        from projections.lock import EXIT_BUSY

        delay_s = self.FIRST_DELAY_S / 2
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.proc = self._spawn()
            except OSError as exc:
                log.error("projector_spawn_failed", error=repr(exc))
                code: int | None = None
            else:
                code = self.proc.wait()
            if self._stop.is_set():
                return
            delay_s = self.next_delay_s(delay_s, time.monotonic() - started)
            if code == EXIT_BUSY:
                log.warning("projector_busy", retry_in_s=delay_s,
                            detail="another projector holds this store's lock; standing by")
            else:
                log.error("projector_exited", code=code, restart_in_s=delay_s)
            self.restarts += 1
            self._stop.wait(delay_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(5)


def redis_where(url: str) -> str:
    """host:port/db of a Redis URL, never its password."""
    from urllib.parse import urlparse

    u = urlparse(url)
    return f"{u.scheme}://{u.hostname or ''}:{u.port or 6379}{u.path or ''}"


def redis_unreachable(url: str, timeout_s: float = 3.0) -> str | None:
    """None if Redis answers PING within `timeout_s`, else why not (one line)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
        return None
    except Exception as exc:  # noqa: BLE001 - operator-facing, one line
        return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    finally:
        client.close()


def serve(c: Coordinator, settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGTERM / Ctrl-C. The caller closes `c` afterwards (committer, store)."""
    from coordinator.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    if settings.redis_url:  # the broker, limiter and sessions live there: refuse to start without it
        why = redis_unreachable(settings.redis_url)
        if why is not None:
            print(f"coordinator: cannot reach Redis at {redis_where(settings.redis_url)}: {why}", file=sys.stderr)
            return 1
    services = build_services(settings, coordinator=c)
    tune_gc()
    server = make_server(services, host or settings.api.host, settings.api.port if port is None else port)
    projector = Projector() if settings.api.projections == "process" and services.projections is not None else None
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        if projector is not None:
            projector.start()
        server.run()
    except _Stop:
        pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if projector is not None:
            projector.stop()
    if not server.started:
        print("coordinator: the server did not start (address in use?)", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0

