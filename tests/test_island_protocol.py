"""Island wire format, tokens, the PNG writer and the reference backends (no coordinator),
and the operator CLI for Islands."""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
import zlib
from typing import Any

import msgspec
import pytest

from protocol import island as p
from island.backends import BackendError, EchoBackend, ImageBackend, OpenAIBackend, tokenize
from island.png import png_rgb, procedural_png, read_png_header
from tests.island_harness import FakeOpenAI

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ wire format
def test_every_message_round_trips_with_its_type_tag():
    jid = str(uuid.uuid4())
    island_side = [
        p.Hello(protocol=1, agent="a", capabilities=p.Capabilities(cargos=["llm-chat"], slots=2, asks={"llm-chat": "4"}),
                running=[p.ResumeJob(job_id=jid, next_seq=3)]),
        p.Heartbeat(seq=1, slots_total=2, free_slots=1, warm_models=["m"], load_permille=500, rtt_ms=12,
                    running=[jid]),
        p.Accept(job_id=jid), p.Reject(job_id=jid, reason="busy"), p.Renew(job_ids=[jid]),
        p.Output(job_id=jid, seq=1, tokens=["a", " b"]), p.Progress(job_id=jid, seq=2, step=1, total=3),
        p.ImageResult(job_id=jid, seq=3, image_b64="iVBO", width=8, height=8, seed=1),
        p.Complete(job_id=jid, usage={"prompt_tokens": 1, "completion_tokens": 2}, compute_ms=5),
        p.Fail(job_id=jid, reason="oom", retryable=True), p.Bye(reason="bye"),
    ]
    for msg in island_side:
        raw = p.encode(msg)
        assert json.loads(raw)["type"] == type(msg).__struct_config__.tag
        assert p.decode_island(raw) == msg
    server_side = [
        p.Welcome(protocol=1, island_id=jid, name="n", approval="approved", heartbeat_interval_ms=10_000,
                  lease_ms=60_000, lease_renew_ms=30_000, ack_timeout_ms=10_000, server_time_ms=1,
                  jobs=[p.JobResume(job_id=jid, status="running", last_seq=2)]),
        p.Offer(job_id=jid, cargo="llm-chat", model="m", kind="chat", input={"prompt": "x"}, ack_deadline_ms=2,
                ack_timeout_ms=1, lease_ms=3),
        p.Accepted(job_id=jid, lease_ms=3), p.Cancel(job_id=jid, reason="cancelled"),
        p.Finished(job_id=jid, status="completed"), p.HeartbeatAck(seq=1, server_time_ms=2),
        p.Error(code="bad_sequence", message="m", job_id=jid, seq=4),
    ]
    for msg in server_side:
        assert p.decode_server(p.encode(msg)) == msg


def test_unknown_fields_are_ignored_and_unknown_types_refused():
    newer = '{"type": "accept", "job_id": "j", "priority": 7}'  # a field from a later protocol revision
    assert p.decode_island(newer) == p.Accept(job_id="j")
    with pytest.raises(msgspec.ValidationError):
        p.decode_island('{"type": "teleport", "job_id": "j"}')
    with pytest.raises(msgspec.ValidationError):
        p.decode_island('{"type": "output", "job_id": "j", "seq": "one", "tokens": []}')
    with pytest.raises(msgspec.DecodeError):
        p.decode_island("{not json")
    with pytest.raises(msgspec.ValidationError):
        p.decode_island(p.encode(p.Welcome(protocol=1, island_id="i", name="n", approval="a",
                                           heartbeat_interval_ms=1, lease_ms=1, lease_renew_ms=1, ack_timeout_ms=1,
                                           server_time_ms=1)))  # a server message is not an Island message


def test_tokens_name_their_island():
    iid = uuid.uuid4()
    token = p.make_token(iid)
    assert token.startswith("it_") and p.token_island_id(token) == iid
    assert p.make_token(iid) != token  # 256 random bits each time
    for bad in ("", "ak_x", "it_", f"it_{iid.hex}", f"it_{iid.hex}_short", f"it_{'z' * 32}_{'a' * 43}",
                "it_" + "a" * 300):
        assert p.token_island_id(bad) is None


