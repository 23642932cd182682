"""Shortcuts on the event write path must not change an event or an aggregate:

- `ChainedAggregate.trigger_event` / `Event.mutate` / `Created.mutate` (one frame instead
  of the library's trigger_event and a super() chain) against reference code swapped in
  with monkeypatch: the library's trigger_event with the chain hash by its definition
  (scheme 2, over the fields the library's event holds), and the original mutate;
- `store.clock.ms_to_datetime` (a one-entry cache) against its definition;
- the unit of work's `_collect_events` against the library's `collect_events()`;
- inline `execute` / `query` (no settled future) against `submit(...).result()`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from eventsourcing.domain import Aggregate, OriginatorIDError, OriginatorVersionError
from eventsourcing.utils import get_topic
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.jobs import Job
from store import clock
from store.chain import GENESIS, ChainedAggregate, chain_hash, chain_hash_v2, state_body
from store.clock import EPOCH, ManualClock, ms_to_datetime


# ------------------------------------------------- the original code, verbatim
def _old_event_mutate(self: Any, aggregate: Any) -> Any:
    agg = super(ChainedAggregate.Event, self).mutate(aggregate)
    agg.chain_head = self.__dict__.get("chain", GENESIS)
    return agg


def _v1_original_trigger_event(self: Any, event_class: Any, **kwargs: Any) -> None:
    """The first chained trigger_event, verbatim (scheme 1, over the given arguments only)."""
    if kwargs.get("timestamp") is None:
        kwargs["timestamp"] = event_class.create_timestamp()
    kwargs["chain"] = chain_hash(self.chain_head, get_topic(event_class), self.id, self.version + 1, kwargs)
    super(ChainedAggregate, self).trigger_event(event_class, **kwargs)


def _reference_trigger_event(self: Any, event_class: Any, **kwargs: Any) -> None:
    """Scheme 2 by its definition: the body is every field of the event the library's
    dataclass `__init__` builds (defaults included, declaration order), less the originator
    id, version and chain; then the library's trigger_event with that hash."""
    if kwargs.get("timestamp") is None:
        kwargs["timestamp"] = event_class.create_timestamp()
    version = self.version + 1
    probe = event_class(originator_id=self.id, originator_version=version, chain="", **kwargs)
    kwargs["chain"] = chain_hash_v2(self.chain_head, get_topic(event_class), self.id, version, state_body(vars(probe)))
    super(ChainedAggregate, self).trigger_event(event_class, **kwargs)


