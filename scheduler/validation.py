"""Admission input validation: once, at the boundary, before anything is held or stored.

:func:`validate_input` turns the raw ``input`` of a Job submission (a ``dict`` parsed by
the API, or the raw JSON bytes/str of that object) into a typed :class:`ChatInput` or
:class:`ImageInput` for the Cargo's kind, or raises :class:`InvalidInput` listing every
problem by field (``"input.max_tokens"``, ``"input.messages[3].content"``). It never raises
anything else for bad user input. Unknown keys are refused, each named
(``"input.max_token": ["unknown field; allowed: ..."]``), so a typo is never silently
dropped; ``null`` for an optional field means "omitted" (its default applies).

:func:`worst_case_micro` is the amount to hold at admission. Limits: docs/CARGOS.md.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

import msgspec

from ledger.pricing import (
    ChatPricing,
    ImagePricing,
    chat_worst_case_micro,
    estimate_prompt_tokens,
    image_price_micro,
)
from scheduler.cargo import Cargo

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "MAX_GUIDANCE_SCALE",
    "MAX_INPUT_BYTES",
    "MAX_MESSAGES",
    "MAX_MESSAGE_CHARS",
    "MAX_SEED",
    "MAX_TEMPERATURE",
    "MAX_TOKENS_LIMIT",
    "ROLES",
    "ChatInput",
    "ChatMessage",
    "ImageInput",
    "InvalidInput",
    "prompt_tokens_estimate",
    "validate_input",
    "worst_case_micro",
]

CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_INPUT_BYTES = 256 * 1024
"""Largest accepted ``input`` object, measured as compact UTF-8 JSON."""
MAX_MESSAGES = 128
MAX_MESSAGE_CHARS = 32_768
"""Largest ``content`` of one message, in characters (Unicode code points)."""
MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 2048
DEFAULT_TEMPERATURE = 0.7
MAX_TEMPERATURE = 2.0
MAX_GUIDANCE_SCALE = 30.0
MAX_SEED = 2**63 - 1
"""Seeds are 0..2**63-1 (a signed 64-bit integer); -1 means "random" (same as omitted)."""
ROLES = ("system", "user", "assistant")
CHAT_FIELDS = ("prompt", "system_prompt", "max_tokens", "temperature", "messages", "model", "conversation_id")
IMAGE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed")
MESSAGE_FIELDS = ("role", "content")

Role = Literal["system", "user", "assistant"]


class InvalidInput(ValueError):
    """The Job input is invalid. ``errors`` maps field paths to messages (API: 422).

    ``too_large`` is true when the input exceeds :data:`MAX_INPUT_BYTES`; the API may
    answer 413 for it. Nothing else was checked in that case.
    """

    def __init__(self, errors: dict[str, list[str]], *, too_large: bool = False) -> None:
        self.errors = {field: list(messages) for field, messages in errors.items()}
        self.too_large = too_large
        summary = "; ".join(f"{f}: {', '.join(m)}" for f, m in self.errors.items())
        super().__init__(f"invalid input: {summary}")


class ChatMessage(msgspec.Struct, frozen=True):
    role: Role
    content: str


class ChatInput(msgspec.Struct, frozen=True, kw_only=True):
    """A validated chat input. ``model`` is always set (the Cargo's default if omitted)."""

    prompt: str = ""
    system_prompt: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    messages: list[ChatMessage] | None = None
    model: str | None = None
    conversation_id: str | None = None
    """Groups Jobs into one conversation (the web app's chat; projections/conversations.py).
    Not sent to the model; dropped from the stored input when absent (decision 0066)."""


class ImageInput(msgspec.Struct, frozen=True, kw_only=True):
    """A validated image input; omitted size/steps/guidance take the Cargo's defaults."""

    prompt: str
    negative_prompt: str | None = None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int | None = None


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def validate_input(cargo: Cargo, raw: Any) -> ChatInput | ImageInput:
    """Validate a Job's raw ``input`` for ``cargo``.

    ``raw`` is the input object as a ``dict`` (already parsed), or its JSON text as
    ``bytes``/``str``. Returns :class:`ChatInput` for chat Cargos, :class:`ImageInput`
    for image Cargos. Raises :class:`InvalidInput` for every kind of bad input.
    """
    data = _parse(raw)
    errors: dict[str, list[str]] = {}
    _unknown_keys(errors, "input", data, CHAT_FIELDS if cargo.kind == "chat" else IMAGE_FIELDS)
    if cargo.kind == "chat":
        result: ChatInput | ImageInput = _validate_chat(cargo, data, errors)
    elif cargo.kind == "image":
        result = _validate_image(cargo, data, errors)
    else:  # pragma: no cover - Catalog refuses unknown kinds
        raise TypeError(f"Cargo {cargo.slug!r} has unknown kind {cargo.kind!r}")
    if errors:
        raise InvalidInput(errors)
    return result


def prompt_tokens_estimate(validated_input: ChatInput | ImageInput) -> int:
    """Estimated prompt tokens: ``ceil(chars / 4) + 4 per message`` over the prompt,
    system prompt and every message (a non-empty prompt and system prompt count as one
    message each). For images it covers prompt and negative prompt and is informational.
    """
    if isinstance(validated_input, ChatInput):
        chars = len(validated_input.prompt)
        count = 1 if validated_input.prompt else 0
        if validated_input.system_prompt:
            chars += len(validated_input.system_prompt)
            count += 1
        for message in validated_input.messages or ():
            chars += len(message.content)
            count += 1
        return estimate_prompt_tokens(chars, count)
    if isinstance(validated_input, ImageInput):
        chars = len(validated_input.prompt) + len(validated_input.negative_prompt or "")
        return estimate_prompt_tokens(chars)
    raise TypeError(f"expected ChatInput or ImageInput, got {type(validated_input).__name__}")


def worst_case_micro(cargo: Cargo, validated_input: ChatInput | ImageInput) -> int:
    """The amount to hold at admission, in micro-credits.

    Chat: the price with the estimated prompt and all ``max_tokens`` generated.
    Image: the exact price (known at admission). Raises ``TypeError`` if the input
    does not belong to the Cargo's kind (a programming error, not user input).
    """
    pricing = cargo.pricing
    if isinstance(validated_input, ChatInput) and isinstance(pricing, ChatPricing):
        return chat_worst_case_micro(
            pricing, prompt_tokens_estimate(validated_input), validated_input.max_tokens
        )
    if isinstance(validated_input, ImageInput) and isinstance(pricing, ImagePricing):
        return image_price_micro(
            pricing, validated_input.width, validated_input.height, validated_input.steps
        )
    raise TypeError(
        f"{type(validated_input).__name__} does not match Cargo {cargo.slug!r} (kind {cargo.kind})"
    )


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------

_NOT_OBJECT = "must be a JSON object"


def _too_large(size: int) -> InvalidInput:
    return InvalidInput(
        {"input": [f"must be at most {MAX_INPUT_BYTES} bytes of JSON (got {size})"]},
        too_large=True,
    )


def _parse(raw: Any) -> dict[str, Any]:
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput({"input": ["contains invalid Unicode (unpaired surrogate)"]}) from None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        size = len(raw) if not isinstance(raw, memoryview) else raw.nbytes
        if size > MAX_INPUT_BYTES:
            raise _too_large(size)
        try:
            data = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError, ValueError):
            raise InvalidInput({"input": ["is not valid JSON"]}) from None
        if not isinstance(data, dict):
            raise InvalidInput({"input": [_NOT_OBJECT]})
        return data
    if not isinstance(raw, dict):
        raise InvalidInput({"input": [_NOT_OBJECT]})
    size = _encoded_size(raw)
    if size is None:
        raise InvalidInput({"input": ["must contain only JSON values"]})
    if size > MAX_INPUT_BYTES:
        raise _too_large(size)
    return raw


