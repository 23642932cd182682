"""The NATS wire format of the published Island agent (archipelag-io/island, Rust,
`src/nats.rs`), as listed in /work/shared/island-nats-protocol.md: subjects and JSON
payloads. Shared by the coordinator's NATS transport (islandlink/nats.py) and the
reference agent's NATS mode (island/nats_agent.py). Imports nothing of ours.

Decoding follows serde's rules as the agent uses them: unknown fields are ignored,
`Option` fields may be absent or null, required fields are required. Every struct has
an explicit bound on its strings and lists where the coordinator keeps them."""

from __future__ import annotations

import re
from typing import Any

import msgspec

# ------------------------------------------------------------------ subjects and JetStream
REGISTER = "coordinator.hosts.register"
PAIRING = "coordinator.hosts.pairing"
STREAM = "JOBS"
STREAM_SUBJECTS = ["host.*.jobs"]
ISLAND_SUBJECTS = ("heartbeat", "status", "output", "progress", "image", "lease", "ping")  # Island -> us
COORDINATOR_SUBJECTS = ("jobs", "cancel", "preload", "probe")  # us (or peers) -> Island
CONSUMER_MAX_DELIVER = 5
CONSUMER_ACK_WAIT_S = 60
LEASE_EXTEND_S = 60  # what the agent asks for in each renewal
LEASE_RENEW_EVERY_S = 30  # how often the agent renews (container and WASM runtimes)
HEARTBEAT_EVERY_S = 10
PING_TIMEOUT_S = 5
STATES = ("started", "streaming", "succeeded", "failed", "cancelled")
MAX_HOST_ID = 64
_HOST_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")  # NATS subject token and user name safe; the agent slices [..8]


def subject(host_id: str, what: str) -> str:
    return f"host.{host_id}.{what}"


def consumer_name(host_id: str) -> str:
    return f"host-{host_id}"


def nats_user(host_id: str) -> str:
    return f"host-{host_id}"


def host_of(subj: str) -> tuple[str, str] | None:
    """`host.{id}.{what}` -> (id, what); None for any other shape."""
    parts = subj.split(".")
    if len(parts) != 3 or parts[0] != "host" or not parts[1]:
        return None
    return parts[1], parts[2]


def valid_host_id(host_id: str) -> bool:
    return isinstance(host_id, str) and bool(_HOST_ID.match(host_id))


def split_url(url: str) -> tuple[str, str | None, str | None]:
    """The agent's own credential parsing (`parse_nats_url`): split at the first `@`,
    user up to the first `:`, no percent-decoding. -> (url without credentials, user, pass)."""
    at = url.find("@")
    if at < 0:
        return url, None, None
    scheme_end = url.find("://")
    scheme_end = scheme_end + 3 if scheme_end >= 0 else 0
    userinfo = url[scheme_end:at]
    rest = url[:scheme_end] + url[at + 1:]
    colon = userinfo.find(":")
    if colon < 0:
        return rest, None, None
    return rest, userinfo[:colon], userinfo[colon + 1:]


# ------------------------------------------------------------------ Island -> coordinator
class HostCapabilities(msgspec.Struct, kw_only=True):
    cpu_cores: int
    ram_mb: int
    gpu_model: str | None = None
    gpu_vram_mb: int | None = None
    region: str | None = None


class RegisterHost(msgspec.Struct, kw_only=True):
    host_id: str
    capabilities: HostCapabilities
    version: str = ""


class PairingRequest(msgspec.Struct, kw_only=True):
    host_id: str


class PairingResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    success: bool
    code: str | None = None
    expires_in_seconds: int | None = None
    pair_url: str | None = None
    error: str | None = None


class SystemMetrics(msgspec.Struct, kw_only=True):
    cpu_percent: float = 0.0
    memory_used_mb: int = 0
    memory_total_mb: int = 0
    disk_used_gb: int = 0
    disk_total_gb: int = 0


class GpuMetrics(msgspec.Struct, kw_only=True):
    index: int = 0
    utilization_percent: int = 0
    memory_used_mb: int = 0
    memory_total_mb: int = 0
    temperature_c: int = 0
    power_draw_w: float = 0.0


class ActiveJobMetrics(msgspec.Struct, kw_only=True):
    job_id: str
    job_type: str = ""
    duration_ms: int = 0
    tokens_generated: int | None = None
    memory_mb: int | None = None
    gpu_memory_mb: int | None = None


class CacheMetrics(msgspec.Struct, kw_only=True):
    cached_image_count: int = 0
    cached_size_mb: int = 0
    warm_workload_count: int = 0
    warm_workload_ids: list[str] = []


