"""OpenAI-compatible chat: `POST /v1/chat/completions` and `GET /v1/models` (also under
/api/v1), for the official `openai` client pointed at `base_url=<server>/v1`. The model
list is also the network endpoint of the contract: `GET /api/v1/models` lists every
enabled Cargo's models (chat first, then image models, which do not chat), `GET /v1/models`
only the chat models completions accept (decision 0017); both in the OpenAI list shape,
each entry with its `workload_slug` and `online_hosts` (decision 0052).

A completion is an ordinary chat Job (same admission, holds, billing, Islands and
errors; errors in OpenAI's shape). `model` selects the Cargo: a chat Cargo's slug (its
default model) or one of its model names. Non-streaming answers wait for the Job;
streaming answers relay its token events as `chat.completion.chunk`s and end with
`data: [DONE]`. `usage` (with `credits_used`, an extra) is in the final answer and, when
streaming, on the last chunk. A streaming client that hangs up cancels its Job (it is
charged only what was delivered). docs/decisions/0017-openai-compatibility.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec
import structlog
from litestar import MediaType, Request, Response, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from streams import frames as br
from api.errors import ApiError, validation_failed
from api.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChatUsage,
    ChunkChoice,
    ModelList,
    ModelOut,
    encode,
)
from scheduler.cargo import Cargo
from scheduler.jobs import TERMINAL
from scheduler.service import JobView

if TYPE_CHECKING:
    from api.services import ApiServices

log = structlog.get_logger("api.openai")

OWNED_BY = "archipelag"
MODEL_CREATED = 0  # catalog entries carry no creation time
POLL_S = 5.0
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


DEFAULT_MODEL = "default"  # what the published CLI always sends: the default chat Cargo
DEFAULT_CHAT_CARGO = "llm-chat"


def resolve_model(cargos: list[Cargo], model: str) -> tuple[Cargo, str]:
    if model == DEFAULT_MODEL:
        chosen = next((c for c in cargos if c.slug == DEFAULT_CHAT_CARGO), None) or \
            next((c for c in sorted(cargos, key=lambda c: (not c.enabled, c.id))), None)
        if chosen is not None:
            return chosen, chosen.model
    for cargo in cargos:
        if cargo.slug == model:
            return cargo, cargo.model
    for cargo in sorted(cargos, key=lambda c: (not c.enabled, c.id)):
        if model in cargo.models:
            return cargo, model
    raise ApiError(404, "model_not_found", f"the model {model[:128]!r} does not exist", errors={"model": ["unknown"]})


def chat_input(req: ChatCompletionRequest, model: str) -> dict[str, Any]:
    errors: dict[str, list[str]] = {}
    messages = []
    for i, m in enumerate(req.messages):
        role = ROLE_MAP.get(m.role)
        if role is None:
            errors.setdefault(f"messages[{i}].role", []).append(f"role {m.role!r} is not supported")
            continue
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    errors.setdefault(f"messages[{i}].content[{j}]", []).append("only text parts are supported")
                else:
                    texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        messages.append({"role": role, "content": content})
    if req.n not in (None, 1):
        errors.setdefault("n", []).append("only n=1 is supported")
    if errors:
        raise validation_failed(errors)
    out: dict[str, Any] = {"messages": messages, "model": model}
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if req.temperature is not None:
        out["temperature"] = req.temperature
    return out


def _usage(view: JobView) -> ChatUsage:
    u = br.usage_out("chat", view.usage, view.charged_micro)
    return ChatUsage(prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                     total_tokens=u["total_tokens"], credits_used=u["credits_used"])


def _finish_reason(view: JobView) -> str:
    max_tokens = int(view.input.get("max_tokens") or 0)
    completion = int((view.usage or {}).get("completion_tokens", 0))
    return "length" if max_tokens and completion >= max_tokens else "stop"


def job_error(view: JobView) -> ApiError:
    if view.status == "timeout":
        return ApiError(503, "no_capacity", view.error or "no Island was available", headers={"Retry-After": "30"})
    if view.status == "cancelled":
        return ApiError(409, "job_cancelled", view.error or "the job was cancelled")
    return ApiError(502, "job_failed", view.error or "the job failed")


def openai_handlers(services: ApiServices) -> list[Any]:
    c = services.coordinator
    sched = c.scheduler
    cache: dict[str, Any] = {"catalog": None}

    def current() -> dict[str, Any]:
        """Chat Cargos and the encoded model list, once per catalog version (kill switches
        make a new Catalog object); disabled Cargos are not listed but still resolve (409)."""
        catalog = sched.catalog
        if cache["catalog"] is not catalog:
            cargos = [cg for cg in catalog.all() if cg.kind == "chat"]
            entries: list[tuple[str, str, str | None, str]] = []  # (model id, Cargo slug, model name or None, kind)
            seen: set[str] = set()
            # chat Cargos first (their ids resolve for chat completions), then the others
            for cg in sorted(catalog.all(), key=lambda c: c.kind != "chat"):
                if not cg.enabled:
                    continue
                for name in [cg.slug, cg.model, *sorted(cg.models)]:
                    if name not in seen:
                        seen.add(name)
                        entries.append((name, cg.slug, None if name == cg.slug else name, cg.kind))
            cache.update(catalog=catalog, cargos=cargos, entries=entries)
        return cache

    def model_list(chat_only: bool) -> list[ModelOut]:
        """Models with the number of approved online Islands serving each now (from the
        dispatch core's live registry); `chat_only`: only what chat completions accept."""
        core = sched.core
        with core.lock:
            live = [(frozenset(r.capabilities.get("cargos", ())), frozenset(r.capabilities.get("models", ())))
                    for r in core.registry.islands.values() if r.online and r.approved]
        return [ModelOut(id=mid, created=MODEL_CREATED, owned_by=OWNED_BY, workload_slug=slug,
                         online_hosts=sum(1 for cargos, names in live
                                          if slug in cargos and (model is None or model in names)))
                for mid, slug, model, kind in current()["entries"] if not chat_only or kind == "chat"]

    async def wait_terminal(job_id: str, account_id: UUID, deadline: float) -> JobView:
        sub = services.broker.subscribe(job_id, None)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                entries = await sub.next(min(POLL_S, remaining))
                if entries is None or services.draining.is_set():
                    view = await sched.aget_job(UUID(job_id), account_id)
                    if view is not None and view.status in TERMINAL:
                        return view
                    continue
                if any(br.is_terminal(d) for _, d in entries):
                    break
        finally:
            sub.close()
        view = await sched.aget_job(UUID(job_id), account_id)
        assert view is not None
        return view

    @post(["/v1/chat/completions", "/api/v1/chat/completions"], status_code=200,
          summary="OpenAI-compatible chat completion")
    async def chat_completions(request: Request, data: JSONBody[ChatCompletionRequest]) -> Response[ChatCompletion]:
        account_id = request.user.account_id
        cargo, model = resolve_model(current()["cargos"], data.model)
        payload = chat_input(data, model)
        prefs = {"bid_price": data.bid_price} if data.bid_price is not None else None  # extension field
        view = await sched.asubmit(account_id, cargo.slug, payload, prefs, idempotency_key=request.scope.get(
            "idempotency_key"))
        completion_id = f"chatcmpl-{view.id}"
        created = int(view.created_at.timestamp())
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return Stream(_stream(services, view, account_id, completion_id, created, data.model, include_usage),
                          media_type="text/event-stream", headers=SSE_HEADERS)
        deadline = time.monotonic() + services.settings.api.chat_wait_s
        try:
            final = await wait_terminal(view.id, account_id, deadline)
        except TimeoutError:
            await sched.acancel(UUID(view.id), account_id=account_id, by="consumer (timeout)")
            raise ApiError(504, "timeout", "the job did not finish in time; it was cancelled") from None
        if final.status != "completed":
            raise job_error(final)
        body = ChatCompletion(id=completion_id, created=created, model=data.model,
                              choices=[ChatChoice(index=0, message=ChatMessageOut(role="assistant",
                                                                                  content=final.output or ""),
                                                  finish_reason=_finish_reason(final))],
                              usage=_usage(final))
        return Response(content=encode(body), media_type=MediaType.JSON)

    @get(["/v1/models", "/api/v1/models"],
         summary="Models (OpenAI list shape) with their Cargo and how many online Islands serve each now")
    async def list_models(request: Request) -> Response[ModelList]:
        chat_only = not request.url.path.startswith("/api/v1/")  # /v1: the OpenAI shim's chat models
        return Response(content=encode(ModelList(data=model_list(chat_only))), media_type=MediaType.JSON)

    @get(["/v1/models/{model_id:str}", "/api/v1/models/{model_id:str}"], summary="One model")
    async def get_model(request: Request, model_id: FromPath[str]) -> Response[ModelOut]:
        chat_only = not request.url.path.startswith("/api/v1/")
        found = next((m for m in model_list(chat_only) if m.id == model_id), None)
        if found is None:
            raise ApiError(404, "model_not_found", f"the model {model_id[:128]!r} does not exist")
        return Response(content=encode(found), media_type=MediaType.JSON)

    return [chat_completions, list_models, get_model]


def _chunk(cid: str, created: int, model: str, delta: ChatDelta, finish: str | None,
           usage: ChatUsage | None = None, choices: bool = True) -> bytes:
    body = ChatCompletionChunk(id=cid, created=created, model=model,
                               choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)] if choices else [],
                               usage=usage)
    return b"data: " + encode(body) + b"\n\n"


