"""`coordinator serve` as an operator runs it: the embedded default with its projector
child process, a key from `coordinator accounts create`, clean shutdown on SIGTERM and on
Ctrl-C (SIGINT) with streams ended at once and nothing lost across a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from tests.api_harness import ServerProcess, read_sse, wait_for
from tests.conftest import env_for, make_store


def cli(env: dict[str, str], *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serve_accounts_key_sigterm_restart_sigint(tmp_path):
    env = env_for(make_store("sqlite", tmp_path))
    created = cli(env, "accounts", "create", "--email", "ops@example.com", "--credits", "20", "--kyc")
    key = created["api_key"]
    assert key.startswith("ak_") and created["account_id"]

    server = ServerProcess(env)
    with server.client(key) as cl:
        assert cl.get("/health").json()["status"] == "ok"
        job = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "hi"}}).json()["data"]
        events: list = []
        ended = threading.Event()

        def stream() -> None:
            try:
                events.extend(read_sse(cl, f"/jobs/{job['id']}/stream", timeout_s=60))
            except Exception as exc:  # noqa: BLE001 - the server closing the stream is the point
                events.append(exc)
            ended.set()

        threading.Thread(target=stream, daemon=True).start()
        wait_for(lambda: any('"serving"' in line for line in server.lines))
        time.sleep(0.5)  # the stream is open and waiting (no Island)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert ended.wait(10), "the SSE stream was not ended on SIGTERM"
        assert server.wait(30) == 0
        assert time.monotonic() - started < 15
    assert any('"stopped"' in line for line in server.lines)

    server = ServerProcess(env)  # nothing lost: the queued Job is still there, listed too
    with server.client(key) as cl:
        got = cl.get(f"/jobs/{job['id']}")
        assert got.status_code == 200 and got.json()["data"]["status"] == "queued"
        listed = wait_for(lambda: (r := cl.get("/jobs")).status_code == 200 and r.json()["data"])
        assert job["id"] in [j["id"] for j in listed]
        assert cl.delete(f"/jobs/{job['id']}").json()["data"]["status"] == "cancelled"
    server.signal(signal.SIGINT)
    assert server.wait(30) == 0
    verify = subprocess.run([sys.executable, "-m", "coordinator.cli", "ledger", "verify"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
