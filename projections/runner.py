"""The projection runner: tails the "coordinator" application's notification log and keeps
the view tables current, exactly once.

One page = the next events after the lowest tracked position (filtered to the topics the
projections handle, at most `page_size`), applied to an in-memory working set, then ONE
transaction that

  1. locks the projections' tracking rows (PostgreSQL `SELECT ... FOR UPDATE`; SQLite
     `BEGIN IMMEDIATE`) and checks they still hold the position and generation this
     runner believes (otherwise someone else moved them: a rebuild swapped the tables, or
     a second runner got there first: roll back, forget the cache, reload, go on),
  2. writes the changed rows (PostgreSQL: DELETE of replaced keys + COPY; SQLite:
     executemany INSERT OR REPLACE),
  3. moves the tracking rows to the page's last position,
  4. commits.

A crash anywhere before 4 leaves views and tracking as they were, so the page is simply
applied again after a restart: nothing lost, nothing counted twice.

The head of the log is read *before* a page is selected; if the page comes back short,
every event up to that head has been seen (PostgreSQL inserts hold a table lock until
commit, so commit order is position order and no lower position can appear later), and
the tracking position moves to the head even when the last events were of topics no
projection reads. So `wait_for(position_of_my_write)` always terminates.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import timedelta
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from eventsourcing.application import Application

from projections import metrics
from projections.engine import Projection, TableState, Work
from projections.catalog import all_projections
from projections.sql import Conn, Database
from projections.tracking import TRACKING
from store.clock import EPOCH as _EPOCH
from store.factory import DDL_XACT_LOCK_SQL, max_position



def log() -> structlog.BoundLogger:
    """A fresh logger per use: structlog caches a logger on first use together with the
    stream it was configured with, which outlives that stream in tests and tools."""
    return structlog.get_logger("projections")

_ONE_MS = timedelta(milliseconds=1)
DEFER_LIMIT = 300_000
PIPELINE_MAX_ROWS = 100  # pages writing fewer rows use pipelined upserts, bigger ones COPY  # rows of one table held back by a rebuild before they are written


class StaleTracking(Exception):
    """The tracking rows moved under this runner (rebuild swap or a second runner)."""


class InjectedFault(Exception):
    """Raised by test fault hooks."""


def _decoder(app: Application) -> Callable[[bytes], dict]:
    mapper = app.mapper
    if getattr(mapper, "cipher", None) is None and getattr(mapper, "compressor", None) is None:
        return mapper.transcoder.decode
    def decode(state: bytes) -> dict:  # pragma: no cover - not configured today
        if mapper.cipher:
            state = mapper.cipher.decrypt(state)
        if mapper.compressor:
            state = mapper.compressor.decompress(state)
        return mapper.transcoder.decode(state)
    return decode


class ProjectionRunner:
    """Keeps a set of projections' tables current. `suffix` names scratch tables
    (`__rebuild`, `__verify`); `track=False` writes no tracking rows (scratch runs)."""

    def __init__(self, app: Application, db: Database, projections: Sequence[Projection] | None = None, *,
                 suffix: str = "", track: bool = True, page_size: int = 1_000, cache_rows: int = 100_000,
                 poll_interval_s: float = 0.05, conn: Conn | None = None, defer_upserts: bool = False,
                 max_page_size: int | None = None,
                 rebuild: Callable[[Application, Database, list[str]], Any] | None = None) -> None:
        assert page_size > 0
        self.rebuild_fn = rebuild  # rebuilds projections whose version changed (projections/rebuild.py)
        self.app = app
        self.db = db
        self.projections = list(projections) if projections is not None else all_projections()
        self.names = [p.name for p in self.projections]
        # Tracking rows are named after the projection (plus the suffix of scratch tables).
        self.tnames = {n: n + suffix for n in self.names}
        self.suffix = suffix
        self.track = track
        self.page_size = page_size
        self.max_page_size = max_page_size or (10 * page_size if track else page_size)
        self.poll_interval_s = poll_interval_s
        self.conn = conn or db.connect()
        self._own_conn = conn is None
        # Rebuilds keep changed rows in memory across pages and write each row once (at the
        # end, or when more than DEFER_LIMIT rows wait); append-only tables go out per page.
        self.defer_upserts = defer_upserts
        states = {}
        for p in self.projections:
            for t in p.tables:
                assert t.name not in states, f"table {t.name} owned twice"
                ts = TableState(t, t.name + suffix, cache_rows)
                ts.conn = self.conn
                states[t.name] = ts
        self.work = Work(states)
        self.positions: dict[str, int] = {n: 0 for n in self.names}
        self.generations: dict[str, int] = {n: 0 for n in self.names}
        self.events_applied = 0
        dispatch: dict[str, list[tuple[str, Callable]]] = {}
        for p in self.projections:
            for topic, handler in p.handlers().items():
                dispatch.setdefault(topic, []).append((p.name, handler))
        self._dispatch = dispatch
        self._topics = tuple(sorted(dispatch))
        self._decode = _decoder(app)
        self._events_table: str | None = None
        recorder = app.recorder
        if self.conn.dialect.name == "postgres" and hasattr(recorder, "events_table_name"):
            self._events_table = f'"{recorder.datastore.schema}"."{recorder.events_table_name}"'
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._marks: deque[tuple[int, float]] = deque(maxlen=100_000)
        self.lag_samples: deque[float] = deque(maxlen=1_000_000)
        self._page_ms: list[int] = []
        self.timeline: deque[tuple[int, float]] = deque(maxlen=100_000)  # (position, wall time) per commit
        self.fault: Callable[[str], None] | None = None  # test hook: called at "after_flush"
        self.needs_rebuild: list[str] = []
        self.head_hint: int | None = None
        self.resets = 0  # times the tracking rows moved under this runner
        self.last_error: BaseException | None = None

    # ------------------------------------------------------------------ set-up
    def create_tables(self, *, drop: bool = False, indexes: bool = True, keys: bool = True) -> None:
        """Create this runner's tables (and, tracked, the tracking table). `keys=False`
        (PostgreSQL bulk loads) leaves primary keys to `create_indexes`."""
        conn = self.conn
        d = conn.dialect
        conn.begin()
        try:
            if d.name == "postgres":
                conn.execute(DDL_XACT_LOCK_SQL)  # concurrent CREATEs of one table collide
            if self.track:
                conn.execute(d.ddl(TRACKING, TRACKING.name))
            for ts in self.work.tables.values():
                if drop:
                    conn.execute(f"DROP TABLE IF EXISTS {ts.physical}")
                exists = conn.table_exists(ts.physical)
                if not exists:
                    conn.execute(d.ddl(ts.table, ts.physical, key=keys))
                    if indexes:
                        for stmt in d.index_ddl(ts.table, ts.physical):
                            conn.execute(stmt)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise

    def create_indexes(self, *, keys: bool = False) -> None:
        conn = self.conn
        for ts in self.work.tables.values():
            if keys:
                conn.execute(conn.dialect.key_ddl(ts.table, ts.physical))
            for stmt in conn.dialect.index_ddl(ts.table, ts.physical):
                conn.execute(stmt)

    def setup(self) -> list[str]:
        """Create missing tables and tracking rows, load positions. Returns the names of
        projections whose stored version differs from the code (they need a rebuild)."""
        conn = self.conn
        if not self.track:
            self.create_tables()
            for ts in self.work.tables.values():
                ts.complete = True
            return []
        conn.begin()
        try:
            if conn.dialect.name == "postgres":
                conn.execute(DDL_XACT_LOCK_SQL)
            conn.execute(conn.dialect.ddl(TRACKING, TRACKING.name))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        stale: list[str] = []
        conn.begin()
        try:
            rows = {r[0]: r for r in conn.lock_tracking(TRACKING.name, list(self.tnames.values()))}
            for p in self.projections:
                tname = self.tnames[p.name]
                row = rows.get(tname)
                missing = [t for t in p.tables if not conn.table_exists(t.name + self.suffix)]
                if row is None or len(missing) == len(p.tables):
                    # First start (or the tables are gone): fresh tables at position 0.
                    for t in p.tables:
                        conn.execute(f"DROP TABLE IF EXISTS {t.name + self.suffix}")
                        conn.execute(conn.dialect.ddl(t, t.name + self.suffix))
                        for stmt in conn.dialect.index_ddl(t, t.name + self.suffix):
                            conn.execute(stmt)
                    generation = (row[2] + 1) if row is not None else 0
                    conn.execute(f"DELETE FROM {TRACKING.name} WHERE name = ?", (tname,))
                    conn.execute(f"INSERT INTO {TRACKING.name} (name, position, generation, version, events, "
                                 f"updated_at_ms) VALUES (?, 0, ?, ?, 0, ?)",
                                 (tname, generation, p.version, int(time.time() * 1000)))
                elif missing:
                    # Some tables of a projection vanished: only a rebuild can restore them consistently.
                    for t in missing:
                        conn.execute(conn.dialect.ddl(t, t.name + self.suffix))
                    stale.append(p.name)
                else:
                    version = conn.query_one(f"SELECT version FROM {TRACKING.name} WHERE name = ?", (tname,))
                    if version is None or version[0] != p.version:
                        stale.append(p.name)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        self.reload()
        self.needs_rebuild = stale
        return stale

    def reload(self) -> None:
        """Read positions from the tracking table and forget every cached row."""
        for ts in self.work.tables.values():
            ts.forget()
        if not self.track:
            return
        rows = {r[0]: r for r in self.conn.query(
            f"SELECT name, position, generation FROM {TRACKING.name}")}
        for name in self.names:
            row = rows.get(self.tnames[name])
            self.positions[name] = row[1] if row else 0
            self.generations[name] = row[2] if row else 0
        # A projection at position 0 has empty tables: a miss needs no SELECT.
        for p in self.projections:
            if self.positions[p.name] == 0:
                for t in p.tables:
                    self.work[t.name].complete = True
        self._publish()

    def close(self) -> None:
        self.stop()
        if self._own_conn:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ state
    @property
    def position(self) -> int:
        """The lowest committed position over this runner's projections."""
        return min(self.positions.values()) if self.positions else 0

    def _publish(self) -> None:
        with self._cond:
            self._cond.notify_all()
        for name, pos in self.positions.items():
            metrics.POSITION.labels(name).set(pos)

    # ------------------------------------------------------------------ pages
    def step(self, *, stop: int | None = None, in_tx: bool = False) -> int:
        """Apply and commit one page. Returns how many log positions it advanced (0 =
        nothing new up to `stop` or the head). `in_tx`: write inside the caller's open
        transaction (rebuild swap) instead of a transaction of its own."""
        start = self.position
        if stop is not None and self.head_hint is not None and stop <= self.head_hint:
            head = stop  # a bulk load told us the head: no need to ask the store per page
        else:
            head = max_position(self.app)
        if self.track:
            metrics.BEHIND.set(max(0, head - start))
        if stop is not None:
            head = min(head, stop)
        if head <= start:
            return 0
        # A page is a window of positions, not a count of events: the query stays bounded
        # (and cheap) whatever plan the database picks for the topic filter.
        # Behind by more than a page: take a bigger window (up to max_page_size), so the
        # fixed cost of a page (round trips, commit) is shared by more events.
        limit = self.page_size if head - start <= self.page_size else min(head - start, self.max_page_size)
        head = min(head, start + limit)
        notes = self._read(start, head, limit)
        new_pos = head
        counts = dict.fromkeys(self.names, 0)
        try:
            self._apply(notes, counts)
            if in_tx:
                flushed = self._flush(final=True)
            else:
                self._commit(new_pos, counts)
        except StaleTracking:
            metrics.RESETS.inc()
            self.resets += 1
            log().info("projection_tracking_moved", runner=self.names)
            self.reload()
            return 0
        except BaseException:
            if not in_tx:
                metrics.ERRORS.inc()
                self.reload()
            raise
        for name in self.names:
            if self.positions[name] < new_pos:
                self.positions[name] = new_pos
            if counts[name] and self.track:
                metrics.EVENTS.labels(name).inc(counts[name])
        self.events_applied += len(notes)
        if self.track and notes and not self._marks:
            self._observe_timestamp_lag()
        if in_tx:
            for ts in flushed:
                ts.committed()
        self._publish()
        self._observe_lag(new_pos)
        return new_pos - start

    def _read(self, after: int, stop: int, limit: int) -> Sequence[tuple]:
        """Events after `after` up to `stop`: (position, originator id, version, topic, state)."""
        if self._events_table is not None:
            return self.conn.read_events(self._events_table, after, stop, self._topics, limit)  # type: ignore[attr-defined]
        notes = self.app.recorder.select_notifications(start=after + 1, limit=limit, stop=stop, topics=self._topics)
        return [(n.id, str(n.originator_id), n.originator_version, n.topic, n.state) for n in notes]

    def _apply(self, notes: Sequence[tuple], counts: dict[str, int]) -> None:
        decode = self._decode
        dispatch = self._dispatch
        work = self.work
        positions = self.positions
        low = min(positions.values())
        uniform = all(p == low for p in positions.values())
        EPOCH = _EPOCH
        times = self._page_ms
        times.clear()
        for pos, oid, ver, topic, state in notes:
            handlers = dispatch.get(topic)
            if not handlers:
                continue
            st = decode(state)
            ms = (st["timestamp"] - EPOCH) // _ONE_MS
            times.append(ms)
            for name, handler in handlers:
                if uniform or pos > positions[name]:
                    handler(work, pos, oid, ver, st, ms)
                    counts[name] += 1

    def _flush(self, final: bool = False) -> list[TableState]:
        """Write pending rows in the caller's transaction; returns the tables written."""
        dialect = self.conn.dialect.name
        flushed: list[TableState] = []
        deletes: list = []
        inserts: list = []
        defer = self.defer_upserts and not final
        for ts in self.work.tables.values():
            if not ts.pending():
                continue
            if defer and not ts.table.append_only and len(ts.dirty) + len(ts.deleted) < DEFER_LIMIT:
                continue
            d, i = ts.plan(dialect)
            deletes += d
            inserts += i
            flushed.append(ts)
        self.conn.write(deletes, inserts)
        if self.fault is not None:
            self.fault("after_flush")
        return flushed

    def finish(self) -> None:
        """Write every row still held back (defer_upserts) in one transaction."""
        conn = self.conn
        conn.begin()
        try:
            flushed = self._flush(final=True)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        for ts in flushed:
            ts.committed()

    def _commit(self, new_pos: int, counts: dict[str, int]) -> None:
        conn = self.conn
        try:
            if self.track:
                # First statement of the transaction: move the tracking rows, on condition
                # that they still hold what this runner believes (position, generation).
                updates = [(self.tnames[n], self.positions[n], self.generations[n], new_pos, counts[n])
                           for n in self.names]
                if conn.begin_tracked(TRACKING.name, updates, int(time.time() * 1000)) != len(updates):
                    raise StaleTracking(",".join(self.names))
            else:
                conn.begin()
            flushed = self._flush()
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:  # noqa: BLE001 - the connection may be gone; the txn is too
                pass
            raise
        metrics.PAGES.inc()
        if self.track:
            self.timeline.append((new_pos, time.time()))
        for ts in flushed:
            ts.committed()

    def catch_up(self, *, stop: int | None = None, progress: Callable[[int, int], None] | None = None) -> int:
        """Apply pages until the head (or `stop`) is reached. Returns the position."""
        target = max_position(self.app) if stop is None else stop
        while True:
            resets = self.resets
            advanced = self.step(stop=stop)
            if progress is not None:
                progress(self.position, max(target, self.position))
            if advanced == 0 and self.resets == resets:
                return self.position

    # ------------------------------------------------------------------ lag
    def notify(self, recordings: Sequence[Any] = ()) -> None:
        """Commit listener (GroupCommitter.add_listener): wake the runner now."""
        if recordings:
            self._marks.append((recordings[-1].notification.id, time.perf_counter()))
        self._wake.set()

    def _observe_lag(self, new_pos: int) -> None:
        marks = self._marks
        if not marks:
            return
        now = time.perf_counter()
        while marks and marks[0][0] <= new_pos:
            _, t = marks.popleft()
            lag = now - t
            metrics.LAG.observe(lag)
            self.lag_samples.append(lag)

    def _observe_timestamp_lag(self) -> None:
        """Lag of every event of the committed page: now - the event's timestamp (the
        writer's clock when its batch ran, i.e. just before its commit: an upper bound).
        Used when the events were written by another process; skipped for timestamps that
        are not wall-clock time (the simulator's and tests' manual clocks)."""
        now_ms = time.time() * 1000
        for ms in self._page_ms:
            lag = now_ms - ms
            if 0 <= lag <= 3_600_000:
                metrics.LAG.observe(lag / 1000)
                self.lag_samples.append(lag / 1000)

    # ------------------------------------------------------------------ waiting
    def wait_for(self, position: int, timeout_s: float) -> bool:
        """Block until every projection has committed `position` (or the timeout)."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._cond:
            while self.position < position:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    # ------------------------------------------------------------------ thread
    def start(self, *, listen: bool = True) -> None:
        """Tail the log in a background thread. On PostgreSQL with `listen`, a second
        thread LISTENs on the channel the event store NOTIFYs at every insert, so events
        written by other processes wake the runner at once (otherwise: polling)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="projections", daemon=True)
        self._thread.start()
        channel = getattr(self.app.recorder, "channel_name", None)
        if listen and channel and self.conn.dialect.name == "postgres":
            self._listener = threading.Thread(target=self._listen, args=(channel,), name="projections-listen",
                                              daemon=True)
            self._listener.start()

    def _listen(self, channel: str) -> None:
        try:
            conn = self.db.connect()
        except Exception:  # noqa: BLE001 - polling still works
            log().exception("projection_listen_failed")
            return
        try:
            conn.raw.execute(f'LISTEN "{channel}"')  # type: ignore[attr-defined]
            while not self._stop.is_set():
                for _ in conn.raw.notifies(timeout=0.5, stop_after=1):  # type: ignore[attr-defined]
                    self._wake.set()
        except Exception:  # noqa: BLE001
            if not self._stop.is_set():
                log().exception("projection_listen_failed")
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._listener is not None:
            self._listener.join(timeout)
            self._listener = None

    def _run(self) -> None:
        backoff = 0.05
        if self.needs_rebuild:
            self._rebuild_stale()
        while not self._stop.is_set():
            try:
                resets = self.resets
                advanced = self.step() or (self.resets != resets)
                backoff = 0.05
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - keep tailing; the page is retried
                self.last_error = exc
                log().exception("projection_page_failed")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if advanced:
                continue
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()

    def _rebuild_stale(self) -> None:
        rebuild = self.rebuild_fn
        if rebuild is None:  # a runner built without one (tests, tools): leave it to `projections rebuild`
            log().error("projection_version_changed_rebuild_needed", projections=list(self.needs_rebuild))
            return
        names = list(self.needs_rebuild)
        log().warning("projection_version_changed_rebuilding", projections=names)
        try:
            rebuild(self.app, self.db, names)
            self.needs_rebuild = []
        except Exception:  # noqa: BLE001
            log().exception("projection_rebuild_failed", projections=names)
        self.reload()
