"""A deterministic discrete-event engine on a virtual clock.

* Time is an integer number of **milliseconds** since the start of the run (``engine.now``).
* Pending events live in one binary heap of tuples ``(time_ms, seq, fn, a, b)``. ``seq`` is
  a global counter, so two events at the same millisecond run in the order they were
  scheduled (FIFO) and the heap never compares callbacks. Running an event calls
  ``fn(a, b)``: passing two plain arguments instead of building a closure keeps the hot
  path free of per-event allocations besides the heap tuple itself.
* All randomness comes from named sub-streams of one seed (``rng_for("demand")``). A
  stream's seed is derived from ``(seed, name)`` by SHA-256, so adding draws to one stream,
  or adding a new stream, never shifts the numbers any other stream produces. Never use
  the global ``random`` module or ``hash()`` of a string (salted per process) in the
  simulator.

The engine knows nothing about Jobs or Islands; ``simulations.world`` builds on it.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from statistics import NormalDist
from typing import Any

_push = heapq.heappush

#: "no limit" for ``run(until_ms=None)``; far beyond any simulated horizon.
FOREVER_MS = 2**62


#: Standard normal deviates as a table of 65,536 quantiles (the exact inverse CDF at the
#: bin midpoints): ``NORMAL_TABLE[rng.getrandbits(16)]`` is a normal draw that costs one
#: C call instead of ``random.gauss``'s Python code. Tails are cut at about +-4.3 sigma,
#: which is more than enough for speed jitter and Job sizes.
NORMAL_BITS = 16
NORMAL_TABLE: tuple[float, ...] = tuple(NormalDist().inv_cdf((i + 0.5) / (1 << NORMAL_BITS))
                                        for i in range(1 << NORMAL_BITS))


def normal_draw(rng: random.Random) -> float:
    """One standard normal deviate from ``rng`` (see ``NORMAL_TABLE``)."""
    return NORMAL_TABLE[rng.getrandbits(NORMAL_BITS)]


def derive_seed(seed: int, name: str) -> int:
    """The seed of sub-stream ``name``: stable across processes, platforms and versions."""
    digest = hashlib.sha256(f"archipelag-sim/{int(seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:16], "big")


class Engine:
    """Event heap + virtual clock + seeded random streams."""

    __slots__ = ("now", "seed", "events_run", "_heap", "_seq", "_streams", "_cancelled", "_stop")

    def __init__(self, seed: int = 0) -> None:
        self.now = 0
        self.seed = int(seed)
        self.events_run = 0
        self._heap: list[tuple[int, int, Callable[[Any, Any], None], Any, Any]] = []
        self._seq = 0
        self._streams: dict[str, random.Random] = {}
        self._cancelled: set[int] = set()
        self._stop = False

    # ------------------------------------------------------------------ randomness
    def rng_for(self, name: str) -> random.Random:
        """The random stream called ``name`` (created on first use, then the same object)."""
        rng = self._streams.get(name)
        if rng is None:
            rng = self._streams[name] = random.Random(derive_seed(self.seed, name))
        return rng

    # ------------------------------------------------------------------ scheduling
    def schedule_at(self, time_ms: int, fn: Callable[[Any, Any], None], a: Any = None, b: Any = None) -> int:
        """Run ``fn(a, b)`` at ``time_ms`` (an int, never in the past). Returns a handle
        for ``cancel``."""
        if time_ms < self.now:
            raise ValueError(f"cannot schedule at {time_ms} ms: the clock is at {self.now} ms")
        seq = self._seq = self._seq + 1
        _push(self._heap, (time_ms, seq, fn, a, b))
        return seq

    def schedule_after(self, delay_ms: int, fn: Callable[[Any, Any], None], a: Any = None, b: Any = None) -> int:
        """Run ``fn(a, b)`` ``delay_ms`` (an int >= 0) after now."""
        if delay_ms < 0:
            raise ValueError(f"negative delay {delay_ms} ms")
        seq = self._seq = self._seq + 1
        _push(self._heap, (self.now + delay_ms, seq, fn, a, b))
        return seq

    def cancel(self, handle: int) -> None:
        """Cancel a scheduled event (lazily: it is skipped when it comes up). Hot paths
        should prefer a staleness token checked by the callback."""
        self._cancelled.add(handle)

    def stop(self) -> None:
        """Make the running ``run`` return after the current event."""
        self._stop = True

    @property
    def pending(self) -> int:
        return len(self._heap)

    def next_time_ms(self) -> int | None:
        return self._heap[0][0] if self._heap else None

    # ------------------------------------------------------------------ running
    def run(self, until_ms: int | None = None, max_events: int | None = None) -> int:
        """Run events in (time, seq) order until the heap is empty, the next event is
        later than ``until_ms`` (the clock then moves to ``until_ms``), ``max_events``
        events ran, or ``stop()`` was called. Returns the number of events run."""
        heap = self._heap
        pop = heapq.heappop
        until = FOREVER_MS if until_ms is None else int(until_ms)
        budget = -1 if max_events is None else int(max_events)
        cancelled = self._cancelled
        self._stop = False
        n = 0
        while heap and n != budget:
            t, seq, fn, a, b = pop(heap)
            if t > until:
                heapq.heappush(heap, (t, seq, fn, a, b))
                break
            if cancelled and seq in cancelled:
                cancelled.discard(seq)
                continue
            self.now = t
            fn(a, b)
            n += 1
            if self._stop:
                break
        if until_ms is not None and not self._stop and n != budget and self.now < until:
            self.now = until
        self.events_run += n
        return n


class VirtualClock:
    """The clock handed to the real code: ``now_ms()`` is milliseconds since the Unix
    epoch, ``epoch_ms`` at simulated time 0 (the scenario's ``start``)."""

    __slots__ = ("engine", "epoch_ms")

    def __init__(self, engine: Engine, epoch_ms: int = 0) -> None:
        self.engine = engine
        self.epoch_ms = int(epoch_ms)

    def now_ms(self) -> int:
        return self.epoch_ms + self.engine.now

    def sim_ms(self) -> int:
        """Milliseconds since the start of the run."""
        return self.engine.now
