"""Helpers shared by benchmarks: percentiles and ratios, all from measured samples, a
counter of what this process sends to PostgreSQL through psycopg, and a temporary git
worktree of another revision (to measure it in the same run)."""

from __future__ import annotations

import statistics
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def is_commit(rev: str) -> bool:
    """Whether `rev` names a commit of this checkout (False outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT,
                          capture_output=True, check=False).returncode == 0


@contextmanager
def worktree(rev: str, path: Path) -> Iterator[Path]:
    """`rev` checked out (detached) at `path` for the block, removed afterwards."""
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), rev], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False,
                       capture_output=True)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    assert samples, "no samples"
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), int(round(q / 100.0 * len(ordered) + 0.5))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("inf")


class PsycopgCounter:
    """Counts what this process sends through psycopg: statements (`execute`, each row of
    `executemany` is not a round trip when pipelined, so both are counted), COPY
    operations, commits and rollbacks. Installed by patching the classes for the run."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, cls: Any, name: str, key: str) -> None:
        original = getattr(cls, name)
        counts, lock = self.counts, self.lock

        def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                counts[key] += 1
            return original(obj, *args, **kwargs)

        self._saved.append((cls, name, original))
        setattr(cls, name, wrapper)

    def __enter__(self) -> PsycopgCounter:
        import psycopg

        self._wrap(psycopg.Cursor, "execute", "execute")
        self._wrap(psycopg.Cursor, "executemany", "executemany")
        self._wrap(psycopg.Cursor, "copy", "copy")
        self._wrap(psycopg.Connection, "commit", "commit")
        self._wrap(psycopg.Connection, "rollback", "rollback")
        self._wrap(psycopg.Transaction, "__exit__", "transaction_block")
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()

    def per_job(self, jobs: int) -> dict[str, float]:
        """Statements, round trips (statements + commits) and transactions per Job."""
        c, jobs = self.counts, max(1, jobs)
        statements = c["execute"] + c["executemany"] + c["copy"]
        return {"statements_per_job": round(statements / jobs, 3),
                "round_trips_per_job": round((statements + c["commit"]) / jobs, 3),
                "transactions_per_job": round((c["commit"] + c["transaction_block"]) / jobs, 3)}
