"""Tamper evidence: every event of a chained aggregate carries `chain`, a hash that links
it to the previous event of the same aggregate (its *stream*), see decisions 0040 and 0073.

Scheme 2 (written since decision 0073; the value reads "v2:" + 64 hex digits):

    chain(v) = "v2:" + blake2b-256( msgpack([TAG2, chain(v-1), topic, str(originator_id), v]) + body )

where `body` is the event's stored state without its `chain` entry: the MessagePack map
the store writes (the transcoder's encoding, keys in the event's field order, the
`timestamp` as a MessagePack timestamp), of every attribute except `originator_id`,
`originator_version` and `chain`. The event is encoded once: `body` is hashed, and the
stored state is `body` with the `chain` entry appended (`with_chain`), handed to the mapper
(`take_encoded_state`) instead of encoding the event a second time. `verify` re-encodes a
decoded event's attributes in their stored order: MessagePack decoding and encoding again
give back the same bytes for every value our events hold (str, int, float, bool, None,
bytes, lists, dicts, timestamps; tuples and sets were already arrays when first written).

Scheme 1 (every log written before decision 0073; a value of 64 hex digits), still verified:

    chain(v) = blake2b-256( msgpack([TAG, chain(v-1), topic, str(originator_id), v, fields]) )

with `chain(0) = ""` in both, `topic` the event class's topic, and `fields` every attribute
of the event except `originator_id`, `originator_version` (both hashed on their own) and
`chain` itself, encoded canonically (`canonical_fields`): MessagePack via msgspec with map
keys sorted at every depth; an aware `datetime` at the top level (the event `timestamp`) as
its UTC ISO-8601 string; UUIDs as strings and tuples as arrays; sets as sorted arrays.

Each event names its scheme by the form of its `chain` value, so a stream may hold scheme-1
events followed by scheme-2 ones (a log written before the upgrade and continued after it).

The hash is computed by the aggregate before the event is constructed (`ChainedAggregate`
overrides `trigger_event` and `_create`), from the aggregate's in-memory `chain_head`: no
read and no shared state on the write path. The chain is per stream, so concurrent writers
of different aggregates never serialise on it (one global chain would make every insert
depend on the previous insert's hash, i.e. a single writer).

Infrastructure only: imports the event-sourcing library and, of ours, store.clock and
store.transcoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from hashlib import blake2b
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.domain import Aggregate, OriginatorIDError, OriginatorVersionError
from eventsourcing.utils import get_topic, resolve_topic

from store.clock import Id
from store.transcoder import state_encoder

GENESIS = ""  # the "previous hash" of a stream's first event
CHAIN_TAG = "archipelag-chain-v1"  # scheme 1's domain separation
CHAIN_TAG_V2 = "archipelag-chain-v2"  # scheme 2's
V2_MARK = "v2:"  # how a scheme-2 value starts (a scheme-1 value is 64 hex digits)
EXCLUDED = frozenset({"originator_id", "originator_version", "chain"})


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} in a chained event")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook, order="sorted")


# Values of these exact types are hashed as they are: no top-level conversion applies to
# them (an aware datetime is the only value `canonical_fields` converts). Exact types, so
# that a subclass (of datetime, or anything else) takes the general path.
_PASS_THROUGH_TYPES = frozenset({str, int, float, bool, type(None), bytes, list, tuple, dict, set, frozenset, UUID, Id})
# Originator ids msgspec encodes exactly as `str(originator_id)` (canonical UUID text).
_NATIVE_ID_TYPES = frozenset({UUID, Id, str})
# The last timestamp converted and its text: the events of one command share their time.
# A tuple swapped as a whole, so readers in other threads always see a matching pair.
_last_iso: tuple[datetime, str] = (datetime(1970, 1, 1, tzinfo=timezone.utc), "1970-01-01T00:00:00+00:00")


def _utc_isoformat(value: datetime) -> str:
    """`value.astimezone(timezone.utc).isoformat()` for an aware datetime (any zone)."""
    global _last_iso  # noqa: PLW0603
    if value.tzinfo is not timezone.utc:  # astimezone(utc) of a UTC datetime is itself
        return value.astimezone(timezone.utc).isoformat()
    last = _last_iso
    if last[0] == value:  # equal UTC instants have equal UTC fields, hence equal text
        return last[1]
    text = value.isoformat()
    _last_iso = (value, text)
    return text


def _canonical_fields_general(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The definition of `canonical_fields` (any values); the fast path must agree with it."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in EXCLUDED:
            continue
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).isoformat()
        out[key] = value
    return out


def canonical_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The hashed part of an event's attributes (see the module docstring).

    Fast path for the usual event: every top-level value is plain except an aware
    `timestamp` of exact type datetime; anything else goes to the general definition."""
    out = dict(fields)
    out.pop("originator_id", None)
    out.pop("originator_version", None)
    out.pop("chain", None)
    timestamp = out.get("timestamp")
    if type(timestamp) is datetime and timestamp.tzinfo is not None:
        out["timestamp"] = _utc_isoformat(timestamp)
    if not _PASS_THROUGH_TYPES.issuperset(map(type, out.values())):
        return _canonical_fields_general(fields)
    return out


