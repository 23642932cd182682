"""msgspec transcoder for the eventsourcing library (9.5 ships none).

Event state is a dict of plain values (str, int, bool, None, lists, dicts) plus the
event `timestamp` (a timezone-aware datetime). MessagePack carries datetimes natively
(timestamp extension) so no per-field type hints are needed and decoding is exact:
`decode(encode(state)) == state` for every state our events produce, except that
tuples come back as lists (events therefore use lists).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.persistence import Transcoder

_UUID_EXT = 1


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, UUID):
        return msgspec.msgpack.Ext(_UUID_EXT, obj.bytes)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in an event")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == _UUID_EXT:
        return UUID(bytes=bytes(data))
    raise ValueError(f"unknown msgpack extension {code}")


def state_encoder() -> msgspec.msgpack.Encoder:
    """The encoder of event state: the transcoder's, and the chain's scheme-2 `body`
    (store.chain), which must be the same bytes."""
    return msgspec.msgpack.Encoder(enc_hook=_enc_hook)


class MsgspecTranscoder(Transcoder):
    """Transcoder using msgspec MessagePack; UUIDs travel as extension type 1."""

    def __init__(self) -> None:
        self._encoder = state_encoder()
        self.encoder = self._encoder  # used directly by store.mapper.FastMapper (no wrapper call)
        self._decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)

    def encode(self, obj: Any) -> bytes:
        return self._encoder.encode(obj)

    def decode(self, data: bytes) -> Any:
        return self._decoder.decode(data)
