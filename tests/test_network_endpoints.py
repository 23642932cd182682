"""The network endpoints of the contract (issue #13 section 3; decisions 0051-0053) over
HTTP on the embedded default and on PostgreSQL + Redis: hosts (public vs owner-only data,
filters, paging), karma and its history on the 0..100 scale, verification status and
request (with the operator's decision), a Job's output, the model list (contract shape and
the `openai` client). Every endpoint: bad input -> 4xx with a reason, another account's
id -> 404, no key -> 401, a read-only key reads."""

from __future__ import annotations

import json
import re
import threading
import uuid

import openai
import pytest

from tests.api_harness import CHAT_CAPS, IMAGE_CAPS, LiveServer, make_backend, read_sse, wait_for

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)$")
CHAT = {"workload": "llm-chat", "input": {"prompt": "Say hello", "max_tokens": 64}}
IMAGE = {"workload": "sdxl", "input": {"prompt": "a cat", "width": 512, "height": 512, "steps": 4,
                                       "guidance_scale": 7.0, "seed": 9}}
HOST_KEYS = {"id", "name", "status", "region", "capabilities", "karma_score", "last_heartbeat_at"}
GETS = ["/hosts", "/hosts/{host}", "/hosts/{host}/karma", "/hosts/{host}/karma/history", "/verification/status",
        "/jobs/{job}/output", "/models"]


@pytest.fixture(scope="module", params=["embedded", "pg_redis"])
def srv(request, tmp_path_factory):
    backend = make_backend(request.param, tmp_path_factory.mktemp(request.param))
    server = LiveServer(backend, COORDINATOR_RATE_LIMIT_PER_MIN="100000")
    server.chat_island = server.island(name="chat-island")
    server.image_island = server.island(IMAGE_CAPS, name="image-island")
    # an owner with a key, and a pending Island of theirs (never approved)
    server.owner = server.chat_island.owner
    server.owner_key, _ = server.services.keys.issue(server.owner, "owner", None)
    server.pending_id = server.c.scheduler.register_island(
        server.owner, "pending-rack", {**CHAT_CAPS, "region": "ap"}, approve=False).island_id
    yield server
    server.stop()
    backend.cleanup()


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ------------------------------------------------------------------ hosts
def test_hosts_list_shapes_and_what_is_public(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        r = cl.get("/hosts")
        assert r.status_code == 200, r.text
        hosts = r.json()["data"]
        ids = {h["id"] for h in hosts}
        assert {srv.chat_island.island_id, srv.image_island.island_id} <= ids
        assert str(srv.pending_id) not in ids  # not approved: its owner's only
        for h in hosts:
            assert HOST_KEYS <= set(h) and "owner" not in h, h
            assert h["status"] in ("online", "offline", "busy") and isinstance(h["capabilities"], dict)
            assert number(h["karma_score"]) and 0 <= h["karma_score"] <= 100
            assert h["last_heartbeat_at"] is None or ISO.match(h["last_heartbeat_at"])
        assert str(srv.owner) not in r.text and "owner_account_id" not in r.text and "token" not in r.text
        chat = next(h for h in hosts if h["id"] == srv.chat_island.island_id)
        assert chat["status"] == "online" and chat["region"] == "eu" and chat["karma_score"] >= 49
        assert "llm-chat" in chat["capabilities"]["cargos"]
    with srv.client(srv.owner_key) as own:
        mine = {h["id"]: h for h in own.get("/hosts").json()["data"]}
        assert mine[str(srv.pending_id)]["status"] == "pending"
        assert mine[str(srv.pending_id)]["owner"] == {"approval": "pending", "draining": False, "running_jobs": 0}
        assert "owner" in mine[srv.chat_island.island_id] and "owner" not in mine[srv.image_island.island_id]
        assert [h["id"] for h in own.get("/hosts", params={"status": "pending"}).json()["data"]] == \
            [str(srv.pending_id)]


def test_hosts_filters_paging_and_bad_input(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        eu = cl.get("/hosts", params={"region": "eu"}).json()["data"]
        assert eu and all(h["region"] == "eu" for h in eu)
        assert srv.image_island.island_id not in {h["id"] for h in eu}
        online = cl.get("/hosts", params={"status": "online"}).json()["data"]
        assert all(h["status"] == "online" for h in online) and online
        assert cl.get("/hosts", params={"status": "pending"}).json()["data"] == []
        everything = cl.get("/hosts", params={"limit": 100}).json()["data"]
        pages = [cl.get("/hosts", params={"limit": 1, "offset": i}).json()["data"] for i in range(len(everything))]
        assert [p[0]["id"] for p in pages] == [h["id"] for h in everything]
        assert cl.get("/hosts", params={"offset": len(everything)}).json()["data"] == []
        scores = [h["karma_score"] for h in everything]
        assert scores == sorted(scores, reverse=True)
        body = error_of(cl.get("/hosts", params={"status": "asleep"}), 422)
        assert "status" in body["errors"]
        for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "ten"}, {"region": "x" * 65}):
            error_of(cl.get("/hosts", params=params), 422)


