"""Ledger read model: balances of every ledger account, consumer accounts (spendable,
held, spent, earned, free tier), holds, statement lines and platform totals — all folded
from the `transfers` rows of the Account events (the same rows `ledger.audit` folds).

Statement lines (`proj_ledger_entries`): every transfer row gives two lines, one per
side: the credit side `+amount` (counterparty = the debit account), the debit side
`-amount` (counterparty = the credit account), each with the balance of its ledger
account after it. `seq` orders the lines of one event: row i gives seq 2i (debit side)
and 2i+1 (credit side). The sum of an account's lines is its balance; the last line's
`balance_after_micro` is its balance.
"""

from __future__ import annotations

from eventsourcing.utils import get_topic

from ledger import names
from ledger.accounts import Account
from projections.engine import Projection, Work
from projections.sql import INT, TEXT, Table

ACCOUNTS = Table(
    "proj_accounts",
    (("account_id", TEXT), ("email", TEXT), ("opened", INT), ("opened_at_ms", INT), ("opened_position", INT),
     ("kyc_verified", INT), ("suspended", INT), ("spendable_micro", INT), ("held_micro", INT), ("spent_micro", INT),
     ("earned_micro", INT), ("free_tier_spent_micro", INT), ("free_tier_held_micro", INT), ("open_holds", INT),
     ("version", INT), ("position", INT)),
    key=("account_id",),
)

BALANCES = Table(
    "proj_balances",
    (("ledger_account", TEXT), ("kind", TEXT), ("owner_id", TEXT), ("balance_micro", INT), ("debits_micro", INT),
     ("credits_micro", INT), ("entries", INT), ("position", INT)),
    key=("ledger_account",),
    indexes=(("owner_id",),),
)

HOLDS = Table(
    "proj_holds",
    (("account_id", TEXT), ("hold_id", TEXT), ("reference", TEXT), ("amount_micro", INT), ("free_tier", INT),
     ("state", TEXT), ("expires_at_ms", INT), ("placed_at_ms", INT), ("resolved_at_ms", INT), ("posted_micro", INT),
     ("released_micro", INT), ("reason", TEXT), ("position", INT)),
    key=("account_id", "hold_id"),
    indexes=(("state", "expires_at_ms"),),
)

ENTRIES = Table(
    "proj_ledger_entries",
    (("ledger_account", TEXT), ("position", INT), ("seq", INT), ("time_ms", INT), ("event", TEXT), ("code", TEXT),
     ("reference", TEXT), ("counterparty", TEXT), ("account_id", TEXT), ("amount_micro", INT),
     ("balance_after_micro", INT)),
    key=("ledger_account", "position", "seq"),
    indexes=(("time_ms",),),
    append_only=True,
)

TOTALS = Table(
    "proj_platform_totals",
    (("metric", TEXT), ("value_micro", INT), ("position", INT)),
    key=("metric",),
    counters=True,
)

# proj_platform_totals metrics
TOTAL_METRICS = (
    "revenue_micro",            # balance of platform:fees (the platform's income)
    "fees_micro",               # sum of `fee` rows
    "gross_settled_micro",      # sum of `post` rows: what consumers paid for work
    "earnings_micro",           # sum of `earning` rows: what Island owners earned, lifetime
    "earnings_owed_micro",      # sum of earnings:* balances (owed to Island owners)
    "free_tier_granted_micro",  # credits issued from platform:free_tier
    "free_tier_spent_micro",    # posted on free-tier holds
    "purchases_micro",          # credits bought (platform:purchases issued)
    "grants_micro",             # operator grants (platform:grants issued)
    "refunds_micro",            # `refund` rows
    "adjustments_in_micro",     # `adjustment` rows into spendable accounts
    "adjustments_out_micro",    # `adjustment` rows out of spendable accounts
    "holds_placed_micro",       # sum of `hold` rows
    "released_micro",           # sum of `release` rows
    "spendable_micro",          # sum of spendable:* balances
    "held_micro",               # sum of held:* balances
)


def _kind(ledger_account: str) -> str:
    return ledger_account.partition(":")[0]


