"""The inline fast path of the group committer (`GroupCommitter(inline=True)`) must behave
exactly as the batch-of-one path it replaced. The old inline `submit` / `_process` are
kept here verbatim (`_OldInline`) and both run the same generated command sequences;
outcomes, stats, cache contents, listener recordings and the stored log must agree."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Notification, Recording
from hypothesis import given, settings
from hypothesis import strategies as st

from store.clock import ManualClock
from store.factory import MEMORY_URL, StoreConfig, open_app
from store.unit_of_work import CommitterClosed, GroupCommitter, NotFound, SettledFuture, UnitOfWork

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class Counter(Aggregate):
    def __init__(self, n: int) -> None:
        self.n = n

    class Bumped(Aggregate.Event):
        by: int
        payload: Any

        def apply(self, aggregate: Any) -> None:
            aggregate.n += self.by


# ------------------------------------------------------------ the old inline path, verbatim
class _OldInline(GroupCommitter):
    def submit(self, command: Any, read_only: bool = False) -> Future:
        if self._closed:
            raise CommitterClosed("the committer is closed")
        fut: Future = Future()
        with self._inline_lock:
            self._process([(command, fut, read_only)])
        return fut

    def _process(self, batch: list[tuple[Any, Future, bool]]) -> None:
        """Inline mode: prepare and commit one batch in the caller's thread."""
        from store.unit_of_work import _Poisoned

        items = [it for it in batch if it[1].set_running_or_notify_cancel()]
        attempt = 0
        while items:
            try:
                prepared = self._prepare(items, attempt)
            except _Poisoned as poison:
                self.stats.poisoned += 1
                poison.item[1].set_exception(poison.exc)
                items = [it for it in items if it is not poison.item]
                self._evict(poison.staged)
                continue
            if prepared.stored:
                prepared.io = Future()
                try:
                    prepared.io.set_result(self.app.recorder.insert_events(prepared.stored))
                except BaseException as exc:  # noqa: BLE001
                    prepared.io.set_exception(exc)
            failed = self._complete(prepared, recache=True)
            if failed is None:
                return
            attempt += 1
            if attempt >= self.max_conflict_retries:
                self._give_up(items, attempt)
                return
            time.sleep(self._jitter.uniform(0, min(0.05, 0.001 * (2 ** attempt))))


# ------------------------------------------------------------------ commands
IDS = [uuid.UUID(int=i + 1) for i in range(4)]


def _ts(uow: UnitOfWork) -> datetime:
    return T0 + timedelta(milliseconds=uow.now_ms)


def _counter(uow: UnitOfWork, k: int) -> Counter:
    agg = uow.get_or_none(IDS[k])
    if agg is None:
        agg = Counter._create(Counter.Created, id=IDS[k], n=0, timestamp=_ts(uow))
        uow.add(agg)
    return agg


def _bump(uow: UnitOfWork, k: int, by: int, payload: Any = None) -> int:
    agg = _counter(uow, k)
    agg.trigger_event(Counter.Bumped, by=by, payload=payload, timestamp=_ts(uow))
    return agg.n


def make_command(op: tuple) -> tuple[Any, bool]:
    kind = op[0]
    if kind == "bump":
        return (lambda uow: _bump(uow, op[1], op[2])), False
    if kind == "multi":
        return (lambda uow: (_bump(uow, op[1], 1), _bump(uow, op[2], 2))), False
    if kind == "refuse":
        def refuse(uow: UnitOfWork) -> None:
            _ = uow.get_or_none(IDS[op[1]])
            raise ValueError(f"refused {op[1]}")
        return refuse, False
    if kind == "missing":
        return (lambda uow: uow.get(uuid.UUID(int=999))), False
    if kind == "poison":
        def poison(uow: UnitOfWork) -> None:
            _bump(uow, op[1], 5)
            raise RuntimeError(f"failed after mutation {op[1]}")
        return poison, False
    if kind == "query":
        return (lambda uow: getattr(uow.get_or_none(IDS[op[1]]), "n", None)), True
    if kind == "unencodable":
        return (lambda uow: _bump(uow, op[1], 1, payload=object())), False
    raise AssertionError(kind)


