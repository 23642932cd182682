"""End to end over HTTP, on the embedded default and on PostgreSQL + Redis: a Job created
over HTTP, run by an in-process test Island through the real scheduler, streamed over
SSE token by token, settled in the ledger; late clients, Last-Event-ID resume, stream
expiry; batches (10 children, max_parallelism 2; fail_fast); images; the official
`openai` client, plain and streaming."""

from __future__ import annotations

import json
import threading
import uuid

import openai
import pytest

from ledger import audit
from store.factory import iter_log
from tests.api_harness import IMAGE_CAPS, LITE_CAPS, LiveServer, SseEvent, make_backend, read_sse, wait_for

CHAT = {"workload": "llm-chat", "input": {"prompt": "Say hello", "max_tokens": 64}}
TOKENS = ["Hello", ",", " world", "!"]


@pytest.fixture(scope="module", params=["embedded", "pg_redis"])
def srv(request, tmp_path_factory):
    backend = make_backend(request.param, tmp_path_factory.mktemp(request.param))
    server = LiveServer(backend, COORDINATOR_RATE_LIMIT_PER_MIN="100000")  # tests poll; limits: test_api_contract
    server.chat_island = server.island(tokens=list(TOKENS), name="chat-island")
    server.image_island = server.island(IMAGE_CAPS, name="image-island")
    yield server
    server.stop()
    backend.cleanup()


def kinds(events: list[SseEvent]) -> list[str]:
    return [e.data["type"] for e in events]


def statuses(events: list[SseEvent]) -> list[str]:
    return [e.data["content"] for e in events if e.data["type"] == "status"]


def verify_ledger(srv: LiveServer) -> None:
    f = audit.fold(iter_log(srv.c.app, topics=audit.LEDGER_TOPICS), check=True)
    assert not f.violations, f.violations[:3]
    assert f.summary()["sum_micro"] == 0


def test_job_streams_token_by_token_and_settles(srv):
    account, key = srv.account(credits=50)
    with srv.client(key) as cl:
        before = cl.get("/account").json()["data"]["credits"]
        srv.chat_island.gate.clear()  # hold the Island until the stream is open
        job = cl.post("/jobs", json=CHAT).json()["data"]
        events: list[SseEvent] = []
        reader = threading.Thread(target=lambda: events.extend(read_sse(cl, f"/jobs/{job['id']}/stream")))
        reader.start()
        wait_for(lambda: srv.chat_island.running)
        srv.chat_island.gate.set()
        reader.join(20)
        assert kinds(events)[-1] == "done", events
        assert statuses(events)[:3] == ["queued", "assigned", "running"]
        assert statuses(events)[-1] == "completed"
        assert [e.data["content"] for e in events if e.data["type"] == "token"] == TOKENS  # one event per token
        assert set(kinds(events)) <= {"token", "status", "progress", "image", "error", "done"}
        ids = [e.id for e in events]
        assert all(ids) and len(set(ids)) == len(ids)
        usage = events[-1].data["usage"]
        assert usage["prompt_tokens"] == 7 and usage["completion_tokens"] == 4 and usage["total_tokens"] == 11
        assert isinstance(usage["credits_used"], (int, float)) and usage["credits_used"] > 0

        done = wait_for(lambda: (j := cl.get(f"/jobs/{job['id']}").json()["data"])["status"] == "completed" and j)
        assert done["output"] == "Hello, world!" and done["error"] is None
        assert done["usage"]["credits_used"] == usage["credits_used"] == done["credits_charged"]
        assert done["island_name"] == "chat-island" and done["started_at"] and done["completed_at"]
        assert done["duration_ms"] is not None and done["duration_ms"] >= 0
        after = cl.get("/account").json()["data"]
        assert after["held"] == 0
        assert after["credits"] == pytest.approx(before - usage["credits_used"], abs=1e-6)
    verify_ledger(srv)


