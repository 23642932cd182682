"""Job and Island commands, each a function of one unit of work. A command that touches
several aggregates (a completion: Job, the consumer's account, the Island's karma) saves
them all in one transaction. Every check happens before the first event is triggered."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, NamedTuple
from uuid import UUID

import msgspec

from ledger.pricing import (
    ChatPricing,
    chat_price_micro,
    image_price_micro,
    partial_chat_price_micro,
    settlement_micro,
)
from ledger.service import LedgerConfig, load_account, place_hold_in, post_hold_in, release_hold_in
from routing import karma as karma_rules
from scheduler.admission import Admitted
from scheduler.cargo_switch import CargoSwitch, switch_id
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.validation import ChatInput, prompt_tokens_estimate
from scheduler.islands import APPROVED, Island
from scheduler.market import SURGE_ID, BidPreferences, Budget, Surge, bids_id, clearing_micro, price_at_rate
from scheduler.jobs import (
    ASSIGNED,
    PENDING,
    QUEUED,
    RUNNING,
    TERMINAL,
    WAITING,
    IllegalTransition,
    Job,
)
from store.clock import datetime_to_ms, id_from_text, ms_to_datetime
from store.unit_of_work import NotFound, UnitOfWork

MAX_USAGE_TOKENS = 1_000_000
MAX_OUTPUT_CHARS = 8 * 1024 * 1024


class UnknownJob(Exception):
    pass


class NotYourJob(Exception):
    """An Island acted on a Job that is not assigned to it (forged id, or the lease moved)."""


class BadUsage(ValueError):
    pass


class IdempotencyMismatch(Exception):
    """The same idempotency key was used for a different submission."""


class IslandExists(Exception):
    pass


class NotNatsIsland(ValueError):
    pass


class BadKarmaAdjustment(ValueError):
    """An operator's karma adjustment that would change nothing or breaks a bound."""


_ONLY_QUEUED = frozenset({QUEUED})
_ONLY_ASSIGNED = frozenset({ASSIGNED})
_ONLY_RUNNING = frozenset({RUNNING})
_ASSIGNED_OR_RUNNING = frozenset({ASSIGNED, RUNNING})


@lru_cache(maxsize=65_536)
def _parse_uuid(text: str) -> UUID:
    return id_from_text(text)


def uuid_of(text: str) -> UUID:
    """`UUID(text)` for the account and Island ids a Job carries as text, as an `Id`
    (store.clock: its hash and text are remembered; it equals the plain UUID). Memoised (a
    bounded LRU of 65,536 texts: the live accounts and Islands) because parsing costs
    more than a lookup and the same few ids come back on every command; a UUID is an
    immutable value, so a shared one is as good as a new one. Anything that is not a
    str, and every bad text (exceptions are never cached), goes to UUID() itself."""
    if type(text) is not str:
        return UUID(text)
    return _parse_uuid(text)


def load_job(uow: UnitOfWork, job_id: UUID) -> Job:
    try:
        job = uow.get(job_id)
    except NotFound:
        raise UnknownJob(f"unknown job {job_id}") from None
    if not isinstance(job, Job):
        raise UnknownJob(f"unknown job {job_id}")
    return job


def load_island(uow: UnitOfWork, island_id: UUID) -> Island:
    try:
        island = uow.get(island_id)
    except NotFound:
        raise NotYourJob(f"unknown island {island_id}") from None
    if not isinstance(island, Island):
        raise NotYourJob(f"unknown island {island_id}")
    return island


def _ts(uow: UnitOfWork) -> Any:
    return ms_to_datetime(uow.now_ms)


def _own(job: Job, island_id: str, statuses: frozenset[str], action: str) -> None:
    if job.island_id != island_id:
        raise NotYourJob(f"job {job.id} is not assigned to island {island_id}")
    job.require(statuses, action)


