"""ledger.pricing: integer-only prices, bounds, monotonicity, holds, fee split, parsing."""

from __future__ import annotations

import ast
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ledger.pricing as pricing_module
from ledger.pricing import (
    MAX_MICRO,
    MICRO_PER_CREDIT,
    ChatPricing,
    ImagePricing,
    chat_price_micro,
    chat_worst_case_micro,
    credits_to_micro,
    estimate_prompt_tokens,
    image_is_high_quality,
    image_price_micro,
    micro_to_credits,
    partial_chat_price_micro,
    settlement_micro,
    split_fee,
)
from scheduler.catalog import Catalog

C = MICRO_PER_CREDIT
CATALOG = Catalog.load()
CHAT = CATALOG.by_slug("llm-chat").pricing
LITE = CATALOG.by_slug("llm-chat-lite").pricing
SDXL = CATALOG.by_slug("sdxl").pricing
SDXL_BOUNDS = CATALOG.by_slug("sdxl").image
assert isinstance(CHAT, ChatPricing) and isinstance(LITE, ChatPricing)
assert isinstance(SDXL, ImagePricing) and SDXL_BOUNDS is not None

tokens = st.integers(min_value=0, max_value=2_000_000)
chat_pricings = st.builds(
    lambda base, p, c, lo, span: ChatPricing(
        base_micro=base,
        per_1k_prompt_tokens_micro=p,
        per_1k_completion_tokens_micro=c,
        min_micro=lo,
        max_micro=lo + span,
    ),
    st.integers(0, 50 * C),
    st.integers(0, 10 * C),
    st.integers(0, 10 * C),
    st.integers(0, 50 * C),
    st.integers(0, 100 * C),
)
sizes = st.integers(min_value=SDXL_BOUNDS.min_width, max_value=SDXL_BOUNDS.max_width).map(
    lambda v: v - v % 8
)
steps_st = st.integers(min_value=1, max_value=SDXL_BOUNDS.max_steps)


# ----------------------------------------------------------------------------- purity


