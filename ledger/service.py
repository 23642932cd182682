"""Ledger commands. Each `*_in(uow, ...)` function works inside a caller's unit of work
(so the scheduler can write a Job event and its hold in one transaction); the `Ledger`
methods of the same names run one command through the group committer.

Every rule is checked before an event is triggered, so a refusal changes nothing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from hashlib import blake2b as _blake2b
from typing import Any
from uuid import UUID, uuid5

from ledger import names
from ledger.accounts import HOLD_OPEN, HOLD_POSTED, HOLD_RELEASED, PENDING, Account
from ledger.errors import (
    AccountExists,
    AlreadyVerified,
    AccountSuspended,
    FreeTierExhausted,
    HoldAlreadyResolved,
    HoldExceeded,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    KycRequired,
    UnknownAccount,
)
from ledger.pricing import split_fee
from store.clock import id_from_int, ms_to_datetime
from store.unit_of_work import GroupCommitter, NotFound, UnitOfWork

MAX_AMOUNT_MICRO = 10**15  # a billion credits: far above any real transfer, far below int64
FUND_CODES = {names.PURCHASE: names.PLATFORM_PURCHASES, names.GRANT: names.PLATFORM_GRANTS,
              names.REFUND: names.PLATFORM_ADJUSTMENTS, names.ADJUSTMENT: names.PLATFORM_ADJUSTMENTS}
MAX_TEXT = 500
ACCOUNT_NAMESPACE = UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0001")


def account_id_for_email(email: str) -> UUID:
    """Accounts are keyed by their normalised email: creating one twice is refused by the
    event store (version 1 of that id exists). See decision 0006. An `Id` (equal to the
    plain UUID): account ids key dicts on every command of the write path."""
    return id_from_int(uuid5(ACCOUNT_NAMESPACE, email.strip().lower()).int)


@dataclass(frozen=True)
class LedgerConfig:
    fee_bps: int = 1_000  # platform share of a settled price, basis points (10 %)
    hold_ttl_ms: int = 3_600_000  # a hold not resolved within this is released by the sweeper
    free_tier_limit_micro: int = 5_000_000  # FREE_TIER_CREDITS
    free_tier_grant_micro: int = 5_000_000  # sign-up credits from the free-tier pool
    expiry_grace_ms: int = 120_000  # verify tolerates an expired hold this long (sweeper period)

    def __post_init__(self) -> None:
        assert 0 <= self.fee_bps <= 10_000, "fee_bps must be within 0..10000"
        assert self.hold_ttl_ms > 0
        assert self.free_tier_limit_micro >= 0 and self.free_tier_grant_micro >= 0


@dataclass(frozen=True)
class PostResult:
    hold_id: str
    posted_micro: int
    earning_micro: int
    fee_micro: int
    released_micro: int


@dataclass(frozen=True)
class AccountBalance:
    account_id: str
    email: str
    spendable_micro: int
    held_micro: int
    spent_micro: int
    kyc_verified: bool
    suspended: bool
    free_tier_used_micro: int
    free_tier_remaining_micro: int
    version: int


def fingerprint(*parts: Any) -> str:
    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def hold_fingerprint(hold_id: str, amount_micro: int, reference: str) -> str:
    """`fingerprint("hold", hold_id, amount_micro, reference)`, once per placed hold.

    For an exact `str` and `int`, `f"{x}"` is `str(x)`, so one f-string builds the same
    text as the join without the tuple, map and join; any other type takes the general path."""
    if type(hold_id) is str and type(amount_micro) is int and type(reference) is str:
        return _blake2b(f"hold|{hold_id}|{amount_micro}|{reference}".encode(), digest_size=8).hexdigest()
    return fingerprint("hold", hold_id, amount_micro, reference)


def check_amount(amount_micro: int, *, allow_zero: bool = False) -> None:
    if not isinstance(amount_micro, int) or isinstance(amount_micro, bool):
        raise InvalidAmount(f"amount must be an integer number of micro-credits, got {amount_micro!r}")
    low = 0 if allow_zero else 1
    if amount_micro < low or amount_micro > MAX_AMOUNT_MICRO:
        raise InvalidAmount(f"amount must be within {low}..{MAX_AMOUNT_MICRO} micro-credits, got {amount_micro}")


def _text(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise InvalidAmount(f"{what} must be a string of at most {MAX_TEXT} characters")
    return value


def load_account(uow: UnitOfWork, account_id: UUID) -> Account:
    try:
        acct = uow.get(account_id)
    except NotFound:
        raise UnknownAccount(f"unknown account {account_id}") from None
    if not isinstance(acct, Account):
        raise UnknownAccount(f"{account_id} is not an account")
    return acct


# ----------------------------------------------------------------- commands in a uow
def open_account_in(uow: UnitOfWork, account_id: UUID, email: str, *, kyc_verified: bool = False) -> Account:
    _text(email, "email")
    if uow.get_or_none(account_id) is not None:
        raise AccountExists(f"account {account_id} exists")
    acct = Account._create(Account.Opened, id=account_id, email=email, kyc_verified=kyc_verified,
                           timestamp=ms_to_datetime(uow.now_ms))
    uow.add(acct)
    return acct


def fund_in(uow: UnitOfWork, account_id: UUID, amount_micro: int, *, code: str, reference: str, reason: str,
            idem_key: str, source: str | None = None) -> int:
    """Credit a consumer account from a platform source. Returns the spendable balance after."""
    check_amount(amount_micro)
    _text(reason, "reason")
    _text(reference, "reference")
    if code not in FUND_CODES and source is None:
        raise InvalidAmount(f"unknown funding code {code!r}")
    source = source or FUND_CODES[code]
    acct = load_account(uow, account_id)
    fp = fingerprint("fund", amount_micro, code, source, reference)
    seen = acct.idempotency.get(idem_key)
    if seen is not None:
        if seen[0] != fp:
            raise IdempotencyConflict(f"idempotency key {idem_key!r} was used with different content")
        return seen[1]
    after = acct.spendable_micro + amount_micro
    acct.trigger_event(Account.Funded, transfers=[[source, names.spendable(account_id), amount_micro, code]],
                       reference=reference, reason=reason, idem_key=idem_key, idem_fp=fp,
                       spendable_after_micro=after, timestamp=ms_to_datetime(uow.now_ms))
    return after


def debit_in(uow: UnitOfWork, account_id: UUID, amount_micro: int, *, reference: str, reason: str,
             idem_key: str) -> int:
    """A correcting transfer out of spendable credits (code adjustment)."""
    check_amount(amount_micro)
    _text(reason, "reason")
    acct = load_account(uow, account_id)
    fp = fingerprint("debit", amount_micro, reference)
    seen = acct.idempotency.get(idem_key)
    if seen is not None:
        if seen[0] != fp:
            raise IdempotencyConflict(f"idempotency key {idem_key!r} was used with different content")
        return seen[1]
    if amount_micro > acct.spendable_micro:
        raise InsufficientCredits(amount_micro, acct.spendable_micro)
    after = acct.spendable_micro - amount_micro
    acct.trigger_event(Account.Debited,
                       transfers=[[names.spendable(account_id), names.PLATFORM_ADJUSTMENTS, amount_micro,
                                   names.ADJUSTMENT]],
                       reference=reference, reason=reason, idem_key=idem_key, idem_fp=fp,
                       spendable_after_micro=after, timestamp=ms_to_datetime(uow.now_ms))
    return after


def place_hold_in(uow: UnitOfWork, config: LedgerConfig, account_id: UUID, hold_id: str, amount_micro: int, *,
                  reference: str, idem_key: str | None = None, expires_at_ms: int | None = None,
                  requires_kyc: bool = False, free_tier_allowed: bool = True) -> str:
    """Reserve `amount_micro` of the account's spendable credits. Refusals, in order:
    suspended, KYC required (Cargo needs KYC, or no KYC and free tier used up / not
    allowed), free-tier allowance too small, insufficient credits."""
    check_amount(amount_micro)
    _text(hold_id, "hold_id")
    idem_key = idem_key or f"hold:{hold_id}"
    acct = load_account(uow, account_id)
    fp = hold_fingerprint(hold_id, amount_micro, reference)
    seen = acct.idempotency.get(idem_key)
    if seen is not None:
        if seen[0] != fp:
            raise IdempotencyConflict(f"idempotency key {idem_key!r} was used with different content")
        return seen[1]
    if hold_id in acct.holds:
        raise IdempotencyConflict(f"hold {hold_id!r} exists with another idempotency key")
    if acct.suspended:
        raise AccountSuspended(f"account {account_id} is suspended")
    free_tier = not acct.kyc_verified
    if free_tier:
        if requires_kyc:
            raise KycRequired("this Cargo requires a verified identity (KYC)")
        if not free_tier_allowed:
            raise KycRequired("this Cargo is not available on the free tier; verify your identity (KYC)")
        remaining = config.free_tier_limit_micro - acct.free_tier_used_micro()
        if remaining <= 0:
            raise KycRequired("the free tier is used up; verify your identity (KYC) to continue")
        if amount_micro > remaining:
            raise FreeTierExhausted(amount_micro, remaining)
    if amount_micro > acct.spendable_micro:
        raise InsufficientCredits(amount_micro, acct.spendable_micro)
    expires = expires_at_ms if expires_at_ms is not None else uow.now_ms + config.hold_ttl_ms
    spendable_acct, held_acct = acct.ledger_names(account_id)
    acct.trigger_event(Account.HoldPlaced,
                       transfers=[[spendable_acct, held_acct, amount_micro, names.HOLD]],
                       hold_id=hold_id, reference=reference, expires_at_ms=expires, free_tier=free_tier,
                       idem_key=idem_key, idem_fp=fp,
                       spendable_after_micro=acct.spendable_micro - amount_micro,
                       held_after_micro=acct.held_micro + amount_micro, timestamp=ms_to_datetime(uow.now_ms))
    return hold_id


def post_hold_in(uow: UnitOfWork, config: LedgerConfig, account_id: UUID, hold_id: str, actual_micro: int,
                 earner_account_id: UUID | str | None) -> PostResult:
    """Settle a hold: post `actual_micro` (≤ held), split into the earner's share and the
    platform fee, release the remainder. Idempotent for the same amount and earner."""
    check_amount(actual_micro, allow_zero=True)
    acct = load_account(uow, account_id)
    hold = acct.holds.get(hold_id)
    if hold is None:
        raise HoldNotFound(f"no hold {hold_id!r} on account {account_id}")
    if actual_micro > hold.amount_micro:
        raise HoldExceeded(f"cannot post {actual_micro} micro-credits on a hold of {hold.amount_micro}")
    earning, fee = split_fee(actual_micro, config.fee_bps if earner_account_id is not None else 10_000)
    if hold.state == HOLD_POSTED and hold.posted_micro == actual_micro:
        return PostResult(hold_id, actual_micro, earning, fee, hold.amount_micro - actual_micro)
    if hold.state != HOLD_OPEN:
        raise HoldAlreadyResolved(f"hold {hold_id!r} is already {hold.state}")
    spendable_acct, held_acct = acct.ledger_names(account_id)
    released = hold.amount_micro - actual_micro
    transfers: list[list] = []
    if actual_micro:
        transfers.append([held_acct, names.PLATFORM_CLEARING, actual_micro, names.POST])
        if earning:
            transfers.append([names.PLATFORM_CLEARING, names.earnings(earner_account_id), earning, names.EARNING])
        if fee:
            transfers.append([names.PLATFORM_CLEARING, names.PLATFORM_FEES, fee, names.FEE])
    if released:
        transfers.append([held_acct, spendable_acct, released, names.RELEASE])
    acct.trigger_event(Account.HoldPosted, transfers=transfers, hold_id=hold_id, reference=hold.reference,
                       posted_micro=actual_micro,
                       released_micro=released, spendable_after_micro=acct.spendable_micro + released,
                       held_after_micro=acct.held_micro - hold.amount_micro, timestamp=ms_to_datetime(uow.now_ms))
    return PostResult(hold_id, actual_micro, earning, fee, released)


def release_hold_in(uow: UnitOfWork, account_id: UUID, hold_id: str, reason: str) -> int:
    """Release a whole hold. Idempotent: releasing a released hold returns 0."""
    _text(reason, "reason")
    acct = load_account(uow, account_id)
    hold = acct.holds.get(hold_id)
    if hold is None:
        raise HoldNotFound(f"no hold {hold_id!r} on account {account_id}")
    if hold.state == HOLD_RELEASED:
        return 0
    if hold.state != HOLD_OPEN:
        raise HoldAlreadyResolved(f"hold {hold_id!r} is already {hold.state}")
    spendable_acct, held_acct = acct.ledger_names(account_id)
    acct.trigger_event(Account.HoldReleased,
                       transfers=[[held_acct, spendable_acct, hold.amount_micro, names.RELEASE]],
                       hold_id=hold_id, reference=hold.reference, reason=reason,
                       spendable_after_micro=acct.spendable_micro + hold.amount_micro,
                       held_after_micro=acct.held_micro - hold.amount_micro, timestamp=ms_to_datetime(uow.now_ms))
    return hold.amount_micro


def set_kyc_in(uow: UnitOfWork, account_id: UUID, verified: bool, *, by: str, reference: str) -> bool:
    """An operator's KYC decision: verified, or not (a pending request is then rejected,
    a verified account revoked). False (nothing written) if it already was so."""
    acct = load_account(uow, account_id)
    ts = ms_to_datetime(uow.now_ms)
    if not verified and not acct.kyc_verified:
        if acct.verification != PENDING:
            return False
        acct.trigger_event(Account.VerificationRejected, by=_text(by, "by"), reference=_text(reference, "reference"),
                           timestamp=ts)
        return True
    if acct.kyc_verified == verified:
        return False
    acct.trigger_event(Account.KycVerified if verified else Account.KycRevoked, by=_text(by, "by"),
                       reference=_text(reference, "reference"), timestamp=ts)
    return True


def request_verification_in(uow: UnitOfWork, account_id: UUID, *, by: str, note: str) -> bool:
    """The account asks for verification: `pending` until an operator decides (set_kyc_in).
    Refused when already verified; idempotent while pending (False: nothing written)."""
    acct = load_account(uow, account_id)
    if acct.kyc_verified:
        raise AlreadyVerified("this account is already verified")
    if acct.verification == PENDING:
        return False
    acct.trigger_event(Account.VerificationRequested, by=_text(by, "by"), note=_text(note, "note"),
                       timestamp=ms_to_datetime(uow.now_ms))
    return True


def set_suspended_in(uow: UnitOfWork, account_id: UUID, suspended: bool, *, by: str, reason: str) -> bool:
    acct = load_account(uow, account_id)
    if acct.suspended == suspended:
        return False
    acct.trigger_event(Account.Suspended if suspended else Account.Reinstated, by=_text(by, "by"),
                       reason=_text(reason, "reason"), timestamp=ms_to_datetime(uow.now_ms))
    return True


def balance_of(config: LedgerConfig, acct: Account) -> AccountBalance:
    used = acct.free_tier_used_micro()
    return AccountBalance(
        account_id=str(acct.id), email=acct.email, spendable_micro=acct.spendable_micro,
        held_micro=acct.held_micro, spent_micro=acct.spent_micro, kyc_verified=acct.kyc_verified,
        suspended=acct.suspended, free_tier_used_micro=used,
        free_tier_remaining_micro=0 if acct.kyc_verified else max(0, config.free_tier_limit_micro - used),
        version=acct.version)


class Ledger:
    """The ledger's commands, each one unit of work through the group committer."""

    def __init__(self, committer: GroupCommitter, config: LedgerConfig) -> None:
        self.committer = committer
        self.config = config

    def open_account(self, account_id: UUID, email: str, *, kyc_verified: bool = False,
                     initial_grant_micro: int = 0, free_tier_grant: bool = True) -> AccountBalance:
        def command(uow: UnitOfWork) -> AccountBalance:
            acct = open_account_in(uow, account_id, email, kyc_verified=kyc_verified)
            if free_tier_grant and self.config.free_tier_grant_micro:
                fund_in(uow, account_id, self.config.free_tier_grant_micro, code=names.GRANT,
                        source=names.PLATFORM_FREE_TIER, reference="free-tier", reason="free-tier sign-up credits",
                        idem_key="signup:free-tier")
            if initial_grant_micro:
                fund_in(uow, account_id, initial_grant_micro, code=names.GRANT, reference="signup",
                        reason="initial grant", idem_key="signup:grant")
            return balance_of(self.config, acct)

        return self.committer.execute(command)

    def fund(self, account_id: UUID, amount_micro: int, *, code: str, reference: str, reason: str,
             idem_key: str) -> int:
        return self.committer.execute(lambda uow: fund_in(uow, account_id, amount_micro, code=code,
                                                          reference=reference, reason=reason, idem_key=idem_key))

    def debit(self, account_id: UUID, amount_micro: int, *, reference: str, reason: str, idem_key: str) -> int:
        return self.committer.execute(lambda uow: debit_in(uow, account_id, amount_micro, reference=reference,
                                                           reason=reason, idem_key=idem_key))

    def place_hold(self, account_id: UUID, hold_id: str, amount_micro: int, *, reference: str,
                   idem_key: str | None = None, expires_at_ms: int | None = None, requires_kyc: bool = False,
                   free_tier_allowed: bool = True) -> str:
        return self.committer.execute(lambda uow: place_hold_in(
            uow, self.config, account_id, hold_id, amount_micro, reference=reference, idem_key=idem_key,
            expires_at_ms=expires_at_ms, requires_kyc=requires_kyc, free_tier_allowed=free_tier_allowed))

    def post_hold(self, account_id: UUID, hold_id: str, actual_micro: int,
                  earner_account_id: UUID | str | None) -> PostResult:
        return self.committer.execute(lambda uow: post_hold_in(uow, self.config, account_id, hold_id, actual_micro,
                                                               earner_account_id))

    def release_hold(self, account_id: UUID, hold_id: str, reason: str) -> int:
        return self.committer.execute(lambda uow: release_hold_in(uow, account_id, hold_id, reason))

    def request_verification(self, account_id: UUID, *, by: str, note: str = "") -> bool:
        return self.committer.execute(lambda uow: request_verification_in(uow, account_id, by=by, note=note))

    def set_kyc(self, account_id: UUID, verified: bool, *, by: str, reference: str) -> bool:
        return self.committer.execute(lambda uow: set_kyc_in(uow, account_id, verified, by=by, reference=reference))

    def set_suspended(self, account_id: UUID, suspended: bool, *, by: str, reason: str) -> bool:
        return self.committer.execute(lambda uow: set_suspended_in(uow, account_id, suspended, by=by, reason=reason))

    def balance(self, account_id: UUID) -> AccountBalance:
        return self.committer.query(lambda uow: balance_of(self.config, load_account(uow, account_id)))

    def expired_holds(self, account_id: UUID, now_ms: int) -> list[str]:
        def read(uow: UnitOfWork) -> list[str]:
            acct = load_account(uow, account_id)
            return [h.hold_id for h in acct.open_holds() if h.expires_at_ms <= now_ms]

        return self.committer.query(read)
