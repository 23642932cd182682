"""scheduler.validation: admission input validation, every rule, and a never-crash fuzz."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.pricing import MICRO_PER_CREDIT as C
from ledger.pricing import ChatPricing, chat_price_micro, image_price_micro
from scheduler.catalog import Catalog
from scheduler.validation import (
    MAX_INPUT_BYTES,
    ChatInput,
    ChatMessage,
    ImageInput,
    InvalidInput,
    prompt_tokens_estimate,
    validate_input,
    worst_case_micro,
)

CATALOG = Catalog.load()
CHAT = CATALOG.by_slug("llm-chat")
LITE = CATALOG.by_slug("llm-chat-lite")
SDXL = CATALOG.by_slug("sdxl")


def errors_of(cargo: Any, raw: Any) -> dict[str, list[str]]:
    with pytest.raises(InvalidInput) as info:
        validate_input(cargo, raw)
    assert info.value.errors, "InvalidInput must carry at least one error"
    return info.value.errors


# ----------------------------------------------------------------------------- chat: accepted


def test_chat_defaults() -> None:
    result = validate_input(CHAT, {"prompt": "Hello"})
    assert result == ChatInput(
        prompt="Hello",
        system_prompt=None,
        max_tokens=2048,
        temperature=0.7,
        messages=None,
        model="mistral-7b-instruct",
    )


def test_chat_full_input_from_bytes_and_str() -> None:
    raw = {
        "prompt": "Next?",
        "system_prompt": "Be brief.",
        "max_tokens": 4096,
        "temperature": 2,
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""},
        ],
        "model": "llama-3.1-8b-instruct",
    }
    for form in (raw, json.dumps(raw).encode(), json.dumps(raw)):
        result = validate_input(CHAT, form)
        assert isinstance(result, ChatInput)
        assert result.max_tokens == 4096 and result.temperature == 2.0
        assert isinstance(result.temperature, float)
        assert result.model == "llama-3.1-8b-instruct"
        assert result.messages == [
            ChatMessage("system", "sys"),
            ChatMessage("user", "hi"),
            ChatMessage("assistant", ""),
        ]


def test_unknown_keys_are_refused_each_by_name() -> None:
    """A typo (`max_token`) is never dropped silently: every unknown key is named (#16)."""
    with pytest.raises(InvalidInput) as exc:
        validate_input(CHAT, {"prompt": "hi", "max_token": 5, "future_option": {"a": 1},
                              "messages": [{"role": "user", "content": "x", "name": "n"}]})
    errors = exc.value.errors
    assert set(errors) == {"input.max_token", "input.future_option", "input.messages[0].name"}
    assert "allowed: prompt, system_prompt, max_tokens" in errors["input.max_token"][0]
    with pytest.raises(InvalidInput) as exc:
        validate_input(SDXL, {"prompt": "a cat", "step": 4})
    assert list(exc.value.errors) == ["input.step"]
    many = {"prompt": "x", **{f"k{i}": i for i in range(25)}}
    with pytest.raises(InvalidInput) as exc:
        validate_input(CHAT, many)
    assert len(exc.value.errors) == 11 and "25 unknown fields" in exc.value.errors["input"][0]


def test_null_optional_fields_mean_omitted() -> None:
    result = validate_input(
        CHAT,
        {
            "prompt": "x",
            "system_prompt": None,
            "max_tokens": None,
            "temperature": None,
            "messages": None,
            "model": None,
        },
    )
    assert result == validate_input(CHAT, {"prompt": "x"})


def test_messages_without_prompt_are_enough() -> None:
    result = validate_input(CHAT, {"messages": [{"role": "user", "content": "hi"}]})
    assert isinstance(result, ChatInput) and result.prompt == ""


def test_boundaries_are_inclusive() -> None:
    validate_input(CHAT, {"prompt": "x", "max_tokens": 1, "temperature": 0})
    validate_input(CHAT, {"prompt": "x", "max_tokens": 4096, "temperature": 2.0})
    validate_input(CHAT, {"messages": [{"role": "user", "content": "a" * 32_768}] * 7})
    validate_input(CHAT, {"prompt": "x", "messages": [{"role": "user", "content": "a"}] * 128})


# ----------------------------------------------------------------------------- chat: refused


def test_prompt_required() -> None:
    message = "is required (a non-empty string) unless messages are given"
    assert errors_of(CHAT, {}) == {"input.prompt": [message]}
    assert errors_of(CHAT, {"prompt": ""}) == {"input.prompt": [message]}
    assert errors_of(CHAT, {"prompt": "   \n"}) == {"input.prompt": [message]}
    assert errors_of(CHAT, {"prompt": "", "messages": []}) == {"input.prompt": [message]}
    assert errors_of(CHAT, {"prompt": 5}) == {"input.prompt": ["must be a string, got number"]}


def test_max_tokens_rules() -> None:
    for bad in (0, -1, 4097, 10**40):
        assert errors_of(CHAT, {"prompt": "x", "max_tokens": bad}) == {
            "input.max_tokens": ["must be between 1 and 4096"]
        }
    for bad, kind in ((1.5, "number"), (True, "boolean"), ("100", "string"), ([], "array")):
        assert errors_of(CHAT, {"prompt": "x", "max_tokens": bad}) == {
            "input.max_tokens": [f"must be an integer, got {kind}"]
        }


def test_temperature_rules() -> None:
    for bad in (-0.01, 2.0001, 3, 10**400):
        assert errors_of(CHAT, {"prompt": "x", "temperature": bad}) == {
            "input.temperature": ["must be between 0 and 2"]
        }
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert errors_of(CHAT, {"prompt": "x", "temperature": bad}) == {
            "input.temperature": ["must be a finite number"]
        }
    assert errors_of(CHAT, {"prompt": "x", "temperature": "hot"}) == {
        "input.temperature": ["must be a number, got string"]
    }


def test_model_rules() -> None:
    assert errors_of(CHAT, {"prompt": "x", "model": "gpt-4"}) == {
        "input.model": [
            "unknown model 'gpt-4' for llm-chat; allowed: llama-3.1-8b-instruct, "
            "mistral-7b-instruct, qwen2.5-7b-instruct"
        ]
    }
    # A model of another Cargo is not accepted either.
    assert "input.model" in errors_of(CHAT, {"prompt": "x", "model": "tinyllama-1.1b-chat"})
    assert validate_input(LITE, {"prompt": "x", "model": "tinyllama-1.1b-chat"}).model == "tinyllama-1.1b-chat"  # type: ignore[union-attr]
    assert errors_of(CHAT, {"prompt": "x", "model": 7}) == {"input.model": ["must be a string, got number"]}


def test_messages_rules_report_every_item() -> None:
    raw = {
        "prompt": "x",
        "messages": [
            {"role": "user", "content": "fine"},
            {"role": "tool", "content": "x"},
            {"content": "no role"},
            {"role": "user"},
            "not an object",
            {"role": "user", "content": None},
            {"role": "assistant", "content": 42},
            {"role": "user", "content": "a" * 32_769},
            {"role": ["user"], "content": "x"},
        ],
    }
    assert errors_of(CHAT, raw) == {
        "input.messages[1].role": ["must be one of system, user, assistant, got 'tool'"],
        "input.messages[2].role": ["is required"],
        "input.messages[3].content": ["is required"],
        "input.messages[4]": ["must be an object with role and content, got string"],
        "input.messages[5].content": ["is required"],
        "input.messages[6].content": ["must be a string, got number"],
        "input.messages[7].content": ["must be at most 32768 characters (got 32769)"],
        "input.messages[8].role": ["must be one of system, user, assistant, got array"],
    }


def test_too_many_messages() -> None:
    raw = {"messages": [{"role": "user", "content": "a"}] * 129}
    assert errors_of(CHAT, raw) == {"input.messages": ["must have at most 128 messages (got 129)"]}
    assert errors_of(CHAT, {"prompt": "x", "messages": {"role": "user"}}) == {
        "input.messages": ["must be an array of {role, content} objects, got object"]
    }


def test_all_problems_are_listed_at_once() -> None:
    errors = errors_of(
        CHAT,
        {
            "prompt": "",
            "system_prompt": 3,
            "max_tokens": 0,
            "temperature": 9,
            "model": "nope",
            "messages": "hi",
        },
    )
    assert set(errors) == {
        "input.prompt",
        "input.system_prompt",
        "input.max_tokens",
        "input.temperature",
        "input.model",
        "input.messages",
    }


def test_strings_must_be_storable() -> None:
    assert errors_of(CHAT, {"prompt": "a\x00b"}) == {
        "input.prompt": ["must not contain NUL (\\u0000) characters"]
    }
    assert errors_of(CHAT, {"prompt": "a\ud800b"}) == {
        "input.prompt": ["contains invalid Unicode (unpaired surrogate)"]
    }
    assert errors_of(CHAT, b'{"prompt": "a\\ud800"}') == {"input": ["is not valid JSON"]}


def test_input_must_be_a_json_object() -> None:
    for raw in (None, [], "[]", b"[1, 2]", 5, "just text", b"", b"{", b"\xff\xfe", object()):
        errors = errors_of(CHAT, raw)
        assert list(errors) == ["input"]
        assert errors["input"][0] in ("must be a JSON object", "is not valid JSON")
    assert errors_of(CHAT, {"prompt": "x", "bad": object()}) == {"input": ["must contain only JSON values"]}


def test_input_size_limit() -> None:
    ok = {"prompt": "a" * (MAX_INPUT_BYTES - len('{"prompt":""}'))}
    assert len(msgspec.json.encode(ok)) == MAX_INPUT_BYTES
    validate_input(CHAT, ok)
    big = {"prompt": "a" * (MAX_INPUT_BYTES - len('{"prompt":""}') + 1)}
    with pytest.raises(InvalidInput) as info:
        validate_input(CHAT, big)
    assert info.value.too_large
    assert info.value.errors == {"input": [f"must be at most {MAX_INPUT_BYTES} bytes of JSON (got {MAX_INPUT_BYTES + 1})"]}
    with pytest.raises(InvalidInput) as info:
        validate_input(CHAT, msgspec.json.encode(big))
    assert info.value.too_large
    # Multi-byte characters count in bytes, not characters.
    assert "input" in errors_of(CHAT, {"prompt": "é" * (MAX_INPUT_BYTES // 2)})


# ----------------------------------------------------------------------------- image


def test_image_defaults_from_the_cargo() -> None:
    result = validate_input(SDXL, {"prompt": "a cat"})
    assert result == ImageInput(
        prompt="a cat",
        negative_prompt=None,
        width=1024,
        height=1024,
        steps=30,
        guidance_scale=7.5,
        seed=None,
    )
    assert worst_case_micro(SDXL, result) == 20 * C


def test_image_full_input() -> None:
    raw = {
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "width": 512,
        "height": 1536,
        "steps": 100,
        "guidance_scale": 30,
        "seed": 2**63 - 1,
    }
    result = validate_input(SDXL, raw)
    assert isinstance(result, ImageInput)
    assert (result.width, result.height, result.steps, result.seed) == (512, 1536, 100, 2**63 - 1)
    assert result.guidance_scale == 30.0
    assert worst_case_micro(SDXL, result) == image_price_micro(SDXL.pricing, 512, 1536, 100)  # type: ignore[arg-type]
    assert validate_input(SDXL, {"prompt": "x", "seed": -1}).seed is None  # type: ignore[union-attr]


def test_image_rules() -> None:
    errors = errors_of(
        SDXL,
        {
            "prompt": "  ",
            "negative_prompt": 1,
            "width": 1000 + 4,
            "height": 2048,
            "steps": 0,
            "guidance_scale": 31,
            "seed": -2,
        },
    )
    assert errors == {
        "input.prompt": ["must not be empty"],
        "input.negative_prompt": ["must be a string, got number"],
        "input.width": ["must be a multiple of 8"],
        "input.height": ["must be between 512 and 1536"],
        "input.steps": ["must be between 1 and 100"],
        "input.guidance_scale": ["must be between 0 and 30"],
        "input.seed": ["must be between 0 and 9223372036854775807"],
    }
    assert errors_of(SDXL, {}) == {"input.prompt": ["is required (a non-empty string)"]}
    assert errors_of(SDXL, {"prompt": "x", "width": 1024.0, "steps": 101, "seed": 2**63}) == {
        "input.width": ["must be an integer, got number"],
        "input.steps": ["must be between 1 and 100"],
        "input.seed": ["must be between 0 and 9223372036854775807"],
    }
    assert errors_of(SDXL, {"prompt": "x", "guidance_scale": float("nan")}) == {
        "input.guidance_scale": ["must be a finite number"]
    }
    assert errors_of(SDXL, {"prompt": "x", "width": 256}) == {
        "input.width": ["must be between 512 and 1536"]
    }


# ----------------------------------------------------------------------------- holds


def test_chat_worst_case_worked_example() -> None:
    result = validate_input(CHAT, {"prompt": "hi"})
    # prompt estimate: ceil(2/4) + 4 (one message) = 5 tokens
    assert prompt_tokens_estimate(result) == 5
    # 4 + ceil((5 * 1 + 2048 * 3) credits / 1000) = 10.149 credits
    assert worst_case_micro(CHAT, result) == 10_149_000


def test_prompt_estimate_counts_every_part() -> None:
    result = validate_input(
        CHAT,
        {
            "prompt": "a" * 40,
            "system_prompt": "b" * 40,
            "messages": [{"role": "user", "content": "c" * 40}, {"role": "assistant", "content": "d" * 41}],
        },
    )
    assert prompt_tokens_estimate(result) == -(-161 // 4) + 4 * 4


def test_worst_case_kind_mismatch_is_a_programming_error() -> None:
    chat_input = validate_input(CHAT, {"prompt": "x"})
    with pytest.raises(TypeError):
        worst_case_micro(SDXL, chat_input)


@settings(max_examples=200)
@given(
    st.text(min_size=1, max_size=2000).filter(lambda s: s.strip() and "\x00" not in s),
    st.integers(1, 4096),
    st.data(),
)
def test_hold_covers_the_price_of_every_possible_completion(prompt: str, max_tokens: int, data: st.DataObject) -> None:
    for cargo in (CHAT, LITE):
        result = validate_input(cargo, {"prompt": prompt, "max_tokens": max_tokens})
        hold = worst_case_micro(cargo, result)
        pricing = cargo.pricing
        assert isinstance(pricing, ChatPricing)
        assert pricing.min_micro <= hold <= pricing.max_micro
        completion = data.draw(st.integers(0, max_tokens))
        prompt_tokens = data.draw(st.integers(0, prompt_tokens_estimate(result)))
        assert chat_price_micro(pricing, prompt_tokens, completion) <= hold


# ----------------------------------------------------------------------------- fuzz

FIELD_NAMES = [
    "prompt",
    "system_prompt",
    "max_tokens",
    "temperature",
    "messages",
    "model",
    "role",
    "content",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([0, 1, -1, 8, 512, 1024, 1536, 4096, 4097, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None), max_size=20),
    st.sampled_from(["", " ", "user", "system", "assistant", "mistral-7b-instruct", "\x00", "\ud800"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)), children, max_size=6),
    ),
    max_leaves=25,
)
inputs = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, max_size=10),
    st.fixed_dictionaries(
        {"messages": st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]), json_values), max_size=6)},
        optional={k: json_values for k in FIELD_NAMES if k != "messages"},
    ),
)


