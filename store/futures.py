"""`CommandFuture`: the future of one command given to the group committer.

A `concurrent.futures.Future` builds a `threading.Condition` (pure Python, with an RLock)
in its constructor and enters it, through Python-level `__enter__`/`__exit__`, in every
method: `add_done_callback`, `set_running_or_notify_cancel`, `set_result`, `done`. The
committer makes four such futures per Job lifecycle, and nearly every one is settled
without anybody blocking on it: the server chains them into asyncio (`wrap_future`, i.e.
`add_done_callback`) or reads them after they are done.

This subclass keeps the Future's states, attributes and behaviour but guards state changes
with one module-level C lock (held for a few attribute writes, never while calling out),
and builds the Condition only when a thread actually has to wait for a pending future
(`result`, `exception`, `concurrent.futures.wait`/`as_completed`). Once a Condition exists,
a state change happens while holding it, so whoever checks the state under it and then
waits (as `wait()` does, installing its waiter) cannot miss the change.

Lock order: a future's Condition, then `_STATE_LOCK`; never the other way round.
Callbacks run outside both, as in the library Future.

Infrastructure only: nothing of ours.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError, TimeoutError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING, LOGGER
from typing import Any

_SETTLED = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED})
_STATE_LOCK = threading.Lock()  # guards _state, _result, _exception, _done_callbacks, _cond of every CommandFuture


class CommandFuture(Future):
    def __init__(self) -> None:  # noqa: D107 - no super().__init__: the Condition is built on demand
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Future], object]] = []

    # The library's methods and `concurrent.futures.wait` reach the Condition by this name.
    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _STATE_LOCK:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    def __repr__(self) -> str:
        state = self._state
        if state == FINISHED:
            if self._exception is not None:
                return f"<{type(self).__name__} at {id(self):#x} state=finished raised {type(self._exception).__name__}>"
            return f"<{type(self).__name__} at {id(self):#x} state=finished returned {type(self._result).__name__}>"
        return f"<{type(self).__name__} at {id(self):#x} state={state.lower()}>"

    # ------------------------------------------------------------ state changes
    def _transition(self, change: Callable[[], bool]) -> bool:
        """Apply `change` (it reads and writes the state, returns whether it changed it)
        under the state lock, and under the Condition too if one exists; wake waiters."""
        with _STATE_LOCK:
            cond = self._cond
            if cond is None:
                return change()
        with cond:
            with _STATE_LOCK:
                changed = change()
            if changed:
                cond.notify_all()
            return changed

    def _settle(self, result: Any, exception: BaseException | None) -> None:
        """FINISHED with this outcome, under the state lock (and the Condition if any)."""
        with _STATE_LOCK:
            cond = self._cond
            if cond is None:  # nobody waits: a later waiter builds the Condition, then sees FINISHED
                self._finish(result, exception)
                return
        with cond:
            with _STATE_LOCK:
                self._finish(result, exception)
            cond.notify_all()

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        """The state change itself (the caller holds the state lock)."""
        if self._state in _SETTLED:
            raise InvalidStateError(f"{self._state}: {self!r}")
        self._result = result
        self._exception = exception
        self._state = FINISHED

    def set_result(self, result: Any) -> None:
        self._settle(result, None)
        for waiter in self._waiters:
            waiter.add_result(self)
        if self._done_callbacks:
            self._invoke_callbacks()

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(None, exception)
        for waiter in self._waiters:
            waiter.add_exception(self)
        if self._done_callbacks:
            self._invoke_callbacks()

    def set_running_or_notify_cancel(self) -> bool:
        with _STATE_LOCK:
            state = self._state
            if state == PENDING:  # only a cancel() moves a PENDING future otherwise: nobody waits on it
                self._state = RUNNING
                return True
        if state != CANCELLED:
            LOGGER.critical("Future %s in unexpected state: %s", id(self), state)
            raise RuntimeError("Future in unexpected state")

        def change() -> bool:
            self._state = CANCELLED_AND_NOTIFIED
            return True

        self._transition(change)
        for waiter in self._waiters:
            waiter.add_cancelled(self)
        return False

    def cancel(self) -> bool:
        outcome: list[bool] = []

        def change() -> bool:
            if self._state in {RUNNING, FINISHED}:
                outcome.append(False)
                return False
            if self._state in {CANCELLED, CANCELLED_AND_NOTIFIED}:
                outcome.append(True)
                return False
            self._state = CANCELLED
            outcome.append(True)
            return True

        changed = self._transition(change)
        if changed:
            self._invoke_callbacks()
        return outcome[0]

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        with _STATE_LOCK:
            if self._state not in _SETTLED:
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:  # as the library Future: a failing callback is logged, not raised
            LOGGER.exception("exception calling callback for %r", self)

    # ------------------------------------------------------------ reading
    def cancelled(self) -> bool:
        return self._state in {CANCELLED, CANCELLED_AND_NOTIFIED}

    def running(self) -> bool:
        return self._state == RUNNING

    def done(self) -> bool:
        return self._state in _SETTLED

    def _outcome(self, timeout: float | None) -> tuple[Any, BaseException | None]:
        """(result, exception) once finished; CancelledError or TimeoutError otherwise."""
        if self._state != FINISHED:
            cond = self._condition
            with cond:
                if self._state not in _SETTLED:
                    cond.wait(timeout)
        state = self._state
        if state in {CANCELLED, CANCELLED_AND_NOTIFIED}:
            raise CancelledError()
        if state != FINISHED:
            raise TimeoutError()
        return self._result, self._exception

    def result(self, timeout: float | None = None) -> Any:
        result, exception = self._outcome(timeout)
        if exception is not None:
            try:
                raise exception
            finally:
                self = None  # noqa: PLW0642 - break the reference cycle, as the library does
        return result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._outcome(timeout)[1]
