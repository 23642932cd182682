"""One projector per store: an exclusive lock held for the life of a projector process.

    lock = ProjectorLock.acquire(store_config)   # raises ProjectorBusy if another holds it
    ...                                         # run the projector
    lock.release()                               # also released by the OS if the process dies

PostgreSQL: a session advisory lock (`pg_try_advisory_lock`) on a dedicated connection; the
key is derived from the schema, so two coordinators on one database but different schemas
do not collide. PostgreSQL ends the session (and the lock) when the connection drops, which
happens when the process dies however it dies (kill -9 closes its sockets).

SQLite: `flock(LOCK_EX | LOCK_NB)` on `<data_dir>/projector.lock`; the kernel drops the lock
with the last descriptor, so a killed projector never leaves a stale lock behind. The file
holds the holder's pid for the error message only (it is never trusted).

Decision: docs/decisions/0060-one-projector-lock.md.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from store.factory import StoreConfig, parse_postgres_url

EXIT_BUSY = 3
"""Exit status of `coordinator projections run` when another projector holds the lock."""


class ProjectorBusy(Exception):
    """Another projector process holds this store's projector lock."""


def advisory_key(schema: str | None) -> int:
    """A stable signed 64-bit advisory-lock key for the projector of `schema`."""
    digest = hashlib.sha256(f"archipelag-projector:{schema or 'public'}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class ProjectorLock:
    def __init__(self, kind: str, handle: Any, where: str) -> None:
        self.kind = kind
        self._handle = handle
        self.where = where

    @classmethod
    def acquire(cls, config: StoreConfig) -> ProjectorLock:
        if config.is_memory:
            return cls("memory", None, "memory")
        if config.is_postgres:
            return cls._acquire_pg(config)
        return cls._acquire_file(config)

    @classmethod
    def _acquire_pg(cls, config: StoreConfig) -> ProjectorLock:
        import psycopg

        p = parse_postgres_url(config.database_url or "")
        conn = psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                               user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None, autocommit=True,
                               connect_timeout=5, application_name="coordinator-projector")
        key = advisory_key(config.schema)
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not row or not row[0]:
            conn.close()
            raise ProjectorBusy(f"another projector is already running for schema {config.schema or 'public'} "
                                f"(advisory lock {key} is held)")
        return cls("postgres", conn, f"advisory lock {key} in schema {config.schema or 'public'}")

    @classmethod
    def _acquire_file(cls, config: StoreConfig) -> ProjectorLock:
        import fcntl

        config.data_dir.mkdir(parents=True, exist_ok=True)
        path = config.data_dir / "projector.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise ProjectorBusy(f"another projector is already running for {config.data_dir}{who}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls("file", fd, str(path))

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        if self.kind == "postgres":
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - the session ends with the connection either way
                pass
        elif self.kind == "file":
            os.close(handle)
