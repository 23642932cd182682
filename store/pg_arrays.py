"""The event insert's four array parameters in PostgreSQL's binary array format, built
whole per batch.

psycopg dumps a list parameter element by element in Python (`ListBinaryDumper`: a
dumper looked up and called per element, the lengths and the buffer assembled around it).
The insert's arrays are of four fixed element types, so each can be written in one pass
with `b"".join` and `struct` (`python -m bench pg_params` measures both). The format
(PostgreSQL's `array_send`; every integer big-endian):

    int32 ndim = 1, int32 has_nulls = 0, uint32 element type oid,
    int32 length of the dimension, int32 lower bound = 1,
    then per element: int32 byte length, the element's binary form

with the elements' binary forms: uuid, its 16 bytes; int8, 8 bytes signed; text, its UTF-8
bytes; bytea, the bytes. No element is NULL (the columns are NOT NULL).

Each array travels as a wrapper type with its own dumper (`register`), so psycopg sends it
as one binary parameter of the array type the statement casts to.

Infrastructure only: imports psycopg, nothing of ours.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from psycopg.adapt import AdaptersMap, Dumper
from psycopg.pq import Format

UUID_OID, INT8_OID, TEXT_OID, BYTEA_OID = 2950, 20, 25, 17
UUID_ARRAY_OID, INT8_ARRAY_OID, TEXT_ARRAY_OID, BYTEA_ARRAY_OID = 2951, 1016, 1009, 1001
MAX_ELEMENTS = 1_000_000  # far above any commit batch (max_batch 10,000 commands)

_HEADER = struct.Struct(">iiIii")
_LEN = struct.Struct(">i")
_UUID_LEN = _LEN.pack(16)
_INT8 = struct.Struct(">iq")


def _header(element_oid: int, n: int) -> bytes:
    assert 0 < n <= MAX_ELEMENTS, n
    return _HEADER.pack(1, 0, element_oid, n, 1)


class PackedArray:
    """An array parameter already in the binary format (`data`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class UUIDArray(PackedArray):
    __slots__ = ()


class Int8Array(PackedArray):
    __slots__ = ()


class TextArray(PackedArray):
    __slots__ = ()


class ByteaArray(PackedArray):
    __slots__ = ()


def uuid_array(values: Sequence[UUID]) -> UUIDArray:
    return UUIDArray(b"".join([_header(UUID_OID, len(values)), *[_UUID_LEN + v.bytes for v in values]]))


def int8_array(values: Sequence[int]) -> Int8Array:
    pack = _INT8.pack
    return Int8Array(b"".join([_header(INT8_OID, len(values)), *[pack(8, v) for v in values]]))


_text_cache: dict[str, bytes] = {}  # topic -> its length-prefixed UTF-8: a small fixed set (event classes)
_TEXT_CACHE_MAX = 4_096


def _text_element(value: str) -> bytes:
    data = _text_cache.get(value)
    if data is None:
        raw = value.encode()
        data = _LEN.pack(len(raw)) + raw
        if len(_text_cache) < _TEXT_CACHE_MAX:
            _text_cache[value] = data
    return data


def text_array(values: Sequence[str]) -> TextArray:
    return TextArray(b"".join([_header(TEXT_OID, len(values)), *[_text_element(v) for v in values]]))


def bytea_array(values: Sequence[bytes]) -> ByteaArray:
    pack = _LEN.pack
    parts = [_header(BYTEA_OID, len(values))]
    for v in values:
        parts.append(pack(len(v)))
        parts.append(v)
    return ByteaArray(b"".join(parts))


def _dumper(array_oid: int) -> type[Dumper]:
    class PackedArrayDumper(Dumper):
        format = Format.BINARY
        oid = array_oid

        def dump(self, obj: Any) -> bytes:
            return obj.data

    return PackedArrayDumper


_DUMPERS = ((UUIDArray, _dumper(UUID_ARRAY_OID)), (Int8Array, _dumper(INT8_ARRAY_OID)),
            (TextArray, _dumper(TEXT_ARRAY_OID)), (ByteaArray, _dumper(BYTEA_ARRAY_OID)))


def register(adapters: AdaptersMap) -> None:
    """Teach a connection's (or cursor's) adapters to send the four wrapper types."""
    for cls, dumper in _DUMPERS:
        adapters.register_dumper(cls, dumper)
