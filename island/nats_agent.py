"""The reference Island agent over NATS JetStream: the published Rust agent's protocol
(archipelag-io/island `src/nats.rs` / `src/agent.rs`; protocol/nats.py), with the
reference backends (echo, openai, image). It is the coordinator's conformance peer for
the NATS transport, so it does what the Rust agent does, in the same order:

1. connect (client name `island-<first 8 of id>`, reconnect forever, ping every 10 s,
   connection timeout 10 s; user and password taken from the URL as the agent does);
2. publish `coordinator.hosts.register`;
3. unless paired (state file), one `coordinator.hosts.pairing` request: a code is
   printed; an error containing "already paired" marks the state paired;
4. the JetStream pull consumer `host-{id}` on stream `JOBS` (looked up, created if
   missing: durable, filter `host.{id}.jobs`, explicit ack, max_deliver 5, ack_wait 60 s);
   each message is acked on receipt, before it is parsed; without JetStream, a core
   subscription on the same subject;
5. subscriptions on `host.{id}.cancel`, `host.{id}.probe` (answers "pong") and
   `host.{id}.preload`;
6. every 10 s: a `host.{id}.ping` request (5 s timeout; RTT) then the heartbeat;
7. per Job: `started`, `streaming` (first token), output chunks with `seq` from 1, the
   final empty chunk `is_final` at last+1, `succeeded`; `failed` with an error;
   `cancelled` on cancel; a lease renewal `{job_id, extend_seconds: 60}` every 30 s.

Unlike the Rust agent it remembers the Job ids it ran (bounded), so a redelivered
assignment is not run twice (the coordinator applies nothing twice either way)."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from protocol import nats as pn

log = structlog.get_logger("island.nats")

MAX_REMEMBERED_JOBS = 10_000


@dataclass
class NatsAgentConfig:
    url: str  # nats://user:pass@host:port
    backends: list[Any]  # island/backends.py backends; the first whose `kinds` has the Job's kind runs it
    host_id: str = ""  # "" -> from the state file, or a new UUID persisted there
    state_dir: Path | None = None  # where state.json (host_id, paired) lives; None: memory only
    cpu_cores: int = 8
    ram_mb: int = 32_768
    gpu_model: str | None = None
    gpu_vram_mb: int | None = None
    region: str | None = None
    version: str = "0.4.0-reference"
    heartbeat_s: float = pn.HEARTBEAT_EVERY_S
    lease_every_s: float = pn.LEASE_RENEW_EVERY_S
    asking_prices: dict[str, str] | None = None
    supported_runtimes: list[str] = field(default_factory=lambda: ["container", "wasm"])
    max_concurrent: int | None = None
    estimated_llm_tok_s: float | None = None
    fetch_batch: int = 200
    use_jetstream: bool = True


class _Ctx:
    """The JobContext a backend sees (island/backends.py)."""

    def __init__(self, agent: NatsIslandAgent, job: pn.AssignJob, kind: str) -> None:
        self._agent = agent
        self.job_id = job.job_id
        self.cargo = str(job.workload_id or "")
        self.model = str(job.input.get("model") or "")
        self.kind = kind
        self.input = job.input
        self.seq = 0
        self.streaming = False

    def token(self, text: str) -> None:
        if not self.streaming:
            self.streaming = True
            self._agent._status(self.job_id, "streaming")
        self.seq += 1  # the container runtime: `seq += 1` before each publish, so from 1
        self._agent._pub("output", pn.JobOutput(job_id=self.job_id, seq=self.seq, chunk=text, is_final=False))

    def progress(self, step: int, total: int) -> None:
        self._agent._pub("progress", pn.JobProgress(job_id=self.job_id, step=step, total=total))

    def image(self, png: bytes, *, width: int, height: int, seed: int, fmt: str = "png") -> None:
        self._agent._pub("image", pn.JobImage(job_id=self.job_id, image_data=base64.b64encode(png).decode(),
                                              format=fmt, width=width, height=height, seed=seed))


class NatsIslandAgent:
    def __init__(self, config: NatsAgentConfig) -> None:
        self.config = config
        self.state: dict[str, Any] = self._load_state()
        if config.host_id:
            self.state["host_id"] = config.host_id
        self.host_id = self.state.setdefault("host_id", str(uuid.uuid4()))
        self._save_state()
        self.nc: Any = None
        self.running: dict[str, asyncio.Task] = {}
        self.seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.pairing_code: str | None = None
        self.pairing_reply: pn.PairingResponse | None = None
        self.rtt_ms: float | None = None
        self.jetstream = False
        self.stats: collections.Counter = collections.Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.ready = asyncio.Event()
        self._outq: asyncio.Queue | None = None

    # ------------------------------------------------------------ state.json
    def _state_file(self) -> Path | None:
        return self.config.state_dir / "state.json" if self.config.state_dir else None

    def _load_state(self) -> dict[str, Any]:
        f = self._state_file()
        if f is not None and f.exists():
            try:
                return json.loads(f.read_text())
            except ValueError:
                pass
        return {}

    def _save_state(self) -> None:
        f = self._state_file()
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(self.state))

    @property
    def paired(self) -> bool:
        return bool(self.state.get("paired"))

    # ------------------------------------------------------------ run
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        import nats

        url, user, password = pn.split_url(self.config.url)
        opts: dict[str, Any] = {"user": user, "password": password} if user is not None else {}

        async def on_error(exc: Exception) -> None:
            self.stats["nats_errors"] += 1
            log.warning("island_nats_error", error=repr(exc)[:200])

        async def on_reconnect() -> None:
            self.stats["reconnects"] += 1
            self._pub_raw(pn.REGISTER, self._register())  # the agent re-registers on recovery

        self.nc = await nats.connect(servers=[url], name=f"island-{self.host_id[:8]}", connect_timeout=10,
                                     ping_interval=10, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                     allow_reconnect=True, error_cb=on_error, reconnected_cb=on_reconnect, **opts)
        try:
            await self.nc.publish(pn.REGISTER, pn.encode(self._register()))
            await self._check_pairing()
            await self._subscribe_jobs()
            await self.nc.subscribe(pn.subject(self.host_id, "cancel"), cb=self._on_cancel)
            await self.nc.subscribe(pn.subject(self.host_id, "probe"), cb=self._on_probe)
            await self.nc.subscribe(pn.subject(self.host_id, "preload"), cb=self._on_preload)
            self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeats()))
            self.ready.set()
            await self._stop.wait()
        finally:
            for t in [*self._tasks, *self.running.values()]:
                t.cancel()
            try:
                await asyncio.wait_for(self.nc.drain(), 3)
            except Exception:  # noqa: BLE001
                await self.nc.close()
        return 0

    def _register(self) -> pn.RegisterHost:
        c = self.config
        return pn.RegisterHost(host_id=self.host_id, version=c.version, capabilities=pn.HostCapabilities(
            cpu_cores=c.cpu_cores, ram_mb=c.ram_mb, gpu_model=c.gpu_model, gpu_vram_mb=c.gpu_vram_mb,
            region=c.region))

    async def _check_pairing(self) -> None:
        if self.paired:
            return
        try:
            msg = await self.nc.request(pn.PAIRING, pn.encode(pn.PairingRequest(host_id=self.host_id)), timeout=10)
            resp = pn.decode_pairing_reply(msg.data)
        except Exception as exc:  # noqa: BLE001 - the agent logs and carries on
            log.debug("island_pairing_request_failed", error=repr(exc))
            return
        self.pairing_reply = resp
        if resp.success and resp.code:
            self.pairing_code = resp.code
            log.warning("ISLAND PAIRING CODE: " + resp.code, pair_url=resp.pair_url,
                        expires_in_min=(resp.expires_in_seconds or 0) // 60)
        elif not resp.success and resp.error and "already paired" in resp.error:
            self.state.update(paired=True, account_id=None, paired_at=str(int(time.time())))
            self._save_state()
        elif resp.error:
            log.warning("island_pairing_refused", error=resp.error)

    async def _subscribe_jobs(self) -> None:
        subj = pn.subject(self.host_id, "jobs")
        if self.config.use_jetstream:
            try:
                await self._jetstream(subj)
                self.jetstream = True
                return
            except Exception as exc:  # noqa: BLE001 - as the agent: fall back to core NATS
                log.warning("island_jetstream_subscribe_failed", error=repr(exc)[:200])
        await self.nc.subscribe(subj, cb=self._on_core_job)

    async def _jetstream(self, subj: str) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig

        js = self.nc.jetstream(timeout=5)
        await js.stream_info(pn.STREAM)  # the agent never creates the stream
        name = pn.consumer_name(self.host_id)
        try:
            await js.consumer_info(pn.STREAM, name)
        except Exception:  # noqa: BLE001 - missing (or any error): create it
            await js.add_consumer(pn.STREAM, ConsumerConfig(
                durable_name=name, name=name, ack_policy=AckPolicy.EXPLICIT, filter_subject=subj,
                max_deliver=pn.CONSUMER_MAX_DELIVER, ack_wait=float(pn.CONSUMER_ACK_WAIT_S)))
        sub = await js.pull_subscribe_bind(durable=name, stream=pn.STREAM)
        self._tasks.append(asyncio.get_running_loop().create_task(self._fetch(sub)))

    async def _fetch(self, sub: Any) -> None:
        from nats.errors import TimeoutError as NatsTimeout

        while True:
            try:
                msgs = await sub.fetch(self.config.fetch_batch, timeout=5)
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnecting: try again
                log.debug("island_fetch_failed", error=repr(exc)[:200])
                await asyncio.sleep(0.5)
                continue
            for m in msgs:
                try:
                    await m.ack()  # ack-on-receipt, before parsing (the agent's order)
                except Exception as exc:  # noqa: BLE001
                    log.warning("island_ack_failed", error=repr(exc)[:200])
                self._on_job_data(m.data)

    async def _on_core_job(self, msg: Any) -> None:
        self._on_job_data(msg.data)

    def _on_job_data(self, data: bytes) -> None:
        try:
            job = pn.decode_assign(data)
        except pn.DecodeErrors as exc:
            self.stats["bad_assignments"] += 1
            log.error("island_bad_assignment", error=str(exc)[:200])  # acked already: the Job is lost here
            return
        if job.job_id in self.seen:
            self.stats["redelivered"] += 1
            return
        self.seen[job.job_id] = None
        if len(self.seen) > MAX_REMEMBERED_JOBS:
            self.seen.popitem(last=False)
        self.stats["assigned"] += 1
        self.running[job.job_id] = asyncio.get_running_loop().create_task(self._run_job(job))

    async def _run_job(self, job: pn.AssignJob) -> None:
        kind = "image" if ("steps" in job.input and "width" in job.input) else "chat"
        backend = next((b for b in self.config.backends if kind in getattr(b, "kinds", {"chat"})), None)
        ctx = _Ctx(self, job, kind)
        lease = asyncio.get_running_loop().create_task(self._lease(job.job_id))
        try:
            self._status(job.job_id, "started")
            if backend is None:
                raise RuntimeError(f"no backend for {kind} jobs")
            await backend.run(ctx)
            self._pub("output", pn.JobOutput(job_id=job.job_id, seq=ctx.seq + 1, chunk="", is_final=True))
            self._status(job.job_id, "succeeded")
            self.stats["succeeded"] += 1
        except asyncio.CancelledError:
            self._status(job.job_id, "cancelled")
            self.stats["cancelled"] += 1
        except Exception as exc:  # noqa: BLE001 - BackendError and friends: the Job failed
            self._status(job.job_id, "failed", error=str(getattr(exc, "reason", exc))[:500])
            self.stats["failed"] += 1
        finally:
            lease.cancel()
            self.running.pop(job.job_id, None)

    async def _lease(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.config.lease_every_s)  # the first tick is skipped, as the agent does
            self._pub("lease", pn.LeaseRenewal(job_id=job_id, extend_seconds=pn.LEASE_EXTEND_S))

    async def _on_cancel(self, msg: Any) -> None:
        try:
            job_id = pn.decode_cancel(msg.data).job_id
        except pn.DecodeErrors:
            return  # the agent ignores an unparsable cancel
        task = self.running.get(job_id)
        if task is not None:
            self.stats["cancel_received"] += 1
            task.cancel()

    async def _on_probe(self, msg: Any) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, b"pong")

    async def _on_preload(self, msg: Any) -> None:
        try:
            rec = pn.decode_preload(msg.data)
        except pn.DecodeErrors:
            return
        self.stats["preloads"] += 1
        log.info("island_preload_recommended", workload=rec.workload_slug, runtime=rec.runtime_type)

    # ------------------------------------------------------------ heartbeats
    async def _heartbeats(self) -> None:
        while True:
            await self._measure_rtt()
            self._pub("heartbeat", self.heartbeat())
            await asyncio.sleep(self.config.heartbeat_s)

    async def _measure_rtt(self) -> None:
        start = time.perf_counter()
        try:
            await self.nc.request(pn.subject(self.host_id, "ping"), b"ping", timeout=pn.PING_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - as the agent: time a flush instead
            start = time.perf_counter()
            try:
                await self.nc.flush(timeout=pn.PING_TIMEOUT_S)
            except Exception:  # noqa: BLE001
                return
        self.rtt_ms = (time.perf_counter() - start) * 1000

    def heartbeat(self) -> pn.Heartbeat:
        c = self.config
        warm = sorted({m for b in c.backends for m in _warm_cargos(b)})
        slots = c.max_concurrent or max(1, sum(getattr(b, "slots", 1) for b in c.backends))
        return pn.Heartbeat(
            host_id=self.host_id, status="online", active_jobs=len(self.running), timestamp=int(time.time() * 1000),
            agent_version=c.version,
            system=pn.SystemMetrics(cpu_percent=min(100.0, 10.0 * len(self.running)), memory_used_mb=1024,
                                    memory_total_mb=c.ram_mb, disk_used_gb=10, disk_total_gb=100),
            gpus=[pn.GpuMetrics(index=0, utilization_percent=min(100, 25 * len(self.running)), memory_used_mb=0,
                                memory_total_mb=c.gpu_vram_mb, temperature_c=40, power_draw_w=50.0)]
            if c.gpu_vram_mb else None,
            cache=pn.CacheMetrics(cached_image_count=0, cached_size_mb=0, warm_workload_count=len(warm),
                                  warm_workload_ids=warm),
            performance_estimates=pn.PerformanceEstimates(
                estimated_llm_tok_s=c.estimated_llm_tok_s, max_concurrent_containers=slots,
                wasm_memory_limit_mb=c.ram_mb * 3 // 4, supported_runtimes=list(c.supported_runtimes),
                nats_rtt_ms=self.rtt_ms),
            asking_prices=dict(c.asking_prices) if c.asking_prices else None)

    # ------------------------------------------------------------ publishing
    def _status(self, job_id: str, state: str, error: str | None = None) -> None:
        self._pub("status", pn.JobStatus(job_id=job_id, state=state, error=error, timestamp=int(time.time() * 1000)))

    def _pub(self, what: str, msg: Any) -> None:
        self._pub_raw(pn.subject(self.host_id, what), msg)

    def _pub_raw(self, subject: str, msg: Any) -> None:
        """In order, through one sender (backends call this synchronously)."""
        if self.nc is None:
            return
        if self._outq is None:
            self._outq = asyncio.Queue(maxsize=100_000)
            self._tasks.append(asyncio.get_running_loop().create_task(self._sender(self._outq)))
        try:
            self._outq.put_nowait((subject, pn.encode(msg)))
        except asyncio.QueueFull:
            self.stats["publish_dropped"] += 1

    async def _sender(self, q: asyncio.Queue) -> None:
        while True:
            subject, data = await q.get()
            try:
                await self.nc.publish(subject, data)
            except Exception as exc:  # noqa: BLE001 - the agent only logs a failed publish
                log.warning("island_publish_failed", subject=subject, error=repr(exc)[:200])


def _warm_cargos(backend: Any) -> list[str]:
    caps = backend.default_capabilities()
    return list(caps.cargos)


def state_dir_default() -> Path:
    return Path(os.environ.get("HOME", ".")) / ".archipelag"
