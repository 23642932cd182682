"""Small exact parsers shared by the scenario loader and the CLI: money and durations."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MICRO_PER_CREDIT = 1_000_000
_MONEY = re.compile(r"^\d+(\.\d{1,6})?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, None: 1_000}


def credits_to_micro(value: object, *, what: str = "amount") -> int:
    """Credits (an int or a decimal string with at most 6 decimals, e.g. ``"2.5"``) as
    integer micro-credits. Floats are refused: money is never a binary fraction."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected credits as a string like \"2.5\" or an integer, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: negative amount {value}")
        return value * MICRO_PER_CREDIT
    if isinstance(value, str) and _MONEY.match(value.strip()):
        try:
            return int(Decimal(value.strip()) * MICRO_PER_CREDIT)
        except InvalidOperation:  # pragma: no cover - the regex already guards
            pass
    raise ValueError(f"{what}: expected credits as a string like \"2.5\" (at most 6 decimals) or an integer, "
                     f"got {value!r}")


def micro_to_credits(micro: int) -> Decimal:
    """Exact credits for output (``1_500_000 -> Decimal('1.5')``)."""
    d = Decimal(int(micro)).scaleb(-6)
    return d.quantize(Decimal(1)) if d == d.to_integral_value() else d.normalize()


def parse_duration_ms(text: str | int | float) -> int:
    """``"90"`` (seconds), ``"90s"``, ``"15m"``, ``"2h"``, ``"1d"``, ``"250ms"`` -> milliseconds."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"negative duration: {text!r}")
        return int(round(text * 1000))
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (examples: 3600, 90s, 15m, 2h, 1d)")
    return int(round(float(m.group(1)) * _DURATION_UNIT_MS[m.group(2)]))
