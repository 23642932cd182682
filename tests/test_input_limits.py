"""Strict input, every limit at its bound and one past it, and no unbounded waits
(issue #16, deliverable 4). docs/API.md#limits lists the same numbers."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from api.limits import MAX_HEADER_BYTES
from api.schemas import MAX_BATCH_INPUTS
from scheduler.validation import MAX_INPUT_BYTES, MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_TOKENS_LIMIT
from tests.api_harness import LITE_CAPS, LiveServer, make_backend

BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    backend = make_backend("embedded", tmp_path_factory.mktemp("limits"))
    server = LiveServer(backend, COORDINATOR_RATE_LIMIT_PER_MIN="100000", COORDINATOR_CHAT_WAIT_S="30")
    server.island(LITE_CAPS, name="lite")
    yield server
    server.stop()
    backend.cleanup()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    backend = make_backend("embedded", tmp_path_factory.mktemp("small"))
    server = LiveServer(backend, COORDINATOR_MAX_BODY_BYTES=str(BODY_LIMIT))
    yield server
    server.stop()
    backend.cleanup()


@pytest.fixture(scope="module")
def key(srv):
    return srv.account(credits=1_000_000)[1]


def post(srv, key, path, body, **kw):
    with srv.client(key) as cl:
        return cl.post(path, json=body, **kw)


def job(inp):
    return {"workload": "llm-chat-lite", "input": inp}


# ------------------------------------------------------------------ strict input
@pytest.mark.parametrize("inp, field", [
    ({"prompt": "hi", "max_token": 5}, "input.max_token"),
    ({"messages": [{"role": "user"}]}, "input.messages[0].content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "input.messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "input.messages[0].extra"),
    ({"prompt": "hi", "max_tokens": "10"}, "input.max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "input.max_tokens"),
    ({"prompt": "hi", "temperature": 2.5}, "input.temperature"),
    ({"prompt": 5}, "input.prompt"),
])
def test_bad_job_input_is_422_naming_the_field_and_changes_nothing(srv, key, inp, field):
    before = srv.c.scheduler.core.queue_depth() if hasattr(srv.c.scheduler.core, "queue_depth") else None
    r = post(srv, key, "/jobs", job(inp))
    assert r.status_code == 422, r.text
    assert field in r.json()["errors"], r.json()
    if before is not None:
        assert srv.c.scheduler.core.queue_depth() == before


@pytest.mark.parametrize("body, field", [
    ({"model": "llm-chat-lite", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "llm-chat-lite", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"model": "llm-chat-lite", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "llm-chat-lite", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, "max_tokens"),
    ({"model": "llm-chat-lite", "messages": []}, "messages"),
])
def test_bad_chat_completion_is_422_naming_the_field(srv, key, body, field):
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as cl:
        r = cl.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    got = r.json()
    assert any(k.startswith(field) for k in got.get("errors", {})), got


# ------------------------------------------------------------------ limits: at the bound and past it
def test_messages_count(srv, key):
    msgs = [{"role": "user", "content": "m"}] * MAX_MESSAGES
    assert post(srv, key, "/jobs", job({"messages": msgs})).status_code == 201
    r = post(srv, key, "/jobs", job({"messages": msgs + [{"role": "user", "content": "m"}]}))
    assert r.status_code == 422 and "input.messages" in r.json()["errors"]


def test_message_content_chars(srv, key):
    ok = [{"role": "user", "content": "x" * MAX_MESSAGE_CHARS}]
    assert post(srv, key, "/jobs", job({"messages": ok})).status_code == 201
    r = post(srv, key, "/jobs", job({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}))
    assert r.status_code == 422 and "input.messages[0].content" in r.json()["errors"]


def test_max_tokens(srv, key):
    assert post(srv, key, "/jobs", job({"prompt": "p", "max_tokens": MAX_TOKENS_LIMIT})).status_code == 201
    r = post(srv, key, "/jobs", job({"prompt": "p", "max_tokens": MAX_TOKENS_LIMIT + 1}))
    assert r.status_code == 422 and "input.max_tokens" in r.json()["errors"]


def _input_of_size(n: int) -> dict:
    base = len(json.dumps({"prompt": ""}, separators=(",", ":")))
    return {"prompt": "a" * (n - base)}


def test_prompt_length_is_bounded_by_the_input_size(srv, key):
    at = _input_of_size(MAX_INPUT_BYTES)
    assert len(json.dumps(at, separators=(",", ":"))) == MAX_INPUT_BYTES
    assert post(srv, key, "/jobs", job(at)).status_code == 201
    r = post(srv, key, "/jobs", job(_input_of_size(MAX_INPUT_BYTES + 1)))
    assert r.status_code == 413 and "input" in r.json()["errors"], r.text


def test_batch_size(srv, key):
    inputs = [{"prompt": f"b{i}", "max_tokens": 4} for i in range(MAX_BATCH_INPUTS)]
    assert post(srv, key, "/jobs/batch", {"workload": "llm-chat-lite", "inputs": inputs}).status_code == 201
    r = post(srv, key, "/jobs/batch", {"workload": "llm-chat-lite", "inputs": inputs + [{"prompt": "x"}]})
    assert r.status_code == 422 and "inputs" in json.dumps(r.json()["errors"]), r.text


def test_chat_messages_count(srv, key):
    msgs = [{"role": "user", "content": "m"}] * MAX_MESSAGES
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as cl:
        ok = cl.post("/v1/chat/completions", json={"model": "llm-chat-lite", "messages": msgs, "max_tokens": 8})
        assert ok.status_code == 200, ok.text
        r = cl.post("/v1/chat/completions", json={"model": "llm-chat-lite", "messages": msgs + msgs[:1]})
    assert r.status_code == 422


def test_body_size(small):
    _, key = small.account(credits=1_000_000)
    skeleton = json.dumps({"workload": "llm-chat-lite", "input": {"prompt": ""}}).encode()

    def body(n: int) -> bytes:
        return skeleton.replace(b'"prompt": ""', b'"prompt": "' + b"a" * (n - len(skeleton)) + b'"')

    with small.client(key) as cl:
        h = {"content-type": "application/json"}
        at = cl.post("/jobs", content=body(BODY_LIMIT), headers=h)
        assert len(body(BODY_LIMIT)) == BODY_LIMIT and at.status_code != 413, at.text
        past = cl.post("/jobs", content=body(BODY_LIMIT + 1), headers=h)
        assert past.status_code == 413, past.text


def test_header_size(srv, key):
    with httpx.Client(base_url=srv.url + "/api/v1", headers={"Authorization": f"Bearer {key}"}, timeout=30) as cl:
        def sized(n: int) -> httpx.Request:
            req = cl.build_request("GET", "/account", headers={"x-pad": ""})
            used = sum(len(k) + len(v) for k, v in req.headers.raw)
            return cl.build_request("GET", "/account", headers={"x-pad": "p" * (n - used)})

        at = sized(MAX_HEADER_BYTES)
        assert sum(len(k) + len(v) for k, v in at.headers.raw) == MAX_HEADER_BYTES
        assert cl.send(at).status_code == 200
        past = cl.send(sized(MAX_HEADER_BYTES + 1))
        assert past.status_code == 431 and past.json()["error"]["code"] == "headers_too_large"


# ------------------------------------------------------------------ no unbounded waits
def test_chat_completion_for_a_model_no_island_serves_is_answered_at_once(srv, key):
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as cl:
        t0 = time.monotonic()
        r = cl.post("/v1/chat/completions", json={"model": "mistral-7b-instruct",  # llm-chat: no Island here
                                                  "messages": [{"role": "user", "content": "hi"}]})
        took = time.monotonic() - t0
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_island", r.text
    assert r.headers["retry-after"] and took < 2.0
    assert "mistral-7b-instruct" in r.json()["error"]["message"]


def test_the_caller_bounds_a_completions_wait_with_x_wait_s(srv, key):
    isl = srv.islands[0]
    isl.gate.clear()  # the Island accepts and then holds the Job
    try:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}", "X-Wait-S": "2"},
                          timeout=30) as cl:
            t0 = time.monotonic()
            r = cl.post("/v1/chat/completions", json={"model": "llm-chat-lite",
                                                      "messages": [{"role": "user", "content": "hold"}]})
            took = time.monotonic() - t0
        assert r.status_code == 504 and "2 s" in r.json()["error"]["message"], r.text
        assert 1.8 < took < 6, took
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {key}", "X-Wait-S": "0"}) as cl:
            bad = cl.post("/v1/chat/completions", json={"model": "llm-chat-lite",
                                                        "messages": [{"role": "user", "content": "x"}]})
        assert bad.status_code == 422 and "X-Wait-S" in bad.json()["errors"]
    finally:
        isl.gate.set()