def test_late_client_gets_everything_and_resume_has_no_gaps_or_repeats(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        job = cl.post("/jobs", json=CHAT).json()["data"]
        wait_for(lambda: cl.get(f"/jobs/{job['id']}").json()["data"]["status"] == "completed")
        full = read_sse(cl, f"/jobs/{job['id']}/stream")
        assert statuses(full)[:3] == ["queued", "assigned", "running"] and kinds(full)[-1] == "done"
        assert [e.data["content"] for e in full if e.data["type"] == "token"] == TOKENS
        again = read_sse(cl, f"/jobs/{job['id']}/stream")
        assert [(e.id, e.data) for e in again] == [(e.id, e.data) for e in full]
        for cut in (0, 2, len(full) - 2):
            rest = read_sse(cl, f"/jobs/{job['id']}/stream", last_event_id=full[cut].id)
            assert [(e.id, e.data) for e in rest] == [(e.id, e.data) for e in full[cut + 1:]]


def test_live_resume_after_disconnect(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        srv.chat_island.gate.clear()
        job = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "slow", "max_tokens": 64}}).json()
        job_id = job["data"]["id"]
        first = read_sse(cl, f"/jobs/{job_id}/stream", limit=2)  # queued, assigned: then hang up
        srv.chat_island.gate.set()
        rest = read_sse(cl, f"/jobs/{job_id}/stream", last_event_id=first[-1].id)
        whole = first + rest
        assert statuses(whole)[:3] == ["queued", "assigned", "running"]
        assert [e.data["content"] for e in whole if e.data["type"] == "token"] == TOKENS
        assert kinds(whole)[-1] == "done"


def test_stream_gone_replays_from_the_job(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        job = cl.post("/jobs", json=CHAT).json()["data"]
        wait_for(lambda: cl.get(f"/jobs/{job['id']}").json()["data"]["status"] == "completed")
        read_sse(cl, f"/jobs/{job['id']}/stream")
        broker = srv.services.broker
        if broker.kind == "memory":
            broker._streams.pop(job["id"])
        else:
            import redis

            r = redis.Redis.from_url(broker.url)
            assert r.delete(broker.key(job["id"])) == 1
            r.close()
        events = read_sse(cl, f"/jobs/{job['id']}/stream")
        assert kinds(events) == ["status", "token", "done"]
        assert events[1].data["content"] == "Hello, world!"
        assert events[2].data["usage"]["completion_tokens"] == 4
        rest = read_sse(cl, f"/jobs/{job['id']}/stream", last_event_id=events[0].id)
        assert kinds(rest) == ["token", "done"]


def test_failed_job_streams_error_and_releases_the_hold(srv):
    _, key = srv.account()
    srv.island(LITE_CAPS, name="lite-1")
    with srv.client(key) as cl:
        job = cl.post("/jobs", json={"workload": "llm-chat-lite", "input": {"prompt": "fail please"}}).json()["data"]
        events = read_sse(cl, f"/jobs/{job['id']}/stream")
        assert kinds(events)[-1] == "error" and "test island failure" in events[-1].data["error"]
        got = cl.get(f"/jobs/{job['id']}").json()["data"]
        assert got["status"] == "failed" and got["error"]
        assert cl.get("/account").json()["data"]["held"] == 0


def test_image_job_progress_image_and_output(srv):
    _, key = srv.account(credits=100, kyc=True)
    with srv.client(key) as cl:
        body = {"workload": "sdxl", "input": {"prompt": "a cat", "width": 1024, "height": 768, "steps": 8,
                                              "guidance_scale": 7.0, "seed": 7}}
        job = cl.post("/jobs", json=body).json()["data"]
        events = read_sse(cl, f"/jobs/{job['id']}/stream")
        assert "progress" in kinds(events) and "image" in kinds(events) and kinds(events)[-1] == "done"
        progress = [e.data for e in events if e.data["type"] == "progress"]
        assert progress[-1] == {"type": "progress", "step": 8, "total": 8}
        image = next(e.data for e in events if e.data["type"] == "image")
        assert image["format"] == "png" and image["image_data"]
        got = cl.get(f"/jobs/{job['id']}").json()["data"]
        assert got["status"] == "completed" and isinstance(got["output"], str)
        out = json.loads(got["output"])
        assert set(out) >= {"image_data", "format", "width", "height", "seed"}
        assert out["width"] == 1024 and out["height"] == 768 and out["seed"] == 7
        assert got["usage"]["credits_used"] > 0


def test_retry_runs_a_finished_jobs_input_again(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        job = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "echo:again"}}).json()["data"]
        wait_for(lambda: cl.get(f"/jobs/{job['id']}").json()["data"]["status"] == "completed")
        retried = cl.post(f"/jobs/{job['id']}/retry")
        assert retried.status_code == 201
        new_id = retried.json()["data"]["id"]
        assert new_id != job["id"]
        done = wait_for(lambda: (j := cl.get(f"/jobs/{new_id}").json()["data"])["status"] == "completed" and j)
        assert done["output"] == "again"