@contextmanager
def old_code(trigger: Any = _reference_trigger_event) -> Iterator[None]:
    """ChainedAggregate runs the reference trigger_event and the original mutate inside this block."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChainedAggregate.Event, "mutate", _old_event_mutate)
        mp.delattr(ChainedAggregate.Created, "mutate")  # Created inherited Event.mutate
        mp.setattr(ChainedAggregate, "trigger_event", trigger)
        yield


# ------------------------------------------------------------------- strategies
_text = st.text(max_size=12)
_small = st.integers(min_value=-(2**40), max_value=2**40)
_json = st.recursive(st.none() | st.booleans() | _small | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
_event = st.one_of(
    st.tuples(st.just(Job.Queued), st.fixed_dictionaries({})),
    st.tuples(st.just(Job.Assigned), st.fixed_dictionaries({
        "island_id": _text, "owner_account_id": _text, "ack_deadline_ms": _small,
        "score": st.dictionaries(_text, _json, max_size=4), "candidates": _small,
        # Every field is given, defaults included: the original hashed only the given ones
        # (see test_an_event_without_its_defaulted_fields_verifies).
        "ask_micro": _small, "surge_permille": _small, "clearing_micro": _small, "cargo": _text})),
    st.tuples(st.just(Job.OfferDeclined), st.fixed_dictionaries({"island_id": _text, "reason": _text})),
    st.tuples(st.just(Job.Started), st.fixed_dictionaries({"island_id": _text, "lease_deadline_ms": _small})),
    st.tuples(st.just(Job.Requeued), st.fixed_dictionaries({"island_id": _text, "reason": _text})),
    st.tuples(st.just(Job.Completed), st.fixed_dictionaries({
        "usage": st.dictionaries(_text, _small, max_size=3), "output": _text, "charged_micro": _small,
        "earning_micro": _small, "fee_micro": _small, "compute_ms": _small, "tokens_per_s_milli": _small,
        "list_price_micro": _small, "clearing_micro": _small})),
    st.tuples(st.just(Job.Cancelled), st.fixed_dictionaries({
        "by": _text, "stage": _text, "charged_micro": _small, "usage": st.dictionaries(_text, _small, max_size=2)})),
)
_ms = st.integers(min_value=0, max_value=4_000_000_000_000)


def _run(seed: int, created_ms: int, steps: list[tuple[type, dict[str, Any], int]]) -> tuple[Any, list[Any]]:
    job = Job._create(Job.Submitted, id=uuid.UUID(int=seed), account_id="acct", cargo="c", cargo_id=1,
                      kind="chat", model="m", input={"prompt": "p"}, prefs={}, hold_micro=5, max_attempts=3,
                      status="queued", parent_id="", batch_index=-1, idem_fp="", timestamp=ms_to_datetime(created_ms))
    for cls, fields, ms in steps:
        job.trigger_event(cls, timestamp=ms_to_datetime(ms), **fields)
    return job, job.collect_events()


def _state(agg: Any) -> dict[str, Any]:
    return {k: v for k, v in agg.__dict__.items() if k != "_pending_events"}


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**128 - 1), created_ms=_ms,
       steps=st.lists(st.tuples(_event, _ms).map(lambda t: (t[0][0], t[0][1], t[1])), max_size=8))
def test_trigger_and_mutate_build_what_the_original_built(seed: int, created_ms: int,
                                                          steps: list[tuple[type, dict[str, Any], int]]) -> None:
    new_job, new_events = _run(seed, created_ms, steps)
    with old_code():
        old_job, old_events = _run(seed, created_ms, steps)
    assert [type(e) for e in new_events] == [type(e) for e in old_events]
    for new, old in zip(new_events, old_events, strict=True):
        assert vars(new) == vars(old)  # same fields and values
        # the same order, but the chain last (where the stored state has it, see store.chain)
        assert list(vars(new)) == [k for k in vars(old) if k != "chain"] + ["chain"]
    assert _state(new_job) == _state(old_job)
    # Replaying the events (decoded-log path: mutate on an aggregate built from them) agrees too.
    replay_new = None
    for e in new_events:
        replay_new = e.mutate(replay_new)
    with old_code():
        replay_old = None
        for e in old_events:
            replay_old = e.mutate(replay_old)
    assert _state(replay_new) == _state(replay_old) == _state(new_job)


@pytest.mark.parametrize("old", [False, True])
def test_an_event_without_its_defaulted_fields_verifies(old: bool) -> None:
    """The chain hash covers every field, defaults included, because `verify_chains`
    recomputes it from the stored event, which holds the defaults. The first chained
    code (scheme 1) hashed only the keyword arguments given, so an event that left a
    defaulted field out (here `Job.Assigned` without its four market fields) did not verify."""
    from store.chain import verify_chains

    def events() -> list[Any]:
        _, evs = _run(3, 1_700_000_000_000, [(Job.Assigned, {"island_id": "i", "owner_account_id": "o",
                                                             "ack_deadline_ms": 5, "score": {}, "candidates": 1},
                                              1_700_000_000_001)])
        return evs

    if old:
        with old_code(_v1_original_trigger_event):
            evs = events()
    else:
        evs = events()
    assert vars(evs[1])["ask_micro"] == -1 and vars(evs[1])["cargo"] == ""  # the defaults are in the event
    report = verify_chains(enumerate(evs, start=1))
    assert report.chained_events == 2
    assert report.ok is (not old), report.breaks


def test_a_missing_or_unknown_field_is_a_type_error_and_changes_nothing() -> None:
    job, _ = _run(4, 1_700_000_000_000, [])
    before = _state(job)
    with pytest.raises(TypeError, match=r"missing required argument\(s\) \['island_id'\]"):
        job.trigger_event(Job.Started, lease_deadline_ms=5)
    with pytest.raises(TypeError, match="unexpected keyword"):
        job.trigger_event(Job.Started, island_id="i", lease_deadline_ms=5, colour="red")
    assert _state(job) == before and job.version == 1


@pytest.mark.parametrize("old", [False, True])
def test_mutate_refuses_a_foreign_or_out_of_sequence_event_like_the_original(old: bool) -> None:
    def attempt() -> list[str]:
        job, _ = _run(7, 1_700_000_000_000, [])
        other, _ = _run(8, 1_700_000_000_000, [])
        before = _state(job)
        ts = ms_to_datetime(1_700_000_000_001)
        outcomes = []
        for ev in (Job.Queued(originator_id=other.id, originator_version=2, timestamp=ts, chain="x"),
                   Job.Queued(originator_id=uuid.UUID(int=7), originator_version=3, timestamp=ts, chain="x")):
            with pytest.raises((OriginatorIDError, OriginatorVersionError)) as info:
                ev.mutate(job)
            outcomes.append(type(info.value).__name__)
            assert _state(job) == before  # nothing applied
        return outcomes

    if old:
        with old_code():
            assert attempt() == ["OriginatorIDError", "OriginatorVersionError"]
    else:
        assert attempt() == ["OriginatorIDError", "OriginatorVersionError"]


def test_explicit_topic_aggregates_still_take_the_library_path() -> None:
    assert ChainedAggregate.trigger_event is not Aggregate.trigger_event
    assert not getattr(Job, "TOPIC", None)  # ours use the one-frame path


# ------------------------------------------------------------------- ms_to_datetime
@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_ms, st.integers(min_value=-(10**12), max_value=10**13), st.sampled_from([0, 1, 0.0])),
                max_size=20))
def test_ms_to_datetime_equals_its_definition(values: list[Any]) -> None:
    for ms in values + values[::-1]:  # repeats hit the cache
        got = ms_to_datetime(ms)
        assert got == EPOCH + timedelta(milliseconds=ms)
        assert got.tzinfo is EPOCH.tzinfo
        assert clock._last_ms_dt[1] == EPOCH + timedelta(milliseconds=clock._last_ms_dt[0])


def test_ms_to_datetime_cache_is_not_fooled_by_equal_non_ints() -> None:
    ms_to_datetime(5)
    assert ms_to_datetime(5.4) == EPOCH + timedelta(milliseconds=5.4)  # not the cached 5
    ms_to_datetime(5)
    with pytest.raises(TypeError):  # equal to the cached 5, but timedelta refuses it: so must we
        ms_to_datetime(Decimal(5))


# ------------------------------------------------------------------- unit of work
def _committer(inline: bool) -> Any:
    from pathlib import Path

    from store.factory import MEMORY_URL, StoreConfig, open_app
    from store.unit_of_work import GroupCommitter

    app = open_app(StoreConfig(database_url=MEMORY_URL, data_dir=Path(".")))
    return GroupCommitter(app, ManualClock(), inline=inline)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=5))
def test_collect_events_takes_what_collect_events_returned(counts: list[int]) -> None:
    from store.unit_of_work import UnitOfWork, _collect_events

    def build() -> tuple[UnitOfWork, list[Any]]:
        uow = UnitOfWork(_committer(True), 1_700_000_000_000)
        jobs = []
        for i, n in enumerate(counts):
            job, _ = _run(i + 1, 1_700_000_000_000, [(Job.Queued, {}, 1_700_000_000_000 + k) for k in range(n)])
            job.trigger_event(Job.Queued, timestamp=ms_to_datetime(5))
            if n == 0:
                job.collect_events()  # nothing pending
            uow._staged[job.id] = job
            jobs.append(job)
        return uow, jobs

    uow, _ = build()
    expected = [e for a in uow._staged.values() if a._pending_events for e in a.collect_events()]
    uow2, jobs2 = build()
    got = _collect_events(uow2)
    assert [list(vars(e).items()) for e in got] == [list(vars(e).items()) for e in expected]
    assert all(j._pending_events == [] for j in jobs2)


class _Boom(Exception):
    pass


def test_inline_execute_and_query_answer_as_the_settled_future() -> None:
    committer = _committer(True)
    job_id = uuid.UUID(int=99)

    def create(uow: Any) -> str:
        job, _ = _run(99, 1_700_000_000_000, [])
        uow.add(job)
        return "made"

    def refuse(uow: Any) -> None:
        uow.get(job_id)
        raise _Boom("no")

    assert committer.execute(create) == "made"
    assert committer.query(lambda uow: uow.get(job_id).version) == committer.submit(
        lambda uow: uow.get(job_id).version, read_only=True).result() == 1
    with pytest.raises(_Boom):
        committer.execute(refuse)
    with pytest.raises(_Boom):
        committer.submit(refuse).result()
    with pytest.raises(AssertionError, match="a query changed state"):
        committer.query(lambda uow: uow.get(job_id).trigger_event(Job.Queued, timestamp=ms_to_datetime(1)))
    committer.close()
    from store.unit_of_work import CommitterClosed

    with pytest.raises(CommitterClosed):
        committer.execute(create)
    with pytest.raises(CommitterClosed):
        committer.query(lambda uow: None)


def _all_chained_event_classes() -> list[type]:
    import scheduler.cargo_switch  # noqa: F401 - every aggregate module, so that every event class exists
    import scheduler.islands  # noqa: F401
    import scheduler.market  # noqa: F401
    import ledger.accounts  # noqa: F401

    aggregates: list[type] = []
    todo = [ChainedAggregate]
    while todo:
        for sub in todo.pop().__subclasses__():
            aggregates.append(sub)
            todo.append(sub)
    # The event classes an aggregate names (its nested classes, as the library rebuilt them).
    found = {v for agg in aggregates for v in vars(agg).values()
             if isinstance(v, type) and issubclass(v, ChainedAggregate.Event)}
    return sorted((c for c in found if c.__module__.split(".")[0] in {"scheduler", "ledger"}),
                  key=lambda c: c.__qualname__)


def test_every_event_class_is_built_as_its_dataclass_init_builds_it() -> None:
    """`_body_dict` + `_build_event` against the frozen dataclass `__init__`, for every
    chained event class of ours: the same attributes (the chain moved last), defaults
    filled; and the state the mapper takes is what encoding the event would give."""
    import dataclasses

    from store.chain import _body_dict, _build_event, _spec, _STATE_ENCODER, with_chain

    classes = _all_chained_event_classes()
    assert len(classes) > 30  # Job, Island, Account, market events
    oid = uuid.UUID(int=99)
    for cls in classes:
        given = {f.name: f"v-{f.name}" for f in dataclasses.fields(cls)
                 if f.default is dataclasses.MISSING and f.name not in ("originator_id", "originator_version", "chain")}
        given.update(timestamp=ms_to_datetime(5))
        if "originator_topic" in given:
            given["originator_topic"] = "x:Y"
        by_init = cls(originator_id=oid, originator_version=2, chain="c", **given)
        body_state = _body_dict(_spec(cls), cls, dict(given))
        ours = _build_event(cls, {"originator_id": oid, "originator_version": 2, **body_state, "chain": "c"})
        assert list(vars(ours)) == [k for k in vars(by_init) if k != "chain"] + ["chain"], cls
        assert vars(ours) == vars(by_init) and ours == by_init, cls
        state = {k: v for k, v in vars(ours).items() if k not in ("originator_id", "originator_version")}
        assert with_chain(_STATE_ENCODER.encode(body_state), "c") == _STATE_ENCODER.encode(state), cls
