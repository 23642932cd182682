"""The `coordinator` operator CLI: one entry point, subcommands.

Bad input gets one clear line on stderr and exit status 2; nothing is written."""

from __future__ import annotations

import argparse
import sys
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from api.settings import Settings, SettingsError
from ledger import names
from ledger.errors import LedgerError
from ledger.pricing import credits_to_micro, micro_to_credits

ACCOUNT_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0001")
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class UsageError(Exception):
    """Bad input from the operator."""


def account_id_for_email(email: str) -> uuid.UUID:
    """Accounts are keyed by their normalised email: creating one twice is refused."""
    return uuid.uuid5(ACCOUNT_NAMESPACE, email.strip().lower())


def _credits(micro: int) -> Decimal:
    """Exact credits for display; printed as a JSON number (never through a float)."""
    return micro_to_credits(micro)


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise UsageError(f"not an account id: {text!r}") from None


def _amount(text: str) -> int:
    try:
        micro = credits_to_micro(text)
    except ValueError as exc:
        raise UsageError(f"bad amount {text!r}: {exc}") from None
    if micro <= 0:
        raise UsageError(f"amount must be positive, got {text!r}")
    return micro


def _time(text: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"malformed time {text!r}; expected ISO-8601 like 2026-11-23T12:00:00+00:00") from None
    if dt.tzinfo is None:
        raise UsageError(f"time {text!r} has no timezone; add +00:00 or Z")
    return dt


_JSON = msgspec.json.Encoder(decimal_format="number")


def _print(obj: Any) -> None:
    print(_JSON.encode(obj).decode())


# ------------------------------------------------------------------ commands
def cmd_accounts_create(c, args) -> int:
    from ledger.errors import AccountExists

    email = args.email.strip()
    if "@" not in email or len(email) > 254:
        raise UsageError(f"not an email address: {args.email!r}")
    grant = _amount(args.credits) if args.credits not in (None, "0") else 0
    account_id = account_id_for_email(email)
    try:
        bal = c.ledger.open_account(account_id, email, kyc_verified=args.kyc, initial_grant_micro=grant)
    except AccountExists:
        raise UsageError(f"an account with email {email!r} exists: {account_id}") from None
    out = {"account_id": bal.account_id, "email": bal.email, "credits": _credits(bal.spendable_micro),
           "kyc_verified": bal.kyc_verified}
    extra = getattr(c, "after_account_created", None)
    if extra is not None:
        out.update(extra(account_id))
    _print(out)
    return 0


def cmd_credits_grant(c, args) -> int:
    account_id = _uuid(args.account_id)
    micro = _amount(args.amount)
    reason = args.reason.strip()
    if not reason:
        raise UsageError("--reason must not be empty")
    key = args.idempotency_key or f"grant:{uuid.uuid4()}"
    after = c.ledger.fund(account_id, micro, code=names.GRANT, reference=f"operator:{args.by}", reason=reason,
                          idem_key=key)
    _print({"account_id": str(account_id), "granted": _credits(micro), "credits": _credits(after),
            "idempotency_key": key})
    return 0


def _log(c, start: int = 1, stop: int | None = None):
    from ledger.audit import LEDGER_TOPICS
    from store.factory import iter_log

    return iter_log(c.app, start=start, stop=stop, topics=LEDGER_TOPICS)


def cmd_ledger_balance(c, args) -> int:
    from ledger import audit
    from store.clock import datetime_to_ms

    account_id = _uuid(args.account_id)
    if args.as_of or args.position is not None:
        if args.as_of and args.position is not None:
            raise UsageError("give --as-of or --position, not both")
        if args.position is not None and args.position < 0:
            raise UsageError("--position must be >= 0")
        upto_ms = datetime_to_ms(_time(args.as_of)) if args.as_of else None
        f = audit.fold(_log(c), check=False, upto_position=args.position, upto_ms=upto_ms)
        if str(account_id) not in f.accounts:
            raise UsageError(f"unknown account {account_id} (at that point)")
        _print({"account_id": str(account_id), "as_of": args.as_of, "position": f.last_position,
                "spendable": _credits(f.balances.get(names.spendable(account_id), 0)),
                "held": _credits(f.balances.get(names.held(account_id), 0)),
                "earned": _credits(f.balances.get(names.earnings(account_id), 0))})
        return 0
    bal = c.ledger.balance(account_id)
    f = audit.fold(_log(c), check=False)
    _print({"account_id": bal.account_id, "email": bal.email, "spendable": _credits(bal.spendable_micro),
            "held": _credits(bal.held_micro), "spent": _credits(bal.spent_micro),
            "earned": _credits(f.balances.get(names.earnings(account_id), 0)),
            "kyc_verified": bal.kyc_verified, "suspended": bal.suspended,
            "free_tier_remaining": _credits(bal.free_tier_remaining_micro), "position": f.last_position})
    return 0


