"""The NATS transport of the Island link: the coordinator speaks the published Island
agent's protocol (archipelag-io/island over NATS JetStream; /work/shared/island-nats-
protocol.md, protocol/nats.py) on the same core as the WebSocket channel
(islandlink/core.py): the same scheduler commands, ledger, karma, routing inputs and
per-attempt stream state. Enabled by COORDINATOR_NATS_URL; docs/ISLANDS.md "NATS".

Island -> coordinator: a subscription on `host.*.*` plus the two `coordinator.hosts.*`
subjects. With several coordinator processes every process receives every message and
only the dispatch leader handles them (decision 0058: one Island's messages must be
applied in order, which a queue group spread over processes would break). Messages of one
Island are handled in arrival order by a worker of their own (NATS keeps one publisher's
order; the output before `succeeded` must be applied first); Islands proceed in parallel.

Coordinator -> Island: assignments into the `JOBS` stream (work-queue retention, subjects
`host.*.jobs`, created at start if missing; `Nats-Msg-Id` = Job id and offer deadline, so
the fast copy and the log's copies of one offer are one message); cancel and preload by
core publish.

Every message is checked against the subject's host id: the body must name the same host,
the Job must be running on (or offered to) that Island, a `seq` must be the next one. A
refusal is logged (`island_message_refused`) and counted, never applied; a Job this
Island does not hold gets a `cancel` back. Undecodable payloads are logged and counted per
subject (`stats["bad_messages:<subject>"]`, exported as a metric), never raised."""

from __future__ import annotations

import asyncio
import collections
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog

from islandlink import nats_auth
from islandlink.bus import CancelNote, IslandBus, OfferNote
from islandlink.core import JobState, LinkCore, Refused, StreamPublisher
from islandlink.state import APPEND, NONE, REPLACE, ChannelState
from protocol import nats as pn
from scheduler.jobs import RUNNING
from scheduler.pairing import PairingRefused, PendingIsland

log = structlog.get_logger("islandlink.nats")

MAX_HOST_QUEUE = 10_000  # messages waiting for one Island's worker; beyond, dropped and counted
HOST_WORKER_IDLE_S = 30.0
MAX_CHUNK_CHARS = 64 * 1024
MAX_IMAGE_B64 = 8 * 1024 * 1024
CAPS_REFRESH_MIN_S = 60.0  # capabilities from heartbeats are written at most this often per Island
LOST_AFTER_S = 25.0  # a Job started this long ago on an Island whose heartbeat says 0 active Jobs is lost
#: estimated_llm_tok_s -> hardware tier (routing filter `min_hardware_tier`), decision 0057
TIER_TOK_S = ((100.0, 4), (50.0, 3), (20.0, 2), (5.0, 1))


@dataclass(frozen=True)
class NatsSettings:
    url: str
    auth_file: Path | None = None  # where the authorization include is written (None: not managed here)
    pid_file: Path | None = None  # nats-server's pid file, for the reload signal
    pairing_user: str = "pairing"
    pairing_password: str = "pairing"
    pair_url: str = ""
    auth_sync_s: float = 1.0
    stream_max_age_s: int = 3_600
    duplicate_window_s: int = 120

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NatsSettings | None:
        env = os.environ if env is None else env
        url = env.get("COORDINATOR_NATS_URL") or ""
        if not url:
            return None
        if not url.startswith(("nats://", "tls://")):
            raise ValueError("COORDINATOR_NATS_URL must start with nats:// or tls://")
        nats_dir = env.get("COORDINATOR_NATS_DIR") or ""  # scripts/services.sh's layout
        auth = env.get("COORDINATOR_NATS_AUTH_FILE") or (str(Path(nats_dir) / "auth.conf") if nats_dir else "")
        pid = env.get("COORDINATOR_NATS_PID_FILE") or (str(Path(nats_dir) / "nats.pid") if nats_dir else "")
        public = (env.get("COORDINATOR_PUBLIC_URL") or "").rstrip("/")
        return cls(url=url, auth_file=Path(auth) if auth else None, pid_file=Path(pid) if pid else None,
                   pairing_user=env.get("COORDINATOR_NATS_PAIRING_USER") or "pairing",
                   pairing_password=env.get("COORDINATOR_NATS_PAIRING_PASSWORD") or "pairing",
                   pair_url=env.get("COORDINATOR_PAIR_URL") or (f"{public}/islands/pair" if public else ""))