# ----------------------------------------------------------------- consumer side
def submit_in(uow: UnitOfWork, ledger_config: LedgerConfig, sched: SchedulerConfig, job_id: UUID,
              account_id: UUID, admitted: Admitted, *, parent_id: str = "", batch_index: int = -1,
              pending: bool = False, idem_fp: str = "", budget: Budget | None = None) -> Job:
    """`JobSubmitted` and the consumer's hold, one atomic save. The hold lives long
    enough for the queue wait and every attempt; the sweeper releases it if all else fails."""
    # A fresh random id cannot exist (the insert's uniqueness would catch it anyway); only
    # an id derived from an idempotency key needs the read.
    account_key = str(account_id)
    existing = uow.get_or_none(job_id) if idem_fp else None
    if existing is not None:
        if not isinstance(existing, Job) or existing.account_id != account_key or existing.idem_fp != idem_fp:
            raise IdempotencyMismatch(f"job {job_id} exists with different content")
        return existing
    expires = uow.now_ms + sched.queue_timeout_ms * (sched.max_attempts + 1) + sched.lease_ms * sched.max_attempts \
        + ledger_config.hold_ttl_ms
    cargo = admitted.cargo
    job_key = str(job_id)
    hold = budget.hold_micro if budget is not None else admitted.hold_micro
    place_hold_in(uow, ledger_config, account_id, job_key, hold, reference=f"job:{job_key}",
                  expires_at_ms=expires, requires_kyc=cargo.requires_kyc, free_tier_allowed=cargo.free_tier)
    market = {"budget_micro": budget.budget_micro, "budget_source": budget.source,
              "list_rate_micro": budget.list_rate_micro} if budget is not None else {}
    job = Job._create(Job.Submitted, id=job_id, account_id=account_key, cargo=cargo.slug, cargo_id=cargo.id,
                      kind=cargo.kind, model=admitted.model, input=admitted.input_dict, prefs=admitted.prefs,
                      hold_micro=hold, max_attempts=sched.max_attempts,
                      status=PENDING if pending else QUEUED, parent_id=parent_id, batch_index=batch_index,
                      idem_fp=idem_fp, timestamp=_ts(uow), **market)
    uow.add(job)
    return job


def release_pending_in(uow: UnitOfWork, job_id: UUID) -> Job:
    job = load_job(uow, job_id)
    if job.status == PENDING:
        job.trigger_event(Job.Queued, timestamp=_ts(uow))
    return job


def cancel_in(uow: UnitOfWork, ledger_config: LedgerConfig, catalog: Catalog, job_id: UUID, *,
              account_id: str | None, by: str, delivered_tokens: int = 0) -> Job:
    """Cancel in any non-terminal state (idempotent on a cancelled Job; a finished Job is
    returned unchanged). Charges only what was delivered."""
    job = load_job(uow, job_id)
    if account_id is not None and job.account_id != account_id:
        raise UnknownJob(f"unknown job {job_id}")
    if job.status in TERMINAL:
        return job
    account = uuid_of(job.account_id)
    charged = 0
    usage: dict = {}
    if job.status == RUNNING and delivered_tokens > 0 and job.kind == "chat":
        cargo = catalog.by_slug(job.cargo)
        assert isinstance(cargo.pricing, ChatPricing)
        prompt = prompt_tokens_estimate(msgspec.convert(job.input, ChatInput))
        partial = partial_chat_price_micro(cargo.pricing, prompt, delivered_tokens, 2**62)
        charged = min(_at_clearing(job, partial), job.hold_micro)
        usage = {"prompt_tokens": prompt, "completion_tokens": delivered_tokens,
                 "total_tokens": prompt + delivered_tokens}
    stage = job.status
    if charged:
        post_hold_in(uow, ledger_config, account, str(job_id), charged, job.owner_account_id or None)
    else:
        release_hold_in(uow, account, str(job_id), "cancelled")
    job.trigger_event(Job.Cancelled, by=by, stage=stage, charged_micro=charged, usage=usage, timestamp=_ts(uow))
    return job


def timeout_in(uow: UnitOfWork, job_id: UUID) -> Job:
    job = load_job(uow, job_id)
    if job.status not in WAITING:
        return job  # it moved on meanwhile: nothing to do
    release_hold_in(uow, uuid_of(job.account_id), str(job_id), "timeout")
    waited = uow.now_ms - _created_ms(job)
    job.trigger_event(Job.TimedOut, waited_ms=max(0, waited), timestamp=_ts(uow))
    return job


def _created_ms(job: Job) -> int:
    return datetime_to_ms(job.created_on)


