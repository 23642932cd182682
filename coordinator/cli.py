"""The `coordinator` operator CLI: one entry point, subcommands.

Bad input gets one clear line on stderr and exit status 2; nothing is written."""

from __future__ import annotations

import argparse
import sys
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any


from config.settings import Settings, SettingsError
from coordinator.cli_admin import add_admin_commands, add_grant_parser
from coordinator.cli_common import EXIT_BAD_INPUT, EXIT_FAILED, UsageError, _print
from ledger import names
from ledger.errors import LedgerError
from ledger.pricing import credits_to_micro, micro_to_credits

ACCOUNT_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0001")


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


def cmd_accounts_login_link(c, args) -> int:
    """A one-time sign-in link for the web app (web/login_links.py, decision 0065)."""
    from ledger.errors import UnknownAccount
    from web.login_links import LoginLinks
    from web.settings import WebSettings

    account_id = _uuid(args.account_id)
    ws = WebSettings.from_env(data_dir=c.settings.data_dir, host=c.settings.api.host, port=c.settings.api.port)
    ttl = args.ttl_s if args.ttl_s is not None else ws.login_link_ttl_s
    try:
        token, info = LoginLinks(c.committer).issue(account_id, ttl_s=ttl, by=f"operator:{args.by}")
    except UnknownAccount:
        raise UsageError(f"unknown account {account_id}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    base = (args.base_url or ws.public_url).rstrip("/")
    _print({"account_id": str(account_id), "login_link": f"{base}/login/link/{token}", "expires_in_s": ttl})
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
    """Ledger invariants and the hash chains of every account, Job and Island stream, in
    one pass over the whole log (or up to --position: compare `heads_digest` with one
    recorded earlier at that position)."""
    from ledger import audit
    from store.factory import iter_log

    upto = getattr(args, "position", None)
    if upto is not None and upto < 1:
        raise UsageError(f"--position must be a log position (1 or more), got {upto}")
    f, chains, log_position = audit.verify_log(
        iter_log(c.app, stop=upto), now_ms=c.clock.now_ms() if upto is None else None,
        grace_ms=c.settings.ledger.expiry_grace_ms, upto_position=upto)
    summary = f.summary()
    summary.update(chain_ok=chains.ok, chained_events=chains.chained_events,
                   unchained_events=chains.unchained_events, chain_breaks=len(chains.breaks),
                   streams=len(chains.heads), log_position=log_position, heads_digest=chains.heads_digest())
    if f.violations:
        first = f.violations[0]
        print(f"violation at position {first.position}: {first.message}", file=sys.stderr)
        summary["first_violation"] = {"position": first.position, "message": first.message}
    if chains.first_break is not None:
        b = chains.first_break
        print(b.describe(), file=sys.stderr)
        summary["first_chain_break"] = {"position": b.position, "stream": b.originator_id, "version": b.version,
                                        "topic": b.topic, "reason": b.reason, "expected": b.expected,
                                        "stored": b.stored}
    _print(summary)
    return 0 if not f.violations and chains.ok else EXIT_FAILED


def cmd_ledger_sweep(c, args) -> int:
    from ledger.sweeper import HoldSweeper

    released = HoldSweeper(c.ledger, lambda start: _log(c, start)).tick(c.clock.now_ms())
    _print({"released": released})
    return 0


def cmd_serve(c, args) -> int:
    """The HTTP API and every loop of the coordinator, until SIGTERM or Ctrl-C (coordinator/server.py)."""
    from coordinator.server import serve

    return serve(c, c.settings, args.host, args.port)


def cmd_demo(_c, args) -> int:
    """The coordinator with three local reference Islands and a demo account (coordinator/demo.py)."""
    from coordinator.demo import run_demo

    return run_demo(args.host, args.port)


# ------------------------------------------------------------------ projections (issue #6)
# Reads below come from the view tables (projections/), never from scanning the log. A
# one-shot CLI process first catches the views up to the head of the log (it is a
# projection runner itself; exactly-once holds with a server's runner alongside).
def _views(c):
    from projections.service import Projections

    proj = Projections.open(c.app, c.settings.store)
    proj.catch_up()
    return proj


def _ms(text: str | None) -> int | None:
    from store.clock import datetime_to_ms

    return None if text is None else datetime_to_ms(_time(text))


def _range(args) -> tuple[int | None, int | None]:
    lo, hi = _ms(args.from_), _ms(args.to)
    if lo is not None and hi is not None and lo >= hi:
        raise UsageError("--from must be before --to")
    return lo, hi


def cmd_ledger_balance_view(c, args) -> int:
    """`ledger balance`, served by the ledger view (the log fold only if the views fail)."""
    account_id = _uuid(args.account_id)
    if args.as_of and args.position is not None:
        raise UsageError("give --as-of or --position, not both")
    if args.position is not None and args.position < 0:
        raise UsageError("--position must be >= 0")
    as_of_ms = _ms(args.as_of)
    try:
        proj = _views(c)
    except Exception as exc:  # noqa: BLE001 - the views are an optimisation of this read
        print(f"coordinator: views unavailable ({exc}); folding the log instead", file=sys.stderr)
        return cmd_ledger_balance(c, args)
    try:
        read = proj.read
        if args.as_of or args.position is not None:
            at = read.balance_at(str(account_id), position=args.position, as_of_ms=as_of_ms)
            if at is None:
                raise UsageError(f"unknown account {account_id} (at that point)")
            position = min(args.position, read.position()) if args.position is not None else \
                read.last_position_at(as_of_ms)
            _print({"account_id": str(account_id), "as_of": args.as_of, "position": position,
                    "spendable": _credits(at["spendable_micro"]), "held": _credits(at["held_micro"]),
                    "earned": _credits(at["earned_micro"])})
            return 0
        bal = c.ledger.balance(account_id)  # the aggregate: spendable is a write-side invariant
        view = read.balance(str(account_id)) or {}
        _print({"account_id": bal.account_id, "email": bal.email, "spendable": _credits(bal.spendable_micro),
                "held": _credits(bal.held_micro), "spent": _credits(bal.spent_micro),
                "earned": _credits(view.get("earned_micro", 0)), "kyc_verified": bal.kyc_verified,
                "suspended": bal.suspended, "free_tier_remaining": _credits(bal.free_tier_remaining_micro),
                "position": read.position()})
        return 0
    finally:
        proj.close()


_STATEMENT_COLUMNS = ("position", "time", "event", "code", "reference", "counterparty", "amount", "amount_micro",
                      "balance_after", "balance_after_micro")


def cmd_ledger_statement_view(c, args) -> int:
    """Every change of an account in [--from, --to): code, reference (Job), amount, balance after."""
    import csv

    account_id = _uuid(args.account_id)
    lo, hi = _range(args)
    proj = _views(c)
    try:
        known = proj.read.balance(str(account_id))
        if known is None or not known["opened"]:
            c.ledger.balance(account_id)  # unknown account -> the ledger's own clear error
        acct_name = names.earnings(account_id) if args.earnings else names.spendable(account_id)
        lines = proj.read.statement(ledger_account=acct_name, from_ms=lo, to_ms=hi)
    finally:
        proj.close()
    rows = [{"position": ln["position"], "time": ln["time"].isoformat(), "event": ln["event"], "code": ln["code"],
             "reference": ln["reference"], "counterparty": ln["counterparty"],
             "amount": _credits(ln["amount_micro"]), "amount_micro": ln["amount_micro"],
             "balance_after": _credits(ln["balance_after_micro"]),
             "balance_after_micro": ln["balance_after_micro"]} for ln in lines]
    if args.csv:
        w = csv.DictWriter(sys.stdout, fieldnames=_STATEMENT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return 0
    if args.json:
        _print(rows)
        return 0
    print(f"statement of {acct_name}")
    print(f"{'pos':>7}  {'time':<32} {'code':<10} {'amount':>14} {'balance':>14}  reference / counterparty")
    for r in rows:
        print(f"{r['position']:>7}  {r['time']:<32} {r['code']:<10} {r['amount']:>14} {r['balance_after']:>14}  "
              f"{r['reference']} / {r['counterparty']}")
    return 0


_EXPORT_COLUMNS = ("position", "seq", "time", "event", "account_id", "debit", "credit", "amount", "amount_micro",
                   "code", "reference")


def cmd_ledger_export(c, args) -> int:
    """Every transfer in [--from, --to) as CSV (one line per transfer row, log order)."""
    import csv

    from store.clock import ms_to_datetime

    lo, hi = _range(args)
    proj = _views(c)
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    n = total = 0
    try:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(_EXPORT_COLUMNS)
        for t in proj.read.transfers(lo, hi):
            w.writerow((t["position"], t["seq"], ms_to_datetime(t["time_ms"]).isoformat(), t["event"],
                        t["account_id"], t["debit"], t["credit"], _credits(t["amount_micro"]), t["amount_micro"],
                        t["code"], t["reference"]))
            n += 1
            total += t["amount_micro"]
        position = proj.read.position()
    finally:
        if args.output:
            out.close()
        proj.close()
    print(f"exported {n} transfers ({_credits(total)} credits moved) up to log position {position}",
          file=sys.stderr)
    return 0


def _progress(label: str):
    """A rich progress bar on a terminal (stderr); None otherwise."""
    import contextlib

    if not sys.stderr.isatty():
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("positions"),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=True)

    class Bar:
        def __init__(self) -> None:
            self.task = None

        def __call__(self, done: int, total: int) -> None:
            if self.task is None:
                self.task = progress.add_task(label, total=total)
            progress.update(self.task, completed=done, total=total)

    @contextlib.contextmanager
    def bar():
        with progress:
            yield Bar()

    return bar()


def _chosen_projections(args) -> list[str]:
    """The projections a command names (`--name`), or all of them; a usage error if unknown."""
    from projections.catalog import select_projections

    try:
        return [p.name for p in select_projections([args.name] if args.name else None)]
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None


def cmd_projections_rebuild(c, args) -> int:
    from projections.rebuild import rebuild
    from projections.sql import Database

    chosen = _chosen_projections(args)
    db = Database(c.settings.store)
    try:
        with _progress(f"rebuild {' '.join(chosen)}") as bar:
            r = rebuild(c.app, db, chosen, progress=bar)
    finally:
        db.close()
    _print({"rebuilt": r.projections, "position": r.position, "events": r.events, "seconds": round(r.seconds, 3),
            "events_per_s": round(r.events_per_s), "rows": r.rows})
    return 0


def cmd_projections_verify(c, args) -> int:
    from projections.rebuild import verify
    from projections.sql import Database

    chosen = _chosen_projections(args)
    db = Database(c.settings.store)
    try:
        with _progress(f"verify {' '.join(chosen)}") as bar:
            r = verify(c.app, db, chosen, progress=bar)
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    finally:
        db.close()
    out: dict[str, Any] = {"verified": r.projections, "positions": r.position, "rows": r.rows, "ok": r.ok,
                           "seconds": round(r.seconds, 3)}
    if r.difference is not None:
        d = r.difference
        print(f"coordinator: first difference: {d.describe()}", file=sys.stderr)
        out["first_difference"] = {"projection": d.projection, "table": d.table, "key": list(d.key),
                                   "column": d.column, "live": repr(d.live), "rebuilt": repr(d.rebuilt)}
    _print(out)
    return 0 if r.ok else EXIT_FAILED


def cmd_projections_status(c, args) -> int:
    from projections.reader import ReadModels
    from store.factory import max_position

    read = ReadModels.open(c.settings.store)
    try:
        head = max_position(c.app)
        rows = read.status()
    finally:
        read.close()
    _print({"head": head, "projections": [{**r, "behind": head - r["position"]} for r in rows]})
    return 0


CHILD_SAMPLES = 10_000  # lag samples / timeline entries a server's projector child keeps (bounded memory)


def cmd_projections_run(c, args) -> int:
    """A projector process: keep the views current until SIGTERM / Ctrl-C."""
    import signal
    import threading

    from projections.service import run_until

    from coordinator.children import die_with_parent
    from projections.lock import EXIT_BUSY, ProjectorBusy, ProjectorLock

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    child = die_with_parent(stop.set)  # a child of `coordinator serve` ends when the server ends, however it ends
    try:
        lock = ProjectorLock.acquire(c.settings.store)
    except ProjectorBusy as exc:
        print(f"coordinator: {exc}; not starting a second one", file=sys.stderr)
        return EXIT_BUSY
    try:
        if stop.is_set():
            return 0
        _print(run_until(c.app, c.settings.store, stop, keep_samples=CHILD_SAMPLES if child else None,
                         cache_rows=c.settings.projection_cache_rows))
    finally:
        lock.release()
    return 0


def _add_projection_commands(sub, led, balance, statement) -> None:
    balance.set_defaults(func=cmd_ledger_balance_view)
    statement.add_argument("--from", dest="from_", default=None, help="ISO-8601 time (inclusive)")
    statement.add_argument("--to", default=None, help="ISO-8601 time (exclusive)")
    statement.add_argument("--csv", action="store_true", help="CSV on stdout")
    statement.set_defaults(func=cmd_ledger_statement_view)
    ex = led.add_parser("export", help="every transfer in a time range as CSV (external audit)")
    ex.add_argument("--from", dest="from_", default=None, help="ISO-8601 time (inclusive)")
    ex.add_argument("--to", default=None, help="ISO-8601 time (exclusive)")
    ex.add_argument("--output", "-o", default=None, help="file to write (default: stdout)")
    ex.set_defaults(func=cmd_ledger_export)
    pj = sub.add_parser("projections", help="read models: rebuild, verify, status").add_subparsers(
        dest="cmd", required=True)
    rb = pj.add_parser("rebuild", help="drop and replay a projection (all if no NAME) from the log")
    rb.add_argument("name", nargs="?", default=None, help="jobs | islands | ledger")
    rb.set_defaults(func=cmd_projections_rebuild)
    vf = pj.add_parser("verify", help="replay into scratch tables and compare with the live ones")
    vf.add_argument("name", nargs="?", default=None, help="jobs | islands | ledger")
    vf.set_defaults(func=cmd_projections_verify)
    st = pj.add_parser("status", help="tracked position of every projection and how far behind it is")
    st.set_defaults(func=cmd_projections_status)
    rn = pj.add_parser("run", help="keep the views current (a projector process) until SIGTERM")
    rn.set_defaults(func=cmd_projections_run)


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
    ll = acc.add_parser("login-link", help="a one-time web sign-in link for an account (short-lived, single use)")
    ll.add_argument("account_id")
    ll.add_argument("--ttl-s", dest="ttl_s", type=int, default=None,
                    help="seconds the link stays valid (default COORDINATOR_WEB_LOGIN_LINK_TTL_S or 900; max 86400)")
    ll.add_argument("--base-url", default=None, help="the web app's base URL (default COORDINATOR_PUBLIC_URL)")
    ll.add_argument("--by", default="cli", help="who issues it (recorded in the event)")
    ll.set_defaults(func=cmd_accounts_login_link)

    cr = sub.add_parser("credits", help="credit operations").add_subparsers(dest="cmd", required=True)
    add_grant_parser(cr)

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
    v = led.add_parser("verify", help="replay the log, check every invariant and every event hash chain")
    v.add_argument("--position", type=int, default=None,
                   help="verify the log up to this position (its heads_digest is comparable with one recorded then)")
    v.set_defaults(func=cmd_ledger_verify)
    sw = led.add_parser("sweep-holds", help="release holds past their expiry")
    sw.set_defaults(func=cmd_ledger_sweep)
    sv = sub.add_parser("serve", help="run the HTTP API and the coordinator's loops")
    sv.add_argument("--host", default=None, help="bind address (default COORDINATOR_HOST or 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None, help="port (default COORDINATOR_PORT or 8000; 0 = any free)")
    sv.set_defaults(func=cmd_serve)
    d = sub.add_parser("demo", help="the coordinator with demo Islands and a demo account (embedded default)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8000)
    d.set_defaults(func=cmd_demo, standalone=True)
    _add_projection_commands(sub, led, b, s)
    from coordinator.cli_islands import add_island_commands  # islands create|list, island run (#5)

    add_island_commands(sub)
    add_admin_commands(sub)  # every operator action in one group
    # `simulate` is forwarded to the dispatch simulator before parsing (main); listed here for --help.
    sub.add_parser("simulate", help="run the dispatch simulator (docs/SIMULATOR.md)", add_help=False)
    return p


def _store_hint(settings: Settings) -> str:
    """Why an embedded store could not be opened, when the file system can say (read-only,
    not writable, full)."""
    import errno
    import os

    if settings.store.is_postgres:
        return ""
    d = settings.store.data_dir
    probe = d if d.exists() else d.parent
    try:
        st = os.statvfs(probe)
        if st.f_flag & os.ST_RDONLY:
            return f" (the data directory {d} is on a read-only file system)"
        if st.f_bavail == 0:
            return f" (the file system of {d} is full)"
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return f" (the data directory {d} does not exist and cannot be created)"
    if not os.access(probe, os.W_OK):
        return f" (the data directory {d} is not writable)"
    return ""


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    if raw[:1] == ["simulate"]:  # the simulator parses its own arguments and opens no event store
        from simulations.cli import main as simulate_main

        return simulate_main(raw[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else EXIT_BAD_INPUT
    if getattr(args, "standalone", False):  # `island run`: an Island agent opens no event store
        return args.func(None, args)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"coordinator: invalid setting: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from coordinator.logs import configure_logging
    from coordinator.wiring import build

    configure_logging(settings.log_format, "warning")
    try:
        c = build(settings)
    except Exception as exc:  # noqa: BLE001 - operator-facing
        print(f"coordinator: cannot open the event store ({settings.store.describe()}): {exc}{_store_hint(settings)}",
              file=sys.stderr)
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
    # `python -m coordinator.cli` runs this file as __main__; run the `coordinator.cli` module instead, so
    # that the command modules (coordinator/cli_islands.py) raise the UsageError `main` catches.
    from coordinator.cli import main as _main

    sys.exit(_main())
