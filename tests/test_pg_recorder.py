"""The PostgreSQL recorder's own insert (store/pg_recorder.py: four plain arrays in the
binary parameter format) against real PostgreSQL: what it writes reads back byte for byte,
notification ids follow insert order, a duplicate (originator_id, version) is refused with
nothing written, and the library's own composite-array insert reads back the same."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from eventsourcing.persistence import IntegrityError, StoredEvent
from psycopg.rows import tuple_row

from store.factory import open_app
from store.pg_recorder import FastPostgresApplicationRecorder


def _events(n: int, *, start_version: int = 1, oid: uuid.UUID | None = None) -> list[StoredEvent]:
    out = []
    for i in range(n):
        # bytes that text-format escaping would have to handle: NUL, backslash, quotes, high bytes
        state = bytes([0, 92, 34, 39, 123, 125, 44, 255]) + os.urandom(i % 50) + f"{i}".encode()
        out.append(StoredEvent(originator_id=oid or uuid.uuid4(), originator_version=start_version + i,
                               topic=f"tests.topic:T{i % 3}", state=state))
    return out


@pytest.fixture
def rec(pg_store_config):
    app = open_app(pg_store_config)
    try:
        yield app.recorder
    finally:
        app.close()


def test_insert_reads_back_exactly_in_order(rec):
    assert isinstance(rec, FastPostgresApplicationRecorder)
    batch = _events(150)
    ids = rec.insert_events(batch)
    assert ids == sorted(ids) and len(set(ids)) == 150
    got = rec.select_notifications(start=ids[0], limit=1000)
    assert [(n.originator_id, n.originator_version, n.topic, bytes(n.state)) for n in got] == \
        [(e.originator_id, e.originator_version, e.topic, e.state) for e in batch]
    assert [n.id for n in got] == ids
    # one stream, many versions in one batch, then the next batch on it
    oid = uuid.uuid4()
    rec.insert_events(_events(5, oid=oid))
    rec.insert_events(_events(3, oid=oid, start_version=6))
    assert [e.originator_version for e in rec.select_events(oid)] == list(range(1, 9))


def test_duplicate_version_is_refused_and_nothing_is_written(rec):
    oid = uuid.uuid4()
    rec.insert_events(_events(2, oid=oid))
    before = rec.max_notification_id()
    with pytest.raises(IntegrityError):
        rec.insert_events(_events(1) + _events(1, oid=oid, start_version=2))
    assert rec.max_notification_id() == before
    assert len(rec.select_events(oid)) == 2


def test_library_insert_and_ours_write_the_same_rows(rec):
    ours, theirs = _events(20), _events(20)
    rec.insert_events(ours)
    with rec.datastore.transaction(commit=True) as curs:  # the library's composite-array insert
        super(FastPostgresApplicationRecorder, rec)._insert_stored_events(curs, theirs)
    got = rec.select_notifications(start=1, limit=100)
    assert [(n.originator_id, n.originator_version, n.topic, bytes(n.state)) for n in got] == \
        [(e.originator_id, e.originator_version, e.topic, e.state) for e in ours + theirs]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.uuids(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
                               st.text(max_size=40).filter(lambda t: "\x00" not in t), st.binary(max_size=300)),
                     min_size=1, max_size=30))
def test_packed_arrays_carry_exactly_what_psycopg_lists_carry(rec, rows):
    """store/pg_arrays.py against psycopg's own binary list dumping, through PostgreSQL:
    the same rows come back (UUIDs, the int8 range's ends, any text but NUL, any bytes)."""
    from store import pg_arrays

    ids, versions, topics, states = (list(c) for c in zip(*rows, strict=True))
    query = "SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[])"
    with rec.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
        pg_arrays.register(cur.adapters)
        packed = cur.execute(query, (pg_arrays.uuid_array(ids), pg_arrays.int8_array(versions),
                                     pg_arrays.text_array(topics), pg_arrays.bytea_array(states))).fetchall()
        lists = cur.execute(query, (ids, versions, topics, states)).fetchall()
    assert packed == lists == [tuple(r) for r in rows]