# ----------------------------------------------------------------- dispatcher side
def assign_in(uow: UnitOfWork, job_id: UUID, island_id: str, owner_account_id: str, ack_deadline_ms: int,
              score: dict, candidates: int, *, ask_micro: int = -1, surge_permille: int = 1000) -> Job:
    """Offer the Job to an Island. Under the exchange (a Job with a budget) the clearing
    rate is computed here from the Island's ask and the surge, never above the budget."""
    job = load_job(uow, job_id)
    job.require(_ONLY_QUEUED, "assign")
    if island_id in job.excluded:
        raise IllegalTransition(job_id, job.status, f"assign to excluded island {island_id}")
    market: dict = {}
    if job.budget_source and ask_micro >= 0:
        if ask_micro > job.budget_micro:
            raise IllegalTransition(job_id, job.status, f"assign to island {island_id} asking above the budget")
        market = {"ask_micro": ask_micro, "surge_permille": surge_permille,
                  "clearing_micro": clearing_micro(ask_micro, surge_permille, job.budget_micro), "cargo": job.cargo}
    job.trigger_event(Job.Assigned, island_id=island_id, owner_account_id=owner_account_id,
                      ack_deadline_ms=ack_deadline_ms, score=score, candidates=candidates, timestamp=_ts(uow),
                      **market)
    return job


def rebase_karma_in(uow: UnitOfWork, island: Island) -> None:
    """Decision 0051: move an Island recorded on the old karma scale onto 0..100 (one
    `KarmaRebased`, written before its first change under the new rules)."""
    if not island.karma_legacy:
        return
    before = island.karma_milli
    after = karma_rules.rebased_milli(before)
    island.trigger_event(Island.KarmaRebased, delta_milli=after - before, reason=karma_rules.REASON_REBASE,
                         job_id="", karma_after_milli=after, carry=island.karma_carry, compute_ms=0,
                         timestamp=_ts(uow))


def _karma_change(uow: UnitOfWork, island: Island, delta: int, reason: str, job_id: str, carry: int,
                  compute_ms: int) -> None:
    island.trigger_event(Island.KarmaChanged, delta_milli=delta, reason=reason, job_id=job_id,
                         karma_after_milli=island.karma_milli + delta, carry=carry, compute_ms=compute_ms,
                         timestamp=_ts(uow))


def _slow_in(uow: UnitOfWork, rates: karma_rules.KarmaRates, island: Island, job: Job, tokens: int) -> None:
    """Latency against what the Island reported: `capabilities.tokens_per_s` (an integer)
    against the coordinator's own clock from `Job.Started` to now."""
    reported = island.capabilities.get("tokens_per_s") if isinstance(island.capabilities, dict) else None
    if not isinstance(reported, int) or isinstance(reported, bool) or job.started_at is None:
        return
    ran_ms = uow.now_ms - datetime_to_ms(job.started_at)
    if karma_rules.is_slow(tokens, ran_ms, reported, rates):
        delta = karma_rules.for_slow(island.karma_milli, rates)
        _karma_change(uow, island, delta, karma_rules.REASON_SLOW, str(job.id), island.karma_carry, 0)


def _at_clearing(job: Job, list_price_micro: int) -> int:
    """A list price scaled to the Job's clearing rate (unchanged for a Job priced before
    the exchange, or one never assigned under it)."""
    if job.clearing_micro < 0 or not job.budget_source:
        return list_price_micro
    return price_at_rate(list_price_micro, job.clearing_micro, job.list_rate_micro)


def _karma_in(uow: UnitOfWork, rates: karma_rules.KarmaRates, island_id: str, reason: str, job_id: UUID,
              compute_ms: int = 0) -> int:
    try:
        island = load_island(uow, uuid_of(island_id))
    except (NotYourJob, ValueError):
        return 0
    rebase_karma_in(uow, island)
    carry = island.karma_carry
    if reason == karma_rules.REASON_COMPLETED:
        delta, carry = karma_rules.for_completed(island.karma_milli, compute_ms, rates, island.karma_carry)
    elif reason == karma_rules.REASON_FAILURE:
        delta = karma_rules.for_failure(island.karma_milli, rates)
    elif reason == karma_rules.REASON_MISSED_ACK:
        delta = karma_rules.for_missed_ack(island.karma_milli, rates)
    else:
        assert reason == karma_rules.REASON_LAPSED_LEASE, reason
        delta = karma_rules.for_lapsed_lease(island.karma_milli, rates)
    island.trigger_event(Island.KarmaChanged, delta_milli=delta, reason=reason, job_id=str(job_id),
                         karma_after_milli=island.karma_milli + delta, carry=carry, compute_ms=compute_ms,
                         timestamp=_ts(uow))
    return delta


