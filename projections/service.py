"""One object per process: the runner that keeps the views current, and the readers.

    proj = Projections.open(app, store_config)      # creates tables, loads positions
    proj.attach(committer)                           # wake on every local commit (low lag)
    proj.start()                                     # tail the log in a background thread
    proj.read.balance(account_id); proj.jobs.list_for_account(account_id, 20, 0)
    proj.read.wait_for(position, timeout_s=2.0)      # read-your-writes
    proj.close()

Tools that run once (the CLI) call `proj.catch_up()` instead of `start()`.
"""

from __future__ import annotations

from typing import Any

from eventsourcing.application import Application

from projections.jobs_view import JobsView
from projections.reader import ReadModels
from projections.rebuild import rebuild
from projections.runner import ProjectionRunner
from projections.sql import Database
from store.factory import StoreConfig


class Projections:
    def __init__(self, app: Application, db: Database, *, page_size: int = 1_000, poll_interval_s: float = 0.05,
                 setup: bool = True, cache_rows: int = 100_000) -> None:
        self.app = app
        self.db = db
        self.runner = ProjectionRunner(app, db, page_size=page_size, poll_interval_s=poll_interval_s, rebuild=rebuild,
                                       cache_rows=cache_rows)
        if setup:
            self.runner.setup()
        else:
            self.runner.reload()
        self.read = ReadModels(db, self.runner)
        self.jobs = JobsView(self.read)

    @classmethod
    def open(cls, app: Application, config: StoreConfig, **kwargs: Any) -> Projections:
        return cls(app, Database(config), **kwargs)

    def attach(self, committer: Any) -> None:
        """Register the runner as a commit listener: it wakes the moment events commit."""
        committer.add_listener(self.runner.notify)

    def start(self) -> None:
        self.runner.start()

    def catch_up(self, stop: int | None = None) -> int:
        if self.runner.needs_rebuild:
            self.runner._rebuild_stale()
        return self.runner.catch_up(stop=stop)

    def close(self) -> None:
        self.runner.close()
        self.read.close()
        self.db.close()


def lag_summary(samples: list[float]) -> dict[str, Any]:
    """Percentiles (ms) of projection lag samples (seconds)."""
    if not samples:
        return {"samples": 0}
    ordered = sorted(samples)

    def pct(q: float) -> float:
        rank = max(1, min(len(ordered), int(round(q / 100.0 * len(ordered) + 0.5))))
        return round(ordered[rank - 1] * 1000, 2)

    return {"samples": len(ordered), "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(ordered[-1] * 1000, 2)}


def run_until(app: Application, config: StoreConfig, stop: Any, *, page_size: int = 1_000,
              keep_samples: int | None = None, cache_rows: int = 100_000) -> dict[str, Any]:
    """A projector process: keep the views current until `stop` (a threading.Event) is set.
    Returns the final positions and the lag percentiles observed. `keep_samples` bounds the
    lag samples and the commit timeline kept for that report (a long-running child of
    `coordinator serve`, whose report nobody reads, keeps only the last few thousand)."""
    from collections import deque

    proj = Projections.open(app, config, page_size=page_size, cache_rows=cache_rows)
    if keep_samples is not None:
        proj.runner.lag_samples = deque(maxlen=keep_samples)
        proj.runner.timeline = deque(maxlen=keep_samples)
    try:
        proj.start()
        while not stop.wait(0.5):
            pass
        proj.runner.stop()
        proj.catch_up()
        return {"positions": dict(proj.runner.positions), "events": proj.runner.events_applied,
                "lag": lag_summary(list(proj.runner.lag_samples)),
                "timeline": [list(x) for x in proj.runner.timeline]}
    finally:
        proj.close()