PLATFORM_FEES = names.PLATFORM_FEES
PLATFORM_FREE_TIER = names.PLATFORM_FREE_TIER
PLATFORM_GRANTS = names.PLATFORM_GRANTS
ADJUSTMENT = names.ADJUSTMENT
_KIND_TOTAL = {"earnings": "earnings_owed_micro", "spendable": "spendable_micro", "held": "held_micro"}
_KIND_COLUMN = {"earnings": "earned_micro", "spendable": "spendable_micro", "held": "held_micro"}
_CODE_TOTAL = {names.FEE: "fees_micro", names.POST: "gross_settled_micro", names.EARNING: "earnings_micro",
               names.HOLD: "holds_placed_micro", names.RELEASE: "released_micro", names.PURCHASE: "purchases_micro",
               names.REFUND: "refunds_micro"}


class LedgerProjection(Projection):
    name = "ledger"
    version = 1
    tables = (ACCOUNTS, BALANCES, HOLDS, ENTRIES, TOTALS)

    def handlers(self):
        A = Account

        def transfers_of(event_name: str, extra=None):
            def handler(w, pos, oid, version, st, ms):
                self.on_transfers(w, pos, oid, version, st, ms, event_name)
                if extra is not None:
                    extra(w, pos, oid, version, st, ms)
            return handler

        return {get_topic(A.Opened): self.on_opened,
                get_topic(A.Funded): transfers_of("Funded"),
                get_topic(A.Debited): transfers_of("Debited"),
                get_topic(A.HoldPlaced): transfers_of("HoldPlaced", self.on_hold_placed),
                get_topic(A.HoldPosted): transfers_of("HoldPosted", self.on_hold_posted),
                get_topic(A.HoldReleased): transfers_of("HoldReleased", self.on_hold_released),
                get_topic(A.KycVerified): self._flag("kyc_verified", 1),
                get_topic(A.KycRevoked): self._flag("kyc_verified", 0),
                get_topic(A.Suspended): self._flag("suspended", 1),
                get_topic(A.Reinstated): self._flag("suspended", 0)}

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _account(w: Work, account_id: str, pos: int) -> dict:
        t = w["proj_accounts"]
        row = t.get(account_id)
        if row is None:
            # An earner (or an account whose Opened we have not seen): a row all the same.
            row = {"account_id": account_id, "email": None, "opened": 0, "opened_at_ms": None,
                   "opened_position": None, "kyc_verified": 0, "suspended": 0, "spendable_micro": 0, "held_micro": 0,
                   "spent_micro": 0, "earned_micro": 0, "free_tier_spent_micro": 0, "free_tier_held_micro": 0,
                   "open_holds": 0, "version": 0, "position": pos}
            t.put(account_id, row)
        else:
            t.touch(account_id)
        row["position"] = pos
        return row

    @staticmethod
    def _total(w: Work, metric: str, delta: int, pos: int) -> None:
        w.tables["proj_platform_totals"].add(metric, "value_micro", delta, pos)

    def _flag(self, column: str, value: int):
        def handler(w, pos, oid, version, st, ms):
            row = self._account(w, oid, pos)
            row[column] = value
            row["version"] = version
        return handler

    # ------------------------------------------------------------ handlers
    def on_opened(self, w: Work, pos, oid, version, st, ms) -> None:
        row = self._account(w, oid, pos)
        row.update(email=st["email"], opened=1, opened_at_ms=ms, opened_position=pos,
                   kyc_verified=1 if st["kyc_verified"] else 0, version=version)

    def on_transfers(self, w: Work, pos, oid, version, st, ms, event_name: str) -> None:
        # The hot path of a rebuild: written flat (no helper call per transfer row).
        bt = w.tables["proj_balances"]
        brows = bt.rows
        bdirty = bt.dirty
        append = w.tables["proj_ledger_entries"].appended.append
        add = w.tables["proj_platform_totals"].add
        reference = st.get("reference", "")
        own: dict[str, int] = {}
        seq = 0
        for debit, credit, amount, code in st["transfers"]:
            # debit side: -amount
            row = brows.get(debit) or self._balance(bt, debit, pos)
            balance = row["balance_micro"] - amount
            row["balance_micro"] = balance
            row["debits_micro"] += amount
            row["entries"] += 1
            row["position"] = pos
            bdirty.add(debit)
            append((debit, pos, seq, ms, event_name, code, reference, credit, oid, -amount, balance))
            metric = _KIND_TOTAL.get(row["kind"])
            if metric is not None:
                own[debit] = balance
                add(metric, "value_micro", -amount, pos)
            elif debit == PLATFORM_FEES:
                add("revenue_micro", "value_micro", -amount, pos)
            elif debit == PLATFORM_FREE_TIER:
                add("free_tier_granted_micro", "value_micro", amount, pos)
            elif debit == PLATFORM_GRANTS:
                add("grants_micro", "value_micro", amount, pos)
            # credit side: +amount
            row = brows.get(credit) or self._balance(bt, credit, pos)
            balance = row["balance_micro"] + amount
            row["balance_micro"] = balance
            row["credits_micro"] += amount
            row["entries"] += 1
            row["position"] = pos
            bdirty.add(credit)
            append((credit, pos, seq + 1, ms, event_name, code, reference, debit, oid, amount, balance))
            metric = _KIND_TOTAL.get(row["kind"])
            if metric is not None:
                own[credit] = balance
                add(metric, "value_micro", amount, pos)
            elif credit == PLATFORM_FEES:
                add("revenue_micro", "value_micro", amount, pos)
            seq += 2
            metric = _CODE_TOTAL.get(code)
            if metric is None and code == ADJUSTMENT:
                metric = "adjustments_in_micro" if credit.startswith("spendable:") else "adjustments_out_micro"
            if metric is not None:
                add(metric, "value_micro", amount, pos)
        at = w.tables["proj_accounts"]
        arows = at.rows
        for account, balance in own.items():
            kind, _, owner = account.partition(":")
            arow = arows.get(owner) or self._account(w, owner, pos)
            arow[_KIND_COLUMN[kind]] = balance
            arow["position"] = pos
            at.dirty.add(owner)
        arow = arows.get(oid)
        if arow is not None:
            arow["version"] = version
            at.dirty.add(oid)

    @staticmethod
    def _balance(bt, account: str, pos: int) -> dict:
        row = bt.get(account)
        if row is None:
            row = {"ledger_account": account, "kind": _kind(account), "owner_id": names.owner_of(account) or "",
                   "balance_micro": 0, "debits_micro": 0, "credits_micro": 0, "entries": 0, "position": pos}
            bt.put(account, row)
        return row

    def on_hold_placed(self, w: Work, pos, oid, version, st, ms) -> None:
        amount = st["transfers"][0][2]
        free = 1 if st["free_tier"] else 0
        w["proj_holds"].put((oid, st["hold_id"]), {
            "account_id": oid, "hold_id": st["hold_id"], "reference": st["reference"], "amount_micro": amount,
            "free_tier": free, "state": "open", "expires_at_ms": st["expires_at_ms"], "placed_at_ms": ms,
            "resolved_at_ms": None, "posted_micro": 0, "released_micro": 0, "reason": None, "position": pos})
        row = self._account(w, oid, pos)
        row["open_holds"] += 1
        if free:
            row["free_tier_held_micro"] += amount

    def _resolve(self, w: Work, pos, oid, st, ms, state: str) -> tuple[dict | None, dict]:
        holds = w["proj_holds"]
        key = (oid, st["hold_id"])
        hold = holds.get(key)
        row = self._account(w, oid, pos)
        if hold is None:
            return None, row
        holds.touch(key)
        hold["state"] = state
        hold["resolved_at_ms"] = ms
        hold["position"] = pos
        row["open_holds"] -= 1
        if hold["free_tier"]:
            row["free_tier_held_micro"] -= hold["amount_micro"]
        return hold, row

    def on_hold_posted(self, w: Work, pos, oid, version, st, ms) -> None:
        hold, row = self._resolve(w, pos, oid, st, ms, "posted")
        posted = st["posted_micro"]
        row["spent_micro"] += posted
        if hold is not None:
            hold["posted_micro"] = posted
            hold["released_micro"] = st["released_micro"]
            if hold["free_tier"]:
                row["free_tier_spent_micro"] += posted
                self._total(w, "free_tier_spent_micro", posted, pos)

    def on_hold_released(self, w: Work, pos, oid, version, st, ms) -> None:
        hold, _ = self._resolve(w, pos, oid, st, ms, "released")
        if hold is not None:
            hold["released_micro"] = hold["amount_micro"]
            hold["reason"] = st["reason"]