def test_ws_url():
    assert p.ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/api/v1/islands/channel"
    assert p.ws_url("https://c.example/") == "wss://c.example/api/v1/islands/channel"
    assert p.ws_url("127.0.0.1:9") == "ws://127.0.0.1:9/api/v1/islands/channel"
    assert p.ws_url("ws://h/api/v1/islands/channel") == "ws://h/api/v1/islands/channel"


# ------------------------------------------------------------------ PNG
def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, i = [], 8
    while i < len(png):
        (n,) = struct.unpack(">I", png[i:i + 4])
        kind, data = png[i + 4:i + 8], png[i + 8:i + 8 + n]
        (crc,) = struct.unpack(">I", png[i + 8 + n:i + 12 + n])
        assert zlib.crc32(kind + data) & 0xFFFFFFFF == crc
        out.append((kind, data))
        i += 12 + n
    return out


def test_png_writer_produces_a_valid_file():
    png = png_rgb(3, 2, [bytes(range(9)), bytes(range(9, 18))])
    kinds = [k for k, _ in _chunks(png)]
    assert kinds == [b"IHDR", b"IDAT", b"IEND"] and read_png_header(png) == (3, 2)
    raw = zlib.decompress(dict(_chunks(png))[b"IDAT"])
    assert raw == b"\x00" + bytes(range(9)) + b"\x00" + bytes(range(9, 18))
    with pytest.raises(ValueError):
        png_rgb(2, 2, [b"\x00" * 6])


def test_procedural_image_is_deterministic_in_prompt_seed_and_steps():
    t = time.monotonic()
    a = procedural_png("a red island", 42, 1024, 768, 30)
    assert time.monotonic() - t < 2.0  # pure Python, still fast
    assert read_png_header(a) == (1024, 768)
    raw = zlib.decompress(b"".join(d for k, d in _chunks(a) if k == b"IDAT"))
    assert len(raw) == 768 * (1 + 3 * 1024)
    assert procedural_png("a red island", 42, 1024, 768, 30) == a
    assert procedural_png("a red island", 43, 1024, 768, 30) != a
    assert procedural_png("a blue island", 42, 1024, 768, 30) != a
    assert procedural_png("a red island", 42, 1024, 768, 4) != a  # fewer steps, less detail


# ------------------------------------------------------------------ backends
class Ctx:
    def __init__(self, input: dict[str, Any], kind: str = "chat", job_id: str = "job-1") -> None:  # noqa: A002
        self.job_id, self.cargo, self.model, self.kind, self.input = job_id, "c", "mistral-7b-instruct", kind, input
        self.tokens: list[tuple[float, str]] = []
        self.progress_steps: list[tuple[int, int]] = []
        self.images: list[dict[str, Any]] = []

    def token(self, text: str) -> None:
        self.tokens.append((time.monotonic(), text))

    def progress(self, step: int, total: int) -> None:
        self.progress_steps.append((step, total))

    def image(self, png: bytes, **kw: Any) -> None:
        self.images.append({"png": png, **kw})


def test_echo_is_deterministic_paced_and_honours_max_tokens():
    backend = EchoBackend(tokens_per_s=100, first_token_s=0.0, reply_tokens=48)
    ctx = Ctx({"prompt": "Hello, dear island!", "max_tokens": 20})
    t = time.monotonic()
    usage = asyncio.run(backend.run(ctx))
    took = time.monotonic() - t
    assert len(ctx.tokens) == 20 and usage == {"prompt_tokens": 9, "completion_tokens": 20}
    assert 0.17 <= took < 1.0  # 20 tokens at 100/s
    text = "".join(tok for _, tok in ctx.tokens)
    assert text.startswith("Echo: Hello, dear island!")
    ctx2 = Ctx({"prompt": "Hello, dear island!", "max_tokens": 20})
    asyncio.run(EchoBackend(tokens_per_s=0, first_token_s=0).run(ctx2))
    assert "".join(tok for _, tok in ctx2.tokens) == text
    short = Ctx({"prompt": "x", "max_tokens": 3})
    asyncio.run(EchoBackend(tokens_per_s=0, first_token_s=0).run(short))
    assert len(short.tokens) == 3
    assert tokenize("Hi, you're here.") == ["Hi", ",", " you're", " here", "."]


