"""SSE frames every published client can read (issue #13 section 1, decision 0050), on
the embedded default and on PostgreSQL + Redis, with real Jobs run by the test Islands.

Four readers of the same stream, each must see every event, in order:
- `js_sdk_events`: what the JavaScript SDK (`@archipelag/sdk`, client.ts `streamJob`) does,
  step for step: each network read on its own, split on blank lines, keep the blocks that
  start with `data: `, JSON-parse the rest (no buffering across reads);
- `node_sdk_events`: the same algorithm run by Node's own `fetch` and `JSON.parse`
  (tests/clients/js_sdk_stream.mjs; skipped where `node` is missing);
- `httpx_sse_events`: the spec-following library `httpx-sse` (the one the Python SDK uses);
- `python_sdk_events`: what the Python SDK (`archipelag` 0.1.0, `Client.stream_job`) does with
  each httpx-sse event: `json.loads(sse.data)`, the event type enum, `Usage(**usage)`.

The keep-alive interval is 1 s and the Island is held for ~2.5 s after it accepted, so
`: ping` comments arrive between events (after ids were sent), the case that crashes the
Python SDK when ids are on `id:` lines.
"""

from __future__ import annotations

import codecs
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from streams import frames
from tests.api_harness import IMAGE_CAPS, LiveServer, make_backend, read_sse, wait_for

JS_READER = Path(__file__).parent / "clients" / "js_sdk_stream.mjs"
NODE = shutil.which("node")
CHAT = {"workload": "llm-chat", "input": {"prompt": "Say hello", "max_tokens": 64}}
IMAGE = {"workload": "sdxl", "input": {"prompt": "a cat", "width": 512, "height": 512, "steps": 8,
                                       "guidance_scale": 7.0, "seed": 3}}
TOKENS = ["Hello", ",", " world", "!"]
SDK_TYPES = {"token", "status", "progress", "image", "error", "done"}
HOLD_S = 2.5


@pytest.fixture(scope="module", params=["embedded", "pg_redis"])
def srv(request, tmp_path_factory):
    backend = make_backend(request.param, tmp_path_factory.mktemp(request.param))
    server = LiveServer(backend, COORDINATOR_RATE_LIMIT_PER_MIN="100000", COORDINATOR_SSE_KEEPALIVE_S="1")
    server.chat_island = server.island(tokens=list(TOKENS), name="chat-island")
    server.image_island = server.island(IMAGE_CAPS, name="image-island")
    yield server
    server.stop()
    backend.cleanup()


# ------------------------------------------------------------------ the readers
def _headers(last_event_id: str | None) -> dict[str, str]:
    return {"Last-Event-ID": last_event_id} if last_event_id else {}


