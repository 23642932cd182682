"""`store.clock.Id`: a UUID that caches its hash and text must be indistinguishable from
the plain `uuid.UUID(int=..., version=4)` it replaces (equality both ways, hash, text,
bytes, version bits, pickling, copying, msgspec bytes), so logs and digests do not change."""

from __future__ import annotations

import copy
import pickle
import uuid

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.clock import Id, RandomIds, SeededIds, id_from_int, id_from_text, version4_id


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


_uuid_texts = st.one_of(
    st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()), st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: "{" + str(u) + "}"), st.uuids().map(lambda u: "urn:uuid:" + str(u)),
    # canonical layout with one character replaced: a sign, a space, "_", a non-hex or non-ASCII letter or digit
    st.tuples(st.uuids().map(str), st.integers(0, 35), st.sampled_from(list("+- _gZ\u0661\u00e9x0"))).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + 1:]),
    st.text(max_size=40))


@settings(max_examples=2000, deadline=None)
@given(_uuid_texts)
def test_id_from_text_is_uuid_of_the_text(text: str) -> None:
    """The same value as `uuid.UUID(text)`, and a ValueError exactly where it raises one."""
    try:
        expected = uuid.UUID(text)
    except ValueError:
        with pytest.raises(ValueError):
            id_from_text(text)
        return
    got = id_from_text(text)
    assert type(got) is Id and got == expected and got.int == expected.int and str(got) == str(expected)
