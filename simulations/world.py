"""The simulated world: demand arrives, consumers wait or give up, Islands come and go,
run Jobs at their speed, crash, miss acks, hang; the coordinator process may restart.

The world drives a ``SystemUnderTest`` (the rules) through ``simulations.system`` and
records what happens to every Job (``SimJob``), time series (queue depth, busy and online
slots by tier, credits) and an event log whose digest proves determinism.

Timing of one attempt (RTT = the Island's round trip to the coordinator):

    offer at t ─ RTT/2 ─▶ Island starts ─ run ─▶ Island done ─ RTT/2 ─▶ coordinator sees it
                └──────── RTT ────────▶ coordinator sees the ack (``accept``)

The first token reaches the coordinator at start + time-to-first-output + RTT/2. A slot is
counted busy from the offer until the coordinator learns that it is free.

Randomness per Job is drawn at arrival ("common random numbers"): the speed jitter and,
when faults are on, whether the first attempt misses its ack, crashes (and when), or
hangs. Two systems run on the same scenario and seed therefore face the same Jobs with
the same fates; only their decisions differ. Retries draw from a separate stream.

While the coordinator is down (``faults.coordinator_restarts_s``) every message to it -
submissions, acks, completions, Island up/down, its own timers - waits and is delivered
in order when it is back; the world applies such a message's effects at delivery time.
"""

from __future__ import annotations

import gc
import hashlib
import math
import sys
from array import array
from collections.abc import Iterator
from typing import Any

from simulations.consumers import SimAccount
from simulations.demand import JobShape
from simulations.engine import NORMAL_TABLE, Engine, VirtualClock
from simulations.fleet import HOUR_MS, SimIsland, run_time_ms
from simulations.scenario import CargoSpec, CoordinatorSpec
from simulations.system import SimContext, SystemUnderTest

# Job status codes
QUEUED, ASSIGNED, RUNNING = 1, 2, 3
COMPLETED, FAILED, TIMEOUT, CANCELLED, REFUSED = 4, 5, 6, 7, 8
FIRST_TERMINAL = COMPLETED
STATUS_CODE = {"completed": COMPLETED, "failed": FAILED, "timeout": TIMEOUT, "cancelled": CANCELLED}
STATUS_NAME = {QUEUED: "queued", ASSIGNED: "assigned", RUNNING: "running", COMPLETED: "completed",
               FAILED: "failed", TIMEOUT: "timeout", CANCELLED: "cancelled", REFUSED: "refused"}

# Event log kinds. The log is a sequence of pairs of 64-bit words:
#   t_ms, (job_no + 1) << 24 | (island_no + 1) << 5 | kind      (-1 = none)
(K_ARRIVE, K_REFUSE, K_OFFER, K_ACCEPT, K_FIRST, K_COMPLETE, K_CRASH, K_END, K_REQUEUE, K_REVOKE, K_UP, K_DOWN,
 K_RESTART, K_CANCEL_REQ, K_MISSED_ACK, K_HANG, K_REJECT, K_SLOW_HB, K_BACK) = range(1, 20)
LOG_KINDS = {
    K_ARRIVE: "arrive", K_REFUSE: "refuse", K_OFFER: "offer", K_ACCEPT: "accept", K_FIRST: "first_output",
    K_COMPLETE: "complete", K_CRASH: "crash", K_END: "end", K_REQUEUE: "requeue", K_REVOKE: "revoke",
    K_UP: "island_up", K_DOWN: "island_down", K_RESTART: "coordinator_down", K_CANCEL_REQ: "cancel_request",
    K_MISSED_ACK: "missed_ack", K_HANG: "hang", K_REJECT: "reject", K_SLOW_HB: "slow_heartbeat",
    K_BACK: "coordinator_up",
}
_LOG_FLUSH = 1_000_000  # words buffered before hashing
_JOB_SHIFT, _ISLAND_SHIFT, _ISLAND_MASK, _KIND_MASK = 24, 5, (1 << 19) - 1, 31


