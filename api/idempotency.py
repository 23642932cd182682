"""`Idempotency-Key` on POST: a retried request gets the first answer back instead of
creating (and charging) twice.

Scope: (account, key). The first request with a key reserves it (Redis `SET NX`, or a
dict on the embedded default), runs, and a 2xx answer is stored for
`idempotency_ttl_s`; a retry with the same key and the same request (method, path,
query and body fingerprint) gets that stored answer with `Idempotent-Replayed: true`.
The same key with a different request is 409 `idempotency_conflict`; a retry while the
first is still running waits for it (up to `IN_PROGRESS_WAIT_S`), then 409
`idempotency_in_progress`. Error answers are not stored (a 402 retried after a top-up
runs again). Streaming answers are not stored. Job creation is also idempotent in the
store itself: the Job id is derived from (account, key) (scheduler.service), so even a
lost stored answer cannot create a second Job. docs/decisions/0015-idempotency.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import Protocol

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, validation_failed

MAX_KEY_CHARS = 255
PENDING_TTL_MS = 120_000
IN_PROGRESS_WAIT_S = 10.0
POLL_S = 0.02


class Stored(msgspec.Struct, array_like=True):
    fingerprint: str
    status: int  # 0 = still running
    headers: list[tuple[bytes, bytes]] = []
    body: bytes = b""


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(Stored)


class IdempotencyStore(Protocol):
    async def reserve(self, key: str, fingerprint: str) -> Stored | None:
        """None: reserved for us. Otherwise what is there (running or finished)."""

    async def complete(self, key: str, stored: Stored, ttl_ms: int) -> None: ...
    async def release(self, key: str) -> None: ...
    async def get(self, key: str) -> Stored | None: ...


class MemoryIdempotencyStore:
    def __init__(self, max_entries: int = 100_000) -> None:
        self._items: dict[str, tuple[Stored, float]] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def _live(self, key: str, now: float) -> Stored | None:
        item = self._items.get(key)
        if item is None or item[1] <= now:
            self._items.pop(key, None)
            return None
        return item[0]

    async def reserve(self, key: str, fingerprint: str) -> Stored | None:
        now = time.monotonic()
        with self._lock:
            existing = self._live(key, now)
            if existing is not None:
                return existing
            if len(self._items) >= self.max_entries:
                self._items = {k: v for k, v in self._items.items() if v[1] > now}
            self._items[key] = (Stored(fingerprint, 0), now + PENDING_TTL_MS / 1000)
            return None

    async def complete(self, key: str, stored: Stored, ttl_ms: int) -> None:
        with self._lock:
            self._items[key] = (stored, time.monotonic() + ttl_ms / 1000)

    async def release(self, key: str) -> None:
        with self._lock:
            self._items.pop(key, None)

    async def get(self, key: str) -> Stored | None:
        with self._lock:
            return self._live(key, time.monotonic())


class RedisIdempotencyStore:
    def __init__(self, redis, prefix: str) -> None:  # redis: redis.asyncio.Redis
        self.redis = redis
        self.prefix = prefix

    def _k(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    async def reserve(self, key: str, fingerprint: str) -> Stored | None:
        if await self.redis.set(self._k(key), _enc.encode(Stored(fingerprint, 0)), nx=True, px=PENDING_TTL_MS):
            return None
        return await self.get(key) or Stored(fingerprint, 0)

    async def complete(self, key: str, stored: Stored, ttl_ms: int) -> None:
        await self.redis.set(self._k(key), _enc.encode(stored), px=ttl_ms)

    async def release(self, key: str) -> None:
        await self.redis.delete(self._k(key))

    async def get(self, key: str) -> Stored | None:
        raw = await self.redis.get(self._k(key))
        return None if raw is None else _dec.decode(raw)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


class IdempotencyMiddleware:
    """ASGI middleware after authentication (needs `scope["user"]`)."""

    def __init__(self, app: ASGIApp, store: IdempotencyStore, ttl_ms: int, max_body_bytes: int) -> None:
        self.app = app
        self.store = store
        self.ttl_ms = ttl_ms
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw_key = _header(scope, b"idempotency-key")
        principal = scope.get("user")
        if raw_key is None or principal is None:
            await self.app(scope, receive, send)
            return
        raw_key = raw_key.strip()
        if not raw_key or len(raw_key) > MAX_KEY_CHARS:
            raise validation_failed({"Idempotency-Key": [f"must be 1..{MAX_KEY_CHARS} characters"]})
        body = await self._read_body(receive)
        fp = hashlib.blake2b(b"\0".join([scope["method"].encode(), scope["path"].encode(),
                                         scope.get("query_string", b""), body]), digest_size=16).hexdigest()
        store_key = f"{principal.account_id}:{hashlib.sha256(raw_key.encode()).hexdigest()}"
        existing = await self.store.reserve(store_key, fp)
        deadline = time.monotonic() + IN_PROGRESS_WAIT_S
        while existing is not None:
            if existing.fingerprint != fp:
                raise ApiError(409, "idempotency_conflict", "this Idempotency-Key was used for a different request")
            if existing.status:
                await self._replay(existing, send)
                return
            if time.monotonic() >= deadline:
                raise ApiError(409, "idempotency_in_progress",
                               "a request with this Idempotency-Key is still being processed; retry later",
                               headers={"Retry-After": "1"})
            await asyncio.sleep(POLL_S)
            existing = await self.store.get(store_key)
            if existing is None:  # the first attempt did not succeed and let go of the key: run it ourselves
                existing = await self.store.reserve(store_key, fp)
        scope["idempotency_key"] = raw_key
        sent = False

        async def replay_receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        streaming = False

        async def capture(message: Message) -> None:
            nonlocal status, headers, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ())]
                streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in headers)
            elif message["type"] == "http.response.body" and not streaming:
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_receive, capture)
        except BaseException:
            await self.store.release(store_key)
            raise
        if 200 <= status < 300 and not streaming:
            keep = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"date", b"server")]
            await self.store.complete(store_key, Stored(fp, status, keep, b"".join(chunks)), self.ttl_ms)
        else:
            await self.store.release(store_key)

    async def _read_body(self, receive: Receive) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "client_disconnected", "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, "payload_too_large", f"request body larger than {self.max_body_bytes} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    @staticmethod
    async def _replay(stored: Stored, send: Send) -> None:
        headers = [*stored.headers, (b"content-length", str(len(stored.body)).encode()),
                   (b"idempotent-replayed", b"true")]
        await send({"type": "http.response.start", "status": stored.status, "headers": headers})
        await send({"type": "http.response.body", "body": stored.body, "more_body": False})
