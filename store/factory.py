"""Build the eventsourcing environment for the embedded (SQLite) or PostgreSQL store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from eventsourcing.application import Application

from store.transcoder import MsgspecTranscoder

POSTGRES_LOCK_TIMEOUT_S = 5
MEMORY_URL = "memory:"
TRANSCODER_TOPIC = f"{MsgspecTranscoder.__module__}:{MsgspecTranscoder.__qualname__}"
MAPPER_TOPIC = "store.mapper:FastMapper"
MEMORY_FACTORY_TOPIC = "store.memory_recorder:FastPOPOFactory"


@dataclass(frozen=True)
class StoreConfig:
    """Where events live. `database_url` None = embedded SQLite file under `data_dir`;
    "memory:" = in-process memory (the simulator's store; gone when the process ends)."""

    database_url: str | None
    data_dir: Path
    schema: str | None = None  # PostgreSQL schema (tests isolate themselves with one)
    pool_size: int = 5

    @property
    def is_postgres(self) -> bool:
        return self.database_url is not None and not self.is_memory

    @property
    def is_memory(self) -> bool:
        return self.database_url == MEMORY_URL

    def describe(self) -> str:
        if self.is_memory:
            return "memory"
        if self.database_url:
            u = urlparse(self.database_url)
            return f"postgresql://{u.hostname}:{u.port or 5432}/{u.path.lstrip('/')}" + (
                f" schema={self.schema}" if self.schema else ""
            )
        return f"sqlite:{self.data_dir / 'events.sqlite'}"


def parse_postgres_url(url: str) -> dict[str, str]:
    u = urlparse(url)
    if u.scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        raise ValueError(f"not a PostgreSQL URL (scheme {u.scheme!r}); expected postgresql://user@host:port/dbname")
    dbname = u.path.lstrip("/")
    if not dbname:
        raise ValueError("PostgreSQL URL has no database name; expected postgresql://user@host:port/dbname")
    return {
        "POSTGRES_DBNAME": dbname,
        "POSTGRES_HOST": u.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(u.port or 5432),
        "POSTGRES_USER": unquote(u.username or os.environ.get("USER", "postgres")),
        "POSTGRES_PASSWORD": unquote(u.password or ""),
    }


def eventsourcing_env(config: StoreConfig) -> dict[str, str]:
    env: dict[str, str] = {
        "TRANSCODER_TOPIC": TRANSCODER_TOPIC,
        "CREATE_TABLE": "y",
        # Our unit of work keeps its own aggregate cache; the library's would re-read per get.
        "AGGREGATE_CACHE_MAXSIZE": "",
        # Same stored bytes as the library's mapper, fewer steps per event (store/mapper.py).
        "MAPPER_TOPIC": MAPPER_TOPIC,
    }
    if config.is_memory:
        # The library's in-memory store with a cheaper insert (store/memory_recorder.py).
        env["PERSISTENCE_MODULE"] = MEMORY_FACTORY_TOPIC
    elif config.database_url:
        env.update(parse_postgres_url(config.database_url))
        env["PERSISTENCE_MODULE"] = "eventsourcing.postgres"
        env["APPLICATION_RECORDER_TOPIC"] = "store.pg_recorder:FastPostgresApplicationRecorder"
        env["POSTGRES_LOCK_TIMEOUT"] = str(POSTGRES_LOCK_TIMEOUT_S)
        env["POSTGRES_POOL_SIZE"] = str(config.pool_size)
        env["POSTGRES_MAX_OVERFLOW"] = "10"
        env["POSTGRES_CONNECT_TIMEOUT"] = "5"
        env["POSTGRES_PRE_PING"] = "n"  # a ping per checkout halves throughput; failures are retried
        if config.schema:
            env["POSTGRES_SCHEMA"] = config.schema
        # Never POSTGRES_ENABLE_DB_FUNCTIONS: a reader tailing the log skipped events with it.
        env["POSTGRES_ENABLE_DB_FUNCTIONS"] = ""
    else:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        env["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
        env["SQLITE_DBNAME"] = str(config.data_dir / "events.sqlite")
        env["SQLITE_LOCK_TIMEOUT"] = "10"
    return env


# One advisory-lock key for all DDL of the coordinator: PostgreSQL's catalog does not
# serialise concurrent `CREATE ... IF NOT EXISTS` of the same object ("tuple concurrently
# updated", or a unique violation on pg_type), so processes opening one store at once
# take turns. Held only while tables are created, never on the write path.
DDL_LOCK_SQL = "SELECT pg_advisory_lock(hashtext('archipelag:ddl'))"
DDL_XACT_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('archipelag:ddl'))"


def _pg_connect(config: StoreConfig):
    import psycopg

    params = parse_postgres_url(config.database_url)
    return psycopg.connect(
        dbname=params["POSTGRES_DBNAME"],
        host=params["POSTGRES_HOST"],
        port=params["POSTGRES_PORT"],
        user=params["POSTGRES_USER"],
        password=params["POSTGRES_PASSWORD"] or None,
        autocommit=True,
        connect_timeout=5,
    )


@contextmanager
def ddl_lock(config: StoreConfig) -> Iterator[None]:
    """Hold the coordinator's DDL lock (PostgreSQL; a no-op otherwise) and create the named
    schema if missing. The session lock ends with the connection."""
    if not config.is_postgres:
        yield
        return
    with _pg_connect(config) as conn:
        conn.execute(DDL_LOCK_SQL)
        if config.schema:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{config.schema}"')
        yield


def ensure_schema(config: StoreConfig) -> None:
    """Create the PostgreSQL schema if it is named and missing."""
    if config.is_postgres and config.schema:
        with ddl_lock(config):
            pass


class EventStoreApp(Application):
    """The one eventsourcing Application of the coordinator: all aggregates share one
    event log, so projections see one total order."""

    name = "coordinator"


def open_app(config: StoreConfig) -> EventStoreApp:
    env = eventsourcing_env(config)
    # The recorder creates its tables in its constructor: under the DDL lock. The library
    # reads os.environ too; our env wins.
    with ddl_lock(config):
        return EventStoreApp(env=env)


def iter_log(app: Application, *, start: int = 1, stop: int | None = None, page: int = 2_000,
             topics: tuple[str, ...] = ()):
    """Yield (position, domain event) over the whole log (or a range), in commit order."""
    assert page > 0
    position = start
    while True:
        notifications = app.recorder.select_notifications(start=position, limit=page, stop=stop, topics=topics)
        if not notifications:
            return
        for n in notifications:
            yield n.id, app.mapper.to_domain_event(n)
        position = notifications[-1].id + 1
        if len(notifications) < page or (stop is not None and position > stop):
            return


def max_position(app: Application) -> int:
    return app.recorder.max_notification_id() or 0
