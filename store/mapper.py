"""A mapper that writes the library's StoredEvent bytes for less per event.

The library's `Mapper.to_stored_event` looks up the topic, copies the event's attributes,
pops the id and version, adds `class_version` when above 1, encodes, then compresses and
encrypts when configured. With our msgspec transcoder and neither compressor nor cipher
(our configuration), this does the same steps without the generic branches and the
transcoder's Python wrapper: the bytes are identical, so logs stay readable both ways.
A chained event built by `ChainedAggregate` was encoded once already, for its hash
(store.chain, scheme 2): those bytes are the state, taken instead of encoding again.
Anything else (another transcoder, a compressor or a cipher) takes the library's path.

Infrastructure only: imports the event-sourcing library, nothing of ours but store.
"""

from __future__ import annotations

from typing import Any

from eventsourcing.persistence import Compressor, Mapper, Notification, StoredEvent, Transcoder
from eventsourcing.utils import get_topic

from store.chain import take_encoded_state
from store.transcoder import MsgspecTranscoder

_new_object = object.__new__
_set_attr = object.__setattr__


class FastMapper(Mapper):
    def __init__(self, transcoder: Transcoder, compressor: Compressor | None = None, cipher: Any = None) -> None:
        super().__init__(transcoder=transcoder, compressor=compressor, cipher=cipher)
        direct = type(transcoder) is MsgspecTranscoder and not compressor and not cipher
        self._encode = transcoder.encoder.encode if direct else None
        # event class -> (topic, class_version): both fixed per class
        self._classes: dict[type, tuple[str, int]] = {}

    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        return self._stored(domain_event, StoredEvent)

    def to_notification_draft(self, domain_event: Any) -> Notification:
        """What `to_stored_event` returns, as the `Notification` (a StoredEvent subclass)
        the commit listeners will get: the committer inserts it and then sets its `id`
        (`unit_of_work._recordings`), instead of copying every field into a new one."""
        return self._stored(domain_event, Notification)

    def _stored(self, domain_event: Any, kind: type) -> Any:
        encode = self._encode
        if encode is None:
            take_encoded_state(domain_event)  # not ours to use (another transcoder, a compressor or cipher)
            s = super().to_stored_event(domain_event)
            return s if kind is StoredEvent else notification_draft(s)
        cls = domain_event.__class__
        known = self._classes.get(cls)
        if known is None:
            known = self._classes[cls] = (get_topic(cls), getattr(cls, "class_version", 1))
        topic, class_version = known
        encoded = take_encoded_state(domain_event)  # a chained event encoded as it was hashed
        if encoded is None:
            state = dict(vars(domain_event))  # the library's copy, in the same key order
            del state["originator_id"], state["originator_version"]
            if class_version > 1:
                state["class_version"] = class_version
            encoded = encode(state)
        # StoredEvent is a frozen dataclass whose __init__ sets each field with
        # object.__setattr__; filling __dict__ at once builds the same (equal) object.
        stored = _new_object(kind)
        fields = {"originator_id": domain_event.originator_id, "originator_version": domain_event.originator_version,
                  "topic": topic, "state": encoded}
        if kind is not StoredEvent:
            fields["id"] = None  # set once the insert has assigned it
        _set_attr(stored, "__dict__", fields)
        return stored


def notification_draft(stored: StoredEvent) -> Notification:
    """A StoredEvent as a Notification draft: the same fields, `id` None until the insert
    assigns it (`unit_of_work._recordings`)."""
    draft = _new_object(Notification)
    _set_attr(draft, "__dict__", {**stored.__dict__, "id": None})
    return draft