def _encoded_size(data: dict[Any, Any]) -> int | None:
    """Compact UTF-8 JSON size of ``data`` (unpaired surrogates count 3 bytes), or None."""
    try:
        return len(msgspec.json.encode(data))
    except Exception:  # noqa: BLE001 - unencodable user data of any kind
        pass
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        return len(text.encode("utf-8", "surrogatepass"))
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------


class _Missing:
    pass


MISSING: Any = _Missing()


def _add(errors: dict[str, list[str]], field: str, message: str) -> None:
    errors.setdefault(field, []).append(message)


MAX_UNKNOWN_REPORTED = 10


# The allowed-field tuples as sets: the usual input has no unknown key, found in one step.
_ALLOWED_SETS = {fields: frozenset(fields) for fields in (CHAT_FIELDS, IMAGE_FIELDS, MESSAGE_FIELDS)}


def _unknown_keys(errors: dict[str, list[str]], where: str, data: dict[Any, Any], allowed: tuple[str, ...]) -> None:
    """One error per unknown key (the first MAX_UNKNOWN_REPORTED), naming it and the allowed ones."""
    allowed_set = _ALLOWED_SETS.get(allowed)
    if allowed_set is not None and data.keys() <= allowed_set:
        return
    unknown = [k for k in data if k not in allowed]
    for key in unknown[:MAX_UNKNOWN_REPORTED]:
        name = key if isinstance(key, str) and len(key) <= 64 and key.isprintable() else _short(str(key), 32)
        _add(errors, f"{where}.{name}", f"unknown field; allowed: {', '.join(allowed)}")
    if len(unknown) > MAX_UNKNOWN_REPORTED:
        _add(errors, where, f"{len(unknown)} unknown fields (first {MAX_UNKNOWN_REPORTED} listed)")