def _check_valid(cargo: Any, result: Any) -> None:
    hold = worst_case_micro(cargo, result)
    if isinstance(result, ChatInput):
        assert 1 <= result.max_tokens <= 4096 and 0.0 <= result.temperature <= 2.0
        assert result.model in cargo.models
        assert result.prompt.strip() or result.messages
        assert cargo.pricing.min_micro <= hold <= cargo.pricing.max_micro
    else:
        assert isinstance(result, ImageInput) and result.prompt.strip()
        assert cargo.image.min_width <= result.width <= cargo.image.max_width
        assert cargo.image.min_height <= result.height <= cargo.image.max_height
        assert 1 <= result.steps <= cargo.image.max_steps
        assert 0.0 <= result.guidance_scale <= 30.0
        assert 10 * C <= hold <= 50 * C
    # The validated input is always encodable (it goes into an event).
    msgspec.json.encode(result)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(inputs, st.sampled_from([CHAT, LITE, SDXL]))
def test_fuzz_dict_input_only_raises_invalid_input(raw: Any, cargo: Any) -> None:
    try:
        result = validate_input(cargo, raw)
    except InvalidInput as exc:
        assert exc.errors and all(
            isinstance(k, str) and k.startswith("input") and v and all(isinstance(m, str) for m in v)
            for k, v in exc.errors.items()
        )
        return
    _check_valid(cargo, result)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(inputs.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64)), st.sampled_from([CHAT, SDXL]))
def test_fuzz_bytes_input_only_raises_invalid_input(raw: bytes, cargo: Any) -> None:
    try:
        result = validate_input(cargo, raw)
    except InvalidInput as exc:
        assert exc.errors
        return
    _check_valid(cargo, result)
