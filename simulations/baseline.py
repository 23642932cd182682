"""The bare queue model: the same demand and fleet, none of the business rules.

* Admission: everything is admitted (no KYC, free-tier, balance or bid checks).
* Queue: FIFO per Cargo; a freed slot takes the oldest waiting Job among the Cargos its
  Island serves (physics: a CPU Island cannot run SDXL).
* Routing: the first free slot (the Island that has been idle longest), no scoring.
* No ledger, no karma, no queue timeouts; a crashed attempt goes back to the front of
  its queue (up to ``max_attempts`` in all, then the Job fails).
* Leases only when the scenario's Islands can miss acks or hang (``ctx.faults_possible``):
  an offer not acked within ``ack_timeout_s`` or a run silent for ``lease_s`` is taken back
  and retried like a crash. Without faults nothing is timed, so the model stays cheap.

Metrics that need the rules (credits, karma, ledger_balanced, free-tier violations) come
out null. It is the reference "physics only" model and the speed baseline of
``python -m bench sim``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from simulations.consumers import SimAccount
from simulations.demand import JobShape
from simulations.fleet import SimIsland
from simulations.system import SimContext

_QUEUED, _ASSIGNED, _RUNNING = 1, 2, 3


class BareQueue:
    name = "bare-queue"
    heartbeat_interval_ms = None
    wants_progress = False
    lease_renew_ms: int | None = None  # set in start() when leases are kept

    def start(self, ctx: SimContext) -> None:
        self.ctx = ctx
        self.hooks = ctx.hooks
        islands = ctx.islands
        self.queues: dict[str, deque[int]] = {slug: deque() for slug in ctx.cargos}
        self.free: dict[str, deque[int]] = {slug: deque() for slug in ctx.cargos}
        self.serves: list[tuple[str, ...]] = [tuple(s for s in isl.cargos if s in self.queues) for isl in islands]
        self.slots = [isl.slots for isl in islands]
        self.slots_free = [0] * len(islands)
        self.online = [False] * len(islands)
        # job_no -> [state, cargo, attempts, island, epoch, last sign of life]; absent = ended
        self.jobs: dict[int, list] = {}
        self.queued = 0
        self.max_attempts = ctx.config.max_attempts
        self.leases = ctx.faults_possible
        self.ack_ms = int(ctx.config.ack_timeout_s * 1000)
        self.lease_ms = int(ctx.config.lease_s * 1000)
        self.compact_at = 4 * len(islands) + 64
        self.pushes = 0
        if self.leases:
            self.lease_renew_ms = max(1, self.lease_ms // 3)  # one lost renewal is tolerated

    # ------------------------------------------------------------------ consumers
    def submit(self, job_no: int, shape: JobShape, account: SimAccount, now_ms: int) -> str | None:
        cargo = shape.cargo
        rec = self.jobs[job_no] = [_QUEUED, cargo, 0, -1, 0, 0]
        island = self._free_island(cargo) if self.free[cargo] else -1
        if island < 0:
            self.queues[cargo].append(job_no)
            self.queued += 1
        else:
            self._offer(job_no, rec, island)
        return None

    def cancel(self, job_no: int, now_ms: int) -> None:
        rec = self.jobs.get(job_no)
        if rec is not None and rec[0] == _QUEUED:  # consumers only give up while waiting in the queue
            del self.jobs[job_no]
            self.queued -= 1  # its queue entry is skipped lazily
            self.hooks.job_ended(job_no, "cancelled", "consumer")

    # ------------------------------------------------------------------ Islands
    def island_up(self, island: SimIsland, now_ms: int) -> None:
        i = island.no
        self.online[i] = True
        self.slots_free[i] = self.slots[i]
        self._fill(i)

    def island_down(self, island_no: int, now_ms: int, reason: str) -> None:
        self.online[island_no] = False
        self.slots_free[island_no] = 0
        lost = [no for no, rec in self.jobs.items() if rec[3] == island_no and rec[0] != _QUEUED]
        for job_no in sorted(lost):
            self._retry(job_no, self.jobs[job_no], reason)

    def heartbeat(self, island_no: int, now_ms: int) -> None:
        pass

    def accept(self, job_no: int, island_no: int, now_ms: int) -> None:
        rec = self.jobs.get(job_no)
        if rec is not None and rec[0] == _ASSIGNED and rec[3] == island_no:
            rec[0] = _RUNNING
            if self.leases:
                rec[5] = now_ms
                self.ctx.schedule_at(now_ms + self.lease_ms, self._lease_check, job_no, rec[4])

    def first_output(self, job_no: int, island_no: int, now_ms: int) -> None:
        pass

    def renew(self, job_no: int, island_no: int, now_ms: int) -> None:
        rec = self.jobs.get(job_no)
        if rec is not None and rec[3] == island_no:
            rec[5] = now_ms

    def complete(self, job_no: int, island_no: int, now_ms: int, run_ms: int) -> None:
        rec = self.jobs.get(job_no)
        if rec is None or rec[3] != island_no or rec[0] == _QUEUED:
            return
        del self.jobs[job_no]
        if self.online[island_no]:
            self.slots_free[island_no] += 1
        self.hooks.job_ended(job_no, "completed")
        self._fill(island_no)

    def fail(self, job_no: int, island_no: int, now_ms: int, reason: str) -> None:
        rec = self.jobs.get(job_no)
        if rec is None or rec[3] != island_no or rec[0] == _QUEUED:
            return
        if self.online[island_no]:
            self.slots_free[island_no] += 1
        self._retry(job_no, rec, reason)
        self._fill(island_no)

    # ------------------------------------------------------------------ process / observation
    def restart(self, now_ms: int) -> None:
        pass  # in-memory state survives: the bare queue has no log to rebuild from

    def queue_depth(self) -> int:
        return self.queued

    def credit_totals(self) -> None:
        return None

    def finish(self, now_ms: int) -> dict[str, Any]:
        return {"credits": None, "karma": None, "karma_values": None, "ledger_balanced": None, "log_digest": None}

    # ------------------------------------------------------------------ internals
    def _retry(self, job_no: int, rec: list, reason: str) -> None:
        rec[3] = -1
        if rec[2] < self.max_attempts:
            rec[0] = _QUEUED
            self.hooks.requeued(job_no, reason)
            cargo = rec[1]
            island = self._free_island(cargo)
            if island >= 0:
                self._offer(job_no, rec, island)
            else:
                self.queues[cargo].appendleft(job_no)
                self.queued += 1
        else:
            del self.jobs[job_no]
            self.hooks.job_ended(job_no, "failed", reason)

    def _offer(self, job_no: int, rec: list, island: int) -> None:
        self.slots_free[island] -= 1
        rec[0] = _ASSIGNED
        rec[2] += 1
        rec[3] = island
        if self.leases:
            rec[4] += 1
            self.ctx.schedule_at(self.ctx.engine.now + self.ack_ms, self._ack_check, job_no, rec[4])
        self.hooks.offer(job_no, island)

    def _free_island(self, cargo: str) -> int:
        """The first free slot for ``cargo`` (the Island idle longest), or -1."""
        dq = self.free[cargo]
        online = self.online
        slots_free = self.slots_free
        while dq:
            i = dq[0]
            if online[i] and slots_free[i] > 0:
                if slots_free[i] == 1:
                    dq.popleft()
                return i
            dq.popleft()
        return -1

    def _fill(self, i: int) -> None:
        """Give Island ``i``'s free slots the oldest waiting Jobs it can run."""
        if not self.online[i]:
            return
        serves = self.serves[i]
        if self.queued:
            queues = self.queues
            jobs = self.jobs
            while self.slots_free[i] > 0:
                best = -1
                best_q = None
                for cargo in serves:
                    q = queues[cargo]
                    while q:
                        rec = jobs.get(q[0])
                        if rec is not None and rec[0] == _QUEUED:
                            break
                        q.popleft()  # cancelled or already gone
                    if q and (best < 0 or q[0] < best):
                        best = q[0]
                        best_q = q
                if best_q is None:
                    break
                best_q.popleft()
                self.queued -= 1
                self._offer(best, jobs[best], i)
            if self.slots_free[i] <= 0:
                return
        free = self.free
        for cargo in serves:
            free[cargo].append(i)
        self.pushes += 1
        if self.pushes >= self.compact_at:  # stale entries pile up in Cargos nobody asks for
            self.pushes = 0
            for cargo in free:
                if len(free[cargo]) > self.compact_at:
                    self._compact(cargo)

    def _compact(self, cargo: str) -> None:
        seen: set[int] = set()
        keep: deque[int] = deque()
        for i in self.free[cargo]:
            if i not in seen and self.online[i] and self.slots_free[i] > 0:
                seen.add(i)
                keep.append(i)
        self.free[cargo] = keep

    def _take_back(self, job_no: int, rec: list, reason: str) -> None:
        island = rec[3]
        self.hooks.revoke(job_no, island)
        if self.online[island]:
            self.slots_free[island] += 1
        self._retry(job_no, rec, reason)
        self._fill(island)

    def _ack_check(self, job_no: int, epoch: int) -> None:
        rec = self.jobs.get(job_no)
        if rec is not None and rec[0] == _ASSIGNED and rec[4] == epoch:
            self._take_back(job_no, rec, "ack_timeout")

    def _lease_check(self, job_no: int, epoch: int) -> None:
        rec = self.jobs.get(job_no)
        if rec is not None and rec[0] == _RUNNING and rec[4] == epoch:
            due = rec[5] + self.lease_ms
            if due > self.ctx.engine.now:
                self.ctx.schedule_at(due, self._lease_check, job_no, epoch)
                return
            self._take_back(job_no, rec, "lease_lapsed")