def chain_hash(prev_hex: str, topic: str, originator_id: Any, version: int, fields: Mapping[str, Any]) -> str:
    """The chain hash of one event, given its stream's previous hash (hex, "" for version 1)."""
    # msgspec writes a UUID as its canonical text, i.e. the bytes of str(originator_id),
    # without building the string in Python.
    oid = originator_id if type(originator_id) in _NATIVE_ID_TYPES else str(originator_id)
    payload = _ENCODER.encode([CHAIN_TAG, prev_hex, topic, oid, version, canonical_fields(fields)])
    return blake2b(payload, digest_size=32).hexdigest()


# ------------------------------------------------------------------ scheme 2
# The store's own encoding of event state (store.transcoder): `body` must be exactly the
# bytes the mapper would write for the same attributes.
_STATE_ENCODER = state_encoder()
_CHAIN_KEY = _STATE_ENCODER.encode("chain")
_V2_LEN = len(V2_MARK) + 64
# the "chain" key and the header of a scheme-2 value (a str8 of _V2_LEN ASCII bytes)
_CHAIN_ENTRY_V2 = _CHAIN_KEY + _STATE_ENCODER.encode("x" * _V2_LEN)[:-_V2_LEN]
_FIXMAP, _MAP16, _MAP32 = 0x80, 0xDE, 0xDF


def chain_hash_v2(prev_hex: str, topic: str, originator_id: Any, version: int, body: bytes) -> str:
    """Scheme 2's hash of one event, given its stream's previous hash and its `body`."""
    oid = originator_id if type(originator_id) in _NATIVE_ID_TYPES else str(originator_id)
    h = blake2b(_STATE_ENCODER.encode([CHAIN_TAG_V2, prev_hex, topic, oid, version]), digest_size=32)
    h.update(body)
    return V2_MARK + h.hexdigest()


def state_body(fields: Mapping[str, Any]) -> bytes:
    """`body` of an event with these attributes (in their order): every attribute but the
    originator id, version and chain, encoded as the store encodes state."""
    return _STATE_ENCODER.encode({k: v for k, v in fields.items() if k not in EXCLUDED})


def with_chain(body: bytes, chain: str) -> bytes:
    """`body` (a MessagePack map) with a last entry `"chain": chain`: the same bytes as
    encoding the map with that entry added, without encoding the rest again."""
    head = body[0]
    if _FIXMAP <= head <= _FIXMAP + 15:
        n, skip = head - _FIXMAP, 1
    elif head == _MAP16:
        n, skip = int.from_bytes(body[1:3], "big"), 3
    else:
        assert head == _MAP32, f"not a MessagePack map: {head:#x}"
        n, skip = int.from_bytes(body[1:5], "big"), 5
    n += 1
    if n <= 15:
        header = bytes((_FIXMAP + n,))
    elif n <= 0xFFFF:
        header = b"\xde" + n.to_bytes(2, "big")
    else:
        header = b"\xdf" + n.to_bytes(4, "big")
    if len(chain) == _V2_LEN and chain.isascii():  # every scheme-2 value: its str8 header is fixed
        tail = _CHAIN_ENTRY_V2 + chain.encode()
    else:
        tail = _CHAIN_KEY + _STATE_ENCODER.encode(chain)
    return b"".join((header, memoryview(body)[skip:], tail))


# Encoded states of events built by `trigger_event` / `_create`, waiting for the mapper:
# id(event) -> (event, stored state). The event is held, so its id cannot be reused while
# it waits. Entries of events that are never stored (a command that raised after changing
# state) are dropped with the rest when the table outgrows either bound (entries: the
# largest batch the committer takes, 10,000 commands, holds fewer events; bytes: a few
# large prompts must not pin memory); a missing entry only costs the mapper one encoding.
_ENCODED: dict[int, tuple[Any, bytes]] = {}
MAX_ENCODED_WAITING = 65_536
MAX_ENCODED_BYTES = 64 * 2**20
_encoded_bytes = 0  # of the states waiting (approximate across threads; reset with the table)


