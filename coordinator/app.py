"""The Litestar application and the parts the HTTP layer adds to the Coordinator.

    services = build_services(settings)        # Coordinator + broker, keys, limits, batches
    app = create_app(services)                 # Litestar; its lifespan runs the background loops
    services.coordinator.scheduler.start()     # the dispatch thread (coordinator/server.py does all this)

Embedded default (no COORDINATOR_REDIS_URL): in-process broker, rate limiter and
idempotency store. With Redis: Redis Streams, a Redis GCRA limiter and a Redis
idempotency store, shared by every coordinator process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from litestar import Litestar
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from api.auth import AuthMiddleware, KeyAuthenticator
from api.batch import BatchService, batch_stream_events
from streams.broker import StreamBroker
from streams.memory import MemoryBroker
from streams.publisher import CommitPublisher, job_stream_events
from streams.redis import RedisStreamBroker, redis_client
from api.consumer import consumer_router
from api.market import market_router
from api.errors import exception_handler
from api.idempotency import IdempotencyMiddleware, IdempotencyStore, MemoryIdempotencyStore, RedisIdempotencyStore
from api.keys import KeyStore
from api.hosts import hosts_handlers
from api.openai_compat import openai_handlers
from api.verification import verification_handlers
from api.openapi import OPENAPI_PLUGINS
from api.limits import HeaderLimit
from api.store_gate import StoreGate, probe_for
from api.ratelimit import MemoryRateLimiter, RateLimiter, RedisRateLimiter
from config.settings import Settings
from api.services import ApiServices, ProjectionJobLister, _PositionTracker
from config.parts import Coordinator
from coordinator.wiring import build

log = structlog.get_logger("api")


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
                           fresh_reads=fresh, redis=redis, store_probe=probe_for(settings.store))
    if with_projections:
        services.projections = _open_projections(c, api.projections)
        if services.projections is not None:
            services.job_lister = ProjectionJobLister(services.projections, lambda: positions.position)
    return services


class ReadOnlyProjections:
    """The read models kept by another process: readers only (`read`, `jobs`)."""

    def __init__(self, store: Any) -> None:
        from projections.jobs_view import JobsView
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
        return ReadOnlyProjections(c.settings.store)  # "process" (coordinator/server.py runs it) or "external"
    except ImportError as exc:  # the read models are optional for the API; GET /jobs answers 503 without them
        log.warning("projections_unavailable", error=repr(exc))
        return None


def create_app(services: ApiServices, *, extra_handlers: Sequence[Any] = (), open_paths: Sequence[str] = (),
               on_startup: Sequence[Any] = (), on_shutdown: Sequence[Any] = (),
               extra_lifespans: Sequence[Any] = (), outer_middleware: Sequence[Any] = (),
               app_kwargs: dict[str, Any] | None = None) -> Litestar:
    """The app. `extra_handlers` (e.g. the Island channel's routes) are mounted beside the
    consumer API; paths starting with one of `open_paths` skip API-key authentication (they
    authenticate themselves); WebSocket routes never go through it."""
    from api import auth

    cfg = services.settings.api
    for path in open_paths:
        if path not in auth.OPEN_PATHS:
            auth.OPEN_PATHS = (*auth.OPEN_PATHS, path)
    return Litestar(
        route_handlers=[consumer_router(services), market_router(services), *openai_handlers(services),
                        *hosts_handlers(services), *verification_handlers(services), *extra_handlers],
        on_startup=list(on_startup),
        on_shutdown=list(on_shutdown),
        middleware=[HeaderLimit, DefineMiddleware(StoreGate, probe=services.store_probe), *outer_middleware,
                    DefineMiddleware(AuthMiddleware, authenticator=services.authenticator),
                    DefineMiddleware(IdempotencyMiddleware, store=services.idempotency,
                                     ttl_ms=cfg.idempotency_ttl_s * 1000, max_body_bytes=cfg.max_body_bytes)],
        exception_handlers={Exception: exception_handler},
        request_max_body_size=cfg.max_body_bytes,
        openapi_config=OpenAPIConfig(title="Archipelag coordinator", version="1.0.0", path="/api/v1/schema",
                                     description="Consumer API (api-contract.md) and OpenAI-compatible chat."),
        lifespan=[services.lifespan, *extra_lifespans],  # extras are entered after the services'
        plugins=list(OPENAPI_PLUGINS),  # credits are numbers in the document as on the wire (api/openapi.py)
        logging_config=None,
        debug=False,
        **(app_kwargs or {}),
    )


def create_server_app(services: ApiServices, web_env: Any = None) -> Litestar:
    """The whole server: the consumer API, the Island channel and registration (#5), the
    operator API and /metrics (#6), the web app (#14, web/; COORDINATOR_WEB=off leaves it
    out). `coordinator serve` and `coordinator demo` run this."""
    from admin.http import operator_router
    from coordinator import metrics
    from islandlink.channel import build_island_channel
    from web.mount import web_parts
    from web.settings import WebSettings

    channel = build_island_channel(services.coordinator, services.broker)
    metrics.install(services)
    views = island_views(channel)
    nats = nats_transport(services, channel, views)
    admin = operator_router(services, islands=views)
    st = services.settings
    web = web_parts(services, WebSettings.from_env(web_env, data_dir=st.data_dir, host=st.api.host, port=st.api.port),
                    islands=views)
    kwargs: dict[str, Any] = {"stores": web.stores} if web.stores else {}
    if web.template_config is not None:
        kwargs["template_config"] = web.template_config
    return create_app(services, extra_handlers=[*island_routes(channel, views), admin,
                                                metrics.metrics_handler, *web.handlers],
                      open_paths=("/api/v1/admin", "/metrics"),
                      extra_lifespans=[channel.lifespan, *([nats_lifespan(nats)] if nats else [])],
                      outer_middleware=web.middleware, app_kwargs=kwargs)


def nats_transport(services: Any, channel: Any, views: Any, env: Any = None) -> Any:
    """The NATS transport beside the WebSocket one when COORDINATOR_NATS_URL is set (else
    None: nothing changes). Its pairing codes are shared with the owner's pairing route."""
    from islandlink.nats import NatsSettings, build_nats_link
    from scheduler.pairing import PairingSettings, build_pairing_codes

    settings = NatsSettings.from_env(env)
    if settings is None:
        return None
    cs = services.settings
    pairing = build_pairing_codes(cs.redis_url, cs.api.redis_prefix, PairingSettings())
    link = build_nats_link(services.coordinator, channel, settings, pairing)
    views.pairing = pairing
    views.nats_url = settings.url
    services.coordinator.nats_link = link
    return link


def nats_lifespan(link: Any) -> Any:
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any = None) -> Any:
        await link.start()
        try:
            yield
        finally:
            await link.close()
            await link.pairing.close()

    return lifespan


def island_views(channel: Any) -> Any:
    from api.islands import IslandViews

    return IslandViews(channel.c, channel.connected)


def island_routes(channel: Any, views: Any) -> list:
    """The Island link's WebSocket and Island registration for accounts (POST/GET /api/v1/islands)."""
    from api.islands import islands_handlers
    from islandlink.websocket import channel_handler

    return [channel_handler(channel), *islands_handlers(views)]
