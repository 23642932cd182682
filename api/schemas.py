"""Wire types: one msgspec Struct per request and response body of the HTTP API.

Requests are decoded (and so validated for shape and types) once, at the boundary, by
Litestar from these structs; the domain (scheduler.admission) validates the Job `input`
itself. Responses are built from these structs and encoded with `encode` (credits are
`Decimal`s written as JSON numbers, times are ISO-8601 strings with a UTC offset).

Contract: /work/shared/api-contract.md (the `archipelag` SDK) and OpenAI's chat
completions shape for api/openai_compat.py.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

MAX_BATCH_INPUTS = 100
MAX_KEY_NAME_CHARS = 100
MAX_LIST_LIMIT = 100

_ENCODER = msgspec.json.Encoder(decimal_format="number")


def encode(obj: Any) -> bytes:
    """JSON bytes; Decimals as numbers (never through a float)."""
    return _ENCODER.encode(obj)


def iso(dt: datetime | None) -> str | None:
    """ISO-8601 with an explicit offset (`+00:00`), readable by every `fromisoformat`."""
    return None if dt is None else dt.isoformat()


# ------------------------------------------------------------------ requests
Region = str | list[str]


class CreateJobRequest(msgspec.Struct, kw_only=True):
    """POST /api/v1/jobs. `input` is checked by the Cargo's validator (422 per field)."""

    workload: Annotated[str, Meta(min_length=1, max_length=64)]
    input: dict[str, Any]
    region: Region | None = None
    regions: list[str] | None = None
    platform: Region | None = None
    min_hardware_tier: int | None = None
    max_latency_ms: int | None = None
    bid_price: str | None = None

    def prefs(self) -> dict[str, Any]:
        return {k: v for k, v in (("region", self.region), ("regions", self.regions), ("platform", self.platform),
                                  ("min_hardware_tier", self.min_hardware_tier),
                                  ("max_latency_ms", self.max_latency_ms), ("bid_price", self.bid_price))
                if v is not None}


class CreateBatchRequest(msgspec.Struct, kw_only=True):
    """POST /api/v1/jobs/batch."""

    workload: Annotated[str, Meta(min_length=1, max_length=64)]
    inputs: Annotated[list[dict[str, Any]], Meta(min_length=1, max_length=MAX_BATCH_INPUTS)]
    merge_strategy: Literal["concat", "flatten"] = "concat"
    fail_mode: Literal["best_effort", "fail_fast"] = "best_effort"
    max_parallelism: Annotated[int, Meta(ge=1, le=MAX_BATCH_INPUTS)] | None = None
    region: Region | None = None
    bid_price: str | None = None

    def prefs(self) -> dict[str, Any]:
        return {k: v for k, v in (("region", self.region), ("bid_price", self.bid_price)) if v is not None}


class CreateApiKeyRequest(msgspec.Struct, kw_only=True):
    """POST /api/v1/api-keys. Scopes default to read and write; no expiry by default."""

    name: Annotated[str, Meta(min_length=1, max_length=MAX_KEY_NAME_CHARS)]
    scopes: Annotated[list[Literal["read", "write"]], Meta(min_length=1, max_length=2)] | None = None
    expires_at: datetime | None = None


# ------------------------------------------------------------------ responses
class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    credits_used: Decimal
    steps: int | UnsetType = UNSET  # image Jobs: diffusion steps billed


class JobOut(msgspec.Struct, kw_only=True):
    """A Job (the contract's fields first; the rest are documented extras)."""

    id: str
    workload_id: int
    workload_slug: str
    status: str
    input: dict[str, Any]
    output: str | None
    error: str | None
    created_at: str
    started_at: str | None
    completed_at: str | None
    duration_ms: int | None
    usage: Usage | None
    # extras
    model: str | None = None
    island_id: str | None = None
    island_name: str | None = None
    tokens_per_second: Decimal | None = None
    credits_held: Decimal = Decimal(0)
    credits_charged: Decimal = Decimal(0)
    attempts: int = 0
    parent_id: str | None = None
    batch_index: int | None = None
    is_batch: bool = False
    # the Compute Exchange (docs/EXCHANGE.md): rates in credits per the Cargo's billing unit
    budget: Decimal | None = None
    budget_source: str | None = None  # bid | preference | market | list
    clearing_price: Decimal | None = None  # once assigned


class JobEnvelope(msgspec.Struct):
    data: JobOut


class JobListEnvelope(msgspec.Struct):
    data: list[JobOut]


class AccountOut(msgspec.Struct, kw_only=True):
    id: str
    email: str
    credits: Decimal
    created_at: str
    held: Decimal
    spent: Decimal
    kyc_verified: bool
    suspended: bool
    free_tier_remaining: Decimal
    low_balance: bool


