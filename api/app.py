"""The Litestar application and the parts the HTTP layer adds to the Coordinator.

    services = build_services(settings)        # Coordinator + broker, keys, limits, batches
    app = create_app(services)                 # Litestar; its lifespan runs the background loops
    services.coordinator.scheduler.start()     # the dispatch thread (api/server.py does all this)

Embedded default (no COORDINATOR_REDIS_URL): in-process broker, rate limiter and
idempotency store. With Redis: Redis Streams, a Redis GCRA limiter and a Redis
idempotency store, shared by every coordinator process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from litestar import Litestar
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from api.auth import AuthMiddleware, KeyAuthenticator
from api.batch import BatchService, batch_stream_events
from api.broker import (
    CommitPublisher,
    MemoryBroker,
    RedisStreamBroker,
    StreamBroker,
    job_stream_events,
    redis_client,
)
from api.consumer import consumer_router
from api.errors import ApiError, exception_handler
from api.idempotency import IdempotencyMiddleware, IdempotencyStore, MemoryIdempotencyStore, RedisIdempotencyStore
from api.keys import KeyStore
from api.openai_compat import openai_handlers
from api.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from api.settings import Settings
from api.wiring import Coordinator, build
from scheduler.dispatcher import FanoutListener
from scheduler.service import JobView

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

    # ---------------------------------------------------------- lifecycle (server)
    def begin_drain(self) -> None:
        """Stop taking long-lived work: SSE streams end (clients resume elsewhere with
        Last-Event-ID); in-flight requests finish."""
        self.draining.set()
        for sub in list(self.sse_open):
            sub.interrupt()

    async def start_background(self) -> None:
        self.draining = asyncio.Event()
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


def build_services(settings: Settings, *, coordinator: Coordinator | None = None, with_projections: bool = True,
                   **build_kwargs: Any) -> ApiServices:
    """The Coordinator plus everything the HTTP layer needs (no event loop needed yet)."""
    c = coordinator or build(settings, **build_kwargs)
    api = settings.api
    redis = None
    if settings.redis_url:
        redis = redis_client(settings.redis_url)
        broker: StreamBroker = RedisStreamBroker(settings.redis_url, prefix=api.redis_prefix,
                                                 retention_s=api.stream_retention_s,
                                                 live_ttl_s=api.stream_live_ttl_s, max_events=api.stream_max_events)
        limiter: RateLimiter = RedisRateLimiter(redis, api.redis_prefix, api.rate_limit_per_min)
        idem: IdempotencyStore = RedisIdempotencyStore(redis, api.redis_prefix)
    else:
        broker = MemoryBroker(retention_s=api.stream_retention_s, live_ttl_s=api.stream_live_ttl_s,
                              max_events=api.stream_max_events)
        limiter = MemoryRateLimiter(api.rate_limit_per_min)
        idem = MemoryIdempotencyStore()
    fresh = settings.store.is_postgres
    keys = KeyStore(c.committer, fresh_reads=fresh)
    authenticator = KeyAuthenticator(keys, limiter, c.clock, cache_s=api.key_cache_s)
    batches = BatchService(c.committer, c.scheduler, fresh_reads=fresh)
    positions = _PositionTracker()
    c.committer.add_listener(CommitPublisher(broker, [job_stream_events, batch_stream_events]))
    c.committer.add_listener(batches.on_commit)
    c.committer.add_listener(positions)
    services = ApiServices(coordinator=c, settings=settings, broker=broker, keys=keys, limiter=limiter,
                           authenticator=authenticator, idempotency=idem, batches=batches, listener=c.listeners,
                           fresh_reads=fresh, redis=redis)
    if with_projections:
        services.projections = _open_projections(c, api.projections)
        if services.projections is not None:
            services.job_lister = ProjectionJobLister(services.projections, lambda: positions.position)
    return services


class ReadOnlyProjections:
    """The read models kept by another process: readers only (`read`, `jobs`)."""

    def __init__(self, store: Any) -> None:
        from projections.jobs import JobsView
        from projections.reader import ReadModels

        self.read = ReadModels.open(store)
        self.jobs = JobsView(self.read)

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.read.close()


def _open_projections(c: Coordinator, mode: str) -> Any:
    if mode == "off":
        return None
    try:
        if mode == "thread":
            from projections.service import Projections

            # Woken by every commit of this process (low lag for GET /jobs).
            proj = Projections.open(c.app, c.settings.store)
            proj.attach(c.committer)
            return proj
        return ReadOnlyProjections(c.settings.store)  # "process" (api/server.py runs it) or "external"
    except ImportError as exc:  # the read models are optional for the API; GET /jobs answers 503 without them
        log.warning("projections_unavailable", error=repr(exc))
        return None


def create_app(services: ApiServices, *, extra_handlers: Sequence[Any] = (), open_paths: Sequence[str] = (),
               on_startup: Sequence[Any] = (), on_shutdown: Sequence[Any] = (),
               extra_lifespans: Sequence[Any] = ()) -> Litestar:
    """The app. `extra_handlers` (e.g. the Island channel's routes) are mounted beside the
    consumer API; paths starting with one of `open_paths` skip API-key authentication (they
    authenticate themselves); WebSocket routes never go through it."""
    from api import auth

    cfg = services.settings.api
    for path in open_paths:
        if path not in auth.OPEN_PATHS:
            auth.OPEN_PATHS = (*auth.OPEN_PATHS, path)
    return Litestar(
        route_handlers=[consumer_router(services), *openai_handlers(services), *extra_handlers],
        on_startup=list(on_startup),
        on_shutdown=list(on_shutdown),
        middleware=[DefineMiddleware(AuthMiddleware, authenticator=services.authenticator),
                    DefineMiddleware(IdempotencyMiddleware, store=services.idempotency,
                                     ttl_ms=cfg.idempotency_ttl_s * 1000, max_body_bytes=cfg.max_body_bytes)],
        exception_handlers={Exception: exception_handler},
        request_max_body_size=cfg.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Archipelag coordinator", version="1.0.0", path="/api/v1/schema",
                                     description="Consumer API (api-contract.md) and OpenAI-compatible chat."),
        lifespan=[services.lifespan, *extra_lifespans],  # extras are entered after the services'
        logging_config=None,
        debug=False,
    )


def create_server_app(services: ApiServices) -> Litestar:
    """The whole server: the consumer API, the Island channel and registration (#5), the
    operator API and /metrics (#6). `coordinator serve` and `coordinator demo` run this."""
    from api import metrics
    from api.island_channel import build_island_channel, island_routes
    from api.operator import operator_router

    channel = build_island_channel(services.coordinator, services.broker)
    metrics.install(services)
    return create_app(services, extra_handlers=[*island_routes(channel), operator_router(services),
                                                metrics.metrics_handler],
                      open_paths=("/api/v1/admin", "/metrics"), extra_lifespans=[channel.lifespan])