def decline_in(uow: UnitOfWork, sched: SchedulerConfig, job_id: UUID, island_id: str, reason: str) -> Job:
    """The offer was rejected, expired (karma penalty) or its Island went offline."""
    job = load_job(uow, job_id)
    _own(job, island_id, _ONLY_ASSIGNED, "decline the offer")
    if reason == "ack_timeout":
        _karma_in(uow, sched.karma, island_id, karma_rules.REASON_MISSED_ACK, job_id)
    job.trigger_event(Job.OfferDeclined, island_id=island_id, reason=reason, timestamp=_ts(uow))
    return job


def clear_exclusions_in(uow: UnitOfWork, sched: SchedulerConfig, job_id: UUID, waited_ms: int) -> Job:
    """A stranded queued Job forgets which Islands failed it (bounded by
    `max_exclusion_clears`). No karma moves: the failures were paid for when they happened."""
    job = load_job(uow, job_id)
    job.require(_ONLY_QUEUED, "clear its exclusions")
    if not job.excluded:
        raise IllegalTransition(job_id, job.status, "no Island is excluded")
    if job.exclusion_clears >= sched.max_exclusion_clears:
        raise IllegalTransition(job_id, job.status, f"exclusions already cleared {sched.max_exclusion_clears} times")
    assert waited_ms >= 0
    job.trigger_event(Job.ExclusionsCleared, islands=list(job.excluded), waited_ms=waited_ms, timestamp=_ts(uow))
    return job


def lapse_in(uow: UnitOfWork, ledger_config: LedgerConfig, sched: SchedulerConfig, job_id: UUID,
             island_id: str, *, streamed: bool, reason: str = "lease_lapsed") -> Job:
    """A running Job's Island stopped reporting: re-queue if nothing was streamed and
    attempts remain, otherwise fail with a full release. Either way the Island loses karma."""
    job = load_job(uow, job_id)
    _own(job, island_id, _ONLY_RUNNING, "lapse")
    _karma_in(uow, sched.karma, island_id, karma_rules.REASON_LAPSED_LEASE, job_id)
    if not streamed and job.attempts + 1 < job.max_attempts:
        job.trigger_event(Job.Requeued, island_id=island_id, reason=reason, timestamp=_ts(uow))
    else:
        why = "the Island stopped mid-stream" if streamed else f"no Island finished the job in {job.max_attempts} attempts"
        release_hold_in(uow, uuid_of(job.account_id), str(job_id), "island_fault")
        job.trigger_event(Job.Failed, reason=f"{reason}: {why}", island_fault=True, charged_micro=0,
                          timestamp=_ts(uow))
    return job


# ----------------------------------------------------------------- island side
def accept_in(uow: UnitOfWork, job_id: UUID, island_id: str, lease_deadline_ms: int) -> Job:
    job = load_job(uow, job_id)
    if job.status == RUNNING and job.island_id == island_id:
        return job  # a repeated accept is harmless
    _own(job, island_id, _ONLY_ASSIGNED, "accept")
    job.trigger_event(Job.Started, island_id=island_id, lease_deadline_ms=lease_deadline_ms, timestamp=_ts(uow))
    return job


def reject_in(uow: UnitOfWork, sched: SchedulerConfig, job_id: UUID, island_id: str) -> Job:
    return decline_in(uow, sched, job_id, island_id, "rejected")


