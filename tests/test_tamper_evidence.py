"""Tamper evidence (issue #6): every Account, Job and Island event carries `chain`, a hash
linking it to the previous event of its stream; `coordinator ledger verify` recomputes
every chain and names the first break. The tests edit stored events directly in SQLite
and PostgreSQL, as an attacker with database access would."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from coordinator.cli import main
from ledger.accounts import Account
from ledger.service import Ledger, LedgerConfig
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.islands import Island
from scheduler.jobs import Job
from scheduler.service import Scheduler
from store.chain import GENESIS, V2_MARK, chain_hash, chain_hash_v2, state_body, verify_chains
from store.clock import ManualClock, SeededIds
from store.factory import MEMORY_URL, StoreConfig, iter_log, open_app, parse_postgres_url
from store.transcoder import MsgspecTranscoder
from store.unit_of_work import GroupCommitter
from tests.conftest import PG_URL, env_for

CHAT = {"cargos": ["llm-chat"], "models": ["mistral-7b-instruct"], "vram_mb": 24_000, "ram_mb": 64_000,
        "slots": 1, "region": "eu"}


# ------------------------------------------------------------------ helpers
def workload(config: StoreConfig) -> dict[str, Any]:
    """Accounts, funding, a hold settled, an Island and one Job from submission to
    completion: every chained aggregate type, several events per stream."""
    app = open_app(config)
    clock = ManualClock()
    committer = GroupCommitter(app, clock, inline=True)
    ledger_config = LedgerConfig(fee_bps=1_000)
    ledger = Ledger(committer, ledger_config)
    consumer, owner = uuid.uuid4(), uuid.uuid4()
    ledger.open_account(consumer, "consumer@x", kyc_verified=True, initial_grant_micro=50_000_000)
    ledger.open_account(owner, "owner@x", kyc_verified=True)
    ledger.fund(consumer, 2_000_000, code="purchase", reference="order-1", reason="card", idem_key="buy-1")
    ledger.place_hold(consumer, "h1", 3_000_000, reference="job:manual")
    clock.advance(1_000)
    ledger.post_hold(consumer, "h1", 2_000_000, owner)
    sched = Scheduler(committer, Catalog.load(), ledger_config, SchedulerConfig(), clock, SeededIds(7))
    island = sched.register_island(owner, "island-1", CHAT, approve=True).island_id
    sched.recover()
    sched.heartbeat(island)
    job = sched.submit(consumer, "llm-chat", {"prompt": "hello", "max_tokens": 50})
    job_id = uuid.UUID(job.id)
    sched.step()
    sched.accept(island, job_id)
    clock.advance(2_000)
    sched.complete(island, job_id, {"prompt_tokens": 10, "completion_tokens": 40}, "the answer", 1_500)
    log = [(p, type(e).__qualname__, str(e.originator_id), e.originator_version) for p, e in iter_log(app)]
    committer.close()
    app.close()
    return {"log": log, "consumer": str(consumer), "job": str(job_id), "island": island}


def position_of(log: list, name: str, stream: str | None = None) -> int:
    return next(p for p, n, s, _ in log if n == name and (stream is None or s == stream))


def next_in_stream(log: list, position: int) -> int:
    stream = next(s for p, _, s, _ in log if p == position)
    return next(p for p, _, s, _ in log if s == stream and p > position)


def _pg(config: StoreConfig):
    import psycopg

    p = parse_postgres_url(PG_URL)
    return psycopg.connect(dbname=p["POSTGRES_DBNAME"], host=p["POSTGRES_HOST"], port=p["POSTGRES_PORT"],
                           user=p["POSTGRES_USER"], password=p["POSTGRES_PASSWORD"] or None, autocommit=True)


def edit_stored(config: StoreConfig, position: int, edit: Callable[[dict, dict], None]) -> None:
    """Decode the stored state of the event at `position`, let `edit(state, row)` change it
    (row: originator_id, originator_version, topic), encode it again and UPDATE the row."""
    t = MsgspecTranscoder()
    if config.is_postgres:
        table = f'"{config.schema}".coordinator_events'
        with _pg(config) as conn:
            oid, version, topic, state = conn.execute(
                f"SELECT originator_id, originator_version, topic, state FROM {table} WHERE notification_id = %s",
                (position,)).fetchone()
            decoded = t.decode(bytes(state))
            edit(decoded, {"originator_id": oid, "originator_version": version, "topic": topic})
            n = conn.execute(f"UPDATE {table} SET state = %s WHERE notification_id = %s",
                             (t.encode(decoded), position)).rowcount
    else:
        with sqlite3.connect(config.data_dir / "events.sqlite") as conn:
            oid, version, topic, state = conn.execute(
                "SELECT originator_id, originator_version, topic, state FROM stored_events WHERE rowid = ?",
                (position,)).fetchone()
            decoded = t.decode(state)
            edit(decoded, {"originator_id": uuid.UUID(oid), "originator_version": version, "topic": topic})
            n = conn.execute("UPDATE stored_events SET state = ? WHERE rowid = ?",
                             (t.encode(decoded), position)).rowcount
    assert n == 1


def delete_stored(config: StoreConfig, position: int) -> None:
    if config.is_postgres:
        with _pg(config) as conn:
            n = conn.execute(f'DELETE FROM "{config.schema}".coordinator_events WHERE notification_id = %s',
                             (position,)).rowcount
    else:
        with sqlite3.connect(config.data_dir / "events.sqlite") as conn:
            n = conn.execute("DELETE FROM stored_events WHERE rowid = ?", (position,)).rowcount
    assert n == 1


def stored_chain(config: StoreConfig, position: int) -> str:
    out: list[str] = []
    edit_stored(config, position, lambda state, row: out.append(state["chain"]))
    return out[0]


def fund_from_a_fresh_process(config: StoreConfig, account: str) -> int:
    """A new process opens the store, replays the account from the log and funds it:
    the account's next event, after whatever the log held. Returns its position."""
    app = open_app(config)
    committer = GroupCommitter(app, ManualClock(2_000_000_000_000), inline=True)
    Ledger(committer, LedgerConfig()).fund(uuid.UUID(account), 1_000, code="purchase", reference="r",
                                           reason="after the upgrade", idem_key="k-after")
    position = app.recorder.max_notification_id()
    committer.close()
    app.close()
    return position