def cmd_ledger_statement(c, args) -> int:
    from ledger import audit

    account_id = _uuid(args.account_id)
    c.ledger.balance(account_id)  # unknown account -> clear error
    acct_name = names.earnings(account_id) if args.earnings else names.spendable(account_id)
    lines = audit.statement(_log(c), acct_name)
    if args.json:
        _print([{"position": ln.position, "time": ln.time.isoformat(), "event": ln.event, "code": ln.code,
                 "counterparty": ln.counterparty, "reference": ln.reference, "amount": _credits(ln.amount_micro),
                 "balance_after": _credits(ln.balance_after_micro)} for ln in lines])
        return 0
    print(f"statement of {acct_name}")
    print(f"{'pos':>7}  {'time':<26} {'code':<10} {'amount':>14} {'balance':>14}  reference / counterparty")
    for ln in lines:
        print(f"{ln.position:>7}  {ln.time.isoformat():<26} {ln.code:<10} {micro_to_credits(ln.amount_micro):>14} "
              f"{micro_to_credits(ln.balance_after_micro):>14}  {ln.reference} / {ln.counterparty}")
    return 0


def cmd_ledger_trial_balance(c, args) -> int:
    from ledger import audit

    f = audit.fold(_log(c), check=False)
    rows = sorted((k, v) for k, v in f.balances.items() if v)
    total = sum(v for _, v in rows)
    if args.json:
        _print({"accounts": {k: _credits(v) for k, v in rows}, "total": _credits(total), "position": f.last_position})
        return 0 if total == 0 else EXIT_FAILED
    for k, v in rows:
        print(f"{k:<60} {micro_to_credits(v):>18}")
    print(f"{'TOTAL':<60} {micro_to_credits(total):>18}")
    return 0 if total == 0 else EXIT_FAILED


def cmd_ledger_verify(c, args) -> int:
    from ledger import audit

    f = audit.fold(_log(c), check=True)
    f.finish(c.clock.now_ms(), c.settings.ledger.expiry_grace_ms)
    summary = f.summary()
    if f.violations:
        first = f.violations[0]
        print(f"violation at position {first.position}: {first.message}", file=sys.stderr)
        summary["first_violation"] = {"position": first.position, "message": first.message}
    _print(summary)
    return 0 if not f.violations else EXIT_FAILED


def cmd_ledger_sweep(c, args) -> int:
    from ledger.sweeper import HoldSweeper

    released = HoldSweeper(c.ledger, lambda start: _log(c, start)).tick(c.clock.now_ms())
    _print({"released": released})
    return 0


