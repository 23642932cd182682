"""Cross-process plumbing of the Island channel (docs/ISLANDS.md, "Several processes").

Any coordinator process may hold any Island's WebSocket; only the dispatch leader makes
offers, and every process's dispatch core must see every Island's heartbeats, lease
renewals and output progress (any of them may become leader; the process serving a
consumer's cancel charges what was delivered). Three flows:

1. Island-addressed notes (offers, takeovers) go to the process holding the Island's
   socket: `IslandBus.to_island`. In-process bus: a direct hand-off. Redis bus: the
   holder SUBSCRIBEs `{prefix}island:{id}` while it holds the socket; others PUBLISH.
2. Notes derived from the event log (cancellations, a lease that moved, the offer
   fallback) are delivered *locally only* (`to_local`): every process applies every Job
   event, so exactly the holder acts on it, without a second copy on the bus.
3. Live inputs (heartbeats, renewals, output progress) are applied to this process's
   core at once (in order, on the `LiveSink` thread, never on the event loop) and, with
   Redis, shared with the other processes in one batched PUBLISH per `flush_ms`.

`ChannelState` keeps what must survive a reconnect to another process: per Job attempt
(Job id + Island id) the last accepted stream sequence number and the output so far (the
text, or the image). The sequence check and the append are one atomic step (a Lua
script on Redis), so a replayed or out-of-order message is refused wherever it arrives.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import structlog

from scheduler.dispatcher import JobOffer
from scheduler.jobs import Job

log = structlog.get_logger("islandlink.bus")

MAX_OUTPUT_BYTES = 8 * 1024 * 1024  # the Job's final output (commands.MAX_OUTPUT_CHARS is the same bound in chars)
OUTPUT_RETRY_S = 5.0  # output progress for a Job this core has not yet seen start is retried this long


# ------------------------------------------------------------------ notes
class OfferNote(msgspec.Struct, tag="offer", tag_field="t", kw_only=True):
    island_id: str
    job_id: str
    cargo: str
    model: str
    kind: str
    input: dict[str, Any]
    ack_deadline_ms: int
    lease_ms: int


class CancelNote(msgspec.Struct, tag="cancel", tag_field="t", kw_only=True):
    island_id: str
    job_id: str
    reason: str


class TakeoverNote(msgspec.Struct, tag="takeover", tag_field="t", kw_only=True):
    """The Island connected again (`conn_id`): any other connection of it must close."""

    island_id: str
    conn_id: str


IslandNote = OfferNote | CancelNote | TakeoverNote


class HeartbeatNote(msgspec.Struct, array_like=True):
    island_id: str
    slots_total: int
    load_permille: int
    latency_ms: int | None
    warm_models: list[str] | None


class RenewNote(msgspec.Struct, array_like=True):
    island_id: str
    job_ids: list[str]


class OutputNote(msgspec.Struct, array_like=True):
    island_id: str
    job_id: str
    tokens: int


class LiveBatch(msgspec.Struct, array_like=True):
    origin: str
    heartbeats: list[HeartbeatNote]
    renews: list[RenewNote]
    outputs: list[OutputNote]


LiveNote = HeartbeatNote | RenewNote | OutputNote

_note_enc = msgspec.msgpack.Encoder()
_island_note_dec = msgspec.msgpack.Decoder(IslandNote)
_live_dec = msgspec.msgpack.Decoder(LiveBatch)


# ------------------------------------------------------------------ live inputs -> this process's core
class SchedulerLike(Protocol):
    core: Any

    def heartbeat(self, island_id: str, *, slots_total: int | None = None, load_permille: int | None = None,
                  latency_ms: int | None = None, warm_models: frozenset[str] | None = None) -> None: ...
    def renew_lease(self, island_id: str, job_id: uuid.UUID) -> bool: ...
    def output(self, island_id: str, job_id: uuid.UUID, tokens: int) -> bool: ...


class LiveSink:
    """Applies live inputs to this process's dispatch core, in arrival order, on a thread
    of its own (the core's lock may be held during a log read; the event loop must never
    wait for it). Output progress for a Job this core has not seen start yet (its
    `Started` event is still on its way through the log) is retried for OUTPUT_RETRY_S."""

    def __init__(self, scheduler: SchedulerLike, *, retry_s: float = OUTPUT_RETRY_S,
                 refresh: Callable[[uuid.UUID], None] | None = None) -> None:
        self.scheduler = scheduler
        self.retry_s = retry_s
        # Several processes: a Job started on another process's socket is re-read from the
        # store here once (the first renewal or output we hear of), so that this process's
        # cached copy is not stale should its dispatcher lapse the lease (see
        # docs/ISLANDS.md, "Stale aggregate caches").
        self.refresh = refresh
        self._refreshed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: dict[tuple[str, str], list[Any]] = {}  # (island, job) -> [tokens, first seen]
        self._thread: threading.Thread | None = None
        self.stats = collections.Counter()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="island-live", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, note: LiveNote, *, remote: bool = False) -> None:
        self._q.put((note, remote) if remote else note)

    def drain(self, timeout: float = 2.0) -> bool:
        """Wait until everything submitted so far is applied (tests)."""
        done = threading.Event()
        self._q.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        next_retry = time.monotonic() + 0.05
        while True:
            try:
                item = self._q.get(timeout=0.05)
            except queue.Empty:
                item = False
            if item is None:
                return
            try:
                if isinstance(item, threading.Event):
                    item.set()
                elif isinstance(item, tuple):
                    self._refresh_for(item[0])
                    self.apply(item[0])
                elif item is not False:
                    self.apply(item)
                if self._pending and time.monotonic() >= next_retry:
                    next_retry = time.monotonic() + 0.05
                    self._retry()
            except Exception:  # noqa: BLE001 - one bad note must not stop the sink
                log.exception("island_live_input_failed")

    def _refresh_for(self, note: LiveNote) -> None:
        if self.refresh is None:
            return
        ids = note.job_ids if isinstance(note, RenewNote) else [note.job_id] if isinstance(note, OutputNote) else []
        for job_id in ids:
            if job_id not in self._refreshed:
                self._refreshed[job_id] = None
                if len(self._refreshed) > 100_000:
                    self._refreshed.popitem(last=False)
                self.refresh(uuid.UUID(job_id))
                self.stats["refreshed"] += 1

    def apply(self, note: LiveNote) -> None:
        s = self.scheduler
        if isinstance(note, HeartbeatNote):
            s.heartbeat(note.island_id, slots_total=note.slots_total, load_permille=note.load_permille,
                        latency_ms=note.latency_ms,
                        warm_models=frozenset(note.warm_models) if note.warm_models is not None else None)
            self.stats["heartbeats"] += 1
        elif isinstance(note, RenewNote):
            for job_id in note.job_ids:
                s.renew_lease(note.island_id, uuid.UUID(job_id))
            self.stats["renewals"] += len(note.job_ids)
        elif isinstance(note, OutputNote):
            self.stats["outputs"] += 1
            if not s.output(note.island_id, uuid.UUID(note.job_id), note.tokens):
                key = (note.island_id, note.job_id)
                entry = self._pending.get(key)
                if entry is None:
                    if len(self._pending) < 100_000:
                        self._pending[key] = [note.tokens, time.monotonic()]
                else:
                    entry[0] += note.tokens

    def _retry(self) -> None:
        now = time.monotonic()
        for key, (tokens, first) in list(self._pending.items()):
            if self.scheduler.output(key[0], uuid.UUID(key[1]), tokens):
                del self._pending[key]
                self.stats["outputs_retried"] += 1
            elif now - first > self.retry_s:
                del self._pending[key]  # the Job is not (or no longer) this Island's: nothing to record
                self.stats["outputs_dropped"] += 1


# ------------------------------------------------------------------ the bus
Deliver = Callable[[Any], None]


class IslandBus:
    """In-process bus (the embedded default) and the base of the Redis bus. Island
    notes are delivered on the event loop thread; `to_island` / `to_local` may be called
    from any thread (the dispatch thread calls them)."""

    kind = "memory"

    def __init__(self, sink: LiveSink) -> None:
        self.sink = sink
        self.origin = uuid.uuid4().hex
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._islands: dict[str, tuple[str, Deliver]] = {}  # island -> (conn id, deliver); loop thread writes
        self._jobs: dict[str, str] = {}  # job -> island, for Jobs running on a socket held here
        self.transports: list[Any] = []  # other transports any process can deliver through (NATS)
        self.stats = collections.Counter()

    # -- lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.sink.start()

    async def close(self) -> None:
        self.sink.stop()
        self.loop = None

    # -- sockets held by this process
    async def attach(self, island_id: str, conn_id: str, deliver: Deliver) -> None:
        old = self._islands.get(island_id)
        self._islands[island_id] = (conn_id, deliver)
        if old is not None and old[0] != conn_id:
            old[1](TakeoverNote(island_id=island_id, conn_id=conn_id))

    async def detach(self, island_id: str, conn_id: str) -> None:
        cur = self._islands.get(island_id)
        if cur is not None and cur[0] == conn_id:
            del self._islands[island_id]

    def holds_island(self, island_id: str) -> bool:
        return island_id in self._islands

    def add_transport(self, transport: Any) -> None:
        """A transport that reaches its Islands from any process (`handles(island_id)`,
        `deliver(note)` on the loop thread): the NATS link (islandlink/nats.py). Notes for
        an Island no local socket holds go to the first transport that handles it."""
        self.transports.append(transport)

    def _transport(self, island_id: str) -> Any:
        for t in self.transports:
            if t.handles(island_id):
                return t
        return None

    def reaches_island(self, island_id: str) -> bool:
        """A local socket holds the Island, or a transport reaches it from here."""
        return island_id in self._islands or (bool(self.transports) and self._transport(island_id) is not None)

    def claim_job(self, job_id: str, island_id: str) -> None:
        self._jobs[job_id] = island_id

    def release_job(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def local_job_island(self, job_id: str) -> str | None:
        return self._jobs.get(job_id)

    # -- island-addressed notes
    def to_island(self, island_id: str, note: Any) -> None:
        """To whichever process holds the Island's socket."""
        self._hop(self._route, island_id, note, True)

    def to_local(self, island_id: str, note: Any) -> None:
        """Only if this process holds the Island's socket (log-derived notes)."""
        if island_id in self._islands or (self.transports and self._transport(island_id) is not None):
            self._hop(self._route, island_id, note, False)

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self.loop
        if loop is None:
            self.stats["dropped_not_started"] += 1
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed: shutting down
                self.stats["dropped_loop_closed"] += 1

    def _route(self, island_id: str, note: Any, publish: bool) -> None:
        entry = self._islands.get(island_id)
        if entry is not None:
            self.stats["delivered_local"] += 1
            entry[1](note)
        elif self.transports and (t := self._transport(island_id)) is not None:
            self.stats["delivered_transport"] += 1
            t.deliver(note)
        elif publish:
            self._publish_island(island_id, note)
        else:
            self.stats["not_here"] += 1

    def _publish_island(self, island_id: str, note: Any) -> None:
        self.stats["undeliverable"] += 1  # one process: nobody else holds sockets
        log.info("island_note_undeliverable", island_id=island_id, note=type(note).__name__)

    # -- live inputs
    def live(self, note: LiveNote) -> None:
        """Apply to this process's core now; share with the other processes (batched)."""
        self.sink.submit(note)
        self._share(note)

    def _share(self, note: LiveNote) -> None:
        pass


