"""The consumer account aggregate: spendable balance (never below zero), holds, KYC and
free-tier facts. Its methods are its events; nothing else changes its state.

Every event that moves credits carries `transfers`: a list of
`[debit_account, credit_account, amount_micro, code]` rows (see ledger.names), and the
balances after it (`spendable_after_micro`, `held_after_micro`) so that an auditor can
check each event on its own. Commands check every rule *before* triggering an event.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from ledger import names
from store.chain import ChainedAggregate
from store.clock import Id

_PLAIN_ID_TYPES = (UUID, Id)  # ids whose str() is the canonical UUID text

HOLD_OPEN = "open"
HOLD_POSTED = "posted"
HOLD_RELEASED = "released"

# The account's identity verification (KYC) state, as GET /api/v1/verification/status shows it.
UNVERIFIED = "unverified"
PENDING = "pending"
VERIFIED = "verified"
REJECTED = "rejected"


class Hold:
    __slots__ = ("hold_id", "amount_micro", "reference", "expires_at_ms", "free_tier", "state", "posted_micro")

    def __init__(self, hold_id: str, amount_micro: int, reference: str, expires_at_ms: int, free_tier: bool) -> None:
        self.hold_id = hold_id
        self.amount_micro = amount_micro
        self.reference = reference
        self.expires_at_ms = expires_at_ms
        self.free_tier = free_tier
        self.state = HOLD_OPEN
        self.posted_micro = 0


class Account(ChainedAggregate):
    """A consumer (or Island-owner) account. Only the spendable side is an aggregate."""

    class Opened(ChainedAggregate.Created):
        email: str
        kyc_verified: bool

    def __init__(self, email: str, kyc_verified: bool) -> None:
        self.email = email
        self.kyc_verified = kyc_verified
        self.verification = VERIFIED if kyc_verified else UNVERIFIED
        self.verified_at = self.created_on if kyc_verified else None
        self.verification_requested_at = None
        self.suspended = False
        self.spendable_micro = 0
        self.held_micro = 0
        self.spent_micro = 0  # lifetime posted
        self.free_tier_spent_micro = 0  # posted on free-tier holds
        self.free_tier_held_micro = 0  # open free-tier holds
        self.holds: dict[str, Hold] = {}
        self.idempotency: dict[str, tuple[str, Any]] = {}
        # This account's ledger account names, `names.spendable(id)` / `names.held(id)`, built
        # once per loaded aggregate instead of once per command (str(UUID) is the dear part).
        # Derived from the id alone, never from an event; None unless the id is a plain UUID
        # or an `Id` (store.clock; the only types whose text `ledger_names` can promise
        # equals the caller's).
        ident = self.id
        plain = type(ident) in _PLAIN_ID_TYPES
        self._spendable_name = names.spendable(ident) if plain else None
        self._held_name = names.held(ident) if plain else None

    # ------------------------------------------------------------ events
    class Funded(ChainedAggregate.Event):
        """Credits arrive from a platform source (purchase, grant, refund, adjustment)."""

        transfers: list
        reference: str
        reason: str
        idem_key: str
        idem_fp: str
        spendable_after_micro: int

        def apply(self, acct: Account) -> None:
            amount = self.transfers[0][2]
            acct.spendable_micro += amount
            assert acct.spendable_micro == self.spendable_after_micro
            acct.idempotency[self.idem_key] = (self.idem_fp, self.spendable_after_micro)

    class Debited(ChainedAggregate.Event):
        """A correcting transfer out of spendable (adjustment)."""

        transfers: list
        reference: str
        reason: str
        idem_key: str
        idem_fp: str
        spendable_after_micro: int

        def apply(self, acct: Account) -> None:
            acct.spendable_micro -= self.transfers[0][2]
            assert acct.spendable_micro == self.spendable_after_micro >= 0
            acct.idempotency[self.idem_key] = (self.idem_fp, self.spendable_after_micro)

    class HoldPlaced(ChainedAggregate.Event):
        transfers: list
        hold_id: str
        reference: str
        expires_at_ms: int
        free_tier: bool
        idem_key: str
        idem_fp: str
        spendable_after_micro: int
        held_after_micro: int

        def apply(self, acct: Account) -> None:
            amount = self.transfers[0][2]
            hold = Hold(self.hold_id, amount, self.reference, self.expires_at_ms, self.free_tier)
            acct.holds[self.hold_id] = hold
            acct.spendable_micro -= amount
            acct.held_micro += amount
            if self.free_tier:
                acct.free_tier_held_micro += amount
            assert acct.spendable_micro == self.spendable_after_micro >= 0
            assert acct.held_micro == self.held_after_micro
            acct.idempotency[self.idem_key] = (self.idem_fp, self.hold_id)

    class HoldPosted(ChainedAggregate.Event):
        """Settlement: post the real price (≤ hold), split earning and fee, release the rest."""

        transfers: list
        hold_id: str
        reference: str
        posted_micro: int
        released_micro: int
        spendable_after_micro: int
        held_after_micro: int

        def apply(self, acct: Account) -> None:
            hold = acct.holds[self.hold_id]
            assert hold.state == HOLD_OPEN
            assert self.posted_micro + self.released_micro == hold.amount_micro
            hold.state = HOLD_POSTED
            hold.posted_micro = self.posted_micro
            acct.held_micro -= hold.amount_micro
            acct.spendable_micro += self.released_micro
            acct.spent_micro += self.posted_micro
            if hold.free_tier:
                acct.free_tier_held_micro -= hold.amount_micro
                acct.free_tier_spent_micro += self.posted_micro
            assert acct.spendable_micro == self.spendable_after_micro
            assert acct.held_micro == self.held_after_micro >= 0

    class HoldReleased(ChainedAggregate.Event):
        transfers: list
        hold_id: str
        reference: str
        reason: str
        spendable_after_micro: int
        held_after_micro: int

        def apply(self, acct: Account) -> None:
            hold = acct.holds[self.hold_id]
            assert hold.state == HOLD_OPEN
            hold.state = HOLD_RELEASED
            acct.held_micro -= hold.amount_micro
            acct.spendable_micro += hold.amount_micro
            if hold.free_tier:
                acct.free_tier_held_micro -= hold.amount_micro
            assert acct.spendable_micro == self.spendable_after_micro
            assert acct.held_micro == self.held_after_micro >= 0

    class KycVerified(ChainedAggregate.Event):
        by: str
        reference: str

        def apply(self, acct: Account) -> None:
            acct.kyc_verified = True
            acct.verification = VERIFIED
            acct.verified_at = self.timestamp

    class KycRevoked(ChainedAggregate.Event):
        """An operator withdrew a verified account's KYC: shown as `rejected`."""

        by: str
        reference: str

        def apply(self, acct: Account) -> None:
            acct.kyc_verified = False
            acct.verification = REJECTED
            acct.verified_at = None

    class VerificationRequested(ChainedAggregate.Event):
        """The account asked to be verified (POST /api/v1/verification/request): `pending`
        until an operator verifies (`KycVerified`) or rejects (`VerificationRejected`)."""

        by: str
        note: str

        def apply(self, acct: Account) -> None:
            acct.verification = PENDING
            acct.verification_requested_at = self.timestamp

    class VerificationRejected(ChainedAggregate.Event):
        """An operator refused a pending verification request."""

        by: str
        reference: str

        def apply(self, acct: Account) -> None:
            acct.verification = REJECTED

    class Suspended(ChainedAggregate.Event):
        by: str
        reason: str

        def apply(self, acct: Account) -> None:
            acct.suspended = True

    class Reinstated(ChainedAggregate.Event):
        by: str
        reason: str

        def apply(self, acct: Account) -> None:
            acct.suspended = False

    # ------------------------------------------------------------ reads
    def ledger_names(self, account_id: UUID | str) -> tuple[str, str]:
        """`(names.spendable(account_id), names.held(account_id))` for the id a command was
        given (the id this aggregate was loaded by), from the names built at load time when
        `account_id` is a plain UUID (or `Id`) equal to this aggregate's id: equal UUIDs have
        the same 128-bit value, hence the same text. Any other id is formatted as before."""
        spendable = self._spendable_name
        if spendable is not None:
            ident = self.id
            if account_id is ident or (type(account_id) in _PLAIN_ID_TYPES and account_id == ident):
                return spendable, self._held_name  # type: ignore[return-value]
        return names.spendable(account_id), names.held(account_id)

    def free_tier_used_micro(self) -> int:
        """Spent on free-tier holds plus what open free-tier holds reserve."""
        return self.free_tier_spent_micro + self.free_tier_held_micro

    def open_holds(self) -> list[Hold]:
        return [h for h in self.holds.values() if h.state == HOLD_OPEN]


LEDGER_EVENT_TYPES = (
    Account.Funded,
    Account.Debited,
    Account.HoldPlaced,
    Account.HoldPosted,
    Account.HoldReleased,
)