def _keep_encoded(event: Any, state: bytes) -> None:
    global _encoded_bytes  # noqa: PLW0603
    if len(_ENCODED) >= MAX_ENCODED_WAITING or _encoded_bytes >= MAX_ENCODED_BYTES:
        _ENCODED.clear()
        _encoded_bytes = 0
    _ENCODED[id(event)] = (event, state)
    _encoded_bytes += len(state)


def take_encoded_state(event: Any) -> bytes | None:
    """The stored state `trigger_event` / `_create` encoded for this event (once: the
    entry is removed), or None (another path built it, or it was already taken)."""
    global _encoded_bytes  # noqa: PLW0603
    entry = _ENCODED.pop(id(event), None)
    if entry is None:
        return None
    _encoded_bytes -= len(entry[1])
    if entry[0] is not event:  # cannot happen while the entry holds the event; cheap to check
        return None
    return entry[1]


# ------------------------------------------------------------------ event construction
_REQUIRED = object()  # a field without a default
_new_object = object.__new__
_set_attr = object.__setattr__


class _EventSpec:
    """What building an event of one class needs, read once from its dataclass fields:
    `body_template`, every field but the originator id, version and chain (the `body` of
    scheme 2) in declaration order mapped to its default (`_REQUIRED` if none), the names
    of the required ones, the topic, and whether the mapper may take the encoded state
    (`keep_encoded`: the library's mapper adds `class_version` to the state above 1)."""

    __slots__ = ("body_template", "keep_encoded", "required", "topic")

    def __init__(self, cls: type) -> None:
        fields = dataclasses.fields(cls)
        assert all(f.default_factory is dataclasses.MISSING for f in fields), f"{cls}: default_factory unsupported"
        assert all(f.init for f in fields), f"{cls}: init=False fields unsupported"
        names = {f.name for f in fields}
        assert EXCLUDED <= names, f"{cls}: not a chained event"
        self.body_template = {f.name: _REQUIRED if f.default is dataclasses.MISSING else f.default
                              for f in fields if f.name not in EXCLUDED}
        self.required = frozenset(name for name, default in self.body_template.items() if default is _REQUIRED)
        self.topic = get_topic(cls)
        self.keep_encoded = getattr(cls, "class_version", 1) == 1


_SPECS: dict[type, _EventSpec] = {}


def _spec(cls: type) -> _EventSpec:
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = _EventSpec(cls)
    return spec


