"""The coordinator's built core parts, as one struct every surface is handed (built by
coordinator/wiring.py)."""

from __future__ import annotations

from typing import Any

from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from config.settings import Settings
from ledger.service import Ledger
from scheduler.catalog import Catalog
from scheduler.dispatcher import FanoutListener
from scheduler.service import Scheduler
from store.clock import Clock, IdSource
from store.factory import EventStoreApp
from store.unit_of_work import GroupCommitter


@dataclass
class Coordinator:
    settings: Settings
    clock: Clock
    ids: IdSource
    app: EventStoreApp
    committer: GroupCommitter
    ledger: Ledger
    catalog: Catalog
    scheduler: Scheduler
    listeners: FanoutListener  # add SchedulerListeners here (SSE publisher, Island channel)
    # `coordinator accounts create` merges what this returns into its output (an API key).
    after_account_created: Callable[[UUID], dict] | None = None
    nats_link: Any = None  # the NATS Island transport (islandlink/nats.py) when COORDINATOR_NATS_URL is set

    def close(self) -> None:
        self.scheduler.stop()
        self.committer.close()
        self.app.close()