def decode_log_word(word: int) -> tuple[int, int, int]:
    """(job_no, island_no, kind) of a log word (-1 = none)."""
    return (word >> _JOB_SHIFT) - 1, ((word >> _ISLAND_SHIFT) & _ISLAND_MASK) - 1, word & _KIND_MASK


class SimulationError(RuntimeError):
    """The system under test broke the protocol (e.g. ended a Job twice)."""


class SimJob:
    """One Job's life, as the world saw it. Times in simulated ms; -1 = never."""

    __slots__ = ("no", "shape", "acct", "arrival", "status", "island", "attempts", "token", "holding", "busy_from",
                 "assigned", "first_at", "first", "ended", "run_ms", "done_at", "z", "fates", "charged", "reason")

    def __init__(self, no: int, shape: JobShape, z: float, fates: tuple[float, float, float, float] | None) -> None:
        self.no = no
        self.shape = shape
        self.acct = shape.account
        self.arrival = shape.arrival_ms
        self.status = 0
        self.island = -1
        self.attempts = 0
        self.token = 0
        self.holding = False
        self.busy_from = self.run_ms = 0
        self.assigned = self.first_at = self.first = self.ended = self.done_at = -1
        self.z = z  # N(0,1): this Job's speed jitter is exp(job_sigma * z)
        self.fates = fates  # first attempt, faults on: (u_ack, u_crash, crash_frac, u_hang)
        self.charged: int | None = None
        self.reason = ""


class IslandState:
    __slots__ = ("spec", "no", "tier", "online", "sched_on", "churned", "busy", "jobs", "up_since", "token",
                 "silent_until", "rtt", "half")

    def __init__(self, spec: SimIsland, tier: int) -> None:
        self.spec = spec
        self.no = spec.no
        self.tier = tier
        self.online = False
        self.sched_on = False
        self.churned = False
        self.busy = 0
        self.jobs: set[int] = set()
        self.up_since = 0
        self.token = 0  # bumped when the Island goes offline: pending churn/heartbeat events go stale
        self.silent_until = -1
        self.rtt = spec.latency_ms
        self.half = spec.latency_ms // 2


