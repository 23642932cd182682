"""A thin SQL dialect layer: the same projection code writes to SQLite (embedded default)
or PostgreSQL. Views live in the same database as the event log (PostgreSQL: the store's
schema; SQLite: the same `events.sqlite` file; memory store: a shared in-memory SQLite).

Statements are written with `?` placeholders; the PostgreSQL connection rewrites them to
`%s`. Values are plain ints, strs and None (JSON is stored as text, booleans as 0/1), so
both drivers move them without adapters and rows compare equal across dialects.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from store.factory import StoreConfig, ensure_schema, parse_postgres_url

INT = "int"
TEXT = "text"
SMALL_INSERT_ROWS = 20  # PostgreSQL: up to this many rows go as one INSERT in the page's pipeline


@dataclass(frozen=True)
class Table:
    """A view table: logical name, columns `(name, type)`, primary key, secondary indexes.
    `append_only` tables are only ever inserted into (statement lines, karma history).
    `counters` tables have a text key, a `position` column and integer counters that
    start at 0 and change only through `TableState.add` (summed per page, merged once)."""

    name: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]
    indexes: tuple[tuple[str, ...], ...] = ()
    append_only: bool = False
    counters: bool = False

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.columns)

    def key_positions(self) -> tuple[int, ...]:
        names = self.column_names
        return tuple(names.index(k) for k in self.key)


class Dialect:
    name = "?"
    placeholder = "?"
    int_type = "INTEGER"
    text_type = "TEXT"

    def ddl(self, table: Table, physical: str, *, key: bool = True) -> str:
        """CREATE TABLE; `key=False` leaves the primary key for `key_ddl` (bulk loads)."""
        cols = ", ".join(f"{c} {self.int_type if t == INT else self.text_type}" +
                         (" NOT NULL" if c in table.key else "") for c, t in table.columns)
        if not key:
            return f"CREATE TABLE IF NOT EXISTS {physical} ({cols})"
        # The constraint (and its index) is named with a random token, like the indexes.
        return (f"CREATE TABLE IF NOT EXISTS {physical} ({cols}, CONSTRAINT {physical}_pk_{secrets.token_hex(4)} "
                f"PRIMARY KEY ({', '.join(table.key)}))")

    def key_ddl(self, table: Table, physical: str) -> str:
        return (f"ALTER TABLE {physical} ADD CONSTRAINT {physical}_pk_{secrets.token_hex(4)} "
                f"PRIMARY KEY ({', '.join(table.key)})")

    def index_ddl(self, table: Table, physical: str) -> list[str]:
        # Index names carry a random token: a scratch table's indexes keep their names when
        # the table is renamed into place, so they must never collide with the live ones.
        out = []
        for cols in table.indexes:
            token = secrets.token_hex(4)
            base = "_".join(c.split()[0] for c in cols)
            # PostgreSQL cuts identifiers at 63 bytes: keep the token inside the name.
            name = f"{physical}_{base}"[:63 - len(token) - 1]
            out.append(f"CREATE INDEX {name}_{token} ON {physical} ({', '.join(cols)})")
        return out


class SQLiteDialect(Dialect):
    name = "sqlite"

    def key_ddl(self, table: Table, physical: str) -> str:
        # SQLite cannot add a primary key later; a unique index gives the same lookups and
        # the same INSERT OR REPLACE semantics.
        return (f"CREATE UNIQUE INDEX {physical}_pk_{secrets.token_hex(4)} ON {physical} "
                f"({', '.join(table.key)})")


class PostgresDialect(Dialect):
    name = "postgres"
    placeholder = "%s"
    int_type = "BIGINT"


class Conn:
    """One connection in autocommit mode; `begin()` opens an explicit write transaction."""

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]: ...
    def begin(self) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...
    def insert_rows(self, physical: str, columns: Sequence[str], rows: list[tuple], replace: bool,
                    types: Sequence[str] | None = None) -> None: ...
    def write(self, deletes: list, inserts: list) -> None: ...
    def begin_tracked(self, physical: str, updates: list[tuple[str, int, int, int, int]], now_ms: int) -> int: ...
    def delete_keys(self, physical: str, key: Sequence[str], keys: list) -> None: ...
    def table_exists(self, physical: str) -> bool: ...
    def lock_tracking(self, physical: str, names: Sequence[str]) -> list[tuple]: ...

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def iter_query(self, sql: str, params: Sequence[Any] = (), chunk: int = 5_000) -> Iterable[tuple]:
        yield from self.query(sql, params)


class SQLiteConn(Conn):
    dialect = SQLiteDialect()

    def __init__(self, target: str, *, uri: bool = False, timeout_s: float = 30.0) -> None:
        self.raw = sqlite3.connect(target, uri=uri, isolation_level=None, check_same_thread=False,
                                   timeout=timeout_s)
        if not uri:
            self.raw.execute("PRAGMA journal_mode=WAL")
        # Views and their tracking position commit together, so losing the last commits on
        # power failure (WAL + NORMAL) only means replaying them: never a half-applied page.
        self.raw.execute("PRAGMA synchronous=NORMAL")
        self.in_tx = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.raw.execute(sql, params).fetchall()

    def iter_query(self, sql: str, params: Sequence[Any] = (), chunk: int = 5_000) -> Iterable[tuple]:
        cur = self.raw.execute(sql, params)
        while True:
            rows = cur.fetchmany(chunk)
            if not rows:
                return
            yield from rows

    def begin(self) -> None:
        # IMMEDIATE: take the write lock now, so the tracking check and the writes see one state.
        self.raw.execute("BEGIN IMMEDIATE")
        self.in_tx = True

    def begin_read(self) -> None:
        self.raw.execute("BEGIN")
        self.in_tx = True

    def commit(self) -> None:
        self.raw.execute("COMMIT")
        self.in_tx = False

    def rollback(self) -> None:
        if self.raw.in_transaction:
            self.raw.execute("ROLLBACK")
        self.in_tx = False

    def close(self) -> None:
        self.raw.close()

    def insert_rows(self, physical: str, columns: Sequence[str], rows: list[tuple], replace: bool,
                    types: Sequence[str] | None = None) -> None:
        if not rows:
            return
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        marks = ", ".join("?" * len(columns))
        self.raw.executemany(f"{verb} INTO {physical} ({', '.join(columns)}) VALUES ({marks})", rows)

    def write(self, deletes: list, inserts: list) -> None:
        for physical, key, keys in deletes:
            self.delete_keys(physical, key, keys)
        for physical, cols, rows, replace, _types in inserts:
            self.insert_rows(physical, cols, rows, replace)

    def begin_tracked(self, physical: str, updates: list[tuple[str, int, int, int, int]], now_ms: int) -> int:
        """BEGIN IMMEDIATE, then move each tracking row `(name, expected position, expected
        generation, new position, events)` if it still holds the expected position and
        generation. Returns how many rows moved (fewer: someone else moved them)."""
        self.begin()
        cur = self.raw.executemany(
            f"UPDATE {physical} SET position = MAX(position, ?), events = events + ?, updated_at_ms = ? "
            f"WHERE name = ? AND position = ? AND generation = ?",
            [(new, n, now_ms, name, pos, gen) for name, pos, gen, new, n in updates])
        return cur.rowcount

    def delete_keys(self, physical: str, key: Sequence[str], keys: list) -> None:
        if not keys:
            return
        where = " AND ".join(f"{k} = ?" for k in key)
        params = [(k,) for k in keys] if len(key) == 1 else keys
        self.raw.executemany(f"DELETE FROM {physical} WHERE {where}", params)

    def table_exists(self, physical: str) -> bool:
        return self.query_one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (physical,)) is not None

    def lock_tracking(self, physical: str, names: Sequence[str]) -> list[tuple]:
        marks = ", ".join("?" * len(names))
        return self.query(f"SELECT name, position, generation FROM {physical} WHERE name IN ({marks})", list(names))


class PostgresConn(Conn):
    dialect = PostgresDialect()

    def __init__(self, config: StoreConfig, *, application_name: str = "coordinator-projections") -> None:
        import psycopg

        p = parse_postgres_url(config.database_url or "")
        self.schema = config.schema or "public"
        self.raw = psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                                   user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None,
                                   autocommit=True, connect_timeout=5, application_name=application_name)
        self.raw.execute(f'SET search_path TO "{self.schema}"')
        self.in_tx = False

    def relax_durability(self) -> None:
        """Scratch loads: their commits need not wait for the WAL flush. A crash loses at
        most scratch rows (dropped by the next rebuild anyway), and the swap commits
        synchronously: flushing the WAL up to its commit record flushes everything the
        scratch loads wrote before it."""
        self.raw.execute("SET synchronous_commit TO off")

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(self._sql(sql), params or None)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.raw.execute(self._sql(sql), params or None).fetchall()

    def iter_query(self, sql: str, params: Sequence[Any] = (), chunk: int = 5_000) -> Iterable[tuple]:
        # A server-side cursor needs a transaction; callers of iter_query hold one.
        name = f"c_{uuid.uuid4().hex[:12]}"
        with self.raw.cursor(name=name) as cur:
            cur.itersize = chunk
            cur.execute(self._sql(sql), params or None)
            yield from cur

    def begin(self) -> None:
        self.raw.execute("BEGIN")
        self.in_tx = True

    def begin_read(self) -> None:
        self.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        self.in_tx = True

    def commit(self) -> None:
        self.raw.execute("COMMIT")
        self.in_tx = False

    def rollback(self) -> None:
        try:
            self.raw.execute("ROLLBACK")
        finally:
            self.in_tx = False

    def close(self) -> None:
        self.raw.close()

    def insert_rows(self, physical: str, columns: Sequence[str], rows: list[tuple], replace: bool,
                    types: Sequence[str] | None = None) -> None:
        # COPY is the fast path (binary when the column types are known: ~25% cheaper than
        # text); rows that replace existing ones were deleted just before.
        if not rows:
            return
        binary = types is not None
        sql = f"COPY {physical} ({', '.join(columns)}) FROM STDIN" + (" (FORMAT BINARY)" if binary else "")
        with self.raw.cursor() as cur, cur.copy(sql) as cp:
            if binary:
                cp.set_types(["int8" if t == INT else "text" for t in types])  # type: ignore[union-attr]
            write = cp.write_row
            for row in rows:
                write(row)

    def write(self, deletes: list, inserts: list) -> None:
        """A page's writes with few round trips: every DELETE and every small INSERT in
        one pipeline (one round trip), then one COPY per bigger table (COPY cannot be
        pipelined; a multi-row INSERT costs ~10x a COPY per row beyond a few rows)."""
        small = [i for i in inserts if len(i[2]) <= SMALL_INSERT_ROWS]
        big = [i for i in inserts if len(i[2]) > SMALL_INSERT_ROWS]
        if deletes or small:
            with self.raw.pipeline():
                for physical, key, keys in deletes:
                    self.delete_keys(physical, key, keys)
                for physical, cols, rows, _, _ in small:
                    one = "(" + ", ".join(["%s"] * len(cols)) + ")"
                    self.raw.execute(f"INSERT INTO {physical} ({', '.join(cols)}) VALUES "
                                     f"{', '.join([one] * len(rows))}", [v for r in rows for v in r])
        for physical, cols, rows, _, types in big:
            self.insert_rows(physical, cols, rows, False, types)

    def begin_tracked(self, physical: str, updates: list[tuple[str, int, int, int, int]], now_ms: int) -> int:
        """BEGIN and the conditional move of the tracking rows in one round trip (see
        SQLiteConn.begin_tracked). The UPDATE locks the rows like SELECT ... FOR UPDATE;
        a concurrent mover's update re-checks the condition after we commit."""
        cols = list(zip(*updates))
        with self.raw.pipeline():
            self.raw.execute("BEGIN")
            self.in_tx = True
            cur = self.raw.execute(
                f"UPDATE {physical} AS t SET position = GREATEST(t.position, u.new), events = t.events + u.n, "
                f"updated_at_ms = %s FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], "
                f"%s::bigint[]) AS u(name, pos, gen, new, n) "
                f"WHERE t.name = u.name AND t.position = u.pos AND t.generation = u.gen RETURNING t.name",
                [now_ms, list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), list(cols[4])])
        return len(cur.fetchall())

    def delete_keys(self, physical: str, key: Sequence[str], keys: list) -> None:
        if not keys:
            return
        if len(key) == 1:
            self.raw.execute(f"DELETE FROM {physical} WHERE {key[0]} = ANY(%s)", (list(keys),))
            return
        cols = list(zip(*keys))
        unnest = ", ".join("%s::text[]" for _ in key)
        cond = " AND ".join(f"t.{k} = k.{k}" for k in key)
        self.raw.execute(f"DELETE FROM {physical} AS t USING unnest({unnest}) AS k({', '.join(key)}) WHERE {cond}",
                         [list(c) for c in cols])

    def table_exists(self, physical: str) -> bool:
        return self.query_one("SELECT 1 FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                              (self.schema, physical)) is not None

    def lock_tracking(self, physical: str, names: Sequence[str]) -> list[tuple]:
        return self.query(f"SELECT name, position, generation FROM {physical} WHERE name = ANY(?) FOR UPDATE",
                          (list(names),))

    def read_events(self, events_table: str, after: int, stop: int, topics: Sequence[str],
                    limit: int) -> list[tuple]:
        """(position, originator id text, version, topic, state) in log order: binary
        transfer, tuple rows, the id as text; about 3x cheaper than the library's
        select_notifications (dict rows, Notification objects, UUID objects)."""
        with self.raw.cursor(binary=True) as cur:
            cur.execute(f"SELECT notification_id, originator_id::text, originator_version, topic, state "
                        f"FROM {events_table} WHERE notification_id > %s AND notification_id <= %s "
                        f"AND topic = ANY(%s) ORDER BY notification_id LIMIT %s",
                        (after, stop, list(topics), limit))
            return cur.fetchall()


_memory_keepers: dict[str, sqlite3.Connection] = {}
_memory_lock = threading.Lock()


class Database:
    """Where the views live, derived from the store configuration; hands out connections."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._memory_uri: str | None = None
        if config.is_memory:
            # The memory event store lives in this process only; so do its views. A keeper
            # connection holds the shared in-memory database open.
            name = f"proj_{uuid.uuid4().hex}"
            self._memory_uri = f"file:{name}?mode=memory&cache=shared"
            with _memory_lock:
                _memory_keepers[name] = sqlite3.connect(self._memory_uri, uri=True, check_same_thread=False)
            self._memory_name = name
        elif config.is_postgres:
            ensure_schema(config)
        else:
            config.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def dialect(self) -> str:
        return "postgres" if self.config.is_postgres else "sqlite"

    def connect(self) -> Conn:
        if self.config.is_postgres:
            return PostgresConn(self.config)
        if self._memory_uri is not None:
            return SQLiteConn(self._memory_uri, uri=True)
        return SQLiteConn(str(self.config.data_dir / "events.sqlite"))

    def describe(self) -> str:
        return self.config.describe()

    def close(self) -> None:
        if self._memory_uri is not None:
            with _memory_lock:
                keeper = _memory_keepers.pop(self._memory_name, None)
            if keeper is not None:
                keeper.close()


def fetch_rows(conn: Conn, physical: str, table: Table, where: str = "", params: Sequence[Any] = ()) -> list[tuple]:
    sql = f"SELECT {', '.join(table.column_names)} FROM {physical}"
    if where:
        sql += f" WHERE {where}"
    return conn.query(sql, params)
