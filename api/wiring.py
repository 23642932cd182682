"""Build the coordinator's parts from settings, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from api.settings import Settings
from ledger.service import Ledger
from store.clock import Clock, IdSource, RandomIds, SystemClock
from store.factory import EventStoreApp, open_app
from store.unit_of_work import GroupCommitter


@dataclass
class Coordinator:
    settings: Settings
    clock: Clock
    ids: IdSource
    app: EventStoreApp
    committer: GroupCommitter
    ledger: Ledger

    def close(self) -> None:
        self.committer.close()
        self.app.close()


def build(settings: Settings, *, clock: Clock | None = None, ids: IdSource | None = None) -> Coordinator:
    clock = clock or SystemClock()
    app = open_app(settings.store)
    committer = GroupCommitter(app, clock, max_batch=settings.commit_max_batch, window_ms=settings.commit_window_ms)
    ledger = Ledger(committer, settings.ledger)
    return Coordinator(settings=settings, clock=clock, ids=ids or RandomIds(), app=app, committer=committer,
                       ledger=ledger)
