"""Every error leaves the server in the contract's shape:

    {"error": {"message": "...", "code": "...", ...extra}}   (+ "errors": {field: [msg]} on 422)

or, under the OpenAI-compatible paths, in OpenAI's shape
(`{"error": {"message", "type", "param", "code"}}`). One exception handler covers our
own `ApiError`, admission refusals, Litestar's own 404/405/413/validation errors and any
unexpected exception (500, logged, never leaking internals).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from api.schemas import encode
from ledger.pricing import micro_to_credits
from scheduler import admission as adm
from scheduler.commands import IdempotencyMismatch
from store.unit_of_work import CommitConflict, CommitterClosed, Overloaded

log = structlog.get_logger("api")

QUEUE_FULL_RETRY_AFTER_S = 5
OVERLOADED_RETRY_AFTER_S = 1

_CODES = {400: "bad_request", 401: "unauthorized", 402: "payment_required", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
          422: "validation_failed", 429: "rate_limited", 431: "headers_too_large", 500: "internal_error", 503: "unavailable"}

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
                 403: "permission_error", 404: "invalid_request_error", 409: "invalid_request_error",
                 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}

OPENAI_PATHS = ("/v1/", "/api/v1/chat/", "/api/v1/models")


class ApiError(Exception):
    """An answer other than success, with the contract's status, code and extras."""

    def __init__(self, status: int, code: str, message: str, *, extra: Mapping[str, Any] | None = None,
                 errors: Mapping[str, list[str]] | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = dict(extra or {})
        self.errors = dict(errors) if errors is not None else None
        self.headers = dict(headers or {})


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def unauthorized(message: str = "missing or invalid API key") -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="archipelag"'})


def validation_failed(errors: Mapping[str, list[str]], message: str | None = None) -> ApiError:
    summary = message or "validation failed: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(errors.items()))
    return ApiError(422, "validation_failed", summary[:1000], errors=errors)


def _credits(micro: int | None) -> Decimal:
    return micro_to_credits(int(micro or 0))


def from_refusal(refusal: adm.AdmissionRefused, field_prefix: str | None = None) -> ApiError:
    """Admission refusal -> HTTP answer (docs/decisions/0011-error-mapping.md)."""
    reason = refusal.reason
    if reason == adm.INVALID_INPUT:
        errors = refusal.errors
        if field_prefix is not None:
            errors = {_reprefix(k, field_prefix): v for k, v in errors.items()}
        if refusal.too_large:
            return ApiError(413, "payload_too_large", refusal.message, errors=errors)
        return validation_failed(errors, refusal.message)
    if reason == adm.UNKNOWN_CARGO:
        return ApiError(422, "unknown_workload", refusal.message, errors=refusal.errors or {"workload": ["unknown"]})
    if reason == adm.CARGO_DISABLED:
        return ApiError(409, "workload_disabled", refusal.message)
    if reason == adm.KYC_REQUIRED:
        return ApiError(403, "kyc_required", refusal.message)
    if reason in (adm.FREE_TIER_EXHAUSTED, adm.INSUFFICIENT_CREDITS):
        return ApiError(402, reason, refusal.message,
                        extra={"required": _credits(refusal.required_micro),
                               "available": _credits(refusal.available_micro)})
    if reason == adm.ACCOUNT_SUSPENDED:
        return ApiError(403, "account_suspended", refusal.message)
    if reason == adm.UNKNOWN_ACCOUNT:
        return unauthorized("the API key's account does not exist")
    if reason == adm.NO_ISLAND_WITHIN_BUDGET:  # decision 0046: 409, not 402 (clients read 402 as "top up")
        return ApiError(409, reason, refusal.message,
                        extra={"current_rate": _credits(refusal.rate_micro), "budget": _credits(refusal.budget_micro),
                               "budget_source": refusal.budget_source})
    if reason == adm.QUEUE_FULL:
        return ApiError(429, "queue_full", refusal.message,
                        headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
    return ApiError(422, reason, refusal.message)  # pragma: no cover - every reason is mapped above


def _reprefix(key: str, prefix: str) -> str:
    """`input.max_tokens` -> `inputs[3].max_tokens` for batch children."""
    if key == "input":
        return prefix
    if key.startswith("input.") or key.startswith("input["):
        return prefix + key[len("input"):]
    return key


# ------------------------------------------------------------------ rendering
def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def render(err: ApiError, *, openai: bool = False) -> Response:
    if openai:
        param = next(iter(err.errors), None) if err.errors else None
        body: dict[str, Any] = {"error": {"message": err.message, "type": _OPENAI_TYPES.get(err.status, "api_error"),
                                          "param": param, "code": err.code, **err.extra}}
    else:
        body = {"error": {"message": err.message, "code": err.code, **err.extra}}
    if err.errors is not None:
        body["errors"] = err.errors
    return Response(content=encode(body), status_code=err.status, media_type=MediaType.JSON,
                    headers=err.headers or None)


def to_api_error(exc: Exception) -> ApiError:
    """Any exception -> ApiError (unknown ones become a logged 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, adm.AdmissionRefused):
        return from_refusal(exc)
    if isinstance(exc, IdempotencyMismatch):
        return ApiError(409, "idempotency_conflict", "this Idempotency-Key was used for a different request")
    if isinstance(exc, Overloaded):
        return ApiError(503, "overloaded", "the coordinator is overloaded; retry shortly",
                        headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)})
    if isinstance(exc, CommitterClosed):
        return ApiError(503, "shutting_down", "the coordinator is shutting down; retry shortly",
                        headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)})
    if isinstance(exc, CommitConflict):
        return ApiError(503, "contention", "too much contention on this resource; retry shortly",
                        headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)})
    if is_database_unavailable(exc):
        log.warning("database_unavailable", error=repr(exc)[:300])
        return ApiError(503, "database_unavailable", "the event store is unavailable; retry shortly",
                        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})
    if _is_redis_unavailable(exc):
        log.warning("redis_unavailable", error=repr(exc))
        return ApiError(503, "unavailable", "a backing service is unavailable; retry shortly",
                        headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)})
    if isinstance(exc, ValidationException):
        return validation_failed(_litestar_field_errors(exc))
    if isinstance(exc, HTTPException):
        status = exc.status_code
        headers = dict(exc.headers or {})
        if status == 400:
            # Litestar's "JSON is malformed" and friends: the request body could not be read.
            return ApiError(422, "validation_failed", f"invalid request body: {exc.detail}",
                            errors={"body": [str(exc.detail)]}, headers=headers)
        if status == 404:
            return ApiError(404, "not_found", "no such resource", headers=headers)
        if status == 405:
            return ApiError(405, "method_not_allowed", str(exc.detail), headers=headers)
        if status == 413:
            return ApiError(413, "payload_too_large", "request body too large", headers=headers)
        if status == 429 and "Retry-After" not in headers:
            headers["Retry-After"] = "1"
        return ApiError(status, _CODES.get(status, "error"), str(exc.detail), headers=headers)
    log.error("unhandled_exception", error=repr(exc), exc_info=exc)
    return ApiError(500, "internal_error", "internal server error")


DATABASE_RETRY_AFTER_S = 2


def is_database_unavailable(exc: BaseException) -> bool:
    """The event store cannot be reached or written right now (PostgreSQL down or restarting,
    the pool exhausted, SQLite locked by another process, disk full, read-only file): a 503
    with Retry-After, never a 500. Checked along the exception's cause chain."""
    import sqlite3

    from eventsourcing import persistence as es

    kinds: list[type[BaseException]] = [es.OperationalError, es.InterfaceError, es.ConnectionUnavailableError,
                                        es.ConnectionPoolClosedError, sqlite3.OperationalError]
    try:
        import psycopg

        kinds += [psycopg.OperationalError, psycopg.InterfaceError]
    except ImportError:  # pragma: no cover
        pass
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, tuple(kinds)):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _is_redis_unavailable(exc: Exception) -> bool:
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError))


