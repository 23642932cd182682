"""Scheduler settings: every timeout, bound and weight in one place (units in names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from routing.karma import KarmaRates
from routing.types import Weights


@dataclass(frozen=True)
class SchedulerConfig:
    ack_timeout_ms: int = 10_000  # an offer not accepted in time goes back to the queue
    lease_ms: int = 60_000  # a running Job's lease; the Island renews it
    lease_renew_ms: int = 30_000  # how often Islands are told to renew
    queue_timeout_ms: int = 120_000  # a Job still queued after this ends `timeout`
    max_attempts: int = 3  # lapsed leases re-queue at most this many times in all
    # A queued Job that only Islands which already failed it could take (they are excluded)
    # waits this long for another Island, then forgets the exclusions, at most
    # `max_exclusion_clears` times (decision 0070): a lone Island that missed an ack during a
    # transport outage is tried again instead of stranding the Job until its queue timeout.
    stranded_grace_ms: int = 5_000
    max_exclusion_clears: int = 2
    heartbeat_interval_ms: int = 10_000
    missed_heartbeats_offline: int = 3  # an Island missing this many heartbeats is offline
    auto_approve_islands: bool = False  # demos only: new Islands get Jobs at once
    dispatch_batch_max: int = 256  # assignments decided per dispatch round
    dispatch_misses_per_cargo: int = 8  # queued Jobs tried per Cargo before giving up a round
    max_queued_per_account: int = 1_000  # bound on one account's backlog
    max_queued_total: int = 200_000  # bound on the whole queue
    log_poll_page: int = 1_000  # events read per poll of the log
    log_poll_ms: int = 100  # read the log for other processes' commits at least this often
    routing_seed: int = 0  # ties between equal Islands are broken by a seeded random source
    # The Compute Exchange (scheduler/market.py, docs/EXCHANGE.md)
    surge_ratio: int = 2  # surge when queued Jobs > surge_ratio x free slots of approved online Islands
    surge_multiplier_permille: int = 1250  # x1.25 while the surge is on
    surge_hold_ms: int = 30_000  # the surge rule is re-evaluated at most this often
    max_ask_micro: int = 1_000_000_000  # ceiling of an ask or a saved bid (COORDINATOR_MAX_ASK_CREDITS)
    weights: Weights = field(default_factory=Weights)
    karma: KarmaRates = field(default_factory=KarmaRates)

    def __post_init__(self) -> None:
        assert self.ack_timeout_ms > 0 and self.lease_ms > 0 and self.queue_timeout_ms > 0
        assert 0 < self.lease_renew_ms < self.lease_ms, "leases must be renewed before they lapse"
        assert self.max_attempts >= 1
        assert self.stranded_grace_ms > 0 and 0 <= self.max_exclusion_clears <= 10
        assert 1 <= self.dispatch_batch_max <= 10_000
        assert self.max_queued_per_account <= self.max_queued_total
        assert self.surge_ratio >= 1 and 1000 <= self.surge_multiplier_permille <= 10_000
        assert self.surge_hold_ms > 0 and self.max_ask_micro > 0

    @property
    def offline_after_ms(self) -> int:
        return self.heartbeat_interval_ms * self.missed_heartbeats_offline
