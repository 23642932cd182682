"""Group commit: concurrent commands executed in batches, saved in one transaction each.

One writer thread per process owns an aggregate cache and the write connection. Callers
submit commands (functions of a `UnitOfWork`) from any thread or event loop and get a
future for their own outcome. The writer takes whatever has queued up while the previous
transaction was in flight (bounded by `max_batch`, optionally waiting `window_ms` for
more), runs each command against the cached aggregates, then saves every new event of
the batch with one `insert_events` call, i.e. one transaction and one table lock.

Failure isolation:
- A command that raises before triggering any event (the rule for domain refusals)
  fails alone; the batch goes on.
- A command that raises after mutating an aggregate poisons only that aggregate: the
  batch is re-run from committed state without that command.
- A version conflict at save (another process wrote one of the batch's aggregates)
  evicts the batch's aggregates from the cache and re-runs the batch on fresh state;
  each command then gets the outcome it would have had, and no command fails because
  another one conflicted. After `max_conflict_retries` the batch's commands fail with
  `CommitConflict` (never silently).

Inline mode (`inline=True`: simulator, single-threaded tools) runs each command at once
in the caller's thread, as a batch of one, and returns an already settled future.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures._base import FINISHED  # the state a finished Future holds (SettledFuture)
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import structlog
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import BaseAggregate
from eventsourcing.persistence import IntegrityError, Notification, Recording

from store.clock import Clock
from store.futures import CommandFuture
from store.mapper import notification_draft

log = structlog.get_logger("store.commit")

T = TypeVar("T")
Command = Callable[["UnitOfWork"], Any]
CommitListener = Callable[[list[Recording]], None]


class CommitConflict(Exception):
    """Optimistic concurrency kept failing for this batch after every retry."""


class CommitterClosed(Exception):
    """The committer is shut down and takes no more commands."""


class Overloaded(Exception):
    """The command queue is full (explicit bound on in-flight commands)."""


class NotFound(Exception):
    def __init__(self, aggregate_id: UUID) -> None:
        super().__init__(f"no aggregate {aggregate_id}")
        self.aggregate_id = aggregate_id


@dataclass
class BatchStats:
    batches: int = 0
    commands: int = 0
    events: int = 0
    conflicts: int = 0
    poisoned: int = 0
    refreshed: int = 0  # refusals that succeeded on fresh state (another process had written)
    last_batch_size: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # ring of recent sizes

    def record(self, size: int, events: int) -> None:
        self.batches += 1
        self.commands += size
        self.events += events
        self.last_batch_size = size
        self.batch_sizes.append(size)
        if len(self.batch_sizes) > 1024:
            del self.batch_sizes[:512]


class UnitOfWork:
    """What a command sees: aggregates by id (cached, or loaded), new aggregates, the clock."""

    __slots__ = ("_committer", "_staged", "clock", "now_ms", "_touched_versions", "read_only")

    def __init__(self, committer: GroupCommitter, now_ms: int, read_only: bool = False) -> None:
        self._committer = committer
        self._staged: dict[UUID, BaseAggregate] = {}
        self._touched_versions: dict[UUID, int] = {}
        self.clock = committer.clock
        self.now_ms = now_ms
        self.read_only = read_only

    def get(self, aggregate_id: UUID, fresh: bool = False) -> Any:
        agg = self._staged.get(aggregate_id)
        if agg is None:
            agg = self._committer._load(aggregate_id, fresh=fresh)
            self._staged[aggregate_id] = agg
        self._touched_versions.setdefault(aggregate_id, agg._version)  # the `version` property's value
        return agg

    def get_or_none(self, aggregate_id: UUID, fresh: bool = False) -> Any:
        try:
            return self.get(aggregate_id, fresh=fresh)
        except NotFound:
            return None

    def add(self, aggregate: BaseAggregate) -> None:
        assert not self.read_only, "read-only unit of work"
        assert aggregate.id not in self._staged, f"aggregate {aggregate.id} already in this unit of work"
        self._staged[aggregate.id] = aggregate
        self._touched_versions[aggregate.id] = 0

    # -- used by the committer --
    def _begin_command(self) -> None:
        self._touched_versions = {}

    def _command_dirtied(self) -> list[UUID]:
        """Aggregates the current command changed (pending events beyond the version it saw)."""
        return [
            agg_id
            for agg_id, seen in self._touched_versions.items()
            if self._staged[agg_id].version != seen or seen == 0
        ]


class GroupCommitter:
    """Batches commands into shared transactions. See module docstring."""

    def __init__(
        self,
        app: Application,
        clock: Clock,
        *,
        max_batch: int = 500,
        window_ms: float = 0.0,
        max_queue: int = 50_000,
        cache_size: int = 200_000,
        max_conflict_retries: int = 30,
        name: str = "committer",
        inline: bool = False,
        refresh_on_refusal: bool = False,
    ) -> None:
        assert 1 <= max_batch <= 10_000
        assert max_queue >= max_batch
        self.app = app
        self.clock = clock
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self.max_conflict_retries = max_conflict_retries
        # SimpleQueue: put and get in C, no Condition per call. Its bound is checked in
        # `submit` (the length read and the put are not one step, so concurrent submitters
        # may overshoot it by at most their number).
        self._queue: queue.SimpleQueue[tuple[Command, Future, bool] | None] = queue.SimpleQueue()
        self.max_queue = max_queue
        self._cache: OrderedDict[UUID, BaseAggregate] = OrderedDict()
        self._cache_size = cache_size
        self._listeners: list[CommitListener] = []
        self._closed = False
        self.stats = BatchStats()
        self._jitter = random.Random()  # conflict back-off only; never feeds domain decisions
        self.inline = inline
        # Several processes share the store: re-check a refusal on fresh aggregates once.
        self.refresh_on_refusal = refresh_on_refusal
        # An event as the row to insert, built as the Notification its listeners will get.
        self._draft: Callable[[Any], Notification] = getattr(app.mapper, "to_notification_draft", None) \
            or (lambda event: notification_draft(app.mapper.to_stored_event(event)))
        self._inline_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._thread_name = name
        if not inline:
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- API
    def add_listener(self, listener: CommitListener) -> None:
        """Called in the writer thread after each commit with its recordings (keep it quick)."""
        self._listeners.append(listener)

    def submit(self, command: Command, read_only: bool = False) -> Future:
        if self._closed:
            raise CommitterClosed("the committer is closed")
        if self.inline:
            # Inline mode (simulator, single-threaded tools): run now in the caller's thread
            # and hand back a future that is already settled.
            with self._inline_lock:
                ok, value = self._run_inline(command, read_only)
            return SettledFuture(ok, value)
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"more than {self.max_queue} commands waiting")
        fut: Future = CommandFuture()
        self._queue.put((command, fut, read_only))
        return fut

    def execute(self, command: Callable[[UnitOfWork], T], timeout: float | None = 30.0) -> T:
        if self.inline:
            return self._execute_inline(command, False)
        return self.submit(command).result(timeout)

    def query(self, fn: Callable[[UnitOfWork], T], timeout: float | None = 30.0) -> T:
        """Run a read-only function in the writer thread (consistent with committed state)."""
        if self.inline:
            return self._execute_inline(fn, True)
        return self.submit(fn, read_only=True).result(timeout)

    def _execute_inline(self, command: Callable[[UnitOfWork], T], read_only: bool) -> T:
        """`submit(command).result()` in inline mode, without the settled future in between:
        the same checks, the same run, the result returned or the exception raised."""
        if self._closed:
            raise CommitterClosed("the committer is closed")
        with self._inline_lock:
            ok, value = self._run_inline(command, read_only)
        if ok:
            return value
        raise value

    async def aexecute(self, command: Callable[[UnitOfWork], T]) -> T:
        return await asyncio.wrap_future(self.submit(command))

    async def aquery(self, fn: Callable[[UnitOfWork], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn, read_only=True))

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)

    def evict(self, aggregate_id: UUID) -> None:
        """Forget a cached aggregate (called from the writer thread only)."""
        self._cache.pop(aggregate_id, None)

    # ---------------------------------------------------------- internals
    def _load(self, aggregate_id: UUID, fresh: bool) -> BaseAggregate:
        agg = self._cache.get(aggregate_id)
        if agg is not None:
            self._cache.move_to_end(aggregate_id)
            if fresh:
                newer = list(self.app.events.get(aggregate_id, gt=agg.version))
                for event in newer:
                    event.mutate(agg)  # type: ignore[attr-defined]
            return agg
        try:
            agg = self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            raise NotFound(aggregate_id) from None
        self._cache[aggregate_id] = agg
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return agg

    def _take(self, block: bool) -> tuple[list[tuple[Command, Future, bool]], bool]:
        """Commands waiting now (at most max_batch; optionally `window_s` more wait).
        Returns (batch, stop)."""
        batch: list[tuple[Command, Future, bool]] = []
        try:
            first = self._queue.get() if block else self._queue.get_nowait()
        except queue.Empty:
            return batch, False
        if first is None:
            return batch, True
        batch.append(first)
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        """The writer loop, pipelined one deep: while batch N's insert is in flight on the
        I/O thread, batch N+1's commands run on the state N left in the cache. N+1 is
        only ever committed after N; if N fails, N+1 (built on it) is re-run with it."""
        io = ThreadPoolExecutor(1, thread_name_prefix=f"{self._thread_name}-io")
        inflight: _Prepared | None = None
        try:
            while True:
                items, stop = self._take(block=inflight is None)
                items = [it for it in items if it[1].set_running_or_notify_cancel()]
                attempt = 0
                nxt: _Prepared | None = None
                while True:
                    try:
                        nxt = self._prepare(items, attempt) if items else None
                    except _Poisoned as poison:
                        # A command changed state and then failed: forget everything in
                        # memory that the open batches touched, settle the one in flight,
                        # and run this batch again without that command.
                        self.stats.poisoned += 1
                        log.warning("command_failed_after_mutation", error=repr(poison.exc))
                        poison.item[1].set_exception(poison.exc)
                        items = [it for it in items if it is not poison.item]
                        self._evict(poison.staged)
                        if inflight is not None:
                            self._evict(inflight.staged)
                            failed = self._complete(inflight, recache=False)
                            inflight = None
                            if failed is not None:
                                items, attempt = failed.items + items, failed.attempt + 1
                        continue
                    if inflight is not None:
                        failed = self._complete(inflight, recache=True)
                        inflight = None
                        if failed is not None:  # nxt was built on state that never committed
                            if nxt is not None:
                                self._evict(nxt.staged)
                            items = failed.items + (nxt.items if nxt is not None else [])
                            attempt = failed.attempt + 1
                            if attempt >= self.max_conflict_retries:
                                self._give_up(items, attempt)
                                items, nxt = [], None
                                break
                            self._back_off(attempt)
                            continue
                    break
                if nxt is not None:
                    if nxt.stored:
                        nxt.io = io.submit(self.app.recorder.insert_events, nxt.stored)
                    inflight = nxt
                if stop:
                    if inflight is not None:
                        failed = self._complete(inflight, recache=True)
                        if failed is not None:
                            self._give_up(failed.items, failed.attempt)
                    self._drain_closed()
                    return
        except BaseException as exc:  # never let the writer die silently
            log.exception("commit_writer_crashed")
            for prepared in (inflight,):
                if prepared is not None:
                    for _, fut, _ in prepared.items:
                        if not fut.done():
                            fut.set_exception(exc)
            self._cache.clear()
            raise
        finally:
            io.shutdown(wait=True)

    def _back_off(self, attempt: int) -> None:
        """Before re-running a batch that hit a version conflict: a jittered exponential
        pause (at most 50 ms), so racing writers do not collide again in lockstep."""
        time.sleep(self._jitter.uniform(0, min(0.05, 0.001 * (2 ** attempt))))

    def _give_up(self, items: list[tuple[Command, Future, bool]], attempts: int) -> None:
        err = _conflict_error(attempts)
        for _, fut, _ in items:
            if not fut.done():
                fut.set_exception(err)

    def _evict(self, ids: Any) -> None:
        for agg_id in ids:
            self._cache.pop(agg_id, None)

    def _drain_closed(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(CommitterClosed("the committer closed before this command ran"))

    def _prepare(self, items: list[tuple[Command, Future, bool]], attempt: int) -> _Prepared:
        """Run the batch's commands on the cached aggregates; encode their events."""
        uow = UnitOfWork(self, self.clock.now_ms())
        outcomes: list[tuple[Future, bool, Any]] = []
        for item in items:
            ok, value = self._run_command(uow, item)
            outcomes.append((item[1], ok, value))
        events = _collect_events(uow)
        try:
            draft = self._draft
            stored = [draft(e) for e in events]
        except BaseException as exc:
            # An event that cannot be encoded: fail this batch's writers, keep the process.
            self._evict(uow._staged)
            for fut, _, _ in outcomes:
                fut.set_exception(exc)
            return _Prepared([], [], [], [], {}, attempt)
        return _Prepared(items, outcomes, events, stored, uow._staged, attempt)

    def _run_command(self, uow: UnitOfWork, item: tuple[Command, Any, bool]) -> tuple[bool, Any]:
        """Run one command of a batch: (True, result) or (False, the refusal it raised
        without changing anything). Raises `_Poisoned` if it raised after changing state."""
        command, _, read_only = item
        uow._begin_command()
        uow.read_only = read_only
        try:
            result = command(uow)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            if uow._command_dirtied():
                raise _Poisoned(item, exc, list(uow._staged)) from None
            if self.refresh_on_refusal and self._refresh(uow):
                # Another process may have moved what this command read (the cache is
                # per process): a refusal is only final on current state. Try once more.
                uow._begin_command()
                try:
                    result = command(uow)
                except BaseException as exc2:  # noqa: BLE001
                    if uow._command_dirtied():
                        raise _Poisoned(item, exc2, list(uow._staged)) from None
                    return False, exc2
                self.stats.refreshed += 1
                return True, result
            return False, exc
        if read_only:
            assert not uow._command_dirtied(), "a query changed state"
        return True, result

    def _refresh(self, uow: UnitOfWork) -> bool:
        """Bring the aggregates the failed command read up to date with the store (those
        without uncommitted events of this batch). True if any of them had moved."""
        moved = False
        for agg_id in list(uow._touched_versions):
            agg = uow._staged.get(agg_id)
            if agg is None or agg._pending_events:  # type: ignore[attr-defined]
                continue
            newer = list(self.app.events.get(agg_id, gt=agg.version))
            for event in newer:
                event.mutate(agg)  # type: ignore[attr-defined]
            moved = moved or bool(newer)
        return moved

    def _complete(self, prepared: _Prepared, *, recache: bool) -> _Prepared | None:
        """Wait for a batch's insert and hand out its outcomes. Returns the batch if it
        hit a version conflict (its aggregates are evicted; the caller re-runs it)."""
        recordings: list[Recording] = []
        if prepared.io is not None:
            try:
                ids = prepared.io.result()
            except IntegrityError:
                self.stats.conflicts += 1
                self._evict(prepared.staged)
                log.info("commit_conflict_retry", attempt=prepared.attempt + 1, batch=len(prepared.items))
                return prepared
            except BaseException as exc:  # noqa: BLE001 - database down etc.: the callers hear of it
                self._evict(prepared.staged)
                for _, fut, _ in prepared.items:
                    if not fut.done():
                        fut.set_exception(exc)
                return None
            recordings = _recordings(prepared.events, prepared.stored, ids)
        if recache:
            self._recache(prepared.staged)
        self.stats.record(len(prepared.items), len(recordings))
        self._notify(recordings)
        for fut, ok, value in prepared.outcomes:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        return None

    def _recache(self, staged: dict[UUID, BaseAggregate]) -> None:
        """Put a committed batch's aggregates (back) in the cache: new ones, and loaded
        ones the cache dropped while the batch ran."""
        cache = self._cache
        for agg_id, agg in staged.items():
            if agg_id not in cache:
                cache[agg_id] = agg
        while len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _notify(self, recordings: list[Recording]) -> None:
        for listener in self._listeners:
            try:
                listener(recordings)
            except Exception:  # noqa: BLE001
                log.exception("commit_listener_failed")

    def _run_inline(self, command: Command, read_only: bool) -> tuple[bool, Any]:
        """Inline mode: prepare, insert and complete one command in the caller's thread,
        with the outcomes, stats, cache updates and listener calls that `_prepare` and
        `_complete` give a batch of one, without a future per step. Returns (True, result)
        or (False, exception) for the caller's future."""
        attempt = 0
        while True:
            uow = UnitOfWork(self, self.clock.now_ms())
            try:
                ok, value = self._run_command(uow, (command, None, read_only))
            except _Poisoned as poison:
                self.stats.poisoned += 1
                self._evict(poison.staged)
                return False, poison.exc
            events = _collect_events(uow)
            recordings: list[Recording] = []
            if events:
                try:
                    draft = self._draft
                    stored = [draft(e) for e in events]
                except BaseException as exc:  # noqa: BLE001
                    # As `_prepare`: the batch is dropped (an empty one is still reported).
                    self._evict(uow._staged)
                    self.stats.record(0, 0)
                    self._notify([])
                    return False, exc
                try:
                    ids = self.app.recorder.insert_events(stored)
                except IntegrityError:
                    self.stats.conflicts += 1
                    self._evict(uow._staged)
                    log.info("commit_conflict_retry", attempt=attempt + 1, batch=1)
                    attempt += 1
                    if attempt >= self.max_conflict_retries:
                        return False, _conflict_error(attempt)
                    self._back_off(attempt)
                    continue
                except BaseException as exc:  # noqa: BLE001 - database down etc.
                    self._evict(uow._staged)
                    return False, exc
                recordings = _recordings(events, stored, ids)
            self._recache(uow._staged)
            self.stats.record(1, len(recordings))
            self._notify(recordings)
            return ok, value


