"""Rebuild and verify.

rebuild(NAMES): replay the whole log into scratch tables (`<table>__rebuild`, created
without secondary indexes, filled with big pages: COPY on PostgreSQL), index them, then
swap them in ONE transaction that also catches up the last events and moves the tracking
row (position, generation + 1, code version). Readers keep reading the old tables until
the swap commits; a live runner (this or another process) finds the generation changed,
forgets its cache and carries on from the new position. A crash during the replay leaves
the live tables untouched (the scratch tables are dropped by the next rebuild).

verify(NAMES): replay into `<table>__verify` up to the position the live tables are at,
then compare both row by row, ordered by primary key, in one read snapshot; the first
difference is reported by table, key and column. The scratch tables are dropped after.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from eventsourcing.application import Application

from projections.engine import Projection
from projections.catalog import select_projections
from projections.runner import ProjectionRunner
from projections.sql import Conn, Database, Table
from projections.tracking import TRACKING
from store.factory import max_position



def log() -> structlog.BoundLogger:
    """A fresh logger per use: structlog caches a logger on first use together with the
    stream it was configured with, which outlives that stream in tests and tools."""
    return structlog.get_logger("projections")

REBUILD_PAGE = 20_000
Progress = Callable[[int, int], None]


@dataclass
class RebuildResult:
    projections: list[str]
    position: int
    events: int
    seconds: float
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def _scratch(app: Application, db: Database, projections: Sequence[Projection], suffix: str,
             page_size: int) -> ProjectionRunner:
    """A runner writing fresh scratch tables: no tracking, rows held back and written
    once (defer_upserts), no secondary indexes and (PostgreSQL) no primary key until
    `_index(runner)`: bulk loads into bare tables, indexes built once at the end."""
    runner = ProjectionRunner(app, db, projections, suffix=suffix, track=False, page_size=page_size,
                              cache_rows=2_000_000, defer_upserts=True)
    if runner.conn.dialect.name == "postgres":
        runner.conn.relax_durability()  # type: ignore[attr-defined]
    runner.create_tables(drop=True, indexes=False, keys=runner.conn.dialect.name != "postgres")
    for ts in runner.work.tables.values():
        ts.complete = True
    return runner


def _index(runner: ProjectionRunner) -> None:
    runner.finish()
    runner.create_indexes(keys=runner.conn.dialect.name == "postgres")


def _drop(conn: Conn, runner: ProjectionRunner) -> None:
    for ts in runner.work.tables.values():
        conn.execute(f"DROP TABLE IF EXISTS {ts.physical}")


def _ensure_tracking(conn: Conn) -> None:
    conn.begin()
    try:
        conn.execute(conn.dialect.ddl(TRACKING, TRACKING.name))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


PARALLEL_MIN_EVENTS = 20_000
_READ = "__read__"  # in the counts of a load: events read (each once per group)


def _load(app: Application, db: Database, projections: Sequence[Projection], head: int, page_size: int,
          progress: Progress | None = None) -> dict[str, int]:
    """Fill fresh scratch tables up to `head`, index them. Returns events applied per projection."""
    runner = _scratch(app, db, projections, "__rebuild", page_size)
    try:
        runner.head_hint = head
        counts = dict.fromkeys(runner.names, 0)
        original = runner._apply

        def counting(notes, c):
            original(notes, c)
            for k, v in c.items():
                counts[k] += v
        runner._apply = counting  # type: ignore[method-assign]
        runner.catch_up(stop=head, progress=progress)
        _index(runner)
        counts[_READ] = runner.events_applied
        return counts
    finally:
        runner.close()


def _child(app: Application, config: Any, group: list[str], head: int, page_size: int, done: Any, applied: Any,
           errors: Any) -> None:  # pragma: no cover - runs in a forked process
    try:
        db = Database(config)

        def progress(pos: int, _total: int) -> None:
            done.value = pos
        counts = _load(app, db, select_projections(group), head, page_size, progress)
        for name in group:
            applied[name].value = counts[name]
        applied[_READ + group[0]].value = counts[_READ]
    except BaseException as exc:  # noqa: BLE001
        errors.put(f"{', '.join(group)}: {exc!r}")
        raise SystemExit(1) from None


def _groups(projections: Sequence[Projection]) -> list[list[str]]:
    """Projections replayed together share the reading and decoding of their common
    events. Jobs and Islands read mostly the same (Job) events; the ledger reads others."""
    names = [p.name for p in projections]
    groups = [[n for n in names if n in ("jobs", "islands")], [n for n in names if n not in ("jobs", "islands")]]
    return [g for g in groups if g]


def _load_parallel(app: Application, db: Database, projections: Sequence[Projection], head: int, page_size: int,
                   progress: Progress | None) -> dict[str, int]:
    """One forked process per projection, each reading only its own topics (PostgreSQL).
    The children use fresh connections only (never the parent's pool) and leave with
    os._exit (multiprocessing's fork start method), so nothing of the parent is touched."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    groups = _groups(projections)
    done = {g[0]: ctx.Value("q", 0) for g in groups}
    applied = {p.name: ctx.Value("q", 0) for p in projections}
    applied.update({_READ + g[0]: ctx.Value("q", 0) for g in groups})
    procs = [ctx.Process(target=_child, args=(app, db.config, g, head, page_size, done[g[0]], applied, errors),
                         name=f"rebuild-{'+'.join(g)}", daemon=True)
             for g in groups]
    for proc in procs:
        proc.start()
    try:
        while any(proc.is_alive() for proc in procs):
            if progress is not None:
                progress(min(v.value for v in done.values()), head)
            for proc in procs:
                proc.join(0.1)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    failed = [proc for proc in procs if proc.exitcode != 0]
    if failed:
        detail = errors.get(timeout=1) if not errors.empty() else f"{failed[0].name} exited {failed[0].exitcode}"
        raise RuntimeError(f"rebuild failed: {detail}")
    if progress is not None:
        progress(head, head)
    counts = {name: v.value for name, v in applied.items() if not name.startswith(_READ)}
    # The groups read disjoint topics (Job + Island events / Account events): their reads add up.
    counts[_READ] = sum(v.value for name, v in applied.items() if name.startswith(_READ))
    return counts


def rebuild(app: Application, db: Database, names: Iterable[str] | None = None, *,
            progress: Progress | None = None, page_size: int = REBUILD_PAGE,
            fault: Callable[[str], None] | None = None, parallel: bool | None = None) -> RebuildResult:
    """Drop and replay the named projections (all if none) from position 0.

    `parallel` (default: PostgreSQL with at least PARALLEL_MIN_EVENTS events) replays
    each projection in a process of its own."""
    projections = select_projections(names)
    started = time.perf_counter()
    head = max_position(app)
    if parallel is None:
        parallel = db.dialect == "postgres" and len(_groups(projections)) > 1 and head >= PARALLEL_MIN_EVENTS
    conn = db.connect()
    runner = ProjectionRunner(app, db, projections, suffix="__rebuild", track=False, page_size=page_size, conn=conn)
    try:
        if parallel:
            counts = _load_parallel(app, db, projections, head, page_size, progress)
        else:
            counts = _load(app, db, projections, head, page_size, progress)
        replayed = counts.pop(_READ)
        # The scratch tables now hold everything up to `head`; the swap catches up the rest.
        for name in runner.names:
            runner.positions[name] = head
        _ensure_tracking(conn)
        conn.begin()
        try:
            # Lock the tracking rows: a live runner waits here until the swap is done.
            rows = {r[0]: r for r in conn.lock_tracking(TRACKING.name, runner.names)}
            while runner.step(in_tx=True):  # the events that arrived meanwhile
                pass
            if fault is not None:
                fault("before_swap")
            position = runner.position
            now = int(time.time() * 1000)
            for p in projections:
                for t in p.tables:
                    conn.execute(f"DROP TABLE IF EXISTS {t.name}")
                    conn.execute(f"ALTER TABLE {t.name}__rebuild RENAME TO {t.name}")
                generation = rows[p.name][2] + 1 if p.name in rows else 0
                conn.execute(f"DELETE FROM {TRACKING.name} WHERE name = ?", (p.name,))
                conn.execute(f"INSERT INTO {TRACKING.name} (name, position, generation, version, events, "
                             f"updated_at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                             (p.name, position, generation, p.version, counts.get(p.name, 0), now))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        seconds = time.perf_counter() - started
        counted = {t.name: _count(conn, t.name) for p in projections for t in p.tables}
        replayed += runner.events_applied
        log().info("projections_rebuilt", projections=runner.names, position=position, events=replayed,
                 seconds=round(seconds, 3), parallel=parallel)
        return RebuildResult(runner.names, position, replayed, seconds, counted)
    except BaseException:
        try:
            _drop(conn, runner)
        except Exception:  # noqa: BLE001
            pass
        raise
    finally:
        runner.close()


def _count(conn: Conn, physical: str) -> int:
    row = conn.query_one(f"SELECT count(*) FROM {physical}")
    return int(row[0]) if row else 0


# ---------------------------------------------------------------- verify
@dataclass
class Difference:
    projection: str
    table: str
    key: tuple
    column: str | None  # None: the row exists on one side only
    live: Any
    rebuilt: Any

    def describe(self) -> str:
        key = ", ".join(f"{k}" for k in self.key)
        if self.column is None:
            where = "live only" if self.rebuilt is None else "rebuild only"
            return f"{self.table} row ({key}): {where}"
        return (f"{self.table} row ({key}) column {self.column}: live {self.live!r} != rebuilt "
                f"{self.rebuilt!r}")


@dataclass
class VerifyResult:
    projections: list[str]
    position: dict[str, int]
    rows: dict[str, int]
    difference: Difference | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.difference is None


def _live_positions(conn: Conn, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    if not conn.table_exists(TRACKING.name):
        return {}
    marks = ", ".join("?" * len(names))
    return {r[0]: (r[1], r[2]) for r in conn.query(
        f"SELECT name, position, generation FROM {TRACKING.name} WHERE name IN ({marks})", list(names))}


def _compare_table(conn: Conn, projection: str, table: Table, live: str, scratch: str) -> tuple[int, Difference | None]:
    cols = table.column_names
    order = ", ".join(table.key)
    kpos = table.key_positions()
    q = "SELECT {c} FROM {t} ORDER BY {o}"
    a_iter = iter(conn.iter_query(q.format(c=", ".join(cols), t=live, o=order)))
    b_iter = iter(conn.iter_query(q.format(c=", ".join(cols), t=scratch, o=order)))
    n = 0
    while True:
        a = next(a_iter, None)
        b = next(b_iter, None)
        if a is None and b is None:
            return n, None
        n += 1
        if a is not None and b is not None and a == b:
            continue
        if a is not None and b is not None and all(a[i] == b[i] for i in kpos):
            for c, x, y in zip(cols, a, b):
                if x != y:
                    return n, Difference(projection, table.name, tuple(a[i] for i in kpos), c, x, y)
        # Keys differ (or one side ended): which row is missing on the other side?
        if a is not None:
            key_a = tuple(a[i] for i in kpos)
            where = " AND ".join(f"{k} = ?" for k in table.key)
            if b is None or conn.query_one(f"SELECT 1 FROM {scratch} WHERE {where}", key_a) is None:
                return n, Difference(projection, table.name, key_a, None, a, None)
        assert b is not None
        return n, Difference(projection, table.name, tuple(b[i] for i in kpos), None, None, b)


def verify(app: Application, db: Database, names: Iterable[str] | None = None, *,
           progress: Progress | None = None, page_size: int = REBUILD_PAGE, attempts: int = 50) -> VerifyResult:
    """Replay into scratch tables and compare with the live ones at the same position."""
    projections = select_projections(names)
    started = time.perf_counter()
    positions: dict[str, int] = {}
    rows: dict[str, int] = {}
    difference: Difference | None = None
    for p in projections:
        runner = _scratch(app, db, [p], "__verify", page_size)
        conn = runner.conn
        try:
            pos, diff, counted = _verify_one(runner, p, progress, attempts)
            positions[p.name] = pos
            rows.update(counted)
            if diff is not None and difference is None:
                difference = diff
        finally:
            try:
                _drop(conn, runner)
            finally:
                runner.close()
        if difference is not None:
            break
    return VerifyResult([p.name for p in projections], positions, rows, difference, time.perf_counter() - started)


def _verify_one(runner: ProjectionRunner, p: Projection, progress: Progress | None,
                attempts: int) -> tuple[int, Difference | None, dict[str, int]]:
    conn = runner.conn
    indexed = False
    for attempt in range(attempts):
        live = _live_positions(conn, [p.name]).get(p.name)
        if live is None:
            raise LookupError(f"projection {p.name} has no live tables yet (never run): nothing to verify")
        target = live[0]
        if runner.position > target:
            raise RuntimeError(f"live projection {p.name} moved backwards (rebuilt meanwhile?); run verify again")
        runner.catch_up(stop=target, progress=progress)
        if not indexed:
            _index(runner)
            indexed = True
        else:
            runner.finish()
        use_lock = attempt >= 5 and conn.dialect.name == "postgres"
        if use_lock:
            # The log keeps moving: hold the live runner at its position while comparing.
            conn.begin()
            now = conn.query_one(f"SELECT position, generation FROM {TRACKING.name} WHERE name = ? FOR SHARE",
                                 (p.name,))
            if now is not None and now[0] > runner.position:
                while runner.step(stop=now[0], in_tx=True):
                    pass
        else:
            conn.begin_read()
            now = conn.query_one(f"SELECT position, generation FROM {TRACKING.name} WHERE name = ?", (p.name,))
        try:
            if now is None or (now[0] != runner.position or now[1] != live[1]) and not use_lock:
                continue
            counted: dict[str, int] = {}
            for t in p.tables:
                n, diff = _compare_table(conn, p.name, t, t.name, t.name + "__verify")
                counted[t.name] = n
                if diff is not None:
                    return runner.position, diff, counted
            return runner.position, None, counted
        finally:
            conn.rollback()
    raise RuntimeError(f"the live projection {p.name} kept moving; could not compare at one position "
                       f"after {attempts} attempts")


def verify_tables_equal(conn: Conn, projection: Projection, suffix_a: str, suffix_b: str) -> Difference | None:
    """Compare two sets of a projection's tables (tests)."""
    for t in projection.tables:
        _, diff = _compare_table(conn, projection.name, t, t.name + suffix_a, t.name + suffix_b)
        if diff is not None:
            return diff
    return None
