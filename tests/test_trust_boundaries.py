"""Trust boundaries, route by route (issue #16, deliverable 5).

`ROUTES` has one row per route the server mounts (method, path as Litestar spells it). A route
the app serves without a row here fails `test_every_route_has_a_row`, so a new endpoint cannot
land without saying who may call it. A row is `Row(surface, owned)`:

- surface "consumer": an API key (`ak_...`); no key -> 401, an Island token or the operator
  token -> 401, a read-scope key on a write (anything but GET) -> 403;
- surface "operator": the operator token only; no token, a consumer key, an Island token -> 401;
- surface "island": the Island WebSocket; a consumer key or the operator token is refused;
- surface "open": no credentials needed (health, the OpenAPI document, /metrics, the market's
  public rates, history and order book);
- surface "web": the web app's signed-in pages and helpers (a server-side session); without
  one a page redirects to /login and a helper answers 401 (or 403 for a write without the
  CSRF token); "web-public": the web app's pages anyone may open (sign-in, /exchange, assets);
- read_post: a POST that only reads (the market quote), allowed for a read-scope key;
- owned: the kind of resource in the path ("job", "batch", "key", "island"); another
  account's id -> 404 (never 403: no existence oracle).

Other branches add rows (Compute Exchange, network, NATS Islands, web app) when they merge.
"""

from __future__ import annotations

import ast
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from litestar.routes import HTTPRoute

from tests.api_harness import LiveServer, ServerProcess, make_backend, read_sse, wait_for

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_TOKEN = "op-boundary-token-0123456789abcdef"


@dataclass(frozen=True)
class Row:
    surface: str  # consumer | operator | island | open | web | web-public
    owned: str | None = None  # job | batch | key | island
    read_post: bool = False


