"""The virtual top-up of the network's Phase 2 (test credits, no payment): a ledger
`Funded` event like any other (code `grant`, reference `web:virtual-top-up`), of a
configured amount, refused when it would take the spendable balance above a configured
ceiling; operators switch it off with COORDINATOR_WEB_TOPUP_CREDITS=0."""

from __future__ import annotations

from uuid import UUID

from ledger import names
from ledger.service import fund_in, load_account
from store.unit_of_work import UnitOfWork

TOPUP_REFERENCE = "web:virtual-top-up"
TOPUP_REASON = "virtual top-up (Phase 2 test credits)"


class TopUpRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def topup_in(uow: UnitOfWork, account_id: UUID, amount_micro: int, max_balance_micro: int, idem_key: str) -> int:
    """Fund `amount_micro` now; the spendable balance after. One command: the ceiling is
    checked on the same state the funding is applied to."""
    if amount_micro <= 0:
        raise TopUpRefused("the virtual top-up is switched off on this coordinator")
    acct = load_account(uow, account_id)
    if acct.spendable_micro + amount_micro > max_balance_micro:
        raise TopUpRefused(f"a top-up would take your balance above the limit of "
                           f"{max_balance_micro // 1_000_000} credits")
    return fund_in(uow, account_id, amount_micro, code=names.GRANT, reference=TOPUP_REFERENCE, reason=TOPUP_REASON,
                   idem_key=idem_key)
