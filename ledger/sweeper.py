"""Release holds whose expiry has passed, so no credit stays locked if a Job is lost.

The sweeper tails the log incrementally (it keeps a fold of open holds and the last
position it read), so each tick costs only the events since the previous tick."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from uuid import UUID

import structlog

from ledger.audit import LedgerFold
from ledger.errors import HoldAlreadyResolved, HoldNotFound
from ledger.service import Ledger

log = structlog.get_logger("ledger.sweeper")

MAX_RELEASES_PER_TICK = 1_000


class HoldSweeper:
    def __init__(self, ledger: Ledger, read_log: Callable[[int], Iterable[tuple[int, Any]]]) -> None:
        self.ledger = ledger
        self.read_log = read_log  # start position -> (position, event) pairs
        self.fold = LedgerFold(check=False)

    def tick(self, now_ms: int) -> int:
        for position, event in self.read_log(self.fold.last_position + 1):
            self.fold.apply(position, event)
        released = 0
        for acct, hold_id, _amount, expires_ms in self.fold.open_holds():
            if expires_ms > now_ms:
                continue
            try:
                self.ledger.release_hold(UUID(acct), hold_id, "expired")
                released += 1
            except (HoldAlreadyResolved, HoldNotFound):
                continue
            log.info("hold_expired_released", account_id=acct, hold_id=hold_id)
            if released >= MAX_RELEASES_PER_TICK:
                break
        return released