C, O, OPEN, WEB, WEB_PUBLIC = Row("consumer"), Row("operator"), Row("open"), Row("web"), Row("web-public")
ROUTES: dict[tuple[str, str], Row] = {
    # the network endpoints and the Compute Exchange (#13)
    ("GET", "/api/v1/hosts"): C,
    ("GET", "/api/v1/hosts/{host_id:str}"): C,
    ("GET", "/api/v1/hosts/{host_id:str}/karma"): C,
    ("GET", "/api/v1/hosts/{host_id:str}/karma/history"): C,
    ("GET", "/api/v1/jobs/{job_id:str}/output"): Row("consumer", "job"),
    ("GET", "/api/v1/verification/status"): C,
    ("POST", "/api/v1/verification/request"): C,
    ("GET", "/api/v1/market/bids"): C,
    ("PUT", "/api/v1/market/bids/{slug:str}"): C,
    ("DELETE", "/api/v1/market/bids/{slug:str}"): C,
    ("POST", "/api/v1/market/asking-prices"): C,
    ("GET", "/api/v1/market/suggested-ask/{host_id:str}"): C,
    ("POST", "/api/v1/market/quote"): Row("consumer", read_post=True),
    ("GET", "/api/v1/market/rates"): OPEN,
    ("GET", "/api/v1/market/rates/{slug:str}"): OPEN,
    ("GET", "/api/v1/market/history/{slug:str}"): OPEN,
    ("GET", "/api/v1/market/orderbook/{slug:str}"): OPEN,
    # NATS Islands (#15): pairing by code and the Island's NATS credentials, by its owner
    ("POST", "/api/v1/islands/pair"): C,
    ("POST", "/api/v1/islands/{island_id:str}/nats-credentials"): Row("consumer", "island"),
    # the web app (#14)
    ("GET", "/"): WEB_PUBLIC,
    ("GET", "/login"): WEB_PUBLIC,
    ("POST", "/login"): WEB_PUBLIC,
    ("GET", "/login/link/{token:str}"): WEB_PUBLIC,
    ("POST", "/login/link/{token:str}"): WEB_PUBLIC,
    ("GET", "/exchange"): WEB_PUBLIC,
    ("GET", "/static/web/{file_path:path}"): WEB_PUBLIC,
    ("POST", "/logout"): WEB,
    ("GET", "/chat"): WEB,
    ("GET", "/chat/{conversation_id:str}"): WEB,
    ("GET", "/image"): WEB,
    ("GET", "/jobs/{job_id:str}"): WEB,
    ("GET", "/account/credits"): WEB,
    ("GET", "/account/islands"): WEB,
    ("GET", "/account/islands/pair"): WEB,
    ("GET", "/account/keys"): WEB,
    ("GET", "/account/verification"): WEB,
    ("GET", "/web/api/conversations"): WEB,
    ("GET", "/web/api/conversations/{conversation_id:str}"): WEB,
    ("GET", "/web/api/images"): WEB,
    ("GET", "/web/api/me"): WEB,
    ("GET", "/web/api/models"): WEB,
    ("GET", "/web/images/{name:str}"): Row("web", "image"),  # an image is its owner's only: 404 to anyone else
    ("POST", "/web/api/render"): WEB,
    ("POST", "/web/api/topup"): WEB,
    ("GET", "/api/v1/account"): C,
    ("GET", "/api/v1/workloads"): C,
    ("GET", "/api/v1/workloads/{slug:str}"): C,
    ("GET", "/api/v1/jobs"): C,
    ("POST", "/api/v1/jobs"): C,
    ("DELETE", "/api/v1/jobs/{job_id:str}"): Row("consumer", "job"),
    ("GET", "/api/v1/jobs/{job_id:str}"): Row("consumer", "job"),
    ("POST", "/api/v1/jobs/{job_id:str}/retry"): Row("consumer", "job"),
    ("GET", "/api/v1/jobs/{job_id:str}/stream"): Row("consumer", "job"),
    ("POST", "/api/v1/jobs/batch"): C,
    ("GET", "/api/v1/jobs/{job_id:str}/batch-status"): Row("consumer", "batch"),
    ("GET", "/api/v1/api-keys"): C,
    ("POST", "/api/v1/api-keys"): C,
    ("DELETE", "/api/v1/api-keys/{key_id:str}"): Row("consumer", "key"),
    ("GET", "/api/v1/health"): OPEN,
    ("POST", "/api/v1/chat/completions"): C,
    ("POST", "/v1/chat/completions"): C,
    ("GET", "/v1/models"): C,
    ("GET", "/api/v1/models"): C,
    ("GET", "/api/v1/models/{model_id:str}"): C,
    ("GET", "/v1/models/{model_id:str}"): C,
    ("WS", "/api/v1/islands/channel"): Row("island"),
    ("GET", "/api/v1/islands"): C,
    ("POST", "/api/v1/islands"): C,
    ("GET", "/api/v1/islands/{island_id:str}"): Row("consumer", "island"),
    ("POST", "/api/v1/admin/accounts"): O,
    ("POST", "/api/v1/admin/accounts/{account_id:str}/credits"): O,
    ("POST", "/api/v1/admin/accounts/{account_id:str}/kyc"): O,
    ("POST", "/api/v1/admin/accounts/{account_id:str}/suspension"): O,
    ("GET", "/api/v1/admin/accounts/{account_id:str}"): O,
    ("GET", "/api/v1/admin/islands"): O,
    ("GET", "/api/v1/admin/islands/{island_id:str}"): O,
    ("POST", "/api/v1/admin/islands/{island_id:str}/approve"): O,
    ("POST", "/api/v1/admin/islands/{island_id:str}/suspend"): O,
    ("POST", "/api/v1/admin/islands/{island_id:str}/drain"): O,
    ("POST", "/api/v1/admin/islands/{island_id:str}/karma"): O,
    ("POST", "/api/v1/admin/cargos/{slug:str}/enable"): O,
    ("POST", "/api/v1/admin/cargos/{slug:str}/disable"): O,
    ("GET", "/api/v1/admin/cargos"): O,
    ("GET", "/api/v1/admin/ledger/trial-balance"): O,
    ("GET", "/api/v1/admin/ledger/statement/{account_id:str}"): O,
    ("GET", "/api/v1/admin/queue"): O,
    ("GET", "/api/v1/admin/platform/totals"): O,
    ("GET", "/metrics"): OPEN,
    **{("GET", "/api/v1/schema" + p): OPEN for p in (
        "", "/elements", "/openapi.yaml", "/openapi.yml", "/redoc", "/swagger", "/rapidoc", "/openapi.json",
        "/{path:str}", "/oauth2-redirect.html")},
}