def test_one_host_and_hidden_ones(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        got = cl.get(f"/hosts/{srv.chat_island.island_id}")
        assert got.status_code == 200 and HOST_KEYS <= set(got.json()["data"])
        for bad in (str(uuid.uuid4()), "not-an-id", str(srv.pending_id)):
            for suffix in ("", "/karma", "/karma/history"):
                error_of(cl.get(f"/hosts/{bad}{suffix}"), 404)
    with srv.client(srv.owner_key) as own:
        assert own.get(f"/hosts/{srv.pending_id}").json()["data"]["status"] == "pending"
        assert own.get(f"/hosts/{srv.pending_id}/karma").json()["data"]["karma_score"] == 50


# ------------------------------------------------------------------ karma
def test_karma_and_history_on_the_hundred_scale(srv):
    _, key = srv.account(credits=50)
    island = srv.image_island
    with srv.client(key) as cl:
        before = cl.get(f"/hosts/{island.island_id}/karma").json()["data"]
        assert set(before) >= {"host_id", "karma_score", "updated_at"} and before["host_id"] == island.island_id
        assert number(before["karma_score"]) and ISO.match(before["updated_at"])
        job = cl.post("/jobs", json=IMAGE).json()["data"]
        read_sse(cl, f"/jobs/{job['id']}/stream")
        srv.c.scheduler.adjust_island_karma(uuid.UUID(island.island_id), -2_500, by="ops", reason="test")

        def newest():
            hist = cl.get(f"/hosts/{island.island_id}/karma/history").json()["data"]
            return hist if hist and hist[0]["reason"] == "operator_adjustment" else None

        hist = wait_for(newest)
        assert hist[0]["delta"] == -2.5 and number(hist[0]["karma_score"]) and ISO.match(hist[0]["at"])
        completed = next(h for h in hist if h["reason"] == "completed")
        assert "job_id" not in completed  # other accounts' Job ids are the owner's to see
        now = cl.get(f"/hosts/{island.island_id}/karma").json()["data"]
        assert now["karma_score"] == hist[0]["karma_score"] == pytest.approx(before["karma_score"] - 2.5, abs=0.01)
        assert [h["at"] for h in hist] == sorted((h["at"] for h in hist), reverse=True)
        one = cl.get(f"/hosts/{island.island_id}/karma/history", params={"limit": 1, "offset": 1}).json()["data"]
        assert one == hist[1:2]
        for params in ({"limit": 0}, {"limit": 1000}, {"offset": -3}):
            error_of(cl.get(f"/hosts/{island.island_id}/karma/history", params=params), 422)
    owner_key, _ = srv.services.keys.issue(island.owner, "owner", None)
    with srv.client(owner_key) as own:
        hist = own.get(f"/hosts/{island.island_id}/karma/history").json()["data"]
        assert next(h for h in hist if h["reason"] == "completed")["job_id"] == job["id"]


# ------------------------------------------------------------------ verification
def test_verification_status_request_and_the_operators_decision(srv):
    account, key = srv.account(kyc=False)
    with srv.client(key) as cl:
        st = cl.get("/verification/status").json()["data"]
        assert st["status"] == "unverified" and st["verified_at"] is None
        assert "cargo:sdxl" in st["unlocks"] and "spending_beyond_free_tier" in st["unlocks"]
        for body in ({"note": 5}, {"other": "x"}, {"note": "x" * 501}, [1]):
            error_of(cl.post("/verification/request", json=body), 422)
        first = cl.post("/verification/request", json={"note": "passport sent"})
        assert first.status_code == 201 and first.json()["data"]["status"] == "pending"
        assert ISO.match(first.json()["data"]["requested_at"])
        again = cl.post("/verification/request")  # no body, like the SDKs' bodiless calls
        assert again.status_code == 200 and again.json()["data"]["status"] == "pending"
        assert srv.c.ledger.set_kyc(account, True, by="ops", reference="case 1")
        st = cl.get("/verification/status").json()["data"]
        assert st["status"] == "verified" and ISO.match(st["verified_at"])
        assert cl.get("/account").json()["data"]["kyc_verified"] is True
        error_of(cl.post("/verification/request", json={}), 409)
    other, key2 = srv.account(kyc=False)
    with srv.client(key2) as cl:
        cl.post("/verification/request", json={})
        assert srv.c.ledger.set_kyc(other, False, by="ops", reference="blurry")  # pending -> rejected
        assert cl.get("/verification/status").json()["data"]["status"] == "rejected"
        assert not srv.c.ledger.set_kyc(other, False, by="ops", reference="again")  # nothing to decide
        assert cl.post("/verification/request", json={}).json()["data"]["status"] == "pending"  # may ask again
    from ledger.accounts import Account

    kinds = [type(e).__name__ for e in srv.c.app.events.get(other)]
    assert kinds.count("VerificationRequested") == 2 and kinds.count("VerificationRejected") == 1
    assert all(isinstance(e, Account.Event) for e in srv.c.app.events.get(other))


# ------------------------------------------------------------------ output
def test_job_output_text_image_and_refusals(srv):
    _, key = srv.account(credits=100)
    _, stranger = srv.account()
    with srv.client(key) as cl, srv.client(stranger) as st:
        srv.chat_island.gate.clear()
        held = cl.post("/jobs", json=CHAT).json()["data"]
        wait_for(lambda: srv.chat_island.running)
        body = error_of(cl.get(f"/jobs/{held['id']}/output"), 409)
        assert body["error"]["code"] == "job_not_finished"
        srv.chat_island.gate.set()
        read_sse(cl, f"/jobs/{held['id']}/stream")
        out = cl.get(f"/jobs/{held['id']}/output").json()["data"]
        assert out["job_id"] == held["id"] and out["status"] == "completed" and out["kind"] == "text"
        assert out["output"] == "Hello, world!" and out["image"] is None
        assert isinstance(out["usage"]["total_tokens"], int) and number(out["usage"]["credits_used"])
        img = cl.post("/jobs", json=IMAGE).json()["data"]
        read_sse(cl, f"/jobs/{img['id']}/stream")
        out = cl.get(f"/jobs/{img['id']}/output").json()["data"]
        assert out["kind"] == "image" and out["image"]["format"] == "png" and out["image"]["image_data"]
        assert (out["image"]["width"], out["image"]["height"], out["image"]["seed"]) == (512, 512, 9)
        assert json.loads(out["output"])["image_data"] == out["image"]["image_data"]
        error_of(st.get(f"/jobs/{held['id']}/output"), 404)
        error_of(cl.get(f"/jobs/{uuid.uuid4()}/output"), 404)
        error_of(cl.get("/jobs/nope/output"), 404)


# ------------------------------------------------------------------ models
def test_models_contract_shape_and_the_openai_client(srv):
    _, key = srv.account()
    with srv.client(key) as cl:
        body = cl.get("/models").json()
        assert body["object"] == "list"
        by_id = {m["id"]: m for m in body["data"]}
        for m in body["data"]:
            assert m["object"] == "model" and isinstance(m["created"], int) and isinstance(m["owned_by"], str)
            assert isinstance(m["workload_slug"], str) and isinstance(m["online_hosts"], int)
        assert by_id["llm-chat"]["online_hosts"] >= 1 and by_id["llm-chat"]["workload_slug"] == "llm-chat"
        assert by_id["sdxl"]["online_hosts"] == 1 and by_id["sdxl"]["workload_slug"] == "sdxl"
        assert by_id["mistral-7b-instruct"]["online_hosts"] >= 1
        assert by_id["qwen2.5-7b-instruct"]["online_hosts"] == 0  # llm-chat, but no Island lists that model
        assert cl.get("/models/llm-chat").json()["online_hosts"] == by_id["llm-chat"]["online_hosts"]
        error_of(cl.get("/models/no-such-model"), 404)
    network = {m.id: m for m in openai.OpenAI(api_key=key, base_url=srv.url + "/api/v1").models.list()}
    assert network["sdxl"].model_extra["online_hosts"] == 1 and network["sdxl"].model_extra["workload_slug"] == "sdxl"
    shim = {m.id: m for m in openai.OpenAI(api_key=key, base_url=srv.url + "/v1").models.list()}
    assert "llm-chat" in shim and "sdxl" not in shim  # /v1: what chat completions accept (decision 0017)
    assert shim["llm-chat"].model_extra["online_hosts"] == by_id["llm-chat"]["online_hosts"]


# ------------------------------------------------------------------ auth, scopes, other accounts
def test_every_endpoint_needs_a_key_and_reads_with_a_read_only_key(srv):
    account, key = srv.account(credits=50)
    with srv.client(key) as cl:
        job = cl.post("/jobs", json=CHAT).json()["data"]
        read_sse(cl, f"/jobs/{job['id']}/stream")
    paths = [p.format(host=srv.chat_island.island_id, job=job["id"]) for p in GETS]
    with srv.client(None) as anon:
        for p in paths:
            error_of(anon.get(p), 401)
        error_of(anon.post("/verification/request", json={}), 401)
    read_key, _ = srv.services.keys.issue(account, "read-only", ["read"])
    with srv.client(read_key) as ro:
        for p in paths:
            assert ro.get(p).status_code == 200, (p, ro.get(p).text)
        assert error_of(ro.post("/verification/request", json={}), 403)["error"]["code"] == "insufficient_scope"


def test_busy_host_status(srv):
    """An Island whose slots are all taken shows `busy`."""
    _, key = srv.account(credits=100)
    island = srv.image_island  # 2 slots
    island.gate.clear()
    made = []
    try:
        with srv.client(key) as cl:
            made = [cl.post("/jobs", json=IMAGE).json()["data"]["id"] for _ in range(2)]
            wait_for(lambda: island.running == 2)
            assert cl.get(f"/hosts/{island.island_id}").json()["data"]["status"] == "busy"
            assert island.island_id in {h["id"] for h in cl.get("/hosts", params={"status": "busy"}).json()["data"]}
    finally:
        island.gate.set()
    with srv.client(key) as cl:
        threads = [threading.Thread(target=read_sse, args=(cl, f"/jobs/{j}/stream")) for j in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)


def test_odd_input_is_a_4xx_with_a_reason_never_a_5xx(srv):
    _, key = srv.account()
    host = srv.chat_island.island_id
    gets = [("/hosts", {"limit": "1e3"}), ("/hosts", {"status": ""}), ("/hosts", {"offset": "9" * 30}),
            ("/hosts", {"limit": "-0"}), ("/hosts/%00", {}), (f"/hosts/{host}/karma/history", {"limit": "x"}),
            (f"/hosts/{host.upper()}/karma", {}), ("/jobs/%20/output", {}), ("/models/%2F..%2F", {}),
            ("/hosts", {"region": "é" * 10})]
    with srv.client(key) as cl:
        for path, params in gets:
            r = cl.get(path, params=params)
            assert r.status_code < 500, (path, params, r.status_code, r.text)
            if r.status_code >= 400:
                assert r.json()["error"]["message"], (path, r.text)
        for content, ctype in ((b"not json", "application/json"), (b"{}", "text/plain"), (b"\xff\xfe", None),
                               (b'{"note": null}', "application/json"), (b'"x"', "application/json")):
            headers = {"Content-Type": ctype} if ctype else {}
            r = cl.post("/verification/request", content=content, headers=headers)
            assert r.status_code < 500, (content, r.status_code, r.text)
        # an upper-case id is the same Island (UUIDs are case-insensitive)
        assert cl.get(f"/hosts/{host.upper()}/karma").json()["data"]["host_id"] == host
