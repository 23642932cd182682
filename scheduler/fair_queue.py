"""Per-Cargo queues with round robin over accounts: one account flooding the queue gets
one turn per round like everybody else, so it cannot starve the others. Bounded."""

from __future__ import annotations

from collections import OrderedDict, deque
from uuid import UUID


class QueueFull(Exception):
    pass


class FairQueue:
    def __init__(self, max_per_account: int, max_total: int) -> None:
        self.max_per_account = max_per_account
        self.max_total = max_total
        self._by_cargo: dict[str, OrderedDict[str, deque[UUID]]] = {}
        self._account_counts: dict[str, int] = {}
        self._members: dict[UUID, tuple[str, str]] = {}  # job -> (cargo, account)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._members

    def depth(self, cargo: str) -> int:
        return sum(len(d) for d in self._by_cargo.get(cargo, {}).values())

    def depths(self) -> dict[str, int]:
        return {cargo: self.depth(cargo) for cargo in self._by_cargo}

    def account_backlog(self, account: str) -> int:
        return self._account_counts.get(account, 0)

    def cargos(self) -> list[str]:
        return [c for c, accounts in self._by_cargo.items() if accounts]

    def push(self, cargo: str, account: str, job_id: UUID, *, front: bool = False) -> None:
        if job_id in self._members:
            return
        accounts = self._by_cargo.setdefault(cargo, OrderedDict())
        jobs = accounts.get(account)
        if jobs is None:
            jobs = accounts[account] = deque()
            if front:
                accounts.move_to_end(account, last=False)
        if front:
            jobs.appendleft(job_id)
        else:
            jobs.append(job_id)
        self._members[job_id] = (cargo, account)
        self._account_counts[account] = self._account_counts.get(account, 0) + 1

    def pop(self, cargo: str) -> UUID | None:
        """The next Job of the account whose turn it is; that account goes to the back."""
        accounts = self._by_cargo.get(cargo)
        while accounts:
            account, jobs = next(iter(accounts.items()))
            job_id = jobs.popleft()
            if jobs:
                accounts.move_to_end(account)
            else:
                del accounts[account]
            self._forget(job_id)
            return job_id
        return None

    def remove(self, job_id: UUID) -> bool:
        entry = self._members.get(job_id)
        if entry is None:
            return False
        cargo, account = entry
        jobs = self._by_cargo[cargo][account]
        jobs.remove(job_id)
        if not jobs:
            del self._by_cargo[cargo][account]
        self._forget(job_id)
        return True

    def _forget(self, job_id: UUID) -> None:
        cargo, account = self._members.pop(job_id)
        n = self._account_counts[account] - 1
        if n:
            self._account_counts[account] = n
        else:
            del self._account_counts[account]
