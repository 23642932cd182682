"""Contract tests over HTTP (api-contract.md): every endpoint and every error status, on
the embedded default and on PostgreSQL + Redis. One server per backend for the module;
each test works with accounts and keys of its own."""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from tests.api_harness import IMAGE_CAPS, LiveServer, make_backend, wait_for

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$")
CHAT = {"workload": "llm-chat", "input": {"prompt": "Say hello", "max_tokens": 64}}
IMAGE = {"workload": "sdxl", "input": {"prompt": "a cat", "width": 1024, "height": 1024, "steps": 20,
                                       "guidance_scale": 7.5}}


@pytest.fixture(scope="module", params=["embedded", "pg_redis"])
def srv(request, tmp_path_factory):
    backend = make_backend(request.param, tmp_path_factory.mktemp(request.param))
    server = LiveServer(backend, COORDINATOR_MAX_BODY_BYTES="200000")
    yield server
    server.stop()
    backend.cleanup()


def error_of(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["code"], str)
    if code is not None:
        assert body["error"]["code"] == code, body
    return body


# ------------------------------------------------------------------ transport, auth
def test_health_and_openapi_need_no_key(srv):
    with srv.client(None) as cl:
        r = cl.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert r.json()["database"] == "ok" and r.json()["broker"] == "ok"
        schema = cl.get("/schema/openapi.json")
        assert schema.status_code == 200
        assert "/api/v1/jobs" in schema.json()["paths"]


@pytest.mark.parametrize("header", [None, "Bearer ak_doesnotexist", "Bearer not-a-key", "Basic abc", "Bearer"])
def test_401_bad_or_missing_key(srv, header):
    headers = {"Authorization": header} if header is not None else {}
    with httpx.Client(base_url=srv.url + "/api/v1", headers=headers) as cl:
        error_of(cl.get("/account"), 401, "unauthorized")
        error_of(cl.post("/jobs", json=CHAT), 401, "unauthorized")


def test_401_revoked_key_at_once_and_expired_key(srv):
    account, key = srv.account()
    with srv.client(key) as cl:
        created = cl.post("/api-keys", json={"name": "second"})
        assert created.status_code == 201
        body = created.json()
        second = body["key"]
        assert second.startswith("ak_") and len(second) >= 40
        assert body["data"]["prefix"] == second[:8] and body["data"]["name"] == "second"
        with srv.client(second) as cl2:
            assert cl2.get("/account").status_code == 200
            revoked = cl.delete(f"/api-keys/{body['data']['id']}")
            assert revoked.status_code == 200 and revoked.json()["data"]["id"] == body["data"]["id"]
            error_of(cl2.get("/account"), 401, "unauthorized")
        assert body["data"]["id"] not in [k["id"] for k in cl.get("/api-keys").json()["data"]]
    # expired
    secret, _ = srv.services.keys.issue(account, "short", None, expires_at_ms=srv.c.clock.now_ms() + 300)
    with srv.client(secret) as cl3:
        assert cl3.get("/account").status_code == 200
        time.sleep(0.35)
        error_of(cl3.get("/account"), 401)


def test_403_key_lacks_scope(srv):
    _, key = srv.account(scopes=["read"])
    with srv.client(key) as cl:
        assert cl.get("/account").status_code == 200
        error_of(cl.post("/jobs", json=CHAT), 403, "insufficient_scope")


