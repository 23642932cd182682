"""`RedisStreamBroker`: one Redis Stream per Job (`{prefix}stream:{job_id}`, field `d` =
the event's JSON). An append is one Lua call (XADD trimmed, expiry, and a PUBLISH on the
Job's channel carrying the entry, its id and the previous id), pipelined by one asyncio
task per process. Readers take the backlog with XRANGE and live entries from one
pub/sub connection per process (SUBSCRIBE per Job being served: O(1) per event however
many streams a process serves); a gap (missed notification, reconnect) is detected from
the previous-id and filled from the stream, so the Stream stays the source of truth."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from typing import Any
from streams.broker import MAX_PENDING_PUBLISHES, PIPELINE_BATCH, READ_PAGE, Entry, StreamBroker, Subscription, log, wait_set
from streams.frames import format_id, is_terminal, parse_id


# ------------------------------------------------------------------ redis
REDIS_MAX_CONNECTIONS = 64  # per pool; a command waits (up to REDIS_POOL_WAIT_S) for a free connection


REDIS_POOL_WAIT_S = 10


def redis_client(url: str):
    """An asyncio Redis client whose pool makes callers wait instead of failing when every
    connection is busy (hundreds of SSE streams start at once)."""
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=REDIS_MAX_CONNECTIONS,
                                                    timeout=REDIS_POOL_WAIT_S, socket_connect_timeout=5,
                                                    socket_timeout=10, health_check_interval=30)
    return aioredis.Redis(connection_pool=pool)


# Append one event: XADD (trimmed), expiry, and a notification on the Job's channel that
# carries the new entry, its id and the id before it (so a reader can tell it missed one).
_APPEND_LUA = """
local prev = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev_id = '0-0'
if prev[1] then prev_id = prev[1][1] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', KEYS[2], prev_id .. ' ' .. id .. ' ' .. ARGV[1])
return id
"""


async def _wait(event: asyncio.Event, timeout_s: float) -> bool:
    """Clear `event` and wait for it at most `timeout_s`; False on timeout. Cheaper than
    `asyncio.wait_for` (no task per call), which matters at thousands of events per second."""
    event.clear()
    return await wait_set(event, timeout_s)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _RedisSubscription:
    """Backlog by XRANGE, then live entries from the process's pub/sub hub; any gap (a
    notification whose previous id is not the last one seen, or a hub reconnect) is filled
    by XRANGE, so a reader never skips or repeats an entry."""

    def __init__(self, broker: RedisStreamBroker, job_id: str, after: tuple[int, int] | None) -> None:
        self.broker = broker
        self.job_id = job_id
        self.key = broker.key(job_id)
        self.channel = broker.channel(job_id)
        self.last = after or (0, 0)
        self.queue: collections.deque[tuple[tuple[int, int], tuple[int, int], str, bytes]] = collections.deque()
        self.event = asyncio.Event()
        self.started = False
        self.resync = False
        self.closed = False
        self.interrupted = False

    def deliver(self, prev: tuple[int, int], eid: tuple[int, int], text_id: str, data: bytes) -> None:
        self.queue.append((prev, eid, text_id, data))
        self.event.set()

    def lost_messages(self) -> None:
        self.resync = True
        self.event.set()

    def interrupt(self) -> None:
        """Make a pending `next` return (server shutdown)."""
        self.interrupted = True
        self.event.set()

    async def _range(self) -> list[Entry]:
        raw = await self.broker.redis.xrange(self.key, min="(" + format_id(self.last), max="+", count=READ_PAGE)
        out = [(_text(eid), fields[b"d"]) for eid, fields in raw]
        if out:
            self.last = parse_id(out[-1][0]) or self.last
        return out

    async def next(self, timeout_s: float) -> list[Entry] | None:
        if not self.started:
            self.started = True
            await self.broker.hub.add(self)  # subscribed (confirmed) before the backlog is read
            entries = await self._range()
            if entries:
                return entries
        while True:
            if self.resync:
                self.resync = False
                self.queue.clear()
                entries = await self._range()
                if entries:
                    return entries
            out: list[Entry] = []
            while self.queue:
                prev, eid, text_id, data = self.queue.popleft()
                if eid <= self.last:
                    continue
                if prev > self.last:  # missed something in between: read it from the stream
                    self.queue.clear()
                    return await self._range()
                out.append((text_id, data))
                self.last = eid
            if out:
                return out
            if self.interrupted:
                return []
            if not await _wait(self.event, timeout_s):
                # Quiet stream: make sure nothing was missed, then report the timeout.
                entries = await self._range()
                return entries or None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.started:
                self.broker.hub.remove(self)


class _Hub:
    """One pub/sub connection per process for every live subscription (SUBSCRIBE per Job
    channel while someone here reads that Job; O(1) per event, whatever the number of
    streams served)."""

    def __init__(self, broker: RedisStreamBroker) -> None:
        self.broker = broker
        self.subs: dict[str, set[_RedisSubscription]] = {}
        self.confirmed: dict[str, asyncio.Event] = {}
        self.pubsub: Any = None
        self._active = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.messages = 0

    async def add(self, sub: _RedisSubscription) -> None:
        subs = self.subs.setdefault(sub.channel, set())
        subs.add(sub)
        confirmed = self.confirmed.get(sub.channel)
        if confirmed is None:
            confirmed = self.confirmed[sub.channel] = asyncio.Event()
            await self.pubsub.subscribe(sub.channel)
            self._active.set()
        try:
            await asyncio.wait_for(confirmed.wait(), REDIS_POOL_WAIT_S)
        except TimeoutError:
            sub.lost_messages()  # the quiet-stream check reads the stream anyway

    def remove(self, sub: _RedisSubscription) -> None:
        subs = self.subs.get(sub.channel)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self.subs[sub.channel]
            self.confirmed.pop(sub.channel, None)
            if self.pubsub is not None:
                asyncio.get_running_loop().create_task(self._unsubscribe(sub.channel))

    async def _unsubscribe(self, channel: str) -> None:
        if channel in self.subs:
            return  # someone subscribed again meanwhile
        try:
            await self.pubsub.unsubscribe(channel)
        except Exception as exc:  # noqa: BLE001
            log.warning("stream_hub_unsubscribe_failed", error=repr(exc))

    async def start(self) -> None:
        self._active = asyncio.Event()
        self.pubsub = self.broker.hub_redis.pubsub()
        await self.pubsub.connect()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stream-hub")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self.pubsub is not None:
            with contextlib.suppress(Exception):
                await self.pubsub.aclose()
            self.pubsub = None

    def _resync_all(self) -> None:
        for subs in self.subs.values():
            for sub in subs:
                sub.lost_messages()

    async def _run(self) -> None:
        while True:
            try:
                if not self.pubsub.subscribed:
                    self._active.clear()
                    await self._active.wait()  # nothing subscribed: sleep until a reader comes
                async for msg in self.pubsub.listen():  # ends when nothing is subscribed any more
                    self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnects; readers re-read their streams
                log.warning("stream_hub_read_failed", error=repr(exc))
                self._resync_all()
                await asyncio.sleep(0.2)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        channel = _text(msg["channel"])
        if kind == "message":
            self.messages += 1
            payload = msg["data"]
            a = payload.index(b" ")
            b = payload.index(b" ", a + 1)
            prev = parse_id(payload[:a].decode()) or (0, 0)
            text_id = payload[a + 1:b].decode()
            eid = parse_id(text_id) or (0, 0)
            data = payload[b + 1:]
            for sub in list(self.subs.get(channel, ())):
                sub.deliver(prev, eid, text_id, data)
        elif kind == "subscribe":
            confirmed = self.confirmed.get(channel)
            if confirmed is not None:
                if confirmed.is_set():  # a re-subscription after a reconnect: messages may be lost
                    for sub in list(self.subs.get(channel, ())):
                        sub.lost_messages()
                confirmed.set()


class RedisStreamBroker(StreamBroker):
    kind = "redis"

    def __init__(self, url: str, *, prefix: str, retention_s: int, live_ttl_s: int, max_events: int) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self.retention_ms = retention_s * 1000
        self.live_ttl_ms = live_ttl_s * 1000
        self.max_events = max_events
        self.redis = redis_client(url)
        self.hub_redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=None,
                                                 health_check_interval=0)
        self.hub = _Hub(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._pending: collections.deque[tuple[str, bytes]] = collections.deque()
        self._early: collections.deque[tuple[str, bytes]] = collections.deque()  # before start()
        self._early_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._sha = ""
        self._inflight = 0
        self.dropped = 0
        self.published = 0

    def key(self, job_id: str) -> str:
        return f"{self.prefix}stream:{job_id}"

    def channel(self, job_id: str) -> str:
        return f"{self.prefix}ch:{job_id}"

    # -- publishing (any thread)
    def publish(self, job_id: str, data: bytes) -> None:
        item = (job_id, data)
        loop = self._loop
        if loop is None:
            with self._early_lock:
                if self._loop is None:
                    self._early.append(item)
                    return
            loop = self._loop
        if threading.get_ident() == self._loop_thread:
            self._enqueue(item)
        else:
            try:
                loop.call_soon_threadsafe(self._enqueue, item)
            except RuntimeError:  # the loop is closed: the process is going away
                self.dropped += 1

    def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        """One hand-over to the loop for a whole commit's events (not one per event)."""
        if not items:
            return
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            for job_id, data in items:
                self.publish(job_id, data)
            return
        try:
            loop.call_soon_threadsafe(self._enqueue_many, items)
        except RuntimeError:
            self.dropped += len(items)

    def _enqueue_many(self, items: list[tuple[str, bytes]]) -> None:
        for item in items:
            self._enqueue(item)

    def _enqueue(self, item: tuple[str, bytes]) -> None:
        if len(self._pending) >= MAX_PENDING_PUBLISHES and not is_terminal(item[1]):
            self.dropped += 1
            return
        self._pending.append(item)
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                n = min(len(self._pending), PIPELINE_BATCH)
                batch = [self._pending.popleft() for _ in range(n)]
                self._inflight = n
                await self._write(batch)
                self._inflight = 0

    async def _write(self, batch: list[tuple[str, bytes]]) -> None:
        from redis.exceptions import NoScriptError

        for attempt in range(5):
            pipe = self.redis.pipeline(transaction=False)
            for job_id, data in batch:
                ttl = self.retention_ms if is_terminal(data) else self.live_ttl_ms
                pipe.evalsha(self._sha, 2, self.key(job_id), self.channel(job_id), data, self.max_events, ttl)
            try:
                await pipe.execute()
                self.published += len(batch)
                return
            except asyncio.CancelledError:
                raise
            except NoScriptError:
                self._sha = await self.redis.script_load(_APPEND_LUA)
            except Exception as exc:  # noqa: BLE001
                log.warning("stream_publish_failed", error=repr(exc), attempt=attempt + 1, events=len(batch))
                await asyncio.sleep(0.05 * 2 ** attempt)
        self.dropped += len(batch)
        log.error("stream_events_dropped", events=len(batch))

    # -- lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._sha = await self.redis.script_load(_APPEND_LUA)
        await self.hub.start()
        with self._early_lock:
            self._loop = loop
            self._loop_thread = threading.get_ident()
            early, self._early = self._early, collections.deque()
        for item in early:
            self._enqueue(item)
        self._flusher = loop.create_task(self._flush_loop(), name="stream-publisher")

    async def flush(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while (self._pending or self._inflight) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return not (self._pending or self._inflight)

    async def close(self) -> None:
        if self._loop is not None:
            await self.flush()
        await self.hub.stop()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flusher
            self._flusher = None
        with self._early_lock:
            self._loop = None
            self._loop_thread = None
        await self.redis.aclose()
        await self.hub_redis.aclose()

    # -- reading
    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def read(self, job_id: str, after_id: str | None, limit: int = READ_PAGE) -> list[Entry]:
        after = parse_id(after_id) or (0, 0)
        raw = await self.redis.xrange(self.key(job_id), min="(" + format_id(after), max="+", count=limit)
        return [(_text(eid), fields[b"d"]) for eid, fields in raw]

    async def exists(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.key(job_id)))

    def subscribe(self, job_id: str, after_id: str | None) -> Subscription:
        return _RedisSubscription(self, job_id, parse_id(after_id))