def _body_dict(spec: _EventSpec, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The event's attributes but the originator id, version and chain, as the dataclass
    `__init__` would fill them: every field in declaration order (the template's; updating
    a key keeps its place), defaults for those not given; a TypeError for an unknown or a
    missing field. Missing fields are found by name (`values.keys() >= spec.required`),
    not by comparing every value with the marker: `==` against a UUID value runs
    `UUID.__eq__` in Python."""
    template = spec.body_template
    out = template.copy()
    out.update(values)
    if len(out) != len(template) or not values.keys() >= spec.required:
        unknown = sorted(set(values) - set(template))
        missing = [name for name, value in out.items() if value is _REQUIRED]
        msg = f"Can't construct event {cls}: unexpected keyword argument(s) {unknown}, missing required argument(s) {missing}"
        raise TypeError(msg)
    return out


def _build_event(cls: type, state: dict[str, Any]) -> Any:
    """An event object with `state` as its attributes, without the frozen dataclass
    `__init__` (one `object.__setattr__` per field): the library's own mapper builds
    decoded events the same way. Equal to `cls(**state)` (same fields, order, values)."""
    event = _new_object(cls)
    _set_attr(event, "__dict__", state)
    return event


# ------------------------------------------------------------------ aggregates
class ChainedAggregate(Aggregate):
    """An aggregate whose events are hash-chained per stream. Subclasses derive their
    events from `ChainedAggregate.Event` / `ChainedAggregate.Created`; nothing else changes."""

    chain_head = GENESIS  # the `chain` of the last event applied (set by every event's mutate)

    class Event(Aggregate.Event):
        chain: str

        def mutate(self, aggregate: Any) -> Any:
            """The library's `CanMutateAggregate.mutate` (same checks, same order: id, next
            version, apply, then version and modified_on), written out to save the super()
            chain per event; the id check short-cuts on identity (trigger_event passes the
            aggregate's own id object). Then the stream's head moves to this event."""
            assert aggregate is not None
            originator_id = self.originator_id
            if originator_id is not aggregate._id and originator_id != aggregate._id:
                raise OriginatorIDError(originator_id, aggregate._id)
            next_version = aggregate._version + 1
            if self.originator_version != next_version:
                raise OriginatorVersionError(self.originator_version, next_version)
            self.apply(aggregate)
            # The library's `version` and `modified_on` setters assign these two attributes.
            aggregate._version = next_version
            aggregate._modified_on = self.timestamp
            # Events decoded from a log written before chaining existed have no `chain`.
            aggregate.chain_head = self.__dict__.get("chain", GENESIS)
            return aggregate

    class Created(Event, Aggregate.Created):
        def mutate(self, aggregate: Any) -> Any:
            """The library's `CanInitAggregate.mutate` (resolve the class, a bare instance,
            `__base_init__`, then `__init__` with the event's attributes it names, the id if
            it asks for it, then `apply`), with the parameter names read once per class."""
            assert aggregate is None
            state = self.__dict__
            cls = resolve_topic(state["originator_topic"])
            init = _INIT_PARAMS.get(cls)
            if init is None:
                init = _INIT_PARAMS[cls] = _init_params(cls)
            agg = cls.__new__(cls)
            agg.__base_init__(state["originator_id"], state["originator_version"], state["timestamp"])
            kwargs = {k: v for k, v in state.items() if k in init[0]}
            if init[1]:
                kwargs["id"] = state["originator_id"]
            agg.__init__(**kwargs)
            self.apply(agg)
            agg.chain_head = state.get("chain", GENESIS)
            return agg

    def trigger_event(self, event_class: Any, **kwargs: Any) -> None:
        """The library's `BaseAggregate.trigger_event` plus the chain hash, in one frame.
        The event's attributes are put together once (`_body_dict`: declaration order,
        defaults filled) and encoded once: the hash covers those bytes (scheme 2), the
        mapper stores them with the chain entry added (`take_encoded_state`), and the
        attributes, with the originator id and version first and the chain last, become
        the event's `__dict__`. Aggregates with explicit TOPICs take the library's path
        (it checks the topic registration) with the same hash."""
        if kwargs.get("timestamp") is None:
            kwargs["timestamp"] = event_class.create_timestamp()
        version = self._version + 1
        spec = _SPECS.get(event_class)
        if spec is None:
            spec = _spec(event_class)
        originator_id = self._id
        body_state = _body_dict(spec, event_class, kwargs)
        body = _STATE_ENCODER.encode(body_state)
        chain = chain_hash_v2(self.chain_head, spec.topic, originator_id, version, body)
        if _explicit_topic(type(self)):
            super().trigger_event(event_class, **kwargs, chain=chain)
            return
        state = {"originator_id": originator_id, "originator_version": version, **body_state, "chain": chain}
        new_event = _build_event(event_class, state)
        new_event.mutate(self)
        self._pending_events.append(new_event)
        if spec.keep_encoded:
            _keep_encoded(new_event, with_chain(body, chain))

    @classmethod
    def _create(cls, event_class: Any, *, id: Any = None, **kwargs: Any) -> Any:  # noqa: A002
        """The library's `BaseAggregate._create` (id from `create_id` when not given and
        checked, the created event with the aggregate's topic, the aggregate built by the
        event's `mutate`, the event pending) with the chain hash as in `trigger_event`.
        Aggregates with explicit TOPICs hand the hashed event's arguments to the library's
        `_create` (it checks the topic registration)."""
        if id is None:
            params = inspect.signature(cls.create_id).parameters
            id = cls.create_id(**{k: v for k, v in kwargs.items() if k in params})  # noqa: A001
        if not isinstance(id, (UUID, str)):
            msg = f"Given id was not a UUID or str: {id!r}"
            raise TypeError(msg)
        if kwargs.get("timestamp") is None:
            kwargs["timestamp"] = event_class.create_timestamp()
        spec = _spec(event_class)
        given = dict(kwargs) if _explicit_topic(cls) else None
        kwargs["originator_topic"] = get_topic(cls)
        body_state = _body_dict(spec, event_class, kwargs)
        body = _STATE_ENCODER.encode(body_state)
        chain = chain_hash_v2(GENESIS, spec.topic, id, cls.INITIAL_VERSION, body)
        if given is not None:
            return super()._create(event_class, id=id, **given, chain=chain)
        state = {"originator_id": id, "originator_version": cls.INITIAL_VERSION, **body_state, "chain": chain}
        if not isinstance(id, UUID):  # the event's own check (DomainEvent.__post_init__)
            event_class(**state)
        created = _build_event(event_class, state)
        agg = created.mutate(None)
        agg._pending_events.append(created)
        if spec.keep_encoded:
            _keep_encoded(created, with_chain(body, chain))
        return agg


# aggregate class -> whether it names an explicit TOPIC (a getattr that misses raises and
# swallows an AttributeError: dear on every event)
_EXPLICIT_TOPICS: dict[type, bool] = {}


def _explicit_topic(cls: type) -> bool:
    explicit = _EXPLICIT_TOPICS.get(cls)
    if explicit is None:
        explicit = _EXPLICIT_TOPICS[cls] = bool(getattr(cls, "TOPIC", None))
    return explicit


# aggregate class -> (the parameter names of its __init__, whether it names `id`)
_INIT_PARAMS: dict[type, tuple[frozenset[str], bool]] = {}


def _init_params(cls: type) -> tuple[frozenset[str], bool]:
    names = frozenset(inspect.signature(cls.__init__).parameters)
    return names - {"self", "id"}, "id" in names


def is_chained(event: Any) -> bool:
    return isinstance(event, ChainedAggregate.Event)


def event_chain_hash(prev_hex: str, event: Any) -> str:
    """Recompute an event's chain hash from its (decoded) attributes, by the scheme its
    stored `chain` value names (scheme 1 when it has none)."""
    state = event.__dict__
    topic = get_topic(type(event))
    if str(state.get("chain", "")).startswith(V2_MARK):
        return chain_hash_v2(prev_hex, topic, event.originator_id, event.originator_version, state_body(state))
    return chain_hash(prev_hex, topic, event.originator_id, event.originator_version, state)


# ------------------------------------------------------------------ verification
@dataclass(frozen=True)
class ChainBreak:
    position: int
    originator_id: str
    version: int
    topic: str
    reason: str
    expected: str  # what the chain should hold here (hash, or the expected version)
    stored: str  # what the log holds

    def describe(self) -> str:
        return (f"chain break at position {self.position}: stream {self.originator_id} version {self.version} "
                f"({self.topic}): {self.reason}; expected {self.expected or '-'}, stored {self.stored or '-'}")


@dataclass
class ChainReport:
    chained_events: int = 0  # events of chained aggregates that were checked
    unchained_events: int = 0  # events of chained aggregates written before chaining (no `chain`)
    breaks: list[ChainBreak] = field(default_factory=list)
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)  # stream -> (version, head hash)

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def first_break(self) -> ChainBreak | None:
        return self.breaks[0] if self.breaks else None

    def heads_digest(self) -> str:
        """One hash over every stream's (id, last version, head): record it outside the
        database and compare it later (verify as of the same position) to detect what a
        per-stream chain cannot: a stream's tail cut off, or a whole stream rewritten."""
        h = hashlib.blake2b(digest_size=32)
        for stream in sorted(self.heads):
            version, head = self.heads[stream]
            h.update(f"{stream}:{version}:{head}\n".encode())
        return h.hexdigest()


