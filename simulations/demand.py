"""Demand: when Jobs arrive and what they look like.

A demand stream is an arrival process (Poisson, on/off bursts, a diurnal curve, or a
replayed trace) plus a shape sampler that turns each arrival into a ``JobShape``: which
account sends it, which Cargo, how big it is. Arrival times and shapes draw from separate
random streams (``demand:<i>`` and ``shapes:<i>``), so changing a size distribution never
moves an arrival.

All arrival processes are exact: a piecewise-constant rate is simulated by drawing
exponential gaps at the current rate and restarting at each rate change (memorylessness
makes this exact), not by thinning on a grid.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate

import msgspec

from simulations.engine import NORMAL_TABLE

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


class JobShape(msgspec.Struct, kw_only=True, gc=False):
    """One Job as the demand sees it: when it arrives and what it asks for.

    ``account`` is an index into the scenario's account list (-1 = not decided yet; the
    shape sampler assigns one). ``max_tokens`` is what the consumer asks for (0 = not
    stated, the Cargo's default applies); ``completion_tokens`` is what the model will
    actually generate (<= ``max_tokens`` when both are set). ``run_ms`` > 0 is a run time
    observed in a trace and replaces the Island speed model.
    """

    arrival_ms: int
    cargo: str = "llm-chat"
    account: int = -1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int = 0
    width: int = 0
    height: int = 0
    steps: int = 0
    run_ms: int = 0


# ---------------------------------------------------------------------- specs
class _Spec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="kind"):
    pass


class _StreamCommon(_Spec, kw_only=True):
    consumers: list[str] = []  # consumer class names that send this stream's Jobs; [] = all
    cargo: str | None = None  # force one Cargo instead of each account's mix
    start_s: float = 0.0  # first possible arrival (simulated seconds)
    end_s: float | None = None  # no arrival at or after this time; None = the run's duration


class PoissonDemand(_StreamCommon, kw_only=True, tag="poisson"):
    rate_per_s: float


class BurstDemand(_StreamCommon, kw_only=True, tag="bursts"):
    """On/off modulated Poisson: ``rate_per_s`` while off, ``burst_rate_per_s`` while on.
    Period lengths are exponential with means ``on_s`` / ``off_s`` (``fixed = true``:
    exactly those lengths). The stream starts in the off state."""

    rate_per_s: float = 0.0
    burst_rate_per_s: float
    on_s: float
    off_s: float
    fixed: bool = False


class DiurnalDemand(_StreamCommon, kw_only=True, tag="diurnal"):
    """Poisson with rate ``rate_per_s * hourly[h]`` where ``h`` is the hour of the day
    (UTC) of the simulated clock (the scenario's ``start`` sets the hour of time 0)."""

    rate_per_s: float
    hourly: list[float]


class TraceDemand(_StreamCommon, kw_only=True, tag="trace"):
    """Replay a trace file: arrival times and Job sizes from the file, accounts from the
    consumer population. See ``simulations.traces``."""

    path: str
    format: str = "azure-llm"
    time_scale: float = 1.0  # 2.0 = replay twice as fast
    sample: float = 1.0  # keep this fraction of rows (seeded)
    limit: int | None = None  # keep at most this many rows (after sampling)


DemandSpec = PoissonDemand | BurstDemand | DiurnalDemand | TraceDemand


class Lognormal(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A lognormal size: ``median * exp(sigma * N(0,1))``, rounded, clamped to [min, max]
    (N(0,1) from ``engine.NORMAL_TABLE``)."""

    median: float
    sigma: float = 0.0
    min: int = 1
    max: int = 1 << 30


class SizeSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Job sizes of one Cargo. Chat Cargos use the token fields, image Cargos the image
    fields."""

    prompt_tokens: Lognormal | None = None
    completion_tokens: Lognormal | None = None
    max_tokens: int = 0  # what consumers ask for; completions are clamped to it; 0 = unstated
    sizes: list[str] = []  # image sizes "WxH"
    size_weights: list[float] = []
    steps: list[int] = []
    steps_weights: list[float] = []


DEFAULT_SIZES: dict[str, dict] = {
    "llm-chat": {
        "prompt_tokens": {"median": 400, "sigma": 1.0, "min": 1, "max": 8000},
        "completion_tokens": {"median": 250, "sigma": 0.8, "min": 1, "max": 2048},
        "max_tokens": 1024,
    },
    "llm-chat-lite": {
        "prompt_tokens": {"median": 200, "sigma": 0.9, "min": 1, "max": 4000},
        "completion_tokens": {"median": 150, "sigma": 0.8, "min": 1, "max": 1024},
        "max_tokens": 512,
    },
    "sdxl": {
        "sizes": ["1024x1024", "768x768", "1024x1536"],
        "size_weights": [0.7, 0.2, 0.1],
        "steps": [30, 20, 50],
        "steps_weights": [0.7, 0.15, 0.15],
    },
}


def parse_size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) <= 0 or int(h) <= 0:
        raise ValueError(f"image size {text!r} is not WIDTHxHEIGHT, e.g. \"1024x1024\"")
    return int(w), int(h)


# ---------------------------------------------------------------------- arrival processes
RateFn = Callable[[float], tuple[float, float]]  # t_ms -> (rate per ms, time of next change in ms)


def piecewise_arrivals(rng: random.Random, rate_at: RateFn, start_ms: float, end_ms: float) -> Iterator[int]:
    """Arrival times (integer ms, non-decreasing) of a Poisson process whose rate is
    piecewise constant. Exact: at each rate change the pending gap is redrawn."""
    t = float(start_ms)
    expo = rng.expovariate
    while t < end_ms:
        rate, change = rate_at(t)
        if change <= t:
            raise ValueError("rate function must report a change time after t")
        if rate <= 0:
            t = change
            continue
        gap = expo(rate)
        if t + gap >= change:
            t = change
            continue
        t += gap
        if t >= end_ms:
            return
        yield int(t)


def poisson_arrivals(rng: random.Random, rate_per_s: float, start_ms: float = 0, end_ms: float = math.inf) -> Iterator[int]:
    """Constant-rate Poisson arrivals (the fast path of ``piecewise_arrivals``)."""
    if rate_per_s <= 0:
        return
    rate = rate_per_s / 1000.0
    expo = rng.expovariate
    t = float(start_ms)
    while True:
        t += expo(rate)
        if t >= end_ms:
            return
        yield int(t)


def burst_arrivals(rng: random.Random, rate_per_s: float, burst_rate_per_s: float, on_s: float, off_s: float,
                   start_ms: float = 0, end_ms: float = math.inf, fixed: bool = False) -> Iterator[int]:
    """On/off bursts. Period lengths come from the same stream as the gaps."""
    if on_s <= 0 or off_s <= 0:
        raise ValueError("bursts need on_s > 0 and off_s > 0")
    if rate_per_s < 0 or burst_rate_per_s < 0 or rate_per_s + burst_rate_per_s <= 0:
        raise ValueError("bursts need rates >= 0, at least one of them > 0")
    state = {"on": False, "until": float(start_ms)}

    def period(mean_s: float) -> float:
        return mean_s * 1000.0 if fixed else max(1.0, rng.expovariate(1.0 / (mean_s * 1000.0)))

    state["until"] = start_ms + period(off_s)

    def rate_at(t: float) -> tuple[float, float]:
        while t >= state["until"]:
            state["on"] = not state["on"]
            state["until"] += period(on_s if state["on"] else off_s)
        return (burst_rate_per_s if state["on"] else rate_per_s) / 1000.0, state["until"]

    return piecewise_arrivals(rng, rate_at, start_ms, end_ms)


def diurnal_arrivals(rng: random.Random, rate_per_s: float, hourly: Sequence[float], day_offset_ms: int = 0,
                     start_ms: float = 0, end_ms: float = math.inf) -> Iterator[int]:
    """Rate ``rate_per_s * hourly[hour of day]``; ``day_offset_ms`` is the time of day
    (ms since midnight) at simulated time 0."""
    if len(hourly) != 24 or any(m < 0 for m in hourly) or not any(hourly):
        raise ValueError("hourly must hold 24 multipliers >= 0, at least one of them > 0")
    per_ms = [rate_per_s * m / 1000.0 for m in hourly]

    def rate_at(t: float) -> tuple[float, float]:
        clock = t + day_offset_ms
        hour_start = (clock // HOUR_MS) * HOUR_MS
        return per_ms[int(hour_start // HOUR_MS) % 24], hour_start + HOUR_MS - day_offset_ms

    return piecewise_arrivals(rng, rate_at, start_ms, end_ms)


# ---------------------------------------------------------------------- shapes
class _Sizer:
    """Draws sizes for one Cargo."""

    __slots__ = ("kind", "prompt", "completion", "max_tokens", "sizes", "size_cum", "steps", "steps_cum")

    def __init__(self, cargo: str, spec: SizeSpec) -> None:
        self.prompt = spec.prompt_tokens
        self.completion = spec.completion_tokens
        self.max_tokens = spec.max_tokens
        self.sizes = [parse_size(s) for s in spec.sizes]
        self.steps = list(spec.steps)
        if self.sizes or self.steps:
            self.kind = "image"
            if not self.sizes or not self.steps:
                raise ValueError(f"sizes.{cargo}: an image Cargo needs both `sizes` and `steps`")
            self.size_cum = _cumulative(spec.size_weights or [1.0] * len(self.sizes), len(self.sizes), f"sizes.{cargo}.size_weights")
            self.steps_cum = _cumulative(spec.steps_weights or [1.0] * len(self.steps), len(self.steps), f"sizes.{cargo}.steps_weights")
        else:
            self.kind = "chat"
            if self.prompt is None or self.completion is None:
                raise ValueError(f"sizes.{cargo}: a chat Cargo needs `prompt_tokens` and `completion_tokens`")
            self.size_cum = self.steps_cum = []

    def fill(self, rng: random.Random, shape: JobShape) -> None:
        if self.kind == "chat":
            p, c = self.prompt, self.completion
            bits = rng.getrandbits
            v = int(p.median * math.exp(p.sigma * NORMAL_TABLE[bits(16)]) + 0.5) if p.sigma > 0 else int(p.median + 0.5)
            shape.prompt_tokens = p.min if v < p.min else p.max if v > p.max else v
            v = int(c.median * math.exp(c.sigma * NORMAL_TABLE[bits(16)]) + 0.5) if c.sigma > 0 else int(c.median + 0.5)
            comp = c.min if v < c.min else c.max if v > c.max else v
            if self.max_tokens:
                if comp > self.max_tokens:
                    comp = self.max_tokens
                shape.max_tokens = self.max_tokens
            shape.completion_tokens = comp
        else:
            w, h = self.sizes[_pick(rng, self.size_cum)]
            shape.width, shape.height = w, h
            shape.steps = self.steps[_pick(rng, self.steps_cum)]


def _cumulative(weights: Sequence[float], n: int, what: str) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"{what}: {len(weights)} weights for {n} choices")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{what}: weights must be >= 0 with a positive sum")
    return list(accumulate(float(w) for w in weights))


def _pick(rng: random.Random, cum: list[float]) -> int:
    if len(cum) == 1:
        return 0
    return min(bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)


class ShapeSampler:
    """Turns arrival times into JobShapes: picks an account (weighted by activity among
    the stream's consumer classes), a Cargo (the account's mix, or the stream's forced
    Cargo), and sizes (``sizes`` per Cargo)."""

    def __init__(self, rng: random.Random, accounts: Sequence, sizes: dict[str, SizeSpec],
                 classes: Sequence[str] = (), cargo: str | None = None) -> None:
        self.rng = rng
        pool = [a for a in accounts if not classes or a.cls in classes]
        if not pool:
            raise ValueError(f"no accounts in consumer classes {list(classes)}" if classes else "no accounts")
        self.pool = pool
        self.pool_cum = list(accumulate(a.activity for a in pool))
        if self.pool_cum[-1] <= 0:
            raise ValueError("consumer activity weights sum to zero")
        self.cargo = cargo
        self.sizers = {slug: _Sizer(slug, spec) for slug, spec in sizes.items()}

    def pick_account(self):
        pool = self.pool
        if len(pool) == 1:
            return pool[0]
        return pool[min(bisect_right(self.pool_cum, self.rng.random() * self.pool_cum[-1]), len(pool) - 1)]

    def shape(self, arrival_ms: int) -> JobShape:
        rng = self.rng
        random_ = rng.random
        pool = self.pool
        if len(pool) == 1:
            acct = pool[0]
        else:
            cum = self.pool_cum
            i = bisect_right(cum, random_() * cum[-1])
            acct = pool[i if i < len(pool) else len(pool) - 1]
        cargo = self.cargo
        if cargo is None:
            cargos = acct.cargos
            if len(cargos) == 1:
                cargo = cargos[0]
            else:
                cum = acct.cargo_cum
                i = bisect_right(cum, random_() * cum[-1])
                cargo = cargos[i if i < len(cargos) else len(cargos) - 1]
        shape = JobShape(arrival_ms=arrival_ms, cargo=cargo, account=acct.no)
        sizer = self.sizers.get(cargo)
        if sizer is None:
            raise ValueError(f"no sizes for Cargo {cargo!r}; add a [sizes.{cargo}] table")
        sizer.fill(rng, shape)
        return shape

    def assign(self, shape: JobShape) -> JobShape:
        """Give a replayed shape (sizes already known) an account."""
        if shape.account < 0:
            shape.account = self.pick_account().no
        if self.cargo:
            shape.cargo = self.cargo
        return shape
