"""Job pricing rules: pure integer arithmetic on micro-credits.

Money is always an ``int`` of micro-credits (``1 credit = MICRO_PER_CREDIT``).
No function in this module uses float arithmetic; every division that can leave
a remainder is an explicit integer ceil-division (``-(-a // b)``) or floor
division, and the docstring says which.

Rounding rules (also in docs/CARGOS.md):

* Variable parts of a price (token and megapixel-step charges) are summed
  exactly and then rounded **up** to the next micro-credit, once.
* Prices are clamped to their Cargo's ``[min, max]`` band (``[hq_min, hq_max]``
  for high-quality images).
* The platform fee is rounded **down** (``floor``); the Island earns the
  remainder, so ``earning + fee == price`` exactly.
* The amount actually settled is ``min(price, hold)``: a consumer is never
  charged more than what was held at admission (see :func:`settlement_micro`).

This module is pure: no I/O, no clock, no imports from the rest of the project.
"""

from __future__ import annotations

import re
from decimal import Decimal

import msgspec

__all__ = [
    "MICRO_PER_CREDIT",
    "MAX_MICRO",
    "BPS_DENOMINATOR",
    "CHARS_PER_TOKEN_ESTIMATE",
    "MESSAGE_OVERHEAD_TOKENS",
    "PIXELS_PER_MEGAPIXEL",
    "ChatPricing",
    "ImagePricing",
    "chat_price_micro",
    "chat_worst_case_micro",
    "partial_chat_price_micro",
    "estimate_prompt_tokens",
    "image_is_high_quality",
    "image_price_micro",
    "settlement_micro",
    "split_fee",
    "credits_to_micro",
    "micro_to_credits",
]

MICRO_PER_CREDIT = 1_000_000
"""Micro-credits per credit."""

MAX_MICRO = 2**63 - 1
"""Largest amount the ledger stores (a signed 64-bit integer, PostgreSQL BIGINT)."""

BPS_DENOMINATOR = 10_000
"""Basis points per whole (100% = 10,000 bps)."""

CHARS_PER_TOKEN_ESTIMATE = 4
"""Characters per token assumed when estimating prompt tokens before tokenising."""

MESSAGE_OVERHEAD_TOKENS = 4
"""Tokens assumed per chat message for the chat template (role markers, separators)."""

PIXELS_PER_MEGAPIXEL = 1024 * 1024
"""A 'megapixel' for image pricing is one 1024x1024 frame (1,048,576 pixels)."""


