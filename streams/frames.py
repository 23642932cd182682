"""The frames of a Job's stream: event ids (`<ms>-<seq>`, the SSE `id:` and the
`Last-Event-ID` to resume after) and the JSON event bodies of the contract
(status, token, progress, image, error, done)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
import msgspec
from ledger.pricing import micro_to_credits

_ENCODER = msgspec.json.Encoder(decimal_format="number")


def encode(obj: Any) -> bytes:
    """JSON bytes; Decimals as numbers (never through a float)."""
    return _ENCODER.encode(obj)


TERMINAL_PREFIXES = (b'{"type":"done"', b'{"type":"error"')


def parse_id(event_id: str | None) -> tuple[int, int] | None:
    """`<ms>-<seq>` -> (ms, seq); None if absent or malformed (= from the start)."""
    if not event_id:
        return None
    ms, sep, seq = event_id.strip().partition("-")
    try:
        return (int(ms), int(seq) if sep else 0)
    except ValueError:
        return None


def format_id(parsed: tuple[int, int]) -> str:
    return f"{parsed[0]}-{parsed[1]}"


def is_terminal(data: bytes) -> bool:
    return data.startswith(TERMINAL_PREFIXES)


# ------------------------------------------------------------------ event payloads
def status_event(status: str) -> bytes:
    return encode({"type": "status", "content": status})


def token_event(text: str) -> bytes:
    return encode({"type": "token", "content": text})


def progress_event(step: int, total: int) -> bytes:
    return encode({"type": "progress", "step": step, "total": total})


def image_event(image_b64: str, fmt: str = "png", **extra: Any) -> bytes:
    return encode({"type": "image", "image_data": image_b64, "format": fmt, **extra})


def error_event(message: str) -> bytes:
    return encode({"type": "error", "error": message})


def done_event(usage: dict[str, Any]) -> bytes:
    return encode({"type": "done", "usage": usage})


def usage_out(kind: str, usage: dict[str, Any] | None, charged_micro: int) -> dict[str, Any]:
    """The API's usage object from a Job's internal usage (credits exact, as a number)."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens", 0))
    completion = int(usage.get("completion_tokens", 0))
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": int(usage.get("total_tokens", prompt + completion)),
                           "credits_used": micro_to_credits(int(charged_micro))}
    if kind == "image" and "steps" in usage:
        out["steps"] = int(usage["steps"])
    return out


def credits_number(micro: int) -> Decimal:
    return micro_to_credits(micro)
