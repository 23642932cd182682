"""The stream broker: each Job's stream of events (status, token, progress, image, error,
done), appended by whoever produces them and read by whichever process serves the
consumer's SSE connection.

Two implementations behind one interface:
- `RedisStreamBroker`: one Redis Stream per Job (`{prefix}stream:{job_id}`, field `d` =
  the event's JSON). An append is one Lua call (XADD trimmed, expiry, and a PUBLISH on the
  Job's channel carrying the entry, its id and the previous id), pipelined by one asyncio
  task per process. Readers take the backlog with XRANGE and live entries from one
  pub/sub connection per process (SUBSCRIBE per Job being served: O(1) per event however
  many streams a process serves); a gap (missed notification, reconnect) is detected from
  the previous-id and filled from the stream, so the Stream stays the source of truth.
- `MemoryBroker`: the embedded default (one process): lists under a lock.

Event ids are the Redis entry ids (`<ms>-<seq>`, also produced by the memory broker),
strictly increasing per Job: they are the SSE `id:` and the `Last-Event-ID` to resume
after. Retention: a stream is trimmed (approximately) to `max_events` entries, expires
`live_ttl_s` after its last append and `retention_s` after its terminal event; the final
output stays on the Job aggregate (api/consumer.py replays from it once a stream is gone).

Publishing (`publish*`) is non-blocking and thread-safe: the scheduler's writer thread,
the dispatch thread and the event loop all publish. Ordering: events published by one
thread (or one coroutine) reach the stream in the order published, and events published
from the writer thread before a command's future resolves are ahead of anything its
caller publishes after awaiting it (both hops go through the same loop's FIFO).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import structlog

from streams.frames import done_event, error_event, image_event, progress_event, status_event, token_event


log = structlog.get_logger("streams.broker")

EventId = str
Entry = tuple[EventId, bytes]
MAX_PENDING_PUBLISHES = 1_000_000
PIPELINE_BATCH = 1_000
READ_PAGE = 1_000






















# ------------------------------------------------------------------ interfaces
class Subscription(Protocol):
    async def next(self, timeout_s: float) -> list[Entry] | None:
        """The next entries after the last one returned (None on timeout)."""

    def interrupt(self) -> None: ...
    def close(self) -> None: ...


class Publisher:
    """The publishing half (thread-safe, non-blocking). Subclasses implement `publish`.
    The Island channel calls `publish_token` / `publish_progress` / `publish_image`."""

    def publish(self, job_id: str, data: bytes) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def publish_many(self, items: list[tuple[str, bytes]]) -> None:
        """Several events (in order), e.g. everything one commit produced."""
        for job_id, data in items:
            self.publish(job_id, data)

    def publish_status(self, job_id: str, status: str) -> None:
        self.publish(job_id, status_event(status))

    def publish_token(self, job_id: str, text: str) -> None:
        self.publish(job_id, token_event(text))

    def publish_progress(self, job_id: str, step: int, total: int) -> None:
        self.publish(job_id, progress_event(step, total))

    def publish_image(self, job_id: str, image_b64: str, fmt: str = "png", **extra: Any) -> None:
        self.publish(job_id, image_event(image_b64, fmt, **extra))

    def publish_error(self, job_id: str, message: str) -> None:
        self.publish(job_id, error_event(message))

    def publish_done(self, job_id: str, usage: dict[str, Any]) -> None:
        self.publish(job_id, done_event(usage))


class StreamBroker(Publisher):
    """Publishing plus reading. `start(loop)` binds it to the server's event loop."""

    kind: str = "abstract"

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...  # type: ignore[empty-body]
    async def read(self, job_id: str, after_id: str | None, limit: int = READ_PAGE) -> list[Entry]: ...  # type: ignore[empty-body]
    async def exists(self, job_id: str) -> bool: ...  # type: ignore[empty-body]
    def subscribe(self, job_id: str, after_id: str | None) -> Subscription: ...  # type: ignore[empty-body]
    async def flush(self, timeout_s: float = 5.0) -> bool: ...  # type: ignore[empty-body]


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set (it is not cleared here), at most `timeout_s`."""
    if event.is_set():
        return True
    loop = asyncio.get_running_loop()
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        event.set()

    handle = loop.call_later(timeout_s, expire)
    try:
        await event.wait()
    finally:
        handle.cancel()
    return not timed_out
