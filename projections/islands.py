"""Islands read model: one row per Island (owner, approval, online, Jobs ok/failed,
throughput, uptime, karma) and the karma history (every change with its reason, delta,
balance after and Job).

Jobs ok / failed follow the Island aggregate's own counting (a `KarmaChanged` with reason
`completed` counts ok; `failure` and `lapsed_lease` count failed; `missed_ack` is counted
apart). Throughput comes from the Jobs the Island completed: `tokens_out` (completion
tokens) over `compute_ms`. Which Island runs a Job is known from `Job.Started`; the
running Jobs are kept in `proj_island_jobs` until they end (that table is also each
Island's current load). Uptime adds up closed online intervals (`WentOnline` ..
`WentOffline`); readers add the open one (`online_since_ms` .. now).
"""

from __future__ import annotations

import msgspec
from eventsourcing.utils import get_topic

from projections.engine import Projection, Work

from projections.sql import INT, TEXT, Table
from scheduler.islands import Island, rebased_milli
from scheduler.jobs import Job

_json = msgspec.json.Encoder()

ISLANDS = Table(
    "proj_islands",
    (("island_id", TEXT), ("owner_account_id", TEXT), ("name", TEXT), ("approval", TEXT), ("online", INT),
     ("capabilities", TEXT), ("registered_at_ms", INT), ("online_since_ms", INT), ("last_online_at_ms", INT),
     ("last_offline_at_ms", INT), ("offline_reason", TEXT), ("uptime_ms", INT), ("karma_milli", INT),
     ("jobs_ok", INT), ("jobs_failed", INT), ("missed_acks", INT), ("lapsed_leases", INT), ("jobs_started", INT),
     ("jobs_cancelled", INT), ("jobs_requeued", INT), ("running", INT), ("tokens_out", INT), ("compute_ms", INT),
     ("tokens_per_s_milli", INT), ("earned_micro", INT), ("karma_legacy", INT), ("version", INT),
     ("position", INT)),
    key=("island_id",),
    indexes=(("owner_account_id",),),
)

KARMA_HISTORY = Table(
    "proj_karma_history",
    (("island_id", TEXT), ("position", INT), ("time_ms", INT), ("delta_milli", INT), ("reason", TEXT),
     ("karma_after_milli", INT), ("job_id", TEXT), ("compute_ms", INT)),
    key=("island_id", "position"),
    append_only=True,
)

ISLAND_JOBS = Table(
    "proj_island_jobs",
    (("job_id", TEXT), ("island_id", TEXT), ("started_at_ms", INT), ("position", INT)),
    key=("job_id",),
    indexes=(("island_id",),),
)


