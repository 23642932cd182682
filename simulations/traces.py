"""Trace replay: a trace is arrival time plus a Job shape.

A *reader* knows one file format. It gets the CSV rows (as dicts, header checked) and
yields ``(time_ns, JobShape)`` with the time in any epoch (nanoseconds) and the shape's
sizes filled in. ``read_trace`` does the rest for every format: sorts by time (stable),
samples, limits, makes times relative to the trace's first row and applies the time
scale. Adding a format is one small function::

    @register("my-format", columns=("t", "tokens"))
    def _my_format(rows):
        for row in rows:
            yield seconds_to_ns(row["t"]), JobShape(arrival_ms=0, cargo="llm-chat",
                                                  prompt_tokens=int(row["tokens"]))

Times: relative to the first row **of the file** (so sampling thins a trace without
shifting it), ``arrival_ms = round(relative_ns / time_scale / 1e6)`` computed in exact
integer arithmetic.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from simulations.demand import JobShape
from simulations.engine import derive_seed

Row = dict[str, str]
Reader = Callable[[Iterable[Row]], Iterator[tuple[int, JobShape]]]


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class TraceFormat:
    name: str
    columns: tuple[str, ...]  # required columns (others are ignored)
    reader: Reader
    description: str = ""


FORMATS: dict[str, TraceFormat] = {}


def register(name: str, *, columns: tuple[str, ...], description: str = "") -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        if name in FORMATS:
            raise ValueError(f"trace format {name!r} registered twice")
        FORMATS[name] = TraceFormat(name, columns, fn, description or (fn.__doc__ or "").strip())
        return fn

    return deco


# ---------------------------------------------------------------------- helpers for readers
_DAYS: dict[str, int] = {}


def timestamp_to_ns(text: str) -> int:
    """``YYYY-MM-DD HH:MM:SS[.fffffff]`` (any number of fractional digits up to 9, a ``T``
    separator allowed, no zone = UTC) -> nanoseconds since 0001-01-01. Exact."""
    s = text.strip()
    day = _DAYS.get(s[:10])
    if day is None:
        day = _DAYS[s[:10]] = date.fromisoformat(s[:10]).toordinal()
    if len(s) < 19 or s[10] not in " T" or s[13] != ":" or s[16] != ":":
        raise ValueError(f"bad timestamp {text!r}")
    secs = int(s[11:13]) * 3600 + int(s[14:16]) * 60 + int(s[17:19])
    frac = s[20:] if len(s) > 19 else ""
    if len(s) > 19 and (s[19] != "." or not frac.isdigit() or len(frac) > 9):
        raise ValueError(f"bad timestamp {text!r}")
    return (day * 86_400 + secs) * 1_000_000_000 + int(frac.ljust(9, "0") or 0)


def seconds_to_ns(text: str) -> int:
    """A decimal number of seconds (``"12.5"``) -> nanoseconds, exactly."""
    try:
        d = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"bad number of seconds {text!r}") from None
    if not d.is_finite():
        raise ValueError(f"bad number of seconds {text!r}")
    return int(d * 1_000_000_000)


def non_negative_int(text: str, column: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"{column}: not an integer: {text!r}") from None
    if v < 0:
        raise ValueError(f"{column}: negative: {text!r}")
    return v


# ---------------------------------------------------------------------- formats
@register("azure-llm", columns=("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
          description="Azure LLM inference traces 2023 (TIMESTAMP,ContextTokens,GeneratedTokens); llm-chat Jobs")
def _azure_llm(rows: Iterable[Row]) -> Iterator[tuple[int, JobShape]]:
    for row in rows:
        yield timestamp_to_ns(row["TIMESTAMP"]), JobShape(
            arrival_ms=0, cargo="llm-chat",
            prompt_tokens=non_negative_int(row["ContextTokens"], "ContextTokens"),
            completion_tokens=non_negative_int(row["GeneratedTokens"], "GeneratedTokens"))


@register("image-gen", columns=("timestamp_s", "prompt_chars", "steps", "width", "height"),
          description="image generation requests (timestamp_s,prompt_chars,steps,width,height[,run_s]); sdxl Jobs")
def _image_gen(rows: Iterable[Row]) -> Iterator[tuple[int, JobShape]]:
    for row in rows:
        run = row.get("run_s") or ""
        yield seconds_to_ns(row["timestamp_s"]), JobShape(
            arrival_ms=0, cargo="sdxl",
            prompt_tokens=-(-non_negative_int(row["prompt_chars"], "prompt_chars") // 4),  # ~4 chars per token
            steps=non_negative_int(row["steps"], "steps"),
            width=non_negative_int(row["width"], "width"),
            height=non_negative_int(row["height"], "height"),
            run_ms=seconds_to_ns(run) // 1_000_000 if run.strip() else 0)


# ---------------------------------------------------------------------- reading
def read_trace(path: str | Path, format: str = "azure-llm", *, time_scale: float = 1.0, sample: float = 1.0,
               limit: int | None = None, seed: int = 0) -> list[JobShape]:
    """All Jobs of a trace file, in arrival order, with ``arrival_ms`` relative to the
    file's first row. ``time_scale`` 2.0 replays twice as fast; ``sample`` keeps each row
    with that probability (seeded by ``seed``); ``limit`` keeps the first N kept rows."""
    fmt = FORMATS.get(format)
    if fmt is None:
        raise TraceError(f"unknown trace format {format!r}; known: {', '.join(sorted(FORMATS))}")
    if not time_scale > 0:
        raise TraceError(f"time_scale must be > 0, got {time_scale!r}")
    if not 0.0 < sample <= 1.0:
        raise TraceError(f"sample must be in (0, 1], got {sample!r}")
    if limit is not None and limit < 0:
        raise TraceError(f"limit must be >= 0, got {limit!r}")
    path = Path(path)
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in fmt.columns if c not in header]
        if missing:
            raise TraceError(f"{path}: not a {format!r} trace: missing column(s) {', '.join(missing)}; "
                             f"header is {','.join(header) or '(empty file)'}")
        timed: list[tuple[int, JobShape]] = []
        it = fmt.reader(reader)
        while True:
            try:
                item = next(it)
            except StopIteration:
                break
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{path}, line {reader.line_num}: {exc}") from None
            timed.append(item)
    if any(timed[i][0] > timed[i + 1][0] for i in range(len(timed) - 1)):
        timed.sort(key=lambda ts: ts[0])  # stable: equal times keep file order
    if not timed:
        return []
    t0 = timed[0][0]
    rng = random.Random(derive_seed(seed, "trace-sample")) if sample < 1.0 else None
    scale = Fraction(str(time_scale))
    num = scale.numerator * 1_000_000  # relative_ns / (time_scale * 1e6), rounded half up
    den = scale.denominator
    out: list[JobShape] = []
    for t, shape in timed:
        if rng is not None and rng.random() >= sample:
            continue
        if limit is not None and len(out) >= limit:
            break
        shape.arrival_ms = ((t - t0) * den * 2 + num) // (2 * num)
        out.append(shape)
    return out


def iter_trace(path: str | Path, format: str = "azure-llm", **options) -> Iterator[JobShape]:
    yield from read_trace(path, format, **options)
