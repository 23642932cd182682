"""The real coordinator as a system under test: ``scheduler.service.Scheduler`` with the
embedded in-memory event store, the ledger and routing, driven in process on the
simulator's virtual clock. Nothing here re-implements a rule: every admission, queue,
routing, timer, settlement and karma decision is the production code's.

What this adapter does (see ``simulations.system`` for the seam):

* **Start**: an in-memory event store (``store.factory`` with ``MEMORY_URL``), an inline
  ``GroupCommitter`` (each command runs in the caller's thread, no threads at all), the
  ``Ledger`` and a ``Scheduler`` whose clock is the world's ``VirtualClock`` and whose ids
  come from ``SeededIds`` - so events are stamped with simulated time and the whole run is
  reproducible. One ledger account per simulated consumer (KYC flag, starting balance as
  a grant; accounts without KYC also get the free-tier sign-up credits, as a sign-up
  does), one platform owner account, and one registered and approved Island per
  simulated Island (capabilities from the fleet spec: Cargos and their models, VRAM, RAM,
  region, platform, tier, slots, asks).
* **Consumers**: ``submit`` -> ``Scheduler.submit`` (an ``AdmissionRefused`` returns its
  reason); ``cancel`` -> ``Scheduler.cancel``.
* **Islands**: ``island_up`` and ``heartbeat`` -> ``Scheduler.heartbeat`` (slots, latency);
  ``island_down`` sends nothing: the coordinator notices the silence itself (missed
  heartbeats -> offline; the Jobs it held come back through the ack / lease timers,
  exactly as in production); ``accept`` / ``renew`` / ``complete`` / ``fail`` map to the
  scheduler's Island commands (a rejected offer is ``Scheduler.reject``); ``first_output``
  of a chat Job is ``Scheduler.output`` (it marks the Job streamed: a streamed Job is not
  retried after a failure - the real rule).
* **Dispatch and timers**: after every message that changed something the adapter runs
  one ``Scheduler.step(now)`` (read the log, due timers, a dispatch round), and it keeps
  one simulator timer at ``core.next_timer_ms()`` so ack, lease and queue timeouts fire in
  the simulated millisecond they are due.
* **Listener**: the scheduler's ``offer`` / ``cancel`` / ``job_changed`` notifications are
  the world's ``offer`` / ``revoke`` / ``requeued`` / ``job_ended``.
* **Restart**: the Scheduler, its committer (and so its aggregate cache) and the ledger
  facade are thrown away; the event store is kept (it is the database); new ones are built
  and ``Scheduler.recover()`` rebuilds the live view from the log. Notifications replayed
  by the recovery were delivered before the crash, so they are not sent again. The
  adapter checks that no open Job and no credit was lost (``system.restarts``).
* **Finish**: credits and ``ledger_balanced`` from a checked fold of the ledger events
  (``ledger.audit``), karma from the Island aggregates, and a BLAKE2b digest of the whole
  event log (position, originator id and version, topic, encoded state).

Knobs in the scenario's ``[coordinator.extra]`` (all optional; unknown keys are refused):
``region_preference`` ("soft" default: a consumer's preferred region is not sent - the
latency term of the routing score already favours close Islands; "strict": sent as the
``region`` preference, a hard filter), ``prompt_text`` ("full" default: a prompt whose
admission estimate equals the Job's prompt tokens; "short": a one-word prompt, less memory,
smaller holds), ``routing_weights`` (a table of ``routing.types.Weights`` fields),
``cargo_min_karma_milli`` (every Cargo's karma gate, as a deployment's own catalog would
set it), ``dispatch_batch_max``, ``max_queued_per_account``, ``max_queued_total``,
``log_poll_ms`` (``SchedulerConfig`` fields), ``verify_restart`` (true default: compare
every account's balance across a restart).
"""

from __future__ import annotations

import hashlib
import heapq
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.utils import get_topic

