"""Jobs read model: one row per Job (status, timings, usage, credits, Island, model, input
and bounded output) and queue depth per Cargo; plus `JobsView`, the reader the HTTP API
uses to list an account's Jobs.

The row mirrors the Job aggregate's state after each event (same rules as
`scheduler.jobs.Job.*.apply`), so a Job read from here equals `job_view(aggregate)`
except that the output is cut at `OUTPUT_MAX_CHARS` (`output_truncated` = 1 then).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from eventsourcing.utils import get_topic

from projections.engine import Projection, Work
from projections.sql import INT, TEXT, Conn, Table
from scheduler.jobs import Job
from store.clock import ms_to_datetime

OUTPUT_MAX_CHARS = 256 * 1024
STATUSES_COUNTED = ("pending", "queued", "assigned", "running")
TERMINAL_COUNTED = ("completed", "failed", "cancelled", "timeout")

_json = msgspec.json.Encoder()
_unjson = msgspec.json.Decoder()

JOBS = Table(
    "proj_jobs",
    (("job_id", TEXT), ("account_id", TEXT), ("cargo", TEXT), ("cargo_id", INT), ("kind", TEXT), ("model", TEXT),
     ("status", TEXT), ("input", TEXT), ("output", TEXT), ("output_truncated", INT), ("error", TEXT),
     ("created_at_ms", INT), ("started_at_ms", INT), ("completed_at_ms", INT), ("updated_at_ms", INT),
     ("island_id", TEXT), ("owner_account_id", TEXT), ("usage", TEXT), ("hold_micro", INT), ("charged_micro", INT),
     ("earning_micro", INT), ("fee_micro", INT), ("tokens_per_s_milli", INT), ("compute_ms", INT),
     ("parent_id", TEXT), ("batch_index", INT), ("attempts", INT), ("offers", INT), ("score", TEXT),
     ("budget_micro", INT), ("budget_source", TEXT), ("clearing_micro", INT), ("ask_micro", INT),
     ("surge_permille", INT), ("version", INT), ("position", INT)),
    key=("job_id",),
    indexes=(("account_id", "created_at_ms DESC", "job_id DESC"), ("parent_id", "batch_index")),
)

QUEUE_DEPTH = Table(
    "proj_queue_depth",
    (("cargo", TEXT), ("pending", INT), ("queued", INT), ("assigned", INT), ("running", INT), ("submitted", INT),
     ("completed", INT), ("failed", INT), ("cancelled", INT), ("timeout", INT), ("position", INT)),
    key=("cargo",),
    counters=True,
)


def _enc(value: Any) -> str | None:
    return None if value is None else _json.encode(value).decode()


class JobsProjection(Projection):
    name = "jobs"
    version = 2  # 2: the market's budget and clearing columns (#13)
    tables = (JOBS, QUEUE_DEPTH)

    def handlers(self):
        J = Job
        return {get_topic(J.Submitted): self.on_submitted, get_topic(J.Queued): self.on_queued,
                get_topic(J.Assigned): self.on_assigned, get_topic(J.OfferDeclined): self.on_declined,
                get_topic(J.Started): self.on_started, get_topic(J.Requeued): self.on_requeued,
                get_topic(J.Completed): self.on_completed, get_topic(J.Failed): self.on_failed,
                get_topic(J.Cancelled): self.on_cancelled, get_topic(J.TimedOut): self.on_timed_out}

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _move(w: Work, row: dict, new_status: str, pos: int, version: int, ms: int) -> None:
        old = row["status"]
        depth = w.tables["proj_queue_depth"]
        if old in STATUSES_COUNTED:
            depth.add(row["cargo"], old, -1, pos)
        depth.add(row["cargo"], new_status, 1, pos)
        row["status"] = new_status
        row["position"] = pos
        row["version"] = version
        row["updated_at_ms"] = ms

    @staticmethod
    def _job(w: Work, oid: str) -> dict | None:
        t = w.tables["proj_jobs"]
        row = t.rows.get(oid) or t.get(oid)
        if row is not None:
            t.dirty.add(oid)
        return row

    # ------------------------------------------------------------ handlers
    def on_submitted(self, w: Work, pos: int, oid: str, version: int, st: dict, ms: int) -> None:
        row = {"job_id": oid, "account_id": st["account_id"], "cargo": st["cargo"], "cargo_id": st["cargo_id"],
               "kind": st["kind"], "model": st["model"], "status": st["status"], "input": _enc(st["input"]),
               "output": None, "output_truncated": 0, "error": None, "created_at_ms": ms, "started_at_ms": None,
               "completed_at_ms": None, "updated_at_ms": ms, "island_id": "", "owner_account_id": "",
               "usage": None, "hold_micro": st["hold_micro"], "charged_micro": 0, "earning_micro": 0,
               "fee_micro": 0, "tokens_per_s_milli": 0, "compute_ms": 0, "parent_id": st["parent_id"],
               "batch_index": st["batch_index"], "attempts": 0, "offers": 0, "score": None,
               "budget_micro": st.get("budget_micro", 0), "budget_source": st.get("budget_source", ""),
               "clearing_micro": -1, "ask_micro": -1, "surge_permille": 1000, "version": version,
               "position": pos}
        w["proj_jobs"].put(oid, row)
        depth = w.tables["proj_queue_depth"]
        depth.add(st["cargo"], "submitted", 1, pos)
        depth.add(st["cargo"], st["status"], 1, pos)

    def on_queued(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is not None:
            self._move(w, row, "queued", pos, version, ms)

    def on_assigned(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is None:
            return
        self._move(w, row, "assigned", pos, version, ms)
        row["island_id"] = st["island_id"]
        row["owner_account_id"] = st["owner_account_id"]
        row["offers"] += 1
        row["score"] = _enc(st["score"])
        row["clearing_micro"] = st.get("clearing_micro", -1)
        row["ask_micro"] = st.get("ask_micro", -1)
        row["surge_permille"] = st.get("surge_permille", 1000)

    def on_declined(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is None:
            return
        self._move(w, row, "queued", pos, version, ms)
        row["island_id"] = ""
        row["owner_account_id"] = ""
        row["clearing_micro"], row["ask_micro"], row["surge_permille"] = -1, -1, 1000

    def on_started(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is None:
            return
        self._move(w, row, "running", pos, version, ms)
        row["started_at_ms"] = ms

    def on_requeued(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is None:
            return
        self._move(w, row, "queued", pos, version, ms)
        row["attempts"] += 1
        row["island_id"] = ""
        row["owner_account_id"] = ""
        row["started_at_ms"] = None
        row["clearing_micro"], row["ask_micro"], row["surge_permille"] = -1, -1, 1000

    def on_completed(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is None:
            return
        self._move(w, row, "completed", pos, version, ms)
        out = st["output"]
        if out is not None and len(out) > OUTPUT_MAX_CHARS:
            out = out[:OUTPUT_MAX_CHARS]
            row["output_truncated"] = 1
        row["output"] = out
        row["usage"] = _enc(st["usage"])
        row["charged_micro"] = st["charged_micro"]
        row["earning_micro"] = st["earning_micro"]
        row["fee_micro"] = st["fee_micro"]
        row["compute_ms"] = st["compute_ms"]
        row["tokens_per_s_milli"] = st["tokens_per_s_milli"]
        row["completed_at_ms"] = ms

    def on_failed(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is None:
            return
        self._move(w, row, "failed", pos, version, ms)
        row["error"] = st["reason"]
        row["charged_micro"] = st["charged_micro"]
        row["completed_at_ms"] = ms

    def on_cancelled(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is None:
            return
        self._move(w, row, "cancelled", pos, version, ms)
        row["error"] = f"cancelled by {st['by']}"
        row["charged_micro"] = st["charged_micro"]
        row["usage"] = _enc(st["usage"] or None)
        row["completed_at_ms"] = ms

    def on_timed_out(self, w, pos, oid, version, st, ms) -> None:
        row = self._job(w, oid)
        if row is None:
            return
        self._move(w, row, "timeout", pos, version, ms)
        row["error"] = f"no Island took the job within {st['waited_ms'] // 1000} s"
        row["completed_at_ms"] = ms


# ---------------------------------------------------------------- reading
JOB_COLUMNS = JOBS.column_names


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else ms_to_datetime(ms)


def job_row_to_dict(row: tuple) -> dict[str, Any]:
    """A proj_jobs row as the JobView-like dict readers get (datetimes, decoded JSON)."""
    r = dict(zip(JOB_COLUMNS, row))
    return {
        "id": r["job_id"], "account_id": r["account_id"], "cargo": r["cargo"], "cargo_id": r["cargo_id"],
        "kind": r["kind"], "model": r["model"], "status": r["status"],
        "input": _unjson.decode(r["input"]) if r["input"] is not None else {},
        "output": r["output"], "output_truncated": bool(r["output_truncated"]), "error": r["error"],
        "created_at": _dt(r["created_at_ms"]), "started_at": _dt(r["started_at_ms"]),
        "completed_at": _dt(r["completed_at_ms"]), "updated_at": _dt(r["updated_at_ms"]),
        "usage": _unjson.decode(r["usage"]) if r["usage"] is not None else None,
        "hold_micro": r["hold_micro"], "charged_micro": r["charged_micro"], "earning_micro": r["earning_micro"],
        "fee_micro": r["fee_micro"], "island_id": r["island_id"], "owner_account_id": r["owner_account_id"],
        "tokens_per_s_milli": r["tokens_per_s_milli"], "compute_ms": r["compute_ms"], "parent_id": r["parent_id"],
        "batch_index": r["batch_index"], "attempts": r["attempts"], "offers": r["offers"],
        "score": _unjson.decode(r["score"]) if r["score"] is not None else None,
        "budget_micro": r["budget_micro"], "budget_source": r["budget_source"],
        "clearing_micro": r["clearing_micro"], "ask_micro": r["ask_micro"], "surge_permille": r["surge_permille"],
        "version": r["version"], "position": r["position"],
    }


JOBVIEW_FIELDS = ("id", "account_id", "cargo", "cargo_id", "kind", "model", "status", "input", "output", "error",
                  "created_at", "started_at", "completed_at", "usage", "hold_micro", "charged_micro", "island_id",
                  "tokens_per_s_milli", "compute_ms", "parent_id", "batch_index", "attempts", "score",
                  "budget_micro", "budget_source", "clearing_micro", "ask_micro", "surge_permille")


def as_jobview_kwargs(job: dict[str, Any]) -> dict[str, Any]:
    """The subset of a row dict that `scheduler.service.JobView(**kwargs)` accepts."""
    return {k: job[k] for k in JOBVIEW_FIELDS}


def list_jobs_sql(conn: Conn, physical: str, account_id: str, limit: int, offset: int,
                  status: str | None) -> list[dict[str, Any]]:
    where = "account_id = ?"
    params: list[Any] = [account_id]
    if status is not None:
        where += " AND status = ?"
        params.append(status)
    params += [limit, offset]
    rows = conn.query(f"SELECT {', '.join(JOB_COLUMNS)} FROM {physical} WHERE {where} "
                      f"ORDER BY created_at_ms DESC, job_id DESC LIMIT ? OFFSET ?", params)
    return [job_row_to_dict(r) for r in rows]
