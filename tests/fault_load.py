"""A bounded mixed load for the fault matrix: submitters that create chat Jobs and follow
each one's SSE stream, recording every admitted Job id and every answer's status."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx

TERMINAL = {"completed", "failed", "cancelled", "timeout"}


class Load:
    def __init__(self, url_of: Any, key: str, *, workers: int = 4, stream: bool = True, workload: str = "llm-chat",
                 max_tokens: int = 16) -> None:
        self.url_of = url_of  # a callable: the current base URL (a restart may change it)
        self.key = key
        self.workload = workload
        self.max_tokens = max_tokens
        self.stream = stream
        self.admitted: list[str] = []
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self.bad: list[str] = []  # 5xx other than 503, or a 503 without Retry-After
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _note(self, r: httpx.Response) -> None:
        with self._lock:
            self.statuses[r.status_code] += 1
            if r.status_code >= 500 and (r.status_code != 503 or "retry-after" not in r.headers):
                self.bad.append(f"{r.request.method} {r.request.url.path} -> {r.status_code} {r.text[:200]}")

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                with httpx.Client(base_url=self.url_of() + "/api/v1", timeout=10,
                                  headers={"Authorization": f"Bearer {self.key}"}) as cl:
                    r = cl.post("/jobs", json={"workload": self.workload,
                                               "input": {"prompt": f"w{i} n{n}", "max_tokens": self.max_tokens}})
                    self._note(r)
                    if r.status_code == 201:
                        job_id = r.json()["data"]["id"]
                        with self._lock:
                            self.admitted.append(job_id)
                        if self.stream:
                            with cl.stream("GET", f"/jobs/{job_id}/stream", timeout=10) as s:
                                self._note(s)
                                for line in s.iter_lines():
                                    if self._stop.is_set() or '"type":"done"' in line or '"type":"error"' in line:
                                        break
                    elif r.status_code in (429, 503):
                        time.sleep(0.2)
            except (httpx.HTTPError, OSError) as exc:
                with self._lock:
                    self.errors[type(exc).__name__] += 1
                time.sleep(0.1)


def job_statuses(url: str, key: str, job_ids: list[str]) -> dict[str, str]:
    out = {}
    with httpx.Client(base_url=url + "/api/v1", timeout=30, headers={"Authorization": f"Bearer {key}"}) as cl:
        for jid in job_ids:
            r = cl.get(f"/jobs/{jid}")
            out[jid] = r.json()["data"]["status"] if r.status_code == 200 else f"http {r.status_code}"
    return out


def wait_settled(url: str, key: str, job_ids: list[str], timeout_s: float) -> dict[str, str]:
    """Until every Job is terminal (or `timeout_s`); the last statuses."""
    deadline = time.monotonic() + timeout_s
    pending = list(job_ids)
    last: dict[str, str] = {}
    while True:
        last.update(job_statuses(url, key, pending))
        pending = [j for j in pending if last[j] not in TERMINAL]
        if not pending or time.monotonic() > deadline:
            return last
        time.sleep(0.5)


def account(url: str, key: str) -> dict[str, Any]:
    with httpx.Client(base_url=url + "/api/v1", timeout=30, headers={"Authorization": f"Bearer {key}"}) as cl:
        return cl.get("/account").json()["data"]
