"""From committed events to stream frames: `job_stream_events` says which frames a Job
event becomes; `CommitPublisher` is the group committer's listener that appends them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from streams.broker import Publisher
from streams.frames import done_event, error_event, status_event, usage_out


# ------------------------------------------------------------------ Job events -> streams
_STATUS_OF = {"Queued": "queued", "Assigned": "assigned", "OfferDeclined": "queued", "Started": "running",
              "Requeued": "queued", "Completed": "completed", "Failed": "failed", "Cancelled": "cancelled",
              "TimedOut": "timeout"}


Translator = Callable[[Any], Iterable[tuple[str, bytes]]]


def job_stream_events(ev: Any) -> list[tuple[str, bytes]]:
    """The stream events of one Job event: a status for every transition, then `done`
    (with usage) on completion or `error` on failure, cancellation or timeout."""
    from scheduler.jobs import Job

    if not isinstance(ev, Job.Event):
        return []
    job_id = str(ev.originator_id)
    name = type(ev).__name__
    if isinstance(ev, Job.Submitted):
        return [(job_id, status_event(ev.status))]
    status = _STATUS_OF.get(name)
    if status is None:
        return []
    out = [(job_id, status_event(status))]
    if isinstance(ev, Job.Completed):
        kind = "image" if "steps" in ev.usage else "chat"
        out.append((job_id, done_event(usage_out(kind, ev.usage, ev.charged_micro))))
    elif isinstance(ev, Job.Failed):
        out.append((job_id, error_event(ev.reason or "failed")))
    elif isinstance(ev, Job.Cancelled):
        out.append((job_id, error_event(f"cancelled by {ev.by}")))
    elif isinstance(ev, Job.TimedOut):
        out.append((job_id, error_event(f"no Island took the job within {ev.waited_ms // 1000} s")))
    return out


class CommitPublisher:
    """A GroupCommitter listener: turns the events this process commits into stream
    events. Every event is committed by exactly one process, so every stream event is
    published exactly once, and before the committing command's caller resumes (see the
    module docstring on ordering). Called in the writer thread: only builds bytes and
    hands them to the broker."""

    def __init__(self, publisher: Publisher, translators: list[Translator] | None = None) -> None:
        self.publisher = publisher
        self.translators: list[Translator] = translators or [job_stream_events]
        self.muted = False

    def __call__(self, recordings: list[Any]) -> None:
        if self.muted:
            return
        out: list[tuple[str, bytes]] = []
        for rec in recordings:
            ev = rec.domain_event
            for translate in self.translators:
                out.extend(translate(ev))
        if out:
            self.publisher.publish_many(out)