ops = st.one_of(
    st.tuples(st.just("bump"), st.integers(0, 3), st.integers(-3, 3)),
    st.tuples(st.just("multi"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("refuse"), st.integers(0, 3)),
    st.tuples(st.just("missing")),
    st.tuples(st.just("poison"), st.integers(0, 3)),
    st.tuples(st.just("query"), st.integers(0, 3)),
    st.tuples(st.just("unencodable"), st.integers(0, 3)),
    st.tuples(st.just("foreign"), st.integers(0, 3)),  # another writer: the next write conflicts
    st.tuples(st.just("advance"), st.integers(0, 50)),
)


class World:
    def __init__(self, committer_class: type[GroupCommitter]) -> None:
        self.app = open_app(StoreConfig(database_url=MEMORY_URL, data_dir=Path(".")))
        self.clock = ManualClock(0)
        self.committer = committer_class(self.app, self.clock, inline=True, cache_size=3, max_conflict_retries=3)
        # Another process's committer on the same store: its writes make our cache stale.
        self.other = GroupCommitter(self.app, self.clock, inline=True)
        self.seen: list[list[tuple]] = []
        self.committer.add_listener(lambda recs: self.seen.append([_recording_key(r) for r in recs]))

    def run(self, op: tuple) -> tuple:
        if op[0] == "advance":
            self.clock.advance(op[1])
            return ("advanced",)
        if op[0] == "foreign":
            return ("foreign", self.other.execute(lambda uow: _bump(uow, op[1], 100)))
        command, read_only = make_command(op)
        fut = self.committer.submit(command, read_only=read_only)
        assert isinstance(fut, Future) and fut.done()
        exc = fut.exception()
        if exc is not None:
            with pytest.raises(type(exc)):
                fut.result()
            return ("error", type(exc), str(exc))
        return ("ok", fut.result())

    def state(self) -> tuple:
        log = self.app.recorder.select_notifications(start=1, limit=10_000)
        return (dataclasses.asdict(self.committer.stats), list(self.committer._cache), self.seen, log,
                {k: (a.version, a.n, len(a._pending_events)) for k, a in self.committer._cache.items()})


def _recording_key(r: Recording) -> tuple:
    assert type(r) is Recording and type(r.notification) is Notification
    e = r.domain_event
    n = r.notification
    assert r == Recording(e, Notification(originator_id=n.originator_id, originator_version=n.originator_version,
                                          topic=n.topic, state=n.state, id=n.id))
    return type(e).__name__, {k: v for k, v in e.__dict__.items()}, n, repr(r.notification), hash(n)


@settings(max_examples=150, deadline=None)
@given(sequence=st.lists(ops, max_size=25))
def test_inline_fast_path_matches_the_old_inline_path(sequence: list[tuple]) -> None:
    old, new = World(_OldInline), World(GroupCommitter)
    for op in sequence:
        assert new.run(op) == old.run(op), op
        assert new.state() == old.state(), op


def test_a_query_that_mutates_raises_from_submit_in_both_paths() -> None:
    for cls in (_OldInline, GroupCommitter):
        w = World(cls)
        w.run(("bump", 0, 1))
        with pytest.raises(AssertionError, match="a query changed state"):
            w.committer.submit(lambda uow: _bump(uow, 0, 1), read_only=True)


def test_conflicts_are_retried_on_fresh_state_inline() -> None:
    w = World(GroupCommitter)
    assert w.run(("bump", 0, 1)) == ("ok", 1)
    w.run(("foreign", 0))
    assert w.run(("bump", 0, 1)) == ("ok", 102)
    assert w.committer.stats.conflicts == 1


def test_not_found_is_delivered_through_the_future() -> None:
    w = World(GroupCommitter)
    fut = w.committer.submit(lambda uow: uow.get(uuid.UUID(int=12345)))
    assert isinstance(fut.exception(), NotFound)
    with pytest.raises(NotFound):
        w.committer.execute(lambda uow: uow.get(uuid.UUID(int=12345)))


# ------------------------------------------------------------------ the settled future
def test_settled_future_behaves_as_a_finished_future() -> None:
    ok, failed = SettledFuture(True, 42), SettledFuture(False, ValueError("no"))
    plain_ok, plain_failed = Future(), Future()
    plain_ok.set_result(42)
    plain_failed.set_exception(ValueError("no"))
    for f, ref in ((ok, plain_ok), (failed, plain_failed)):
        assert f.done() and not f.running() and not f.cancelled()
        assert f.cancel() is False
        with pytest.raises(InvalidStateError):
            f.set_result(1)
        with pytest.raises(InvalidStateError):
            f.set_exception(ValueError())
        with pytest.raises(RuntimeError):
            f.set_running_or_notify_cancel()
        called: list[Future] = []
        f.add_done_callback(called.append)
        assert called == [f]
        assert repr(f).split(" at ")[1].split(" ", 1)[1] == repr(ref).split(" at ")[1].split(" ", 1)[1]
    assert ok.result() == 42 and ok.result(timeout=0) == 42 and ok.exception() is None
    with pytest.raises(ValueError, match="no"):
        failed.result()
    assert isinstance(failed.exception(timeout=0), ValueError)
    done, not_done = concurrent.futures.wait([ok, failed, SettledFuture(True, 1)], timeout=1)
    assert len(done) == 3 and not not_done
    assert set(concurrent.futures.as_completed([ok, failed], timeout=1)) == {ok, failed}
    # A mix with a pending future (waiters are installed on every future).
    pending: Future = Future()
    done, not_done = concurrent.futures.wait([ok, pending], timeout=0.01)
    assert done == {ok} and not_done == {pending}


def test_settled_future_can_be_awaited() -> None:
    async def main() -> tuple[Any, Any]:
        value = await asyncio.wrap_future(SettledFuture(True, "v"))
        try:
            await asyncio.wrap_future(SettledFuture(False, KeyError("k")))
        except KeyError as exc:
            return value, exc
        return value, None

    value, exc = asyncio.run(main())
    assert value == "v" and isinstance(exc, KeyError)


def test_inline_aexecute_and_aquery() -> None:
    w = World(GroupCommitter)

    async def main() -> tuple[Any, Any]:
        n = await w.committer.aexecute(lambda uow: _bump(uow, 1, 7))
        q = await w.committer.aquery(lambda uow: uow.get(IDS[1]).n)
        return n, q

    assert asyncio.run(main()) == (7, 7)


@pytest.mark.parametrize("error", ["integrity", "other"])
def test_insert_failures_match_the_old_inline_path(error: str) -> None:
    """Every insert conflicts (give up after the retries), or the database is down."""
    from eventsourcing.persistence import IntegrityError

    results = []
    for cls in (_OldInline, GroupCommitter):
        w = World(cls)
        w.run(("bump", 0, 1))

        def failing_insert(stored_events: Any, **kwargs: Any) -> Any:
            raise IntegrityError("conflict") if error == "integrity" else ConnectionError("down")

        w.app.recorder.insert_events = failing_insert
        results.append((w.run(("bump", 0, 1)), w.run(("query", 0)), w.run(("refuse", 0)), w.state()))
    assert results[0] == results[1]
    if error == "integrity":
        assert results[1][0][1].__name__ == "CommitConflict"
