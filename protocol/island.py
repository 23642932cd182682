"""The Island channel's wire format (docs/ISLANDS.md): msgspec structs, one JSON text
frame per message, tagged by `type`. Shared by the coordinator (islandlink/channel.py)
and the reference agent (island/), which imports nothing else of ours.

Versioning: the agent states `protocol` in its `hello`; the coordinator accepts
MIN_PROTOCOL_VERSION..PROTOCOL_VERSION and closes with 4426 otherwise. Within a version,
fields are only ever added with defaults and unknown fields are ignored, so an older
agent keeps working against a newer coordinator (and the other way round).

Sequence numbers: `output`, `progress` and `image` of one Job attempt form one ordered
stream numbered 1, 2, 3, ... The coordinator applies number n only right after n-1
(a replay or a gap is refused and logged); after a reconnect `welcome.jobs[].last_seq`
tells the agent where to resume.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import msgspec

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
CHANNEL_PATH = "/api/v1/islands/channel"
TOKEN_PREFIX = "it_"

# Close codes (RFC 6455 private range 4000-4999) the agent acts on.
CLOSE_PROTOCOL_ERROR = 4400  # too many malformed messages, or a bad hello: fix the agent
CLOSE_UNAUTHORIZED = 4401  # bad or unknown token: do not retry with it
CLOSE_REPLACED = 4409  # the same Island connected again elsewhere: this connection is obsolete
CLOSE_HELLO_TIMEOUT = 4408  # no hello in time
CLOSE_UNSUPPORTED_VERSION = 4426  # upgrade the agent
FATAL_CLOSE_CODES = frozenset({CLOSE_PROTOCOL_ERROR, CLOSE_UNAUTHORIZED, CLOSE_UNSUPPORTED_VERSION})

# Bounds the coordinator enforces on one message.
MAX_TOKENS_PER_OUTPUT = 4_096
MAX_OUTPUT_TEXT_CHARS = 256 * 1024
MAX_IMAGE_B64_CHARS = 8 * 1024 * 1024 - 4096  # the completed Job stores it (commands.MAX_OUTPUT_CHARS)
MAX_REASON_CHARS = 500
MAX_RENEW_JOBS = 1_024


# ------------------------------------------------------------------ tokens
def make_token(island_id: uuid.UUID) -> str:
    """A self-identifying Island token: `it_<island id hex>_<256-bit secret>`; the id part
    finds the Island without an index, only the SHA-256 of the whole token is stored."""
    return f"{TOKEN_PREFIX}{island_id.hex}_{secrets.token_urlsafe(32)}"


def token_island_id(token: str) -> uuid.UUID | None:
    """The Island id a token names (None if it is not shaped like an Island token)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 256:
        return None
    hex_id, sep, secret = token[len(TOKEN_PREFIX):].partition("_")
    if not sep or len(hex_id) != 32 or len(secret) < 16:
        return None
    try:
        return uuid.UUID(hex=hex_id)
    except ValueError:
        return None