@dataclass
class _Prepared:
    items: list[tuple[Command, Future, bool]]
    outcomes: list[tuple[Future, bool, Any]]
    events: list[Any]
    stored: list[Any]
    staged: dict[UUID, BaseAggregate]
    attempt: int
    io: Future | None = None


class _Poisoned(Exception):
    def __init__(self, item: tuple[Command, Future, bool], exc: BaseException, staged: list[UUID]) -> None:
        super().__init__(repr(exc))
        self.item = item
        self.exc = exc
        self.staged = staged


def _conflict_error(attempts: int) -> CommitConflict:
    return CommitConflict(f"version conflict persisted after {attempts} attempts")


def _collect_events(uow: UnitOfWork) -> list[Any]:
    """Every new event of the unit of work, aggregate by aggregate (staging order).

    What `collect_events()` of each aggregate returns (its pending events in order), and
    like it leaves each pending list empty; the list is taken whole instead of popped
    from the front one event at a time."""
    out: list[Any] = []
    for a in uow._staged.values():
        pending = a._pending_events  # type: ignore[attr-defined]
        if pending:
            out += pending
            pending.clear()
    return out


_new_object = object.__new__
_set_attr = object.__setattr__


def _recordings(events: list[Any], stored: list[Notification], ids: Any) -> list[Recording]:
    """What listeners get: each event with its notification, the inserted draft with the
    id the insert assigned (`FastMapper.to_notification_draft`; set once, before anyone
    else sees it).

    Recording is a frozen dataclass whose __init__ sets each field with
    object.__setattr__; filling __dict__ at once builds the same object (equal, same repr
    and hash) for half the cost, as the library's own mapper does for events."""
    assert ids is not None and len(ids) == len(events) == len(stored)
    out: list[Recording] = []
    for e, s, n in zip(events, stored, ids, strict=True):
        assert s.__dict__["id"] is None, "a draft is inserted once"
        s.__dict__["id"] = n
        recording = _new_object(Recording)
        _set_attr(recording, "__dict__", {"domain_event": e, "notification": s})
        out.append(recording)
    return out


class _NoWait:
    """The condition of a `SettledFuture`: its state never changes after construction, so
    there is nothing to wait for or lock (`result()` and friends return at once)."""

    __slots__ = ()

    def __enter__(self) -> _NoWait:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def acquire(self, *args: Any) -> bool:
        return True

    def release(self) -> None:
        return None

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def notify_all(self) -> None:
        return None


_NO_WAIT = _NoWait()


class SettledFuture(Future):
    """A `concurrent.futures.Future` created already finished (inline mode): skips the
    threading.Condition and the locked set_result of a plain Future. Every Future method
    works on it (result, exception, done, add_done_callback, asyncio.wrap_future); setting
    it again raises InvalidStateError, as for any finished future."""

    def __init__(self, ok: bool, value: Any) -> None:  # noqa: D107 - no super().__init__: no Condition
        self._condition = _NO_WAIT
        self._state = FINISHED
        self._result = value if ok else None
        self._exception = None if ok else value
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
