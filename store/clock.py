"""Clocks and id sources as dependencies: nothing in the domain reads the wall clock or a
global random source directly (the simulator substitutes a virtual clock and seeded ids)."""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (tests, simulator)."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        return self._now_ms

    def advance(self, delta_ms: int) -> None:
        assert delta_ms >= 0, "time never goes backwards"
        self._now_ms += delta_ms

    def set(self, now_ms: int) -> None:
        assert now_ms >= self._now_ms, "time never goes backwards"
        self._now_ms = now_ms


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)


# The last conversion: every event of a command (and of a batch) is stamped with the same
# `now_ms`, so most calls repeat the previous one. One entry, swapped as a whole tuple, so
# a reader in another thread always sees a matching pair; datetimes are immutable, so
# handing out the same object is the same as building an equal one.
_last_ms_dt: tuple[int, datetime] = (0, EPOCH)


def ms_to_datetime(ms: int) -> datetime:
    global _last_ms_dt  # noqa: PLW0603
    last = _last_ms_dt
    if last[0] == ms and type(ms) is int:  # an int (not a float or bool) equal to the cached one
        return last[1]
    dt = EPOCH + timedelta(milliseconds=ms)
    if type(ms) is int:
        _last_ms_dt = (ms, dt)
    return dt


def datetime_to_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise ValueError("datetime must carry a timezone")
    return (dt - EPOCH) // _ONE_MS


class IdSource(Protocol):
    def new_uuid(self) -> uuid.UUID: ...


class RandomIds:
    """Random version-4 UUIDs for aggregate ids (production). A PRNG seeded from the OS:
    uuid4() costs a system call per id, which showed in profiles. Ids are not secrets
    (every read checks ownership); tokens and API keys come from `secrets` instead."""

    def __init__(self) -> None:
        self._rng = random.Random(int.from_bytes(os.urandom(32), "big"))
        self._lock = threading.Lock()

    def new_uuid(self) -> uuid.UUID:
        with self._lock:
            return uuid.UUID(int=self._rng.getrandbits(128), version=4)


class SeededIds:
    """Deterministic UUIDs from a seed (simulator, tests)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def new_uuid(self) -> uuid.UUID:
        with self._lock:
            return uuid.UUID(int=self._rng.getrandbits(128), version=4)
