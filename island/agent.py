"""The reference Island agent: connects out to the coordinator's Island channel
(WebSocket, docs/ISLANDS.md), announces itself, takes offered Jobs, runs them on a
backend (island/backends.py) and streams their output back.

- Reconnects with exponential backoff and full jitter (0.5 s doubling up to 30 s; reset
  once a connection is welcomed); re-announces itself and the Jobs it still holds; the
  coordinator answers where each Job's stream resumes and the agent resends what it
  had not received (`seq` numbers make that exactly-once).
- Renews the lease of every Job it runs every `lease_renew_ms` (from `welcome`).
- A Job keeps running through a short disconnect; its output waits in the Job's outbox.
- Stop (Ctrl-C / SIGTERM / `request_stop()`): no new offers (heartbeats say `draining`,
  offers are rejected), running Jobs get `grace_s` to finish, then the rest are
  returned (`fail`, retryable: re-queued if nothing was streamed yet); a second stop
  returns them at once. Then `bye` and exit.

Use it in-process (`await IslandAgent(config).run()`, several on one loop) or as
`coordinator island run --server URL --token T --backend echo|openai|image`.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from protocol import island as p
from island.backends import Backend, BackendError

log = structlog.get_logger("island")

EXIT_OK = 0
EXIT_FATAL = 3
EXIT_REPLACED = 4

OFFERED, ACCEPTING, RUNNING, FINISHING = "offered", "accepting", "running", "finishing"


@dataclass
class AgentConfig:
    server: str
    token: str
    backend: Backend
    capabilities: p.Capabilities | None = None  # None: the backend's defaults
    agent_name: str = "archipelag-reference-island/0.1"
    batch_ms: float = 40.0  # tokens are sent in batches at most this old ...
    batch_tokens: int = 32  # ... or this large
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    grace_s: float = 30.0  # on stop: how long running Jobs may finish before they are returned
    connect_timeout_s: float = 10.0
    max_message_bytes: int = 16 * 1024 * 1024
    jitter_seed: int | None = None


@dataclass
class _Job:
    offer: p.Offer
    state: str = OFFERED
    next_seq: int = 1
    outbox: list[Any] = field(default_factory=list)  # every stream message of this attempt, in seq order
    final: Any = None  # the Complete / Fail to (re)send until `finished` arrives
    task: asyncio.Task | None = None
    pending: list[str] = field(default_factory=list)  # tokens not yet batched
    flush_handle: asyncio.TimerHandle | None = None
    started: float = 0.0
    returning: bool = False


class _Ctx:
    """The JobContext a backend sees."""

    def __init__(self, agent: IslandAgent, job: _Job) -> None:
        self._agent = agent
        self._job = job
        o = job.offer
        self.job_id, self.cargo, self.model, self.kind, self.input = o.job_id, o.cargo, o.model, o.kind, o.input

    def token(self, text: str) -> None:
        self._agent._token(self._job, text)

    def progress(self, step: int, total: int) -> None:
        self._agent._flush(self._job)  # keep tokens ahead of what follows them
        self._agent._stream(self._job, lambda seq: p.Progress(job_id=self.job_id, seq=seq, step=step, total=total))

    def image(self, png: bytes, *, width: int, height: int, seed: int, fmt: str = "png") -> None:
        self._agent._flush(self._job)
        data = base64.b64encode(png).decode()
        self._agent._stream(self._job, lambda seq: p.ImageResult(job_id=self.job_id, seq=seq, image_b64=data,
                                                                 format=fmt, width=width, height=height, seed=seed))


class IslandAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.backend = config.backend
        self.capabilities = config.capabilities or self.backend.default_capabilities()
        self.url = p.ws_url(config.server)
        self.jobs: dict[str, _Job] = {}
        self.ws: Any = None
        self._outq: asyncio.Queue[str] | None = None
        self._rng = random.Random(config.jitter_seed)
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._finished = asyncio.Event()
        self.draining = False
        self.island_id = ""
        self.welcome: p.Welcome | None = None
        self.connected = asyncio.Event()
        self.exit_code = EXIT_OK
        self._hb_seq = 0
        self._hb_sent: dict[int, float] = {}
        self.rtt_ms: int | None = None
        self.stats = {"connects": 0, "offers": 0, "accepted": 0, "rejected": 0, "completed": 0, "failed": 0,
                      "cancelled": 0, "returned": 0, "refused": 0}
        self.errors: list[p.Error] = []
        self.cancels: list[p.Cancel] = []

    # ------------------------------------------------------------ control
    def request_stop(self, force: bool = False) -> None:
        """First call: drain (finish or return running Jobs, then exit); second call or
        force: return every running Job now."""
        if self._stop.is_set() or force:
            self._force.set()
        if not self._stop.is_set():
            log.info("island_stopping", island_id=self.island_id, running=len(self.jobs), grace_s=self.config.grace_s)
        self._stop.set()
        self.draining = True
        self._send_heartbeat()

    @property
    def slots(self) -> int:
        return max(1, self.capabilities.slots)

    async def run(self) -> int:
        """Connect, serve, reconnect, until stopped (exit code 0) or refused for good."""
        delay = self.config.backoff_initial_s
        drainer = asyncio.create_task(self._drain_on_stop(), name="island-drain")
        try:
            while not self._done():
                welcomed = False
                session = asyncio.create_task(self._session(), name="island-session")
                finished = asyncio.create_task(self._finished.wait())
                await asyncio.wait({session, finished}, return_when=asyncio.FIRST_COMPLETED)
                finished.cancel()
                if not session.done():  # stopped while connecting (or closing): a moment to end cleanly
                    try:
                        await asyncio.wait_for(session, 2.0)
                    except BaseException:  # noqa: BLE001 - inspected below
                        pass
                exc = session.exception() if session.done() and not session.cancelled() else None
                if isinstance(exc, _Fatal):
                    self.exit_code = exc.code
                    log.error("island_refused", reason=str(exc), code=exc.code)
                    break
                if isinstance(exc, (OSError, asyncio.TimeoutError, msgspec.DecodeError)):
                    log.warning("island_connect_failed", url=self.url, error=repr(exc))
                elif exc is not None:  # websockets' own errors, handshake refusals
                    log.warning("island_connection_lost", url=self.url, error=repr(exc))
                elif session.done() and not session.cancelled():
                    welcomed = session.result()
                if self._done():
                    break
                if welcomed:
                    delay = self.config.backoff_initial_s
                sleep = self._rng.uniform(0, delay)  # full jitter
                log.info("island_reconnecting", in_s=round(sleep, 2))
                try:
                    await asyncio.wait_for(self._finished.wait(), sleep)
                except asyncio.TimeoutError:
                    pass
                delay = min(self.config.backoff_max_s, delay * 2)
        finally:
            drainer.cancel()
            for job in list(self.jobs.values()):
                if job.task is not None:
                    job.task.cancel()
            await self.backend.aclose()
        return self.exit_code

    def _done(self) -> bool:
        return self._finished.is_set() or self.exit_code != EXIT_OK

    # ------------------------------------------------------------ one connection
    async def _session(self) -> bool:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        headers = {"Authorization": f"Bearer {self.config.token}"}
        try:
            ws = await connect(self.url, additional_headers=headers, max_size=self.config.max_message_bytes,
                               open_timeout=self.config.connect_timeout_s, ping_interval=20, ping_timeout=20,
                               close_timeout=5)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise _Fatal(f"handshake refused with HTTP {status}", EXIT_FATAL) from None
            raise
        self.stats["connects"] += 1
        welcomed = False
        writer: asyncio.Task | None = None
        tasks: list[asyncio.Task] = []
        try:
            running = [p.ResumeJob(job_id=j.offer.job_id, next_seq=j.next_seq) for j in self.jobs.values()
                       if j.state in (ACCEPTING, RUNNING, FINISHING)]
            await ws.send(p.encode(p.Hello(protocol=p.PROTOCOL_VERSION, agent=self.config.agent_name,
                                           capabilities=self.capabilities, running=running)))
            first = p.decode_server(await asyncio.wait_for(ws.recv(), self.config.connect_timeout_s))
            if isinstance(first, p.Error):
                raise _Fatal(f"{first.code}: {first.message}", EXIT_FATAL)
            if not isinstance(first, p.Welcome):
                raise _Fatal(f"expected welcome, got {type(first).__name__}", EXIT_FATAL)
            welcomed = True
            self.welcome = first
            self.island_id = first.island_id
            self.ws = ws
            self._outq = asyncio.Queue()
            writer = asyncio.create_task(self._writer(ws, self._outq), name="island-writer")
            log.info("island_connected", island_id=first.island_id, approval=first.approval, url=self.url,
                     resumed=len(first.jobs))
            self._resume(first.jobs)
            self.connected.set()
            self._send_heartbeat()
            tasks = [asyncio.create_task(self._every(first.heartbeat_interval_ms / 1000, self._send_heartbeat)),
                     asyncio.create_task(self._every(first.lease_renew_ms / 1000, self._send_renew))]
            async for raw in ws:
                try:
                    msg = p.decode_server(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("island_unknown_message", error=str(exc)[:200])  # a newer coordinator: skip it
                    continue
                self._on_message(msg)
                if self._done():
                    break
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            if code in p.FATAL_CLOSE_CODES:
                raise _Fatal(f"closed by the coordinator: {code} {reason}", EXIT_FATAL) from None
            if code == p.CLOSE_REPLACED:
                raise _Fatal("another agent connected with this Island's token", EXIT_REPLACED) from None
            log.warning("island_disconnected", code=code, reason=reason)
        finally:
            self.connected.clear()
            self.ws = None
            self._outq = None
            for t in tasks:
                t.cancel()
            for job_id in [j for j, job in self.jobs.items() if job.state == OFFERED]:
                self.jobs.pop(job_id, None)  # unanswered offers die with the connection
            if writer is not None:
                writer.cancel()
            await ws.close()
        return welcomed

    async def _writer(self, ws: Any, queue: asyncio.Queue[str]) -> None:
        try:
            while True:
                await ws.send(await queue.get())
        except Exception:  # noqa: BLE001 - the reader notices the closed connection
            pass

    @staticmethod
    async def _every(period_s: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(max(0.05, period_s))
            fn()

    def _send(self, msg: Any) -> bool:
        if self._outq is None:
            return False
        self._outq.put_nowait(p.encode(msg))
        return True

    # ------------------------------------------------------------ coordinator messages
    def _resume(self, states: list[p.JobResume]) -> None:
        for st in states:
            job = self.jobs.get(st.job_id)
            if job is None:
                continue
            if st.status != "running":
                log.info("island_job_gone", job_id=st.job_id, status=st.status)
                self._drop(job, "gone")
                continue
            if job.state == ACCEPTING:
                self._start(job)
            for msg in job.outbox:
                if msg.seq > st.last_seq:
                    self._send(msg)
            if job.final is not None:
                self._send(job.final)

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, p.Offer):
            self._on_offer(msg)
        elif isinstance(msg, p.Accepted):
            job = self.jobs.get(msg.job_id)
            if job is not None and job.state == ACCEPTING:
                self._start(job)
        elif isinstance(msg, p.Cancel):
            self.cancels.append(msg)
            job = self.jobs.get(msg.job_id)
            if job is not None:
                log.info("job_cancelled", job_id=msg.job_id, reason=msg.reason)
                self.stats["cancelled"] += 1
                self._drop(job, msg.reason)
        elif isinstance(msg, p.Finished):
            job = self.jobs.pop(msg.job_id, None)
            if job is not None:
                key = "returned" if job.returning else "completed" if msg.status == "completed" else "failed"
                self.stats[key] += 1
                log.info("job_finished", job_id=msg.job_id, status=msg.status)
        elif isinstance(msg, p.HeartbeatAck):
            sent = self._hb_sent.pop(msg.seq, None)
            if sent is not None:
                self.rtt_ms = int((time.monotonic() - sent) * 1000)
            for old in [s for s in self._hb_sent if s < msg.seq]:
                del self._hb_sent[old]
        elif isinstance(msg, p.Error):
            self.errors.append(msg)
            self.stats["refused"] += 1
            log.warning("island_message_refused", code=msg.code, job_id=msg.job_id, seq=msg.seq, message=msg.message)
            job = self.jobs.get(msg.job_id) if msg.job_id else None
            if job is None:
                return
            if job.state == ACCEPTING or msg.code == "not_your_job":
                self._drop(job, msg.code)
            elif job.state == FINISHING and not msg.seq:
                if isinstance(job.final, p.Complete):  # the completion was refused: report a failure instead
                    job.final = p.Fail(job_id=job.offer.job_id, reason=f"completion refused: {msg.code}: "
                                       f"{msg.message}"[:p.MAX_REASON_CHARS], retryable=False)
                    self._send(job.final)
                else:
                    self._drop(job, msg.code)

    def _on_offer(self, offer: p.Offer) -> None:
        if offer.job_id in self.jobs:
            return  # a repeated offer (fast path and log fallback): already answered
        self.stats["offers"] += 1
        busy = sum(1 for j in self.jobs.values() if j.state != OFFERED)
        reason = ""
        if self.draining:
            reason = "draining"
        elif offer.kind not in self.backend.kinds:
            reason = f"this Island runs {sorted(self.backend.kinds)} Jobs"
        elif busy >= self.slots:
            reason = "no free slot"
        if reason:
            self.stats["rejected"] += 1
            log.info("offer_rejected", job_id=offer.job_id, reason=reason)
            self._send(p.Reject(job_id=offer.job_id, reason=reason))
            return
        job = _Job(offer=offer, state=ACCEPTING)
        self.jobs[offer.job_id] = job
        self.stats["accepted"] += 1
        self._send(p.Accept(job_id=offer.job_id))

    # ------------------------------------------------------------ running a Job
    def _start(self, job: _Job) -> None:
        job.state = RUNNING
        job.started = time.monotonic()
        log.info("job_started", job_id=job.offer.job_id, cargo=job.offer.cargo, model=job.offer.model)
        job.task = asyncio.create_task(self._run_job(job), name=f"job-{job.offer.job_id}")

    async def _run_job(self, job: _Job) -> None:
        job_id = job.offer.job_id
        try:
            usage = await self.backend.run(_Ctx(self, job))
            self._flush(job)
            final: Any = p.Complete(job_id=job_id, usage=usage,
                                    compute_ms=max(1, int((time.monotonic() - job.started) * 1000)))
        except asyncio.CancelledError:
            if not job.returning:
                return  # cancelled by the coordinator: nothing to report
            self._flush(job)
            final = p.Fail(job_id=job_id, reason="the Island is shutting down", retryable=True)
        except BackendError as exc:
            self._flush(job)
            final = p.Fail(job_id=job_id, reason=exc.reason[:p.MAX_REASON_CHARS], retryable=exc.retryable)
        except Exception as exc:  # noqa: BLE001 - a backend bug fails the Job, not the agent
            log.exception("backend_failed", job_id=job_id)
            self._flush(job)
            final = p.Fail(job_id=job_id, reason=f"backend error: {exc!r}"[:p.MAX_REASON_CHARS], retryable=True)
        job.final = final
        job.state = FINISHING
        self._send(final)

    def _token(self, job: _Job, text: str) -> None:
        if not text:
            return
        job.pending.append(text)
        if len(job.pending) >= self.config.batch_tokens:
            self._flush(job)
        elif job.flush_handle is None:
            job.flush_handle = asyncio.get_running_loop().call_later(self.config.batch_ms / 1000, self._flush, job)

    def _flush(self, job: _Job) -> None:
        if job.flush_handle is not None:
            job.flush_handle.cancel()
            job.flush_handle = None
        if job.pending:
            tokens, job.pending = job.pending, []
            self._stream(job, lambda seq: p.Output(job_id=job.offer.job_id, seq=seq, tokens=tokens))

    def _stream(self, job: _Job, make: Any) -> None:
        if job.state != RUNNING:
            return
        msg = make(job.next_seq)
        job.next_seq += 1
        job.outbox.append(msg)
        self._send(msg)

    def _drop(self, job: _Job, why: str) -> None:
        self.jobs.pop(job.offer.job_id, None)
        if job.flush_handle is not None:
            job.flush_handle.cancel()
        if job.task is not None and not job.task.done():
            job.task.cancel()

    # ------------------------------------------------------------ periodic
    def _send_heartbeat(self) -> None:
        if self._outq is None:
            return
        self._hb_seq += 1
        self._hb_sent[self._hb_seq] = time.monotonic()
        busy = sum(1 for j in self.jobs.values() if j.state in (ACCEPTING, RUNNING, FINISHING))
        self._send(p.Heartbeat(seq=self._hb_seq, slots_total=self.slots, free_slots=max(0, self.slots - busy),
                               warm_models=self.backend.warm_models(), load_permille=min(1000, busy * 1000 // self.slots),
                               rtt_ms=self.rtt_ms, draining=self.draining,
                               running=[j for j, job in self.jobs.items() if job.state in (RUNNING, FINISHING)]))

    def _send_renew(self) -> None:
        ids = [j for j, job in self.jobs.items() if job.state in (RUNNING, FINISHING)]
        if ids:
            self._send(p.Renew(job_ids=ids[:p.MAX_RENEW_JOBS]))

    async def _drain_on_stop(self) -> None:
        await self._stop.wait()
        deadline = time.monotonic() + self.config.grace_s
        while (any(j.state in (ACCEPTING, RUNNING) for j in self.jobs.values()) and not self._force.is_set()
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        for job in list(self.jobs.values()):
            if job.state == RUNNING and job.task is not None and not job.task.done():
                job.returning = True
                log.info("job_returned", job_id=job.offer.job_id)
                job.task.cancel()
            elif job.state in (OFFERED, ACCEPTING):
                self.jobs.pop(job.offer.job_id, None)
        # wait (briefly) for the coordinator to acknowledge the returned Jobs
        deadline = time.monotonic() + 5.0
        while self.jobs and self.ws is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._force.set()
        self._finished.set()
        if self.ws is not None:
            self._send(p.Bye(reason="stopping"))
            await asyncio.sleep(0.1)
        if self.ws is not None:
            try:
                await self.ws.close()
            except Exception:  # noqa: BLE001
                pass


class _Fatal(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


async def run_agents(configs: list[AgentConfig], stop: asyncio.Event | None = None) -> list[int]:
    """Several agents on one event loop (the demo); `stop` drains them all."""
    agents = [IslandAgent(c) for c in configs]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    if stop is not None:
        async def watch() -> None:
            await stop.wait()
            for a in agents:
                a.request_stop()

        watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*tasks)
    if stop is not None:
        watcher.cancel()
    return list(results)