from ledger import audit
from ledger import names as lnames
from ledger.pricing import split_fee
from ledger.service import Ledger, LedgerConfig
from routing.types import Weights
from scheduler.admission import AdmissionRefused
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.dispatcher import EXPECTED_RACES, JobOffer
from scheduler.jobs import Job
from scheduler.market import Surge
from scheduler.service import Scheduler
from simulations.consumers import SimAccount
from simulations.demand import JobShape
from simulations.engine import derive_seed
from simulations.fleet import SimIsland
from simulations.system import SimContext
from store.clock import SeededIds, datetime_to_ms, id_from_int, id_from_text
from store.factory import MEMORY_URL, StoreConfig, open_app
from store.unit_of_work import GroupCommitter

#: Namespace of the simulator's deterministic account and Island ids.
SIM_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c51a0")
_TERMINAL_REASON = {Job.TimedOut: "queue_timeout"}
_CONFIG_KEYS = ("dispatch_batch_max", "max_queued_per_account", "max_queued_total", "log_poll_ms", "surge_ratio",
                "surge_multiplier_permille", "surge_hold_ms")
#: What ``[coordinator.extra]`` may hold for this adapter (see the module docstring).
EXTRA_KEYS = frozenset({"region_preference", "prompt_text", "routing_weights", "cargo_min_karma_milli",
                        "verify_restart", *_CONFIG_KEYS})
_MAX_TOKENS = 4096  # scheduler.validation.MAX_TOKENS_LIMIT


def _credits_text(micro: int) -> str:
    whole, frac = divmod(int(micro), 1_000_000)
    return f"{whole}.{frac:06d}" if frac else str(whole)


def _short_reason(reason: str) -> str:
    """``"lease_lapsed: the Island stopped mid-stream"`` -> ``"lease_lapsed"`` (metrics keys)."""
    head = reason.split(":", 1)[0].strip()
    return head or "unspecified"