class PerformanceEstimates(msgspec.Struct, kw_only=True):
    gpu_bandwidth_gb_s: float | None = None
    estimated_llm_tok_s: float | None = None
    max_concurrent_containers: int | None = None
    wasm_memory_limit_mb: int | None = None
    supported_runtimes: list[str] = []
    nats_rtt_ms: float | None = None
    public_addr: str | None = None


class Heartbeat(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`EnhancedHeartbeat`."""

    host_id: str
    status: str
    active_jobs: int
    timestamp: int  # ms
    agent_version: str = ""
    system: SystemMetrics | None = None
    gpus: list[GpuMetrics] | None = None
    active_job_metrics: list[ActiveJobMetrics] | None = None
    cache: CacheMetrics | None = None
    performance_estimates: PerformanceEstimates | None = None
    asking_prices: dict[str, str] | None = None  # Cargo slug (or "_default") -> decimal credits


class JobStatus(msgspec.Struct, kw_only=True, omit_defaults=True):
    job_id: str
    state: str
    timestamp: int = 0  # ms
    error: str | None = None


class JobOutput(msgspec.Struct, kw_only=True):
    job_id: str
    seq: int
    chunk: str
    is_final: bool


class JobProgress(msgspec.Struct, kw_only=True):
    job_id: str
    step: int
    total: int


class JobImage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`JobImageOutput`."""

    job_id: str
    image_data: str  # base64
    format: str
    width: int
    height: int
    seed: int | None = None


class LeaseRenewal(msgspec.Struct, kw_only=True):
    job_id: str
    extend_seconds: int


# ------------------------------------------------------------------ coordinator -> Island
class AssignJob(msgspec.Struct, kw_only=True, omit_defaults=True):
    job_id: str
    input: dict[str, Any]
    lease_expires: int  # Unix seconds; required by the agent
    workload_id: str | int | None = None  # the Cargo slug; never a float
    runtime_type: str = "container"
    container_image: str | None = None
    image_digest: str | None = None
    wasm_url: str | None = None
    wasm_hash: str | None = None
    model_url: str | None = None
    model_hash: str | None = None
    model_context_size: int | None = None
    model_temperature: float | None = None
    onnx_model_url: str | None = None
    onnx_model_hash: str | None = None
    onnx_task_type: str | None = None
    sandbox_tier: str | None = None
    pipeline_config: Any = None
    expert_config: Any = None
    speculative_config: Any = None
    training_config: Any = None


class CancelJob(msgspec.Struct, kw_only=True):
    job_id: str


class PreloadRecommendation(msgspec.Struct, kw_only=True, omit_defaults=True):
    workload_slug: str
    runtime_type: str
    type: str | None = "preload"
    model_url: str | None = None
    model_hash: str | None = None
    estimated_earnings_per_job: str | None = None  # decimal credits
    queued_demand: int | None = None
    demand_score: int | None = None
    priority: str | None = None


# ------------------------------------------------------------------ codecs
ISLAND_PAYLOADS: dict[str, type] = {"heartbeat": Heartbeat, "status": JobStatus, "output": JobOutput,
                                    "progress": JobProgress, "image": JobImage, "lease": LeaseRenewal}
_decoders = {name: msgspec.json.Decoder(t) for name, t in ISLAND_PAYLOADS.items()}
_register_dec = msgspec.json.Decoder(RegisterHost)
_pairing_dec = msgspec.json.Decoder(PairingRequest)
_pairing_reply_dec = msgspec.json.Decoder(PairingResponse)
_assign_dec = msgspec.json.Decoder(AssignJob)
_cancel_dec = msgspec.json.Decoder(CancelJob)
_preload_dec = msgspec.json.Decoder(PreloadRecommendation)
_enc = msgspec.json.Encoder()

DecodeErrors = (msgspec.DecodeError, msgspec.ValidationError)


def encode(msg: Any) -> bytes:
    return _enc.encode(msg)


def decode_island(what: str, data: bytes) -> Any:
    """A payload on `host.{id}.{what}` (what in ISLAND_PAYLOADS). Raises DecodeErrors."""
    return _decoders[what].decode(data)


def decode_register(data: bytes) -> RegisterHost:
    return _register_dec.decode(data)


def decode_pairing(data: bytes) -> PairingRequest:
    return _pairing_dec.decode(data)


def decode_pairing_reply(data: bytes) -> PairingResponse:
    return _pairing_reply_dec.decode(data)


def decode_assign(data: bytes) -> AssignJob:
    return _assign_dec.decode(data)


def decode_cancel(data: bytes) -> CancelJob:
    return _cancel_dec.decode(data)


def decode_preload(data: bytes) -> PreloadRecommendation:
    return _preload_dec.decode(data)
