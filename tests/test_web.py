"""The web app without a browser (#14): login links (short-lived, single use, shared by
processes through the event store), sessions on the consumer API with Litestar's CSRF
check, the API-key contract unchanged, scoping to the signed-in account, the virtual
top-up's limits, the conversations projection (rebuildable) and safe Markdown. Run on the
embedded default and on PostgreSQL + Redis (sessions in Redis there)."""

from __future__ import annotations

import re
import threading
import time
import uuid

import httpx
import pytest

from tests.api_harness import CHAT_CAPS, LiveServer, make_backend
from web.login_links import LinkRefused, LoginLinks
from web.sessions import CSRF_COOKIE, CSRF_HEADER, SESSION_COOKIE


@pytest.fixture(params=["embedded", "pg_redis"])
def server(request, tmp_path, monkeypatch):
    monkeypatch.setenv("COORDINATOR_WEB_TOPUP_CREDITS", "10")
    monkeypatch.setenv("COORDINATOR_WEB_TOPUP_MAX_BALANCE_CREDITS", "125")
    backend = make_backend(request.param, tmp_path)
    s = LiveServer(backend)
    yield s
    s.stop()
    backend.cleanup()


def _csrf_from(page: str) -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert m, page[:500]
    return m.group(1)


def web_client(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)


def sign_in_by_link(server: LiveServer, account_id: uuid.UUID) -> tuple[httpx.Client, str]:
    token, _ = LoginLinks(server.c.committer).issue(account_id, ttl_s=300, by="test")
    web = web_client(server)
    page = web.get(f"/login/link/{token}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csrf = _csrf_from(page.text)
    r = web.post(f"/login/link/{token}", data={"_csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/chat", r.text
    cookie = r.headers["set-cookie"]
    assert SESSION_COOKIE in cookie and "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
    assert "secure" not in cookie.lower()  # plain http here; Secure behind TLS (COORDINATOR_PUBLIC_URL https)
    return web, csrf


def test_login_link_single_use_expiry_and_race(server):
    account, _key = server.account()
    web, csrf = sign_in_by_link(server, account)
    assert web.get("/chat").status_code == 200
    links = LoginLinks(server.c.committer)
    # spent: the page and the POST both refuse it
    token, _ = links.issue(account, ttl_s=300)
    fresh = web_client(server)
    page = fresh.get(f"/login/link/{token}")
    c2 = _csrf_from(page.text)
    assert fresh.post(f"/login/link/{token}", data={"_csrf_token": c2}).status_code == 303
    again = web_client(server)
    p2 = again.get(f"/login/link/{token}")
    assert p2.status_code == 410 and "already used" in p2.text
    assert again.post(f"/login/link/{token}", data={"_csrf_token": _csrf_from(p2.text)}).status_code == 410
    # short-lived
    short, _ = links.issue(account, ttl_s=1)
    time.sleep(1.2)
    late = web_client(server)
    assert late.get(f"/login/link/{short}").status_code == 410
    # unknown and malformed
    assert late.get("/login/link/ll_" + "x" * 43).status_code == 410
    assert late.get("/login/link/%3Cscript%3E").status_code == 410
    # two redemptions at once: exactly one wins
    race, _ = links.issue(account, ttl_s=300)
    import asyncio

    results: list[str] = []

    def redeem() -> None:
        try:
            asyncio.run(links.aredeem(race))
            results.append("ok")
        except LinkRefused:
            results.append("refused")

    threads = [threading.Thread(target=redeem) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok", "refused", "refused", "refused"]
    # the token itself is never stored: only its hash is in the event
    from web.login_links import LoginLink, hash_token, link_id_for_hash

    agg = server.c.committer.query(lambda uow: uow.get(link_id_for_hash(hash_token(race))))
    assert isinstance(agg, LoginLink) and agg.token_hash == hash_token(race) and race not in repr(vars(agg))
    # a link for an unknown account is refused at issue
    from ledger.errors import UnknownAccount

    with pytest.raises(UnknownAccount):
        links.issue(uuid.uuid4())


def test_session_on_the_api_with_csrf_and_key_contract_unchanged(server):
    account, key = server.account()
    web, csrf = sign_in_by_link(server, account)
    me = web.get("/api/v1/account")
    assert me.status_code == 200 and me.json()["data"]["id"] == str(account)
    body = {"workload": "llm-chat", "input": {"prompt": "hello", "conversation_id": "conv-1"}}
    # a write with the session needs Litestar's CSRF token
    assert web.post("/api/v1/jobs", json=body).status_code == 403
    assert web.post("/api/v1/jobs", json=body, headers={CSRF_HEADER: "forged" * 10}).status_code == 403
    made = web.post("/api/v1/jobs", json=body, headers={CSRF_HEADER: csrf})
    assert made.status_code == 201, made.text
    # the API key: no CSRF, no session, no cookie set, same answers as before
    with server.client(key) as api:
        r = api.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "hi"}})
        assert r.status_code == 201 and "set-cookie" not in r.headers
        assert "conversation_id" not in r.json()["data"]["input"]  # absent: the stored input is as before
        bad = api.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "hi", "conversation_id": "a b"}})
        assert bad.status_code == 422 and "input.conversation_id" in bad.json()["errors"]
    assert httpx.post(server.url + "/api/v1/jobs", json=body).status_code == 401  # nothing at all
    # the key wins over a cookie: a bad key with a good session is still refused
    r = web.get("/api/v1/account", headers={"Authorization": "Bearer ak_nope"})
    assert r.status_code == 401
    # sign-out ends the session everywhere
    assert web.post("/logout", data={"_csrf_token": csrf}).status_code == 303
    assert web.get("/api/v1/account").status_code == 401
    assert web.get("/chat").status_code == 303


