"""The seam between the simulated world and the coordinator under test.

The **world** (``simulations.world``) owns everything physical: demand, consumers, Islands
(speeds, slots, latency, crashes, disconnects), the clock. The **system under test**
(SUT) owns every rule: admission (KYC, free tier, balance), the queue, routing, leases and
timeouts, settlement, karma. They talk only through two small interfaces:

* the world calls the SUT (``SystemUnderTest``): a consumer submits or cancels, an Island
  comes online / goes offline / heartbeats / accepts / streams / completes / fails, the
  coordinator process restarts;
* the SUT calls the world back (``SimHooks``): offer a Job to an Island, take an offer or
  a running Job back (revoke), a Job went back to the queue, a Job ended.

Jobs and Islands are named by small integers on this seam (``job_no``: arrival order;
``island_no``: index in the fleet). An adapter maps them to the real ids (UUIDs).

Two implementations exist:

* ``simulations.baseline.BareQueue`` - FIFO queue, first free slot, no rules (the
  reference "physics only" model and the speed baseline of ``python -m bench sim``);
* ``simulations.real.RealSystem`` - the adapter around ``scheduler.service.Scheduler``
  with the embedded in-memory store, ledger and routing (docs/SIMULATOR.md "The real
  system").

The world reads ``heartbeat_interval_ms``, ``wants_progress`` and ``lease_renew_ms`` after
``start``, so a SUT may set them from the scenario.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from simulations.consumers import SimAccount
    from simulations.demand import JobShape
    from simulations.engine import Engine, VirtualClock
    from simulations.fleet import SimIsland
    from simulations.scenario import CargoSpec, CoordinatorSpec

#: Terminal statuses a SUT may report through ``SimHooks.job_ended``.
TERMINAL = ("completed", "failed", "timeout", "cancelled")


class SimHooks(Protocol):
    """Implemented by the world; called by the SUT, synchronously, at the current
    simulated time."""

    def offer(self, job_no: int, island_no: int) -> None:
        """Send a Job to an Island. The Island acks after one round trip (or misses the
        ack, or rejects it when it has no free slot)."""

    def revoke(self, job_no: int, island_no: int) -> None:
        """The coordinator took the offer / the running Job back (ack timeout, lapsed
        lease, cancel); the Island stops working on it and frees its slot."""

    def requeued(self, job_no: int, reason: str) -> None:
        """The Job went back to the queue (for metrics; implies ``revoke``)."""

    def job_ended(self, job_no: int, status: str, reason: str = "", charged_micro: int | None = None) -> None:
        """The Job reached a terminal status (one of ``TERMINAL``). ``charged_micro`` is
        what the consumer was charged (None: the SUT keeps no ledger)."""


@runtime_checkable
class SystemUnderTest(Protocol):
    """What the simulator drives. All times are simulated ms since the run's start
    (``ctx.clock.now_ms()`` gives epoch ms for the real code)."""

    name: str
    #: Send ``heartbeat`` every this many ms per online Island; None = the SUT does not
    #: need heartbeats (slow-heartbeat faults then have no effect).
    heartbeat_interval_ms: int | None
    #: Deliver ``first_output`` (first token / first progress) as its own message.
    wants_progress: bool
    #: Islands renew the lease of each running Job this often (``renew``); None = never.
    lease_renew_ms: int | None

    def start(self, ctx: SimContext) -> None: ...

    # consumers
    def submit(self, job_no: int, shape: JobShape, account: SimAccount, now_ms: int) -> str | None:
        """Admit (return None) or refuse (return the reason, e.g. "kyc_required")."""

    def cancel(self, job_no: int, now_ms: int) -> None: ...

    # Islands
    def island_up(self, island: SimIsland, now_ms: int) -> None: ...
    def island_down(self, island_no: int, now_ms: int, reason: str) -> None: ...
    def heartbeat(self, island_no: int, now_ms: int) -> None: ...
    def accept(self, job_no: int, island_no: int, now_ms: int) -> None: ...
    def first_output(self, job_no: int, island_no: int, now_ms: int) -> None: ...
    def renew(self, job_no: int, island_no: int, now_ms: int) -> None:
        """The Island is still working on the Job (lease renewal; hung Jobs never renew)."""

    def complete(self, job_no: int, island_no: int, now_ms: int, run_ms: int) -> None:
        """The Island finished: usage = the shape's tokens / image, ``run_ms`` on the Island."""

    def fail(self, job_no: int, island_no: int, now_ms: int, reason: str) -> None:
        """The Island reports a failure ("crash", "rejected")."""

    # the coordinator process
    def restart(self, now_ms: int) -> None:
        """The coordinator process came back after a crash: drop in-memory state and
        rebuild it from the event log (messages that arrived while it was down follow)."""

    # observation
    def queue_depth(self) -> int: ...
    def credit_totals(self) -> tuple[int, int, int, int] | None:
        """Cumulative (charged, earned by Islands, fees, released) micro-credits, or None."""

    def finish(self, now_ms: int) -> dict[str, Any]:
        """End of run: ``credits``, ``karma`` ({min, median, max} or None, plus
        ``karma_values``), ``ledger_balanced``, ``log_digest`` of the SUT's own event log,
        and anything else worth reporting (under ``system``)."""


class SimContext:
    """What a SUT gets at ``start``."""

    __slots__ = ("engine", "clock", "islands", "accounts", "cargos", "config", "hooks", "seed", "faults_possible",
                 "free_tier_micro", "_timer")

    def __init__(self, *, engine: Engine, clock: VirtualClock, islands: Sequence[SimIsland],
                 accounts: Sequence[SimAccount], cargos: dict[str, CargoSpec], config: CoordinatorSpec,
                 hooks: SimHooks, seed: int, faults_possible: bool, free_tier_micro: int,
                 timer: Callable[[int, Callable[[Any, Any], None], Any, Any], None]) -> None:
        self.engine = engine
        self.clock = clock
        self.islands = islands
        self.accounts = accounts
        self.cargos = cargos
        self.config = config
        self.hooks = hooks
        self.seed = seed
        self.faults_possible = faults_possible  # Islands may miss acks or hang: keep leases
        self.free_tier_micro = free_tier_micro
        self._timer = timer

    def schedule_at(self, time_ms: int, fn: Callable[[Any, Any], None], a: Any = None, b: Any = None) -> None:
        """A SUT timer: ``fn(a, b)`` at ``time_ms``; held back while the coordinator is down."""
        self._timer(time_ms, fn, a, b)

    def rng_for(self, name: str):
        return self.engine.rng_for(f"sut/{name}")
