"""`MemoryBroker`: the embedded default's stream broker (one process): lists under a lock,
the same interface and event ids as the Redis broker (streams/broker.py)."""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections.abc import Callable
from streams.broker import READ_PAGE, Entry, StreamBroker, Subscription, wait_set
from streams.frames import format_id, is_terminal, parse_id


# ------------------------------------------------------------------ memory
class _MemStream:
    __slots__ = ("ids", "entries", "expires_at", "waiters", "terminal")

    def __init__(self) -> None:
        self.ids: list[tuple[int, int]] = []
        self.entries: list[Entry] = []
        self.expires_at = 0.0
        self.waiters: set[_MemSubscription] = set()
        self.terminal = False


class _MemSubscription:
    def __init__(self, broker: MemoryBroker, job_id: str, after: tuple[int, int] | None) -> None:
        self.broker = broker
        self.job_id = job_id
        self.last = after or (0, 0)
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.event = asyncio.Event()
        self.closed = False
        broker._add_waiter(job_id, self)

    def interrupt(self) -> None:
        """Make a pending `next` return (server shutdown)."""
        self.wake()

    def wake(self) -> None:
        if threading.get_ident() == self.thread:
            self.event.set()
        else:
            try:
                self.loop.call_soon_threadsafe(self.event.set)
            except RuntimeError:  # loop closed
                pass

    async def next(self, timeout_s: float) -> list[Entry] | None:
        self.event.clear()
        entries = self.broker._after(self.job_id, self.last)
        if not entries:
            if not await wait_set(self.event, timeout_s):
                return None
            entries = self.broker._after(self.job_id, self.last)
            if not entries:
                return []
        self.last = parse_id(entries[-1][0]) or self.last
        return entries

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.broker._remove_waiter(self.job_id, self)


class MemoryBroker(StreamBroker):
    kind = "memory"

    def __init__(self, *, retention_s: float, live_ttl_s: float, max_events: int, max_streams: int = 100_000,
                 now: Callable[[], float] = time.time) -> None:
        self.retention_s = retention_s
        self.live_ttl_s = live_ttl_s
        self.max_events = max_events
        self.max_streams = max_streams
        self.now = now
        self._streams: dict[str, _MemStream] = {}
        self._lock = threading.Lock()
        self._last_id = (0, 0)
        self._appends = 0
        self._next_sweep = 0.0

    def _new_id(self, now_s: float) -> tuple[int, int]:
        ms = int(now_s * 1000)
        last_ms, last_seq = self._last_id
        self._last_id = (last_ms, last_seq + 1) if ms <= last_ms else (ms, 0)
        return self._last_id

    def publish(self, job_id: str, data: bytes) -> None:
        now = self.now()
        with self._lock:
            stream = self._streams.get(job_id)
            if stream is None:
                stream = self._streams[job_id] = _MemStream()
            eid = self._new_id(now)
            stream.ids.append(eid)
            stream.entries.append((format_id(eid), data))
            if len(stream.entries) > self.max_events:
                cut = len(stream.entries) - self.max_events
                del stream.ids[:cut]
                del stream.entries[:cut]
            terminal = is_terminal(data)
            stream.terminal = stream.terminal or terminal
            stream.expires_at = now + (self.retention_s if stream.terminal else self.live_ttl_s)
            waiters = list(stream.waiters)
            self._appends += 1
            if now >= self._next_sweep or len(self._streams) > self.max_streams:
                self._sweep(now)
        for w in waiters:
            w.wake()

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + 10.0
        for job_id in [j for j, s in self._streams.items() if s.expires_at <= now and not s.waiters]:
            del self._streams[job_id]
        if len(self._streams) > self.max_streams:
            victims = sorted((s.expires_at, j) for j, s in self._streams.items() if not s.waiters)
            for _, job_id in victims[: len(self._streams) - self.max_streams]:
                del self._streams[job_id]

    def _after(self, job_id: str, after: tuple[int, int]) -> list[Entry]:
        with self._lock:
            stream = self._streams.get(job_id)
            if stream is None or (stream.expires_at <= self.now() and not stream.waiters):
                return []
            i = bisect.bisect_right(stream.ids, after)
            return stream.entries[i:i + READ_PAGE]

    def _add_waiter(self, job_id: str, sub: _MemSubscription) -> None:
        with self._lock:
            stream = self._streams.get(job_id)
            if stream is None:
                stream = self._streams[job_id] = _MemStream()
                stream.expires_at = self.now() + self.live_ttl_s
            stream.waiters.add(sub)

    def _remove_waiter(self, job_id: str, sub: _MemSubscription) -> None:
        with self._lock:
            stream = self._streams.get(job_id)
            if stream is not None:
                stream.waiters.discard(sub)
                if not stream.entries and not stream.waiters:
                    del self._streams[job_id]

    async def ping(self) -> bool:
        return True

    async def read(self, job_id: str, after_id: str | None, limit: int = READ_PAGE) -> list[Entry]:
        return self._after(job_id, parse_id(after_id) or (0, 0))[:limit]

    async def exists(self, job_id: str) -> bool:
        with self._lock:
            stream = self._streams.get(job_id)
            return stream is not None and bool(stream.entries) and stream.expires_at > self.now()

    def subscribe(self, job_id: str, after_id: str | None) -> Subscription:
        return _MemSubscription(self, job_id, parse_id(after_id))

    async def flush(self, timeout_s: float = 5.0) -> bool:
        return True

    def stream_count(self) -> int:
        with self._lock:
            return len(self._streams)
