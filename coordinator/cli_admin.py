"""`coordinator admin ...`: every operator action in one command group, the CLI twin of the
operator API (`/api/v1/admin/...`, admin/http.py). Each action is an event naming the
operator (`--by`) and the reason (`--reason`).

    coordinator admin islands approve|suspend|drain|undrain ID --reason TEXT [--by NAME]
    coordinator admin islands karma ID DELTA --reason TEXT [--by NAME]
    coordinator admin cargos enable|disable SLUG --reason TEXT [--by NAME]
    coordinator admin accounts kyc ACCOUNT --verified|--unverified --reason TEXT [--by NAME]
    coordinator admin accounts ban|unban ACCOUNT --reason TEXT [--by NAME]
    coordinator admin credits grant ACCOUNT AMOUNT --reason TEXT [--idempotency-key K] [--by NAME]

The older spellings `coordinator credits grant` and `coordinator islands approve|suspend|karma`
run these same functions (decision 0043)."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from coordinator.cli_common import UsageError, _print
from ledger import names
from ledger.pricing import credits_to_micro, micro_to_credits


def _uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise UsageError(f"not an {what} id: {text!r}") from None


def _credits(micro: int) -> Decimal:
    return micro_to_credits(micro)


def _amount(text: str) -> int:
    try:
        micro = credits_to_micro(text)
    except ValueError as exc:
        raise UsageError(f"bad amount {text!r}: {exc}") from None
    if micro <= 0:
        raise UsageError(f"amount must be positive, got {text!r}")
    return micro


def _reason(args: Any) -> str:
    reason = (args.reason or "").strip()
    if not reason:
        raise UsageError("--reason is required (it is recorded with the event)")
    return reason[:500]


# ------------------------------------------------------------------ credits
def cmd_credits_grant(c, args) -> int:
    account_id = _uuid(args.account_id, "account")
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


# ------------------------------------------------------------------ islands
def _set_approval(c, args, approved: bool) -> int:
    from scheduler.commands import NotYourJob

    island_id = _uuid(args.island_id, "island")
    reason = (args.reason or "").strip()
    if not approved and not reason:
        raise UsageError("--reason is required to suspend an Island")
    try:
        c.scheduler.set_island_approval(island_id, approved, by=args.by, reason=reason)
    except NotYourJob:
        raise UsageError(f"unknown island {island_id}") from None
    _print({"island_id": str(island_id), "approval": "approved" if approved else "suspended", "by": args.by,
            "reason": reason})
    return 0


def cmd_islands_approve(c, args) -> int:
    return _set_approval(c, args, True)


def cmd_islands_suspend(c, args) -> int:
    return _set_approval(c, args, False)


def cmd_islands_karma(c, args) -> int:
    """An operator's karma adjustment (decision 0041): the way back below a Cargo's gate."""
    from routing.karma import parse_karma_milli
    from scheduler.commands import BadKarmaAdjustment, NotYourJob

    island_id = _uuid(args.island_id, "island")
    reason = (args.reason or "").strip()
    if not reason:
        raise UsageError("--reason is required (it is recorded with the adjustment)")
    try:
        delta_milli = parse_karma_milli(args.delta)
        change = c.scheduler.adjust_island_karma(island_id, delta_milli, by=args.by, reason=reason)
    except (ValueError, BadKarmaAdjustment) as exc:
        raise UsageError(f"delta: {exc}") from None
    except NotYourJob:
        raise UsageError(f"unknown island {island_id}") from None
    _print({"island_id": str(island_id), "karma_before": change.before_milli / 1000,
            "karma": change.after_milli / 1000, "by": args.by, "reason": reason})
    return 0


def _set_draining(c, args, draining: bool) -> int:
    from scheduler.commands import NotYourJob

    island_id = _uuid(args.island_id, "island")
    reason = _reason(args)
    try:
        changed = c.scheduler.set_island_draining(island_id, draining, by=args.by, reason=reason)
    except NotYourJob:
        raise UsageError(f"unknown island {island_id}") from None
    _print({"island_id": str(island_id), "draining": draining, "changed": changed, "by": args.by, "reason": reason})
    return 0


def cmd_islands_drain(c, args) -> int:
    return _set_draining(c, args, True)


def cmd_islands_undrain(c, args) -> int:
    return _set_draining(c, args, False)


# ------------------------------------------------------------------ cargos
def _set_cargo(c, args, enabled: bool) -> int:
    from scheduler.cargo import UnknownCargo

    reason = _reason(args)
    try:
        changed = c.scheduler.set_cargo_enabled(args.slug, enabled, by=args.by, reason=reason)
    except UnknownCargo:
        raise UsageError(f"unknown cargo {args.slug!r}; known: {', '.join(cargo.slug for cargo in c.catalog.all())}") from None
    _print({"slug": args.slug, "enabled": enabled, "changed": changed, "by": args.by, "reason": reason})
    return 0


def cmd_cargos_enable(c, args) -> int:
    return _set_cargo(c, args, True)


def cmd_cargos_disable(c, args) -> int:
    return _set_cargo(c, args, False)


# ------------------------------------------------------------------ accounts
def cmd_accounts_kyc(c, args) -> int:
    account_id = _uuid(args.account_id, "account")
    reason = _reason(args)
    changed = c.ledger.set_kyc(account_id, args.verified, by=args.by, reference=reason)
    _print({"account_id": str(account_id), "kyc_verified": args.verified, "changed": changed, "by": args.by,
            "reason": reason})
    return 0


def _set_banned(c, args, banned: bool) -> int:
    account_id = _uuid(args.account_id, "account")
    reason = _reason(args)
    changed = c.ledger.set_suspended(account_id, banned, by=args.by, reason=reason)
    _print({"account_id": str(account_id), "suspended": banned, "changed": changed, "by": args.by,
            "reason": reason})
    return 0


def cmd_accounts_ban(c, args) -> int:
    return _set_banned(c, args, True)


def cmd_accounts_unban(c, args) -> int:
    return _set_banned(c, args, False)


# ------------------------------------------------------------------ parsers
def add_grant_parser(group: Any) -> Any:
    g = group.add_parser("grant", help="grant credits to an account")
    g.add_argument("account_id")
    g.add_argument("amount", help="credits (decimal, up to 6 places)")
    g.add_argument("--reason", required=True)
    g.add_argument("--by", default="operator", help="operator name recorded with the grant")
    g.add_argument("--idempotency-key", default=None, help="a retry with the same key grants once")
    g.set_defaults(func=cmd_credits_grant)
    return g


def add_island_action_parsers(group: Any, *, drain: bool) -> None:
    actions = [("approve", cmd_islands_approve, "let an Island receive Jobs"),
               ("suspend", cmd_islands_suspend, "stop offering Jobs to an Island")]
    if drain:
        actions += [("drain", cmd_islands_drain, "offer an Island no new Jobs; running ones finish"),
                    ("undrain", cmd_islands_undrain, "end a drain")]
    for name, fn, help_ in actions:
        a = group.add_parser(name, help=help_)
        a.add_argument("island_id")
        a.add_argument("--reason", default="", help="recorded with the event (required to suspend or drain)")
        a.add_argument("--by", default="operator", help="operator name recorded with the event")
        a.set_defaults(func=fn)
    k = group.add_parser("karma", help="adjust an Island's karma (the way back below a Cargo's gate)")
    k.add_argument("island_id")
    k.add_argument("delta", help='karma to add (negative to remove), up to 3 decimals, e.g. "12" or "-0.5"')
    k.add_argument("--reason", required=True, help="recorded with the adjustment")
    k.add_argument("--by", default="operator", help="operator name recorded with the event")
    k.set_defaults(func=cmd_islands_karma)


def add_admin_commands(sub: Any) -> None:
    adm = sub.add_parser("admin", help="every operator action (islands, cargos, accounts, credits)")
    groups = adm.add_subparsers(dest="admin_group", required=True)
    isl = groups.add_parser("islands", help="approve, suspend, drain, karma").add_subparsers(dest="cmd", required=True)
    add_island_action_parsers(isl, drain=True)
    cg = groups.add_parser("cargos", help="the Cargo kill switch").add_subparsers(dest="cmd", required=True)
    for name, fn in (("enable", cmd_cargos_enable), ("disable", cmd_cargos_disable)):
        a = cg.add_parser(name, help=f"{name} a Cargo for every process")
        a.add_argument("slug")
        a.add_argument("--reason", required=True)
        a.add_argument("--by", default="operator")
        a.set_defaults(func=fn)
    ac = groups.add_parser("accounts", help="KYC, ban").add_subparsers(dest="cmd", required=True)
    k = ac.add_parser("kyc", help="record a KYC decision")
    k.add_argument("account_id")
    state = k.add_mutually_exclusive_group(required=True)
    state.add_argument("--verified", dest="verified", action="store_true")
    state.add_argument("--unverified", dest="verified", action="store_false")
    k.add_argument("--reason", required=True, help="recorded as the reference (e.g. the KYC provider's case id)")
    k.add_argument("--by", default="operator")
    k.set_defaults(func=cmd_accounts_kyc)
    for name, fn, help_ in (("ban", cmd_accounts_ban, "suspend an account: its keys stop working for new Jobs"),
                            ("unban", cmd_accounts_unban, "lift a ban")):
        a = ac.add_parser(name, help=help_)
        a.add_argument("account_id")
        a.add_argument("--reason", required=True)
        a.add_argument("--by", default="operator")
        a.set_defaults(func=fn)
    cr = groups.add_parser("credits", help="ledger grants").add_subparsers(dest="cmd", required=True)
    add_grant_parser(cr)