@pytest.fixture
def verify(store_config, monkeypatch, capsys):
    for k, v in env_for(store_config).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("coordinator.logs.configure_logging", lambda *a, **k: None)

    def run(*extra: str) -> tuple[int, dict, str]:
        code = main(["ledger", "verify", *extra])
        out, err = capsys.readouterr()
        return code, json.loads(out.strip().splitlines()[-1]), err

    return run


# ------------------------------------------------------------------ through the CLI, SQLite and PostgreSQL
def test_verify_passes_then_names_an_edited_amount(store_config, verify):
    w = workload(store_config)
    log = w["log"]
    code, summary, err = verify()
    assert code == 0, err
    assert summary["chain_ok"] is True and summary["balanced"] is True
    assert summary["chained_events"] == len(log)  # every event of this log is an Account, Job or Island event
    assert summary["streams"] == 4 and summary["unchained_events"] == 0
    assert {"transfers", "accounts", "heads_digest"} <= set(summary)
    assert {n.split(".")[0] for _, n, _, _ in log} == {"Account", "Island", "Job"}

    # The settlement of hold h1: the attacker halves what the consumer paid.
    target = position_of(log, "Account.HoldPosted", w["consumer"])

    def halve(state: dict, row: dict) -> None:
        assert state["transfers"][0][3] == "post"
        state["transfers"][0][2] //= 2

    edit_stored(store_config, target, halve)
    code, summary, err = verify()
    assert code == 1
    assert summary["chain_ok"] is False
    brk = summary["first_chain_break"]
    assert brk["position"] == target and brk["stream"] == w["consumer"] and brk["topic"].endswith("HoldPosted")
    assert brk["stored"] != brk["expected"]
    assert f"chain break at position {target}: stream {w['consumer']}" in err
    assert summary["chain_breaks"] == 1  # the stream goes on from the stored hash: one edit, one break
    # Keys the auditor's tooling already reads are still there.
    assert {"balanced", "transfers", "accounts"} <= set(summary)


def test_an_edit_invisible_to_the_books_is_caught(store_config, verify):
    """The Job's charged price is not part of the ledger fold: only the chain sees it."""
    w = workload(store_config)
    target = position_of(w["log"], "Job.Completed", w["job"])
    edit_stored(store_config, target, lambda state, row: state.update(charged_micro=state["charged_micro"] + 1))
    code, summary, err = verify()
    assert code == 1 and summary["balanced"] is True and summary["chain_ok"] is False
    assert summary["first_chain_break"]["position"] == target
    assert f"chain break at position {target}: stream {w['job']} version " in err