def test_key_sign_in_and_revocation_end_the_session(server):
    account, key = server.account()
    web = web_client(server)
    page = web.get("/login")
    csrf = _csrf_from(page.text)
    bad = web.post("/login", data={"_csrf_token": csrf, "api_key": "ak_wrong", "next": "/image"})
    assert bad.status_code == 401 and "not accepted" in bad.text
    nocsrf = web_client(server).post("/login", data={"api_key": key})
    assert nocsrf.status_code == 403
    ok = web.post("/login", data={"_csrf_token": csrf, "api_key": key, "next": "//evil.example/x"})
    assert ok.status_code == 303 and ok.headers["location"] == "/chat"  # only local paths after sign-in
    assert web.get("/api/v1/account").status_code == 200
    with server.client(key) as api:
        kid = api.get("/api-keys").json()["data"][0]["id"]
        assert api.delete(f"/api-keys/{kid}").status_code == 200
    assert web.get("/api/v1/account").status_code == 401


def test_everything_is_scoped_to_the_signed_in_account(server):
    a, key_a = server.account(kyc=True)
    b, _ = server.account(kyc=False, credits=3)
    server.island(CHAT_CAPS)
    from tests.api_harness import IMAGE_CAPS

    server.island(IMAGE_CAPS)
    with server.client(key_a) as api:
        chat = api.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "mine",
                                                                          "conversation_id": "secret-conv"}}).json()
        img = api.post("/jobs", json={"workload": "sdxl", "input": {"prompt": "a boat", "steps": 4}}).json()
        for j in (chat, img):
            deadline = time.monotonic() + 20
            while api.get(f"/jobs/{j['data']['id']}").json()["data"]["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
    web_a, _ = sign_in_by_link(server, a)
    png = web_a.get(f"/web/images/{img['data']['id']}.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert web_a.get(f"/web/images/{img['data']['id']}.png?download=1").headers["content-disposition"].startswith(
        "attachment")
    assert web_a.get("/web/api/conversations").json()["data"][0]["id"] == "secret-conv"
    web_b, _ = sign_in_by_link(server, b)
    assert web_b.get(f"/jobs/{chat['data']['id']}").status_code == 404
    assert web_b.get(f"/web/images/{img['data']['id']}.png").status_code == 404
    assert web_b.get(f"/api/v1/jobs/{chat['data']['id']}").status_code == 404
    assert web_b.get(f"/api/v1/jobs/{chat['data']['id']}/stream").status_code == 404
    assert web_b.get("/web/api/conversations/secret-conv").status_code == 404
    assert web_b.get("/web/api/conversations").json()["data"] == []
    assert web_client(server).get(f"/web/images/{img['data']['id']}.png").status_code == 404
    # B: no KYC -> the image page explains instead of offering a form; under 10 credits -> the nudge
    page = web_b.get("/image").text
    assert 'data-testid="kyc-required"' in page and 'data-testid="generate"' not in page
    assert 'data-testid="low-credits"' in web_b.get("/chat").text
    assert 'data-testid="low-credits"' not in web_a.get("/chat").text


def test_virtual_topup_is_a_ledger_event_with_a_ceiling(server):
    account, _ = server.account(credits=100)
    web, csrf = sign_in_by_link(server, account)
    h = {CSRF_HEADER: csrf}
    assert web.post("/web/api/topup").status_code == 403  # CSRF
    before = web.get("/api/v1/account").json()["data"]["credits"]
    r = web.post("/web/api/topup", headers=h)
    assert r.status_code == 200, r.text
    after = r.json()["data"]["credits"]
    assert after == before + 10
    # the ceiling (125): the next ones are refused once they would cross it
    codes = [web.post("/web/api/topup", headers=h).status_code for _ in range(3)]
    assert 409 in codes
    final = web.get("/api/v1/account").json()["data"]["credits"]
    assert final <= 125
    # it is a ledger event with its explanation on the statement
    page = web.get("/account/credits").text
    assert "virtual top-up" in page


def test_topup_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("COORDINATOR_WEB_TOPUP_CREDITS", "0")
    backend = make_backend("embedded", tmp_path)
    s = LiveServer(backend)
    try:
        account, _ = s.account()
        web, csrf = sign_in_by_link(s, account)
        r = web.post("/web/api/topup", headers={CSRF_HEADER: csrf})
        assert r.status_code == 409 and "switched off" in r.json()["error"]["message"]
        assert 'data-testid="top-up-off"' in web.get("/account/credits").text
    finally:
        s.stop()
        backend.cleanup()


def test_conversations_projection_groups_turns_and_rebuilds(server):
    from projections.conversations import turn_of
    from projections.rebuild import verify

    account, key = server.account()
    server.island(CHAT_CAPS)
    with server.client(key) as api:
        def run(inp: dict) -> str:
            jid = api.post("/jobs", json={"workload": "llm-chat", "input": inp}).json()["data"]["id"]
            deadline = time.monotonic() + 20
            while api.get(f"/jobs/{jid}").json()["data"]["status"] != "completed":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            return jid

        first = {"messages": [{"role": "user", "content": "one"}], "conversation_id": "k1"}
        run(first)
        regen = run(first)  # the same turn again
        run({"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "x"},
                          {"role": "user", "content": "two"}], "conversation_id": "k1"})
        run({"prompt": "other", "conversation_id": "k2"})
        run({"prompt": "no conversation"})
    web, _ = sign_in_by_link(server, account)
    convs = web.get("/web/api/conversations").json()["data"]
    assert [c["id"] for c in convs] == ["k2", "k1"] and convs[1]["title"] == "one" and convs[1]["jobs"] == 3
    turns = web.get("/web/api/conversations/k1").json()["data"]["turns"]
    assert [t["turn"] for t in turns] == [1, 2] and turns[0]["job_id"] == regen and turns[1]["user"] == "two"
    assert all(t["status"] == "completed" and t["html"] for t in turns)
    assert turn_of({"prompt": "p", "messages": [{"role": "user", "content": "a"}]}) == (2, "p")
    result = verify(server.c.app, server.services.projections.db, ["conversations"])
    assert result.ok, result


def test_markdown_strips_raw_html():
    from web.markdown import render

    out = render("**b** <script>alert(1)</script> <img src=x onerror=alert(2)> [x](javascript:alert(3))")
    assert "<strong>b</strong>" in out
    assert "<script" not in out and "<img" not in out and 'href="javascript' not in out
    assert "&lt;script&gt;" in out
