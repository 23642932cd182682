"""What the consumer HTTP handlers are given: one struct (`ApiServices`) built by the
process composition (coordinator/app.py) and defined here, below its users, so handlers
never import the layer that builds them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from litestar import Litestar

from api.auth import KeyAuthenticator
from api.batch import BatchService
from api.errors import ApiError
from api.idempotency import IdempotencyStore
from api.keys import KeyStore
from api.ratelimit import RateLimiter
from config.parts import Coordinator
from config.settings import Settings
from scheduler.dispatcher import FanoutListener
from scheduler.service import JobView
from streams.broker import StreamBroker

log = structlog.get_logger("api")

READ_YOUR_WRITES_WAIT_S = 2.0


class JobLister(Protocol):
    """Newest-first Jobs of one account (a read model; see projections/jobs.py)."""

    async def list_for_account(self, account_id: str, limit: int, offset: int) -> list[JobView]: ...


class ProjectionJobLister:
    """GET /jobs from the projections' jobs table. Waits (briefly) until the read model
    has caught up with this process's last commit, so a Job just created is listed."""

    def __init__(self, projections: Any, last_position: Any) -> None:
        self.projections = projections
        self.last_position = last_position  # () -> int

    async def list_for_account(self, account_id: str, limit: int, offset: int) -> list[JobView]:
        from projections.jobs import as_jobview_kwargs

        def read() -> list[JobView]:
            self.projections.read.wait_for(self.last_position(), READ_YOUR_WRITES_WAIT_S)
            rows = self.projections.jobs.list_for_account(account_id, limit, offset)
            return [JobView(**as_jobview_kwargs(r)) for r in rows]

        try:
            return await asyncio.to_thread(read)
        except Exception as exc:  # noqa: BLE001 - e.g. the read models are still being created
            log.warning("jobs_read_model_unavailable", error=repr(exc))
            raise ApiError(503, "unavailable", "the jobs read model is not available yet; retry shortly",
                           headers={"Retry-After": "1"}) from None


class _PositionTracker:
    """The log position of this process's last commit (for read-your-writes on read models)."""

    def __init__(self) -> None:
        self.position = 0

    def __call__(self, recordings: list[Any]) -> None:
        if recordings:
            self.position = max(self.position, recordings[-1].notification.id)


@dataclass
class ApiServices:
    coordinator: Coordinator
    settings: Settings
    broker: StreamBroker
    keys: KeyStore
    limiter: RateLimiter
    authenticator: KeyAuthenticator
    idempotency: IdempotencyStore
    batches: BatchService
    listener: FanoutListener  # the Coordinator's scheduler listeners (offers, cancellations)
    fresh_reads: bool
    redis: Any = None
    projections: Any = None
    job_lister: JobLister | None = None
    run_scheduler: bool = True  # the lifespan starts and stops the dispatch thread
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    sse_open: set = field(default_factory=set)
    tasks: list[asyncio.Task] = field(default_factory=list)
    store_probe: Any = None  # api/store_gate.py: PostgreSQL reachability (None on SQLite)

    # ---------------------------------------------------------- lifecycle (server)
    def begin_drain(self) -> None:
        """Stop taking long-lived work: SSE streams end (clients resume elsewhere with
        Last-Event-ID); in-flight requests finish."""
        self.draining.set()
        for sub in list(self.sse_open):
            sub.interrupt()

    async def start_background(self) -> None:
        self.draining = asyncio.Event()
        if self.store_probe is not None:
            self.store_probe.start()
        await self.broker.start()
        if self.projections is not None:
            await asyncio.to_thread(self.projections.start)
        if self.run_scheduler:
            await asyncio.to_thread(self.coordinator.scheduler.start)  # recover from the log, then dispatch
        self.tasks = [asyncio.get_running_loop().create_task(self._every(self.settings.api.hold_sweep_s,
                                                                           self._sweep_holds), name="hold-sweeper"),
                      asyncio.get_running_loop().create_task(self._every(self.settings.api.batch_sweep_s,
                                                                           self.batches.sweep), name="batch-sweeper")]

    async def stop_background(self) -> None:
        self.begin_drain()
        if self.store_probe is not None:
            self.store_probe.stop()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks = []
        if self.run_scheduler:
            await asyncio.to_thread(self.coordinator.scheduler.stop)  # no more commits to publish after this
        await self.broker.flush()
        await self.broker.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.projections is not None:
            await asyncio.to_thread(self.projections.close)

    @staticmethod
    async def _every(period_s: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await fn()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a sweeper must keep sweeping
                log.exception("background_task_failed", task=getattr(fn, "__name__", "?"))

    async def _sweep_holds(self) -> int:
        from ledger.audit import LEDGER_TOPICS
        from ledger.sweeper import HoldSweeper
        from store.factory import iter_log

        c = self.coordinator
        if not hasattr(self, "_hold_sweeper"):
            self._hold_sweeper = HoldSweeper(c.ledger, lambda start: iter_log(c.app, start=start,
                                                                              topics=LEDGER_TOPICS))
        released = await asyncio.to_thread(self._hold_sweeper.tick, c.clock.now_ms())
        if released:
            log.info("expired_holds_released", count=released)
        return released

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        await self.start_background()
        try:
            yield
        finally:
            await self.stop_background()
