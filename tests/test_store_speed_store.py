"""The faster mapper and in-memory recorder must store exactly what the library's do:
identical StoredEvent bytes, the same notification ids, the same IntegrityErrors."""

from __future__ import annotations

import uuid
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, Mapper, StoredEvent
from eventsourcing.popo import POPOApplicationRecorder
from hypothesis import given, settings
from hypothesis import strategies as st

from store.chain import ChainedAggregate
from store.factory import MEMORY_URL, StoreConfig, open_app
from store.mapper import FastMapper
from store.memory_recorder import FastPOPOApplicationRecorder
from store.transcoder import MsgspecTranscoder


class Thing(Aggregate):
    class Happened(Aggregate.Event):
        pass

    class Upgraded(Aggregate.Event):
        class_version = 3


class Chained(ChainedAggregate):
    class Happened(ChainedAggregate.Event):
        pass


EVENT_CLASSES = [Thing.Happened, Thing.Upgraded, Chained.Happened]

values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=6), st.binary(max_size=6), st.uuids(),
              st.datetimes(timezones=st.just(timezone.utc)), st.sets(st.integers(0, 9), max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8,
)
states = st.dictionaries(st.text(max_size=8), values, max_size=6)


def _event(cls: type, originator_id: Any, version: int, state: dict[str, Any]) -> Any:
    event = object.__new__(cls)
    # The id and version anywhere in the key order, as decoded or constructed events have them.
    d = {"originator_id": originator_id, **state, "originator_version": version}
    object.__setattr__(event, "__dict__", d)
    return event


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001
        return ("error", type(exc))


@settings(max_examples=600, deadline=None)
@given(cls=st.sampled_from(EVENT_CLASSES), oid=st.one_of(st.uuids(), st.text(max_size=8)),
       version=st.integers(1, 10**9), state=states)
def test_fast_mapper_stores_the_same_bytes(cls: type, oid: Any, version: int, state: dict[str, Any]) -> None:
    transcoder = MsgspecTranscoder()
    event = _event(cls, oid, version, state)
    ours = _outcome(FastMapper(transcoder).to_stored_event, event)
    theirs = _outcome(Mapper(transcoder).to_stored_event, event)
    assert ours == theirs
    if ours[0] == "ok" and isinstance(oid, uuid.UUID):
        stored = ours[1]
        assert type(stored) is StoredEvent and repr(stored) == repr(theirs[1]) and hash(stored) == hash(theirs[1])
        # And the library reads it back.
        back = Mapper(transcoder).to_domain_event(stored)
        assert type(back) is cls and back.originator_version == version


def test_fast_mapper_takes_the_library_path_with_a_compressor() -> None:
    transcoder = MsgspecTranscoder()
    event = _event(Thing.Upgraded, uuid.uuid4(), 2, {"a": 1, "timestamp": datetime.now(timezone.utc)})
    ours = FastMapper(transcoder, compressor=zlib).to_stored_event(event)
    assert ours == Mapper(transcoder, compressor=zlib).to_stored_event(event)
    assert ours != FastMapper(transcoder).to_stored_event(event)


def test_the_store_is_configured_with_them(tmp_path: Path) -> None:
    app = open_app(StoreConfig(database_url=MEMORY_URL, data_dir=tmp_path))
    assert type(app.mapper) is FastMapper and type(app.recorder) is FastPOPOApplicationRecorder
    sqlite = open_app(StoreConfig(database_url=None, data_dir=tmp_path))
    assert type(sqlite.mapper) is FastMapper


# ------------------------------------------------------------------ the in-memory recorder
IDS = [uuid.UUID(int=i + 1) for i in range(3)]
batches = st.lists(st.lists(st.tuples(st.sampled_from(IDS + [str(IDS[0])]), st.integers(1, 4)), min_size=1,
                            max_size=4), max_size=12)


def _apply(recorder: Any, batch_list: list[list[tuple[Any, int]]]) -> list[Any]:
    out = []
    for batch in batch_list:
        stored = [StoredEvent(originator_id=oid, originator_version=v, topic="t:T", state=f"{oid}{v}".encode())
                  for oid, v in batch]
        try:
            out.append(("ok", list(recorder.insert_events(stored))))
        except IntegrityError as exc:
            out.append(("integrity", str(exc)))
    out.append(recorder.select_notifications(start=1, limit=1_000))
    out.append(recorder.max_notification_id())
    for oid in IDS + [str(IDS[1])]:
        out.append(recorder.select_events(oid))
        out.append(recorder.select_events(oid, gt=1, lte=3, desc=True, limit=2))
    return out


@settings(max_examples=400, deadline=None)
@given(batch_list=batches)
def test_fast_memory_recorder_matches_the_library(batch_list: list[list[tuple[Any, int]]]) -> None:
    assert _apply(FastPOPOApplicationRecorder(), batch_list) == _apply(POPOApplicationRecorder(), batch_list)


def test_duplicates_are_refused_and_nothing_of_the_batch_is_written() -> None:
    r = FastPOPOApplicationRecorder()
    ev = [StoredEvent(IDS[0], 1, "t:T", b"a"), StoredEvent(IDS[1], 1, "t:T", b"b")]
    assert r.insert_events(ev) == [1, 2]
    with pytest.raises(IntegrityError, match="already recorded"):
        r.insert_events([StoredEvent(IDS[2], 1, "t:T", b"c"), StoredEvent(IDS[0], 1, "t:T", b"d")])
    with pytest.raises(IntegrityError, match="not unique"):
        r.insert_events([StoredEvent(IDS[2], 1, "t:T", b"c"), StoredEvent(IDS[2], 1, "t:T", b"d")])
    assert r.max_notification_id() == 2
    assert r.insert_events([StoredEvent(IDS[2], 1, "t:T", b"c")]) == [3]


def test_an_application_log_is_byte_identical_with_the_library_store(tmp_path: Path) -> None:
    """The same aggregates saved through our store and through the library's defaults."""
    from eventsourcing.application import Application

    ts = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ours = open_app(StoreConfig(database_url=MEMORY_URL, data_dir=tmp_path))
    theirs = Application(env={"TRANSCODER_TOPIC": "store.transcoder:MsgspecTranscoder",
                              "PERSISTENCE_MODULE": "eventsourcing.popo"})
    for app in (ours, theirs):
        for i in range(5):
            agg = Chained._create(Chained.Created, id=uuid.UUID(int=100 + i), timestamp=ts)
            for k in range(i):
                agg.trigger_event(Chained.Happened, timestamp=ts + timedelta(milliseconds=k))
            app.save(agg)
    assert (ours.recorder.select_notifications(start=1, limit=100)
            == theirs.recorder.select_notifications(start=1, limit=100))
