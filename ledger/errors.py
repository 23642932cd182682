"""Typed ledger refusals. Every refusal is raised before any event is triggered."""

from __future__ import annotations


class LedgerError(Exception):
    code = "ledger_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidAmount(LedgerError):
    code = "invalid_amount"


class UnknownAccount(LedgerError):
    code = "unknown_account"


class AccountExists(LedgerError):
    code = "account_exists"


class AlreadyVerified(LedgerError):
    """A verification request from an account that is verified already."""

    code = "already_verified"


class InsufficientCredits(LedgerError):
    """Spendable balance below the required amount; carries both numbers (micro-credits)."""

    code = "insufficient_credits"

    def __init__(self, required_micro: int, available_micro: int) -> None:
        super().__init__(
            f"insufficient credits: {required_micro} micro-credits required, {available_micro} available",
            required_micro=required_micro,
            available_micro=available_micro,
        )
        self.required_micro = required_micro
        self.available_micro = available_micro


class FreeTierExhausted(LedgerError):
    """The free-tier allowance left is above zero but below this hold."""

    code = "free_tier_exhausted"

    def __init__(self, required_micro: int, available_micro: int) -> None:
        super().__init__(
            f"free-tier allowance too small: {required_micro} micro-credits required, {available_micro} left",
            required_micro=required_micro,
            available_micro=available_micro,
        )
        self.required_micro = required_micro
        self.available_micro = available_micro


class KycRequired(LedgerError):
    code = "kyc_required"


class AccountSuspended(LedgerError):
    code = "account_suspended"


class HoldNotFound(LedgerError):
    code = "hold_not_found"


class HoldAlreadyResolved(LedgerError):
    code = "hold_already_resolved"


class HoldExceeded(LedgerError):
    code = "hold_exceeded"


class IdempotencyConflict(LedgerError):
    """The same idempotency key was used before with different content."""

    code = "idempotency_conflict"
