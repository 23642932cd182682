"""Build the coordinator's parts from settings, in one place."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from config.parts import Coordinator
from config.settings import Settings
from ledger.service import Ledger
from scheduler.catalog import Catalog
from scheduler.config import SchedulerConfig
from scheduler.dispatcher import FanoutListener, LeaderLock, SchedulerListener
from scheduler.leader import PostgresLeaderLock
from scheduler.service import Scheduler
from store.clock import Clock, IdSource, RandomIds, SystemClock
from store.factory import open_app
from store.unit_of_work import GroupCommitter


def build(settings: Settings, *, clock: Clock | None = None, ids: IdSource | None = None,
          scheduler_config: SchedulerConfig | None = None, listener: SchedulerListener | None = None,
          leader: LeaderLock | None = None, inline: bool = False) -> Coordinator:
    clock = clock or SystemClock()
    ids = ids or RandomIds()
    app = open_app(settings.store)
    committer = GroupCommitter(app, clock, max_batch=settings.commit_max_batch, window_ms=settings.commit_window_ms,
                               cache_size=settings.commit_cache_aggregates,
                               inline=inline, refresh_on_refusal=settings.store.is_postgres)
    ledger = Ledger(committer, settings.ledger)
    catalog = Catalog.load(settings.catalog_path)
    listeners = FanoutListener(*([listener] if listener is not None else []))
    if leader is None and settings.store.is_postgres:
        leader = PostgresLeaderLock(settings.store)
    scheduler = Scheduler(committer, catalog, settings.ledger, scheduler_config or settings.scheduler, clock, ids,
                          listener=listeners, leader=leader, single_writer=not settings.store.is_postgres)
    return Coordinator(settings=settings, clock=clock, ids=ids, app=app, committer=committer, ledger=ledger,
                       catalog=catalog, scheduler=scheduler, listeners=listeners,
                       after_account_created=_first_api_key(committer, settings))


def _first_api_key(committer: GroupCommitter, settings: Settings) -> Callable[[UUID], dict]:
    """A new account gets an API key, shown once in `accounts create`'s output (api/keys.py)."""

    def issue(account_id: UUID) -> dict:
        from api.keys import KeyStore

        secret, info = KeyStore(committer, fresh_reads=settings.store.is_postgres).issue(account_id, "default")
        return {"api_key": secret, "api_key_id": info.key_id}

    return issue