def check_usage(kind: str, usage: dict[str, Any]) -> dict[str, int]:
    if not isinstance(usage, dict):
        raise BadUsage("usage must be an object")
    out: dict[str, int] = {}
    keys = ("prompt_tokens", "completion_tokens") if kind == "chat" else ("steps",)
    for key in keys:
        v = usage.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_USAGE_TOKENS:
            raise BadUsage(f"usage.{key} must be an integer within 0..{MAX_USAGE_TOKENS}")
        out[key] = v
    if kind == "chat":
        out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def complete_in(uow: UnitOfWork, ledger_config: LedgerConfig, sched: SchedulerConfig, catalog: Catalog,
                job_id: UUID, island_id: str, usage: dict[str, Any], output: str, compute_ms: int) -> Job:
    """Settlement, earning, fee, karma and the Job's completion: one atomic save."""
    job = load_job(uow, job_id)
    if job.status == "completed" and job.island_id == island_id:
        return job  # a repeated completion is answered with the first outcome
    _own(job, island_id, _ONLY_RUNNING, "complete")
    clean = check_usage(job.kind, usage)
    if not isinstance(output, str) or len(output) > MAX_OUTPUT_CHARS:
        raise BadUsage(f"output must be a string of at most {MAX_OUTPUT_CHARS} characters")
    compute_ms = max(0, min(int(compute_ms), 7 * 86_400_000))
    cargo = catalog.by_slug(job.cargo)
    if job.kind == "chat":
        assert isinstance(cargo.pricing, ChatPricing)
        max_tokens = int(job.input.get("max_tokens") or 0)
        if max_tokens and clean["completion_tokens"] > max_tokens:
            clean["completion_tokens"] = max_tokens  # never bill beyond what was asked for
            clean["total_tokens"] = clean["prompt_tokens"] + max_tokens
        price = chat_price_micro(cargo.pricing, clean["prompt_tokens"], clean["completion_tokens"])
        tps = clean["completion_tokens"] * 1_000_000 // compute_ms if compute_ms else 0
    else:
        price = image_price_micro(cargo.pricing, job.input["width"], job.input["height"], job.input["steps"])
        tps = 0
    charged = settlement_micro(_at_clearing(job, price), job.hold_micro)
    # job.id, not job_id: the aggregate's own id remembers its text (store.clock.Id) when this
    # process created the Job; the caller's id was parsed from a message.
    post = post_hold_in(uow, ledger_config, uuid_of(job.account_id), str(job.id), charged, job.owner_account_id)
    _karma_in(uow, sched.karma, island_id, karma_rules.REASON_COMPLETED, job.id, compute_ms)
    if job.kind == "chat":
        try:
            _slow_in(uow, sched.karma, load_island(uow, uuid_of(island_id)), job, clean["completion_tokens"])
        except (NotYourJob, ValueError):
            pass
    clean["credits_used_micro"] = charged
    market = {"list_price_micro": price, "clearing_micro": job.clearing_micro} if job.budget_source else {}
    job.trigger_event(Job.Completed, usage=clean, output=output, charged_micro=charged,
                      earning_micro=post.earning_micro, fee_micro=post.fee_micro, compute_ms=compute_ms,
                      tokens_per_s_milli=tps, timestamp=_ts(uow), **market)
    return job


def fail_in(uow: UnitOfWork, ledger_config: LedgerConfig, sched: SchedulerConfig, job_id: UUID, island_id: str,
            reason: str, *, retryable: bool, streamed: bool) -> Job:
    """The Island reports failure. Retryable and nothing streamed: re-queue (Island
    excluded); otherwise fail with a full release. The Island loses karma either way."""
    job = load_job(uow, job_id)
    if job.status in TERMINAL:
        if job.island_id == island_id:
            return job
        raise NotYourJob(f"job {job_id} is not assigned to island {island_id}")
    _own(job, island_id, _ASSIGNED_OR_RUNNING, "fail")
    reason = str(reason)[:500] or "unspecified"
    _karma_in(uow, sched.karma, island_id, karma_rules.REASON_FAILURE, job_id)
    if retryable and not streamed and job.attempts + 1 < job.max_attempts:
        job.trigger_event(Job.Requeued, island_id=island_id, reason=f"island_failed: {reason}", timestamp=_ts(uow))
        return job
    release_hold_in(uow, uuid_of(job.account_id), str(job_id), "island_fault")
    job.trigger_event(Job.Failed, reason=reason, island_fault=True, charged_micro=0, timestamp=_ts(uow))
    return job


# ----------------------------------------------------------------- islands
def register_island_in(uow: UnitOfWork, sched: SchedulerConfig, island_id: UUID, owner_account_id: UUID,
                       name: str, token_hash: str, capabilities: dict[str, Any], *, approve: bool = False) -> Island:
    load_account(uow, owner_account_id)  # the owner must exist: that is who earns
    if uow.get_or_none(island_id) is not None:
        raise IslandExists(f"island {island_id} exists")
    approval = APPROVED if (approve or sched.auto_approve_islands) else "pending"
    island = Island._create(Island.Registered, id=island_id, owner_account_id=str(owner_account_id), name=name,
                            token_hash=token_hash, capabilities=capabilities, approval=approval,
                            karma_start_milli=sched.karma.start_milli, timestamp=_ts(uow))
    uow.add(island)
    return island