def served_routes(app) -> set[tuple[str, str]]:
    out = set()
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            out |= {(m, route.path) for m in route.methods if m not in ("HEAD", "OPTIONS")}
        else:
            out.add(("WS", route.path))
    return out


def concrete(path: str, values: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        return values.get(m.group(1), "llm-chat" if m.group(1) in ("slug", "model_id") else str(uuid.uuid4()))
    return re.sub(r"\{(\w+):\w+\}", sub, path)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    backend = make_backend("embedded", tmp_path_factory.mktemp("trust"))
    server = LiveServer(backend, COORDINATOR_ADMIN_TOKEN=OPERATOR_TOKEN, COORDINATOR_RATE_LIMIT_PER_MIN="100000")
    server.island(name="trust-island")
    yield server
    server.stop()
    backend.cleanup()


@pytest.fixture(scope="module")
def world(srv):
    """Two accounts with one of each resource; a read-only key; an Island token."""
    from protocol.island import make_token

    mine, key = srv.account(credits=100)
    other, other_key = srv.account(credits=100)
    _, read_key = srv.account(credits=100, scopes=["read"])
    res: dict[str, dict[str, str]] = {}
    for who, k in (("mine", key), ("other", other_key)):
        with srv.client(k) as cl:
            job = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "hi"}}).json()["data"]
            batch = cl.post("/jobs/batch", json={"workload": "llm-chat", "inputs": [{"prompt": "a"}]}).json()
            extra = cl.post("/api-keys", json={"name": "spare"}).json()["data"]
            isl = cl.post("/islands", json={"name": f"{who}-isl"}).json()["data"]
        res[who] = {"job": job["id"], "batch": batch["id"], "key": extra["id"], "island": isl["id"]}
    island_id = uuid.uuid4()
    owner = uuid.uuid4()
    srv.c.ledger.open_account(owner, f"{owner.hex[:8]}@t.example", kyc_verified=True)
    creds = srv.c.scheduler.register_island(owner, "tok", {}, approve=True, island_id=island_id,
                                            token=make_token(island_id))
    return {"key": key, "read_key": read_key, "island_token": creds.token, "res": res, "mine": mine,
            "other": other}


PARAM_KIND = {"job_id": "job", "key_id": "key", "island_id": "island"}


def _values(row: Row, res: dict[str, str]) -> dict[str, str]:
    vals = {p: res[k] for p, k in PARAM_KIND.items()}
    if row.owned == "batch":
        vals["job_id"] = res["batch"]
    return vals


def _call(url: str, method: str, path: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, timeout=15) as cl:
        if path.endswith("/stream"):
            with cl.stream(method, path, headers=headers) as r:
                r.read() if r.status_code != 200 else None
                return r
        return cl.request(method, path, headers=headers, json={} if method == "POST" else None)


def test_every_route_has_a_row(srv):
    served = served_routes(srv.server.config.app)
    missing = sorted(served - set(ROUTES))
    stale = sorted(set(ROUTES) - served)
    assert not missing, f"routes without a trust-boundary row (add one to ROUTES): {missing}"
    assert not stale, f"rows for routes the server does not mount: {stale}"


def _http_rows(surface: str):
    return [(m, p, r) for (m, p), r in ROUTES.items() if r.surface == surface and m != "WS"]


