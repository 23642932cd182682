"""ReadModels: every question a reader asks, answered from the view tables (never by
scanning the log). Thread-safe: each thread gets its own connection.

Read-your-writes: a writer knows the log position of its own write (the commit's
recordings carry notification ids); `wait_for(position, timeout_s)` blocks until every
projection has committed that position (bounded; returns False on timeout). With a
runner in this process the wait is woken by it; otherwise the tracking table is polled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from ledger import names
from projections.islands import ISLANDS, KARMA_HISTORY
from projections.jobs import JOB_COLUMNS, job_row_to_dict, list_jobs_sql
from projections.ledger import ACCOUNTS, BALANCES, ENTRIES, HOLDS
from projections.sql import Conn, Database, Table
from projections.tracking import TRACKING
from store.clock import ms_to_datetime
from store.factory import StoreConfig

_unjson = msgspec.json.Decoder()


def _dicts(table: Table, rows: list[tuple]) -> list[dict[str, Any]]:
    cols = table.column_names
    return [dict(zip(cols, r)) for r in rows]


class ReadModels:
    def __init__(self, db: Database, runner: Any = None) -> None:
        self.db = db
        self.runner = runner
        self._local = threading.local()
        self._conns: list[Conn] = []
        self._lock = threading.Lock()

    @classmethod
    def open(cls, config: StoreConfig) -> ReadModels:
        return cls(Database(config))

    def conn(self) -> Conn:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self.db.connect()
            self._local.conn = c
            with self._lock:
                self._conns.append(c)
        return c

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self._local = threading.local()

    def _q(self, sql: str, params: Any = ()) -> list[tuple]:
        return self.conn().query(sql, params)

    # ------------------------------------------------------------ positions
    def positions(self) -> dict[str, int]:
        if self.runner is not None:
            return dict(self.runner.positions)
        try:
            return {r[0]: r[1] for r in self._q(f"SELECT name, position FROM {TRACKING.name}")}
        except Exception:  # noqa: BLE001 - no tracking table yet
            return {}

    def position(self) -> int:
        """The lowest position every projection has committed (0 before the first page)."""
        pos = self.positions()
        return min(pos.values()) if pos else 0

    def wait_for(self, position: int, timeout_s: float = 2.0) -> bool:
        """Block until the views include `position` (True) or `timeout_s` passed (False)."""
        if self.runner is not None:
            return self.runner.wait_for(position, timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.position() < position:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def status(self) -> list[dict[str, Any]]:
        """Tracking rows: name, position, generation, code version, events applied, updated at."""
        try:
            return _dicts(TRACKING, self._q(f"SELECT {', '.join(TRACKING.column_names)} FROM {TRACKING.name} "
                                           f"ORDER BY name"))
        except Exception:  # noqa: BLE001
            return []

    # ------------------------------------------------------------ jobs
    def list_jobs(self, account_id: str, limit: int = 20, offset: int = 0, *,
                  status: str | None = None) -> list[dict[str, Any]]:
        assert 0 <= limit <= 10_000 and offset >= 0
        return list_jobs_sql(self.conn(), "proj_jobs", account_id, limit, offset, status)

    def count_jobs(self, account_id: str, *, status: str | None = None) -> int:
        if status is None:
            row = self._q("SELECT count(*) FROM proj_jobs WHERE account_id = ?", (account_id,))
        else:
            row = self._q("SELECT count(*) FROM proj_jobs WHERE account_id = ? AND status = ?", (account_id, status))
        return int(row[0][0])

    def job(self, job_id: str, *, account_id: str | None = None) -> dict[str, Any] | None:
        rows = self._q(f"SELECT {', '.join(JOB_COLUMNS)} FROM proj_jobs WHERE job_id = ?", (job_id,))
        if not rows:
            return None
        job = job_row_to_dict(rows[0])
        if account_id is not None and job["account_id"] != account_id:
            return None
        return job

    def batch_children(self, parent_id: str) -> list[dict[str, Any]]:
        rows = self._q(f"SELECT {', '.join(JOB_COLUMNS)} FROM proj_jobs WHERE parent_id = ? ORDER BY batch_index",
                       (parent_id,))
        return [job_row_to_dict(r) for r in rows]

    def queue_depths(self) -> dict[str, dict[str, int]]:
        """Per Cargo: Jobs pending / queued / assigned / running now, and lifetime totals."""
        rows = self._q("SELECT cargo, pending, queued, assigned, running, submitted, completed, failed, cancelled, "
                       "timeout FROM proj_queue_depth ORDER BY cargo")
        keys = ("pending", "queued", "assigned", "running", "submitted", "completed", "failed", "cancelled",
                "timeout")
        return {r[0]: dict(zip(keys, r[1:])) for r in rows}

    # ------------------------------------------------------------ ledger
    def balance(self, account_id: str) -> dict[str, Any] | None:
        """A consumer account: spendable, held, spent, earned (micro-credits), free tier, flags."""
        rows = self._q(f"SELECT {', '.join(ACCOUNTS.column_names)} FROM proj_accounts WHERE account_id = ?",
                       (str(account_id),))
        if not rows:
            return None
        d = _dicts(ACCOUNTS, rows)[0]
        d["kyc_verified"] = bool(d["kyc_verified"])
        d["suspended"] = bool(d["suspended"])
        d["opened"] = bool(d["opened"])
        return d

    def ledger_balance(self, ledger_account: str) -> int:
        rows = self._q("SELECT balance_micro FROM proj_balances WHERE ledger_account = ?", (ledger_account,))
        return int(rows[0][0]) if rows else 0

    def trial_balance(self) -> list[dict[str, Any]]:
        return _dicts(BALANCES, self._q(f"SELECT {', '.join(BALANCES.column_names)} FROM proj_balances "
                                        f"ORDER BY ledger_account"))

    def balance_at(self, account_id: str, *, position: int | None = None,
                   as_of_ms: int | None = None) -> dict[str, Any] | None:
        """Spendable, held and earned of an account after the log prefix up to `position`
        (or up to its last change at or before `as_of_ms`). None if the account was not
        opened by then. The views must have reached `position` (callers check)."""
        acct = str(account_id)
        opened = self._q("SELECT opened_position, opened_at_ms FROM proj_accounts WHERE account_id = ?", (acct,))
        if not opened or opened[0][0] is None:
            return None
        if position is not None and opened[0][0] > position:
            return None
        if as_of_ms is not None and opened[0][1] > as_of_ms:
            return None
        out: dict[str, Any] = {"account_id": acct}
        for kind, account in (("spendable", names.spendable(acct)), ("held", names.held(acct)),
                              ("earned", names.earnings(acct))):
            if position is not None:
                rows = self._q("SELECT balance_after_micro, position FROM proj_ledger_entries WHERE ledger_account = ? "
                               "AND position <= ? ORDER BY position DESC, seq DESC LIMIT 1", (account, position))
            elif as_of_ms is not None:
                rows = self._q("SELECT balance_after_micro, position FROM proj_ledger_entries WHERE ledger_account = ? "
                               "AND time_ms <= ? ORDER BY position DESC, seq DESC LIMIT 1", (account, as_of_ms))
            else:
                rows = self._q("SELECT balance_after_micro, position FROM proj_ledger_entries WHERE ledger_account = ? "
                               "ORDER BY position DESC, seq DESC LIMIT 1", (account,))
            out[f"{kind}_micro"] = int(rows[0][0]) if rows else 0
        return out

    def last_position_at(self, as_of_ms: int) -> int:
        """The log position of the last credit movement at or before `as_of_ms` (0 if none)."""
        rows = self._q("SELECT max(position) FROM proj_ledger_entries WHERE time_ms <= ?", (as_of_ms,))
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def statement(self, account_id: str | None = None, from_ms: int | None = None, to_ms: int | None = None, *,
                  ledger_account: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Every change of a ledger account (default: the account's spendable) in
        [from_ms, to_ms), oldest first: position, time, event, code, reference,
        counterparty, signed amount and balance after."""
        if ledger_account is None:
            assert account_id is not None
            ledger_account = names.spendable(account_id)
        where = "ledger_account = ?"
        params: list[Any] = [ledger_account]
        if from_ms is not None:
            where += " AND time_ms >= ?"
            params.append(from_ms)
        if to_ms is not None:
            where += " AND time_ms < ?"
            params.append(to_ms)
        sql = (f"SELECT {', '.join(ENTRIES.column_names)} FROM proj_ledger_entries WHERE {where} "
               f"ORDER BY position, seq")
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        lines = _dicts(ENTRIES, self._q(sql, params))
        for ln in lines:
            ln["time"] = ms_to_datetime(ln["time_ms"])
        return lines

    def transfers(self, from_ms: int | None = None, to_ms: int | None = None, *,
                  chunk: int = 10_000) -> Iterator[dict[str, Any]]:
        """Every transfer row in [from_ms, to_ms), in log order: the credit side of each
        (`amount_micro` > 0, counterparty = debit account)."""
        conn = self.conn()
        where = "amount_micro > 0"
        params: list[Any] = []
        if from_ms is not None:
            where += " AND time_ms >= ?"
            params.append(from_ms)
        if to_ms is not None:
            where += " AND time_ms < ?"
            params.append(to_ms)
        last = (-1, -1)
        cols = ENTRIES.column_names
        while True:
            rows = conn.query(f"SELECT {', '.join(cols)} FROM proj_ledger_entries WHERE {where} "
                              f"AND (position > ? OR (position = ? AND seq > ?)) ORDER BY position, seq LIMIT ?",
                              [*params, last[0], last[0], last[1], chunk])
            for r in rows:
                d = dict(zip(cols, r))
                yield {"position": d["position"], "seq": d["seq"] // 2, "time_ms": d["time_ms"],
                       "event": d["event"], "account_id": d["account_id"], "debit": d["counterparty"],
                       "credit": d["ledger_account"], "amount_micro": d["amount_micro"], "code": d["code"],
                       "reference": d["reference"]}
            if len(rows) < chunk:
                return
            last = (rows[-1][1], rows[-1][2])

    def holds(self, account_id: str, state: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(HOLDS.column_names)} FROM proj_holds WHERE account_id = ?"
        params: list[Any] = [str(account_id)]
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        return _dicts(HOLDS, self._q(sql + " ORDER BY placed_at_ms, hold_id", params))

    def platform_totals(self) -> dict[str, int]:
        """Revenue, fees, earnings owed, free tier spent, ... (micro-credits); see
        projections.ledger.TOTAL_METRICS. Metrics never touched are 0."""
        from projections.ledger import TOTAL_METRICS

        out = dict.fromkeys(TOTAL_METRICS, 0)
        out.update({r[0]: int(r[1]) for r in self._q("SELECT metric, value_micro FROM proj_platform_totals")})
        return out

    # ------------------------------------------------------------ islands
    def _island_dict(self, r: tuple, now_ms: int | None) -> dict[str, Any]:
        d = dict(zip(ISLANDS.column_names, r))
        d["online"] = bool(d["online"])
        d["capabilities"] = _unjson.decode(d["capabilities"]) if d["capabilities"] else {}
        uptime = d["uptime_ms"]
        if d["online"] and d["online_since_ms"] is not None and now_ms is not None:
            uptime += max(0, now_ms - d["online_since_ms"])
        d["uptime_now_ms"] = uptime
        if now_ms is not None and now_ms > d["registered_at_ms"]:
            d["uptime_permille"] = min(1000, uptime * 1000 // (now_ms - d["registered_at_ms"]))
        else:
            d["uptime_permille"] = None
        return d

    def island(self, island_id: str, *, now_ms: int | None = None) -> dict[str, Any] | None:
        rows = self._q(f"SELECT {', '.join(ISLANDS.column_names)} FROM proj_islands WHERE island_id = ?",
                       (str(island_id),))
        return self._island_dict(rows[0], now_ms) if rows else None

    def island_stats(self, *, owner_account_id: str | None = None, limit: int = 100, offset: int = 0,
                     now_ms: int | None = None) -> list[dict[str, Any]]:
        """Islands (optionally of one owner), best karma first."""
        sql = f"SELECT {', '.join(ISLANDS.column_names)} FROM proj_islands"
        params: list[Any] = []
        if owner_account_id is not None:
            sql += " WHERE owner_account_id = ?"
            params.append(str(owner_account_id))
        sql += " ORDER BY karma_milli DESC, island_id LIMIT ? OFFSET ?"
        params += [limit, offset]
        return [self._island_dict(r, now_ms) for r in self._q(sql, params)]

    def karma_history(self, island_id: str, *, limit: int = 100, before_position: int | None = None,
                      offset: int = 0) -> list[dict[str, Any]]:
        """Karma changes of an Island, newest first (`offset` rows skipped)."""
        sql = f"SELECT {', '.join(KARMA_HISTORY.column_names)} FROM proj_karma_history WHERE island_id = ?"
        params: list[Any] = [str(island_id)]
        if before_position is not None:
            sql += " AND position < ?"
            params.append(before_position)
        sql += " ORDER BY position DESC LIMIT ? OFFSET ?"
        params.extend((limit, offset))
        return _dicts(KARMA_HISTORY, self._q(sql, params))

    def island_running_jobs(self, island_id: str) -> list[str]:
        return [r[0] for r in self._q("SELECT job_id FROM proj_island_jobs WHERE island_id = ? ORDER BY started_at_ms",
                                      (str(island_id),))]
