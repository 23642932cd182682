"""The published agent's NATS payloads (protocol/nats.py) decode as serde does in the
Rust agent (unknown fields ignored, `Option` fields absent or null, required fields
required), the authorization rendering (islandlink/nats_auth.py) is accepted by the real
nats-server, and pairing codes (scheduler/pairing.py) are single-use, expiring and
rate-limited per host id, in memory and in Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import msgspec
import pytest

from islandlink import nats_auth
from protocol import nats as pn
from scheduler.pairing import (MemoryPairingCodes, PairingRefused, PairingSettings, PendingIsland, RedisPairingCodes,
                               check_password, hash_password, make_password)
from tests.nats_harness import NATS_SERVER, needs_nats

HOST = "3b1c2f0e-8c4d-4d57-9a51-2f7b8d0e6a11"


# ------------------------------------------------------------------ payloads, as the Rust agent sends them
def test_register_and_heartbeat_as_the_agent_serialises_them():
    reg = pn.decode_register(json.dumps({"host_id": HOST, "capabilities": {"gpu_model": None, "gpu_vram_mb": None,
                                                                           "cpu_cores": 8, "ram_mb": 15_884,
                                                                           "region": None}, "version": "0.4.0"}).encode())
    assert reg.capabilities.gpu_model is None and reg.capabilities.cpu_cores == 8
    hb = pn.decode_island("heartbeat", json.dumps({
        "host_id": HOST, "status": "online", "active_jobs": 1, "timestamp": 1_796_000_000_000, "agent_version": "0.4.0",
        "system": {"cpu_percent": 12.5, "memory_used_mb": 4000, "memory_total_mb": 15884, "disk_used_gb": 100,
                   "disk_total_gb": 500},
        "gpus": [{"index": 0, "utilization_percent": 40, "memory_used_mb": 3000, "memory_total_mb": 24576,
                  "temperature_c": 60, "power_draw_w": 180.5}],
        "cache": {"cached_image_count": 2, "cached_size_mb": 9000, "warm_workload_count": 1,
                  "warm_workload_ids": ["llm-chat"]},
        "performance_estimates": {"gpu_bandwidth_gb_s": None, "estimated_llm_tok_s": None,
                                  "max_concurrent_containers": 4, "wasm_memory_limit_mb": 11913,
                                  "supported_runtimes": ["container", "wasm"], "nats_rtt_ms": 1.5},
        "asking_prices": {"llm-chat": "2.0", "_default": "1.0"},
        "a_field_from_a_newer_agent": {"x": 1}}).encode())
    assert hb.cache.warm_workload_ids == ["llm-chat"] and hb.performance_estimates.nats_rtt_ms == 1.5
    assert hb.asking_prices == {"llm-chat": "2.0", "_default": "1.0"}
    # the 06a3e04 agent: no asking_prices, no active_job_metrics, no gpus
    old = pn.decode_island("heartbeat", json.dumps({"host_id": HOST, "status": "online", "active_jobs": 0,
                                                    "timestamp": 1, "agent_version": "0.4.0"}).encode())
    assert old.asking_prices is None and old.gpus is None


@pytest.mark.parametrize("what,payload", [
    ("status", {"job_id": "j", "state": "failed", "error": "Timeout: job exceeded 300s limit", "timestamp": 1}),
    ("status", {"job_id": "j", "state": "started", "timestamp": 1}),
    ("output", {"job_id": "j", "seq": 0, "chunk": "tok", "is_final": False}),
    ("output", {"job_id": "j", "seq": 4, "chunk": '{"type":"done","usage":{"completion_tokens":4}}', "is_final": True}),
    ("progress", {"job_id": "j", "step": 0, "total": 20}),
    ("image", {"job_id": "j", "image_data": "iVBORw0KGgo=", "format": "png", "width": 512, "height": 512, "seed": 42}),
    ("image", {"job_id": "j", "image_data": "iVBORw0KGgo=", "format": "png", "width": 512, "height": 512}),
    ("lease", {"job_id": "j", "extend_seconds": 60}),
])
def test_island_messages_decode(what, payload):
    msg = pn.decode_island(what, json.dumps(payload).encode())
    assert msg.job_id == "j"


@pytest.mark.parametrize("what,payload", [
    ("status", {"state": "started"}), ("output", {"job_id": "j", "chunk": "x", "is_final": False}),
    ("output", {"job_id": "j", "seq": "1", "chunk": "x", "is_final": False}), ("progress", {"job_id": "j"}),
    ("image", {"job_id": "j", "format": "png"}), ("lease", {"job_id": "j"}), ("heartbeat", {"host_id": HOST}),
])
def test_missing_or_mistyped_fields_are_refused(what, payload):
    with pytest.raises(pn.DecodeErrors):
        pn.decode_island(what, json.dumps(payload).encode())


def test_assign_job_is_what_the_agent_parses():
    job = pn.AssignJob(job_id="j1", input={"prompt": "hi"}, lease_expires=1_796_000_060, workload_id="llm-chat",
                       runtime_type="wasm")
    raw = json.loads(pn.encode(job))
    assert raw == {"job_id": "j1", "input": {"prompt": "hi"}, "lease_expires": 1_796_000_060,
                   "workload_id": "llm-chat", "runtime_type": "wasm"}  # no nulls, never a float workload_id
    # "container" is the agent's own default: left out like every other default
    assert pn.decode_assign(b'{"job_id":"j1","input":{},"lease_expires":0}').runtime_type == "container"
    assert pn.decode_assign(b'{"job_id":"j1","input":{},"lease_expires":0,"workload_id":42}').workload_id == 42
    for bad in (b'{"input":{},"lease_expires":0}', b'{"job_id":"j1","input":{},"lease_expires":0,"workload_id":4.0}'):
        with pytest.raises(pn.DecodeErrors):
            pn.decode_assign(bad)
    assert pn.decode_pairing_reply(b'{"success":false,"error":"this host is already paired"}').code is None
    assert json.loads(pn.encode(pn.PairingResponse(success=True, code="ABCD2345", expires_in_seconds=600))) == {
        "success": True, "code": "ABCD2345", "expires_in_seconds": 600}


def test_url_credentials_are_split_as_the_agent_does():
    assert pn.split_url("nats://host-a:p:w@127.0.0.1:4222") == ("nats://127.0.0.1:4222", "host-a", "p:w")
    assert pn.split_url("nats://u:p%40ss@h:1") == ("nats://h:1", "u", "p%40ss")  # no percent-decoding
    assert pn.split_url("tls://h:1") == ("tls://h:1", None, None)
    for _ in range(50):
        pw = make_password()
        assert pw.isalnum() and len(pw) >= 24


# ------------------------------------------------------------------ authorization file
@needs_nats
def test_rendered_authorization_is_accepted_by_nats_server(tmp_path):
    pw_hash = hash_password("pw")
    assert check_password("pw", pw_hash) and not check_password("nope", pw_hash)
    text = nats_auth.render(nats_auth.NatsUser("coordinator", nats_auth.stable_hash("c")),
                            nats_auth.NatsUser("pairing", nats_auth.stable_hash("pairing")),
                            [(HOST, pw_hash), ("bad host id!", pw_hash)])
    assert text == nats_auth.render(nats_auth.NatsUser("coordinator", nats_auth.stable_hash("c")),
                                    nats_auth.NatsUser("pairing", nats_auth.stable_hash("pairing")),
                                    [(HOST, pw_hash)])  # deterministic; a bad id is left out
    perms = nats_auth.island_permissions(HOST)
    assert f"host.{HOST}.output" in perms["publish"] and f"host.{HOST}.jobs" in perms["subscribe"]
    assert not any("*" in s or s.endswith(">") and not s.startswith(("$JS.ACK", "_INBOX")) for s in
                   perms["publish"] + perms["subscribe"])
    (tmp_path / "auth.conf").write_text(text)
    (tmp_path / "nats.conf").write_text(nats_auth.main_config(port=4999, store_dir=str(tmp_path / "js"),
                                                              auth_file="auth.conf", pid_file=str(tmp_path / "p")))
    r = subprocess.run([NATS_SERVER, "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not nats_auth.write_if_changed(tmp_path / "auth.conf", text)
    assert nats_auth.write_if_changed(tmp_path / "auth.conf", text + "\n")


# ------------------------------------------------------------------ pairing codes
class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_memory_codes_single_use_expiring_and_limited_per_host():
    clock = _Clock()
    codes = MemoryPairingCodes(PairingSettings(ttl_s=600, per_host_per_hour=3), clock=clock)

    async def run() -> None:
        a = await codes.issue(PendingIsland(host_id="h1", capabilities={"ram_mb": 1}))
        assert (await codes.issue(PendingIsland(host_id="h1"))).code == a.code  # same code while valid
        assert await codes.redeem("WRONGCOD") is None
        got = await codes.redeem(a.code.lower())
        assert got is not None and got.host_id == "h1" and got.capabilities == {"ram_mb": 1}
        assert await codes.redeem(a.code) is None  # single use
        b = await codes.issue(PendingIsland(host_id="h2"))
        clock.t += 601
        assert await codes.redeem(b.code) is None  # expired
        for _ in range(2):
            clock.t += 601
            await codes.issue(PendingIsland(host_id="h3"))
        clock.t += 601
        await codes.issue(PendingIsland(host_id="h3"))
        clock.t += 601
        with pytest.raises(PairingRefused):
            await codes.issue(PendingIsland(host_id="h3"))
        for _ in range(10):
            assert await codes.failed_attempt("acct")
        assert not await codes.failed_attempt("acct") and await codes.blocked("acct")

    asyncio.run(run())


def test_redis_codes_single_use_and_limited_per_host():
    prefix = f"test-pair-{uuid.uuid4().hex[:8]}:"
    codes = RedisPairingCodes("redis://127.0.0.1:6379/0", prefix, PairingSettings(ttl_s=600, per_host_per_hour=2))

    async def run() -> None:
        try:
            await codes.remember(PendingIsland(host_id="h1", capabilities={"cpu_cores": 4}, agent_version="0.4.0"))
            a = await codes.issue(PendingIsland(host_id="h1"))
            assert (await codes.issue(PendingIsland(host_id="h1"))).code == a.code
            assert await codes.redeem("ZZZZZZZZ") is None
            got = await codes.redeem(a.code)
            assert got is not None and got.capabilities == {"cpu_cores": 4} and got.agent_version == "0.4.0"
            assert await codes.redeem(a.code) is None
            await codes.issue(PendingIsland(host_id="h1"))  # the second code this hour
            await codes.redis.delete(codes._k("host", "h1"))  # as if it expired
            with pytest.raises(PairingRefused):
                await codes.issue(PendingIsland(host_id="h1"))
            for _ in range(10):
                await codes.failed_attempt("acct")
            assert await codes.blocked("acct")
        finally:
            keys = [k async for k in codes.redis.scan_iter(match=prefix + "*")]
            if keys:
                await codes.redis.delete(*keys)
            await codes.close()

    asyncio.run(run())


def test_structs_reject_a_payload_that_is_not_an_object():
    with pytest.raises(msgspec.ValidationError):
        pn.decode_island("status", b"[1, 2]")
