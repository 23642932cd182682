"""While the event store is unreachable, answer 503 with Retry-After at once.

Without this, a request that needs PostgreSQL while it is down waits in the event-sourcing
library's retries (10 attempts, each up to the pool's 5 s connect timeout: close to a minute)
and the client times out. `StoreProbe` checks PostgreSQL once per `interval_s` with a
1-second connect timeout from a thread of its own; while the last probe failed, `StoreGate`
(an ASGI middleware in front of every route except health, the OpenAPI document and
/metrics) answers `503 database_unavailable` with `Retry-After` without touching the store.
When a probe succeeds again the gate opens by itself; requests already waiting on the store
when it went down finish or fail (503) as the library's retries end. The embedded SQLite
store has no probe (a file does not go away; a lock or a full disk is answered per request,
api/errors.py).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog
from litestar.types import ASGIApp, Receive, Scope, Send

from api.errors import DATABASE_RETRY_AFTER_S, ApiError
from store.factory import StoreConfig, parse_postgres_url

log = structlog.get_logger("api.store")

UNGATED_PATHS = ("/api/v1/health", "/api/v1/schema", "/schema", "/metrics")


class StoreProbe:
    def __init__(self, config: StoreConfig, *, interval_s: float = 1.0, connect_timeout_s: int = 1) -> None:
        self.config = config
        self.interval_s = interval_s
        self.connect_timeout_s = connect_timeout_s
        self.down = False
        self.down_since: float | None = None
        self.outages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def probe_once(self) -> bool:
        import psycopg

        p = parse_postgres_url(self.config.database_url or "")
        try:
            with psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                                 user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None,
                                 connect_timeout=self.connect_timeout_s, application_name="coordinator-probe") as c:
                c.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001 - any failure means "not usable now"
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            ok = self.probe_once()
            if not ok and not self.down:
                self.down, self.down_since = True, time.monotonic()
                self.outages += 1
                log.warning("database_unreachable", store=self.config.describe())
            elif ok and self.down:
                log.warning("database_reachable_again", store=self.config.describe(),
                            down_s=round(time.monotonic() - (self.down_since or time.monotonic()), 2))
                self.down, self.down_since = False, None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="store-probe", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class StoreGate:
    def __init__(self, app: ASGIApp, probe: StoreProbe | None) -> None:
        self.app = app
        self.probe = probe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        probe = self.probe
        if probe is not None and probe.down and scope["type"] == "http" and not scope["path"].startswith(
                UNGATED_PATHS):
            raise ApiError(503, "database_unavailable", "the event store is unreachable; retry shortly",
                           headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})
        await self.app(scope, receive, send)


def probe_for(config: StoreConfig) -> StoreProbe | None:
    return StoreProbe(config) if config.is_postgres else None


def start_probe(probe: Any) -> None:
    if probe is not None:
        probe.start()