def verify_chains(events: Iterable[tuple[int, Any]], *, max_breaks: int = 100) -> ChainReport:
    """Recompute every chained event's hash from its fields and its stream's previous hash,
    in log order (the whole log, from position 1). Events of other aggregates are skipped.

    After a break the stream continues from the *stored* hash, so one edited event is
    reported once (and a recomputed hash shows up at the next event of its stream)."""
    report = ChainReport()
    last: dict[Any, tuple[int, str, bool]] = {}  # stream -> (version, head, chained)

    def fail(position: int, event: Any, reason: str, expected: str, stored: str) -> None:
        if len(report.breaks) < max_breaks:
            report.breaks.append(ChainBreak(position, str(event.originator_id), event.originator_version,
                                            get_topic(type(event)), reason, expected, stored))

    for position, event in events:
        if not is_chained(event):
            continue
        stream = event.originator_id
        version = event.originator_version
        prev_version, prev, prev_chained = last.get(stream, (0, GENESIS, False))
        if version != prev_version + 1:
            fail(position, event, "version out of sequence (an event is missing)", str(prev_version + 1),
                 str(version))
        stored = event.__dict__.get("chain")
        if stored is None:
            report.unchained_events += 1
            if prev_chained:
                fail(position, event, "event without a chain hash after chained events", "a hash", "")
            last[stream] = (version, GENESIS, False)
            continue
        report.chained_events += 1
        expected = event_chain_hash(prev, event)
        if expected != stored:
            fail(position, event, "hash does not match the event and its predecessor", expected, stored)
        last[stream] = (version, stored, True)
    report.heads = {str(s): (v, head) for s, (v, head, chained) in last.items() if chained}
    return report
