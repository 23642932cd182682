"""Helpers for the fault matrix (tests/test_faults_*.py): real `coordinator serve` processes,
their children, the CLI, the books check that ends every case, and throwaway PostgreSQL /
Redis servers on free ports that a test may stop and start (never the shared ones)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(env: dict[str, str], *args: str, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, capture_output=True, text=True,
                         timeout=timeout_s, cwd=ROOT)
    if check:
        assert out.returncode == 0, f"coordinator {' '.join(args)}: {out.returncode}\n{out.stderr[-3000:]}"
    return out


def cli_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    return json.loads(cli(env, *args).stdout.strip().splitlines()[-1])


def books_clean(env: dict[str, str]) -> dict[str, Any]:
    """`coordinator ledger verify` exits 0 (invariants and hash chains hold); its summary."""
    out = cli(env, "ledger", "verify", check=False)
    assert out.returncode == 0, f"ledger verify failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc; Linux)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(stat.split("/")[2]))
    return out


def alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def projector_children(pid: int) -> list[int]:
    return [c for c in children_of(pid) if "projections run" in cmdline(c)]


def until(predicate: Any, timeout_s: float = 15.0, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ a throwaway PostgreSQL
def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class ThrowawayPostgres:
    """A PostgreSQL cluster of our own in `base` on a free port, started and stopped by the
    test (the shared server on 5432 is never touched). Run as the `postgres` user when we
    are root (initdb refuses root)."""

    def __init__(self, base: Path) -> None:
        bindir = _pg_bin()
        if bindir is None:
            pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql")
        import tempfile

        self.bin = bindir
        self.as_user = os.geteuid() == 0
        # pytest's tmp dirs are private to root; the cluster lives in a directory of its own under /tmp
        self.base = base = Path(tempfile.mkdtemp(prefix="coord-pg-")) if self.as_user else base
        self.data = base / "pgdata"
        self.port = free_port()
        base.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(base, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", timeout_s=120)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        if self.as_user:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd="/")
        assert out.returncode == 0, f"{tool}: {out.stdout}\n{out.stderr}"
        return out

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.base / "log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        if self.running():
            try:
                self.stop()
            except AssertionError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


# ------------------------------------------------------------------ a throwaway Redis
class ThrowawayRedis:
    def __init__(self, base: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("no redis-server binary")
        self.exe = exe
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.base)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        import redis

        def up() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
            except Exception:  # noqa: BLE001
                return False

        until(up, 15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    close = stop