class KarmaAdjustment(NamedTuple):
    before_milli: int
    after_milli: int


def adjust_karma_in(uow: UnitOfWork, rates: karma_rules.KarmaRates, island_id: UUID, delta_milli: int, *,
                    by: str, reason: str) -> KarmaAdjustment:
    """An operator moves an Island's karma (decision 0041: the way back below a Cargo's
    karma gate). Floored like every penalty; refused if it would change nothing."""
    if not isinstance(delta_milli, int) or isinstance(delta_milli, bool):
        raise BadKarmaAdjustment("delta must be an integer number of milli-karma")
    if not 0 < abs(delta_milli) <= karma_rules.MAX_ADJUST_MILLI:
        raise BadKarmaAdjustment(f"delta must be non-zero and at most {karma_rules.MAX_ADJUST_MILLI // 1000} "
                                 f"karma either way")
    by, reason = (by or "").strip(), (reason or "").strip()
    if not by or not reason or len(by) > 64 or len(reason) > 500:
        raise BadKarmaAdjustment("an adjustment needs who (at most 64 characters) and why (at most 500)")
    island = load_island(uow, island_id)
    before = island.karma_shown_milli
    applied = karma_rules.for_adjustment(before, delta_milli, rates)
    if applied == 0:
        edge = "floor" if delta_milli < 0 else "ceiling"
        value = rates.floor_milli if delta_milli < 0 else rates.ceiling_milli
        raise BadKarmaAdjustment(f"karma is at the {edge} ({value / 1000:g}): nothing to change")
    rebase_karma_in(uow, island)
    island.trigger_event(Island.KarmaAdjusted, delta_milli=applied, reason=karma_rules.REASON_OPERATOR, job_id="",
                         karma_after_milli=before + applied, carry=island.karma_carry, compute_ms=0, by=by,
                         note=reason, timestamp=_ts(uow))
    assert rates.floor_milli <= island.karma_milli == before + applied <= rates.ceiling_milli
    return KarmaAdjustment(before, island.karma_milli)


def set_island_approval_in(uow: UnitOfWork, island_id: UUID, approved: bool, *, by: str, reason: str) -> Island:
    island = load_island(uow, island_id)
    target = APPROVED if approved else "suspended"
    if island.approval != target:
        island.trigger_event(Island.Approved if approved else Island.Suspended, by=by, reason=reason,
                             timestamp=_ts(uow))
    return island


def set_island_draining_in(uow: UnitOfWork, island_id: UUID, draining: bool, *, by: str, reason: str) -> bool:
    """Start or end a drain. Returns False (and writes nothing) if it already was so."""
    island = load_island(uow, island_id)
    if island.draining == draining:
        return False
    island.trigger_event(Island.DrainChanged, draining=draining, by=by, reason=reason, timestamp=_ts(uow))
    return True


def set_island_online_in(uow: UnitOfWork, island_id: UUID, online: bool, reason: str = "",
                         rates: karma_rules.KarmaRates | None = None) -> Island:
    """Online/offline; going offline closes an online interval, which earns uptime karma
    (decision 0051) when `rates` are given and a whole milli-karma was earned."""
    island = load_island(uow, island_id)
    if island.online != online:
        if online:
            island.trigger_event(Island.WentOnline, timestamp=_ts(uow))
        else:
            if rates is not None and island.online_since_ms:
                rebase_karma_in(uow, island)
                delta = karma_rules.for_uptime(island.karma_milli, uow.now_ms - island.online_since_ms, rates)
                if delta:
                    _karma_change(uow, island, delta, karma_rules.REASON_UPTIME, "", island.karma_carry, 0)
            island.trigger_event(Island.WentOffline, reason=reason, timestamp=_ts(uow))
    return island


def set_cargo_enabled_in(uow: UnitOfWork, catalog: Catalog, slug: str, enabled: bool, *, by: str,
                         reason: str) -> bool:
    """Flip a Cargo's kill switch. Returns False if it already was in that state."""
    cargo = catalog.by_slug(slug)  # UnknownCargo for a slug not in the catalog
    switch = uow.get_or_none(switch_id(slug))
    if switch is None:
        switch = CargoSwitch._create(CargoSwitch.Created, id=switch_id(slug), slug=slug, timestamp=_ts(uow))
        uow.add(switch)
    current = cargo.enabled if switch.enabled is None else switch.enabled
    if current == enabled and switch.enabled is not None:
        return False
    switch.trigger_event(CargoSwitch.Switched, enabled=enabled, by=str(by)[:128], reason=str(reason)[:500],
                         timestamp=_ts(uow))
    return True


