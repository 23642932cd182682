"""The transport-agnostic core of the Island link: the rules every transport applies to
what an Island says about a Job, on the same scheduler commands, ledger, karma and
routing inputs. `IslandChannel` (the WebSocket transport, islandlink/channel.py) and
`NatsLink` (the published agent's NATS protocol, islandlink/nats.py) are both this core
plus their own framing, authentication and delivery.

What the core owns:
- Job commands on behalf of an Island (start = accept, complete, fail, decline, return a
  lost Job), each re-reading the Job first when several processes share the store; the
  scheduler's commands refuse a forged Job id or a lease that moved;
- the per-attempt stream check (`islandlink/state.py`): a replayed or out-of-order `seq`
  is refused wherever it arrives; the output so far is the Job's result;
- publishing tokens, progress and images into the Job's SSE stream (streams/);
- live routing inputs (heartbeats, lease renewals, output progress) through the bus.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog

from islandlink.bus import MAX_OUTPUT_BYTES, HeartbeatNote, IslandBus, OutputNote, RenewNote
from islandlink.state import BAD_SEQUENCE, OK, REPLACE, ChannelState
from scheduler import commands as cmd
from scheduler.jobs import IllegalTransition

log = structlog.get_logger("islandlink.core")

REFUSED = (cmd.NotYourJob, cmd.UnknownJob, IllegalTransition)
MAX_IMAGE_SIDE = 8192


class StreamPublisher(Protocol):
    """What the link needs of the SSE stream broker (streams/broker.py `Publisher`)."""

    def publish_token(self, job_id: str, text: str) -> None: ...
    def publish_progress(self, job_id: str, step: int, total: int) -> None: ...
    def publish_image(self, job_id: str, image_b64: str, fmt: str = "png", **extra: Any) -> None: ...


@dataclass
class JobState:
    """A Job running on one Island, as the transport holding it sees it."""

    kind: str
    streamed: bool = False
    finishing: bool = False
    tokens: int = 0
    started_ms: int = 0


class Refused(Exception):
    """An Island's message that is refused and not applied (`code` names why)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LinkCore:
    def __init__(self, coordinator: Any, publisher: StreamPublisher, bus: IslandBus, state: ChannelState) -> None:
        self.c = coordinator
        self.scheduler = coordinator.scheduler
        self.config = coordinator.scheduler.config
        self.publisher = publisher
        self.bus = bus
        self.state = state

    def clock_ms(self) -> int:
        return self.c.clock.now_ms()

    # ------------------------------------------------------------ commands
    async def command(self, job_uuid: uuid.UUID, command: Any) -> Any:
        """An Island command on a Job. With several processes writing, the Job is first
        re-read from the store: a refusal (which writes nothing, so no version conflict
        would correct it) must never come from a stale cached copy, e.g. the Job this
        process created before the leader assigned it."""
        fresh = self.scheduler.shared_store

        def run(uow: Any) -> Any:
            if fresh:
                uow.get_or_none(job_uuid, fresh=True)
            return command(uow)

        return await self.c.committer.aexecute(run)

    @staticmethod
    def job_uuid(job_id: str) -> uuid.UUID:
        try:
            return uuid.UUID(job_id)
        except (ValueError, TypeError, AttributeError):
            raise Refused("not_your_job", f"no job {str(job_id)[:64]!r}") from None

    async def start_job(self, island_id: str, job_id: str) -> str:
        """The Island starts (accepts) an offered Job; its kind. Refused if not offered to it."""
        job_uuid = self.job_uuid(job_id)
        deadline = self.clock_ms() + self.config.lease_ms
        try:  # the Job aggregate decides (a follower's live view may lag behind the offer)
            kind = await self.command(job_uuid, lambda uow: cmd.accept_in(uow, job_uuid, island_id, deadline).kind)
        except REFUSED as exc:
            raise Refused("not_your_job", str(exc)) from None
        self.bus.claim_job(job_id, island_id)
        self.bus.live(RenewNote(island_id, [job_id]))  # other processes learn of the start at once
        return kind

    async def decline_job(self, island_id: str, job_id: str) -> None:
        job_uuid = self.job_uuid(job_id)
        try:
            await self.command(job_uuid, lambda uow: cmd.reject_in(uow, self.config, job_uuid, island_id))
        except REFUSED as exc:
            raise Refused("not_your_job", str(exc)) from None

    async def complete_job(self, island_id: str, st: JobState, job_id: str, usage: dict[str, Any],
                           compute_ms: int) -> tuple[str, dict[str, Any], int]:
        """Settlement, earning, fee and karma for the Job: (status, billed usage, charged).
        Refused (and the Job forgotten here) if it is no longer this Island's."""
        output = await self.state.result(job_id, island_id)
        if st.kind == "image" and not output:
            raise Refused("missing_result", "an image job completes after its image message")
        st.finishing = True
        job_uuid = self.job_uuid(job_id)
        try:
            return await self.command(job_uuid, lambda uow: _outcome(cmd.complete_in(
                uow, self.c.settings.ledger, self.config, self.c.catalog, job_uuid, island_id, usage, output or "",
                max(0, compute_ms))))
        except REFUSED as exc:
            self.forget(job_id, island_id)
            raise Refused("not_your_job", str(exc)) from None
        except cmd.BadUsage as exc:
            st.finishing = False
            raise Refused("bad_usage", str(exc)) from None

    async def fail_job(self, island_id: str, job_id: str, reason: str, *, retryable: bool, streamed: bool) -> str:
        """The Island reports failure: re-queued if retryable and nothing streamed, else
        failed with the hold released; karma either way. The Job's status after."""
        job_uuid = self.job_uuid(job_id)
        try:
            return await self.command(job_uuid, lambda uow: cmd.fail_in(
                uow, self.c.settings.ledger, self.config, job_uuid, island_id, reason, retryable=retryable,
                streamed=streamed).status)
        except REFUSED as exc:
            raise Refused("not_your_job", str(exc)) from None

    def streamed(self, island_id: str, job_id: str, st: JobState | None) -> bool:
        live = self.scheduler.core.live_job(self.job_uuid(job_id))
        return bool(st and st.streamed) or bool(live and live.island_id == island_id and live.streamed)

    async def return_lost(self, island_id: str, job_uuid: uuid.UUID, streamed: bool, why: str) -> None:
        try:
            status = await self.command(job_uuid, lambda uow: cmd.fail_in(
                uow, self.c.settings.ledger, self.config, job_uuid, island_id, why, retryable=True,
                streamed=streamed).status)
            log.info("island_lost_job_returned", island_id=island_id, job_id=str(job_uuid), status=status)
        except REFUSED:
            pass

    def forget(self, job_id: str, island_id: str) -> None:
        """The attempt is over here: its claim and its stream state go."""
        import asyncio

        self.bus.release_job(job_id)
        asyncio.get_running_loop().create_task(self.state.forget(job_id, island_id))

    # ------------------------------------------------------------ stream messages
    async def advance(self, island_id: str, job_id: str, seq: int, mode: str, data: str,
                      limit: int = MAX_OUTPUT_BYTES) -> None:
        if seq < 1:
            raise Refused("bad_sequence", "sequence numbers start at 1")
        code, last = await self.state.advance(job_id, island_id, seq, mode, data, limit)
        if code == OK:
            return
        if code == BAD_SEQUENCE:
            what = "a replay" if seq <= last else "a gap"
            raise Refused("bad_sequence", f"seq {seq} is {what}: the last accepted is {last}")
        raise Refused("too_large", f"the job's output would exceed {limit} bytes")

    def text_out(self, island_id: str, st: JobState, job_id: str, text: str, tokens: int) -> None:
        """After `advance` accepted it: into the Job's stream and the routing inputs."""
        st.streamed = True
        st.tokens += tokens
        if text:
            self.publisher.publish_token(job_id, text)
        self.bus.live(OutputNote(island_id, job_id, tokens))

    @staticmethod
    def check_progress(step: int, total: int) -> None:
        if not (0 <= step <= total <= 100_000):
            raise Refused("bad_message", "progress needs 0 <= step <= total")

    @staticmethod
    def check_image(st: JobState, image_b64: str, fmt: str, width: int, height: int, seed: int,
                    max_b64: int) -> None:
        if st.kind != "image":
            raise Refused("bad_message", "image results belong to image jobs")
        if len(image_b64) > max_b64:
            raise Refused("too_large", f"at most {max_b64} base64 characters per image")
        if fmt != "png" or not looks_like_png(image_b64):
            raise Refused("bad_message", "the image must be a base64 PNG")
        if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE and seed >= 0):
            raise Refused("bad_message", "bad image dimensions or seed")

    async def image_out(self, island_id: str, st: JobState, job_id: str, seq: int, image_b64: str, fmt: str,
                        width: int, height: int, seed: int) -> None:
        result = msgspec.json.encode({"image_data": image_b64, "format": fmt, "width": width, "height": height,
                                      "seed": seed}).decode()
        await self.advance(island_id, job_id, seq, REPLACE, result)
        st.streamed = True
        self.publisher.publish_image(job_id, image_b64, fmt, width=width, height=height, seed=seed)
        self.bus.live(OutputNote(island_id, job_id, 0))

    # ------------------------------------------------------------ live inputs
    def heartbeat(self, island_id: str, slots_total: int, load_permille: int, rtt_ms: int | None,
                  warm_models: list[str] | None) -> None:
        slots = max(0, min(1024, slots_total))
        rtt = rtt_ms if rtt_ms is not None and 0 <= rtt_ms < 600_000 else None
        self.bus.live(HeartbeatNote(island_id, slots, max(0, min(1000, load_permille)), rtt,
                                    None if warm_models is None else [m[:128] for m in warm_models[:256]]))

    def renew(self, island_id: str, job_ids: list[str]) -> None:
        if job_ids:
            self.bus.live(RenewNote(island_id, job_ids))


def _outcome(job: Any) -> tuple[str, dict[str, Any], int]:
    """Plain values out of the writer thread (never the aggregate itself)."""
    return job.status, dict(job.usage or {}), job.charged_micro


def looks_like_png(b64: str) -> bool:
    try:
        head = base64.b64decode(b64[:12], validate=True)
    except (ValueError, TypeError):
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n")