def cmd_demo(c, args) -> int:
    """Ledger demonstration (until the HTTP coordinator demo exists): two consumers, an
    Island owner, holds that settle or release, then the trial balance and verify."""
    from ledger.errors import AccountExists, LedgerError as _LedgerError

    people = {"demo-consumer@archipelag.io": (True, 100_000_000), "demo-free@archipelag.io": (False, 0),
              "demo-island-owner@archipelag.io": (True, 0)}
    ids = {}
    for email, (kyc, grant) in people.items():
        ids[email] = account_id_for_email(email)
        try:
            c.ledger.open_account(ids[email], email, kyc_verified=kyc, initial_grant_micro=grant)
            print(f"created {email}: {ids[email]}")
        except AccountExists:
            print(f"exists  {email}: {ids[email]}")
    owner = ids["demo-island-owner@archipelag.io"]
    run = uuid.uuid4().hex[:8]
    for i, (email, hold, actual) in enumerate([("demo-consumer@archipelag.io", 20_000_000, 12_345_678),
                                               ("demo-free@archipelag.io", 3_000_000, 2_500_000),
                                               ("demo-free@archipelag.io", 3_000_000, 0)]):
        acct = ids[email]
        hold_id = f"demo-{run}-{i}"
        try:
            c.ledger.place_hold(acct, hold_id, hold, reference=f"job:{hold_id}")
        except _LedgerError as exc:
            print(f"refused {email} hold of {micro_to_credits(hold)} credits: {exc.code}: {exc.message}")
            continue
        if actual:
            r = c.ledger.post_hold(acct, hold_id, actual, owner)
            print(f"settled {email}: charged {micro_to_credits(r.posted_micro)}, island earned "
                  f"{micro_to_credits(r.earning_micro)}, fee {micro_to_credits(r.fee_micro)}, "
                  f"released {micro_to_credits(r.released_micro)}")
        else:
            c.ledger.release_hold(acct, hold_id, "cancelled")
            print(f"released {email}: hold of {micro_to_credits(hold)} credits (job cancelled)")
    print()
    args.json = False
    cmd_ledger_trial_balance(c, args)
    print()
    return cmd_ledger_verify(c, args)


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coordinator", description="Archipelag coordinator operator CLI")
    sub = p.add_subparsers(dest="group", required=True)

    acc = sub.add_parser("accounts", help="consumer accounts").add_subparsers(dest="cmd", required=True)
    ac = acc.add_parser("create", help="create an account (prints JSON with account_id)")
    ac.add_argument("--email", required=True)
    ac.add_argument("--credits", default=None, help="initial grant in credits (decimal)")
    ac.add_argument("--kyc", action="store_true", help="mark the identity verified")
    ac.set_defaults(func=cmd_accounts_create)

    cr = sub.add_parser("credits", help="credit operations").add_subparsers(dest="cmd", required=True)
    g = cr.add_parser("grant", help="grant credits to an account")
    g.add_argument("account_id")
    g.add_argument("amount", help="credits (decimal, up to 6 places)")
    g.add_argument("--reason", required=True)
    g.add_argument("--by", default="operator", help="operator name recorded with the grant")
    g.add_argument("--idempotency-key", default=None)
    g.set_defaults(func=cmd_credits_grant)

    led = sub.add_parser("ledger", help="audit the books").add_subparsers(dest="cmd", required=True)
    b = led.add_parser("balance", help="balance now, as of a time, or as of a log position")
    b.add_argument("account_id")
    b.add_argument("--as-of", default=None, help="ISO-8601 time with timezone")
    b.add_argument("--position", type=int, default=None, help="log position (notification id)")
    b.set_defaults(func=cmd_ledger_balance)
    s = led.add_parser("statement", help="every change of an account with its reference")
    s.add_argument("account_id")
    s.add_argument("--json", action="store_true")
    s.add_argument("--earnings", action="store_true", help="the account's Island earnings instead")
    s.set_defaults(func=cmd_ledger_statement)
    t = led.add_parser("trial-balance", help="every ledger account; the total must be zero")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_ledger_trial_balance)
    v = led.add_parser("verify", help="replay the log and check every invariant")
    v.set_defaults(func=cmd_ledger_verify)
    sw = led.add_parser("sweep-holds", help="release holds past their expiry")
    sw.set_defaults(func=cmd_ledger_sweep)
    d = sub.add_parser("demo", help="run the demonstration on the embedded default")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_BAD_INPUT
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"coordinator: invalid setting: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from api.logs import configure_logging
    from api.wiring import build

    configure_logging(settings.log_format, "warning")
    try:
        c = build(settings)
    except Exception as exc:  # noqa: BLE001 - operator-facing
        print(f"coordinator: cannot open the event store ({settings.store.describe()}): {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return args.func(c, args)
    except UsageError as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except LedgerError as exc:
        print(f"coordinator: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