@pytest.mark.parametrize("scheme", [1, 2])
def test_a_recomputed_hash_is_caught_by_the_next_link(store_config, verify, scheme):
    """The attacker edits the Job's submission and recomputes that event's own hash (no
    secret is needed for that), by either scheme: the event checks out alone, the next one
    no longer links."""
    w = workload(store_config)
    target = position_of(w["log"], "Job.Submitted", w["job"])

    def forge(state: dict, row: dict) -> None:
        assert state["chain"].startswith(V2_MARK)  # written by the current scheme
        state["hold_micro"] = 1
        args = (GENESIS, row["topic"], row["originator_id"], row["originator_version"])
        state["chain"] = chain_hash(*args, state) if scheme == 1 else chain_hash_v2(*args, state_body(state))

    edit_stored(store_config, target, forge)
    code, summary, err = verify()
    following = next_in_stream(w["log"], target)
    assert code == 1 and summary["balanced"] is True
    brk = summary["first_chain_break"]
    assert brk["position"] == following != target
    assert brk["stream"] == w["job"] and brk["version"] == 2 and brk["topic"].endswith("Job.Assigned")
    assert f"chain break at position {following}:" in err


def test_a_missing_event_breaks_the_sequence(store_config, verify):
    w = workload(store_config)
    target = position_of(w["log"], "Job.Started", w["job"])
    delete_stored(store_config, target)
    code, summary, err = verify()
    assert code == 1
    brk = summary["first_chain_break"]
    assert brk["position"] == next_in_stream(w["log"], target) and "missing" in brk["reason"]


def test_a_cut_tail_is_invisible_to_the_chain_but_not_to_recorded_heads(store_config, verify):
    """Documented limit (decision 0040): deleting the last event of a stream leaves a valid
    chain. The heads digest an auditor recorded at position N no longer matches."""
    w = workload(store_config)
    code, recorded, _ = verify()
    assert code == 0
    at = recorded["log_position"]
    code, again, _ = verify("--position", str(at))
    assert code == 0 and again["heads_digest"] == recorded["heads_digest"]  # reproducible as of a position

    delete_stored(store_config, position_of(w["log"], "Job.Completed", w["job"]))
    code, now, _ = verify("--position", str(at))
    assert now["chain_ok"] is True  # a per-stream chain cannot see a cut tail...
    assert now["heads_digest"] != recorded["heads_digest"]  # ...the recorded heads can


def test_verify_as_of_an_earlier_position(store_config, verify):
    w = workload(store_config)
    upto = position_of(w["log"], "Account.HoldPosted", w["consumer"])
    code, summary, _ = verify("--position", str(upto))
    assert code == 0 and summary["log_position"] == upto
    assert summary["chained_events"] == sum(1 for p, *_ in w["log"] if p <= upto) < len(w["log"])
    assert main(["ledger", "verify", "--position", "0"]) == 2


def test_a_log_written_before_chaining_still_verifies_and_chains_from_there(store_config, verify):
    """Events without `chain` (written before this change) are accepted as a stream's
    prefix; the aggregate's next event starts its chain from the empty hash. A chain-less
    event after chained ones is a break (stripping the hash does not hide an edit)."""
    w = workload(store_config)
    consumer_positions = [p for p, _, s, _ in w["log"] if s == w["consumer"]]
    for p in consumer_positions:
        edit_stored(store_config, p, lambda state, row: state.pop("chain"))
    code, summary, _ = verify()
    assert code == 0 and summary["unchained_events"] == len(consumer_positions)
    assert summary["chained_events"] == len(w["log"]) - len(consumer_positions)

    new = fund_from_a_fresh_process(store_config, w["consumer"])  # the account is replayed from the log
    code, summary, _ = verify()
    assert code == 0 and summary["chained_events"] == len(w["log"]) - len(consumer_positions) + 1

    digest = summary["heads_digest"]

    # Stripping the hash off a stream's whole chained suffix is a consistent rewrite: the
    # chain cannot tell it from an old log; the recorded heads digest can.
    edit_stored(store_config, new, lambda state, row: state.pop("chain"))
    code, summary, _ = verify()
    assert code == 0 and summary["heads_digest"] != digest

    # A chain-less event after chained ones is a break: the Job's completion, edited and
    # stripped of its hash to pose as a pre-chaining event.
    completed = position_of(w["log"], "Job.Completed", w["job"])
    edit_stored(store_config, completed, lambda state, row: (state.pop("chain"), state.update(charged_micro=0)))
    code, summary, _ = verify()
    assert code == 1 and summary["first_chain_break"]["position"] == completed
    assert "without a chain hash" in summary["first_chain_break"]["reason"]


