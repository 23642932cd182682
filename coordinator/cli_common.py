"""What every `coordinator` command group shares: the usage error and the exit codes."""

from __future__ import annotations

from typing import Any

import msgspec

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """Bad input from the operator (exit 2, one clear line, no traceback)."""


_JSON = msgspec.json.Encoder(decimal_format="number")


def _print(obj: Any) -> None:
    """One JSON line on stdout (Decimals as numbers)."""
    print(_JSON.encode(obj).decode())