class IslandsProjection(Projection):
    name = "islands"
    version = 2  # 2: karma on the 0..100 scale, old-scale Islands shown rebased (decision 0051)
    tables = (ISLANDS, KARMA_HISTORY, ISLAND_JOBS)

    def handlers(self):
        I, J = Island, Job
        return {get_topic(I.Registered): self.on_registered, get_topic(I.Approved): self.on_approved,
                get_topic(I.Suspended): self.on_suspended, get_topic(I.CapabilitiesChanged): self.on_capabilities,
                get_topic(I.WentOnline): self.on_online, get_topic(I.WentOffline): self.on_offline,
                get_topic(I.KarmaChanged): self.on_karma, get_topic(I.KarmaAdjusted): self.on_karma,
                get_topic(I.KarmaRebased): self.on_karma,
                get_topic(J.Started): self.on_job_started, get_topic(J.Completed): self.on_job_completed,
                get_topic(J.Failed): self.on_job_ended, get_topic(J.Cancelled): self.on_job_cancelled,
                get_topic(J.Requeued): self.on_job_requeued}

    @staticmethod
    def _island(w: Work, island_id: str, pos: int, version: int | None = None) -> dict | None:
        t = w["proj_islands"]
        row = t.get(island_id)
        if row is not None:
            t.touch(island_id)
            row["position"] = pos
            if version is not None:
                row["version"] = version
        return row

    # ------------------------------------------------------------ Island events
    def on_registered(self, w: Work, pos, oid, version, st, ms) -> None:
        w["proj_islands"].put(oid, {
            "island_id": oid, "owner_account_id": st["owner_account_id"], "name": st["name"],
            "approval": st["approval"], "online": 0, "capabilities": _json.encode(st["capabilities"]).decode(),
            "registered_at_ms": ms, "online_since_ms": None, "last_online_at_ms": None,
            "last_offline_at_ms": None, "offline_reason": None, "uptime_ms": 0,
            "karma_milli": rebased_milli(0) if st.get("karma_start_milli") is None else st["karma_start_milli"],
            "jobs_ok": 0, "jobs_failed": 0, "missed_acks": 0, "lapsed_leases": 0, "jobs_started": 0,
            "jobs_cancelled": 0, "jobs_requeued": 0, "running": 0, "tokens_out": 0, "compute_ms": 0,
            "tokens_per_s_milli": 0, "earned_micro": 0, "karma_legacy": int(st.get("karma_start_milli") is None),
            "version": version, "position": pos})

    def on_approved(self, w, pos, oid, version, st, ms) -> None:
        row = self._island(w, oid, pos, version)
        if row is not None:
            row["approval"] = "approved"

    def on_suspended(self, w, pos, oid, version, st, ms) -> None:
        row = self._island(w, oid, pos, version)
        if row is not None:
            row["approval"] = "suspended"

    def on_capabilities(self, w, pos, oid, version, st, ms) -> None:
        row = self._island(w, oid, pos, version)
        if row is not None:
            row["capabilities"] = _json.encode(st["capabilities"]).decode()

    def on_online(self, w, pos, oid, version, st, ms) -> None:
        row = self._island(w, oid, pos, version)
        if row is not None and not row["online"]:
            row["online"] = 1
            row["online_since_ms"] = ms
            row["last_online_at_ms"] = ms

    def on_offline(self, w, pos, oid, version, st, ms) -> None:
        row = self._island(w, oid, pos, version)
        if row is None:
            return
        if row["online"] and row["online_since_ms"] is not None:
            row["uptime_ms"] += max(0, ms - row["online_since_ms"])
        row["online"] = 0
        row["online_since_ms"] = None
        row["last_offline_at_ms"] = ms
        row["offline_reason"] = st["reason"]

    def on_karma(self, w, pos, oid, version, st, ms) -> None:
        row = self._island(w, oid, pos, version)
        if row is None:
            return
        reason = st["reason"]
        # decision 0051: an old-scale Island's numbers are shown rebased until its rebase event
        if row["karma_legacy"] and reason != "rebase_0_100":
            after = rebased_milli(st["karma_after_milli"])
        else:
            row["karma_legacy"] = 0
            after = st["karma_after_milli"]
        row["karma_milli"] = after
        if reason == "completed":
            row["jobs_ok"] += 1
        elif reason == "failure":
            row["jobs_failed"] += 1
        elif reason == "lapsed_lease":
            row["jobs_failed"] += 1
            row["lapsed_leases"] += 1
        elif reason == "missed_ack":
            row["missed_acks"] += 1
        w["proj_karma_history"].append((oid, pos, ms, st["delta_milli"], reason, after, st["job_id"],
                                        st["compute_ms"]))

    # ------------------------------------------------------------ Job events
    def on_job_started(self, w, pos, oid, version, st, ms) -> None:
        island_id = st["island_id"]
        jobs = w["proj_island_jobs"]
        if jobs.get(oid) is not None:
            return
        jobs.put(oid, {"job_id": oid, "island_id": island_id, "started_at_ms": ms, "position": pos})
        row = self._island(w, island_id, pos)
        if row is not None:
            row["running"] += 1
            row["jobs_started"] += 1

    def _end(self, w: Work, job_id: str, pos: int) -> dict | None:
        jobs = w["proj_island_jobs"]
        running = jobs.get(job_id)
        if running is None:
            return None
        jobs.delete(job_id)
        row = self._island(w, running["island_id"], pos)
        if row is not None:
            row["running"] -= 1
        return row

    def on_job_completed(self, w, pos, oid, version, st, ms) -> None:
        row = self._end(w, oid, pos)
        if row is None:
            return
        row["tokens_out"] += int(st["usage"].get("completion_tokens", 0) or 0)
        row["compute_ms"] += st["compute_ms"]
        if row["compute_ms"]:
            row["tokens_per_s_milli"] = row["tokens_out"] * 1_000_000 // row["compute_ms"]
        row["earned_micro"] += st["earning_micro"]

    def on_job_ended(self, w, pos, oid, version, st, ms) -> None:
        self._end(w, oid, pos)

    def on_job_cancelled(self, w, pos, oid, version, st, ms) -> None:
        row = self._end(w, oid, pos)
        if row is not None:
            row["jobs_cancelled"] += 1

    def on_job_requeued(self, w, pos, oid, version, st, ms) -> None:
        row = self._end(w, oid, pos)
        if row is not None:
            row["jobs_requeued"] += 1