async def _stream(services: ApiServices, view: JobView, account_id: UUID, cid: str, created: int, model: str,
                  include_usage: bool) -> AsyncIterator[bytes]:
    sched = services.coordinator.scheduler
    sub = services.broker.subscribe(view.id, None)
    finished = False
    deadline = time.monotonic() + services.settings.api.chat_wait_s
    try:
        yield _chunk(cid, created, model, ChatDelta(role="assistant", content=""), None)
        while not finished:
            if time.monotonic() > deadline:
                break
            entries = await sub.next(POLL_S)
            if entries is None:
                current = await sched.aget_job(UUID(view.id), account_id)
                if current is None or current.status not in TERMINAL:
                    yield b": keep-alive\n\n"
                    continue
                entries = [("0-0", br.done_event({}) if current.status == "completed" else br.error_event(""))]
            for _, data in entries:
                event = msgspec.json.decode(data)
                kind = event.get("type")
                if kind == "token":
                    yield _chunk(cid, created, model, ChatDelta(content=event.get("content", "")), None)
                elif kind in ("done", "error"):
                    finished = True
                    final = await sched.aget_job(UUID(view.id), account_id)
                    if final is None or final.status != "completed":
                        err = job_error(final) if final is not None else ApiError(502, "job_failed", "job lost")
                        yield b"data: " + encode({"error": {"message": err.message, "type": "api_error",
                                                            "param": None, "code": err.code}}) + b"\n\n"
                        break
                    usage = _usage(final)
                    yield _chunk(cid, created, model, ChatDelta(), _finish_reason(final), usage=usage)
                    if include_usage:
                        yield _chunk(cid, created, model, ChatDelta(), None, usage=usage, choices=False)
                    yield b"data: [DONE]\n\n"
                    break
    finally:
        sub.close()
        if not finished:
            # The client hung up (or timed out): stop the Island, charge only what was delivered.
            asyncio.get_running_loop().create_task(_cancel_quietly(services, view.id, account_id))


async def _cancel_quietly(services: ApiServices, job_id: str, account_id: UUID) -> None:
    try:
        await services.coordinator.scheduler.acancel(UUID(job_id), account_id=account_id, by="consumer (disconnect)")
    except Exception as exc:  # noqa: BLE001
        log.info("chat_stream_cancel_failed", job_id=job_id, error=repr(exc))