def js_sdk_events(cl: httpx.Client, path: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    """client.ts streamJob: per network read, split on "\\n\\n", keep `data: ` blocks, parse."""
    out: list[dict[str, Any]] = []
    with cl.stream("GET", path, headers={"Accept": "text/event-stream", **_headers(last_event_id)}) as resp:
        assert resp.status_code == 200
        decoder = codecs.getincrementaldecoder("utf-8")()
        for raw in resp.iter_raw():  # one item per read from the socket, like reader.read()
            chunk = decoder.decode(raw)
            for block in [b for b in chunk.split("\n\n") if b]:
                if block.startswith("data: "):
                    out.append(json.loads(block[6:]))  # JSON.parse: a trailing id: line would throw here
    return out


def node_sdk_events(url: str, key: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    args = [NODE, str(JS_READER), url, key] + ([last_event_id] if last_event_id else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert lines and lines[-1] == "END", (done.stdout[-2000:], done.stderr[-2000:])
    return [json.loads(line) for line in lines[:-1]]


def httpx_sse_events(cl: httpx.Client, path: str, last_event_id: str | None = None,
                     params: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(sse.id, sse.data) for every event httpx-sse dispatches."""
    with connect_sse(cl, "GET", path, headers=_headers(last_event_id), params=params) as source:
        return [(sse.id, sse.data) for sse in source.iter_sse()]


def python_sdk_parse(data: str) -> dict[str, Any]:
    """archipelag.Client._parse_stream_event's checks: json.loads(data) (an empty event raises
    here), StreamEventType(type), Usage(**usage) with integer tokens and a number credits_used."""
    parsed = json.loads(data)
    kind = parsed.get("type", "token")
    if kind not in SDK_TYPES:
        raise ValueError(f"{kind!r} is not a valid StreamEventType")
    if "usage" in parsed:
        usage = parsed["usage"]
        if not isinstance(usage, dict):
            raise TypeError("Usage(**usage) needs an object")
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert usage.get(k) is None or isinstance(usage[k], int), usage
        assert isinstance(usage.get("credits_used", 0.0), (int, float)), usage
    for k in ("content", "chunk", "error", "image_data", "format"):
        assert parsed.get(k) is None or isinstance(parsed[k], str), parsed
    return parsed


def python_sdk_events(cl: httpx.Client, path: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    return [python_sdk_parse(data) for _, data in httpx_sse_events(cl, path, last_event_id)]


def js_view(e: dict[str, Any]) -> tuple:
    """The fields the JS SDK maps (parseStreamEvent), from a raw event."""
    return (e.get("type") or "token", e.get("content") or e.get("chunk"), e.get("step"), e.get("total"),
            e.get("image_data"), e.get("format"), e.get("error"), e.get("id"))


def node_view(e: dict[str, Any]) -> tuple:
    return (e["type"], e.get("content"), e.get("step"), e.get("total"), e.get("imageData"), e.get("imageFormat"),
            e.get("error"), e.get("id"))


def all_readers(srv: LiveServer, key: str, job_id: str, last_event_id: str | None = None) -> dict[str, list[tuple]]:
    path = f"/jobs/{job_id}/stream"
    with srv.client(key) as cl:
        got = {"js": [js_view(e) for e in js_sdk_events(cl, path, last_event_id)],
               "httpx_sse": [js_view(json.loads(d)) for _, d in httpx_sse_events(cl, path, last_event_id)],
               "python_sdk": [js_view(e) for e in python_sdk_events(cl, path, last_event_id)]}
    if NODE:
        got["node"] = [node_view(e) for e in node_sdk_events(srv.url + "/api/v1" + path, key, last_event_id)]
    return got


def run_held(srv: LiveServer, island: Any, key: str, body: dict[str, Any]) -> tuple[str, dict[str, list[tuple]]]:
    """Create a Job, hold its Island ~HOLD_S after it accepted (keep-alives flow), read the
    stream with every reader at once while it is live."""
    results: dict[str, list[tuple]] = {}
    errors: list[BaseException] = []
    island.gate.clear()
    with srv.client(key) as cl:
        job_id = cl.post("/jobs", json=body).json()["data"]["id"]

    def read(name: str) -> None:
        try:
            path = f"/jobs/{job_id}/stream"
            with srv.client(key) as cl:
                if name == "js":
                    results[name] = [js_view(e) for e in js_sdk_events(cl, path)]
                elif name == "httpx_sse":
                    results[name] = [js_view(json.loads(d)) for _, d in httpx_sse_events(cl, path)]
                elif name == "python_sdk":
                    results[name] = [js_view(e) for e in python_sdk_events(cl, path)]
                else:
                    results[name] = [node_view(e) for e in node_sdk_events(srv.url + "/api/v1" + path, key)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    names = ["js", "httpx_sse", "python_sdk"] + (["node"] if NODE else [])
    threads = [threading.Thread(target=read, args=(n,)) for n in names]
    for t in threads:
        t.start()
    wait_for(lambda: island.running)
    time.sleep(HOLD_S)  # > 2 keep-alive intervals with ids already sent
    island.gate.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert set(results) == set(names)
    return job_id, results


def _same_everywhere(results: dict[str, list[tuple]]) -> list[tuple]:
    first = next(iter(results.values()))
    for name, seq in results.items():
        assert seq == first, (name, seq, first)
    ids = [e[-1] for e in first]
    assert all(ids) and len(set(ids)) == len(ids), ids
    return first


# ------------------------------------------------------------------ frames
def test_frame_layout_is_data_line_first_with_the_id_in_the_json():
    data = frames.token_event("hi")
    assert frames.sse_frame("17-3", data) == b'data: {"type":"token","content":"hi","id":"17-3"}\n\n'
    assert frames.sse_frame("17-3", data, id_line=True) == \
        b'data: {"type":"token","content":"hi","id":"17-3"}\nid: 17-3\n\n'
    assert frames.KEEPALIVE == b": ping\n\n"
    assert frames.is_terminal(frames.with_id(frames.done_event({}), "1-1"))
    assert frames.with_id(b"{}", "1-2") == b'{"id":"1-2"}'
    assert frames.with_id(b"[1]", "1-2") == b"[1]" and frames.with_id(b'{"a":1}', 'x"y') == b'{"a":1}'
    assert json.loads(frames.with_id(frames.image_event("QQ==", "png", width=1, seed=2), "9-0"))["id"] == "9-0"


# ------------------------------------------------------------------ live Jobs
def test_chat_job_every_reader_sees_every_event_in_order(srv):
    _, key = srv.account(credits=50)
    job_id, results = run_held(srv, srv.chat_island, key, CHAT)
    seq = _same_everywhere(results)
    kinds = [e[0] for e in seq]
    assert kinds[0] == "status" and kinds[-1] == "done"
    assert [e[1] for e in seq if e[0] == "token"] == TOKENS
    # the finished Job read again (stream still there): same sequence for every reader
    again = _same_everywhere(all_readers(srv, key, job_id))
    assert again == seq


def test_image_job_every_reader_sees_every_event_in_order(srv):
    _, key = srv.account(credits=100, kyc=True)
    job_id, results = run_held(srv, srv.image_island, key, IMAGE)
    seq = _same_everywhere(results)
    kinds = [e[0] for e in seq]
    assert "progress" in kinds and kinds.index("image") < kinds.index("done") == len(kinds) - 1
    image = next(e for e in seq if e[0] == "image")
    assert image[4] and image[5] == "png"
    assert [e[2:4] for e in seq if e[0] == "progress"][-1] == (8, 8)


@pytest.mark.parametrize("kind", ["chat", "image"])
def test_resume_with_last_event_id_every_reader(srv, kind):
    _, key = srv.account(credits=100, kyc=True)
    body = CHAT if kind == "chat" else IMAGE
    with srv.client(key) as cl:
        job_id = cl.post("/jobs", json=body).json()["data"]["id"]
        full = read_sse(cl, f"/jobs/{job_id}/stream")
    assert full[-1].data["type"] == "done" and len(full) >= 4
    ids = [e.id for e in full]
    for cut in (0, len(full) // 2, len(full) - 2):
        got = all_readers(srv, key, job_id, last_event_id=ids[cut])
        seq = _same_everywhere(got)
        assert [e[-1] for e in seq] == ids[cut + 1:], (cut, seq)


def test_resume_after_the_stream_expired_replays_from_the_job(srv):
    _, key = srv.account(credits=50)
    with srv.client(key) as cl:
        job_id = cl.post("/jobs", json=CHAT).json()["data"]["id"]
        read_sse(cl, f"/jobs/{job_id}/stream")
    broker = srv.services.broker
    if broker.kind == "memory":
        broker._streams.pop(job_id)
    else:
        import redis

        r = redis.Redis.from_url(broker.url)
        r.delete(broker.key(job_id))
        r.close()
    seq = _same_everywhere(all_readers(srv, key, job_id))
    assert [e[0] for e in seq] == ["status", "token", "done"] and seq[1][1] == "Hello, world!"
    rest = _same_everywhere(all_readers(srv, key, job_id, last_event_id=seq[0][-1]))
    assert rest == seq[1:]


# ------------------------------------------------------------------ the opt-in id: lines, and why they are not the default
def test_id_lines_opt_in_for_spec_readers(srv):
    _, key = srv.account(credits=50)
    with srv.client(key) as cl:
        job_id = cl.post("/jobs", json=CHAT).json()["data"]["id"]
        plain = httpx_sse_events(cl, f"/jobs/{job_id}/stream")
        lined = httpx_sse_events(cl, f"/jobs/{job_id}/stream", params={"id_lines": "true"})
        bad = cl.get(f"/jobs/{job_id}/stream", params={"id_lines": "perhaps"})
    assert all(sid == "" for sid, _ in plain)  # no id: line by default
    assert [json.loads(d)["id"] for _, d in lined] == [sid for sid, _ in lined]
    assert [d for _, d in lined] == [d for _, d in plain]
    assert bad.status_code == 422 and "id_lines" in bad.text


def test_why_not_id_lines_by_default(srv):
    """Pins the two client behaviours decision 0050 is built on. With id: lines, (1) the
    JS SDK's JSON.parse gets `{...}\\nid: ...` and throws; (2) httpx-sse dispatches an
    empty event for a `: ping` after an id, which the Python SDK's json.loads rejects."""
    _, key = srv.account(credits=50)
    srv.chat_island.gate.clear()
    with srv.client(key) as cl:
        job_id = cl.post("/jobs", json=CHAT).json()["data"]["id"]
        path = f"/jobs/{job_id}/stream"
        box: dict[str, Any] = {}
        t = threading.Thread(target=lambda: box.update(ev=httpx_sse_events(srv.client(key), path,
                                                                           params={"id_lines": "true"})))
        t.start()
        wait_for(lambda: srv.chat_island.running)
        time.sleep(HOLD_S)
        srv.chat_island.gate.set()
        t.join(30)
        with pytest.raises(json.JSONDecodeError):
            [python_sdk_parse(d) for _, d in box["ev"]]
        assert any(d == "" for _, d in box["ev"])
        with pytest.raises(json.JSONDecodeError):
            with cl.stream("GET", path, params={"id_lines": "true"}) as resp:
                for raw in resp.iter_raw():
                    for block in raw.decode().split("\n\n"):
                        if block.startswith("data: "):
                            json.loads(block[6:])
    if NODE:
        out = subprocess.run([NODE, str(JS_READER), f"{srv.url}/api/v1{path}?id_lines=true", key],
                             capture_output=True, text=True, timeout=60).stdout
        assert '"thrown"' in out, out
