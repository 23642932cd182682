"""Jobs as readers see them: a view over the read models' jobs table."""

from __future__ import annotations

from typing import Any

from projections.reader import ReadModels


class JobsView:
    """Jobs as readers see them, from `proj_jobs` (never from the log).

    Construct with a `projections.reader.ReadModels` (shares its connections), or
    `JobsView.open(store_config)`. Statuses are the internal ones (`assigned` included);
    the API maps `assigned` to `queued`."""

    def __init__(self, read_models: Any) -> None:
        self._rm = read_models

    @classmethod
    def open(cls, config: Any) -> JobsView:
        return cls(ReadModels.open(config))

    def list_for_account(self, account_id: str, limit: int = 20, offset: int = 0, *,
                         status: str | None = None) -> list[dict[str, Any]]:
        """The account's Jobs, newest first (created_at, then id, both descending)."""
        return self._rm.list_jobs(str(account_id), limit=limit, offset=offset, status=status)

    def count_for_account(self, account_id: str, *, status: str | None = None) -> int:
        return self._rm.count_jobs(str(account_id), status=status)

    def get(self, job_id: str, account_id: str | None = None) -> dict[str, Any] | None:
        """One Job; None if unknown or (with account_id) owned by another account."""
        return self._rm.job(str(job_id), account_id=str(account_id) if account_id is not None else None)

    def children(self, parent_id: str) -> list[dict[str, Any]]:
        return self._rm.batch_children(str(parent_id))