def test_batch_of_10_with_max_parallelism_2(srv):
    _, key = srv.account(credits=500)
    island = srv.chat_island
    island.max_running = island.running
    with srv.client(key) as cl:
        inputs = [{"prompt": f"slow {i}", "max_tokens": 32} for i in range(10)]
        made = cl.post("/jobs/batch", json={"workload": "llm-chat", "inputs": inputs, "merge_strategy": "concat",
                                             "fail_mode": "best_effort", "max_parallelism": 2, "region": "eu",
                                             "bid_price": "4"})  # a budget: credits per 1k tokens (#13)
        assert made.status_code == 201, made.text
        batch = made.json()
        assert "data" not in batch  # no envelope
        assert batch["batch"]["chunk_count"] == 10 and batch["batch"]["merge_strategy"] == "concat"
        assert batch["batch"]["fail_mode"] == "best_effort" and batch["workload"] == "llm-chat"
        assert len(batch["children"]) == 10
        assert sorted(c["batch_index"] for c in batch["children"]) == list(range(10))
        assert sum(c["state"] == "pending" for c in batch["children"]) == 8
        parent_events = read_sse(cl, f"/jobs/{batch['id']}/stream", timeout_s=30)
        assert kinds(parent_events)[-1] == "done"
        progress = [e.data["step"] for e in parent_events if e.data["type"] == "progress"]
        assert progress == sorted(progress) and progress[-1] == 10
        status = cl.get(f"/jobs/{batch['id']}/batch-status")
        assert status.status_code == 200
        st = status.json()
        assert st["parent_id"] == batch["id"] and st["parent_state"] == "succeeded" and st["chunk_count"] == 10
        assert st["child_states"]["succeeded"] == 10 and st["child_states"]["failed"] == 0
        assert all(c["state"] == "succeeded" and c["host_id"] for c in st["children"])
        parent = cl.get(f"/jobs/{batch['id']}").json()["data"]
        assert parent["status"] == "completed" and parent["output"] == "\n".join(["Hello, world!"] * 10)
        assert parent["usage"]["completion_tokens"] == 40
        assert island.max_running <= 2, island.max_running
        child = cl.get(f"/jobs/{batch['children'][3]['id']}").json()["data"]
        assert child["parent_id"] == batch["id"] and child["batch_index"] == 3
        assert cl.get("/account").json()["data"]["held"] == 0
    verify_ledger(srv)


def test_batch_fail_fast_and_flatten(srv):
    _, key = srv.account(credits=500)
    srv.island(LITE_CAPS, name="lite-2")
    with srv.client(key) as cl:
        inputs = [{"prompt": "echo:[1, 2]"}, {"prompt": "fail now"}, *[{"prompt": "slow"} for _ in range(4)]]
        made = cl.post("/jobs/batch", json={"workload": "llm-chat-lite", "inputs": inputs, "merge_strategy": "flatten",
                                             "fail_mode": "fail_fast", "max_parallelism": 2}).json()
        events = read_sse(cl, f"/jobs/{made['id']}/stream", timeout_s=30)
        assert kinds(events)[-1] == "error"
        st = cl.get(f"/jobs/{made['id']}/batch-status").json()
        assert st["parent_state"] == "failed"
        assert st["child_states"]["failed"] == 1 and st["child_states"]["cancelled"] >= 1
        parent = cl.get(f"/jobs/{made['id']}").json()["data"]
        assert parent["status"] == "failed" and "child 1 failed" in parent["error"]
        assert cl.get("/account").json()["data"]["held"] == 0
        # best effort + flatten: failed children contribute nothing, arrays are spliced
        srv.island(LITE_CAPS, name="lite-3")
        made = cl.post("/jobs/batch", json={"workload": "llm-chat-lite", "merge_strategy": "flatten",
                                             "inputs": [{"prompt": "echo:[1, 2]"}, {"prompt": "fail"},
                                                        {"prompt": "echo:\"x\""}]}).json()
        read_sse(cl, f"/jobs/{made['id']}/stream", timeout_s=30)
        parent = cl.get(f"/jobs/{made['id']}").json()["data"]
        assert parent["status"] == "completed" and json.loads(parent["output"]) == [1, 2, "x"]
        assert cl.get(f"/jobs/{made['id']}/batch-status").json()["parent_state"] == "succeeded"