class RealSystem:
    """The production scheduler, ledger and routing behind the simulator's seam."""

    name = "real"
    wants_progress = True

    def __init__(self) -> None:
        self.heartbeat_interval_ms: int | None = None
        self.lease_renew_ms: int | None = None
        self.sched: Scheduler | None = None

    # ------------------------------------------------------------------ setup
    def start(self, ctx: SimContext) -> None:
        self.ctx = ctx
        self.hooks = ctx.hooks
        self.clock = ctx.clock
        self.epoch = ctx.clock.epoch_ms
        try:
            self._configure(ctx)
        except (TypeError, AssertionError, ValueError) as exc:
            raise ValueError(f"[coordinator] settings the real scheduler refuses: {exc or type(exc).__name__}") from None

        self.app = open_app(StoreConfig(database_url=MEMORY_URL, data_dir=Path(".")))
        self.incarnation = 0
        self._build()

        # ids and lookups
        self.account_ids = [id_from_int(uuid.uuid5(SIM_NAMESPACE, f"account/{a.account_id}").int)
                            for a in ctx.accounts]
        self.owner_id = uuid.uuid5(SIM_NAMESPACE, "account/platform-islands")
        self.island_ids = [str(uuid.uuid5(SIM_NAMESPACE, f"island/{i.island_id}")) for i in ctx.islands]
        self.island_no = {iid: no for no, iid in enumerate(self.island_ids)}
        self.island_spec = list(ctx.islands)
        self.job_uuid: list[UUID | None] = []  # job_no -> id (None: refused)
        self.job_no: dict[str, int] = {}  # str(id) -> job_no
        self.job_hold: list[int] = []
        self.job_chat: list[bool] = []
        self.job_shape: list[JobShape] = []
        self.open_jobs: set[int] = set()
        self.chat_cargos = frozenset(s for s, c in ctx.cargos.items() if c.kind == "chat")
        self._prompts: dict[int, str] = {}
        self._prefs_cache: dict[tuple[int, str], dict | None] = {}
        # the market, as the scheduler's notifications show it (no extra log reads)
        self.job_island: dict[int, int] = {}  # job_no -> the Island it was last offered to
        self.clearings: dict[str, dict[int, list[int]]] = {}  # cargo -> minute -> [sum, count, min, max]
        self.earned_by_tier: dict[str, int] = {}
        self.jobs_by_tier: dict[str, int] = {}

        # observation
        self.totals = [0, 0, 0, 0]  # charged, earned, fees, released (from Job events)
        self.stats = {"steps": 0, "catch_ups": 0, "wakes": 0, "races": 0, "refusals": 0, "offers": 0, "revokes": 0,
                      "requeues": 0, "ended": 0}
        self.restarts: list[dict[str, Any]] = []
        self._wakes: list[int] = []  # pending wake-up times (simulated ms)
        self.muted = False

        # the population
        ledger = self.ledger
        ledger.open_account(self.owner_id, "islands@platform.sim", kyc_verified=True, free_tier_grant=False)
        for acct, acct_id in zip(ctx.accounts, self.account_ids, strict=True):
            ledger.open_account(acct_id, f"{acct.account_id}@consumers.sim", kyc_verified=acct.kyc,
                                initial_grant_micro=acct.balance_micro, free_tier_grant=not acct.kyc)
        for spec, iid in zip(ctx.islands, self.island_ids, strict=True):
            self.sched.register_island(self.owner_id, spec.island_id, self._capabilities(spec), approve=True,
                                       island_id=id_from_text(iid), token=f"sim-token-{spec.no}")
        self._step()

    def _configure(self, ctx: SimContext) -> None:
        cfg = ctx.config
        extra = dict(cfg.extra or {})
        unknown = sorted(set(extra) - EXTRA_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) in [coordinator.extra]: {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(EXTRA_KEYS))}")
        self.catalog = Catalog.load()
        if "cargo_min_karma_milli" in extra:  # catalog configuration, as a deployment's own cargos.toml would
            gate = int(extra["cargo_min_karma_milli"])
            self.catalog = Catalog([msgspec.structs.replace(c, min_karma_milli=gate) for c in self.catalog.all()])
        self._check_cargos(ctx)
        weights = Weights(**extra.get("routing_weights", {}))
        lease_ms = int(cfg.lease_s * 1000)
        kwargs: dict[str, Any] = {key: int(extra[key]) for key in _CONFIG_KEYS if key in extra}
        self.sched_config = SchedulerConfig(
            ack_timeout_ms=int(cfg.ack_timeout_s * 1000), lease_ms=lease_ms, lease_renew_ms=max(1, lease_ms // 2),
            queue_timeout_ms=int(cfg.queue_timeout_s * 1000), max_attempts=cfg.max_attempts,
            heartbeat_interval_ms=int(cfg.heartbeat_interval_s * 1000),
            missed_heartbeats_offline=cfg.missed_heartbeats_offline, auto_approve_islands=False,
            routing_seed=derive_seed(ctx.seed, "sut/routing"), weights=weights, **kwargs)
        self.ledger_config = LedgerConfig(fee_bps=cfg.fee_bps, free_tier_limit_micro=ctx.free_tier_micro,
                                          free_tier_grant_micro=ctx.free_tier_micro)
        self.heartbeat_interval_ms = self.sched_config.heartbeat_interval_ms
        self.lease_renew_ms = self.sched_config.lease_renew_ms
        region = extra.get("region_preference", "soft")
        prompt = extra.get("prompt_text", "full")
        if region not in ("soft", "strict") or prompt not in ("full", "short"):
            raise ValueError('region_preference must be "soft" or "strict", prompt_text "full" or "short"')
        self.strict_regions = region == "strict"
        self.full_prompts = prompt == "full"
        self.verify_restart = bool(extra.get("verify_restart", True))

    def _build(self) -> None:
        """A coordinator process: committer (with its aggregate cache), ledger facade and
        scheduler over the kept event store."""
        self.committer = GroupCommitter(self.app, self.clock, inline=True, name=f"sim-{self.incarnation}")
        self.ledger = Ledger(self.committer, self.ledger_config)
        ids = SeededIds(derive_seed(self.ctx.seed, f"sut/ids/{self.incarnation}"))
        self.sched = Scheduler(self.committer, self.catalog, self.ledger_config, self.sched_config, self.clock, ids,
                               listener=_Listener(self), single_writer=True)
        self.core = self.sched.core

    def _check_cargos(self, ctx: SimContext) -> None:
        problems = []
        for slug, spec in ctx.cargos.items():
            cargo = self.catalog.get(slug)
            if cargo is None:
                problems.append(f"{slug}: not in the catalog")
                continue
            if (cargo.kind, cargo.requires_kyc, cargo.free_tier) != (spec.kind, spec.requires_kyc, spec.free_tier):
                problems.append(f"{slug}: scenario says kind={spec.kind} requires_kyc={spec.requires_kyc} "
                                f"free_tier={spec.free_tier}, the catalog kind={cargo.kind} "
                                f"requires_kyc={cargo.requires_kyc} free_tier={cargo.free_tier}")
        if problems:
            raise ValueError("the scenario's [cargos] disagree with scheduler/cargos.toml: " + "; ".join(problems))

    def _capabilities(self, spec: SimIsland) -> dict[str, Any]:
        models: set[str] = set()
        for slug in spec.cargos:
            cargo = self.catalog.get(slug)
            if cargo is not None:
                models |= cargo.models
        return {"cargos": sorted(spec.cargos), "models": sorted(models), "vram_mb": spec.vram_mb,
                "ram_mb": spec.ram_mb, "region": spec.region, "platform": spec.platform,
                "hardware_tier": spec.tier_index, "slots": spec.slots,
                "asks": {slug: _credits_text(v) for slug, v in sorted(spec.ask_micro.items())}}

    # ------------------------------------------------------------------ stepping
    def _step(self) -> None:
        """One dispatch round now, then make sure a wake-up is pending for the next timer."""
        self.stats["steps"] += 1
        self.sched.step(self.clock.now_ms())
        self._arm()

    def _catch_up(self) -> None:
        self.stats["catch_ups"] += 1
        self.core.catch_up(self.clock.now_ms())
        self._arm()

    def _arm(self) -> None:
        nxt = self.core.next_timer_ms()
        if nxt is None:
            return
        t = nxt - self.epoch
        wakes = self._wakes
        if wakes and wakes[0] <= t:
            return  # an earlier wake-up is pending; it re-arms
        now = self.ctx.engine.now
        if t < now:
            t = now
        heapq.heappush(wakes, t)
        self.ctx.schedule_at(t, self._wake, t)

    def _wake(self, t: int, _b: Any) -> None:
        wakes = self._wakes
        now = self.ctx.engine.now
        while wakes and wakes[0] <= now:
            heapq.heappop(wakes)
        self.stats["wakes"] += 1
        self._step()

    # ------------------------------------------------------------------ listener (scheduler -> world)
    def on_offer(self, island_id: str, offer: JobOffer) -> None:
        if self.muted:
            return
        self.stats["offers"] += 1
        no = self.job_no[offer.job_id]
        self.job_island[no] = self.island_no[island_id]
        self.hooks.offer(no, self.island_no[island_id])

    def on_cancel(self, island_id: str, job_id: str) -> None:
        if self.muted:
            return
        self.stats["revokes"] += 1
        self.hooks.revoke(self.job_no[job_id], self.island_no[island_id])

    def on_job_changed(self, job_id: str, status: str, event: Any) -> None:
        if self.muted:
            return
        if isinstance(event, (Job.OfferDeclined, Job.Requeued)):
            self.stats["requeues"] += 1
            self.hooks.requeued(self.job_no[job_id], event.reason)
            return
        if status in ("queued", "assigned", "running", "pending"):
            if isinstance(event, Job.Assigned) and event.clearing_micro >= 0:
                minute = (datetime_to_ms(event.timestamp) - self.epoch) // 60_000
                per = self.clearings.setdefault(event.cargo, {})
                c = per.get(minute)
                price = event.clearing_micro
                if c is None:
                    per[minute] = [price, 1, price, price]
                else:
                    c[0] += price
                    c[1] += 1
                    c[2] = min(c[2], price)
                    c[3] = max(c[3], price)
            return
        no = self.job_no.pop(job_id)  # ended: the scheduler never names it again
        charged = int(getattr(event, "charged_micro", 0) or 0)
        t = self.totals
        t[0] += charged
        if isinstance(event, Job.Completed):
            t[1] += event.earning_micro
            t[2] += event.fee_micro
            reason = ""
            island_no = self.job_island.get(no)
            if island_no is not None:
                tier = self.island_spec[island_no].tier
                self.earned_by_tier[tier] = self.earned_by_tier.get(tier, 0) + event.earning_micro
                self.jobs_by_tier[tier] = self.jobs_by_tier.get(tier, 0) + 1
        else:
            if charged:  # a partial charge (cancelled mid-stream): the ledger splits it like a settlement
                earning, fee = split_fee(charged, self.ledger_config.fee_bps)
                t[1] += earning
                t[2] += fee
            reason = _TERMINAL_REASON.get(type(event)) or _short_reason(
                getattr(event, "reason", "") or getattr(event, "by", ""))
        t[3] += self.job_hold[no] - charged
        self.job_island.pop(no, None)
        self.open_jobs.discard(no)
        self.stats["ended"] += 1
        self.hooks.job_ended(no, status, reason, charged)

    # ------------------------------------------------------------------ consumers
    def _prompt(self, tokens: int) -> str:
        """A prompt whose admission estimate (ceil(chars / 4) + 4 per message) is ``tokens``."""
        text = self._prompts.get(tokens)
        if text is None:
            text = self._prompts[tokens] = "x" * max(1, 4 * (tokens - 4))
        return text

    def _input(self, shape: JobShape, chat: bool) -> dict[str, Any]:
        if chat:
            raw: dict[str, Any] = {"prompt": self._prompt(shape.prompt_tokens) if self.full_prompts else "hello"}
            if shape.max_tokens:
                raw["max_tokens"] = min(shape.max_tokens, _MAX_TOKENS)
            return raw
        return {"prompt": "a simulated picture", "width": shape.width or 1024, "height": shape.height or 1024,
                "steps": shape.steps or 30}

    def _prefs(self, account: SimAccount, cargo: str) -> dict | None:
        key = (account.no, cargo)
        prefs = self._prefs_cache.get(key, key)
        if prefs is key:
            p: dict[str, Any] = {}
            bid = account.bids_micro.get(cargo)
            if bid is not None:
                p["bid_price"] = _credits_text(bid)
            if self.strict_regions and account.region:
                p["region"] = account.region
            prefs = self._prefs_cache[key] = p or None
        return prefs

    def submit(self, job_no: int, shape: JobShape, account: SimAccount, now_ms: int) -> str | None:
        assert job_no == len(self.job_uuid), "job numbers come in arrival order"
        chat = shape.cargo in self.chat_cargos
        self.job_chat.append(chat)
        self.job_shape.append(shape)
        try:
            view = self.sched.submit(self.account_ids[account.no], shape.cargo, self._input(shape, chat),
                                     self._prefs(account, shape.cargo))
        except AdmissionRefused as refusal:
            self.job_uuid.append(None)
            self.job_hold.append(0)
            self.stats["refusals"] += 1
            return refusal.reason
        self.job_uuid.append(id_from_text(view.id))
        self.job_no[view.id] = job_no
        self.job_hold.append(view.hold_micro)
        self.open_jobs.add(job_no)
        self._step()
        return None

    def cancel(self, job_no: int, now_ms: int) -> None:
        job_id = self.job_uuid[job_no]
        if job_id is None:
            return
        self.sched.cancel(job_id, account_id=None, by="consumer")
        self._step()

    # ------------------------------------------------------------------ Islands
    def island_up(self, island: SimIsland, now_ms: int) -> None:
        self.sched.heartbeat(self.island_ids[island.no], slots_total=island.slots, latency_ms=island.latency_ms)
        self._step()

    def island_down(self, island_no: int, now_ms: int, reason: str) -> None:
        pass  # an Island that goes away just stops talking; the coordinator notices (heartbeats, timers)

    def heartbeat(self, island_no: int, now_ms: int) -> None:
        island_id = self.island_ids[island_no]
        rec = self.core.registry.islands.get(island_id)
        was_online = rec is not None and rec.online
        self.sched.heartbeat(island_id)
        if not was_online:  # back after missed heartbeats (or a coordinator restart): it takes Jobs again
            self._step()

    def accept(self, job_no: int, island_no: int, now_ms: int) -> None:
        try:
            self.sched.accept(self.island_ids[island_no], self.job_uuid[job_no], view=False)
        except EXPECTED_RACES:
            self.stats["races"] += 1
            self._step()  # the Job moved on meanwhile
            return
        # An accepted offer frees no slot and queues nothing: no dispatch round is due,
        # only the log must be read (the lease timer starts; renewals and progress need
        # the Job running in the live view).
        self._catch_up()

    def first_output(self, job_no: int, island_no: int, now_ms: int) -> None:
        if self.job_chat[job_no]:
            self.sched.output(self.island_ids[island_no], self.job_uuid[job_no], 1)

    def renew(self, job_no: int, island_no: int, now_ms: int) -> None:
        self.sched.renew_lease(self.island_ids[island_no], self.job_uuid[job_no])

    def complete(self, job_no: int, island_no: int, now_ms: int, run_ms: int) -> None:
        s = self.job_shape[job_no]
        if self.job_chat[job_no]:
            usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens}
        else:
            usage = {"steps": s.steps or 30}
        try:
            self.sched.complete(self.island_ids[island_no], self.job_uuid[job_no], usage, "", run_ms, view=False)
        except EXPECTED_RACES:
            self.stats["races"] += 1
        self._step()

    def fail(self, job_no: int, island_no: int, now_ms: int, reason: str) -> None:
        island_id = self.island_ids[island_no]
        job_id = self.job_uuid[job_no]
        try:
            if reason == "rejected":
                self.sched.reject(island_id, job_id, view=False)
            else:
                self.sched.fail(island_id, job_id, reason, retryable=True, view=False)
        except EXPECTED_RACES:
            self.stats["races"] += 1
        self._step()

    # ------------------------------------------------------------------ the coordinator process
    def restart(self, now_ms: int) -> None:
        before = self._balances(self.committer) if self.verify_restart else None
        open_before = set(self.open_jobs)
        self.committer.close()
        self.incarnation += 1
        self._build()
        self.muted = True
        try:
            replayed = self.sched.recover()
        finally:
            self.muted = False
        live = {self.job_no.get(str(j), -1) for j in self.core.jobs}
        after = self._balances(self.committer) if self.verify_restart else None
        info = {"t_s": now_ms / 1000, "events_replayed": replayed, "open_jobs": len(open_before),
                "recovered_jobs": len(live), "lost_jobs": len(open_before - live),
                "unknown_jobs": len(live - open_before),
                "credits_checked": before is not None, "credit_mismatches": (
                    sum(1 for k, v in before.items() if after.get(k) != v) if before is not None else None)}
        self.restarts.append(info)
        self._step()

    def _balances(self, committer: GroupCommitter) -> dict[str, tuple[int, int, int]]:
        """(spendable, held, spent) of every account, through a committer's aggregates."""
        ids = [self.owner_id, *self.account_ids]

        def read(uow):
            out = {}
            for acct_id in ids:
                a = uow.get(acct_id)
                out[str(acct_id)] = (a.spendable_micro, a.held_micro, a.spent_micro)
            return out

        return committer.query(read)

    # ------------------------------------------------------------------ observation
    def queue_depth(self) -> int:
        return sum(self.core.queue_depths().values())

    def credit_totals(self) -> tuple[int, int, int, int]:
        return tuple(self.totals)  # type: ignore[return-value]

    def finish(self, now_ms: int) -> dict[str, Any]:
        fold = audit.LedgerFold(check=True)
        by_code: dict[str, int] = {}
        digest = hashlib.blake2b(digest_size=16)
        recorder = self.app.recorder
        mapper = self.app.mapper
        ledger_topics = frozenset(audit.LEDGER_TOPICS)
        surge_topic = get_topic(Surge.Switched)
        switches: list[dict[str, Any]] = []
        events = 0
        position = 1
        while True:
            page = recorder.select_notifications(start=position, limit=5_000)
            if not page:
                break
            for n in page:
                events += 1
                topic = n.topic.encode()
                digest.update(n.id.to_bytes(8, "little"))
                digest.update(n.originator_id.bytes)
                digest.update(int(n.originator_version).to_bytes(8, "little"))
                digest.update(len(topic).to_bytes(4, "little"))
                digest.update(topic)
                digest.update(len(n.state).to_bytes(4, "little"))
                digest.update(n.state)
                if n.topic == surge_topic:
                    sw = mapper.to_domain_event(n)
                    switches.append({"t_s": (datetime_to_ms(sw.timestamp) - self.epoch) / 1000, "active": sw.active,
                                     "multiplier_permille": sw.multiplier_permille, "queued": sw.queued,
                                     "free_slots": sw.free_slots})
                elif n.topic in ledger_topics:
                    ev = mapper.to_domain_event(n)
                    fold.apply(n.id, ev)
                    for _debit, _credit, amount, code in getattr(ev, "transfers", ()) or ():
                        by_code[code] = by_code.get(code, 0) + amount
            position = page[-1].id + 1
        fold.finish(self.clock.now_ms(), self.ledger_config.expiry_grace_ms)
        summary = fold.summary()
        credits = {"charged": by_code.get(lnames.POST, 0), "earned_by_islands": by_code.get(lnames.EARNING, 0),
                   "fees": by_code.get(lnames.FEE, 0), "released": by_code.get(lnames.RELEASE, 0)}

        def karma_of(uow):
            return [uow.get(UUID(iid)).karma_shown_milli for iid in self.island_ids]

        karma = sorted(self.committer.query(karma_of))
        n = len(karma)
        karma_summary = ({"min": karma[0] / 1000, "median": karma[(n - 1) // 2] / 1000, "max": karma[-1] / 1000}
                         if karma else None)
        totals = dict(zip(("charged", "earned_by_islands", "fees", "released"), self.totals, strict=True))
        return {
            "credits": credits,
            "karma": karma_summary,
            "karma_values": karma,
            "ledger_balanced": not fold.violations,
            "log_digest": digest.hexdigest(),
            "system": {
                "events": events,
                "ledger": summary,
                "ledger_violations": [f"@{v.position}: {v.message}" for v in fold.violations[:5]],
                "credits_match_job_events": totals == credits,
                "open_jobs": len(self.open_jobs),
                "restarts": self.restarts,
                "refusals_by_reason": dict(sorted(self.sched.refusals.counts.items())),
                "market": self._market_report(switches),
                "adapter": dict(self.stats),
                "core": dict(self.core.stats),
                "commits": {"batches": self.committer.stats.batches, "commands": self.committer.stats.commands,
                            "events": self.committer.stats.events},
            },
        }


    def _market_report(self, switches: list[dict[str, Any]]) -> dict[str, Any]:
        """Surge switches, clearing amounts per minute and Cargo (micro-credits per billing
        unit), refusals for budget, and Island earnings per tier."""
        clearing = {}
        for cargo, per in sorted(self.clearings.items()):
            clearing[cargo] = [[m, c[0] // c[1], c[2], c[3], c[1]] for m, c in sorted(per.items())]
        return {
            "surge_switches": switches,
            "surge_on": sum(1 for s in switches if s["active"]),
            "surge_off": sum(1 for s in switches if not s["active"]),
            "refused_for_budget": self.sched.refusals.counts.get("no_island_within_budget", 0),
            "clearing_per_minute": clearing,  # [minute, avg, min, max, jobs]
            "earned_by_tier_micro": dict(sorted(self.earned_by_tier.items())),
            "jobs_by_tier": dict(sorted(self.jobs_by_tier.items())),
        }


class _Listener:
    """The scheduler's ``SchedulerListener``, forwarding to the adapter."""

    __slots__ = ("offer", "cancel", "job_changed")

    def __init__(self, system: RealSystem) -> None:
        self.offer = system.on_offer
        self.cancel = system.on_cancel
        self.job_changed = system.on_job_changed


def make_system() -> RealSystem:
    return RealSystem()
