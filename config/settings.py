"""One settings object, read from the environment once. Invalid settings fail at start
with a message naming the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ledger.pricing import credits_to_micro
from ledger.service import LedgerConfig
from scheduler.config import SchedulerConfig
from store.factory import StoreConfig, parse_postgres_url


class SettingsError(ValueError):
    """A setting is invalid; the message names the variable."""


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range {low}..{high}")
    return value


def _admin_token(env: Mapping[str, str]) -> str | None:
    token = env.get("COORDINATOR_ADMIN_TOKEN") or None
    if token is not None and len(token) < 16:
        raise SettingsError("COORDINATOR_ADMIN_TOKEN must be at least 16 characters")
    return token


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} must be true or false")


def _credits(env: Mapping[str, str], name: str, default: str) -> int:
    raw = env.get(name) or default
    try:
        value = credits_to_micro(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r}: {exc}") from None
    return value


@dataclass(frozen=True)
class ApiSettings:
    """The HTTP server's bounds and knobs (issue #4; units in names). Read by coordinator/app.py."""

    host: str = "127.0.0.1"
    port: int = 8000
    rate_limit_per_min: int = 100  # per API key, shared across processes through Redis
    max_body_bytes: int = 4 * 1024 * 1024  # larger bodies get 413
    stream_retention_s: int = 3_600  # a finished Job's event stream is kept this long
    stream_live_ttl_s: int = 86_400  # a live stream expires if nothing is appended for this long
    stream_max_events: int = 20_000  # per Job stream (approximate trim beyond)
    sse_keepalive_s: int = 15  # comment line on an idle SSE connection
    idempotency_ttl_s: int = 86_400  # an Idempotency-Key's first answer is replayed this long
    key_cache_s: int = 30  # an API key record is re-read from the store at least this often
    hold_sweep_s: int = 60  # period of the expired-hold sweeper
    batch_sweep_s: int = 30  # period of the unfinished-batch sweeper
    shutdown_grace_s: int = 30  # in-flight requests get this long on SIGTERM
    chat_wait_s: int = 600  # longest an OpenAI-style non-streaming answer waits for its Job
    redis_prefix: str = "coordinator:"
    # Who keeps the read models (projections/) current for this server: "process" = a child
    # process of `coordinator serve` (the default: the work is off the request path and its
    # GIL), "thread" = a thread of this process, "external" = another process (read only),
    # "off" = no read models (GET /jobs answers 503).
    projections: str = "process"


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    redis_url: str | None
    data_dir: Path
    db_schema: str | None
    ledger: LedgerConfig
    commit_max_batch: int
    commit_window_ms: int
    log_format: str  # "json" | "console" | "auto"
    log_level: str
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    catalog_path: Path | None = None  # None = the packaged scheduler/cargos.toml
    api: ApiSettings = field(default_factory=ApiSettings)
    admin_token: str | None = None  # COORDINATOR_ADMIN_TOKEN: the operator API's bearer token (unset = off)

    @property
    def store(self) -> StoreConfig:
        return StoreConfig(database_url=self.database_url, data_dir=self.data_dir, schema=self.db_schema)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        database_url = env.get("COORDINATOR_DATABASE_URL") or None
        if database_url:
            try:
                parse_postgres_url(database_url)
            except ValueError as exc:
                raise SettingsError(f"COORDINATOR_DATABASE_URL: {exc}") from None
        redis_url = env.get("COORDINATOR_REDIS_URL") or None
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("COORDINATOR_REDIS_URL must start with redis://, rediss:// or unix://")
        schema = env.get("COORDINATOR_DB_SCHEMA") or None
        if schema and not schema.replace("_", "").isalnum():
            raise SettingsError("COORDINATOR_DB_SCHEMA may hold only letters, digits and underscores")
        free_tier = _credits(env, "FREE_TIER_CREDITS", env.get("COORDINATOR_FREE_TIER_CREDITS") or "5")
        ledger = LedgerConfig(
            fee_bps=_int(env, "COORDINATOR_FEE_BPS", 1_000, 0, 10_000),
            hold_ttl_ms=_int(env, "COORDINATOR_HOLD_TTL_S", 3_600, 1, 30 * 86_400) * 1000,
            free_tier_limit_micro=free_tier,
            free_tier_grant_micro=_credits(env, "COORDINATOR_FREE_TIER_GRANT_CREDITS", _micro_str(free_tier)),
        )
        log_format = (env.get("COORDINATOR_LOG_FORMAT") or "auto").lower()
        if log_format not in ("json", "console", "auto"):
            raise SettingsError("COORDINATOR_LOG_FORMAT must be json, console or auto")
        try:
            return cls._build(env, database_url, redis_url, schema, ledger, log_format)
        except AssertionError as exc:
            raise SettingsError(f"inconsistent scheduler settings: {exc}") from None

    @classmethod
    def _build(cls, env: Mapping[str, str], database_url: str | None, redis_url: str | None, schema: str | None,
               ledger: LedgerConfig, log_format: str) -> Settings:
        return cls(
            database_url=database_url,
            redis_url=redis_url,
            data_dir=Path(env.get("COORDINATOR_DATA_DIR") or ".coordinator"),
            db_schema=schema,
            ledger=ledger,
            commit_max_batch=_int(env, "COORDINATOR_COMMIT_MAX_BATCH", 500, 1, 10_000),
            commit_window_ms=_int(env, "COORDINATOR_COMMIT_WINDOW_MS", 0, 0, 100),
            log_format=log_format,
            log_level=(env.get("COORDINATOR_LOG_LEVEL") or "info").lower(),
            scheduler=SchedulerConfig(
                ack_timeout_ms=_int(env, "COORDINATOR_ACK_TIMEOUT_S", 10, 1, 3_600) * 1000,
                lease_ms=_int(env, "COORDINATOR_LEASE_S", 60, 2, 86_400) * 1000,
                lease_renew_ms=_int(env, "COORDINATOR_LEASE_RENEW_S", 30, 1, 86_399) * 1000,
                queue_timeout_ms=_int(env, "COORDINATOR_QUEUE_TIMEOUT_S", 120, 1, 86_400) * 1000,
                max_attempts=_int(env, "COORDINATOR_MAX_ATTEMPTS", 3, 1, 100),
                heartbeat_interval_ms=_int(env, "COORDINATOR_HEARTBEAT_S", 10, 1, 3_600) * 1000,
                auto_approve_islands=_bool(env, "COORDINATOR_AUTO_APPROVE_ISLANDS", False),
                max_queued_per_account=_int(env, "COORDINATOR_MAX_QUEUED_PER_ACCOUNT", 1_000, 1, 1_000_000),
                surge_ratio=_int(env, "COORDINATOR_SURGE_RATIO", 2, 1, 1_000),
                surge_multiplier_permille=_int(env, "COORDINATOR_SURGE_MULTIPLIER_PERMILLE", 1_250, 1_000, 10_000),
                surge_hold_ms=_int(env, "COORDINATOR_SURGE_HOLD_S", 30, 1, 86_400) * 1000,
                max_ask_micro=_credits(env, "COORDINATOR_MAX_ASK_CREDITS", "1000"),
            ),
            catalog_path=Path(env["COORDINATOR_CATALOG"]) if env.get("COORDINATOR_CATALOG") else None,
            api=_api_settings(env),
            admin_token=_admin_token(env),
        )


