"""The Job aggregate: a Job moves through legal states only; every transition is an
event with its cause. Its methods are its events.

    queued -> assigned -> running -> completed | failed | cancelled
       ^         |          |
       +---------+----------+  (offer declined or expired; lease lapsed, nothing streamed)
    pending -> queued       (batch children held back by max_parallelism)
    queued | pending -> timeout | cancelled
"""

from __future__ import annotations

from store.chain import ChainedAggregate

PENDING = "pending"
QUEUED = "queued"
ASSIGNED = "assigned"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TIMEOUT = "timeout"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMEOUT})
WAITING = frozenset({PENDING, QUEUED})


class IllegalTransition(Exception):
    """A command asked for a transition the Job's state does not allow."""

    def __init__(self, job_id: object, status: str, action: str) -> None:
        super().__init__(f"job {job_id} is {status}: cannot {action}")
        self.status = status
        self.action = action


class Job(ChainedAggregate):
    class Submitted(ChainedAggregate.Created):
        account_id: str
        cargo: str
        cargo_id: int
        kind: str
        model: str
        input: dict
        prefs: dict
        hold_micro: int
        max_attempts: int
        status: str
        parent_id: str
        batch_index: int
        idem_fp: str
        # The market (scheduler/market.py). Events written before the exchange lack them:
        # budget_source "" means priced at the list price, as then.
        budget_micro: int = 0
        budget_source: str = ""
        list_rate_micro: int = 0

    def __init__(self, account_id: str, cargo: str, cargo_id: int, kind: str, model: str, input: dict,  # noqa: A002
                 prefs: dict, hold_micro: int, max_attempts: int, status: str, parent_id: str, batch_index: int,
                 idem_fp: str, budget_micro: int = 0, budget_source: str = "", list_rate_micro: int = 0) -> None:
        assert status in WAITING
        self.account_id = account_id
        self.cargo = cargo
        self.cargo_id = cargo_id
        self.kind = kind
        self.model = model
        self.input = input
        self.prefs = prefs
        self.hold_micro = hold_micro
        self.max_attempts = max_attempts
        self.status = status
        self.parent_id = parent_id
        self.batch_index = batch_index
        self.idem_fp = idem_fp
        self.budget_micro = budget_micro  # rate per billing unit the consumer pays at most
        self.budget_source = budget_source  # bid | preference | market | list ("" before the exchange)
        self.list_rate_micro = list_rate_micro  # the Cargo's list rate at submission
        self.ask_micro = -1  # the selected Island's ask (-1: not assigned under the exchange)
        self.surge_permille = 1000
        self.clearing_micro = -1  # the clearing rate (-1: list pricing)
        self.attempts = 0  # assignments that reached running and then lapsed
        self.offers = 0
        self.excluded: list[str] = []
        self.exclusion_clears = 0  # times ExclusionsCleared gave the excluded Islands another try
        self.island_id = ""
        self.owner_account_id = ""
        self.started_at = None
        self.completed_at = None
        self.usage: dict | None = None
        self.output: str | None = None
        self.error: str | None = None
        self.charged_micro = 0
        self.tokens_per_s_milli = 0
        self.compute_ms = 0
        self.score: dict | None = None

    # ------------------------------------------------------------ events
    class Queued(ChainedAggregate.Event):
        """A pending Job (batch child) enters the dispatch queue."""

        def apply(self, job: Job) -> None:
            job.status = QUEUED

    class Assigned(ChainedAggregate.Event):
        """Offered to an Island; `score` explains why this one (routing breakdown)."""

        island_id: str
        owner_account_id: str
        ack_deadline_ms: int
        score: dict
        candidates: int
        # The clearing (scheduler/market.py): -1 in events written before the exchange.
        ask_micro: int = -1
        surge_permille: int = 1000
        clearing_micro: int = -1
        cargo: str = ""  # the Job's Cargo, so that a reader of clearings needs no other event

        def apply(self, job: Job) -> None:
            job.ask_micro = self.ask_micro
            job.surge_permille = self.surge_permille
            job.clearing_micro = self.clearing_micro
            job.status = ASSIGNED
            job.island_id = self.island_id
            job.owner_account_id = self.owner_account_id
            job.offers += 1
            job.score = self.score

    class OfferDeclined(ChainedAggregate.Event):
        """The Island rejected the offer or let it expire: back to the queue, Island excluded."""

        island_id: str
        reason: str  # rejected | ack_timeout | island_offline

        def apply(self, job: Job) -> None:
            job.status = QUEUED
            job.excluded = [*job.excluded, self.island_id]
            job.island_id = ""
            job.owner_account_id = ""
            _unclear(job)

    class Started(ChainedAggregate.Event):
        island_id: str
        lease_deadline_ms: int

        def apply(self, job: Job) -> None:
            job.status = RUNNING
            job.started_at = self.timestamp

    class Requeued(ChainedAggregate.Event):
        """The running Job's lease lapsed (or its Island went away) before any output."""

        island_id: str
        reason: str

        def apply(self, job: Job) -> None:
            job.status = QUEUED
            job.attempts += 1
            job.excluded = [*job.excluded, self.island_id]
            job.island_id = ""
            job.owner_account_id = ""
            job.started_at = None
            _unclear(job)

    class ExclusionsCleared(ChainedAggregate.Event):
        """The queued Job was stranded: only Islands that already failed it could take it,
        for longer than the scheduler's grace. They may be offered it again."""

        islands: list  # the Island ids no longer excluded
        waited_ms: int  # how long the Job had been stranded

        def apply(self, job: Job) -> None:
            job.excluded = []
            job.exclusion_clears += 1

    class Completed(ChainedAggregate.Event):
        usage: dict
        output: str
        charged_micro: int
        earning_micro: int
        fee_micro: int
        compute_ms: int
        tokens_per_s_milli: int
        # What the charge was computed from: the list price of the units used and the
        # clearing rate it was scaled to (-1: list pricing, events before the exchange).
        list_price_micro: int = -1
        clearing_micro: int = -1

        def apply(self, job: Job) -> None:
            job.status = COMPLETED
            job.usage = self.usage
            job.output = self.output
            job.charged_micro = self.charged_micro
            job.compute_ms = self.compute_ms
            job.tokens_per_s_milli = self.tokens_per_s_milli
            job.completed_at = self.timestamp

    class Failed(ChainedAggregate.Event):
        reason: str
        island_fault: bool
        charged_micro: int

        def apply(self, job: Job) -> None:
            job.status = FAILED
            job.error = self.reason
            job.charged_micro = self.charged_micro
            job.completed_at = self.timestamp

    class Cancelled(ChainedAggregate.Event):
        by: str
        stage: str  # the status it was cancelled in
        charged_micro: int
        usage: dict

        def apply(self, job: Job) -> None:
            job.status = CANCELLED
            job.error = f"cancelled by {self.by}"
            job.charged_micro = self.charged_micro
            job.usage = self.usage or None
            job.completed_at = self.timestamp

    class TimedOut(ChainedAggregate.Event):
        waited_ms: int

        def apply(self, job: Job) -> None:
            job.status = TIMEOUT
            job.error = f"no Island took the job within {self.waited_ms // 1000} s"
            job.completed_at = self.timestamp

    # ------------------------------------------------------------ reads
    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def require(self, statuses: frozenset[str] | set[str], action: str) -> None:
        if self.status not in statuses:
            raise IllegalTransition(self.id, self.status, action)


def _unclear(job: Job) -> None:
    """Back in the queue: the offer's clearing no longer holds (the next Assigned sets one)."""
    job.ask_micro = -1
    job.surge_permille = 1000
    job.clearing_micro = -1