@dataclass
class _NatsJob(JobState):
    offset: int = 0  # added to the agent's seq: llmcpp counts from 0, the container runtime from 1
    final_seen: bool = False
    completion_tokens: int | None = None  # from llmcpp's final `done` chunk
    prompt_tokens: int = 0
    last_step: int = -1
    input: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Host:
    """One Island as this process sees it."""

    host_id: str
    jobs: dict[str, _NatsJob] = field(default_factory=dict)
    offered: dict[str, int] = field(default_factory=dict)  # job -> JOBS stream seq (0: not known)
    queue: collections.deque = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task | None = None
    last_caps_s: float = 0.0
    last_asks: dict[str, str] | None = None


class NatsLink(LinkCore):
    """The NATS transport. `start()` connects, creates the stream, subscribes and joins
    the bus as a transport; `close()` drains."""

    kind = "nats"

    def __init__(self, coordinator: Any, publisher: StreamPublisher, bus: IslandBus, state: ChannelState,
                 settings: NatsSettings, pairing: Any) -> None:
        super().__init__(coordinator, publisher, bus, state)
        self.settings = settings
        self.pairing = pairing
        self.nc: Any = None
        self.js: Any = None
        self.hosts: dict[str, _Host] = {}
        self.stats: collections.Counter = collections.Counter()
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task] = []
        self._fixed_users: tuple[Any, Any] | None = None
        self.connected = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect and subscribe. If NATS is not reachable yet, the HTTP API and the
        WebSocket Islands start anyway and this keeps trying every second."""
        self.bus.add_transport(self)
        if self.settings.auth_file is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._auth_loop(), name="nats-auth-sync"))
        self._tasks.append(asyncio.get_running_loop().create_task(self._connect_until_done(), name="nats-connect"))
        try:  # a normal start is connected before the server takes requests; a NATS outage does not hold it up
            await asyncio.wait_for(self.connected.wait(), 5.0)
        except asyncio.TimeoutError:
            log.warning("nats_unavailable_at_start", url=pn.split_url(self.settings.url)[0])

    async def _connect_until_done(self) -> None:
        while True:
            try:
                await self._connect()  # nats-py itself retries the first connect (every 0.5 s)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. the stream could not be created yet
                self.stats["nats_connect_failures"] += 1
                log.warning("nats_connect_failed", error=repr(exc)[:200])
                await asyncio.sleep(1.0)

    async def _connect(self) -> None:
        import nats

        url, user, password = pn.split_url(self.settings.url)
        opts: dict[str, Any] = {}
        if user is not None:
            opts.update(user=user, password=password)

        async def on_error(exc: Exception) -> None:
            self.stats["nats_errors"] += 1
            log.warning("nats_error", error=repr(exc)[:300])

        async def on_disconnect() -> None:
            self.connected.clear()
            self.stats["nats_disconnects"] += 1
            log.warning("nats_disconnected")

        async def on_reconnect() -> None:
            self.connected.set()
            self.stats["nats_reconnects"] += 1
            log.info("nats_reconnected")
            try:
                await self._ensure_stream()
            except Exception as exc:  # noqa: BLE001 - retried on the next reconnect / publish
                log.warning("nats_stream_check_failed", error=repr(exc))

        if self.settings.auth_file is not None:
            await asyncio.to_thread(self.sync_auth)  # our own user must be in the file before we connect
        nc = await nats.connect(servers=[url], name="coordinator", max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.5, connect_timeout=5, no_echo=True,
                                     error_cb=on_error, disconnected_cb=on_disconnect,
                                     reconnected_cb=on_reconnect, allow_reconnect=True, **opts)
        self.js = nc.jetstream(timeout=5)
        try:
            self.nc = nc
            await self._ensure_stream()
            for subj in ("host.*.*", pn.REGISTER, pn.PAIRING):
                self._subs.append(await nc.subscribe(subj, cb=self._on_msg,
                                                     pending_msgs_limit=1_000_000,
                                                     pending_bytes_limit=512 * 1024 * 1024))
        except Exception:
            self.nc = None
            await nc.close()
            raise
        self.connected.set()
        log.info("nats_link_started", url=url, auth_file=str(self.settings.auth_file or ""))

    async def _ensure_stream(self) -> None:
        from nats.js.api import RetentionPolicy, StreamConfig
        from nats.js.errors import NotFoundError

        try:
            await self.js.stream_info(pn.STREAM)
        except NotFoundError:
            await self.js.add_stream(StreamConfig(
                name=pn.STREAM, subjects=list(pn.STREAM_SUBJECTS), retention=RetentionPolicy.WORK_QUEUE,
                max_age=float(self.settings.stream_max_age_s), duplicate_window=float(self.settings.duplicate_window_s)))
            log.info("nats_stream_created", stream=pn.STREAM)

    async def close(self) -> None:
        if self in self.bus.transports:
            self.bus.transports.remove(self)
        for t in self._tasks:
            t.cancel()
        for h in self.hosts.values():
            if h.worker is not None:
                h.worker.cancel()
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.drain(), 5)
            except Exception:  # noqa: BLE001
                try:
                    await self.nc.close()
                except Exception:  # noqa: BLE001
                    pass
        self.nc = None

    # ------------------------------------------------------------ the bus's transport interface
    def handles(self, island_id: str) -> bool:
        rec = self.scheduler.core.registry.islands.get(island_id)
        return rec is not None and rec.capabilities.get("transport") == "nats"

    def deliver(self, note: Any) -> None:
        """A note for one of our Islands (loop thread): an offer into the JOBS stream, a cancel."""
        if self.nc is None:
            self.stats["dropped_not_connected"] += 1
            return
        loop = asyncio.get_running_loop()
        if isinstance(note, OfferNote):
            loop.create_task(self._assign(note))
        elif isinstance(note, CancelNote):
            loop.create_task(self._cancel(note))

    async def _assign(self, note: OfferNote) -> None:
        host = self._host(note.island_id)
        if note.job_id in host.jobs:
            return
        try:
            cargo = self.c.catalog.by_slug(note.cargo)
            runtime = cargo.runtime_type
        except Exception:  # noqa: BLE001 - an unknown Cargo is routed nowhere; keep the default
            runtime = "container"
        inp = dict(note.input)
        inp.setdefault("model", note.model)
        lease_expires = (self.clock_ms() + self.config.lease_ms) // 1000
        msg = pn.AssignJob(job_id=note.job_id, workload_id=note.cargo, input=inp, lease_expires=lease_expires,
                           runtime_type=runtime)
        try:
            ack = await self.js.publish(pn.subject(note.island_id, "jobs"), pn.encode(msg), stream=pn.STREAM,
                                        headers={"Nats-Msg-Id": f"{note.job_id}:{note.ack_deadline_ms}"})
        except Exception as exc:  # noqa: BLE001 - the offer's ack deadline returns the Job to the queue
            self.stats["assign_failed"] += 1
            log.warning("nats_assign_failed", island_id=note.island_id, job_id=note.job_id, error=repr(exc)[:200])
            return
        if not getattr(ack, "duplicate", False):
            host.offered[note.job_id] = ack.seq
            self.stats["offers"] += 1

    async def _cancel(self, note: CancelNote) -> None:
        host = self._host(note.island_id)
        seq = host.offered.pop(note.job_id, None)
        if seq:  # still in the stream (not fetched): take it out
            try:
                await self.js.delete_msg(pn.STREAM, seq)
            except Exception:  # noqa: BLE001 - already fetched: the cancel below reaches the agent
                pass
        st = host.jobs.get(note.job_id)
        if st is not None and st.finishing:
            return  # its own succeeded/failed decides
        if st is None and seq is None and note.reason in ("completed", "failed", "timeout"):
            return  # the Job ended here (or was never here): nothing to tell the agent
        if st is not None:
            host.jobs.pop(note.job_id, None)
            self.forget(note.job_id, note.island_id)
        await self._publish_cancel(note.island_id, note.job_id)
        self.stats["cancels"] += 1

    async def _publish_cancel(self, host_id: str, job_id: str) -> None:
        try:
            await self.nc.publish(pn.subject(host_id, "cancel"), pn.encode(pn.CancelJob(job_id=job_id)))
        except Exception as exc:  # noqa: BLE001
            log.warning("nats_cancel_failed", island_id=host_id, job_id=job_id, error=repr(exc)[:200])

    async def preload(self, host_id: str, rec: pn.PreloadRecommendation) -> None:
        """A preload recommendation to one Island (`host.{id}.preload`)."""
        await self.nc.publish(pn.subject(host_id, "preload"), pn.encode(rec))

    # ------------------------------------------------------------ Island -> coordinator
    def _host(self, host_id: str) -> _Host:
        h = self.hosts.get(host_id)
        if h is None:
            h = self.hosts[host_id] = _Host(host_id)
        return h

    def _handling(self) -> bool:
        """This process handles Island messages while it holds the dispatch lead (the
        last known state: no I/O on the loop). One process: always."""
        held = getattr(self.scheduler.core.leader, "held", None)
        return True if held is None else bool(held())

    async def _on_msg(self, msg: Any) -> None:
        if not self._handling():
            self.stats["left_to_the_leader"] += 1
            return
        subj = msg.subject
        if subj == pn.PAIRING:
            asyncio.get_running_loop().create_task(self._guard(self._pairing, msg, "pairing"))
            return
        if subj == pn.REGISTER:
            asyncio.get_running_loop().create_task(self._guard(self._register, msg, "register"))
            return
        parsed = pn.host_of(subj)
        if parsed is None:
            return
        host_id, what = parsed
        if what not in pn.ISLAND_SUBJECTS:
            return  # ours (jobs, cancel, preload) or a peer probe
        if what == "ping":
            if msg.reply:
                await self.nc.publish(msg.reply, b"pong")
            self.stats["pings"] += 1
            return
        if not self.handles(host_id):
            self.stats[f"unknown_host:{what}"] += 1
            return
        h = self._host(host_id)
        if len(h.queue) >= MAX_HOST_QUEUE:
            self.stats["dropped_queue_full"] += 1
            return
        h.queue.append((what, msg.data))
        h.wake.set()
        if h.worker is None or h.worker.done():
            h.worker = asyncio.get_running_loop().create_task(self._work(h), name=f"nats-host-{host_id[:8]}")

    async def _work(self, h: _Host) -> None:
        while True:
            while h.queue:
                what, data = h.queue.popleft()
                await self._guard(self._handle, (h, what, data), what)
            h.wake.clear()
            try:
                await asyncio.wait_for(h.wake.wait(), HOST_WORKER_IDLE_S)
            except asyncio.TimeoutError:
                if not h.queue:
                    h.worker = None
                    return

    async def _guard(self, fn: Any, arg: Any, what: str) -> None:
        try:
            if isinstance(arg, tuple):
                await fn(*arg)
            else:
                await fn(arg)
        except pn.DecodeErrors as exc:
            self.stats["bad_messages"] += 1
            self.stats[f"bad_messages:{what}"] += 1
            log.warning("island_message_refused", transport="nats", subject=what, code="bad_message",
                        detail=str(exc)[:300])
        except Exception:  # noqa: BLE001 - one bad message must never stop the handlers
            self.stats["handler_errors"] += 1
            log.exception("nats_handler_failed", subject=what)

    def _refuse(self, h: _Host, what: str, job_id: str, code: str, detail: str) -> None:
        self.stats["refused"] += 1
        self.stats[f"refused:{code}"] += 1
        log.warning("island_message_refused", transport="nats", island_id=h.host_id, type=what, job_id=job_id[:64],
                    code=code, detail=detail[:300])

    async def _handle(self, h: _Host, what: str, data: bytes) -> None:
        msg = pn.decode_island(what, data)
        if what == "heartbeat":
            if msg.host_id != h.host_id:
                self._refuse(h, what, "", "wrong_host", f"the body names host {msg.host_id[:64]!r}")
                return
            await self._heartbeat(h, msg)
            return
        job_id = msg.job_id
        try:
            if what == "status":
                await self._status(h, msg)
            elif what == "output":
                await self._output(h, msg)
            elif what == "progress":
                await self._progress(h, msg)
            elif what == "image":
                await self._image(h, msg)
            elif what == "lease":
                await self._lease(h, msg)
        except Refused as r:
            self._refuse(h, what, job_id, r.code, r.message)
            if r.code == "not_your_job":
                await self._publish_cancel(h.host_id, job_id)

    async def _job(self, h: _Host, job_id: str) -> _NatsJob:
        """The Job must be running on this Island. A Job started through another process
        (several coordinators share the subscription) is adopted after a fresh read."""
        st = h.jobs.get(job_id)
        if st is not None:
            return st
        job_uuid = self.job_uuid(job_id)
        view = await self.scheduler.aget_job(job_uuid)
        if view is None or view.island_id != h.host_id or view.status != RUNNING:
            raise Refused("not_your_job", "this job is not running on this Island")
        st = self._new_state(view.kind, view.cargo, view.input)
        st.streamed = await self.state.last_seq(job_id, h.host_id) > 0
        h.jobs[job_id] = st
        self.bus.claim_job(job_id, h.host_id)
        return st

    def _new_state(self, kind: str, cargo_slug: str, inp: dict[str, Any]) -> _NatsJob:
        offset, prompt = 0, 0
        try:
            from scheduler.validation import prompt_tokens_estimate, validate_input

            cargo = self.c.catalog.by_slug(cargo_slug)
            offset = 1 if cargo.runtime_type == "llmcpp" else 0
            prompt = prompt_tokens_estimate(validate_input(cargo, inp)) if kind == "chat" else 0
        except Exception:  # noqa: BLE001 - billing falls back to completion tokens only
            pass
        return _NatsJob(kind=kind, offset=offset, prompt_tokens=prompt, input=dict(inp),
                        started_ms=self.clock_ms())

    async def _status(self, h: _Host, msg: pn.JobStatus) -> None:
        job_id, state = msg.job_id, msg.state
        if state == "started":
            if job_id in h.jobs:
                return  # a redelivered assignment ran again on the agent: applied once
            h.offered.pop(job_id, None)
            kind = await self.start_job(h.host_id, job_id)
            job_uuid = self.job_uuid(job_id)
            live = self.scheduler.core.live_job(job_uuid)
            if live is not None:
                cargo, inp = live.cargo, live.input
            else:
                view = await self.scheduler.aget_job(job_uuid)
                cargo, inp = (view.cargo, view.input) if view is not None else ("", {})
            h.jobs[job_id] = self._new_state(kind, cargo, inp)
            self.stats["started"] += 1
        elif state == "streaming":
            await self._job(h, job_id)
        elif state == "succeeded":
            await self._succeeded(h, job_id)
        elif state in ("failed", "cancelled"):
            await self._failed(h, job_id, state, msg.error or state)
        else:
            raise Refused("bad_message", f"unknown state {state[:32]!r}")

    async def _succeeded(self, h: _Host, job_id: str) -> None:
        st = await self._job(h, job_id)
        if st.kind == "chat":
            completion = st.completion_tokens if st.completion_tokens is not None else st.tokens
            usage = {"prompt_tokens": st.prompt_tokens, "completion_tokens": max(0, completion)}
        else:
            usage = {"steps": int(st.input.get("steps") or 0)}
        compute_ms = max(0, self.clock_ms() - st.started_ms)
        try:
            status, billed, charged = await self.complete_job(h.host_id, st, job_id, usage, compute_ms)
        except Refused as r:
            if r.code == "not_your_job":
                h.jobs.pop(job_id, None)
            raise
        h.jobs.pop(job_id, None)
        self.forget(job_id, h.host_id)
        self.stats["completed"] += 1
        log.info("island_job_completed", transport="nats", island_id=h.host_id, job_id=job_id, usage=billed,
                 charged_micro=charged, status=status)

    async def _failed(self, h: _Host, job_id: str, state: str, error: str) -> None:
        st = h.jobs.get(job_id)
        if st is None:
            try:
                st = await self._job(h, job_id)
            except Refused:
                if state == "cancelled":
                    return  # the answer to our cancel: nothing left to do
                raise
        streamed = self.streamed(h.host_id, job_id, st)
        st.finishing = True
        try:
            status = await self.fail_job(h.host_id, job_id, error[:500] or state, retryable=True, streamed=streamed)
        finally:
            h.jobs.pop(job_id, None)
            self.forget(job_id, h.host_id)
        self.stats["failed"] += 1
        log.info("island_job_failed", transport="nats", island_id=h.host_id, job_id=job_id, reason=error[:200],
                 streamed=streamed, status=status)

    async def _output(self, h: _Host, msg: pn.JobOutput) -> None:
        st = await self._job(h, msg.job_id)
        if st.kind != "chat":
            if msg.is_final and not msg.chunk:
                return  # the container runtime ends every Job with an empty final chunk, images too
            raise Refused("bad_message", "output chunks belong to chat jobs")
        if st.final_seen:
            raise Refused("bad_sequence", "output after the final chunk")
        if msg.seq == 0 and st.offset == 0 and await self.state.last_seq(msg.job_id, h.host_id) == 0:
            st.offset = 1  # a runtime counting from 0 (llmcpp)
        if len(msg.chunk) > MAX_CHUNK_CHARS:
            raise Refused("too_large", f"at most {MAX_CHUNK_CHARS} characters per chunk")
        seq = msg.seq + st.offset
        if msg.is_final:
            await self.advance(h.host_id, msg.job_id, seq, NONE, "")
            st.final_seen = True
            if msg.chunk:
                st.completion_tokens = _done_tokens(msg.chunk)
            return
        await self.advance(h.host_id, msg.job_id, seq, APPEND, msg.chunk)
        self.text_out(h.host_id, st, msg.job_id, msg.chunk, 1)

    async def _progress(self, h: _Host, msg: pn.JobProgress) -> None:
        st = await self._job(h, msg.job_id)
        self.check_progress(msg.step, msg.total)
        if msg.step <= st.last_step:
            raise Refused("bad_sequence", f"progress step {msg.step} after {st.last_step}")
        st.last_step = msg.step
        self.publisher.publish_progress(msg.job_id, msg.step, msg.total)

    async def _image(self, h: _Host, msg: pn.JobImage) -> None:
        st = await self._job(h, msg.job_id)
        seed = msg.seed or 0
        self.check_image(st, msg.image_data, msg.format, msg.width, msg.height, seed, MAX_IMAGE_B64)
        result = msgspec.json.encode({"image_data": msg.image_data, "format": msg.format, "width": msg.width,
                                      "height": msg.height, "seed": seed}).decode()
        # the image has no seq on NATS: it is the attempt's one REPLACE (a replay is a bad sequence)
        await self.advance(h.host_id, msg.job_id, 1, REPLACE, result)
        st.streamed = True
        self.publisher.publish_image(msg.job_id, msg.image_data, msg.format, width=msg.width, height=msg.height,
                                     seed=seed)

    async def _lease(self, h: _Host, msg: pn.LeaseRenewal) -> None:
        await self._job(h, msg.job_id)
        self.renew(h.host_id, [msg.job_id])

    async def _heartbeat(self, h: _Host, hb: pn.Heartbeat) -> None:
        perf = hb.performance_estimates
        rec = self.scheduler.core.registry.islands.get(h.host_id)
        caps = dict(rec.capabilities) if rec is not None else {}
        slots = (perf.max_concurrent_containers if perf and perf.max_concurrent_containers else None) \
            or caps.get("slots", 1)
        load = int(min(100.0, max(0.0, hb.system.cpu_percent)) * 10) if hb.system else 0
        if hb.gpus:
            load = max(load, max(min(100, max(0, g.utilization_percent)) for g in hb.gpus) * 10)
        rtt = int(perf.nats_rtt_ms) if perf and perf.nats_rtt_ms is not None else None
        warm: list[str] | None = None
        if hb.cache is not None:
            warm = self._warm_models(hb.cache.warm_workload_ids[:256])
        self.heartbeat(h.host_id, slots, load, rtt, warm)
        self._lease_from_heartbeat(h, hb.active_jobs)
        await self._refresh_caps(h, hb, caps)
        if hb.asking_prices is not None:
            await self._asks(h, hb.asking_prices)
        self.stats["heartbeats"] += 1

    def _warm_models(self, workload_ids: list[str]) -> list[str]:
        out: list[str] = []
        for wid in workload_ids:
            try:
                cargo = self.c.catalog.by_slug(str(wid))
            except Exception:  # noqa: BLE001 - a workload we do not know
                continue
            out.extend(cargo.models or [cargo.model])
        return sorted(set(out))

    def _lease_from_heartbeat(self, h: _Host, active_jobs: int) -> None:
        """The agent renews leases only for container and WASM Jobs; llmcpp and diffusers
        Jobs are kept alive by its heartbeats (decision 0057): while it reports at least as
        many active Jobs as we have running on it, all of them are renewed. A heartbeat
        saying none is active means the Jobs started well before it were lost."""
        if not h.jobs:
            return
        if active_jobs >= len(h.jobs):
            self.renew(h.host_id, list(h.jobs))
        elif active_jobs == 0:
            now = self.clock_ms()
            for job_id, st in list(h.jobs.items()):
                if not st.finishing and now - st.started_ms > LOST_AFTER_S * 1000:
                    h.jobs.pop(job_id, None)
                    self.forget(job_id, h.host_id)
                    asyncio.get_running_loop().create_task(self.return_lost(
                        h.host_id, uuid.UUID(job_id), st.streamed, "the Island reports no active job"))

    async def _refresh_caps(self, h: _Host, hb: pn.Heartbeat, caps: dict[str, Any]) -> None:
        if not caps:
            return
        now = time.monotonic()
        if now - h.last_caps_s < CAPS_REFRESH_MIN_S:
            return
        h.last_caps_s = now
        new = dict(caps)
        perf = hb.performance_estimates
        if hb.system is not None and hb.system.memory_total_mb > 0:
            new["ram_mb"] = min(100_000_000, hb.system.memory_total_mb)
        if hb.gpus:
            new["vram_mb"] = min(10_000_000, max(g.memory_total_mb for g in hb.gpus))
        if perf is not None:
            if perf.supported_runtimes:
                new.update(self.serving(perf.supported_runtimes))
            if perf.max_concurrent_containers:
                new["slots"] = max(1, min(1024, perf.max_concurrent_containers))
            new["hardware_tier"] = tier_for(perf.estimated_llm_tok_s)
        if new != caps:
            from scheduler import commands as cmd
            from scheduler.registry import BadCapabilities, parse_capabilities

            try:
                clean = parse_capabilities({**new, "asks": {}})
            except BadCapabilities as exc:
                log.warning("nats_capabilities_refused", island_id=h.host_id, error=str(exc))
                return
            clean["asks_micro"] = caps.get("asks_micro", {})
            if clean != caps:
                await self.c.committer.aexecute(lambda uow: cmd.set_capabilities_in(uow, uuid.UUID(h.host_id), clean))
                log.info("island_capabilities_changed", transport="nats", island_id=h.host_id)

    async def _asks(self, h: _Host, prices: dict[str, str]) -> None:
        """`asking_prices` into the exchange (`Scheduler.aset_asking_prices`, which writes
        `Island.AsksChanged` only on a real change), when they changed since the last
        heartbeat; a bad map is refused once, not on every heartbeat."""
        from scheduler.market import BadAsk

        prices = {str(k)[:128]: str(v)[:32] for k, v in list(prices.items())[:64]}
        if h.last_asks == prices:
            return
        h.last_asks = prices
        try:
            if await self.scheduler.aset_asking_prices(uuid.UUID(h.host_id), prices, by="island"):
                self.stats["asks_changed"] += 1
        except BadAsk as exc:
            self._refuse(h, "heartbeat", "", "bad_asks", str(exc)[:300])

    def serving(self, runtimes: list[str]) -> dict[str, Any]:
        """The Cargos (and their models) an agent with these runtimes can run."""
        allowed = set(runtimes)
        cargos = [c for c in self.c.catalog if c.runtime_type in allowed]
        models: set[str] = set()
        for c in cargos:
            models.update(c.models or [c.model])
        return {"cargos": sorted(c.slug for c in cargos)[:64], "models": sorted(models)[:256]}

    # ------------------------------------------------------------ registration and pairing
    def _island_known(self, host_id: str) -> bool:
        return host_id in self.scheduler.core.registry.islands

    async def _register(self, msg: Any) -> None:
        reg = pn.decode_register(msg.data)
        host_id = reg.host_id
        if not _canonical_uuid(host_id):
            self.stats["register_bad_host_id"] += 1
            return
        self.stats["registers"] += 1
        if self._island_known(host_id):
            # A paired Island's register is only a restart/reconnect notice: anyone holding the
            # public pairing credential may publish here, so it never changes a paired record
            # (its capabilities come from its own authenticated heartbeats; decision 0055).
            return
        await self.pairing.remember(PendingIsland(host_id=host_id, capabilities=self.registration_caps(reg),
                                                  agent_version=reg.version[:64]))

    def registration_caps(self, reg: pn.RegisterHost) -> dict[str, Any]:
        c = reg.capabilities
        caps: dict[str, Any] = {"cpu_cores": max(1, min(4096, c.cpu_cores)), "ram_mb": max(0, min(100_000_000, c.ram_mb)),
                                "vram_mb": max(0, min(10_000_000, c.gpu_vram_mb or 0)),
                                "gpu_model": (c.gpu_model or "")[:64], "region": (c.region or "unknown")[:64],
                                "slots": 1, "transport": "nats"}
        caps.update(self.serving(["container", "wasm"]))
        return caps

    async def _pairing(self, msg: Any) -> None:
        async def reply(resp: pn.PairingResponse) -> None:
            if msg.reply:
                await self.nc.publish(msg.reply, pn.encode(resp))

        try:
            req = pn.decode_pairing(msg.data)
        except pn.DecodeErrors:
            await reply(pn.PairingResponse(success=False, error="bad pairing request: host_id is required"))
            raise
        host_id = req.host_id
        self.stats["pairing_requests"] += 1
        if not _canonical_uuid(host_id):
            await reply(pn.PairingResponse(success=False, error="host_id must be a lower-case UUID"))
            return
        if self._island_known(host_id):
            await reply(pn.PairingResponse(success=False, error="this host is already paired"))
            return
        try:
            issued = await self.pairing.issue(PendingIsland(host_id=host_id, capabilities={}))
        except PairingRefused as exc:
            await reply(pn.PairingResponse(success=False, error=exc.reason))
            return
        await reply(pn.PairingResponse(success=True, code=issued.code, expires_in_seconds=issued.expires_in_s,
                                       pair_url=self.settings.pair_url or None))
        log.info("island_pairing_code_issued", host_id=host_id, expires_in_s=issued.expires_in_s)

    # ------------------------------------------------------------ authorization config
    def approved_users(self) -> list[tuple[str, str]]:
        out = []
        for island_id, rec in list(self.scheduler.core.registry.islands.items()):
            if rec.approved and rec.nats_password_hash and rec.capabilities.get("transport") == "nats":
                out.append((island_id, rec.nats_password_hash))
        return out

    def sync_auth(self, users: list[tuple[str, str]] | None = None) -> bool:
        """Write the authorization include from the approved NATS Islands (`users`, read
        now if not given); reload if it changed."""
        if self.settings.auth_file is None:
            return False
        if self._fixed_users is None:  # bcrypt is slow on purpose: the two fixed users are hashed once
            _, user, password = pn.split_url(self.settings.url)
            self._fixed_users = (
                nats_auth.NatsUser(user or "coordinator", nats_auth.stable_hash(password or "")),
                nats_auth.NatsUser(self.settings.pairing_user, nats_auth.stable_hash(self.settings.pairing_password)))
        coordinator, pairing = self._fixed_users
        text = nats_auth.render(coordinator, pairing, self.approved_users() if users is None else users)
        if not nats_auth.write_if_changed(self.settings.auth_file, text):
            return False
        self.stats["auth_reloads"] += 1
        nats_auth.reload(self.settings.pid_file)
        return True

    async def _auth_loop(self) -> None:
        key = None
        while True:
            await asyncio.sleep(self.settings.auth_sync_s)
            try:
                users = self.approved_users()
                fp = hash(tuple(sorted(users)))
                if fp != key:
                    await asyncio.to_thread(self.sync_auth, users)
                    key = fp  # what the file now holds
            except Exception:  # noqa: BLE001 - retried next period
                log.exception("nats_auth_sync_failed")


def tier_for(tok_s: float | None) -> int:
    if tok_s is None:
        return 0
    for threshold, tier in TIER_TOK_S:
        if tok_s >= threshold:
            return tier
    return 0


def _done_tokens(chunk: str) -> int | None:
    """llmcpp's final chunk: `{"type":"done","usage":{"completion_tokens":N}}`."""
    try:
        done = msgspec.json.decode(chunk)
        n = done.get("usage", {}).get("completion_tokens") if isinstance(done, dict) else None
        return n if isinstance(n, int) and n >= 0 else None
    except (msgspec.DecodeError, AttributeError):
        return None


def _canonical_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except (ValueError, TypeError, AttributeError):
        return False


def build_nats_link(coordinator: Any, channel: Any, settings: NatsSettings, pairing: Any) -> NatsLink:
    """The NATS transport on the channel's bus and stream state (one bus per process)."""
    return NatsLink(coordinator, channel.publisher, channel.bus, channel.state, settings, pairing)
