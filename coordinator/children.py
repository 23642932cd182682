"""Child processes die with their parent, however the parent dies.

A child of `coordinator serve` (today: the projector, `coordinator projections run`) is
started with `COORDINATOR_PARENT_PID` set to the server's pid and calls `die_with_parent`
first thing:

1. Linux: `prctl(PR_SET_PDEATHSIG, SIGTERM)` (through ctypes): the kernel sends SIGTERM the
   moment the parent thread that forked us exits, including after `kill -9`;
2. everywhere: a daemon thread compares `os.getppid()` with the expected parent once per
   `poll_s` and calls `on_orphaned` when it changes (re-parented to init or a subreaper);
3. the race between fork and (1) is closed by checking the parent once right after (1).

The SIGTERM is handled by the child's own handler (a graceful stop: the projector finishes
its page, commits, releases its lock). Decision: docs/decisions/0060-one-projector-lock.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable

import structlog

PARENT_PID_ENV = "COORDINATOR_PARENT_PID"
PR_SET_PDEATHSIG = 1

log = structlog.get_logger("coordinator.children")


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the Linux kernel to send `sig` when our parent dies. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def expected_parent(env: dict[str, str] | None = None) -> int | None:
    raw = (os.environ if env is None else env).get(PARENT_PID_ENV, "")
    return int(raw) if raw.isdigit() else None


def die_with_parent(on_orphaned: Callable[[], None], *, parent_pid: int | None = None, poll_s: float = 1.0) -> bool:
    """Arrange for `on_orphaned` to run (and SIGTERM to arrive, on Linux) when the parent
    dies. Returns False when no parent is expected (`COORDINATOR_PARENT_PID` unset)."""
    parent = expected_parent() if parent_pid is None else parent_pid
    if parent is None:
        return False
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        log.warning("parent_gone", expected_parent=parent, parent=os.getppid())
        on_orphaned()
        return True

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                log.warning("parent_gone", expected_parent=parent, parent=os.getppid())
                on_orphaned()
                return

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return True
