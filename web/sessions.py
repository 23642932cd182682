"""Web sessions and CSRF (decision 0067), with Litestar's own parts:

- `ServerSideSessionConfig`: an opaque random session id in an HttpOnly, SameSite=Lax
  cookie (Secure when the public URL is https or COORDINATOR_WEB_SECURE_COOKIES=true); the
  data lives server side, in Redis when COORDINATOR_REDIS_URL is set (shared by every
  coordinator process), in memory on the embedded default.
- `CSRFMiddleware`: a double-submit token (HMAC'd with COORDINATOR_WEB_SECRET) in a cookie
  that the pages' JavaScript echoes in the `x-csrf-token` header or forms in `_csrf_token`.

`WebGate` decides which requests go through them: every web page (route handlers with
`opt={"own_auth": True}`), and API calls that carry the session cookie and no
`Authorization` header (the browser calling /api/v1 with its session). Requests with an
API key never touch the session store or the CSRF check, so the API-key contract and its
cost are unchanged.
"""

from __future__ import annotations

from typing import Any

from litestar.config.csrf import CSRFConfig
from litestar.middleware.csrf import CSRFMiddleware
from litestar.middleware.session.base import SessionMiddleware
from litestar.middleware.session.server_side import ServerSideSessionBackend, ServerSideSessionConfig
from litestar.stores.base import Store
from litestar.stores.memory import MemoryStore
from litestar.types import ASGIApp, Empty, Message, Receive, Scope, Send

from web.settings import WebSettings

SESSION_COOKIE = "archipelag_session"
CSRF_COOKIE = "archipelag_csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_STORE = "web_sessions"


def session_config(ws: WebSettings) -> ServerSideSessionConfig:
    return ServerSideSessionConfig(key=SESSION_COOKIE, max_age=ws.session_max_age_s, httponly=True, samesite="lax",
                                   secure=ws.secure_cookies, store=SESSION_STORE, renew_on_access=False)


def csrf_config(ws: WebSettings) -> CSRFConfig:
    return CSRFConfig(secret=ws.secret, cookie_name=CSRF_COOKIE, header_name=CSRF_HEADER, cookie_secure=ws.secure_cookies,
                      cookie_samesite="lax", cookie_httponly=False)  # the page's script reads it to echo it


def session_store(redis_url: str | None, prefix: str) -> Store:
    if redis_url:
        from litestar.stores.redis import RedisStore

        return RedisStore.with_client(url=redis_url, namespace=f"{prefix}web-sessions")
    return MemoryStore()


def _has_header(scope: Scope, name: bytes) -> bool:
    return any(k == name for k, _ in scope["headers"])


def _has_cookie(scope: Scope, cookie: str) -> bool:
    needle = cookie.encode() + b"="
    for k, v in scope["headers"]:
        if k == b"cookie" and needle in v:
            return True
    return False


class _CsrfPassed:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["web_csrf_checked"] = True  # type: ignore[typeddict-unknown-key]
        await self.app(scope, receive, send)


class _NoEmptySessions:
    """An anonymous request's empty session is not stored (Litestar would store `{}`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        had_cookie = _has_cookie(scope, SESSION_COOKIE)

        async def send_(message: Message) -> None:
            if message["type"] == "http.response.start" and scope.get("session") == {} and not had_cookie:
                scope["session"] = Empty  # type: ignore[typeddict-item]
                scope["web_drop_null_cookie"] = True  # type: ignore[typeddict-unknown-key]
            await send(message)

        await self.app(scope, receive, send_)


class _DropNullCookie:
    """Outermost: no `archipelag_session=null` cookie on anonymous answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_(message: Message) -> None:
            if message["type"] == "http.response.start" and scope.get("web_drop_null_cookie"):
                bad = f"{SESSION_COOKIE}=null".encode()
                message["headers"] = [(k, v) for k, v in message.get("headers", [])
                                      if not (k.lower() == b"set-cookie" and v.startswith(bad))]
            await send(message)

        await self.app(scope, receive, send_)


class WebGate:
    """ASGI middleware (outermost of the app's): see the module docstring."""

    def __init__(self, app: ASGIApp, session: ServerSideSessionConfig, csrf: CSRFConfig) -> None:
        self.app = app
        backend = ServerSideSessionBackend(config=session)
        self.guarded = _DropNullCookie(SessionMiddleware(_NoEmptySessions(CSRFMiddleware(_CsrfPassed(app), csrf)),
                                                         backend=backend))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = scope.get("route_handler")
        web_page = handler is not None and bool(handler.opt.get("own_auth"))
        if web_page or (_has_cookie(scope, SESSION_COOKIE) and not _has_header(scope, b"authorization")):
            await self.guarded(scope, receive, send)
            return
        await self.app(scope, receive, send)


def gate_kwargs(ws: WebSettings) -> dict[str, Any]:
    return {"session": session_config(ws), "csrf": csrf_config(ws)}