def _short(value: str, limit: int = 64) -> str:
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def _string(
    errors: dict[str, list[str]],
    field: str,
    value: Any,
    *,
    max_chars: int | None = None,
) -> str | None:
    """A valid string, or None (after recording why) if it is not one."""
    if not isinstance(value, str):
        _add(errors, field, f"must be a string, got {_type_name(value)}")
        return None
    ok = True
    if "\x00" in value:
        _add(errors, field, "must not contain NUL (\\u0000) characters")
        ok = False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _add(errors, field, "contains invalid Unicode (unpaired surrogate)")
        ok = False
    if max_chars is not None and len(value) > max_chars:
        _add(errors, field, f"must be at most {max_chars} characters (got {len(value)})")
        ok = False
    return value if ok else None


def _integer(
    errors: dict[str, list[str]], field: str, value: Any, low: int, high: int
) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        _add(errors, field, f"must be an integer, got {_type_name(value)}")
        return None
    if not low <= value <= high:
        _add(errors, field, f"must be between {low} and {high}")
        return None
    return value


def _number(
    errors: dict[str, list[str]], field: str, value: Any, low: float, high: float
) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _add(errors, field, f"must be a number, got {_type_name(value)}")
        return None
    if isinstance(value, float) and not math.isfinite(value):
        _add(errors, field, "must be a finite number")
        return None
    if not low <= value <= high:  # compares big ints exactly, before float()
        _add(errors, field, f"must be between {low:g} and {high:g}")
        return None
    return float(value)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _get(data: dict[str, Any], key: str) -> Any:
    """The value of ``key``; ``MISSING`` if absent or null (null means omitted)."""
    value = data.get(key, MISSING)
    return MISSING if value is None else value


# --------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------


def _validate_chat(cargo: Cargo, data: dict[str, Any], errors: dict[str, list[str]]) -> ChatInput:
    prompt_value = _get(data, "prompt")
    prompt = "" if prompt_value is MISSING else _string(errors, "input.prompt", prompt_value)

    system_prompt: str | None = None
    value = _get(data, "system_prompt")
    if value is not MISSING:
        system_prompt = _string(errors, "input.system_prompt", value)

    max_tokens = DEFAULT_MAX_TOKENS
    value = _get(data, "max_tokens")
    if value is not MISSING:
        max_tokens = _integer(errors, "input.max_tokens", value, 1, MAX_TOKENS_LIMIT) or max_tokens

    temperature = DEFAULT_TEMPERATURE
    value = _get(data, "temperature")
    if value is not MISSING:
        checked = _number(errors, "input.temperature", value, 0.0, MAX_TEMPERATURE)
        temperature = temperature if checked is None else checked

    raw_messages = _get(data, "messages")
    messages = _messages(errors, raw_messages)
    messages_given = isinstance(raw_messages, list) and len(raw_messages) > 0

    model = cargo.model
    value = _get(data, "model")
    if value is not MISSING:
        name = _string(errors, "input.model", value)
        if name is not None:
            if name in cargo.models:
                model = name
            else:
                allowed = ", ".join(sorted(cargo.models))
                _add(errors, "input.model", f"unknown model {_short(name)} for {cargo.slug}; allowed: {allowed}")

    if prompt is not None and not prompt.strip() and not messages_given:
        _add(errors, "input.prompt", "is required (a non-empty string) unless messages are given")

    conversation_id: str | None = None
    value = _get(data, "conversation_id")
    if value is not MISSING:
        text = _string(errors, "input.conversation_id", value)
        if text is not None:
            if CONVERSATION_ID_RE.fullmatch(text):
                conversation_id = text
            else:
                _add(errors, "input.conversation_id", "must be 1-64 characters of letters, digits, '-' or '_'")

    return ChatInput(
        prompt=prompt or "",
        system_prompt=system_prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        messages=messages or None,
        model=model,
        conversation_id=conversation_id,
    )


