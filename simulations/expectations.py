"""Scenario expectations: ``"p99_wait_s < 5"``, ``"kyc_violations == 0"``,
``"ledger_balanced == true"``, ``"island_utilisation.by_tier.cpu >= 0.2"``.

Grammar (one comparison per string, parsed by a regular expression; nothing is ever
evaluated as code)::

    expectation := metric op value
    metric      := name ("." key)*          e.g. wait_s.p99, refusals.kyc_required
                 | pNN_series                sugar: p99_wait_s == wait_s.p99
    op          := "<" | "<=" | ">" | ">=" | "==" | "!="
    value       := number | true | false | null

``true`` / ``false`` / ``null`` only go with ``==`` / ``!=``. A metric that is missing or
null (not measured by the system under test) fails its expectation, with the reason
``unmeasured``; a missing ``refusals.<reason>`` counts as 0.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

MAX_LENGTH = 200
_EXPR = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)*)"
    r"\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<value>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|true|false|null)\s*$")
_SUGAR = re.compile(r"^(p50|p90|p95|p99|p999|mean|max)_(wait_s|ttft_s|e2e_s)$")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "==": operator.eq, "!=": operator.ne}
_ZERO_IF_MISSING = ("refusals", "faults")


class ExpectationError(ValueError):
    """An expectation string that does not parse; the message says why."""


class Expectation(NamedTuple):
    text: str
    path: tuple[str, ...]
    op: str
    value: float | int | bool | None


class Outcome(NamedTuple):
    expectation: Expectation
    ok: bool
    actual: Any
    why: str  # "" when ok; "violated", "unmeasured", "missing", "not a number"

    def describe(self) -> str:
        if self.ok:
            return f"ok        {self.expectation.text}  (actual {_fmt(self.actual)})"
        return f"{self.why.upper():9} {self.expectation.text}  (actual {_fmt(self.actual)})"


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def parse_expectation(text: str) -> Expectation:
    if not isinstance(text, str):
        raise ExpectationError(f"expectation must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExpectationError(f"expectation longer than {MAX_LENGTH} characters")
    m = _EXPR.match(text)
    if not m:
        raise ExpectationError(
            f"cannot parse expectation {text!r}: expected `metric op value`, e.g. `p99_wait_s < 5`, "
            f"`kyc_violations == 0`, `ledger_balanced == true` (ops: < <= > >= == !=)")
    metric, op, raw = m.group("metric"), m.group("op"), m.group("value")
    sugar = _SUGAR.match(metric)
    path = (sugar.group(2), sugar.group(1)) if sugar else tuple(metric.split("."))
    if any(part.startswith("__") for part in path):
        raise ExpectationError(f"{text!r}: metric names do not start with '__'")
    value: float | int | bool | None
    if raw in ("true", "false", "null"):
        if op not in ("==", "!="):
            raise ExpectationError(f"{text!r}: {raw} can only be compared with == or !=")
        value = None if raw == "null" else raw == "true"
    elif re.fullmatch(r"-?\d+", raw):
        value = int(raw)
    else:
        value = float(raw)
        if not math.isfinite(value):
            raise ExpectationError(f"{text!r}: value must be finite")
    return Expectation(text.strip(), path, op, value)


def parse_expectations(texts: list[str]) -> list[Expectation]:
    out = []
    for i, t in enumerate(texts):
        try:
            out.append(parse_expectation(t))
        except ExpectationError as exc:
            raise ExpectationError(f"expect[{i}]: {exc}") from None
    return out


def _lookup(metrics: Mapping[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = metrics
    for i, key in enumerate(path):
        if not isinstance(node, Mapping):
            return False, None
        if key not in node:
            if i == len(path) - 1 and i > 0 and path[0] in _ZERO_IF_MISSING and isinstance(node, Mapping):
                return True, 0
            return False, None
        node = node[key]
    return True, node


def check(exp: Expectation, metrics: Mapping[str, Any]) -> Outcome:
    found, actual = _lookup(metrics, exp.path)
    if not found:
        return Outcome(exp, False, None, "missing")
    if exp.value is None or isinstance(exp.value, bool):
        if actual is None and exp.value is not None:
            return Outcome(exp, False, None, "unmeasured")
        same = type(actual) is type(exp.value) and actual == exp.value
        ok = same if exp.op == "==" else not same
        return Outcome(exp, ok, actual, "" if ok else "violated")
    if actual is None:
        return Outcome(exp, False, None, "unmeasured")
    if isinstance(actual, bool) or not isinstance(actual, (int, float)):
        return Outcome(exp, False, actual, "not a number")
    ok = _OPS[exp.op](actual, exp.value)
    return Outcome(exp, bool(ok), actual, "" if ok else "violated")


def check_all(expectations: list[Expectation], metrics: Mapping[str, Any]) -> list[Outcome]:
    """Every expectation's outcome, in order."""
    return [check(e, metrics) for e in expectations]


def violated(expectations: list[Expectation], metrics: Mapping[str, Any]) -> list[Outcome]:
    """Only the failed ones (violated, unmeasured, missing, not a number)."""
    return [o for o in check_all(expectations, metrics) if not o.ok]