def test_consumer_routes_refuse_no_key_other_tokens_and_read_scope_writes(srv, world):
    checked = 0
    for method, path, row in _http_rows("consumer"):
        url_path = concrete(path, _values(row, world["res"]["mine"]))
        for token, why in ((None, "no key"), (world["island_token"], "Island token"),
                           (OPERATOR_TOKEN, "operator token"), ("ak_" + "x" * 40, "unknown key")):
            r = _call(srv.url, method, url_path, token)
            assert r.status_code == 401, f"{method} {path} with {why}: {r.status_code}"
        r = _call(srv.url, method, url_path, world["read_key"])
        if method == "GET" or row.read_post:
            assert r.status_code != 403 and r.status_code != 401, f"{method} {path} read key: {r.status_code}"
        else:
            assert r.status_code == 403, f"{method} {path} with a read-scope key: {r.status_code}"
            assert r.json()["error"]["code"] == "insufficient_scope"
        checked += 1
    assert checked == len(_http_rows("consumer"))


def test_another_accounts_ids_are_404(srv, world):
    rows = [(m, p, r) for m, p, r in _http_rows("consumer") if r.owned]
    assert len(rows) >= 6
    for method, path, row in rows:
        theirs = concrete(path, _values(row, world["res"]["other"]))
        r = _call(srv.url, method, theirs, world["key"])
        assert r.status_code == 404, f"{method} {path} on another account's {row.owned}: {r.status_code} {r.text}"
    # and the other account's things are untouched (the cancel and revoke above did nothing)
    other_job = srv.c.scheduler.get_job(uuid.UUID(world["res"]["other"]["job"]), world["other"])
    assert other_job is not None and other_job.status != "cancelled"


def test_operator_routes_refuse_everything_but_the_operator_token(srv, world):
    for method, path, _row in _http_rows("operator"):
        url_path = concrete(path, {"account_id": str(world["mine"]), "island_id": world["res"]["mine"]["island"]})
        for token, why in ((None, "no token"), (world["key"], "consumer key"), (world["island_token"], "Island token"),
                           (OPERATOR_TOKEN + "x", "wrong operator token")):
            r = _call(srv.url, method, url_path, token)
            assert r.status_code == 401, f"{method} {path} with {why}: {r.status_code}"
        r = _call(srv.url, method, url_path, OPERATOR_TOKEN)
        assert r.status_code not in (401, 403), f"{method} {path} with the operator token: {r.status_code}"


def test_open_routes_need_nothing(srv):
    for method, path, _row in _http_rows("open"):
        r = _call(srv.url, method, concrete(path, {"path": "openapi.json"}), None)
        assert r.status_code in (200, 404), f"{method} {path}: {r.status_code}"  # /schema/{path} 404s on junk


def test_web_pages_need_a_session(srv, world):
    """No session: a signed-in page sends the browser to /login, a helper answers 401 (403
    for a write refused by CSRF first); an API key or the operator token is no session."""
    for method, path, row in _http_rows("web"):
        url_path = concrete(path, {"name": "x.png"})
        for token in (None, world["key"], OPERATOR_TOKEN):
            r = _call(srv.url, method, url_path, token)
            if r.status_code in (302, 303, 307):
                assert "/login" in r.headers.get("location", ""), f"{method} {path}: {r.headers}"
            else:
                allowed = (401, 403, 404) if row.owned else (401, 403)
                assert r.status_code in allowed, f"{method} {path} without a session: {r.status_code}"


def test_public_web_pages_answer_without_a_session(srv):
    for method, path, _row in _http_rows("web-public"):
        r = _call(srv.url, method, concrete(path, {"file_path": "app.css", "token": "x" * 32}), None)
        assert r.status_code < 500 and r.status_code != 401, f"{method} {path}: {r.status_code}"