def test_image_backend_reports_progress_per_step_and_a_seed():
    ctx = Ctx({"prompt": "dawn", "width": 512, "height": 512, "steps": 5}, kind="image", job_id="j-7")
    usage = asyncio.run(ImageBackend(steps_per_s=1000).run(ctx))
    assert usage == {"steps": 5} and ctx.progress_steps == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    (img,) = ctx.images
    seed = ImageBackend.seed_for("j-7", {})
    assert img["seed"] == seed and img["png"] == procedural_png("dawn", seed, 512, 512, 5)
    assert ImageBackend.seed_for("other", {"seed": 9}) == 9


def test_openai_backend_streams_and_reports_real_usage():
    fake = FakeOpenAI(["Hel", "lo", " there"], usage={"prompt_tokens": 17, "completion_tokens": 3})
    try:
        backend = OpenAIBackend(base_url=fake.url, model="llama3.2:1b", api_key="sk-test")
        ctx = Ctx({"prompt": "hi", "system_prompt": "be brief", "max_tokens": 5, "temperature": 0.2,
                   "messages": [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}]})
        usage = asyncio.run(_run_and_close(backend, ctx))
        assert [t for _, t in ctx.tokens] == ["Hel", "lo", " there"]
        assert usage == {"prompt_tokens": 17, "completion_tokens": 3}
        req = fake.requests[-1]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == b"Bearer sk-test"
        body = req["body"]
        assert body["model"] == "llama3.2:1b" and body["stream"] is True and body["max_tokens"] == 5
        assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    finally:
        fake.stop()
    counted = FakeOpenAI(["a", "b"], usage=None)  # a server that does not report usage: counted
    try:
        ctx = Ctx({"prompt": "hi there"})
        usage = asyncio.run(_run_and_close(OpenAIBackend(base_url=counted.url + "/v1"), ctx))
        assert usage["completion_tokens"] == 2 and counted.requests[-1]["body"]["model"] == "mistral-7b-instruct"
    finally:
        counted.stop()
    broken = FakeOpenAI([], status=503)
    try:
        with pytest.raises(BackendError) as exc:
            asyncio.run(_run_and_close(OpenAIBackend(base_url=broken.url), Ctx({"prompt": "x"})))
        assert exc.value.retryable and "503" in exc.value.reason
    finally:
        broken.stop()
    with pytest.raises(BackendError) as exc:  # nothing listening: retryable
        asyncio.run(_run_and_close(OpenAIBackend(base_url="http://127.0.0.1:9"), Ctx({"prompt": "x"})))
    assert exc.value.retryable


async def _run_and_close(backend: Any, ctx: Any) -> Any:
    try:
        return await backend.run(ctx)
    finally:
        await backend.aclose()


# ------------------------------------------------------------------ operator CLI
def test_islands_cli(tmp_path, monkeypatch, capsys):
    from coordinator.cli import main

    monkeypatch.setenv("COORDINATOR_DATA_DIR", str(tmp_path / "data"))
    for key in ("COORDINATOR_DATABASE_URL", "COORDINATOR_REDIS_URL", "COORDINATOR_AUTO_APPROVE_ISLANDS"):
        monkeypatch.delenv(key, raising=False)
    assert main(["accounts", "create", "--email", "owner@test.example"]) == 0
    owner = json.loads(capsys.readouterr().out)["account_id"]
    assert main(["islands", "create", "--owner", owner, "--name", "home rig", "--region", "eu"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["approval"] == "pending" and p.token_island_id(created["token"]) == uuid.UUID(created["island_id"])
    iid = created["island_id"]
    assert main(["islands", "create", "--owner", str(uuid.uuid4()), "--name", "x"]) == 2  # unknown owner
    assert main(["islands", "suspend", iid]) == 2  # a suspension needs a reason
    assert main(["islands", "approve", iid, "--by", "alice"]) == 0
    assert main(["islands", "suspend", iid, "--reason", "abuse report"]) == 0
    assert main(["islands", "approve", str(uuid.uuid4())]) == 2
    capsys.readouterr()
    assert main(["islands", "list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["island_id"], row["approval"], row["region"], row["name"]) == (iid, "suspended", "eu", "home rig")
    assert main(["islands", "list"]) == 0 and "home rig" in capsys.readouterr().out
    monkeypatch.delenv("ISLAND_TOKEN", raising=False)
    assert main(["island", "run", "--server", "http://127.0.0.1:9"]) == 2  # no token
