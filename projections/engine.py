"""The projection engine: projections fold events into rows held in a write-back working
set; a page of events is flushed to the view tables in one transaction together with the
tracking position (see projections/runner.py).

A projection is a class with `name`, `version`, `tables` and handlers `on_<Event>` bound to
event topics. Handlers receive the decoded event state (a dict, as the transcoder stored
it), the log position, the aggregate id, its version and the event time in ms; they read
and change rows through `TableState` objects. Handlers must be deterministic functions of
the events: a rebuild replays exactly the same calls and must produce identical rows.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any

from projections.sql import Conn, Table

Handler = Callable[["Work", int, str, int, dict, int], None]


class TableState:
    """Rows of one table that this process has seen: the cache and what is to be written.

    `rows[key]` is a dict (the row), or None (known not to exist). `complete` means every
    row of the physical table is in `rows` (true for a fresh table until the first
    eviction), so a miss needs no SELECT. `persisted` holds keys known to exist in the
    database (an upsert of those deletes first on PostgreSQL, whose fast path is COPY)."""

    __slots__ = ("table", "physical", "rows", "dirty", "deleted", "persisted", "appended", "complete", "conn",
                 "_cols", "_types", "_select", "max_rows", "counters")

    def __init__(self, table: Table, physical: str, max_rows: int) -> None:
        self.table = table
        self.physical = physical
        self.rows: dict[Any, dict | None] = {}
        self.dirty: set = set()
        self.deleted: set = set()
        self.persisted: set = set()
        self.appended: list[tuple] = []
        self.complete = False
        self.conn: Conn | None = None
        self.max_rows = max_rows
        self.counters: dict[Any, list] = {}  # key -> [position, {column: delta}]
        self._cols = table.column_names
        self._types = tuple(ty for _, ty in table.columns)
        where = " AND ".join(f"{k} = ?" for k in table.key)
        self._select = f"SELECT {', '.join(self._cols)} FROM {physical} WHERE {where}"

    # ---------------------------------------------------------------- handler API
    def get(self, key: Any) -> dict | None:
        rows = self.rows
        if key in rows:
            return rows[key]
        if self.complete:
            rows[key] = None
            return None
        assert self.conn is not None
        params = (key,) if len(self.table.key) == 1 else key
        found = self.conn.query_one(self._select, params)
        row = dict(zip(self._cols, found)) if found is not None else None
        rows[key] = row
        if row is not None:
            self.persisted.add(key)
        return row

    def put(self, key: Any, row: dict) -> None:
        self.rows[key] = row
        self.dirty.add(key)
        self.deleted.discard(key)

    def touch(self, key: Any) -> None:
        """The row (from get) was changed in place."""
        self.dirty.add(key)

    def delete(self, key: Any) -> None:
        self.rows[key] = None
        self.dirty.discard(key)
        self.deleted.add(key)

    def append(self, row: tuple) -> None:
        self.appended.append(row)

    def add(self, key: Any, column: str, delta: int, pos: int) -> None:
        """Counter tables: add `delta` to a column (summed here, merged into the row when
        the page is written; the row's `position` becomes the last event's)."""
        c = self.counters.get(key)
        if c is None:
            self.counters[key] = [pos, {column: delta}]
            return
        c[0] = pos
        d = c[1]
        d[column] = d.get(column, 0) + delta

    def _merge_counters(self) -> None:
        cols = self._cols
        key_col = self.table.key[0]
        for key, (pos, deltas) in self.counters.items():
            row = self.get(key)
            if row is None:
                row = dict.fromkeys(cols, 0)
                row[key_col] = key
                self.rows[key] = row
                self.deleted.discard(key)
            for col, delta in deltas.items():
                row[col] += delta
            row["position"] = pos
            self.dirty.add(key)
        self.counters.clear()

    # ---------------------------------------------------------------- runner API
    def pending(self) -> int:
        return len(self.dirty) + len(self.deleted) + len(self.appended) + len(self.counters)

    def plan(self, dialect: str) -> tuple[list, list]:
        """What to write for this table (inside the caller's transaction): deletes
        `(physical, key columns, keys)` and inserts `(physical, columns, rows, replace)`.
        PostgreSQL replaces a row by DELETE + insert (COPY is its fast path); SQLite by
        INSERT OR REPLACE."""
        t = self.table
        if self.counters:
            self._merge_counters()
        types = self._types
        if t.append_only:
            return [], [(self.physical, self._cols, self.appended, False, types)] if self.appended else []
        cols = self._cols
        dirty = self.dirty
        persisted = self.persisted
        written = [tuple(r[c] for c in cols) for r in (self.rows[k] for k in dirty)]  # type: ignore[index]
        stale = [k for k in self.deleted if k in persisted]
        if dialect == "postgres":
            stale.extend(k for k in dirty if k in persisted)
        deletes = [(self.physical, t.key, stale)] if stale else []
        inserts = [(self.physical, cols, written, dialect != "postgres", types)] if written else []
        return deletes, inserts

    def committed(self) -> None:
        self.persisted |= self.dirty
        self.persisted -= self.deleted
        self.dirty.clear()
        self.deleted.clear()
        self.appended.clear()
        if len(self.rows) > self.max_rows:
            # Forget the oldest half (insertion order ~ age; old Jobs are finished).
            for k in list(islice(self.rows, len(self.rows) // 2)):
                del self.rows[k]
                self.persisted.discard(k)
            self.complete = False

    def forget(self) -> None:
        """After a rollback: nothing in memory can be trusted any more."""
        self.rows.clear()
        self.dirty.clear()
        self.deleted.clear()
        self.persisted.clear()
        self.appended.clear()
        self.counters.clear()
        self.complete = False


class Work:
    """The working set of one runner: a TableState per logical table name."""

    def __init__(self, tables: dict[str, TableState]) -> None:
        self.tables = tables

    def __getitem__(self, name: str) -> TableState:
        return self.tables[name]


class Projection:
    """Base class. Subclasses set `name`, `version`, `tables` and define `on_*` handlers
    registered in `handlers()` as {topic: method}."""

    name: str = ""
    version: int = 1
    tables: tuple[Table, ...] = ()

    def handlers(self) -> dict[str, Handler]:
        raise NotImplementedError

    def topics(self) -> tuple[str, ...]:
        return tuple(self.handlers())
