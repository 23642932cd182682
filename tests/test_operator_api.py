"""The operator API (/api/v1/admin) and /metrics: the operator token, never a consumer
key; every action names the operator and the reason and takes effect at once."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api_harness import LiveServer, make_backend

ADMIN = "admin-token-for-tests-0123456789"


@pytest.fixture(params=["embedded", "pg_redis"])
def server(request, tmp_path):
    srv = LiveServer(make_backend(request.param, tmp_path), COORDINATOR_ADMIN_TOKEN=ADMIN)
    yield srv
    srv.stop()


def admin(srv: LiveServer, token: str | None = ADMIN) -> httpx.Client:
    headers = {"X-Operator": "alice"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=srv.url + "/api/v1/admin", headers=headers, timeout=30)


def test_operator_endpoints_refuse_consumer_keys_and_missing_tokens(server):
    _, key = server.account()
    for token in (key, None, "wrong-token-wrong-token"):
        with admin(server, token) as a:
            r = a.get("/queue")
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "unauthorized"
            assert a.post("/accounts", json={"email": "x@y.z"}).status_code == 401


def test_operator_actions_take_effect_and_are_recorded(server):
    with admin(server) as a:
        r = a.post("/accounts", json={"email": "bob@example.org", "credits": "12.5"})
        assert r.status_code == 201, r.text
        body = r.json()
        account_id, key = body["data"]["account_id"], body["api_key"]
        assert a.post("/accounts", json={"email": "bob@example.org"}).status_code == 409
        consumer = server.client(key)
        assert consumer.get("/account").json()["data"]["credits"] == 17.5  # + free-tier sign-up credits

        r = a.post(f"/accounts/{account_id}/credits", json={"amount": "2.5", "reason": "support ticket 7"})
        assert r.status_code == 200 and r.json()["data"]["credits"] == 20
        assert a.post(f"/accounts/{account_id}/credits", json={"amount": "-1", "reason": "x"}).status_code == 422
        assert a.post(f"/accounts/{account_id}/credits", json={"amount": "1", "reason": ""}).status_code == 422
        assert a.post("/accounts/not-an-id/credits", json={"amount": "1", "reason": "x"}).status_code == 404

        assert a.post(f"/accounts/{account_id}/kyc", json={"verified": True, "reason": "passport"}).json()[
            "data"]["changed"]
        assert consumer.get("/account").json()["data"]["kyc_verified"] is True

        assert a.post(f"/accounts/{account_id}/suspension", json={"suspended": True, "reason": "abuse"}).json()[
            "data"]["changed"]
        r = consumer.post("/jobs", json={"workload": "llm-chat-lite", "input": {"prompt": "hi"}})
        assert r.status_code == 403 and r.json()["error"]["code"] == "account_suspended"
        a.post(f"/accounts/{account_id}/suspension", json={"suspended": False, "reason": "appeal granted"})

        assert a.post("/cargos/llm-chat-lite/disable", json={"reason": "incident 12"}).json()["data"]["changed"]
        r = consumer.post("/jobs", json={"workload": "llm-chat-lite", "input": {"prompt": "hi"}})
        assert r.status_code == 409, r.text
        assert a.post("/cargos/no-such-cargo/disable", json={"reason": "x"}).status_code == 404
        a.post("/cargos/llm-chat-lite/enable", json={"reason": "fixed"})
        r = consumer.post("/jobs", json={"workload": "llm-chat-lite", "input": {"prompt": "hi"}})
        assert r.status_code == 201, r.text

        island = server.island()
        deadline = time.monotonic() + 15
        rows: list = []
        while time.monotonic() < deadline:
            rows = a.get("/islands").json()["data"]
            if any(row["island_id"] == island.island_id for row in rows):
                break
            time.sleep(0.1)
        assert any(row["island_id"] == island.island_id for row in rows)
        assert a.post(f"/islands/{island.island_id}/suspend", json={"reason": "bad output"}).json()[
            "data"]["approval"] == "suspended"

        tb = a.get("/ledger/trial-balance").json()["data"]
        assert tb["balanced"] is True and tb["total"] == 0
        assert "llm-chat-lite" in a.get("/queue").json()["data"]
        statement = a.get(f"/ledger/statement/{account_id}").json()["data"]
        assert any("operator:alice" in str(line) for line in statement)  # the grant names its operator


def test_metrics_are_exposed_without_a_consumer_key(server):
    server.island()
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("coordinator_islands", "coordinator_queue_depth", "coordinator_commit_batches",
                 "coordinator_dispatch_leader"):
        assert name in text, name
