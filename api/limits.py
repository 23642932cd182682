"""Request header bound: the HTTP parser (httptools) accepts headers of any size, so every
request whose header block (names + values) exceeds MAX_HEADER_BYTES, or that carries more
than MAX_HEADER_COUNT headers, is refused with 431 before anything else runs. The other
input limits (body, Job input, messages, batch) are listed in docs/API.md#limits."""

from __future__ import annotations

from litestar.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError

MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_COUNT = 100


class HeaderLimit:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            if len(headers) > MAX_HEADER_COUNT:
                raise ApiError(431, "headers_too_large", f"at most {MAX_HEADER_COUNT} request headers")
            size = 0
            for name, value in headers:
                size += len(name) + len(value)
            if size > MAX_HEADER_BYTES:
                raise ApiError(431, "headers_too_large", f"request headers must total at most {MAX_HEADER_BYTES} "
                                                         f"bytes (got {size})")
        await self.app(scope, receive, send)
