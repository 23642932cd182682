"""The frames of a Job's stream: event ids (`<ms>-<seq>`, the `Last-Event-ID` to resume
after), the JSON event bodies of the contract (status, token, progress, image, error,
done) and the SSE frame layout (decision 0050).

Frame layout. By default each event is ONE line, `data: <one-line JSON>`, then a blank
line; the event's id rides inside the JSON as `"id"` (the last key). That is the only
layout the three published clients all read: the JavaScript SDK keeps a block only if it
starts with `data: ` and JSON-parses everything after it (an `id:` line before the data
hides the event, after it breaks `JSON.parse`), and the Python SDK's SSE library
(httpx-sse 0.4) turns every blank line after the first `id:` it ever saw into an event
with empty data, which the SDK's `json.loads` rejects (so a `: ping` keep-alive after an
`id:` line crashes it). With `id_lines=True` (the `?id_lines=true` opt-in, for browsers'
EventSource and other spec-following readers that resume by themselves) the frame is
`data: <json>` then `id: <id>` then a blank line. Keep-alives are the comment `: ping`."""

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
KEEPALIVE = b": ping\n\n"  # an SSE comment: every client skips it (decision 0050)


def with_id(data: bytes, event_id: str) -> bytes:
    """The event's JSON with `"id": event_id` added as its last key (a byte splice: the
    stored event is a JSON object without an `id`; ids are `<ms>-<seq>`, nothing to escape).
    Anything else (not an object, an id with other characters) is left as it is."""
    if not (data.startswith(b"{") and data.endswith(b"}")) or not event_id.replace("-", "").isdigit():
        return data
    if data == b"{}":
        return b'{"id":"' + event_id.encode() + b'"}'
    return data[:-1] + b',"id":"' + event_id.encode() + b'"}'


def sse_frame(event_id: str, data: bytes, *, id_line: bool = False) -> bytes:
    """One whole SSE frame: `data: <json with "id">` (then `id: <id>` with `id_line`),
    then a blank line. Callers write each frame (or several whole frames) in one write."""
    frame = b"data: " + with_id(data, event_id) + b"\n"
    if id_line:
        frame += b"id: " + event_id.encode() + b"\n"
    return frame + b"\n"


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
