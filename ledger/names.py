"""Ledger account names. A consumer account has two ledger accounts (spendable, held);
an Island owner earns into an earnings account; platform accounts are fixed names.

Only `spendable:` accounts are backed by an aggregate (they carry the never-negative
invariant, and their holds). Every other balance is a sum over transfer events."""

from __future__ import annotations

from uuid import UUID

PLATFORM_FEES = "platform:fees"
PLATFORM_PURCHASES = "platform:purchases"  # source of purchased credits (goes negative)
PLATFORM_GRANTS = "platform:grants"  # source of operator grants (goes negative)
PLATFORM_FREE_TIER = "platform:free_tier"  # source of free-tier sign-up credits
PLATFORM_ADJUSTMENTS = "platform:adjustments"  # counterpart of correcting transfers and refunds
PLATFORM_CLEARING = "platform:clearing"  # settlement passes through; nets to zero in every event
PLATFORM_ACCOUNTS = (PLATFORM_FEES, PLATFORM_PURCHASES, PLATFORM_GRANTS, PLATFORM_FREE_TIER, PLATFORM_ADJUSTMENTS,
                     PLATFORM_CLEARING)


def spendable(account_id: UUID | str) -> str:
    return f"spendable:{account_id}"


def held(account_id: UUID | str) -> str:
    return f"held:{account_id}"


def earnings(account_id: UUID | str) -> str:
    return f"earnings:{account_id}"


def owner_of(ledger_account: str) -> str | None:
    """The account id behind a per-account ledger account, or None for platform accounts."""
    kind, _, rest = ledger_account.partition(":")
    return rest if kind in ("spendable", "held", "earnings") else None


# Transfer codes
PURCHASE = "purchase"
GRANT = "grant"
HOLD = "hold"
POST = "post"
RELEASE = "release"
FEE = "fee"
EARNING = "earning"
REFUND = "refund"
ADJUSTMENT = "adjustment"
CODES = (PURCHASE, GRANT, HOLD, POST, RELEASE, FEE, EARNING, REFUND, ADJUSTMENT)
