"""Shared fixtures. Backends: the embedded SQLite default and a real PostgreSQL (each
test in a schema of its own). With CI=true an unreachable PostgreSQL or Redis fails the
test run; on a developer machine those tests are skipped with the reason."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from store.factory import StoreConfig, parse_postgres_url

from coordinator.logs import configure_logging

configure_logging("console", "warning")

PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() == "true"

_pg_ok: bool | None = None
_redis_ok: bool | None = None


def pg_reachable() -> bool:
    global _pg_ok
    if _pg_ok is None:
        import psycopg

        p = parse_postgres_url(PG_URL)
        try:
            psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                            user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None,
                            connect_timeout=3).close()
            _pg_ok = True
        except Exception:  # noqa: BLE001
            _pg_ok = False
    return _pg_ok


def redis_reachable() -> bool:
    global _redis_ok
    if _redis_ok is None:
        import redis

        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
            _redis_ok = True
        except Exception:  # noqa: BLE001
            _redis_ok = False
    return _redis_ok


def require_postgres() -> None:
    if not pg_reachable():
        msg = f"PostgreSQL unreachable at {PG_URL} (run scripts/services.sh)"
        if IN_CI:
            pytest.fail(msg + " — CI=true: failing, not skipping")
        pytest.skip(msg)


def require_redis() -> None:
    if not redis_reachable():
        msg = f"Redis unreachable at {REDIS_URL} (run scripts/services.sh)"
        if IN_CI:
            pytest.fail(msg + " — CI=true: failing, not skipping")
        pytest.skip(msg)


def drop_schema(schema: str) -> None:
    import psycopg

    p = parse_postgres_url(PG_URL)
    with psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                         user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None, autocommit=True) as c:
        c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def make_store(kind: str, tmp_path: Path) -> StoreConfig:
    if kind == "postgres":
        require_postgres()
        return StoreConfig(database_url=PG_URL, data_dir=tmp_path, schema=f"t_{uuid.uuid4().hex[:12]}")
    return StoreConfig(database_url=None, data_dir=tmp_path / "data")


@pytest.fixture(params=["sqlite", "postgres"])
def store_config(request, tmp_path):
    config = make_store(request.param, tmp_path)
    yield config
    if config.schema:
        drop_schema(config.schema)


@pytest.fixture
def pg_store_config(tmp_path):
    config = make_store("postgres", tmp_path)
    yield config
    drop_schema(config.schema)


def env_for(config: StoreConfig, **extra: str) -> dict[str, str]:
    """Environment variables that point the coordinator at `config`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    env["COORDINATOR_DATA_DIR"] = str(config.data_dir)
    if config.database_url:
        env["COORDINATOR_DATABASE_URL"] = config.database_url
        env["COORDINATOR_DB_SCHEMA"] = config.schema or ""
    env.update(extra)
    return env