def rewrite_as_scheme_1(config: StoreConfig, log: list) -> None:
    """Make the stored log what a coordinator before decision 0073 wrote: every chain value
    recomputed by scheme 1, stream by stream, in log order."""
    heads: dict[str, str] = {}

    def rehash(state: dict, row: dict) -> None:
        stream = str(row["originator_id"])
        state["chain"] = chain_hash(heads.get(stream, GENESIS), row["topic"], row["originator_id"],
                                    row["originator_version"], state)
        heads[stream] = state["chain"]

    for position, *_ in log:
        edit_stored(config, position, rehash)


def test_a_scheme_1_log_verifies_and_continues_with_scheme_2(store_config, verify):
    """Upcast, not a flag day: a log whose chains were all written by scheme 1 verifies;
    its streams go on with scheme-2 events linked to their scheme-1 heads; an edit of an
    old event is still a break."""
    w = workload(store_config)
    rewrite_as_scheme_1(store_config, w["log"])
    assert not stored_chain(store_config, position_of(w["log"], "Job.Completed", w["job"])).startswith(V2_MARK)
    code, summary, err = verify()
    assert code == 0, err
    assert summary["chained_events"] == len(w["log"]) and summary["unchained_events"] == 0

    new = fund_from_a_fresh_process(store_config, w["consumer"])  # replayed from the scheme-1 log
    assert stored_chain(store_config, new).startswith(V2_MARK)
    code, summary, err = verify()
    assert code == 0, err
    assert summary["chained_events"] == len(w["log"]) + 1

    # The scheme-2 event's hash names its scheme-1 predecessor: editing that one breaks
    # the old event itself, and only it (the stream goes on from the stored hash).
    target = position_of(w["log"], "Account.HoldPosted", w["consumer"])
    edit_stored(store_config, target, lambda state, row: state.update(posted_micro=state["posted_micro"] + 1))
    code, summary, _ = verify()
    assert code == 1 and summary["first_chain_break"]["position"] == target
    assert summary["chain_breaks"] == 1


def test_a_scheme_2_value_is_checked_by_scheme_2_only(store_config, verify):
    """Relabelling a scheme-1 hash as scheme 2 (or the reverse) is a break: each value is
    checked by the scheme its form names, never by whichever happens to match."""
    w = workload(store_config)
    target = position_of(w["log"], "Job.Completed", w["job"])
    edit_stored(store_config, target, lambda state, row: state.update(chain=state["chain"][len(V2_MARK):]))
    code, summary, _ = verify()
    assert code == 1 and summary["first_chain_break"]["position"] == target


# ------------------------------------------------------------------ the hash itself
def test_chain_hash_is_canonical():
    t = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=timezone.utc)
    a = {"timestamp": t, "transfers": [["a", "b", 5, "hold"]], "meta": {"y": 1, "x": [1, 2]}}
    b = {"meta": {"x": (1, 2), "y": 1}, "transfers": [["a", "b", 5, "hold"]],
         "timestamp": t.astimezone(timezone(timedelta(hours=5))), "chain": "ignored", "originator_version": 9}
    oid = uuid.uuid4()
    h = chain_hash("", "m:C.E", oid, 1, a)
    assert h == chain_hash("", "m:C.E", str(oid), 1, b) and len(h) == 64
    for other in (chain_hash("x", "m:C.E", oid, 1, a), chain_hash("", "m:C.F", oid, 1, a),
                  chain_hash("", "m:C.E", uuid.uuid4(), 1, a), chain_hash("", "m:C.E", oid, 2, a),
                  chain_hash("", "m:C.E", oid, 1, {**a, "meta": {"y": 2, "x": [1, 2]}})):
        assert other != h


def test_every_event_of_the_chained_aggregates_has_a_chain_field_and_replays_its_head():
    for agg in (Account, Job, Island):
        events = [v for v in vars(agg).values() if isinstance(v, type) and issubclass(v, agg.Event)]
        assert events and all("chain" in v.__dataclass_fields__ for v in events), agg
    app = open_app(StoreConfig(database_url=MEMORY_URL, data_dir=None))  # type: ignore[arg-type]
    committer = GroupCommitter(app, ManualClock(), inline=True)
    ledger = Ledger(committer, LedgerConfig())
    acct = uuid.uuid4()
    ledger.open_account(acct, "a@x", kyc_verified=True, initial_grant_micro=1_000_000)
    ledger.place_hold(acct, "h", 500_000, reference="job:h")
    live = committer.query(lambda uow: uow.get(acct))
    replayed = app.repository.get(acct)
    events = list(iter_log(app))
    assert live.chain_head == replayed.chain_head == events[-1][1].chain != GENESIS
    report = verify_chains(events)
    assert report.ok and report.chained_events == len(events) == 4
    assert report.heads == {str(acct): (4, live.chain_head)}