class RedisIslandBus(IslandBus):
    kind = "redis"

    def __init__(self, sink: LiveSink, url: str, prefix: str, *, flush_ms: int = 50) -> None:
        super().__init__(sink)
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.flush_s = flush_ms / 1000
        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self.sub_redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=None,
                                                 health_check_interval=0)
        self.pubsub = self.sub_redis.pubsub()
        self.live_channel = f"{prefix}islands:live"
        self._heartbeats: list[HeartbeatNote] = []
        self._renews: dict[str, set[str]] = {}  # island -> Job ids (repeats within a period coalesce)
        self._outputs: dict[tuple[str, str], int] = {}
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()

    def channel(self, island_id: str) -> str:
        return f"{self.prefix}island:{island_id}"

    async def start(self) -> None:
        await super().start()
        self._wake = asyncio.Event()
        await self.pubsub.subscribe(self.live_channel)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reader(), name="island-bus-reader"),
                       loop.create_task(self._flusher(), name="island-bus-flusher")]

    async def close(self) -> None:
        await self._flush()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks = []
        try:
            await self.pubsub.aclose()
        except Exception:  # noqa: BLE001
            pass
        await self.sub_redis.aclose()
        await self.redis.aclose()
        await super().close()

    async def attach(self, island_id: str, conn_id: str, deliver: Deliver) -> None:
        await super().attach(island_id, conn_id, deliver)
        await self.pubsub.subscribe(self.channel(island_id))
        # any other process holding an older socket of this Island closes it
        await self.redis.publish(self.channel(island_id), _note_enc.encode(
            TakeoverNote(island_id=island_id, conn_id=conn_id)))

    async def detach(self, island_id: str, conn_id: str) -> None:
        cur = self._islands.get(island_id)
        await super().detach(island_id, conn_id)
        if cur is not None and cur[0] == conn_id:
            try:
                await self.pubsub.unsubscribe(self.channel(island_id))
            except Exception as exc:  # noqa: BLE001 - a stale subscription only costs ignored notes
                log.warning("island_bus_unsubscribe_failed", island_id=island_id, error=repr(exc))

    def _publish_island(self, island_id: str, note: Any) -> None:
        assert self.loop is not None
        self.loop.create_task(self._publish(self.channel(island_id), _note_enc.encode(note), island_id))

    async def _publish(self, channel: str, data: bytes, island_id: str) -> None:
        try:
            receivers = await self.redis.publish(channel, data)
        except Exception as exc:  # noqa: BLE001 - an undelivered offer expires (ack timeout)
            log.warning("island_bus_publish_failed", island_id=island_id, error=repr(exc))
            return
        self.stats["published"] += 1
        if not receivers:
            self.stats["undeliverable"] += 1
            log.info("island_note_undeliverable", island_id=island_id)

    def _share(self, note: LiveNote) -> None:
        if isinstance(note, HeartbeatNote):
            self._heartbeats.append(note)
        elif isinstance(note, RenewNote):
            self._renews.setdefault(note.island_id, set()).update(note.job_ids)
        elif isinstance(note, OutputNote):
            key = (note.island_id, note.job_id)
            self._outputs[key] = self._outputs.get(key, 0) + note.tokens
            if len(self._outputs) == 1:
                self._wake.set()  # a Job's first output reaches the leader without waiting a full period

    async def _flusher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self._flush()
            await asyncio.sleep(self.flush_s / 5)

    async def _flush(self) -> None:
        if not (self._heartbeats or self._renews or self._outputs):
            return
        batch = LiveBatch(self.origin, self._heartbeats, [RenewNote(i, sorted(j)) for i, j in self._renews.items()],
                          [OutputNote(i, j, n) for (i, j), n in self._outputs.items()])
        self._heartbeats, self._renews, self._outputs = [], {}, {}
        try:
            await self.redis.publish(self.live_channel, _note_enc.encode(batch))
            self.stats["live_batches"] += 1
        except Exception as exc:  # noqa: BLE001 - the next heartbeat carries the live state again
            log.warning("island_bus_live_publish_failed", error=repr(exc))

    async def _reader(self) -> None:
        while True:
            try:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - redis-py reconnects and re-subscribes
                log.warning("island_bus_read_failed", error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            if msg is None or msg.get("type") != "message":
                continue
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
            try:
                if channel == self.live_channel:
                    batch = _live_dec.decode(msg["data"])
                    if batch.origin != self.origin:
                        for n in (*batch.heartbeats, *batch.renews, *batch.outputs):
                            self.sink.submit(n, remote=True)
                else:
                    note = _island_note_dec.decode(msg["data"])
                    self._route(note.island_id, note, False)
            except msgspec.DecodeError as exc:
                log.warning("island_bus_bad_message", channel=channel, error=str(exc))


# ------------------------------------------------------------------ scheduler -> bus
class BusListener:
    """The Island channel's SchedulerListener. Called on the dispatch thread, under the
    dispatch core's lock: it only hands notes to the bus."""

    def __init__(self, bus: IslandBus, now_ms: Callable[[], int], live_job: Callable[[uuid.UUID], Any]) -> None:
        self.bus = bus
        self.now_ms = now_ms
        self.live_job = live_job

    def offer(self, island_id: str, offer: JobOffer) -> None:
        if offer.ack_deadline_ms <= self.now_ms():
            return  # replayed from the log at start-up, or too late to be accepted
        self.bus.to_island(island_id, OfferNote(island_id=island_id, job_id=offer.job_id, cargo=offer.cargo,
                                                model=offer.model, kind=offer.kind, input=offer.input,
                                                ack_deadline_ms=offer.ack_deadline_ms, lease_ms=offer.lease_ms))

    def cancel(self, island_id: str, job_id: str) -> None:
        self.bus.to_local(island_id, CancelNote(island_id=island_id, job_id=job_id, reason="cancelled"))

    def job_changed(self, job_id: str, status: str, event: Any) -> None:
        if isinstance(event, Job.Assigned):
            # the log's copy of the offer: reaches the holder even if the bus lost the fast one
            if self.bus.reaches_island(event.island_id) and event.ack_deadline_ms > self.now_ms():
                live = self.live_job(event.originator_id)
                if live is not None:
                    self.bus.to_local(event.island_id, OfferNote(
                        island_id=event.island_id, job_id=job_id, cargo=live.cargo, model=live.model, kind=live.kind,
                        input=live.input, ack_deadline_ms=event.ack_deadline_ms, lease_ms=0))
        elif isinstance(event, (Job.Requeued, Job.OfferDeclined)):
            self.bus.to_local(event.island_id, CancelNote(island_id=event.island_id, job_id=job_id,
                                                          reason=_short(event.reason)))
        elif status in ("completed", "failed", "cancelled", "timeout"):
            island_id = self.bus.local_job_island(job_id)
            if island_id is not None:
                self.bus.to_local(island_id, CancelNote(island_id=island_id, job_id=job_id, reason=status))


def _short(reason: str) -> str:
    return reason.split(":", 1)[0] if reason else "reassigned"