def test_pricing_imports_nothing_of_the_project_and_uses_no_floats() -> None:
    source = Path(pricing_module.__file__).read_text()
    tree = ast.parse(source)
    ours = {"ledger", "routing", "scheduler", "projections", "api", "simulations", "island", "store", "bench"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & ours
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and (node.module or "").split(".")[0] not in ours
        # No true division and no float literals anywhere in the pricing module.
        assert not isinstance(node, ast.Div), f"true division at line {node.lineno}"
        if isinstance(node, ast.Constant):
            assert not isinstance(node.value, float), f"float literal at line {node.lineno}"


# ----------------------------------------------------------------------------- chat


def test_chat_worked_examples() -> None:
    # base 4 + ceil((500*1 + 500*3) credits / 1000) = 4 + 0.5 + 1.5 = 6 credits
    assert chat_price_micro(CHAT, 500, 500) == 6 * C
    # tiny request: 4 + 0.01 + 0.03 = 4.04 -> clamped up to min 5
    assert chat_price_micro(CHAT, 10, 10) == 5 * C
    # huge request clamped to max 20
    assert chat_price_micro(CHAT, 100_000, 4096) == 20 * C
    # 4 + 1.024 + 6.144 = 11.168 credits
    assert chat_price_micro(CHAT, 1024, 2048) == 11_168_000
    assert chat_price_micro(LITE, 500, 500) == 1_300_000
    assert chat_price_micro(LITE, 0, 0) == 1 * C
    assert chat_price_micro(LITE, 0, 100_000) == 5 * C


def test_chat_rounds_up_to_the_micro_credit_once() -> None:
    p = ChatPricing(
        base_micro=0,
        per_1k_prompt_tokens_micro=1,
        per_1k_completion_tokens_micro=1,
        min_micro=0,
        max_micro=10 * C,
    )
    assert chat_price_micro(p, 0, 0) == 0
    assert chat_price_micro(p, 1, 0) == 1  # 0.001 micro -> 1
    assert chat_price_micro(p, 1, 1) == 1  # 0.002 micro -> 1 (one rounding for the sum)
    assert chat_price_micro(p, 1000, 0) == 1
    assert chat_price_micro(p, 1001, 0) == 2


@given(tokens, tokens)
def test_llm_chat_price_is_5_to_20_credits(prompt: int, completion: int) -> None:
    assert 5 * C <= chat_price_micro(CHAT, prompt, completion) <= 20 * C


@given(tokens, tokens)
def test_llm_chat_lite_price_is_1_to_5_credits(prompt: int, completion: int) -> None:
    assert 1 * C <= chat_price_micro(LITE, prompt, completion) <= 5 * C


@given(chat_pricings, tokens, tokens, tokens, tokens)
def test_chat_price_is_monotone(p: ChatPricing, a: int, b: int, da: int, db: int) -> None:
    assert chat_price_micro(p, a, b) <= chat_price_micro(p, a + da, b)
    assert chat_price_micro(p, a, b) <= chat_price_micro(p, a, b + db)


@given(chat_pricings, tokens, st.integers(1, 4096), st.data())
def test_worst_case_covers_every_actual_price(
    p: ChatPricing, estimate: int, max_tokens: int, data: st.DataObject
) -> None:
    hold = chat_worst_case_micro(p, estimate, max_tokens)
    actual_prompt = data.draw(st.integers(0, estimate))
    actual_completion = data.draw(st.integers(0, max_tokens))
    price = chat_price_micro(p, actual_prompt, actual_completion)
    assert price <= hold
    assert settlement_micro(price, hold) == price
    delivered = data.draw(st.integers(0, actual_completion))
    partial = partial_chat_price_micro(p, actual_prompt, delivered, hold)
    assert 0 <= partial <= price


@given(tokens, tokens, tokens)
def test_settlement_never_exceeds_hold_when_prompt_was_underestimated(
    estimate: int, extra: int, completion: int
) -> None:
    hold = chat_worst_case_micro(CHAT, estimate, 2048)
    price = chat_price_micro(CHAT, estimate + extra, min(completion, 2048))
    assert settlement_micro(price, hold) <= hold


def test_chat_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="prompt_tokens must be >= 0"):
        chat_price_micro(CHAT, -1, 0)
    with pytest.raises(ValueError, match="completion_tokens must be >= 0"):
        chat_price_micro(CHAT, 0, -5)
    with pytest.raises(TypeError):
        chat_price_micro(CHAT, True, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        chat_price_micro(CHAT, 1.5, 0)  # type: ignore[arg-type]


def test_chat_pricing_invariants() -> None:
    with pytest.raises(ValueError, match="min_micro .* must be <= max_micro"):
        ChatPricing(
            base_micro=0,
            per_1k_prompt_tokens_micro=0,
            per_1k_completion_tokens_micro=0,
            min_micro=2,
            max_micro=1,
        )
    with pytest.raises(ValueError, match="base_micro must be >= 0"):
        ChatPricing(
            base_micro=-1,
            per_1k_prompt_tokens_micro=0,
            per_1k_completion_tokens_micro=0,
            min_micro=0,
            max_micro=1,
        )
    with pytest.raises(TypeError, match="int of micro-credits"):
        ChatPricing(
            base_micro=1.0,  # type: ignore[arg-type]
            per_1k_prompt_tokens_micro=0,
            per_1k_completion_tokens_micro=0,
            min_micro=0,
            max_micro=1,
        )


def test_estimate_prompt_tokens() -> None:
    assert estimate_prompt_tokens(0) == 0
    assert estimate_prompt_tokens(1) == 1
    assert estimate_prompt_tokens(4) == 1
    assert estimate_prompt_tokens(5) == 2
    assert estimate_prompt_tokens(400, message_count=3) == 100 + 12
    with pytest.raises(ValueError):
        estimate_prompt_tokens(-1)


# ----------------------------------------------------------------------------- partial


def test_partial_chat_price_rules() -> None:
    hold = chat_worst_case_micro(CHAT, 100, 2048)
    # nothing delivered -> nothing charged
    assert partial_chat_price_micro(CHAT, 100, 0, hold) == 0
    # one token delivered: base + prefill + 1 token, below the 5-credit minimum
    assert partial_chat_price_micro(CHAT, 100, 1, hold) == 4_000_000 + 100_000 + 3_000
    assert partial_chat_price_micro(CHAT, 100, 1, hold) < CHAT.min_micro
    # never above the hold
    assert partial_chat_price_micro(CHAT, 100_000, 4096, 7 * C) == 7 * C
    # never above max
    assert partial_chat_price_micro(CHAT, 100_000, 4096, 10**12) == CHAT.max_micro


@given(chat_pricings, tokens, tokens, tokens, st.integers(0, 200 * C))
def test_partial_is_monotone_and_bounded(
    p: ChatPricing, prompt: int, delivered: int, more: int, hold: int
) -> None:
    a = partial_chat_price_micro(p, prompt, delivered, hold)
    b = partial_chat_price_micro(p, prompt, delivered + more, hold)
    assert 0 <= a <= b <= hold
    assert a <= chat_price_micro(p, prompt, delivered)


# ----------------------------------------------------------------------------- image


def test_image_worked_examples() -> None:
    # 8 + 0.4 * 1 MP * 30 steps = 20 credits (standard)
    assert image_price_micro(SDXL, 1024, 1024, 30) == 20 * C
    # 512x512, 20 steps: 8 + 0.4 * 0.25 * 20 = 10 credits
    assert image_price_micro(SDXL, 512, 512, 20) == 10 * C
    # tiny: clamped up to 10
    assert image_price_micro(SDXL, 512, 512, 1) == 10 * C
    # 41 steps at 1 MP is high quality: raw 24.4 -> clamped up to 25
    assert image_is_high_quality(SDXL, 1024, 1024, 41)
    assert image_price_micro(SDXL, 1024, 1024, 41) == 25 * C
    # 1536x1536 at 30 steps: 8 + 0.4 * 2.25 * 30 = 35 credits (high quality)
    assert image_price_micro(SDXL, 1536, 1536, 30) == 35 * C
    # max everything is capped at 50
    assert image_price_micro(SDXL, 1536, 1536, 100) == 50 * C
    # rounding up: 8 + ceil(400000 * 520*512*1 / 2**20) micro
    assert image_price_micro(SDXL, 520, 512, 1) == 10 * C
    assert image_price_micro(SDXL, 1000, 1000, 40) == 8 * C + -(-400_000 * 1000 * 1000 * 40 // 2**20)


@given(sizes, sizes, steps_st)
def test_sdxl_price_bands(width: int, height: int, steps: int) -> None:
    price = image_price_micro(SDXL, width, height, steps)
    if image_is_high_quality(SDXL, width, height, steps):
        assert 25 * C <= price <= 50 * C
    else:
        assert 10 * C <= price <= 25 * C
    assert (steps > 40 or width * height > 1024 * 1024) == image_is_high_quality(
        SDXL, width, height, steps
    )


@given(sizes, sizes, steps_st, st.integers(0, 512), st.integers(0, 512), st.integers(0, 50))
def test_image_price_is_monotone(w: int, h: int, s: int, dw: int, dh: int, ds: int) -> None:
    base = image_price_micro(SDXL, w, h, s)
    assert base <= image_price_micro(SDXL, w + dw, h, s)
    assert base <= image_price_micro(SDXL, w, h + dh, s)
    assert base <= image_price_micro(SDXL, w, h, s + ds)


def test_image_pricing_invariants() -> None:
    kwargs = dict(
        base_micro=0,
        per_megapixel_step_micro=0,
        min_micro=10,
        max_micro=30,
        hq_min_micro=25,
        hq_max_micro=50,
        hq_steps_threshold=40,
        hq_pixels_threshold=1,
    )
    with pytest.raises(ValueError, match="max_micro .* must be <= hq_min_micro"):
        ImagePricing(**kwargs)  # type: ignore[arg-type]
    kwargs.update(max_micro=20, hq_min_micro=60)
    with pytest.raises(ValueError, match="hq_min_micro .* must be <= hq_max_micro"):
        ImagePricing(**kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- fees


@given(st.integers(0, MAX_MICRO), st.integers(0, 10_000))
def test_split_fee_sums_exactly(price: int, bps: int) -> None:
    earning, fee = split_fee(price, bps)
    assert earning + fee == price
    assert 0 <= fee <= price and earning >= 0
    assert fee == price * bps // 10_000  # fee rounds down: the Island gets the remainder


def test_split_fee_examples_and_errors() -> None:
    assert split_fee(10 * C, 1500) == (8_500_000, 1_500_000)
    assert split_fee(1, 5000) == (1, 0)
    assert split_fee(3, 5000) == (2, 1)
    assert split_fee(7, 0) == (7, 0)
    assert split_fee(7, 10_000) == (0, 7)
    with pytest.raises(ValueError, match="fee_bps must be between 0 and 10000"):
        split_fee(1, 10_001)
    with pytest.raises(ValueError, match="fee_bps"):
        split_fee(1, -1)
    with pytest.raises(ValueError, match="price_micro must be >= 0"):
        split_fee(-1, 10)
    with pytest.raises(TypeError):
        split_fee(1, 10.5)  # type: ignore[arg-type]


def test_settlement_clamps_to_hold() -> None:
    assert settlement_micro(5, 10) == 5
    assert settlement_micro(15, 10) == 10
    with pytest.raises(ValueError):
        settlement_micro(-1, 10)


# ----------------------------------------------------------------------------- credits


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("0.000001", 1),
        ("1.5", 1_500_000),
        ("1", 1_000_000),
        ("0", 0),
        ("12.345678", 12_345_678),
        ("+2.25", 2_250_000),
        (" 3 ", 3_000_000),
        ("0.1", 100_000),
        (7, 7_000_000),
        (Decimal("1.50000000"), 1_500_000),
        (Decimal("2E+3"), 2_000_000_000),
        ("9223372036854.775807", MAX_MICRO),
    ],
)
def test_credits_to_micro_exact(text: str | int | Decimal, micro: int) -> None:
    assert credits_to_micro(text) == micro


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e3", "no exponent"),
        ("0.0000001", "at most 6 decimal places"),
        ("1.", "expected a decimal number"),
        (".5", "expected a decimal number"),
        ("", "expected a decimal number"),
        ("abc", "expected a decimal number"),
        ("nan", "expected a decimal number"),
        ("inf", "expected a decimal number"),
        ("1,5", "expected a decimal number"),
        ("-1", "must not be negative"),
        (-3, "must not be negative"),
        ("9223372036854.775808", "exceeds the maximum"),
        ("1" * 100, "expected a decimal number"),
        (Decimal("1E-7"), "more than 6 decimal places"),
        (Decimal("NaN"), "must be finite"),
    ],
)
def test_credits_to_micro_rejects(text: str | int | Decimal, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        credits_to_micro(text)


def test_credits_to_micro_negative_allowed_and_floats_refused() -> None:
    assert credits_to_micro("-1.5", allow_negative=True) == -1_500_000
    with pytest.raises(TypeError, match="not float"):
        credits_to_micro(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not bool"):
        credits_to_micro(True)  # type: ignore[arg-type]


def test_micro_to_credits_exact() -> None:
    assert micro_to_credits(1) == Decimal("0.000001")
    assert str(micro_to_credits(1_500_000)) == "1.5"
    assert str(micro_to_credits(20 * C)) == "20"
    assert str(micro_to_credits(-1_000_001)) == "-1.000001"
    assert str(micro_to_credits(MAX_MICRO)) == "9223372036854.775807"


@given(st.integers(-MAX_MICRO, MAX_MICRO))
def test_credits_round_trip(micro: int) -> None:
    credits = micro_to_credits(micro)
    assert credits_to_micro(str(credits), allow_negative=True) == micro
    assert credits_to_micro(credits, allow_negative=True) == micro
    assert "E" not in str(credits)


@settings(max_examples=300)
@given(st.text(max_size=30))
def test_credits_parser_only_raises_value_error(text: str) -> None:
    try:
        micro = credits_to_micro(text, allow_negative=True)
    except ValueError:
        return
    assert Decimal(text.strip()) * C == micro
