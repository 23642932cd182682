"""Audit: fold the log into balances, check every invariant, answer point-in-time and
statement questions. Pure over a stream of (position, event); callers feed it the log."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from eventsourcing.utils import get_topic

from ledger import names
from ledger.accounts import Account
from store.chain import ChainReport, verify_chains
from store.clock import datetime_to_ms

_LEDGER_CLASSES = (Account.Opened, Account.Funded, Account.Debited, Account.HoldPlaced, Account.HoldPosted,
                   Account.HoldReleased)
LEDGER_TOPICS = tuple(get_topic(cls) for cls in _LEDGER_CLASSES)


@dataclass
class StatementLine:
    position: int
    time: datetime
    event: str
    code: str
    counterparty: str
    reference: str
    amount_micro: int  # signed: + credits in, - credits out
    balance_after_micro: int


@dataclass
class Violation:
    position: int
    message: str


@dataclass
class LedgerFold:
    """Balances of every ledger account, holds and violations, after the events applied."""

    check: bool = True
    balances: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    transfers: int = 0
    events: int = 0
    last_position: int = 0
    holds: dict[tuple[str, str], list] = field(default_factory=dict)  # (account, hold) -> [amount, expires, state]
    accounts: set[str] = field(default_factory=set)
    violations: list[Violation] = field(default_factory=list)

    def _fail(self, position: int, message: str) -> None:
        self.violations.append(Violation(position, message))

    def apply(self, position: int, event: Any) -> None:
        self.last_position = position
        if isinstance(event, Account.Opened):
            self.accounts.add(str(event.originator_id))
            return
        transfers = getattr(event, "transfers", None)
        if transfers is None or not isinstance(event, Account.Event):
            return
        self.events += 1
        acct = str(event.originator_id)
        for row in transfers:
            debit, credit, amount, code = row
            if self.check:
                if not isinstance(amount, int) or amount <= 0:
                    self._fail(position, f"transfer amount must be a positive integer, got {amount!r}")
                if code not in names.CODES:
                    self._fail(position, f"unknown transfer code {code!r}")
                if debit == credit:
                    self._fail(position, f"transfer from {debit} to itself")
                if acct not in debit and acct not in credit and code not in (names.EARNING, names.FEE):
                    self._fail(position, f"transfer {debit}->{credit} does not touch account {acct}")
            self.balances[debit] -= amount
            self.balances[credit] += amount
            self.transfers += 1
        if not self.check:
            self._track_holds(position, acct, event)
            return
        if self.balances[names.PLATFORM_CLEARING] != 0:
            self._fail(position, f"clearing account not zero after settlement: {self.balances[names.PLATFORM_CLEARING]}")
        spendable = self.balances[names.spendable(acct)]
        if spendable < 0:
            self._fail(position, f"account {acct} spendable balance negative: {spendable}")
        if spendable != event.spendable_after_micro:
            self._fail(position, f"account {acct} spendable recomputed {spendable} != recorded "
                                 f"{event.spendable_after_micro}")
        held_after = getattr(event, "held_after_micro", None)
        if held_after is not None and self.balances[names.held(acct)] != held_after:
            self._fail(position, f"account {acct} held recomputed {self.balances[names.held(acct)]} != recorded "
                                 f"{held_after}")
        self._track_holds(position, acct, event)

    def _track_holds(self, position: int, acct: str, event: Any) -> None:
        if isinstance(event, Account.HoldPlaced):
            key = (acct, event.hold_id)
            if key in self.holds:
                self._fail(position, f"hold {event.hold_id} of {acct} placed twice")
            self.holds[key] = [event.transfers[0][2], event.expires_at_ms, "open"]
        elif isinstance(event, (Account.HoldPosted, Account.HoldReleased)):
            key = (acct, event.hold_id)
            hold = self.holds.get(key)
            if hold is None:
                self._fail(position, f"hold {event.hold_id} of {acct} resolved but never placed")
                return
            if hold[2] != "open":
                self._fail(position, f"hold {event.hold_id} of {acct} resolved twice (was {hold[2]})")
            if isinstance(event, Account.HoldPosted):
                if event.posted_micro > hold[0]:
                    self._fail(position, f"hold {event.hold_id} posted {event.posted_micro} > held {hold[0]}")
                hold[2] = "posted"
            else:
                hold[2] = "released"

    def finish(self, now_ms: int | None, grace_ms: int) -> None:
        """End-of-log checks: the books sum to zero; no hold open past its expiry."""
        total = sum(self.balances.values())
        if total != 0:
            self._fail(self.last_position, f"sum over all accounts is {total}, not zero")
        if now_ms is not None:
            for (acct, hold_id), (amount, expires, state) in self.holds.items():
                if state == "open" and expires + grace_ms < now_ms:
                    self._fail(self.last_position, f"hold {hold_id} of {acct} ({amount} micro) expired at "
                                                   f"{expires} ms and is still open")

    def open_holds(self) -> list[tuple[str, str, int, int]]:
        return [(a, h, amt, exp) for (a, h), (amt, exp, st) in self.holds.items() if st == "open"]

    def summary(self) -> dict[str, Any]:
        return {
            "balanced": not self.violations,
            "transfers": self.transfers,
            "accounts": len(self.accounts),
            "ledger_accounts": sum(1 for v in self.balances if v),
            "events": self.events,
            "last_position": self.last_position,
            "open_holds": sum(1 for h in self.holds.values() if h[2] == "open"),
            "sum_micro": sum(self.balances.values()),
            "violations": len(self.violations),
        }


def fold(log: Iterable[tuple[int, Any]], *, check: bool = True, upto_position: int | None = None,
         upto_ms: int | None = None) -> LedgerFold:
    result = LedgerFold(check=check)
    for position, event in log:
        if upto_position is not None and position > upto_position:
            break
        if upto_ms is not None and _event_ms(event) > upto_ms:
            break
        result.apply(position, event)
    return result


def verify_log(log: Iterable[tuple[int, Any]], *, now_ms: int | None, grace_ms: int,
               upto_position: int | None = None) -> tuple[LedgerFold, ChainReport, int]:
    """`ledger verify` in one pass over the whole log (every topic, from position 1): the
    checked ledger fold over the ledger events, and the hash chain of every chained stream
    (accounts, Jobs, Islands; store/chain.py). Returns (fold, chains, last position read).
    `now_ms` None skips the end-of-log expiry check (verifying as of a past position)."""
    f = LedgerFold(check=True)
    last = [0]

    def feed():
        for position, event in log:
            if upto_position is not None and position > upto_position:
                return
            last[0] = position
            if type(event) in _LEDGER_CLASSES:
                f.apply(position, event)
            yield position, event

    chains = verify_chains(feed())
    f.finish(now_ms, grace_ms)
    return f, chains, last[0]


def _event_ms(event: Any) -> int:
    return datetime_to_ms(event.timestamp)


def statement(log: Iterable[tuple[int, Any]], ledger_account: str) -> list[StatementLine]:
    """Every change of one ledger account, with the running balance after it."""
    lines: list[StatementLine] = []
    balance = 0
    for position, event in log:
        transfers = getattr(event, "transfers", None)
        if not transfers:
            continue
        for debit, credit, amount, code in transfers:
            if ledger_account not in (debit, credit):
                continue
            signed = amount if credit == ledger_account else -amount
            balance += signed
            lines.append(StatementLine(position, event.timestamp, type(event).__name__, code,
                                       debit if signed > 0 else credit, event.reference, signed, balance))
    return lines
