"""The CLI's projection commands: statement (--from/--to/--csv), balance as of a position
or time, export, projections rebuild / verify / status (exit 1 naming the first
differing row)."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest

from coordinator.cli import main
from ledger import audit, names
from store.factory import iter_log, open_app
from tests.conftest import env_for


@pytest.fixture
def cli(store_config, monkeypatch, capsys):
    for k, v in env_for(store_config).items():
        monkeypatch.setenv(k, v)
    # main() would point structlog at pytest's captured stream, closed after this test
    monkeypatch.setattr("coordinator.logs.configure_logging", lambda *a, **k: None)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _json(out: str):
    return json.loads(out.strip().splitlines()[-1])


def _ledger_activity() -> str:
    """A consumer with credits, one settled and one released hold (earnings for an owner)."""
    from config.settings import Settings
    from coordinator.wiring import build
    from ledger.service import account_id_for_email

    c = build(Settings.from_env())
    try:
        consumer = account_id_for_email("consumer@example.org")
        owner = account_id_for_email("owner@example.org")
        c.ledger.open_account(consumer, "consumer@example.org", kyc_verified=True, initial_grant_micro=100_000_000)
        c.ledger.open_account(owner, "owner@example.org", kyc_verified=True)
        c.ledger.place_hold(consumer, "h1", 20_000_000, reference="job:h1")
        c.ledger.post_hold(consumer, "h1", 12_345_678, owner)
        c.ledger.place_hold(consumer, "h2", 3_000_000, reference="job:h2")
        c.ledger.release_hold(consumer, "h2", "cancelled")
    finally:
        c.close()
    return str(consumer)


def test_statement_balance_export_and_projection_commands(cli, store_config):
    consumer = _ledger_activity()
    assert cli("credits", "grant", consumer, "2.5", "--reason", "ticket 7")[0] == 0

    # statement: CSV lines sum to the balance; the last balance_after is the balance
    code, out, _ = cli("ledger", "statement", consumer, "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and {"position", "code", "reference", "amount_micro", "balance_after_micro"} <= set(rows[0])
    code, out, _ = cli("ledger", "balance", consumer)
    bal = _json(out)
    total = sum(int(r["amount_micro"]) for r in rows)
    assert total == int(rows[-1]["balance_after_micro"]) == round(bal["spendable"] * 1_000_000)
    assert any(r["code"] == "hold" and r["reference"].startswith("job:") for r in rows)

    # --from / --to select by time, [from, to)
    times = sorted({r["time"] for r in rows})
    code, out, _ = cli("ledger", "statement", consumer, "--json", "--from", times[-1])
    assert code == 0 and all(r["time"] >= times[-1] for r in json.loads(out))
    code, out, _ = cli("ledger", "statement", consumer, "--json", "--to", times[-1])
    assert code == 0 and all(r["time"] < times[-1] for r in json.loads(out))
    assert cli("ledger", "statement", consumer, "--from", times[-1], "--to", times[0])[0] == 2

    # balance at a position equals the fold of the log up to there
    app = open_app(store_config)
    try:
        log = list(iter_log(app, topics=audit.LEDGER_TOPICS))
        for position in sorted({p for p, _ in log})[::3]:
            code, out, _ = cli("ledger", "balance", consumer, "--position", str(position))
            f = audit.fold(iter(log), check=False, upto_position=position)
            if consumer not in f.accounts:
                assert code == 2
                continue
            got = _json(out)
            assert round(got["spendable"] * 1_000_000) == f.balances.get(names.spendable(consumer), 0)
            assert round(got["held"] * 1_000_000) == f.balances.get(names.held(consumer), 0)
        last_time = log[-1][1].timestamp
        code, out, _ = cli("ledger", "balance", consumer, "--as-of", (last_time + timedelta(seconds=1)).isoformat())
        assert code == 0 and _json(out)["spendable"] == bal["spendable"]

        # export: every transfer row of the log, once, in log order
        code, out, err = cli("ledger", "export")
        assert code == 0 and "exported" in err
        exported = list(csv.DictReader(io.StringIO(out)))
        expected = [(p, d, c_, amt, code_) for p, e in log for d, c_, amt, code_ in getattr(e, "transfers", [])]
        assert [(int(r["position"]), r["debit"], r["credit"], int(r["amount_micro"]), r["code"]) for r in exported] \
            == expected
        mid = exported[len(exported) // 2]["time"]
        code, out, _ = cli("ledger", "export", "--from", mid)
        assert all(r["time"] >= mid for r in csv.DictReader(io.StringIO(out)))
    finally:
        app.close()

    # projections: status, rebuild one and all, verify ok
    code, out, _ = cli("projections", "status")
    st = _json(out)
    assert code == 0 and {p["name"] for p in st["projections"]} == {"jobs", "islands", "ledger", "market"}
    code, out, _ = cli("projections", "rebuild", "ledger")
    assert code == 0 and _json(out)["rebuilt"] == ["ledger"]
    code, out, _ = cli("projections", "rebuild")
    assert code == 0 and _json(out)["events"] > 0
    code, out, _ = cli("projections", "verify")
    assert code == 0 and _json(out)["ok"] is True
    assert cli("projections", "rebuild", "nope")[0] == 2

    # tamper with a live row: verify exits 1 and names it
    from projections.sql import Database

    conn = Database(store_config).connect()
    conn.execute("UPDATE proj_balances SET balance_micro = balance_micro + 5 WHERE ledger_account = ?",
                 (names.spendable(consumer),))
    conn.close()
    code, out, err = cli("projections", "verify")
    assert code == 1
    assert "proj_balances" in err and names.spendable(consumer) in err and "balance_micro" in err
    assert _json(out)["first_difference"]["table"] == "proj_balances"
    assert cli("projections", "rebuild")[0] == 0
    assert cli("projections", "verify")[0] == 0
