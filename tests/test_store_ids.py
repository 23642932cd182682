"""`store.clock.Id`: a UUID that caches its hash and text must be indistinguishable from
the plain `uuid.UUID(int=..., version=4)` it replaces (equality both ways, hash, text,
bytes, version bits, pickling, copying, msgspec bytes), so logs and digests do not change."""

from __future__ import annotations

import copy
import pickle
import uuid

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from store.clock import Id, RandomIds, SeededIds, id_from_int, version4_id


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_version4_id_is_the_plain_uuid(bits):
    plain = uuid.UUID(int=bits, version=4)
    fast = version4_id(bits)
    assert isinstance(fast, uuid.UUID) and type(fast) is Id
    assert fast == plain and plain == fast and not (fast != plain)
    assert hash(fast) == hash(plain) and str(fast) == str(plain) and str(fast) == str(plain)  # cached 2nd time
    assert (fast.int, fast.bytes, fast.hex, fast.version, fast.variant) == (
        plain.int, plain.bytes, plain.hex, plain.version, plain.variant)
    assert {plain: 1}[fast] == 1 and {fast: 2}[plain] == 2
    assert msgspec.msgpack.encode(fast) == msgspec.msgpack.encode(plain)
    assert msgspec.json.encode(fast) == msgspec.json.encode(plain)
    for clone in (pickle.loads(pickle.dumps(fast)), copy.copy(fast), copy.deepcopy(fast)):
        assert clone == plain and hash(clone) == hash(plain) and str(clone) == str(plain)


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_id_from_int_keeps_every_bit(value):
    assert id_from_int(value).int == value == uuid.UUID(int=value).int


def test_id_sources_yield_ids_and_seeded_ones_repeat():
    a, b = SeededIds(7), SeededIds(7)
    first = [a.new_uuid() for _ in range(50)]
    assert first == [b.new_uuid() for _ in range(50)]
    assert all(type(i) is Id and i.version == 4 for i in first)
    assert type(RandomIds().new_uuid()) is Id
