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


_VERSION4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_VERSION4_SET = (0x8000 << 48) | (4 << 76)
_set = object.__setattr__


class Id(uuid.UUID):
    """A `uuid.UUID` that remembers its hash and its text. Equal to (and hashing like) the
    plain UUID of the same value, encoded the same by msgspec, so it mixes freely with
    UUIDs decoded from the log. Profiles of the simulator showed `UUID.__hash__` (a
    Python-level `hash(self.int)`) called ~90 times and `UUID.__str__` ~15 times per Job:
    aggregate ids are dict and set keys all over the write path."""

    __slots__ = ("_hash", "_text")

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        text = self._text
        if text is None:
            text = uuid.UUID.__str__(self)
            _set(self, "_text", text)
        return text

    def __reduce__(self) -> tuple:
        return (id_from_int, (self.int,))


_SAFE_UNKNOWN = uuid.SafeUUID.unknown  # read once: an enum member lookup goes through a descriptor


def id_from_int(value: int) -> Id:
    """An `Id` with exactly this 128-bit value (no version bits changed)."""
    assert 0 <= value < 1 << 128, "128-bit value"
    obj = object.__new__(Id)
    _set(obj, "int", value)
    _set(obj, "is_safe", _SAFE_UNKNOWN)
    _set(obj, "_hash", hash(value))
    _set(obj, "_text", None)
    return obj


def id_from_text(text: str) -> Id:
    """`uuid.UUID(text)` as an `Id` (same value, same errors for bad text): for ids that
    arrive as text (a URL, a Job's account or Island field) and then key dicts on the
    write path, where a plain UUID pays a Python-level `__hash__` per lookup. The usual
    text, canonical (8-4-4-4-12 ASCII hex digits), is read in one step; anything else
    goes to `uuid.UUID`, which also takes braces, a `urn:uuid:` prefix or no hyphens."""
    if (len(text) == 36 and text[8] == "-" and text[13] == "-" and text[18] == "-" and text[23] == "-"):
        digits = text.replace("-", "")
        if len(digits) == 32 and digits.isascii() and digits.isalnum():  # no sign, space or "_" for int()
            return id_from_int(int(digits, 16))  # ValueError for a non-hex letter, as UUID() raises
    return id_from_int(uuid.UUID(text).int)


def version4_id(bits: int) -> Id:
    """What `uuid.UUID(int=bits, version=4)` is, as an `Id`."""
    return id_from_int((bits & _VERSION4_CLEAR) | _VERSION4_SET)


class RandomIds:
    """Random version-4 UUIDs for aggregate ids (production). A PRNG seeded from the OS:
    uuid4() costs a system call per id, which showed in profiles. Ids are not secrets
    (every read checks ownership); tokens and API keys come from `secrets` instead."""

    def __init__(self) -> None:
        self._rng = random.Random(int.from_bytes(os.urandom(32), "big"))
        self._lock = threading.Lock()

    def new_uuid(self) -> uuid.UUID:
        with self._lock:
            return version4_id(self._rng.getrandbits(128))


class SeededIds:
    """Deterministic UUIDs from a seed (simulator, tests)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def new_uuid(self) -> uuid.UUID:
        with self._lock:
            return version4_id(self._rng.getrandbits(128))
