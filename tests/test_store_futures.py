"""`store.futures.CommandFuture` behaves as `concurrent.futures.Future` does: the same
outcome for every sequence of calls (hypothesis, side by side), blocking readers in other
threads woken, `concurrent.futures.wait` / `as_completed` and `asyncio.wrap_future` on it,
and no lost wake-up when a waiter and the setter race (many rounds, real threads)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.futures import CommandFuture

# op -> what it does to a future (`i`: the op's index, `calls`: where callbacks record), and
# what is recorded of it
_CALLS: dict[str, Any] = {
    "running": lambda f, i, calls: f.set_running_or_notify_cancel(),
    "cancel": lambda f, i, calls: f.cancel(),
    "set_result": lambda f, i, calls: f.set_result(i),
    "set_exception": lambda f, i, calls: f.set_exception(ValueError(i)),
    "add_callback": lambda f, i, calls: f.add_done_callback(lambda _f: calls.append(i)),
    "done": lambda f, i, calls: f.done(),
    "cancelled": lambda f, i, calls: f.cancelled(),
    "is_running": lambda f, i, calls: f.running(),
    "read_result": lambda f, i, calls: f.result(timeout=0),
    "read_exception": lambda f, i, calls: repr(f.exception(timeout=0)),
}
_OPS = st.lists(st.sampled_from(sorted(_CALLS)), max_size=12)


def _play(fut: cf.Future, ops: list[str]) -> list[Any]:
    calls: list[Any] = []
    out: list[Any] = []
    for i, op in enumerate(ops):
        try:
            out.append((op, _CALLS[op](fut, i, calls)))
        except BaseException as exc:  # noqa: BLE001 - the outcome is what is compared
            out.append(("raised", type(exc).__name__, str(exc.args[0]) if isinstance(exc, ValueError) else ""))
        out.append(("callbacks", list(calls)))
    return out


@settings(max_examples=400, deadline=None)
@given(_OPS)
def test_every_call_sequence_has_the_library_futures_outcome(ops: list[str]) -> None:
    assert _play(CommandFuture(), ops) == _play(cf.Future(), ops)


@pytest.mark.parametrize("outcome", ["result", "exception", "cancel"])
def test_a_blocked_reader_in_another_thread_is_woken(outcome: str) -> None:
    fut = CommandFuture()
    got: list[Any] = []

    def reader() -> None:
        try:
            got.append(("result", fut.result(timeout=10)))
        except BaseException as exc:  # noqa: BLE001
            got.append(("raised", type(exc).__name__))

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.05)  # the reader is waiting (it built the Condition)
    assert fut._cond is not None
    if outcome == "result":
        assert fut.set_running_or_notify_cancel()
        fut.set_result(7)
        expected = ("result", 7)
    elif outcome == "exception":
        assert fut.set_running_or_notify_cancel()
        fut.set_exception(KeyError("k"))
        expected = ("raised", "KeyError")
    else:
        assert fut.cancel()
        expected = ("raised", "CancelledError")
    t.join(10)
    assert got == [expected]


def test_result_times_out_while_pending() -> None:
    fut = CommandFuture()
    t0 = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        fut.result(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04


def test_no_lost_wake_up_when_waiter_and_setter_race() -> None:
    for i in range(300):
        futs = [CommandFuture() for _ in range(3)]
        for f in futs:
            f.set_running_or_notify_cancel()
        start = threading.Barrier(2)

        def setter(futs: list[CommandFuture] = futs, i: int = i) -> None:
            start.wait()
            for k, f in enumerate(futs):
                f.set_result((i, k))

        t = threading.Thread(target=setter)
        t.start()
        start.wait()
        if i % 3 == 0:
            done, pending = cf.wait(futs, timeout=10)
            assert not pending and len(done) == 3
        elif i % 3 == 1:
            assert sorted(f.result() for f in cf.as_completed(futs, timeout=10)) == [(i, 0), (i, 1), (i, 2)]
        else:
            assert [f.result(timeout=10) for f in futs] == [(i, 0), (i, 1), (i, 2)]
        t.join(10)


def test_first_exception_wait_and_callbacks_order() -> None:
    a, b = CommandFuture(), CommandFuture()
    order: list[str] = []
    a.add_done_callback(lambda f: order.append("a1"))
    a.add_done_callback(lambda f: order.append("a2"))
    threading.Timer(0.02, lambda: (a.set_running_or_notify_cancel(), a.set_exception(RuntimeError("x")))).start()
    done, pending = cf.wait([a, b], timeout=10, return_when=cf.FIRST_EXCEPTION)
    assert done == {a} and pending == {b}
    assert order == ["a1", "a2"]
    b.add_done_callback(lambda f: order.append("b"))
    b.set_running_or_notify_cancel()
    b.set_result(None)
    a.add_done_callback(lambda f: order.append("late"))  # on a settled future: at once
    assert order == ["a1", "a2", "b", "late"]


def test_a_failing_callback_is_logged_and_the_others_run(caplog: pytest.LogCaptureFixture) -> None:
    fut = CommandFuture()
    ran: list[int] = []
    fut.add_done_callback(lambda f: 1 / 0)
    fut.add_done_callback(lambda f: ran.append(1))
    fut.set_result(3)
    assert ran == [1] and "exception calling callback" in caplog.text
    fut.add_done_callback(lambda f: 1 / 0)  # settled: run at once, logged the same way
    assert caplog.text.count("exception calling callback") == 2


def test_asyncio_wrap_future_sees_result_exception_and_cancellation() -> None:
    async def main() -> list[Any]:
        out: list[Any] = []
        f1 = CommandFuture()
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, lambda: threading.Thread(target=lambda: (f1.set_running_or_notify_cancel(),
                                                                       f1.set_result("r"))).start())
        out.append(await asyncio.wrap_future(f1))
        f2 = CommandFuture()
        threading.Timer(0.01, lambda: (f2.set_running_or_notify_cancel(), f2.set_exception(ValueError("v")))).start()
        try:
            await asyncio.wrap_future(f2)
        except ValueError as exc:
            out.append(str(exc))
        f3 = CommandFuture()
        w = asyncio.wrap_future(f3)
        w.cancel()
        await asyncio.sleep(0.01)
        out.append(f3.cancelled())
        return out

    assert asyncio.run(main()) == ["r", "v", True]