def _micro_str(micro: int) -> str:
    whole, frac = divmod(micro, 1_000_000)
    return f"{whole}.{frac:06d}"


def _api_settings(env: Mapping[str, str]) -> ApiSettings:
    prefix = env.get("COORDINATOR_REDIS_PREFIX") or "coordinator:"
    if len(prefix) > 64 or any(c.isspace() for c in prefix):
        raise SettingsError("COORDINATOR_REDIS_PREFIX must be at most 64 characters without spaces")
    return ApiSettings(
        host=env.get("COORDINATOR_HOST") or "127.0.0.1",
        port=_int(env, "COORDINATOR_PORT", 8000, 0, 65_535),
        rate_limit_per_min=_int(env, "COORDINATOR_RATE_LIMIT_PER_MIN", 100, 1, 1_000_000),
        max_body_bytes=_int(env, "COORDINATOR_MAX_BODY_BYTES", 4 * 1024 * 1024, 1_024, 256 * 1024 * 1024),
        stream_retention_s=_int(env, "COORDINATOR_STREAM_RETENTION_S", 3_600, 1, 30 * 86_400),
        stream_live_ttl_s=_int(env, "COORDINATOR_STREAM_LIVE_TTL_S", 86_400, 60, 30 * 86_400),
        stream_max_events=_int(env, "COORDINATOR_STREAM_MAX_EVENTS", 20_000, 100, 10_000_000),
        sse_keepalive_s=_int(env, "COORDINATOR_SSE_KEEPALIVE_S", 15, 1, 3_600),
        idempotency_ttl_s=_int(env, "COORDINATOR_IDEMPOTENCY_TTL_S", 86_400, 60, 30 * 86_400),
        key_cache_s=_int(env, "COORDINATOR_KEY_CACHE_S", 30, 0, 3_600),
        hold_sweep_s=_int(env, "COORDINATOR_HOLD_SWEEP_S", 60, 1, 86_400),
        batch_sweep_s=_int(env, "COORDINATOR_BATCH_SWEEP_S", 30, 1, 86_400),
        shutdown_grace_s=_int(env, "COORDINATOR_SHUTDOWN_GRACE_S", 30, 0, 3_600),
        chat_wait_s=_int(env, "COORDINATOR_CHAT_WAIT_S", 600, 1, 86_400),
        redis_prefix=prefix,
        projections=_choice(env, "COORDINATOR_PROJECTIONS", "process", ("process", "thread", "external", "off")),
    )


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = (env.get(name) or default).strip().lower()
    if value not in allowed:
        raise SettingsError(f"{name}={value!r} must be one of {', '.join(allowed)}")
    return value