def field_of(message: str) -> tuple[str, str]:
    """msgspec names the field in its message ("Expected int, got str - at $.messages[0].role"):
    (field path, message without the path); ("body", message) when it names none."""
    message = message.replace("`", "")
    head, sep, path = message.rpartition(" - at $")
    key = "body"
    if sep and path.startswith((".", "[")):
        key, message = path.lstrip(".")[:200] or "body", head
        if head.startswith(("Object missing required field ", "Object contains unknown field ")):
            key = f"{key}.{head.rsplit(' ', 1)[-1]}"[:200]
    elif message.startswith(("Object missing required field ", "Object contains unknown field ")):
        key = message.rsplit(" ", 1)[-1][:200]
    return key, message


def strict_decode(raw: bytes, typ: type) -> None:
    """Decode the body again without lax type coercion (Litestar converts with strict=False:
    "10" would pass as 10): a wrongly typed value is a 422 naming its field."""
    import msgspec

    try:
        msgspec.json.decode(raw, type=typ)
    except msgspec.ValidationError as exc:
        key, message = field_of(str(exc))
        raise validation_failed({key: [message]}) from None
    except msgspec.DecodeError:
        pass  # Litestar already refused malformed JSON before the handler ran


def _litestar_field_errors(exc: ValidationException) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if not isinstance(item, dict):
            continue
        key = str(item.get("key") or "body")
        if key == "data":
            key = "body"
        message = str(item.get("message") or "invalid").replace("`", "")
        if key == "body":
            key, message = field_of(message)
        errors.setdefault(key, []).append(message)
    if not errors:
        errors["body"] = [str(exc.detail)]
    return errors


def exception_handler(request: Request, exc: Exception) -> Response:
    err = to_api_error(exc)
    if err.status >= 500 and err.status != 503:
        # the exception's class and chain: an operator needs them to tell a bug from an outage
        log.error("request_failed", method=request.method, path=request.url.path, status=err.status,
                  error=type(exc).__name__, exc_info=exc)
    return render(err, openai=is_openai_path(request.url.path))
