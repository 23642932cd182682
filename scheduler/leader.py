"""Leader election for dispatch: only the process holding the leader lock dispatches
and runs timers; every process accepts commands. Correctness does not depend on the
lock (a Job's aggregate version makes double assignment impossible); the lock avoids
wasted conflicts and two routers overbooking the same Island.

PostgreSQL: a session-level advisory lock on a dedicated connection. If the leader
process dies its connection closes and the lock is free; another process takes it on
its next try (`retry_ms`)."""

from __future__ import annotations

import hashlib
import time

import psycopg
import structlog

from store.factory import StoreConfig, parse_postgres_url

log = structlog.get_logger("scheduler.leader")


def lock_key(config: StoreConfig) -> int:
    digest = hashlib.blake2b(f"archipelag-dispatch:{config.schema or 'public'}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresLeaderLock:
    def __init__(self, config: StoreConfig, *, retry_ms: int = 1_000, check_ms: int = 1_000) -> None:
        assert config.database_url
        self.params = parse_postgres_url(config.database_url)
        self.key = lock_key(config)
        self.retry_s = retry_ms / 1000
        self.check_s = check_ms / 1000
        self._conn: psycopg.Connection | None = None
        self._leader = False
        self._next_try = 0.0

    def _connect(self) -> psycopg.Connection:
        p = self.params
        return psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                               user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None, autocommit=True,
                               connect_timeout=5)

    def held(self) -> bool:
        """The last known answer of `is_leader`, without any I/O (for event-loop readers)."""
        return self._leader

    def is_leader(self) -> bool:
        now = time.monotonic()
        if now < self._next_try:
            return self._leader
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
                self._leader = False
            if self._leader:
                self._conn.execute("SELECT 1")
                self._next_try = now + self.check_s
            else:
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
                self._leader = bool(row and row[0])
                self._next_try = now + (self.check_s if self._leader else self.retry_s)
                if self._leader:
                    log.info("dispatch_leader_acquired", key=self.key)
        except psycopg.Error as exc:
            if self._leader:
                log.warning("dispatch_leader_lost", error=str(exc))
            self._leader = False
            self._conn = None
            self._next_try = now + self.retry_s
        return self._leader

    def release(self) -> None:
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("SELECT pg_advisory_unlock_all()")
            finally:
                self._conn.close()
        self._leader = False