def test_404_405_from_the_router_in_contract_shape(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        error_of(cl.get("/no-such-thing"), 404, "not_found")
        error_of(cl.put("/jobs"), 405, "method_not_allowed")


def test_413_body_too_large(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        big = {"workload": "llm-chat", "input": {"prompt": "x" * 250_000}}
        error_of(cl.post("/jobs", json=big), 413, "payload_too_large")


def test_422_validation_with_errors(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        body = error_of(cl.post("/jobs", json={"workload": "llm-chat",
                                               "input": {"prompt": "", "max_tokens": 99999, "temperature": 9}}), 422)
        assert {"input.max_tokens", "input.temperature", "input.prompt"} <= set(body["errors"])
        assert all(isinstance(m, list) and m for m in body["errors"].values())
        body = error_of(cl.post("/jobs", json={"workload": 12, "input": {}}), 422, "validation_failed")
        assert "workload" in body["errors"]
        body = error_of(cl.post("/jobs", content=b"{not json", headers={"content-type": "application/json"}), 422)
        assert "body" in body["errors"]
        body = error_of(cl.post("/jobs", json={"workload": "no-such-cargo", "input": {"prompt": "x"}}), 422)
        assert "workload" in body["errors"]
        body = error_of(cl.post("/jobs/batch", json={"workload": "llm-chat", "inputs": []}), 422)
        body = error_of(cl.post("/jobs/batch", json={"workload": "llm-chat",
                                                     "inputs": [{"prompt": "a"}, {"prompt": ""}]}), 422)
        assert any(k.startswith("inputs[1]") for k in body["errors"]), body


def test_429_rate_limited_with_retry_after(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        first = cl.get("/workloads")
        assert first.headers["X-RateLimit-Limit"] == "100"
        assert int(first.headers["X-RateLimit-Remaining"]) == 99
        assert int(first.headers["X-RateLimit-Reset"]) >= int(time.time())
        statuses = [cl.get("/workloads").status_code for _ in range(99)]
        assert statuses == [200] * 99
        limited = cl.get("/workloads")
        error_of(limited, 429, "rate_limited")
        assert limited.headers["Retry-After"].isdigit() and int(limited.headers["Retry-After"]) >= 1
        assert limited.headers["X-RateLimit-Remaining"] == "0"
    _, other = srv.account()
    with srv.client(other) as cl:  # per key
        assert cl.get("/workloads").status_code == 200


# ------------------------------------------------------------------ account, workloads
def test_account(srv):
    account, key = srv.account(credits="7.5", kyc=False)
    with srv.client(key) as cl:
        r = cl.get("/account")
        assert r.status_code == 200
        data = r.json()["data"]
        assert data["id"] == str(account)
        assert data["credits"] == 12.5  # 7.5 granted + 5 free-tier sign-up credits
        assert ISO.match(data["created_at"]), data["created_at"]
        assert data["held"] == 0 and data["kyc_verified"] is False and data["free_tier_remaining"] == 5
        assert data["low_balance"] is False
        assert '"credits":12.5' in r.text  # a JSON number, not a string
    _, poor = srv.account(credits=0, kyc=True)
    with srv.client(poor) as cl:
        data = cl.get("/account").json()["data"]
        assert data["low_balance"] is True and data["credits"] == 5


def test_workloads(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        items = cl.get("/workloads").json()["data"]
        slugs = {w["slug"]: w for w in items}
        assert {"llm-chat", "sdxl"} <= set(slugs)
        w = slugs["llm-chat"]
        assert isinstance(w["id"], int) and w["runtime_type"] in ("container", "wasm")
        assert isinstance(w["price_per_job"], (int, float)) and w["is_enabled"] is True
        for key_name in ("name", "description", "required_vram_mb", "required_ram_mb"):
            assert key_name in w
        one = cl.get("/workloads/sdxl")
        assert one.status_code == 200 and one.json()["data"]["slug"] == "sdxl"
        error_of(cl.get("/workloads/nope"), 404)


# ------------------------------------------------------------------ jobs
def test_create_get_list_cancel_job(srv):
    account, key = srv.account()
    with srv.client(key) as cl:
        created = cl.post("/jobs", json=CHAT)
        assert created.status_code == 201, created.text
        job = created.json()["data"]
        for k in ("id", "workload_id", "workload_slug", "status", "input", "output", "error", "created_at",
                  "started_at", "completed_at", "duration_ms", "usage"):
            assert k in job
        assert job["workload_slug"] == "llm-chat" and job["workload_id"] == 1
        assert job["status"] in ("pending", "queued") and job["output"] is None and job["usage"] is None
        assert ISO.match(job["created_at"])
        got = cl.get(f"/jobs/{job['id']}")  # never 404 right after the POST
        assert got.status_code == 200 and got.json()["data"]["id"] == job["id"]
        listed = cl.get("/jobs", params={"limit": 5})
        assert listed.status_code == 200
        assert [j["id"] for j in listed.json()["data"]][:1] == [job["id"]]
        second = cl.post("/jobs", json=CHAT).json()["data"]
        ids = [j["id"] for j in cl.get("/jobs").json()["data"]]
        assert ids[:2] == [second["id"], job["id"]]  # newest first
        assert [j["id"] for j in cl.get("/jobs", params={"limit": 1, "offset": 1}).json()["data"]] == [job["id"]]
        cancelled = cl.delete(f"/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["data"]["status"] == "cancelled"
        again = cl.delete(f"/jobs/{job['id']}")
        assert again.status_code == 200 and again.json()["data"]["status"] == "cancelled"
        error_of(cl.get("/jobs", params={"limit": 0}), 422)
        acct = cl.get("/account").json()["data"]
        assert acct["held"] > 0  # the second job still holds its worst case
        cl.delete(f"/jobs/{second['id']}")
        assert cl.get("/account").json()["data"]["held"] == 0


def test_another_accounts_job_is_404(srv):
    _, key_a = srv.account()
    _, key_b = srv.account()
    with srv.client(key_a) as a, srv.client(key_b) as b:
        job = a.post("/jobs", json=CHAT).json()["data"]
        error_of(b.get(f"/jobs/{job['id']}"), 404, "not_found")
        error_of(b.delete(f"/jobs/{job['id']}"), 404)
        error_of(b.get(f"/jobs/{job['id']}/stream"), 404)
        error_of(b.post(f"/jobs/{job['id']}/retry"), 404)
        error_of(b.get(f"/jobs/{job['id']}/batch-status"), 404)
        assert job["id"] not in [j["id"] for j in b.get("/jobs").json()["data"]]
        error_of(a.get(f"/jobs/{uuid.uuid4()}"), 404)
        error_of(a.get("/jobs/not-a-uuid"), 404)
        a.delete(f"/jobs/{job['id']}")


def test_402_insufficient_credits_with_required_and_available(srv):
    _, key = srv.account(credits=0, kyc=True)  # 5 sign-up credits only
    with srv.client(key) as cl:
        body = error_of(cl.post("/jobs", json=IMAGE), 402, "insufficient_credits")
        assert isinstance(body["error"]["required"], (int, float)) and body["error"]["required"] > 5
        assert body["error"]["available"] == 5


def test_402_free_tier_then_403_kyc_required(srv):
    _, key = srv.account(credits=100, kyc=False)
    with srv.client(key) as cl:
        big = {"workload": "llm-chat", "input": {"prompt": "hi", "max_tokens": 4096}}
        body = error_of(cl.post("/jobs", json=big), 402, "free_tier_exhausted")
        assert body["error"]["required"] > 5 and body["error"]["available"] == 5
        error_of(cl.post("/jobs", json=IMAGE), 403, "kyc_required")  # images always need KYC
        small = {"workload": "llm-chat", "input": {"prompt": "hi", "max_tokens": 16}}
        job = cl.post("/jobs", json=small)
        assert job.status_code == 201  # holds 5: the whole free tier
        error_of(cl.post("/jobs", json=small), 403, "kyc_required")  # free tier used up
        cl.delete(f"/jobs/{job.json()['data']['id']}")


def test_403_account_suspended(srv):
    account, key = srv.account()
    srv.c.ledger.set_suspended(account, True, by="test", reason="test")
    with srv.client(key) as cl:
        error_of(cl.post("/jobs", json=CHAT), 403, "account_suspended")
        assert cl.get("/account").json()["data"]["suspended"] is True


def test_idempotency_key_returns_the_first_answer(srv):
    _, key = srv.account(credits=100)
    with srv.client(key) as cl:
        h = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
        first = cl.post("/jobs", json=CHAT, headers=h)
        second = cl.post("/jobs", json=CHAT, headers=h)
        assert first.status_code == second.status_code == 201
        assert first.json() == second.json()
        assert second.headers.get("Idempotent-Replayed") == "true"
        held = cl.get("/account").json()["data"]["held"]
        assert held == first.json()["data"]["credits_held"]  # charged (held) once
        error_of(cl.post("/jobs", json={**CHAT, "input": {"prompt": "other"}}, headers=h), 409,
                 "idempotency_conflict")
        cl.delete(f"/jobs/{first.json()['data']['id']}")


def test_retry_of_unfinished_job_is_409(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        job = cl.post("/jobs", json=CHAT).json()["data"]
        error_of(cl.post(f"/jobs/{job['id']}/retry"), 409, "job_not_finished")
        cl.delete(f"/jobs/{job['id']}")
        retried = cl.post(f"/jobs/{job['id']}/retry")
        assert retried.status_code == 201
        new = retried.json()["data"]
        assert new["id"] != job["id"] and new["input"] == job["input"]
        cl.delete(f"/jobs/{new['id']}")


def test_api_keys_list_create_delete(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        keys = cl.get("/api-keys").json()["data"]
        assert len(keys) == 1 and set(keys[0]) >= {"id", "name", "prefix", "created_at", "last_used_at",
                                                  "expires_at"}
        assert keys[0]["prefix"] == key[:8]
        assert keys[0]["last_used_at"] is not None and ISO.match(keys[0]["last_used_at"])
        exp = (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()
        made = cl.post("/api-keys", json={"name": "ci", "scopes": ["read"], "expires_at": exp})
        assert made.status_code == 201 and made.json()["data"]["expires_at"] is not None
        assert made.json()["data"]["scopes"] == ["read"]
        error_of(cl.post("/api-keys", json={"name": ""}), 422)
        error_of(cl.post("/api-keys", json={"name": "x", "expires_at": "2001-01-01T00:00:00Z"}), 422)
        error_of(cl.delete(f"/api-keys/{uuid.uuid4()}"), 404)
        deleted = cl.delete(f"/api-keys/{made.json()['data']['id']}")
        assert deleted.status_code == 200 and deleted.json()["data"]["revoked_at"] is not None
        assert cl.delete(f"/api-keys/{made.json()['data']['id']}").status_code == 200  # idempotent
    _, other = srv.account()
    with srv.client(other) as cl:
        error_of(cl.delete(f"/api-keys/{keys[0]['id']}"), 404)  # another account's key


def test_queue_full_is_429_with_retry_after(srv):
    import dataclasses

    _, key = srv.account(credits=1000)
    old = srv.c.scheduler.config
    srv.c.scheduler.config = dataclasses.replace(old, max_queued_per_account=2, max_queued_total=old.max_queued_total)
    try:
        with srv.client(key) as cl:
            ids = [cl.post("/jobs", json=CHAT).json()["data"]["id"] for _ in range(2)]
            wait_for(lambda: srv.c.scheduler.core.queue.account_backlog(
                str(srv.c.scheduler.core.jobs[uuid.UUID(ids[0])].account_id)) >= 2)
            limited = cl.post("/jobs", json=CHAT)
            error_of(limited, 429, "queue_full")
            assert limited.headers["Retry-After"].isdigit()
            for i in ids:
                cl.delete(f"/jobs/{i}")
    finally:
        srv.c.scheduler.config = old


def test_image_job_needs_no_island_to_be_admitted(srv):
    _, key = srv.account(credits=100, kyc=True)
    with srv.client(key) as cl:
        job = cl.post("/jobs", json=IMAGE)
        assert job.status_code == 201
        assert job.json()["data"]["workload_slug"] == "sdxl"
        cl.delete(f"/jobs/{job.json()['data']['id']}")
    assert IMAGE_CAPS["cargos"] == ["sdxl"]


def test_409_disabled_workload_and_workloads_follow_the_kill_switch(srv):
    _, key = srv.account()
    sched = srv.c.scheduler
    sched.set_cargo_enabled("llm-chat-lite", False, by="test", reason="contract test")
    try:
        wait_for(lambda: not sched.catalog.by_slug("llm-chat-lite").enabled)
        with srv.client(key) as cl:
            error_of(cl.post("/jobs", json={"workload": "llm-chat-lite", "input": {"prompt": "x"}}), 409,
                     "workload_disabled")
            assert cl.get("/workloads/llm-chat-lite").json()["data"]["is_enabled"] is False
    finally:
        sched.set_cargo_enabled("llm-chat-lite", True, by="test", reason="contract test done")
        wait_for(lambda: sched.catalog.by_slug("llm-chat-lite").enabled)