class World:
    """Runs one simulation. Build, then ``run()``; results are in the attributes."""

    def __init__(self, *, engine: Engine, sut: SystemUnderTest, islands: list[SimIsland], accounts: list[SimAccount],
                 cargos: dict[str, CargoSpec], config: CoordinatorSpec, demand: Iterator[JobShape],
                 start_epoch_ms: int = 0, day_offset_ms: int = 0, duration_ms: int | None = None,
                 drain_ms: int = 900_000, max_jobs: int | None = None, sample_ms: int = 10_000,
                 faults: bool = False, restarts_ms: list[int] | None = None, restart_downtime_ms: int = 5_000,
                 slow_heartbeat_ms: int = 45_000, free_tier_micro: int = 5_000_000,
                 log_sink: Any = None) -> None:
        self.engine = engine
        self.clock = VirtualClock(engine, start_epoch_ms)
        self.sut = sut
        self.islands = islands
        self.accounts = accounts
        self.cargos = cargos
        self.config = config
        self.demand = demand
        self.day_offset_ms = day_offset_ms
        self.duration_ms = duration_ms
        self.drain_ms = drain_ms
        self.max_jobs = max_jobs
        self.sample_ms = max(1, sample_ms)
        self.faults = faults
        self.restarts_ms = sorted(restarts_ms or [])
        self.restart_downtime_ms = restart_downtime_ms
        self.slow_heartbeat_ms = slow_heartbeat_ms
        self.free_tier_micro = free_tier_micro

        self.tier_names: list[str] = []
        tier_of: dict[str, int] = {}
        for isl in sorted(islands, key=lambda i: (i.tier_index, i.tier)):
            if isl.tier not in tier_of:
                tier_of[isl.tier] = len(self.tier_names)
                self.tier_names.append(isl.tier)
        self.ist = [IslandState(s, tier_of[s.tier]) for s in islands]
        nt = len(self.tier_names)
        self.tier_busy = [0] * nt  # slots busy now
        self.tier_online = [0] * nt  # slots online now
        self.tier_busy_ms = [0] * nt  # integrated busy slot-ms
        self.tier_online_ms = [0] * nt  # integrated online slot-ms
        self.tier_islands = [0] * nt
        for st in self.ist:
            self.tier_islands[st.tier] += 1
        self.kyc_cargos = frozenset(s for s, c in cargos.items() if c.requires_kyc)
        self.free_cargos = frozenset(s for s, c in cargos.items() if c.free_tier)

        self.jobs: list[SimJob] = []
        self.open = 0
        self.arrivals_done = False
        self.finished = False
        self.down = False
        self.pending: list[tuple[Any, Any, Any]] = []
        self.refusals: dict[str, int] = {}
        self.end_reasons: dict[str, int] = {}
        self.fault_counts = {"crashes": 0, "missed_acks": 0, "hangs": 0, "disconnects": 0, "restarts": 0,
                             "slow_heartbeats": 0, "rejected_offers": 0, "lost_offers": 0, "requeues": 0,
                             "revokes": 0}
        self.kyc_violations = 0
        self.free_tier_violations = 0
        self.charges_reported = False
        self.protocol_errors: list[str] = []
        self._spent: dict[int, int] = {}
        # time series
        self.s_t: list[int] = []
        self.s_queue: list[int] = []
        self.s_busy: list[list[int]] = []
        self.s_online: list[list[int]] = []
        self.s_credits: list[tuple[int, int, int, int] | None] = []
        # event log
        self.log: list[int] = []
        self._lg = self.log.append
        self._hash = hashlib.blake2b(digest_size=16)
        self.log_events = 0
        self.log_sink = log_sink
        self._big_endian = sys.byteorder == "big"

        self.fate_rng = engine.rng_for("fates")
        self.retry_rng = engine.rng_for("fates-retry")
        self.churn_rng = engine.rng_for("churn")
        self._read_sut_settings()  # again after sut.start(): a SUT may set them from the scenario
        self.ctx = SimContext(engine=engine, clock=self.clock, islands=islands, accounts=accounts, cargos=cargos,
                              config=config, hooks=self, seed=engine.seed, faults_possible=faults,
                              free_tier_micro=free_tier_micro, timer=self._sut_timer_at)

    def _read_sut_settings(self) -> None:
        sut = self.sut
        hb = getattr(sut, "heartbeat_interval_ms", None)
        self.heartbeat_ms = int(hb) if hb else 0
        self.wants_progress = bool(getattr(sut, "wants_progress", False))
        renew = getattr(sut, "lease_renew_ms", None)
        self.renew_ms = int(renew) if renew else 0

    # ------------------------------------------------------------------ log
    def _log(self, job: int, island: int, kind: int) -> None:
        lg = self._lg
        lg(self.engine.now)
        lg(((job + 1) << 24) | ((island + 1) << 5) | kind)

    def _flush_log(self) -> None:
        if not self.log:
            return
        buf = array("q", self.log)
        self.log_events += len(buf) // 2
        if self._big_endian:
            buf.byteswap()
        self._hash.update(buf.tobytes())
        if self.log_sink is not None:
            self.log_sink(self.log)
        self.log.clear()

    def log_digest(self) -> str:
        self._flush_log()
        return self._hash.hexdigest()

    # ------------------------------------------------------------------ running
    def run(self, progress: Any = None, chunk_ms: int | None = None) -> None:
        eng = self.engine
        self.sut.start(self.ctx)
        self._read_sut_settings()
        for st in self.ist:
            self._schedule_availability(st, first=True)
        for t in self.restarts_ms:
            eng.schedule_at(t, self._coordinator_down)
        eng.schedule_at(0, self._sample)
        first = next(self.demand, None)
        if first is None or self.max_jobs == 0:
            self._arrivals_over()
        else:
            eng.schedule_at(first.arrival_ms, self._arrive, first)
        # Per-event garbage is acyclic (freed by reference counting) while the Job table
        # keeps growing, so the cyclic collector would only rescan live objects: pause it.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if progress is None:
                eng.run()
            else:
                step = chunk_ms or 60_000
                while not self.finished and eng.pending:
                    eng.run(until_ms=eng.now + step)
                    progress(self)
        finally:
            if gc_was_enabled:
                gc.enable()
        self._finalise()

    def _arrivals_over(self) -> None:
        self.arrivals_done = True
        end = max(self.engine.now, self.duration_ms or 0)
        self.engine.schedule_at(end, self._maybe_stop)
        self.engine.schedule_at(end + self.drain_ms, self._stop)

    def _maybe_stop(self, _a: Any = None, _b: Any = None) -> None:
        if self.arrivals_done and self.open == 0 and self.engine.now >= (self.duration_ms or 0):
            self._stop()

    def _stop(self, _a: Any = None, _b: Any = None) -> None:
        self.finished = True
        self.engine.stop()

    def _finalise(self) -> None:
        now = self.engine.now
        for st in self.ist:
            if st.online:
                self.tier_online_ms[st.tier] += (now - st.up_since) * st.spec.slots
                st.up_since = now
        for job in self.jobs:
            if job.holding:
                self.tier_busy_ms[self.ist[job.island].tier] += now - job.busy_from
                job.busy_from = now
        self._sample_point()

    # ------------------------------------------------------------------ demand and consumers
    def _arrive(self, shape: JobShape, _b: Any) -> None:
        jobs = self.jobs
        no = len(jobs)
        fate = self.fate_rng
        if self.faults:
            r = fate.random
            job = SimJob(no, shape, NORMAL_TABLE[fate.getrandbits(16)], (r(), r(), r(), r()))
        else:
            job = SimJob(no, shape, NORMAL_TABLE[fate.getrandbits(16)], None)
        jobs.append(job)
        now = self.engine.now
        lg = self._lg
        lg(now)
        lg(((no + 1) << 24) | K_ARRIVE)
        if self.down:
            self.pending.append((self._submit, job, None))
        else:
            # the common case of _submit, inlined
            job.status = QUEUED
            self.open += 1
            acct = self.accounts[job.acct]
            reason = self.sut.submit(no, shape, acct, now)
            if reason is not None:
                self.open -= 1
                self._refused(job, reason)
            elif acct.patience_ms and job.status < RUNNING:
                self._patience_timer(job, acct)
        if self.max_jobs is not None and len(self.jobs) >= self.max_jobs:
            self._arrivals_over()
            return
        nxt = next(self.demand, None)
        if nxt is None:
            self._arrivals_over()
        else:
            self.engine.schedule_at(nxt.arrival_ms if nxt.arrival_ms > self.engine.now else self.engine.now,
                                    self._arrive, nxt)

    def _submit(self, job: SimJob, _b: Any) -> None:
        now = self.engine.now
        acct = self.accounts[job.acct]
        job.status = QUEUED
        self.open += 1
        reason = self.sut.submit(job.no, job.shape, acct, now)
        if reason is not None:
            self.open -= 1
            self._refused(job, reason)
        elif acct.patience_ms and job.status < RUNNING:
            self._patience_timer(job, acct)

    def _refused(self, job: SimJob, reason: str) -> None:
        if job.status >= FIRST_TERMINAL or job.assigned >= 0:
            self._protocol(f"job {job.no}: refused ({reason}) after the SUT acted on it")
        job.status = REFUSED
        job.reason = reason
        job.ended = self.engine.now
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        self._log(job.no, -1, K_REFUSE)
        if self.arrivals_done and self.open == 0:
            self._maybe_stop()

    def _patience_timer(self, job: SimJob, acct: SimAccount) -> None:
        self.engine.schedule_at(max(job.arrival + acct.patience_ms, self.engine.now), self._patience, job)

    def _patience(self, job: SimJob, _b: Any) -> None:
        if job.status not in (QUEUED, ASSIGNED):
            return
        if self.down:
            self.pending.append((self._patience, job, None))
            return
        self._log(job.no, -1, K_CANCEL_REQ)
        self.sut.cancel(job.no, self.engine.now)

    # ------------------------------------------------------------------ hooks (called by the SUT)
    def offer(self, job_no: int, island_no: int) -> None:
        job = self.jobs[job_no]
        st = self.ist[island_no]
        now = self.engine.now
        if job.status >= FIRST_TERMINAL or job.holding:
            self._protocol(f"job {job_no}: offered to island {island_no} while {STATUS_NAME.get(job.status)}"
                           f"{' and held by island %d' % job.island if job.holding else ''}")
            return
        job.status = ASSIGNED
        job.island = island_no
        job.assigned = now
        job.attempts += 1
        job.token += 1
        lg = self._lg
        lg(now)
        lg(((job_no + 1) << 24) | ((island_no + 1) << 5) | K_OFFER)
        if not st.online:
            self.fault_counts["lost_offers"] += 1
            return  # the message goes nowhere; the SUT's ack timeout must notice
        spec = st.spec
        if st.busy >= spec.slots or job.shape.cargo not in spec.speed:
            self.engine.schedule_at(now + st.rtt, self._reject, job, job.token)
            return
        st.busy += 1
        st.jobs.add(job_no)
        job.holding = True
        job.busy_from = now
        self.tier_busy[st.tier] += 1
        if self.faults and spec.missed_ack > 0.0:
            u = job.fates[0] if job.attempts == 1 else self.retry_rng.random()
            if u < spec.missed_ack:
                self._release(job)
                self.fault_counts["missed_acks"] += 1
                self._log(job_no, island_no, K_MISSED_ACK)
                return
        self.engine.schedule_at(now + st.rtt, self._accept, job, job.token)

    def revoke(self, job_no: int, island_no: int) -> None:
        job = self.jobs[job_no]
        if job.island != island_no:
            return
        job.token += 1
        if job.holding:
            self._release(job)
        self.fault_counts["revokes"] += 1
        self._log(job_no, island_no, K_REVOKE)

    def requeued(self, job_no: int, reason: str) -> None:
        job = self.jobs[job_no]
        if job.status >= FIRST_TERMINAL:
            self._protocol(f"job {job_no}: requeued after it ended")
            return
        job.token += 1
        if job.holding:
            self._release(job)
        job.status = QUEUED
        self.fault_counts["requeues"] += 1
        self._log(job_no, job.island, K_REQUEUE)

    def job_ended(self, job_no: int, status: str, reason: str = "", charged_micro: int | None = None) -> None:
        job = self.jobs[job_no]
        code = STATUS_CODE.get(status)
        if code is None:
            self._protocol(f"job {job_no}: unknown terminal status {status!r}")
            return
        if job.status >= FIRST_TERMINAL or job.status == 0:
            self._protocol(f"job {job_no}: ended {status} while {STATUS_NAME.get(job.status, 'unsubmitted')}")
            return
        job.token += 1
        if job.holding:
            self._release(job)
        now = self.engine.now
        job.status = code
        job.ended = now
        job.reason = reason
        if code == COMPLETED:
            job.first = job.first_at if 0 <= job.first_at <= now else now
        if reason:
            key = f"{status}:{reason}"
            self.end_reasons[key] = self.end_reasons.get(key, 0) + 1
        if charged_micro is not None:
            self.charges_reported = True
            job.charged = charged_micro
            acct = self.accounts[job.acct]
            if not acct.kyc and charged_micro > 0:
                if job.shape.cargo in self.free_cargos:
                    spent = self._spent.get(job.acct, 0) + charged_micro
                    self._spent[job.acct] = spent
                    if spent > self.free_tier_micro:
                        self.free_tier_violations += 1
                else:
                    self.free_tier_violations += 1  # paid for a non-free Cargo without KYC
        self.open -= 1
        lg = self._lg
        lg(now)
        lg(((job_no + 1) << 24) | ((job.island + 1) << 5) | K_END)
        if self.arrivals_done and self.open == 0:
            self._maybe_stop()

    def _protocol(self, message: str) -> None:
        self.protocol_errors.append(f"t={self.engine.now}ms {message}")

    # ------------------------------------------------------------------ Island side of a Job
    def _release(self, job: SimJob) -> None:
        st = self.ist[job.island]
        st.busy -= 1
        st.jobs.discard(job.no)
        job.holding = False
        self.tier_busy[st.tier] -= 1
        self.tier_busy_ms[st.tier] += self.engine.now - job.busy_from

    def _reject(self, job: SimJob, token: int) -> None:
        if job.token != token:
            return
        if self.down:
            self.pending.append((self._reject, job, token))
            return
        self.fault_counts["rejected_offers"] += 1
        self._log(job.no, job.island, K_REJECT)
        self.sut.fail(job.no, job.island, self.engine.now, "rejected")

    def _accept(self, job: SimJob, token: int) -> None:
        if job.token != token:
            return
        if self.down:
            self.pending.append((self._accept, job, token))
            return
        now = self.engine.now
        st = self.ist[job.island]
        spec = st.spec
        shape = job.shape
        job.status = RUNNING
        cargo = shape.cargo
        if cargo in self.kyc_cargos and not self.accounts[job.acct].kyc:
            self.kyc_violations += 1
        jitter = math.exp(spec.job_sigma * job.z)
        if shape.run_ms > 0:
            run = int(shape.run_ms / jitter + 0.5)
            first = min(run, spec.overhead_ms + run // max(1, shape.steps or shape.completion_tokens or 1))
        elif shape.steps:
            first, run = run_time_ms(spec, cargo, shape.prompt_tokens, shape.completion_tokens, shape.width,
                                     shape.height, shape.steps, jitter)
        else:  # chat, the common case of fleet.run_time_ms inlined (same arithmetic)
            token_ms = 1000.0 / (spec.speed[cargo] * jitter)
            prefill_ms = shape.prompt_tokens * token_ms / spec.prefill_ratio
            comp = shape.completion_tokens
            first = int(spec.overhead_ms + prefill_ms + token_ms + 0.5)
            run = int(spec.overhead_ms + prefill_ms + (comp if comp > 1 else 1) * token_ms + 0.5)
        job.run_ms = run
        job.done_at = now + run
        job.first_at = now + first  # = start + first + RTT/2
        lg = self._lg
        lg(now)
        lg(((job.no + 1) << 24) | ((job.island + 1) << 5) | K_ACCEPT)
        self.sut.accept(job.no, job.island, now)
        if job.token != token or not job.holding:
            return  # the SUT took it back while accepting
        if self.faults:
            if job.attempts == 1:
                _, u_crash, frac, u_hang = job.fates
            else:
                r = self.retry_rng.random
                u_crash, frac, u_hang = r(), r(), r()
            if u_crash < spec.crash_per_job:
                crash_at = int(run * frac)
                # the attempt makes progress (first output, lease renewals) until it crashes
                if self.wants_progress and first < crash_at:
                    self.engine.schedule_at(now + first, self._first_output, job, token)
                if self.renew_ms and self.renew_ms < crash_at:
                    self.engine.schedule_at(now + self.renew_ms, self._renew, job, token)
                self.engine.schedule_at(now + crash_at, self._crash, job, token)
                return
            if u_hang < spec.hang_per_job:
                self.fault_counts["hangs"] += 1
                self._log(job.no, job.island, K_HANG)
                return  # keeps its slot and says nothing until revoked or the Island goes away
        if self.wants_progress and first < run:
            self.engine.schedule_at(now + first, self._first_output, job, token)
        if self.renew_ms and self.renew_ms < run:
            self.engine.schedule_at(now + self.renew_ms, self._renew, job, token)
        self.engine.schedule_at(now + run, self._complete, job, token)

    def _renew(self, job: SimJob, token: int) -> None:
        if job.token != token:
            return
        now = self.engine.now
        if job.done_at > now + self.renew_ms:
            self.engine.schedule_at(now + self.renew_ms, self._renew, job, token)
        if self.down:
            return  # renewals to a down coordinator are lost; the next one gets through
        self.sut.renew(job.no, job.island, now)

    def _first_output(self, job: SimJob, token: int) -> None:
        if job.token != token:
            return
        if self.down:
            self.pending.append((self._first_output, job, token))
            return
        self._log(job.no, job.island, K_FIRST)
        self.sut.first_output(job.no, job.island, self.engine.now)

    def _complete(self, job: SimJob, token: int) -> None:
        if job.token != token:
            return
        if self.down:
            self.pending.append((self._complete, job, token))
            return
        self._release(job)
        island = job.island
        lg = self._lg
        lg(self.engine.now)
        lg(((job.no + 1) << 24) | ((island + 1) << 5) | K_COMPLETE)
        self.sut.complete(job.no, island, self.engine.now, job.run_ms)

    def _crash(self, job: SimJob, token: int) -> None:
        if job.token != token:
            return
        if self.down:
            self.pending.append((self._crash, job, token))
            return
        self._release(job)
        job.token += 1  # its pending progress and renewals stop
        self.fault_counts["crashes"] += 1
        self._log(job.no, job.island, K_CRASH)
        self.sut.fail(job.no, job.island, self.engine.now, "crash")

    # ------------------------------------------------------------------ Islands coming and going
    def _hour_index(self, st: IslandState, t: int) -> int:
        return (self.day_offset_ms + t - st.spec.avail_offset_ms) // HOUR_MS

    def _schedule_availability(self, st: IslandState, first: bool = False) -> None:
        """Set the scheduled state for now and schedule the next change (if any)."""
        spec = st.spec
        now = self.engine.now
        h = self._hour_index(st, now)
        on = spec.online_in_hour(h % 24)
        if first or on != st.sched_on:
            st.sched_on = on
            self._update_online(st, "availability")
        for k in range(1, 25):
            if spec.online_in_hour((h + k) % 24) != on:
                at = (h + k) * HOUR_MS + spec.avail_offset_ms - self.day_offset_ms
                self.engine.schedule_at(at, self._availability_tick, st)
                return

    def _availability_tick(self, st: IslandState, _b: Any) -> None:
        self._schedule_availability(st)

    def _update_online(self, st: IslandState, reason: str) -> None:
        want = st.sched_on and not st.churned
        if want == st.online:
            return
        if self.down:
            self.pending.append((self._update_online_later, st, reason))
            return
        self._set_online(st, want, reason)

    def _update_online_later(self, st: IslandState, reason: str) -> None:
        self._update_online(st, reason)

    def _set_online(self, st: IslandState, online: bool, reason: str) -> None:
        now = self.engine.now
        spec = st.spec
        st.token += 1
        if online:
            st.online = True
            st.up_since = now
            self.tier_online[st.tier] += spec.slots
            self._log(-1, st.no, K_UP)
            self.sut.island_up(spec, now)
            if self.faults and spec.disconnects_per_hour > 0:
                gap = self.churn_rng.expovariate(spec.disconnects_per_hour / HOUR_MS)
                self.engine.schedule_at(now + int(gap) + 1, self._disconnect, st, st.token)
            if self.heartbeat_ms:
                self.engine.schedule_at(now + self.heartbeat_ms, self._heartbeat, st, st.token)
                if self.faults and spec.slow_heartbeats_per_hour > 0:
                    gap = self.churn_rng.expovariate(spec.slow_heartbeats_per_hour / HOUR_MS)
                    self.engine.schedule_at(now + int(gap) + 1, self._slow_heartbeats, st, st.token)
        else:
            st.online = False
            self.tier_online[st.tier] -= spec.slots
            self.tier_online_ms[st.tier] += (now - st.up_since) * spec.slots
            for job_no in sorted(st.jobs):
                job = self.jobs[job_no]
                job.token += 1
                self._release(job)
            self._log(-1, st.no, K_DOWN)
            self.sut.island_down(st.no, now, reason)

    def _disconnect(self, st: IslandState, token: int) -> None:
        if token != st.token or not st.online:
            return
        self.fault_counts["disconnects"] += 1
        st.churned = True
        back = self.churn_rng.expovariate(1.0 / max(1, st.spec.offline_mean_ms))
        self.engine.schedule_after(int(back) + 1, self._reconnect, st)
        self._update_online(st, "disconnect")

    def _reconnect(self, st: IslandState, _b: Any) -> None:
        st.churned = False
        self._update_online(st, "reconnect")

    def _heartbeat(self, st: IslandState, token: int) -> None:
        if token != st.token or not st.online:
            return
        now = self.engine.now
        self.engine.schedule_at(now + self.heartbeat_ms, self._heartbeat, st, token)
        if now < st.silent_until:
            return
        if self.down:
            return  # heartbeats to a down coordinator are simply lost
        self.sut.heartbeat(st.no, now)

    def _slow_heartbeats(self, st: IslandState, token: int) -> None:
        if token != st.token or not st.online:
            return
        now = self.engine.now
        self.fault_counts["slow_heartbeats"] += 1
        st.silent_until = now + self.slow_heartbeat_ms
        self._log(-1, st.no, K_SLOW_HB)
        gap = self.churn_rng.expovariate(st.spec.slow_heartbeats_per_hour / HOUR_MS)
        self.engine.schedule_at(now + self.slow_heartbeat_ms + int(gap) + 1, self._slow_heartbeats, st, token)

    # ------------------------------------------------------------------ the coordinator process
    def _coordinator_down(self, _a: Any, _b: Any) -> None:
        if self.down:
            return
        self.down = True
        self.fault_counts["restarts"] += 1
        self._log(-1, -1, K_RESTART)
        self.engine.schedule_after(self.restart_downtime_ms, self._coordinator_up)

    def _coordinator_up(self, _a: Any, _b: Any) -> None:
        self.down = False
        self._log(-1, -1, K_BACK)
        self.sut.restart(self.engine.now)
        pending, self.pending = self.pending, []
        for fn, a, b in pending:
            fn(a, b)

    def _sut_timer_at(self, time_ms: int, fn: Any, a: Any, b: Any) -> None:
        self.engine.schedule_at(max(int(time_ms), self.engine.now), self._sut_timer, (fn, a, b))

    def _sut_timer(self, packed: tuple, _b: Any) -> None:
        if self.down:
            self.pending.append((self._sut_timer, packed, None))
            return
        fn, a, b = packed
        fn(a, b)

    # ------------------------------------------------------------------ sampling
    def _sample(self, _a: Any = None, _b: Any = None) -> None:
        self._sample_point()
        if not self.finished:
            self.engine.schedule_after(self.sample_ms, self._sample)

    def _sample_point(self) -> None:
        if len(self.log) >= _LOG_FLUSH:
            self._flush_log()
        t = self.engine.now
        if self.s_t and self.s_t[-1] == t:
            return
        self.s_t.append(t)
        self.s_queue.append(self.sut.queue_depth())
        self.s_busy.append(list(self.tier_busy))
        self.s_online.append(list(self.tier_online))
        self.s_credits.append(self.sut.credit_totals())