def set_capabilities_in(uow: UnitOfWork, island_id: UUID, capabilities: dict[str, Any]) -> Island:
    island = load_island(uow, island_id)
    if island.capabilities != capabilities:
        island.trigger_event(Island.CapabilitiesChanged, capabilities=capabilities, timestamp=_ts(uow))
    return island



def pair_island_in(uow: UnitOfWork, sched: SchedulerConfig, island_id: UUID, owner_account_id: UUID, name: str,
                   token_hash: str, capabilities: dict[str, Any], *, agent_version: str, nats_user: str,
                   password_hash: str, by: str) -> Island:
    """An Island of the published agent, bound to its owner by a pairing code (NATS
    transport, decision 0055): registered (pending approval, as every Island), paired, and
    given its NATS credential, in one transaction. IslandExists if the id is taken."""
    island = register_island_in(uow, sched, island_id, owner_account_id, name, token_hash,
                                {**capabilities, "transport": "nats"})
    island.trigger_event(Island.Paired, host_id=str(island_id), transport="nats", agent_version=agent_version[:64],
                         timestamp=_ts(uow))
    island.trigger_event(Island.NatsCredentialIssued, user=nats_user, password_hash=password_hash, by=by[:64],
                         timestamp=_ts(uow))
    return island


def issue_nats_credential_in(uow: UnitOfWork, island_id: UUID, *, nats_user: str, password_hash: str,
                             by: str) -> Island:
    """A new NATS password for a paired Island (the old one stops working at the next
    NATS authorization reload)."""
    island = load_island(uow, island_id)
    if getattr(island, "transport", "websocket") != "nats":
        raise NotNatsIsland(f"island {island_id} does not use the NATS transport")
    island.trigger_event(Island.NatsCredentialIssued, user=nats_user, password_hash=password_hash, by=by[:64],
                         timestamp=_ts(uow))
    return island


# ----------------------------------------------------------------- the market
def set_asks_in(uow: UnitOfWork, island_id: UUID, asks_micro: dict[str, int], *, by: str) -> bool:
    """Replace an Island's asking prices (already validated). False, and nothing written,
    when they are what the Island already asks."""
    island = load_island(uow, island_id)
    if island.asks_micro == asks_micro:
        return False
    island.trigger_event(Island.AsksChanged, asks_micro=dict(asks_micro), by=str(by)[:128], timestamp=_ts(uow))
    return True


def set_bid_in(uow: UnitOfWork, account_id: str, slug: str, max_price_micro: int | None, *, by: str) -> bool:
    """Save (or, with None, delete) an account's bid for a Cargo. False when unchanged."""
    prefs = uow.get_or_none(bids_id(account_id))
    if prefs is None:
        if max_price_micro is None:
            return False
        prefs = BidPreferences._create(BidPreferences.Created, id=bids_id(account_id), account_id=account_id,
                                       timestamp=_ts(uow))
        uow.add(prefs)
    current = prefs.bids_micro.get(slug)
    if current == max_price_micro:
        return False
    if max_price_micro is None:
        prefs.trigger_event(BidPreferences.BidCleared, slug=slug, by=str(by)[:128], timestamp=_ts(uow))
    else:
        prefs.trigger_event(BidPreferences.BidSet, slug=slug, max_price_micro=max_price_micro, by=str(by)[:128],
                            timestamp=_ts(uow))
    return True


def set_surge_in(uow: UnitOfWork, active: bool, multiplier_permille: int, queued: int, free_slots: int) -> bool:
    """Switch the surge on or off (False, nothing written, when it already is so)."""
    surge = uow.get_or_none(SURGE_ID)
    if surge is None:
        surge = Surge._create(Surge.Created, id=SURGE_ID, timestamp=_ts(uow))
        uow.add(surge)
    if surge.active == active:
        return False
    surge.trigger_event(Surge.Switched, active=active, multiplier_permille=multiplier_permille if active else 1000,
                        queued=queued, free_slots=free_slots, timestamp=_ts(uow))
    return True
