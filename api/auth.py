"""Authentication, scopes and rate limits, as one ASGI middleware in front of every
consumer route (health and the OpenAPI schema are open).

Per request: parse `Authorization: Bearer ak_...`; find the key by its SHA-256 in a
per-process cache (entries are re-read from the store after `key_cache_s`; unknown
hashes are remembered briefly so a flood of bad keys costs no store reads); refuse
expired keys; then one limiter call that also says whether the key was revoked by any
process; then the scope (GET/HEAD need `read`, everything else `write`). The principal
goes to `request.user`; the X-RateLimit-* headers go on every answer, errors included.

The web app (web/, decision 0067) calls these same routes from the browser with its
session instead of a key: when a request has no `Authorization` header and the session
middleware (mounted only with the web app) found a signed-in session, its account is the
principal, with the scopes and rate-limit bucket of the key it signed in with (a link
sign-in gets its own bucket). Unsafe methods are taken from a session only when the web's
CSRF check ran on the request (`scope["web_csrf_checked"]`). Route handlers whose `opt`
has `own_auth` (the web pages) authenticate themselves and skip this middleware.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from uuid import UUID

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, unauthorized
from api.keys import KEY_PREFIX, MAX_KEY_CHARS, USED_EVENT_EVERY_MS, KeyRecord, KeyStore, hash_key
from api.ratelimit import RateLimiter
from store.clock import Clock, id_from_text

OPEN_PATHS = ("/api/v1/health", "/api/v1/schema", "/schema",
              # the Compute Exchange's public reads (api/market.py): rates, history, order book
              "/api/v1/market/rates", "/api/v1/market/history/", "/api/v1/market/orderbook/")
READ_POSTS = frozenset({"/api/v1/market/quote"})  # POSTs that change nothing: the read scope suffices
NEGATIVE_CACHE_SIZE = 10_000
NEGATIVE_CACHE_S = 60.0
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


SESSION_ACCOUNT = "account_id"  # the keys of a signed-in web session (web/sessions.py writes them)
SESSION_KEY_ID = "key_id"
SESSION_SCOPES = "scopes"


@dataclass(frozen=True)
class Principal:
    account_id: UUID
    key_id: str
    scopes: frozenset[str]


class KeyAuthenticator:
    def __init__(self, store: KeyStore, limiter: RateLimiter, clock: Clock, *, cache_s: float) -> None:
        self.store = store
        self.limiter = limiter
        self.clock = clock
        self.cache_s = cache_s
        self._cache: dict[str, tuple[KeyRecord, float]] = {}  # key hash -> (record, read at, monotonic)
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._by_id: dict[str, str] = {}  # key id -> key hash (for revocation)

    async def _record(self, key_hash: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._cache.get(key_hash)
        if hit is not None and now - hit[1] < self.cache_s:
            return hit[0]
        miss_at = self._negative.get(key_hash)
        if miss_at is not None and now - miss_at < NEGATIVE_CACHE_S:
            return None
        record = await self.store.alookup(key_hash)
        if record is None:
            self._negative[key_hash] = now
            if len(self._negative) > NEGATIVE_CACHE_SIZE:
                self._negative.popitem(last=False)
            self._cache.pop(key_hash, None)
            return None
        self._cache[key_hash] = (record, now)
        self._by_id[record.key_id] = key_hash
        return record

    async def authenticate(self, token: str) -> KeyRecord:
        if not token.startswith(KEY_PREFIX) or len(token) > MAX_KEY_CHARS:
            raise unauthorized()
        key_hash = hash_key(token)
        record = await self._record(key_hash)
        if record is None or record.revoked:
            raise unauthorized()
        now_ms = self.clock.now_ms()
        if record.expired(now_ms):
            raise unauthorized("API key expired")
        if now_ms - record.last_used_ms >= USED_EVENT_EVERY_MS:
            record = replace(record, last_used_ms=now_ms)
            self._cache[key_hash] = (record, self._cache.get(key_hash, (record, time.monotonic()))[1])
            self.store.mark_used(record.key_id, now_ms)
        return record

    def forget_revoked(self, key_id: str) -> None:
        key_hash = self._by_id.pop(key_id, None)
        if key_hash is not None:
            hit = self._cache.get(key_hash)
            if hit is not None:
                self._cache[key_hash] = (replace(hit[0], revoked=True), hit[1])


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            return token.strip()
    return None


class AuthMiddleware:
    """ASGI middleware (see module docstring). Errors are raised and rendered by the
    app's exception handler in the contract's shape."""

    def __init__(self, app: ASGIApp, authenticator: KeyAuthenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        handler = scope.get("route_handler")
        if handler is not None and handler.opt.get("own_auth"):
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            record = _session_record(scope)
            if record is None:
                raise unauthorized()
        else:
            record = await self.auth.authenticate(token)
        decision = await self.auth.limiter.acquire(record.key_id)
        if decision.revoked:
            self.auth.forget_revoked(record.key_id)
            raise unauthorized()
        rl_headers = decision.headers()
        if not decision.allowed:
            raise ApiError(429, "rate_limited", f"rate limit of {decision.limit} requests per minute exceeded; "
                                                f"retry in {decision.retry_after_s} s", headers=rl_headers)
        needed = "read" if scope["method"] in READ_METHODS or scope["path"] in READ_POSTS else "write"
        if needed not in record.scopes:
            raise ApiError(403, "insufficient_scope", f"this API key lacks the {needed!r} scope", headers=rl_headers)
        scope["user"] = Principal(record.account_id, record.key_id, record.scopes)
        raw = [(k.lower().encode(), v.encode()) for k, v in rl_headers.items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *raw]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _session_record(scope: Scope) -> KeyRecord | None:
    """The principal of a signed-in web session, or None (see the module docstring)."""
    session = scope.get("session")
    if not isinstance(session, dict) or not session.get(SESSION_ACCOUNT):
        return None
    if scope["method"] not in READ_METHODS and not scope.get("web_csrf_checked"):
        return None
    try:
        account_id = id_from_text(str(session[SESSION_ACCOUNT]))
    except ValueError:
        return None
    scopes = frozenset(s for s in session.get(SESSION_SCOPES) or () if s in ("read", "write"))
    return KeyRecord(str(session.get(SESSION_KEY_ID) or f"web:{account_id}"), account_id, scopes, 0, False, 0)
