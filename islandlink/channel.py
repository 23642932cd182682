"""The Island channel: the WebSocket every Island keeps open to the coordinator
(docs/ISLANDS.md). One `Session` per connection; the scheduler stays the authority on
who may do what with a Job (its commands refuse a forged Job id or a lease that moved),
the channel adds what the commands cannot see: stream sequence numbers, the output so
far, and which socket an offer must reach.

Wiring (the lead's; see docs/ISLANDS.md "Wiring"):

    channel = build_island_channel(coordinator, broker)     # also registers its scheduler listener
    routes = coordinator.app.island_routes(channel, views)  # WebSocket (islandlink/websocket.py) + registration

Every refusal is answered on the socket (`error` with a code, nothing applied) and
logged as `island_message_refused` with the Island, the Job, the message type and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect

from protocol import island as p
from islandlink.bus import (
    BusListener,
    CancelNote,
    IslandBus,
    LiveSink,
    OfferNote,
    RedisIslandBus,
    TakeoverNote,
)
from islandlink.core import REFUSED, LinkCore, StreamPublisher  # noqa: F401 - REFUSED is re-exported
from islandlink.core import JobState as _JobState
from islandlink.core import Refused as _Refused
from islandlink.state import APPEND, NONE, ChannelState, MemoryChannelState, RedisChannelState
from scheduler import commands as cmd
from scheduler.islands import Island
from scheduler.jobs import ASSIGNED, RUNNING
from scheduler.market import BadAsk
from scheduler.registry import BadCapabilities, parse_capabilities
from scheduler.service import hash_token

log = structlog.get_logger("islandlink.channel")

MAX_OUTBOX = 10_000
MAX_HELLO_RUNNING = 1_024
MIN_HEARTBEAT_GAP_S = 0.2  # more frequent heartbeats are acknowledged but not forwarded
SERVER_RESTART = 1012  # the close code uvicorn uses when the coordinator shuts down


@dataclass(frozen=True)
class ChannelSettings:
    """The channel's knobs (COORDINATOR_ISLAND_*)."""

    hello_timeout_s: float = 10.0
    max_bad_messages: int = 20  # malformed messages on one connection before it is closed (4400)
    max_refusals_per_min: int = 600  # refused actions (forged ids, replays) per connection and minute
    state_ttl_s: int = 86_400  # a Job attempt's sequence number and output, after its last message
    live_flush_ms: int = 50  # Redis: live inputs are shared with the other processes this often
    auth_failures_per_s: int = 50  # per process; beyond this, bad tokens are refused without a store read

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ChannelSettings:
        env = os.environ if env is None else env

        def num(name: str, default: int) -> int:
            raw = env.get(name)
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer") from None
            if value <= 0:
                raise ValueError(f"{name} must be positive")
            return value

        return cls(hello_timeout_s=float(num("COORDINATOR_ISLAND_HELLO_TIMEOUT_S", 10)),
                   max_bad_messages=num("COORDINATOR_ISLAND_MAX_BAD_MESSAGES", 20),
                   max_refusals_per_min=num("COORDINATOR_ISLAND_MAX_REFUSALS_PER_MIN", 600),
                   state_ttl_s=num("COORDINATOR_ISLAND_STATE_TTL_S", 86_400),
                   live_flush_ms=num("COORDINATOR_ISLAND_LIVE_FLUSH_MS", 50))


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class Session:
    """One Island connection."""

    channel: IslandChannel
    socket: WebSocket
    island_id: str
    name: str
    conn_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    jobs: dict[str, _JobState] = field(default_factory=dict)  # accepted, running here
    offered: dict[str, OfferNote] = field(default_factory=dict)  # offered, not yet answered
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    replaced: bool = False
    said_bye: bool = False
    closed_by_island: bool = False
    last_heartbeat: float = 0.0
    last_asks: dict[str, str] | None = None  # the heartbeat's asking_prices last applied
    bad_messages: int = 0
    refusals: int = 0
    refusal_window: float = field(default_factory=time.monotonic)
    closing: _Close | None = None

    def send(self, msg: Any) -> None:
        if self.out.qsize() >= MAX_OUTBOX:
            if self.closing is None:
                self.closing = _Close(1008, "the Island does not read its messages")
                self.out.put_nowait(None)
            return
        self.out.put_nowait(p.encode(msg))

    # -- bus callback (event loop thread)
    def deliver(self, note: Any) -> None:
        ch = self.channel
        if isinstance(note, OfferNote):
            if note.job_id in self.offered or note.job_id in self.jobs:
                return  # the fast copy and the log's copy of one offer
            self.offered[note.job_id] = note
            now = ch.clock_ms()
            self.send(p.Offer(job_id=note.job_id, cargo=note.cargo, model=note.model, kind=note.kind, input=note.input,
                              ack_deadline_ms=note.ack_deadline_ms,
                              ack_timeout_ms=max(0, note.ack_deadline_ms - now), lease_ms=ch.config.lease_ms))
            ch.stats["offers"] += 1
        elif isinstance(note, CancelNote):
            reason = note.reason
            if self.offered.pop(note.job_id, None) is not None:
                self.send(p.Cancel(job_id=note.job_id, reason="offer_expired" if reason == "ack_timeout" else reason))
                return
            st = self.jobs.get(note.job_id)
            if st is None or st.finishing:
                return  # not ours, or our own complete/fail decides
            self._drop(note.job_id)
            self.send(p.Cancel(job_id=note.job_id, reason=reason))
            ch.stats["cancels"] += 1
            log.info("island_job_cancelled", island_id=self.island_id, job_id=note.job_id, reason=reason)
        elif isinstance(note, TakeoverNote):
            if note.conn_id != self.conn_id and not self.replaced:
                self.replaced = True
                self.closing = _Close(p.CLOSE_REPLACED, "this Island connected again")
                self.out.put_nowait(None)

    def _drop(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.channel.forget(job_id, self.island_id)

    def refuse(self, msg: Any, code: str, message: str) -> None:
        job_id = getattr(msg, "job_id", "")
        seq = getattr(msg, "seq", 0)
        self.send(p.Error(code=code, message=message, job_id=job_id, seq=seq))
        self.channel.stats["refused"] += 1
        log.warning("island_message_refused", island_id=self.island_id, type=type(msg).__name__.lower(),
                    job_id=job_id, seq=seq, code=code, detail=message)
        now = time.monotonic()
        if now - self.refusal_window > 60:
            self.refusal_window, self.refusals = now, 0
        self.refusals += 1
        if self.refusals > self.channel.settings.max_refusals_per_min:
            raise _Close(p.CLOSE_PROTOCOL_ERROR, "too many refused messages")


class IslandChannel(LinkCore):
    """The WebSocket transport: sessions, hello/welcome, framing and the socket's own
    limits, on the shared core (islandlink/core.py)."""

    def __init__(self, coordinator: Any, publisher: StreamPublisher, bus: IslandBus, state: ChannelState,
                 settings: ChannelSettings | None = None) -> None:
        super().__init__(coordinator, publisher, bus, state)
        self.settings = settings or ChannelSettings()
        self.listener = BusListener(bus, self.clock_ms, self.scheduler.core.live_job)
        self.sessions: dict[str, Session] = {}  # conn id -> session
        self.stats: dict[str, int] = {"connections": 0, "offers": 0, "cancels": 0, "refused": 0, "completed": 0,
                                      "failed": 0, "auth_failures": 0}
        self._auth_fail_window = (0.0, 0)

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.bus.start()

    async def close(self) -> None:
        for s in list(self.sessions.values()):
            s.closing = _Close(SERVER_RESTART, "the coordinator is shutting down")
            s.out.put_nowait(None)
        deadline = time.monotonic() + 2.0
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.bus.close()
        await self.state.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Any = None) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.close()

    def connected(self, island_id: str) -> bool:
        return self.bus.holds_island(island_id)

    # ------------------------------------------------------------ authentication
    async def authenticate(self, token: str | None) -> Island | None:
        island_id = p.token_island_id(token or "")
        if island_id is None:
            self._auth_failed()
            return None
        start, count = self._auth_fail_window
        now = time.monotonic()
        if now - start < 1.0 and count >= self.settings.auth_failures_per_s:
            return None  # a flood of bad tokens: refuse without reading the store
        fresh = self.scheduler.shared_store
        island = await self.c.committer.aquery(lambda uow: uow.get_or_none(island_id, fresh=fresh))
        if not isinstance(island, Island) or not hmac.compare_digest(island.token_hash, hash_token(token or "")):
            self._auth_failed()
            return None
        return island

    def _auth_failed(self) -> None:
        self.stats["auth_failures"] += 1
        start, count = self._auth_fail_window
        now = time.monotonic()
        self._auth_fail_window = (now, 1) if now - start >= 1.0 else (start, count + 1)

    # ------------------------------------------------------------ one connection
    async def serve(self, socket: WebSocket) -> None:
        await socket.accept()
        token = _bearer(socket.headers.get("authorization"))
        island = await self.authenticate(token)
        if island is None:
            log.warning("island_auth_failed", client=_client(socket))
            await _send_close(socket, p.Error(code="unauthorized", message="unknown or invalid Island token"),
                              p.CLOSE_UNAUTHORIZED, "unauthorized")
            return
        island_id = str(island.id)
        try:
            raw = await asyncio.wait_for(socket.receive_text(), self.settings.hello_timeout_s)
        except asyncio.TimeoutError:
            await _send_close(socket, p.Error(code="hello_timeout", message="no hello in time"),
                              p.CLOSE_HELLO_TIMEOUT, "no hello")
            return
        except WebSocketDisconnect:
            return
        try:
            hello = p.decode_island(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await _send_close(socket, p.Error(code="bad_message", message=f"bad hello: {exc}"),
                              p.CLOSE_PROTOCOL_ERROR, "bad hello")
            return
        if not isinstance(hello, p.Hello):
            await _send_close(socket, p.Error(code="bad_message", message="the first message must be hello"),
                              p.CLOSE_PROTOCOL_ERROR, "expected hello")
            return
        if not p.MIN_PROTOCOL_VERSION <= hello.protocol <= p.PROTOCOL_VERSION:
            await _send_close(socket, p.Error(code="unsupported_version",
                                              message=f"protocol {hello.protocol} is not supported; this coordinator "
                                                      f"speaks {p.MIN_PROTOCOL_VERSION}..{p.PROTOCOL_VERSION}"),
                              p.CLOSE_UNSUPPORTED_VERSION, "unsupported protocol version")
            return
        try:
            caps = parse_capabilities(hello.capabilities.to_dict())
        except BadCapabilities as exc:
            await _send_close(socket, p.Error(code="bad_capabilities", message=str(exc)),
                              p.CLOSE_PROTOCOL_ERROR, "bad capabilities")
            return
        if caps != island.capabilities:
            await self.c.committer.aexecute(lambda uow: cmd.set_capabilities_in(uow, island.id, caps))
            log.info("island_capabilities_changed", island_id=island_id, cargos=caps["cargos"], slots=caps["slots"])

        session = Session(self, socket, island_id, island.name)
        self.sessions[session.conn_id] = session
        self.stats["connections"] += 1
        writer = asyncio.get_running_loop().create_task(self._writer(session), name=f"island-writer-{island_id}")
        log.info("island_connected", island_id=island_id, name=island.name, approval=island.approval,
                 agent=hello.agent[:100], client=_client(socket), resuming=len(hello.running))
        try:
            resumed = await self._resume(session, hello.running[:MAX_HELLO_RUNNING])
            session.send(p.Welcome(protocol=p.PROTOCOL_VERSION, island_id=island_id, name=island.name,
                                   approval=island.approval, heartbeat_interval_ms=self.config.heartbeat_interval_ms,
                                   lease_ms=self.config.lease_ms, lease_renew_ms=self.config.lease_renew_ms,
                                   ack_timeout_ms=self.config.ack_timeout_ms, server_time_ms=self.clock_ms(),
                                   jobs=resumed))
            # attached only now, so that `welcome` is the first message; an offer made before
            # is in the core's live view, which `_after_welcome` reads after attaching
            await self.bus.attach(island_id, session.conn_id, session.deliver)
            await self._after_welcome(session, {r.job_id for r in hello.running})
            await self._read(session)
        except _Close as exc:
            session.closing = exc
        except WebSocketDisconnect as exc:
            if session.closing is None:
                session.closing = _Close(exc.code or 1006, "closed by the Island")
                session.closed_by_island = True
        except Exception:  # noqa: BLE001 - one broken session must not affect others
            log.exception("island_session_failed", island_id=island_id)
            session.closing = _Close(1011, "internal error")
        finally:
            await self._end(session, writer)

    async def _writer(self, session: Session) -> None:
        try:
            while True:
                data = await session.out.get()
                if data is None or session.closing is not None and session.closing.code == 1008:
                    c = session.closing or _Close(1000, "")
                    await session.socket.close(code=c.code, reason=c.reason)
                    return
                await session.socket.send_text(data)
        except Exception:  # noqa: BLE001 - the reader sees the disconnect
            pass

    async def _end(self, session: Session, writer: asyncio.Task) -> None:
        self.sessions.pop(session.conn_id, None)
        await self.bus.detach(session.island_id, session.conn_id)
        if not self.bus.holds_island(session.island_id):  # (a newer local session keeps its claims)
            for job_id in list(session.jobs):
                self.bus.release_job(job_id)  # its lease runs on: the Island may resume it on a new connection
        if session.closing is None:
            session.closing = _Close(1000, "")
        session.out.put_nowait(None)
        try:
            await asyncio.wait_for(writer, 2.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            writer.cancel()
        restarting = session.closing is not None and session.closing.code == SERVER_RESTART
        if not session.replaced and not restarting and not self.bus.holds_island(session.island_id):
            # (on a coordinator restart the Island reconnects elsewhere at once; if it does
            # not, missed heartbeats mark it offline)
            reason = "said bye" if session.said_bye else "disconnected"
            try:
                await self.c.committer.aexecute(lambda uow: cmd.set_island_online_in(
                    uow, uuid.UUID(session.island_id), False, reason, self.config.karma))
            except Exception as exc:  # noqa: BLE001 - the missed-heartbeat check marks it offline anyway
                log.warning("island_offline_not_recorded", island_id=session.island_id, error=repr(exc))
        log.info("island_disconnected", island_id=session.island_id, replaced=session.replaced,
                 bye=session.said_bye, running=len(session.jobs), by="island" if session.closed_by_island else
                 "coordinator", code=session.closing.code if session.closing else None)

    async def _resume(self, session: Session, running: list[p.ResumeJob]) -> list[p.JobResume]:
        out: list[p.JobResume] = []
        for r in running:
            try:
                job_uuid = uuid.UUID(r.job_id)
            except ValueError:
                out.append(p.JobResume(job_id=r.job_id, status="gone"))
                continue
            view = await self.scheduler.aget_job(job_uuid)
            if view is None or view.island_id != session.island_id or view.status != RUNNING:
                out.append(p.JobResume(job_id=r.job_id, status="gone"))
                continue
            last = await self.state.last_seq(r.job_id, session.island_id)
            live = self.scheduler.core.live_job(job_uuid)
            session.jobs[r.job_id] = _JobState(kind=view.kind, streamed=bool(live and live.streamed))
            self.bus.claim_job(r.job_id, session.island_id)
            out.append(p.JobResume(job_id=r.job_id, status="running", last_seq=last))
        return out

    async def _after_welcome(self, session: Session, named: set[str]) -> None:
        """Offers still waiting for this Island are sent again; Jobs the core has running
        on it that the agent did not name are lost (the agent restarted): returned now
        instead of when their lease lapses."""
        core = self.scheduler.core

        def snapshot() -> list[tuple[uuid.UUID, Any]]:
            with core.lock:  # held by the dispatch thread during log reads: not on the event loop
                return [(jid, live) for jid, live in core.jobs.items() if live.island_id == session.island_id]

        mine = await asyncio.to_thread(snapshot)
        now = self.clock_ms()
        for job_uuid, live in mine:
            job_id = str(job_uuid)
            if live.status == ASSIGNED and live.ack_deadline_ms > now:
                session.deliver(OfferNote(island_id=session.island_id, job_id=job_id, cargo=live.cargo,
                                          model=live.model, kind=live.kind, input=live.input,
                                          ack_deadline_ms=live.ack_deadline_ms, lease_ms=self.config.lease_ms))
            elif live.status == RUNNING and job_id not in named and job_id not in session.jobs:
                await self._return_lost(session, job_uuid, live.streamed, "the Island restarted and lost the job")

    async def _return_lost(self, session: Session, job_uuid: uuid.UUID, streamed: bool, why: str) -> None:
        await self.return_lost(session.island_id, job_uuid, streamed, why)

    # ------------------------------------------------------------ messages
    async def _read(self, session: Session) -> None:
        while True:
            if session.closing is not None:
                raise session.closing
            raw = await session.socket.receive_text()
            try:
                msg = p.decode_island(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                session.bad_messages += 1
                session.send(p.Error(code="bad_message", message=str(exc)[:300]))
                log.warning("island_message_refused", island_id=session.island_id, type="?", code="bad_message",
                            detail=str(exc)[:300])
                if session.bad_messages > self.settings.max_bad_messages:
                    raise _Close(p.CLOSE_PROTOCOL_ERROR, "too many malformed messages") from None
                continue
            try:
                await self._handle(session, msg)
            except _Refused as r:
                session.refuse(msg, r.code, r.message)
            if isinstance(msg, p.Bye):
                session.said_bye = True
                return

    async def _handle(self, s: Session, msg: Any) -> None:
        if isinstance(msg, p.Heartbeat):
            self._heartbeat(s, msg)
            if msg.asking_prices is not None and msg.asking_prices != s.last_asks:
                await self._asks(s, msg.asking_prices)
        elif isinstance(msg, p.Output):
            await self._output(s, msg)
        elif isinstance(msg, p.Progress):
            await self._progress(s, msg)
        elif isinstance(msg, p.ImageResult):
            await self._image(s, msg)
        elif isinstance(msg, p.Renew):
            self._renew(s, msg)
        elif isinstance(msg, p.Accept):
            await self._accept(s, msg)
        elif isinstance(msg, p.Reject):
            await self._reject(s, msg)
        elif isinstance(msg, p.Complete):
            await self._complete(s, msg)
        elif isinstance(msg, p.Fail):
            await self._fail(s, msg)
        elif isinstance(msg, p.Hello):
            raise _Refused("bad_message", "hello was already received")

    def _heartbeat(self, s: Session, msg: p.Heartbeat) -> None:
        now = time.monotonic()
        if now - s.last_heartbeat < MIN_HEARTBEAT_GAP_S and not msg.draining:
            s.send(p.HeartbeatAck(seq=msg.seq, server_time_ms=self.clock_ms()))  # too often: acknowledged only
            return
        s.last_heartbeat = now
        self.heartbeat(s.island_id, 0 if msg.draining else msg.slots_total, msg.load_permille, msg.rtt_ms,
                       msg.warm_models)
        s.send(p.HeartbeatAck(seq=msg.seq, server_time_ms=self.clock_ms()))

    async def _asks(self, s: Session, prices: dict[str, str]) -> None:
        """The heartbeat's asking prices, applied when they differ from the last ones this
        session applied (the scheduler writes `Island.AsksChanged` only on a real change)."""
        s.last_asks = dict(prices)  # a bad map is refused once, not on every heartbeat
        try:
            await self.scheduler.aset_asking_prices(uuid.UUID(s.island_id), prices, by="island")
        except BadAsk as exc:
            raise _Refused("bad_asks", str(exc)[:300]) from None

    _command = LinkCore.command

    def _job_uuid(self, job_id: str) -> uuid.UUID:
        return self.job_uuid(job_id)

    def _running(self, s: Session, job_id: str) -> _JobState:
        """The Job must be running on this Island: accepted by the scheduler for it, and
        not since moved. A move (lapse, cancel, failure) reaches the session as a
        CancelNote the moment this process applies its event, which drops the Job here.
        (The core's live view is not consulted: on a follower it may still show an
        earlier attempt on another Island.)"""
        st = s.jobs.get(job_id)
        if st is None:
            raise _Refused("not_your_job", "this job is not running on this Island")
        return st

    async def _advance(self, s: Session, msg: Any, mode: str, data: str, **kw: Any) -> None:
        await self.advance(s.island_id, msg.job_id, msg.seq, mode, data, **kw)

    async def _output(self, s: Session, msg: p.Output) -> None:
        st = self._running(s, msg.job_id)
        if st.kind != "chat":
            raise _Refused("bad_message", "output tokens belong to chat jobs")
        if len(msg.tokens) > p.MAX_TOKENS_PER_OUTPUT:
            raise _Refused("too_large", f"at most {p.MAX_TOKENS_PER_OUTPUT} tokens per message")
        text = "".join(msg.tokens)
        if len(text) > p.MAX_OUTPUT_TEXT_CHARS:
            raise _Refused("too_large", f"at most {p.MAX_OUTPUT_TEXT_CHARS} characters per message")
        await self._advance(s, msg, APPEND, text)
        self.text_out(s.island_id, st, msg.job_id, text, len(msg.tokens))

    async def _progress(self, s: Session, msg: p.Progress) -> None:
        self._running(s, msg.job_id)
        self.check_progress(msg.step, msg.total)
        await self._advance(s, msg, NONE, "")
        self.publisher.publish_progress(msg.job_id, msg.step, msg.total)

    async def _image(self, s: Session, msg: p.ImageResult) -> None:
        st = self._running(s, msg.job_id)
        self.check_image(st, msg.image_b64, msg.format, msg.width, msg.height, msg.seed, p.MAX_IMAGE_B64_CHARS)
        await self.image_out(s.island_id, st, msg.job_id, msg.seq, msg.image_b64, msg.format, msg.width,
                             msg.height, msg.seed)

    def _renew(self, s: Session, msg: p.Renew) -> None:
        mine: list[str] = []
        for job_id in msg.job_ids[:p.MAX_RENEW_JOBS]:
            if job_id in s.jobs:
                mine.append(job_id)
            else:
                s.send(p.Cancel(job_id=job_id, reason="not_yours"))
                log.warning("island_message_refused", island_id=s.island_id, type="renew", job_id=job_id,
                            code="not_your_job", detail="renewal of a job this Island does not run")
        if mine:
            self.renew(s.island_id, mine)

    async def _accept(self, s: Session, msg: p.Accept) -> None:
        try:
            kind = await self.start_job(s.island_id, msg.job_id)
        finally:
            s.offered.pop(msg.job_id, None)
        s.jobs[msg.job_id] = _JobState(kind=kind)
        s.send(p.Accepted(job_id=msg.job_id, lease_ms=self.config.lease_ms))

    async def _reject(self, s: Session, msg: p.Reject) -> None:
        try:
            await self.decline_job(s.island_id, msg.job_id)
        finally:
            s.offered.pop(msg.job_id, None)
        log.info("island_offer_rejected", island_id=s.island_id, job_id=msg.job_id, reason=msg.reason[:200])

    async def _complete(self, s: Session, msg: p.Complete) -> None:
        st = self._running(s, msg.job_id)
        try:
            status, billed, charged = await self.complete_job(s.island_id, st, msg.job_id, dict(msg.usage),
                                                              msg.compute_ms)
        except _Refused as r:
            if r.code == "not_your_job":
                s.jobs.pop(msg.job_id, None)
            raise
        s._drop(msg.job_id)
        self.stats["completed"] += 1
        s.send(p.Finished(job_id=msg.job_id, status=status))
        log.info("island_job_completed", island_id=s.island_id, job_id=msg.job_id, usage=billed, charged_micro=charged)

    async def _fail(self, s: Session, msg: p.Fail) -> None:
        self._job_uuid(msg.job_id)
        st = s.jobs.get(msg.job_id)
        if st is None and msg.job_id not in s.offered:
            raise _Refused("not_your_job", "this job is not offered to or running on this Island")
        streamed = self.streamed(s.island_id, msg.job_id, st)
        reason = msg.reason[:p.MAX_REASON_CHARS] or "unspecified"
        if st is not None:
            st.finishing = True
        try:
            status = await self.fail_job(s.island_id, msg.job_id, reason, retryable=msg.retryable, streamed=streamed)
        finally:
            s.offered.pop(msg.job_id, None)
            if st is not None:
                s._drop(msg.job_id)
        self.stats["failed"] += 1
        s.send(p.Finished(job_id=msg.job_id, status=status))
        log.info("island_job_failed", island_id=s.island_id, job_id=msg.job_id, reason=reason,
                 retryable=msg.retryable, streamed=streamed, status=status)


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _client(socket: WebSocket) -> str:
    client = socket.scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


async def _send_close(socket: WebSocket, err: p.Error, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await socket.send_text(p.encode(err))
    with contextlib.suppress(Exception):
        await socket.close(code=code, reason=reason)


# ------------------------------------------------------------------ construction
def build_island_channel(coordinator: Any, publisher: StreamPublisher,
                         settings: ChannelSettings | None = None) -> IslandChannel:
    """The channel on the embedded default (in-process bus and state) or, when
    COORDINATOR_REDIS_URL is set, on Redis. Registers its listener on
    `coordinator.listeners` (offers, cancellations)."""
    settings = settings or ChannelSettings.from_env()
    refresh = None
    if coordinator.scheduler.shared_store:
        committer = coordinator.committer

        def reread(uow: Any, job_id: uuid.UUID) -> None:
            job = uow.get_or_none(job_id, fresh=True)
            account_id = getattr(job, "account_id", None)
            if account_id:  # its hold was placed by whichever process took the submission
                uow.get_or_none(uuid.UUID(account_id), fresh=True)

        def refresh(job_id: uuid.UUID) -> None:
            committer.submit(lambda uow: reread(uow, job_id), read_only=True)

    sink = LiveSink(coordinator.scheduler, refresh=refresh)
    cs = coordinator.settings
    if cs.redis_url:
        prefix = cs.api.redis_prefix
        bus: IslandBus = RedisIslandBus(sink, cs.redis_url, prefix, flush_ms=settings.live_flush_ms)
        state: ChannelState = RedisChannelState(cs.redis_url, prefix, settings.state_ttl_s)
    else:
        bus = IslandBus(sink)
        state = MemoryChannelState(settings.state_ttl_s)
    channel = IslandChannel(coordinator, publisher, bus, state, settings)
    coordinator.listeners.add(channel.listener)
    return channel