# ------------------------------------------------------------------ shared parts
class Capabilities(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the Island serves and has (same fields as registration; asks are credits
    per Job as decimal strings, e.g. {"llm-chat": "4.5"})."""

    cargos: list[str] = []
    models: list[str] = []
    vram_mb: int = 0
    ram_mb: int = 0
    cpu_cores: int = 1
    gpu_model: str = ""
    region: str = "unknown"
    platform: str = "linux"
    hardware_tier: int = 0
    slots: int = 1
    asks: dict[str, str] = {}

    def to_dict(self) -> dict[str, Any]:
        return {"cargos": list(self.cargos), "models": list(self.models), "vram_mb": self.vram_mb,
                "ram_mb": self.ram_mb, "cpu_cores": self.cpu_cores, "gpu_model": self.gpu_model,
                "region": self.region, "platform": self.platform, "hardware_tier": self.hardware_tier,
                "slots": self.slots, "asks": dict(self.asks)}


class ResumeJob(msgspec.Struct, kw_only=True):
    """A Job the agent still holds when it (re)connects."""

    job_id: str
    next_seq: int = 1  # the next stream number the agent would send (informational)


class JobResume(msgspec.Struct, kw_only=True):
    """The coordinator's answer for a Job named in `hello.running`: `running` = go on,
    resending every stream message after `last_seq`; `gone` = the Job is no longer yours
    (finished, lapsed, cancelled): drop it."""

    job_id: str
    status: str
    last_seq: int = 0


class _Msg(msgspec.Struct, tag_field="type", kw_only=True):
    pass


# ------------------------------------------------------------------ Island -> coordinator
class Hello(_Msg, tag="hello", kw_only=True):
    protocol: int
    agent: str = ""
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    running: list[ResumeJob] = []


class Heartbeat(_Msg, tag="heartbeat", kw_only=True):
    seq: int = 0
    slots_total: int = 1
    free_slots: int = 1
    warm_models: list[str] = []
    load_permille: int = 0
    rtt_ms: int | None = None
    draining: bool = False
    running: list[str] = []
    # The Island's asking prices, slug | "_default" -> decimal string of credits per the
    # Cargo's billing unit (docs/EXCHANGE.md); applied only when it changed.
    asking_prices: dict[str, str] | None = None


class Accept(_Msg, tag="accept", kw_only=True):
    job_id: str


class Reject(_Msg, tag="reject", kw_only=True):
    job_id: str
    reason: str = ""


class Renew(_Msg, tag="renew", kw_only=True):
    job_ids: list[str]


class Output(_Msg, tag="output", kw_only=True):
    job_id: str
    seq: int
    tokens: list[str]


class Progress(_Msg, tag="progress", kw_only=True):
    job_id: str
    seq: int
    step: int
    total: int


class ImageResult(_Msg, tag="image", kw_only=True):
    job_id: str
    seq: int
    image_b64: str
    format: str = "png"
    width: int
    height: int
    seed: int


class Complete(_Msg, tag="complete", kw_only=True):
    job_id: str
    usage: dict[str, int]  # chat: prompt_tokens, completion_tokens; image: steps
    compute_ms: int = 0


class Fail(_Msg, tag="fail", kw_only=True):
    job_id: str
    reason: str
    retryable: bool = False


class Bye(_Msg, tag="bye", kw_only=True):
    reason: str = ""


IslandMessage = Hello | Heartbeat | Accept | Reject | Renew | Output | Progress | ImageResult | Complete | Fail | Bye
STREAM_MESSAGES = (Output, Progress, ImageResult)


# ------------------------------------------------------------------ coordinator -> Island
class Welcome(_Msg, tag="welcome", kw_only=True):
    protocol: int
    island_id: str
    name: str
    approval: str  # approved | pending | suspended (only approved Islands get offers)
    heartbeat_interval_ms: int
    lease_ms: int
    lease_renew_ms: int
    ack_timeout_ms: int
    server_time_ms: int
    jobs: list[JobResume] = []


class Offer(_Msg, tag="offer", kw_only=True):
    job_id: str
    cargo: str
    model: str
    kind: str  # chat | image
    input: dict[str, Any]
    ack_deadline_ms: int  # coordinator clock (epoch ms)
    ack_timeout_ms: int  # the same as a duration, for agents whose clock differs
    lease_ms: int


class Accepted(_Msg, tag="accepted", kw_only=True):
    job_id: str
    lease_ms: int


class Cancel(_Msg, tag="cancel", kw_only=True):
    job_id: str
    reason: str  # cancelled | lease_lapsed | reassigned | offer_expired | failed | ...


class Finished(_Msg, tag="finished", kw_only=True):
    """Acknowledges `complete` / `fail`: the Job's outcome is committed."""

    job_id: str
    status: str  # completed | failed | queued (re-queued for another Island)


class HeartbeatAck(_Msg, tag="heartbeat_ack", kw_only=True):
    seq: int
    server_time_ms: int


class Error(_Msg, tag="error", kw_only=True):
    """A refused message (nothing was applied). `code`: bad_message, not_your_job,
    bad_sequence, too_large, bad_usage, missing_result, unsupported_version, ..."""

    code: str
    message: str
    job_id: str = ""
    seq: int = 0


ServerMessage = Welcome | Offer | Accepted | Cancel | Finished | HeartbeatAck | Error


# ------------------------------------------------------------------ codecs
_encoder = msgspec.json.Encoder()
_island_decoder = msgspec.json.Decoder(IslandMessage)
_server_decoder = msgspec.json.Decoder(ServerMessage)


def encode(msg: _Msg) -> str:
    return _encoder.encode(msg).decode()


def decode_island(data: str | bytes) -> IslandMessage:
    """Raises msgspec.DecodeError / msgspec.ValidationError on anything malformed."""
    return _island_decoder.decode(data)


def decode_server(data: str | bytes) -> ServerMessage:
    return _server_decoder.decode(data)


def ws_url(server: str) -> str:
    """The channel URL from a coordinator base URL (http(s)://host:port[/] or ws(s)://...)."""
    base = server.rstrip("/")
    if base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    elif base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif not base.startswith(("ws://", "wss://")):
        base = "ws://" + base
    if base.endswith(CHANNEL_PATH):
        return base
    return base + CHANNEL_PATH
