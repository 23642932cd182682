"""Shortcuts in the scheduler's commands and live view must not change outcomes:

- `commands.uuid_of` (a bounded memo of UUID parsing) against `UUID()` on any text;
- `DispatchCore._handler_for` (the event-class dispatch decided once per class) against
  the isinstance chain `_apply` used to run for every event.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import commands as cmd
from scheduler.cargo_switch import CargoSwitch
from scheduler.dispatcher import DispatchCore
from scheduler.islands import Island
from scheduler.jobs import Job


def _outcome(fn: Any, text: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(text)
    except Exception as exc:  # noqa: BLE001 - the kind of refusal is what is compared
        return "error", type(exc)


_uuid_texts = st.uuids().flatmap(lambda u: st.sampled_from([str(u), u.hex, str(u).upper(), "{" + str(u) + "}",
                                                            "urn:uuid:" + str(u)]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_uuid_texts, st.text(max_size=40), st.sampled_from(["", "x", str(uuid.UUID(int=1))])),
                max_size=10))
def test_uuid_of_equals_uuid(texts: list[str]) -> None:
    for text in texts + texts:  # the second round is answered from the memo
        assert _outcome(cmd.uuid_of, text) == _outcome(uuid.UUID, text)


def test_uuid_of_hands_non_text_to_uuid() -> None:
    with pytest.raises((TypeError, AttributeError)):
        cmd.uuid_of(123)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        cmd.uuid_of("not-a-uuid")


def _old_branch(cls: type) -> str:
    """Which branch the original `_apply` / `_apply_job` isinstance chain took (plus the
    ExclusionsCleared branch added with decision 0070)."""
    if issubclass(cls, Job.Event):
        for name, kinds in (("submitted", Job.Submitted), ("queued", Job.Queued), ("assigned", Job.Assigned),
                            ("declined", (Job.OfferDeclined, Job.Requeued)),
                            ("exclusions_cleared", Job.ExclusionsCleared), ("started", Job.Started)):
            if issubclass(cls, kinds):
                return name
        return "terminal"
    if issubclass(cls, Island.Event):
        return "island"
    if issubclass(cls, CargoSwitch.Switched):
        return "switched"
    return "ignored"


def _event_classes() -> list[type]:
    out: list[type] = []
    for owner in (Job, Island, CargoSwitch):
        out += [v for v in vars(owner).values() if isinstance(v, type) and hasattr(v, "mutate")]
    return out + [object, int]


@pytest.mark.parametrize("cls", _event_classes(), ids=lambda c: c.__qualname__)
def test_handler_for_takes_the_branch_of_the_isinstance_chain(cls: type) -> None:
    core = DispatchCore.__new__(DispatchCore)  # only the bound methods are compared
    names = {core._on_submitted: "submitted", core._on_queued: "queued", core._on_assigned: "assigned",
             core._on_declined: "declined", core._on_exclusions_cleared: "exclusions_cleared",
             core._on_started: "started", core._on_terminal: "terminal",
             core._on_island: "island", core._on_switched: "switched"}
    handler = core._handler_for(cls)
    assert names.get(handler, "ignored" if getattr(handler, "__name__", "") == "_ignore" else "?") == _old_branch(cls)