def test_island_channel_refuses_consumer_keys_and_the_operator_token(srv, world):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    from protocol import island as p

    for token in (world["key"], OPERATOR_TOKEN, None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with connect(p.ws_url(srv.url), additional_headers=headers, open_timeout=5) as ws:
                caps = p.Capabilities(cargos=["llm-chat"], models=["mistral-7b-instruct"], slots=1)
                ws.send(p.encode(p.Hello(protocol=p.PROTOCOL_VERSION, agent="t", capabilities=caps, running=[])))
                while True:
                    msg = p.decode_server(ws.recv(timeout=5))
                    assert not isinstance(msg, p.Welcome), f"welcomed with {token!r}"
        except (ConnectionClosed, InvalidStatus):
            pass
    assert (world["island_token"]).startswith(p.TOKEN_PREFIX)


def test_revoked_and_expired_keys_are_refused_at_once_on_every_consumer_route(srv):
    account, _ = srv.account()
    revoked, info = srv.services.keys.issue(account, "to-revoke", None)
    expiring, _ = srv.services.keys.issue(account, "short", None, srv.c.clock.now_ms() + 1_500)
    with srv.client(revoked) as cl:
        assert cl.get("/account").status_code == 200  # cached as good first
        assert cl.delete(f"/api-keys/{info.key_id}").status_code == 200
    assert _call(srv.url, "GET", "/api/v1/account", expiring).status_code == 200
    time.sleep(1.6)
    for method, path, row in _http_rows("consumer"):
        url_path = concrete(path, {})
        for token in (revoked, expiring):
            r = _call(srv.url, method, url_path, token)
            assert r.status_code == 401, f"{method} {path} with a revoked/expired key: {r.status_code}"


@pytest.mark.postgres
@pytest.mark.redis
def test_revoked_and_expired_keys_are_refused_on_every_process(tmp_path):
    """Two coordinator processes on one PostgreSQL + Redis: a key revoked on one is refused on
    the other at once (its cache notwithstanding), an expired key on both."""
    from tests.fault_harness import cli_json

    backend = make_backend("pg_redis", tmp_path)
    env = backend.env(COORDINATOR_PROJECTIONS="off", COORDINATOR_KEY_CACHE_S="3600")
    made = cli_json(env, "accounts", "create", "--email", "two@example.com", "--credits", "5", "--kyc")
    a, b = ServerProcess(env), ServerProcess(env)
    try:
        with a.client(made["api_key"]) as ca, b.client(made["api_key"]) as cb:
            expiring = ca.post("/api-keys", json={"name": "soon", "expires_at": _iso_in(2.0)}).json()["key"]
            victim = ca.post("/api-keys", json={"name": "victim"}).json()
            for cl in (ca, cb):  # both processes have seen (and cached) both keys
                for k in (expiring, victim["key"]):
                    assert cl.get("/account", headers={"Authorization": f"Bearer {k}"}).status_code == 200
            assert ca.delete(f"/api-keys/{victim['data']['id']}").status_code == 200
            r = cb.get("/account", headers={"Authorization": f"Bearer {victim['key']}"})
            assert r.status_code == 401, "revocation on A not honoured at once on B"
            time.sleep(2.2)
            for cl in (ca, cb):
                assert cl.get("/account", headers={"Authorization": f"Bearer {expiring}"}).status_code == 401
    finally:
        for s in (a, b):
            s.kill()
        backend.cleanup()


def _iso_in(seconds: float) -> str:
    from datetime import datetime, timedelta, timezone

    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


@pytest.mark.postgres
@pytest.mark.redis
def test_no_secret_appears_in_any_log_line(tmp_path):
    """A full run at info level with every kind of credential in play (API keys good and bad,
    the operator token, an Island token over the channel, a PostgreSQL password in the URL):
    none of them appears in the server's log."""
    from tests.conftest import PG_URL
    from tests.fault_harness import ROOT, cli_json

    backend = make_backend("pg_redis", tmp_path)
    pg_password = "pw-" + uuid.uuid4().hex  # trust auth ignores it; it must still never be logged
    url_with_pw = PG_URL.replace("://postgres@", f"://postgres:{pg_password}@")
    assert pg_password in url_with_pw
    env = backend.env(COORDINATOR_DATABASE_URL=url_with_pw, COORDINATOR_ADMIN_TOKEN=OPERATOR_TOKEN,
                      COORDINATOR_PROJECTIONS="process", COORDINATOR_LOG_LEVEL="debug")
    made = cli_json(env, "accounts", "create", "--email", "logs@example.com", "--credits", "50", "--kyc")
    isl = cli_json(env, "islands", "create", "--owner", made["account_id"], "--name", "log-isl", "--approve")
    server = ServerProcess({**env, "COORDINATOR_LOG_LEVEL": "debug"})
    import signal
    import subprocess
    import sys

    agent = subprocess.Popen([sys.executable, "-m", "coordinator.cli", "island", "run", "--server", server.url,
                              "--token", isl["token"], "--backend", "echo", "--tokens-per-s", "500"], env=env,
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    secrets = [made["api_key"], OPERATOR_TOKEN, isl["token"], pg_password]
    try:
        with server.client(made["api_key"]) as cl:
            wait_for(lambda: cl.get("/islands").json()["data"] and True, 20)
            job = cl.post("/jobs", json={"workload": "llm-chat", "input": {"prompt": "log me"}}).json()["data"]
            read_sse(cl, f"/jobs/{job['id']}/stream", timeout_s=30)
            created = cl.post("/api-keys", json={"name": "second"}).json()
            secrets.append(created["key"])
            cl.delete(f"/api-keys/{created['data']['id']}")
            cl.get("/account", headers={"Authorization": f"Bearer {created['key']}"})  # revoked: 401
            cl.get("/account", headers={"Authorization": "Bearer ak_" + "y" * 40})
            cl.post("/chat/completions", json={"model": "llm-chat", "messages": [{"role": "user", "content": "x"}]})
        admin = httpx.Client(base_url=server.url, timeout=15)
        admin.get("/api/v1/admin/queue", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
        admin.get("/api/v1/admin/queue", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}-wrong"})
        admin.close()
        from websockets.sync.client import connect

        from protocol import island as p

        bad = isl["token"][:-4] + "AAAA"
        secrets.append(bad)
        try:
            with connect(p.ws_url(server.url), additional_headers={"Authorization": f"Bearer {bad}"},
                         open_timeout=5) as ws:
                ws.recv(timeout=3)
        except Exception:  # noqa: BLE001 - refused, as it should be
            pass
    finally:
        agent.send_signal(signal.SIGINT)
        agent_out = agent.communicate(timeout=20)[0]
        server.signal(signal.SIGTERM)
        server.wait(30)
        backend.cleanup()
    lines = server.lines + agent_out.splitlines()
    assert len(lines) > 5
    leaks = [(s[:6], line[:200]) for line in lines for s in secrets if s in line]
    assert not leaks, leaks
    key_like = [line[:200] for line in lines if re.search(r"\b(ak|it)_[A-Za-z0-9_-]{20,}", line)]
    assert not key_like, key_like


# ------------------------------------------------------------------ constant-time comparisons
SECRET_NAMES = re.compile(r"token|secret|password|key_hash|token_hash|digest", re.I)
CHECKED_MODULES = ["api/auth.py", "api/keys.py", "admin/http.py", "islandlink/channel.py", "islandlink/websocket.py",
                   "protocol/island.py", "api/islands.py"]


def _names(node: ast.AST) -> list[str]:
    return [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
            if isinstance(n, (ast.Name, ast.Attribute))]


def test_secrets_are_compared_in_constant_time_by_inspection():
    """No `==`/`!=` between secret-named values in the modules that check credentials;
    the operator token and Island tokens go through hmac.compare_digest; API keys are looked
    up by their SHA-256 (a dict lookup on the hash reveals nothing about the key)."""
    offenders = []
    digests = 0
    for rel in CHECKED_MODULES:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                sides = [node.left, *node.comparators]
                if all(not isinstance(s, ast.Constant) for s in sides) and \
                        any(SECRET_NAMES.search(n) for s in sides for n in _names(s)):
                    offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("compare_digest"):
                digests += 1
    assert not offenders, offenders
    assert digests >= 2  # the operator guard and the Island channel
    auth_src = (ROOT / "api/auth.py").read_text()
    assert "hash_key(token)" in auth_src and "_cache.get(key_hash)" in auth_src