def test_batch_cancel_and_402_for_the_whole_batch(srv):
    _, key = srv.account(credits=0)  # 5 sign-up credits
    with srv.client(key) as cl:
        refused = cl.post("/jobs/batch", json={"workload": "llm-chat",
                                                "inputs": [{"prompt": "x", "max_tokens": 16}] * 3})
        assert refused.status_code == 402 and refused.json()["error"]["required"] == 15
        assert refused.json()["error"]["available"] == 5
        assert cl.get("/account").json()["data"]["held"] == 0  # all or nothing
    _, key = srv.account(credits=100)
    with srv.client(key) as cl:
        srv.chat_island.gate.clear()
        made = cl.post("/jobs/batch", json={"workload": "llm-chat", "max_parallelism": 1,
                                             "inputs": [{"prompt": "x"}] * 3}).json()
        cancelled = cl.delete(f"/jobs/{made['id']}")
        srv.chat_island.gate.set()
        assert cancelled.status_code == 200 and cancelled.json()["data"]["status"] == "cancelled"
        st = cl.get(f"/jobs/{made['id']}/batch-status").json()
        assert st["parent_state"] == "cancelled"
        wait_for(lambda: cl.get("/account").json()["data"]["held"] == 0)


# ------------------------------------------------------------------ the official openai client
def test_openai_client_plain_and_streaming(srv):
    _, key = srv.account(credits=100)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)
    resp = client.chat.completions.create(model="llm-chat", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=64, temperature=0.2)
    assert resp.choices[0].message.content == "Hello, world!"
    assert resp.choices[0].finish_reason == "stop" and resp.object == "chat.completion"
    assert resp.usage.completion_tokens == 4 and resp.usage.total_tokens == 11
    chunks = list(client.chat.completions.create(model="mistral-7b-instruct", stream=True,
                                                 messages=[{"role": "system", "content": "be brief"},
                                                           {"role": "user", "content": "hi"}],
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    models = [m.id for m in client.models.list()]
    assert {"llm-chat", "llm-chat-lite", "mistral-7b-instruct"} <= set(models) and "sdxl" not in models
    assert client.models.retrieve("llm-chat").id == "llm-chat"
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.body["code"] == "model_not_found" or nf.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="llm-chat", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=100_000)
    also = openai.OpenAI(base_url=srv.url + "/api/v1", api_key=key, max_retries=0)
    assert also.chat.completions.create(model="llm-chat", messages=[{"role": "user", "content": "x"}]) \
        .choices[0].message.content == "Hello, world!"


def test_openai_errors_in_openai_shape(srv):
    _, poor = srv.account(credits=0, kyc=False)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=poor, max_retries=0)
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="llm-chat", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4096)
    assert exc.value.status_code == 402
    err = exc.value.response.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["code"] == "free_tier_exhausted"
    bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="ak_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    _, key = srv.account()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
    srv.island(LITE_CAPS, name="lite-4")
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model="llm-chat-lite", messages=[{"role": "user", "content": "fail"}])
    assert exc.value.status_code == 502
    srv.island(LITE_CAPS, name="lite-5")
    stream = client.chat.completions.create(model="llm-chat-lite", stream=True,
                                            messages=[{"role": "user", "content": "fail"}])
    with pytest.raises(openai.APIError):
        list(stream)
    assert uuid.UUID(str(uuid.uuid4()))