class AccountEnvelope(msgspec.Struct):
    data: AccountOut


class WorkloadOut(msgspec.Struct, kw_only=True):
    id: int
    name: str
    slug: str
    description: str
    runtime_type: str
    required_vram_mb: int
    required_ram_mb: int
    price_per_job: Decimal
    is_enabled: bool
    # extras
    kind: str = "chat"
    default_model: str = ""
    models: list[str] = []
    requires_kyc: bool = False
    free_tier: bool = True


class WorkloadEnvelope(msgspec.Struct):
    data: WorkloadOut


class WorkloadListEnvelope(msgspec.Struct):
    data: list[WorkloadOut]


class ApiKeyOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    prefix: str
    created_at: str
    last_used_at: str | None
    expires_at: str | None
    scopes: list[str]
    revoked_at: str | None = None


class ApiKeyEnvelope(msgspec.Struct):
    data: ApiKeyOut


class ApiKeyListEnvelope(msgspec.Struct):
    data: list[ApiKeyOut]


class ApiKeyCreatedOut(ApiKeyOut, kw_only=True):
    """The created key, readable by all three published clients at once (decision 0053):
    the Python SDK reads `ApiKey(**body.data)` and `body.key`; the JavaScript SDK unwraps
    `data` and reads `.data` and `.key` inside it; the CLI reads `data.api_key` and
    `data.key`. Extra keys are ignored by each of them."""

    api_key: ApiKeyOut
    data: ApiKeyOut
    key: str


class ApiKeyCreated(msgspec.Struct):
    data: ApiKeyCreatedOut
    key: str

    @classmethod
    def of(cls, key: ApiKeyOut, secret: str) -> ApiKeyCreated:
        fields = msgspec.structs.asdict(key)
        return cls(ApiKeyCreatedOut(**fields, api_key=key, data=key, key=secret), secret)


class BatchChildOut(msgspec.Struct, kw_only=True):
    id: str
    batch_index: int
    state: str
    error: str | None
    host_id: str | None


class BatchInfo(msgspec.Struct, kw_only=True):
    chunk_count: int
    merge_strategy: str
    fail_mode: str
    completed: int
    failed: int
    cancelled: int = 0
    running: int = 0
    max_parallelism: int | None = None


class BatchJobOut(msgspec.Struct, kw_only=True):
    id: str
    state: str
    workload: str
    batch: BatchInfo
    children: list[BatchChildOut]
    created_at: str


class BatchProgressOut(msgspec.Struct, kw_only=True):
    parent_id: str
    parent_state: str
    chunk_count: int
    merge_strategy: str
    fail_mode: str
    child_states: dict[str, int]
    children: list[BatchChildOut]


class HealthOut(msgspec.Struct, kw_only=True):
    status: Literal["ok", "degraded"]
    database: str
    broker: str
    store: str
    version: str


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    code: str
    required: Decimal | UnsetType = UNSET
    available: Decimal | UnsetType = UNSET


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error: `{"error": {...}}`, plus `errors` by field on 422."""

    error: ErrorDetail
    errors: dict[str, list[str]] | UnsetType = UNSET


# ------------------------------------------------------------------ OpenAI-compatible
class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessageIn(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1, max_length=128)]
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1, max_length=128)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    bid_price: str | None = None  # extension (the Compute Exchange): most credits per billing unit


class ChatMessageOut(msgspec.Struct, kw_only=True):
    role: str
    content: str | None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    credits_used: Decimal | UnsetType = UNSET


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: str | None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: ChatUsage | None = None


class ModelOut(msgspec.Struct, kw_only=True):
    """An OpenAI model entry, plus the network's `workload_slug` (the Cargo that serves it)
    and `online_hosts` (approved online Islands serving it now); the `openai` client
    ignores fields it does not know."""

    id: str
    object: str = "model"
    created: int
    owned_by: str
    workload_slug: str = ""
    online_hosts: int = 0


class JobImageOut(msgspec.Struct, kw_only=True):
    image_data: str
    format: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None


class JobOutputOut(msgspec.Struct, kw_only=True):
    """GET /jobs/{id}/output: `output` as on the Job (text; an image Job's JSON string),
    `kind` text|image and, for an image, the parsed `image`."""

    job_id: str
    status: str
    kind: str
    output: str | None
    image: JobImageOut | None
    error: str | None
    usage: Usage | None
    completed_at: str | None


class JobOutputEnvelope(msgspec.Struct):
    data: JobOutputOut


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelOut]