def _messages(errors: dict[str, list[str]], value: Any) -> list[ChatMessage]:
    if value is MISSING:
        return []
    field = "input.messages"
    if not isinstance(value, list):
        _add(errors, field, f"must be an array of {{role, content}} objects, got {_type_name(value)}")
        return []
    if len(value) > MAX_MESSAGES:
        _add(errors, field, f"must have at most {MAX_MESSAGES} messages (got {len(value)})")
    out: list[ChatMessage] = []
    for index, item in enumerate(value):
        item_field = f"{field}[{index}]"
        if not isinstance(item, dict):
            _add(errors, item_field, f"must be an object with role and content, got {_type_name(item)}")
            continue
        _unknown_keys(errors, item_field, item, MESSAGE_FIELDS)
        role = item.get("role", MISSING)
        if role is MISSING or role is None:
            _add(errors, f"{item_field}.role", "is required")
            role = None
        elif not isinstance(role, str) or role not in ROLES:
            shown = _short(role) if isinstance(role, str) else _type_name(role)
            _add(errors, f"{item_field}.role", f"must be one of {', '.join(ROLES)}, got {shown}")
            role = None
        content = item.get("content", MISSING)
        if content is MISSING or content is None:
            _add(errors, f"{item_field}.content", "is required")
            content = None
        else:
            content = _string(errors, f"{item_field}.content", content, max_chars=MAX_MESSAGE_CHARS)
        if role is not None and content is not None:
            out.append(ChatMessage(role=role, content=content))
    return out


# --------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------


def _validate_image(cargo: Cargo, data: dict[str, Any], errors: dict[str, list[str]]) -> ImageInput:
    bounds = cargo.image
    if bounds is None:  # pragma: no cover - Catalog guarantees bounds for image Cargos
        raise TypeError(f"image Cargo {cargo.slug!r} has no image bounds")

    prompt = ""
    value = _get(data, "prompt")
    if value is MISSING:
        _add(errors, "input.prompt", "is required (a non-empty string)")
    else:
        checked = _string(errors, "input.prompt", value)
        if checked is not None:
            if not checked.strip():
                _add(errors, "input.prompt", "must not be empty")
            prompt = checked

    negative_prompt: str | None = None
    value = _get(data, "negative_prompt")
    if value is not MISSING:
        negative_prompt = _string(errors, "input.negative_prompt", value)

    sizes: dict[str, int] = {}
    for axis, low, high, default in (
        ("width", bounds.min_width, bounds.max_width, bounds.default_width),
        ("height", bounds.min_height, bounds.max_height, bounds.default_height),
    ):
        sizes[axis] = default
        value = _get(data, axis)
        if value is MISSING:
            continue
        checked_int = _integer(errors, f"input.{axis}", value, low, high)
        if checked_int is None:
            continue
        if checked_int % bounds.dimension_multiple:
            _add(errors, f"input.{axis}", f"must be a multiple of {bounds.dimension_multiple}")
            continue
        sizes[axis] = checked_int

    steps = bounds.default_steps
    value = _get(data, "steps")
    if value is not MISSING:
        steps = _integer(errors, "input.steps", value, 1, bounds.max_steps) or steps

    guidance = bounds.default_guidance_scale
    value = _get(data, "guidance_scale")
    if value is not MISSING:
        checked_float = _number(errors, "input.guidance_scale", value, 0.0, MAX_GUIDANCE_SCALE)
        guidance = guidance if checked_float is None else checked_float

    seed: int | None = None
    value = _get(data, "seed")
    if value is not MISSING and not (type(value) is int and value == -1):
        seed = _integer(errors, "input.seed", value, 0, MAX_SEED)

    return ImageInput(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=sizes["width"],
        height=sizes["height"],
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
    )