def _ceil_div(numerator: int, denominator: int) -> int:
    """Integer ceil-division for a non-negative numerator and positive denominator."""
    return -(-numerator // denominator)


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_amount(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int of micro-credits, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{owner}.{name} must be >= 0, got {value}")
    if value > MAX_MICRO:
        raise ValueError(f"{owner}.{name} must be <= {MAX_MICRO}, got {value}")


# --------------------------------------------------------------------------------------
# Pricing rules
# --------------------------------------------------------------------------------------


class ChatPricing(msgspec.Struct, frozen=True, kw_only=True, tag="chat"):
    """Price rule of a chat Cargo, all amounts in micro-credits.

    ``price = clamp(base + ceil((prompt_tokens * per_1k_prompt
    + completion_tokens * per_1k_completion) / 1000), min, max)``
    """

    base_micro: int
    per_1k_prompt_tokens_micro: int
    per_1k_completion_tokens_micro: int
    min_micro: int
    max_micro: int

    def __post_init__(self) -> None:
        for name in (
            "base_micro",
            "per_1k_prompt_tokens_micro",
            "per_1k_completion_tokens_micro",
            "min_micro",
            "max_micro",
        ):
            _check_amount("ChatPricing", name, getattr(self, name))
        if self.min_micro > self.max_micro:
            raise ValueError(
                f"ChatPricing.min_micro ({self.min_micro}) must be <= max_micro ({self.max_micro})"
            )


class ImagePricing(msgspec.Struct, frozen=True, kw_only=True, tag="image"):
    """Price rule of an image Cargo, all amounts in micro-credits.

    ``raw = base + ceil(per_megapixel_step * width * height * steps / 1_048_576)``.
    A request is *high quality* when ``steps > hq_steps_threshold`` or
    ``width * height > hq_pixels_threshold``; its price is ``clamp(raw, hq_min, hq_max)``,
    otherwise ``clamp(raw, min, max)``. ``max <= hq_min`` is required, which makes the
    price monotone (never decreasing) in width, height and steps.
    """

    base_micro: int
    per_megapixel_step_micro: int
    min_micro: int
    max_micro: int
    hq_min_micro: int
    hq_max_micro: int
    hq_steps_threshold: int
    hq_pixels_threshold: int

    def __post_init__(self) -> None:
        for name in (
            "base_micro",
            "per_megapixel_step_micro",
            "min_micro",
            "max_micro",
            "hq_min_micro",
            "hq_max_micro",
        ):
            _check_amount("ImagePricing", name, getattr(self, name))
        for name in ("hq_steps_threshold", "hq_pixels_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ImagePricing.{name} must be an int >= 0, got {value!r}")
        if self.min_micro > self.max_micro:
            raise ValueError(
                f"ImagePricing.min_micro ({self.min_micro}) must be <= max_micro ({self.max_micro})"
            )
        if self.hq_min_micro > self.hq_max_micro:
            raise ValueError(
                f"ImagePricing.hq_min_micro ({self.hq_min_micro}) must be <= "
                f"hq_max_micro ({self.hq_max_micro})"
            )
        if self.max_micro > self.hq_min_micro:
            raise ValueError(
                f"ImagePricing.max_micro ({self.max_micro}) must be <= hq_min_micro "
                f"({self.hq_min_micro}) so that a high-quality image never costs less "
                "than a standard one"
            )


# --------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------


def _chat_raw_micro(pricing: ChatPricing, prompt_tokens: int, completion_tokens: int) -> int:
    variable = (
        prompt_tokens * pricing.per_1k_prompt_tokens_micro
        + completion_tokens * pricing.per_1k_completion_tokens_micro
    )
    return pricing.base_micro + _ceil_div(variable, 1000)


def chat_price_micro(pricing: ChatPricing, prompt_tokens: int, completion_tokens: int) -> int:
    """Price of a completed chat Job, in micro-credits.

    ``clamp(base + ceil((prompt * per_1k_prompt + completion * per_1k_completion) / 1000),
    min, max)``. Monotone: never decreases when either token count grows, so the
    price of any request is at most :func:`chat_worst_case_micro` for the same
    prompt estimate and ``max_tokens``. Raises ``ValueError``/``TypeError`` for
    negative or non-int token counts.
    """
    _check_count("prompt_tokens", prompt_tokens)
    _check_count("completion_tokens", completion_tokens)
    raw = _chat_raw_micro(pricing, prompt_tokens, completion_tokens)
    return min(max(raw, pricing.min_micro), pricing.max_micro)


def chat_worst_case_micro(
    pricing: ChatPricing, prompt_tokens_estimate: int, max_tokens: int
) -> int:
    """Amount to hold at admission: the price if all ``max_tokens`` are generated.

    The prompt token count is only an estimate at admission (see
    :func:`estimate_prompt_tokens`); if the Island reports more prompt tokens
    than estimated, the computed price may exceed the hold, and settlement
    clamps to the hold (:func:`settlement_micro`): the consumer never pays more
    than was held.
    """
    return chat_price_micro(pricing, prompt_tokens_estimate, max_tokens)


def partial_chat_price_micro(
    pricing: ChatPricing,
    prompt_tokens: int,
    completion_tokens_delivered: int,
    hold_micro: int,
) -> int:
    """Price of a chat Job cancelled (or failed after streaming) mid-stream.

    Rule: charge what was delivered.

    * Nothing delivered (``completion_tokens_delivered == 0``): ``0`` (the hold is
      released in full, as for a cancellation before work).
    * Otherwise ``base + ceil((prompt * per_1k_prompt + delivered * per_1k_completion)
      / 1000)``, **without** the ``min`` floor (the minimum applies to completed Jobs
      only), capped at ``max`` and at ``hold_micro``.

    Hence ``0 <= partial <= min(chat_price_micro(prompt, delivered), hold)``, and
    partial is monotone in ``completion_tokens_delivered``.
    """
    _check_count("prompt_tokens", prompt_tokens)
    _check_count("completion_tokens_delivered", completion_tokens_delivered)
    _check_count("hold_micro", hold_micro)
    if completion_tokens_delivered == 0:
        return 0
    raw = _chat_raw_micro(pricing, prompt_tokens, completion_tokens_delivered)
    return min(raw, pricing.max_micro, hold_micro)


def estimate_prompt_tokens(text_chars: int, message_count: int = 0) -> int:
    """Upper-ish estimate of prompt tokens before tokenisation.

    ``ceil(text_chars / 4) + 4 * message_count``. Four characters per token is the
    usual average for English with Llama/Mistral-class tokenisers; code, non-Latin
    scripts and unusual text can tokenise denser, which is why settlement clamps
    to the hold instead of trusting this estimate.
    """
    _check_count("text_chars", text_chars)
    _check_count("message_count", message_count)
    return _ceil_div(text_chars, CHARS_PER_TOKEN_ESTIMATE) + MESSAGE_OVERHEAD_TOKENS * message_count


# --------------------------------------------------------------------------------------
# Image
# --------------------------------------------------------------------------------------


def image_is_high_quality(pricing: ImagePricing, width: int, height: int, steps: int) -> bool:
    """True when the request is priced in the high-quality band."""
    return steps > pricing.hq_steps_threshold or width * height > pricing.hq_pixels_threshold


def image_price_micro(pricing: ImagePricing, width: int, height: int, steps: int) -> int:
    """Price of an image Job, in micro-credits; also its hold (known at admission).

    ``raw = base + ceil(per_megapixel_step * width * height * steps / 1_048_576)``,
    clamped to ``[hq_min, hq_max]`` if :func:`image_is_high_quality`, else to
    ``[min, max]``. Monotone in width, height and steps.
    """
    _check_count("width", width)
    _check_count("height", height)
    _check_count("steps", steps)
    raw = pricing.base_micro + _ceil_div(
        pricing.per_megapixel_step_micro * width * height * steps, PIXELS_PER_MEGAPIXEL
    )
    if image_is_high_quality(pricing, width, height, steps):
        return min(max(raw, pricing.hq_min_micro), pricing.hq_max_micro)
    return min(max(raw, pricing.min_micro), pricing.max_micro)


# --------------------------------------------------------------------------------------
# Settlement
# --------------------------------------------------------------------------------------


def settlement_micro(price_micro: int, hold_micro: int) -> int:
    """Amount actually posted at settlement: ``min(price, hold)``; never above the hold."""
    _check_count("price_micro", price_micro)
    _check_count("hold_micro", hold_micro)
    return min(price_micro, hold_micro)


def split_fee(price_micro: int, fee_bps: int) -> tuple[int, int]:
    """Split a settled price into ``(island_earning_micro, platform_fee_micro)``.

    ``fee = floor(price * fee_bps / 10_000)``; ``earning = price - fee``. The two sum
    to ``price_micro`` exactly; rounding favours the Island. ``fee_bps`` must be in
    ``0..10_000``.
    """
    _check_count("price_micro", price_micro)
    if isinstance(fee_bps, bool) or not isinstance(fee_bps, int):
        raise TypeError(f"fee_bps must be an int, got {type(fee_bps).__name__}")
    if not 0 <= fee_bps <= BPS_DENOMINATOR:
        raise ValueError(f"fee_bps must be between 0 and {BPS_DENOMINATOR}, got {fee_bps}")
    fee = price_micro * fee_bps // BPS_DENOMINATOR
    return price_micro - fee, fee


# --------------------------------------------------------------------------------------
# Credits <-> micro-credits
# --------------------------------------------------------------------------------------

_DECIMAL_RE = re.compile(r"([+-]?)([0-9]+)(?:\.([0-9]+))?")


def credits_to_micro(value: str | int | Decimal, *, allow_negative: bool = False) -> int:
    """Parse an amount of credits exactly into micro-credits.

    Accepts an ``int`` (whole credits), a ``Decimal`` or a plain decimal string such as
    ``"1"``, ``"1.5"``, ``"0.000001"`` (optional sign, digits, optional ``.`` and 1-6
    fraction digits; surrounding whitespace is ignored). Rejects with ``ValueError``:
    more than 6 decimals (``"0.0000001"``), exponents (``"1e3"``), ``"inf"``/``"nan"``,
    empty strings, ``"1."``/``".5"``, negative amounts unless ``allow_negative``, and
    amounts whose magnitude exceeds :data:`MAX_MICRO`. Floats (and bools) raise
    ``TypeError``: parse the original text instead.
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise TypeError(
            f"credit amounts must be a decimal string, int or Decimal, not {type(value).__name__}"
        )
    if isinstance(value, int):
        micro = value * MICRO_PER_CREDIT
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"credit amount must be finite, got {value}")
        sign, digits, exponent = value.as_tuple()
        assert isinstance(exponent, int)
        coefficient = int("".join(map(str, digits)) or "0")
        shift = exponent + 6
        if coefficient == 0:
            micro = 0
        elif shift >= 0:
            if shift > 19:  # coefficient >= 1, so the amount exceeds MAX_MICRO
                raise ValueError(f"credit amount {value} is too large")
            micro = coefficient * 10**shift
        else:
            if -shift > len(digits):  # 0 < coefficient < 10**-shift
                raise ValueError(f"credit amount {value} has more than 6 decimal places")
            micro, remainder = divmod(coefficient, 10**-shift)
            if remainder:
                raise ValueError(f"credit amount {value} has more than 6 decimal places")
        if sign:
            micro = -micro
    elif isinstance(value, str):
        text = value.strip()
        match = _DECIMAL_RE.fullmatch(text) if len(text) <= 64 else None
        if match is None:
            raise ValueError(
                f"invalid credit amount {value[:40]!r}: expected a decimal number such as "
                "'12' or '0.5' (no exponent, at most 6 decimal places)"
            )
        sign, whole, fraction = match.groups()
        fraction = fraction or ""
        if len(fraction) > 6:
            raise ValueError(
                f"invalid credit amount {value!r}: at most 6 decimal places "
                "(1 micro-credit = 0.000001 credit)"
            )
        micro = int(whole) * MICRO_PER_CREDIT + int(fraction.ljust(6, "0"))
        if sign == "-":
            micro = -micro
    else:
        raise TypeError(
            f"credit amounts must be a decimal string, int or Decimal, not {type(value).__name__}"
        )
    if micro < 0 and not allow_negative:
        raise ValueError(f"credit amount must not be negative, got {value}")
    if abs(micro) > MAX_MICRO:
        raise ValueError(f"credit amount {value} exceeds the maximum of {micro_to_credits(MAX_MICRO)}")
    return micro


def micro_to_credits(micro: int) -> Decimal:
    """Exact credits for an amount of micro-credits, as a ``Decimal``.

    Trailing fraction zeros are dropped and no exponent notation is produced:
    ``1_500_000 -> Decimal("1.5")``, ``20_000_000 -> Decimal("20")``,
    ``1 -> Decimal("0.000001")``. Encode with
    ``msgspec.json.Encoder(decimal_format="number")`` for a JSON number.
    """
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise TypeError(f"micro must be an int, got {type(micro).__name__}")
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO_PER_CREDIT)
    if fraction == 0:
        return Decimal(f"{sign}{whole}")
    return Decimal(f"{sign}{whole}.{str(fraction).rjust(6, '0').rstrip('0')}")
