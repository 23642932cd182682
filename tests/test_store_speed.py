"""The faster chain hashing must produce bit-identical hashes to the original
"archipelag-chain-v1" implementation (persisted in existing logs). The original is kept
here verbatim (`_old_*`) and compared over generated field dicts."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import chain
from store.chain import ChainedAggregate, chain_hash, event_chain_hash, verify_chains
from store.clock import ms_to_datetime

# ------------------------------------------------- the original implementation, verbatim
_OLD_TAG = "archipelag-chain-v1"
_OLD_EXCLUDED = frozenset({"originator_id", "originator_version", "chain"})


def _old_enc_hook(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in a chained event")


_OLD_ENCODER = msgspec.msgpack.Encoder(enc_hook=_old_enc_hook, order="sorted")


def _old_canonical_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in _OLD_EXCLUDED:
            continue
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).isoformat()
        out[key] = value
    return out


def _old_chain_hash(prev_hex: str, topic: str, originator_id: Any, version: int, fields: Mapping[str, Any]) -> str:
    payload = _OLD_ENCODER.encode([_OLD_TAG, prev_hex, topic, str(originator_id), version,
                                   _old_canonical_fields(fields)])
    return hashlib.blake2b(payload, digest_size=32).hexdigest()


# ------------------------------------------------------------------- strategies
class _SubDatetime(datetime):
    pass


class _SubUUID(uuid.UUID):
    def __str__(self) -> str:
        return "sub-" + super().__str__()


_ZONES = st.sampled_from([
    timezone.utc,
    timezone(timedelta(0)),
    timezone(timedelta(hours=2)),
    timezone(timedelta(hours=-5, minutes=-30)),
    timezone(timedelta(hours=13, minutes=45), "odd"),
])
aware = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=_ZONES)
utc_ms = st.integers(0, 7_000_000_000_000).map(ms_to_datetime)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=False), st.text(max_size=8),
    st.binary(max_size=8), st.uuids(), aware,
)
sortable_sets = st.one_of(st.sets(st.integers(-100, 100), max_size=4), st.frozensets(st.text(max_size=3), max_size=4))
values = st.recursive(
    st.one_of(scalars, sortable_sets),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=10,
)
top_level = st.one_of(values, aware, utc_ms, aware.map(lambda d: _SubDatetime.fromisoformat(d.isoformat())),
                      st.datetimes(min_value=datetime(1971, 1, 1)))  # naive too
keys = st.one_of(st.sampled_from(["timestamp", "originator_id", "originator_version", "chain", "amount_micro",
                                  "originator_topic"]), st.text(max_size=6))
field_dicts = st.dictionaries(keys, top_level, max_size=8)
timestamps = st.one_of(utc_ms, aware, st.none())
originator_ids = st.one_of(st.uuids(), st.uuids().map(lambda u: _SubUUID(int=u.int)), st.text(max_size=10),
                           st.integers())


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - both must fail the same way
        return ("error", type(exc))


@settings(max_examples=1500, deadline=None)
@given(prev=st.sampled_from(["", "ab" * 32]), oid=originator_ids, version=st.integers(1, 10**6),
       fields=field_dicts, timestamp=timestamps)
def test_chain_hash_is_bit_identical_to_the_original(prev: str, oid: Any, version: int, fields: dict[str, Any],
                                                     timestamp: datetime | None) -> None:
    if timestamp is not None:
        fields = {**fields, "timestamp": timestamp}
    topic = "tests.topic:Agg.Event"
    old = _outcome(_old_chain_hash, prev, topic, oid, version, fields)
    assert _outcome(chain_hash, prev, topic, oid, version, fields) == old
    # Twice: the second call may take the cached timestamp text.
    assert _outcome(chain_hash, prev, topic, oid, version, dict(fields)) == old
    assert _outcome(chain.canonical_fields, fields) == _outcome(_old_canonical_fields, fields)


@settings(max_examples=300, deadline=None)
@given(instants=st.lists(st.tuples(st.integers(0, 5_000), _ZONES, st.integers(0, 999)), min_size=1, max_size=20))
def test_equal_instants_in_other_zones_hash_as_the_original(instants: list[tuple[int, timezone, int]]) -> None:
    """Runs of equal and nearly equal instants, some in UTC and some not, exercise the
    one-entry timestamp cache."""
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for ms, zone, micro in instants:
        ts = (base + timedelta(milliseconds=ms, microseconds=micro)).astimezone(zone)
        fields = {"timestamp": ts, "n": ms}
        assert chain_hash("", "t:T", "id", 1, fields) == _old_chain_hash("", "t:T", "id", 1, fields)


class _Counter(ChainedAggregate):
    def __init__(self, n: int) -> None:
        self.n = n

    class Bumped(ChainedAggregate.Event):
        by: int
        note: str
        tags: list

        def apply(self, aggregate: Any) -> None:
            aggregate.n += self.by


def _definition_v2(prev: str, topic: str, oid: Any, version: int, fields: dict[str, Any]) -> str:
    """Scheme 2 as decision 0073 words it, written out with msgspec and hashlib alone."""
    body = msgspec.msgpack.encode({k: v for k, v in fields.items()
                                   if k not in ("originator_id", "originator_version", "chain")})
    head = msgspec.msgpack.encode(["archipelag-chain-v2", prev, topic, str(oid), version])
    return "v2:" + hashlib.blake2b(head + body, digest_size=32).hexdigest()


def test_aggregate_events_carry_scheme_2_hashes() -> None:
    agg = _Counter._create(_Counter.Created, id=uuid.UUID(int=42), n=1, timestamp=ms_to_datetime(1_700_000_000_000))
    assert isinstance(agg, _Counter)
    for i in range(20):
        agg.trigger_event(_Counter.Bumped, by=i, note="x" * i, tags=[i, {"k": i}],
                          timestamp=ms_to_datetime(1_700_000_000_000 + i // 3))
    agg.trigger_event(_Counter.Bumped, by=1, note="now", tags=[])  # the library's own timestamp
    events = agg.collect_events() + _Counter(n=5).collect_events()
    heads: dict[Any, str] = {}
    for event in events:
        prev = heads.get(event.originator_id, "")
        expected = _definition_v2(prev, chain.get_topic(type(event)), event.originator_id,
                                  event.originator_version, event.__dict__)
        assert event.chain == expected
        assert event_chain_hash(prev, event) == expected
        heads[event.originator_id] = event.chain
    report = verify_chains(enumerate(events, start=1))
    assert report.ok and report.chained_events == len(events)


@pytest.mark.parametrize("tz", [timezone.utc, timezone(timedelta(hours=3))])
def test_a_changed_field_changes_the_hash(tz: timezone) -> None:
    fields = {"timestamp": datetime(2026, 5, 1, 12, tzinfo=tz), "amount": 5}
    h = chain_hash("", "t:T", uuid.UUID(int=7), 1, fields)
    assert h == _old_chain_hash("", "t:T", uuid.UUID(int=7), 1, fields)
    assert h != chain_hash("", "t:T", uuid.UUID(int=7), 1, {**fields, "amount": 6})
    assert h != chain_hash("", "t:T", uuid.UUID(int=7), 1, {**fields, "timestamp": fields["timestamp"]
                                                             + timedelta(microseconds=1)})


# ------------------------------------------------------------------ scheme 2's one encoding
@pytest.mark.parametrize("n", [0, 1, 14, 15, 16, 17, 65_534, 65_535, 65_536])
def test_with_chain_is_the_encoding_of_the_map_with_the_chain_last(n: int) -> None:
    """Every MessagePack map header size, and each step from one to the next."""
    from store.chain import with_chain
    from store.transcoder import state_encoder

    enc = state_encoder()
    fields = {f"f{i}": i for i in range(n)}
    h = "v2:" + "ab" * 32
    assert with_chain(enc.encode(fields), h) == enc.encode({**fields, "chain": h})


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20) | st.datetimes(timezones=st.just(timezone.utc)) | st.uuids(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner) | st.frozensets(st.integers(-(2**63), 2**63), max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(fields=st.dictionaries(st.text(max_size=10), _values, max_size=8))
def test_decoding_and_encoding_again_gives_the_stored_bytes(fields: dict[str, Any]) -> None:
    """What `verify` relies on for scheme 2: the body recomputed from a decoded event is
    the body that was hashed, for every kind of value an event can hold."""
    from store.transcoder import MsgspecTranscoder

    t = MsgspecTranscoder()
    stored = t.encode(fields)
    assert t.encode(t.decode(stored)) == stored


def test_the_mapper_takes_each_encoded_state_once_and_stores_those_bytes() -> None:
    from store.mapper import FastMapper
    from store.transcoder import MsgspecTranscoder

    mapper = FastMapper(MsgspecTranscoder())
    agg = _Counter._create(_Counter.Created, id=uuid.UUID(int=43), n=1, timestamp=ms_to_datetime(1_700_000_000_000))
    agg.trigger_event(_Counter.Bumped, by=2, note="n", tags=[1, {"k": frozenset({3, 1})}])
    events = agg.collect_events()
    waiting = [chain._ENCODED.get(id(e)) for e in events]
    assert all(w is not None and w[0] is e for w, e in zip(waiting, events, strict=True))
    stored = [mapper.to_stored_event(e) for e in events]
    assert all(chain.take_encoded_state(e) is None for e in events)  # taken, once
    again = [mapper.to_stored_event(e) for e in events]  # encoded the long way now
    assert [s.state for s in stored] == [s.state for s in again]
    decoded = [mapper.to_domain_event(s) for s in stored]
    assert [d.chain for d in decoded] == [e.chain for e in events]
    assert decoded[1].tags == [1, {"k": list(frozenset({3, 1}))}]  # a set is stored as an array
    assert verify_chains(enumerate(decoded, start=1)).ok


@pytest.mark.parametrize("bound", ["entries", "bytes"])
def test_encoded_states_never_stored_are_bounded(bound: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if bound == "entries":
        monkeypatch.setattr(chain, "MAX_ENCODED_WAITING", 8)
    else:
        monkeypatch.setattr(chain, "MAX_ENCODED_BYTES", 10_000)
    try:
        agg = _Counter._create(_Counter.Created, id=uuid.UUID(int=44), n=1)
        for i in range(30):  # never collected nor mapped, like the events of a command that failed
            agg.trigger_event(_Counter.Bumped, by=i, note="x" * 1_000, tags=[])
        assert len(chain._ENCODED) <= 10
        assert sum(len(state) for _, state in chain._ENCODED.values()) < 10_000 + 2_000
        assert chain._encoded_bytes == sum(len(state) for _, state in chain._ENCODED.values())
    finally:
        chain._ENCODED.clear()
        chain._encoded_bytes = 0
