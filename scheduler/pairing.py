"""Pairing codes for Islands of the published agent (NATS transport, decision 0055).

An unpaired agent asks on `coordinator.hosts.pairing`; it is given a short code, which
its owner enters while signed in (`POST /api/v1/islands/pair`). The code binds the Island
to the owner's account; approval stays with the operator.

Codes are single-use, expire (`ttl_s`), and each host id may obtain a new code at most
`per_host_per_hour` times an hour (a request while its code is still valid gets the same
code again). A wrong code changes nothing. Pending codes are not events (nothing is
decided until the owner redeems one): in memory on the embedded default, in Redis when
several processes share the Islands (the process answering the agent and the process
serving the owner may differ).

Also here: the Island's NATS password (generated, shown once) and its bcrypt hash (the
only thing stored; nats-server checks bcrypt hashes itself)."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I
CODE_LENGTH = 8  # 40 bits
PASSWORD_BYTES = 24
MAX_PENDING = 100_000


class PairingRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PendingIsland(msgspec.Struct, kw_only=True):
    """What an agent told us before it was paired (its `coordinator.hosts.register`)."""

    host_id: str
    capabilities: dict[str, Any] = {}
    agent_version: str = ""


class IssuedCode(msgspec.Struct, kw_only=True):
    code: str
    expires_in_s: int


def make_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def normalize_code(text: str) -> str:
    return "".join(ch for ch in str(text).upper() if ch.isalnum())[:32]


def make_password() -> str:
    """Alphanumeric only: the agent splits its URL at the first `@` and does no
    percent-decoding, so `@` and `%` must never appear."""
    return "".join(secrets.choice("abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789")
                   for _ in range(PASSWORD_BYTES))


def hash_password(password: str, rounds: int = 11) -> str:
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds, prefix=b"2a")).decode()


def check_password(password: str, hashed: str) -> bool:
    import bcrypt

    try:
        return bcrypt.checkpw(password.encode(), hashed.encode())
    except ValueError:
        return False


def _code_key(code: str) -> str:
    return hashlib.sha256(normalize_code(code).encode()).hexdigest()


@dataclass(frozen=True)
class PairingSettings:
    ttl_s: int = 600
    per_host_per_hour: int = 10
    redeem_failures_per_min: int = 10  # per account


class PairingCodes(Protocol):
    async def issue(self, pending: PendingIsland) -> IssuedCode: ...
    async def remember(self, pending: PendingIsland) -> None: ...
    async def redeem(self, code: str) -> PendingIsland | None: ...
    async def failed_attempt(self, account_id: str) -> bool: ...
    async def close(self) -> None: ...


class MemoryPairingCodes:
    """Codes stored by their SHA-256 (a leaked dump names no usable code)."""

    def __init__(self, settings: PairingSettings | None = None, clock: Any = time.time) -> None:
        self.settings = settings or PairingSettings()
        self.clock = clock
        self._codes: dict[str, tuple[str, float]] = {}  # code hash -> (host id, expires at)
        self._by_host: dict[str, tuple[str, str, float]] = {}  # host -> (code, code hash, expires at)
        self._issued: dict[str, list[float]] = {}  # host -> issue times within the hour
        self._pending: dict[str, PendingIsland] = {}
        self._fails: dict[str, list[float]] = {}

    def _sweep(self, now: float) -> None:
        if len(self._codes) < MAX_PENDING // 2:
            return
        for k in [k for k, (_, exp) in self._codes.items() if exp <= now]:
            host, _ = self._codes.pop(k)
            self._by_host.pop(host, None)

    async def remember(self, pending: PendingIsland) -> None:
        if len(self._pending) >= MAX_PENDING and pending.host_id not in self._pending:
            self._pending.pop(next(iter(self._pending)))
        self._pending[pending.host_id] = pending

    async def issue(self, pending: PendingIsland) -> IssuedCode:
        now = self.clock()
        self._sweep(now)
        host = pending.host_id
        if host not in self._pending:
            await self.remember(pending)
        cur = self._by_host.get(host)
        if cur is not None and cur[2] > now + 30:
            return IssuedCode(code=cur[0], expires_in_s=int(cur[2] - now))
        times = [t for t in self._issued.get(host, []) if now - t < 3600]
        if len(times) >= self.settings.per_host_per_hour:
            raise PairingRefused("too many pairing requests for this host; try again later")
        if cur is not None:
            self._codes.pop(cur[1], None)
        code = make_code()
        key = _code_key(code)
        exp = now + self.settings.ttl_s
        self._codes[key] = (host, exp)
        self._by_host[host] = (code, key, exp)
        self._issued[host] = [*times, now]
        return IssuedCode(code=code, expires_in_s=self.settings.ttl_s)

    async def redeem(self, code: str) -> PendingIsland | None:
        now = self.clock()
        entry = self._codes.pop(_code_key(code), None)
        if entry is None:
            return None
        host, exp = entry
        self._by_host.pop(host, None)
        if exp <= now:
            return None
        return self._pending.pop(host, PendingIsland(host_id=host))

    async def failed_attempt(self, account_id: str) -> bool:
        """Count a wrong code; False once the account is over its limit this minute."""
        now = self.clock()
        times = [t for t in self._fails.get(account_id, []) if now - t < 60]
        times.append(now)
        self._fails[account_id] = times
        return len(times) <= self.settings.redeem_failures_per_min

    async def blocked(self, account_id: str) -> bool:
        now = self.clock()
        return len([t for t in self._fails.get(account_id, []) if now - t < 60]) >= \
            self.settings.redeem_failures_per_min

    async def close(self) -> None:
        pass


_REDEEM = """
local host = redis.call('GET', KEYS[1])
if not host then return false end
redis.call('DEL', KEYS[1])
local hk = ARGV[1] .. 'pair:host:' .. host
redis.call('DEL', hk)
local pk = ARGV[1] .. 'pair:pending:' .. host
local pending = redis.call('GET', pk)
redis.call('DEL', pk)
return {host, pending or ''}
"""


class RedisPairingCodes:
    """The same rules in Redis: keys `{prefix}pair:code:{sha256}` -> host (with the TTL),
    `pair:host:{host}` -> the code, `pair:pending:{host}`, `pair:issued:{host}` (a counter
    per hour), `pair:fail:{account}` (per minute). Redeeming is one Lua call: single use."""

    def __init__(self, url: str, prefix: str, settings: PairingSettings | None = None) -> None:
        import redis.asyncio as aioredis

        self.settings = settings or PairingSettings()
        self.prefix = prefix
        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self._redeem = self.redis.register_script(_REDEEM)

    def _k(self, *parts: str) -> str:
        return self.prefix + "pair:" + ":".join(parts)

    async def remember(self, pending: PendingIsland) -> None:
        await self.redis.set(self._k("pending", pending.host_id), msgspec.json.encode(pending), ex=86_400)

    async def issue(self, pending: PendingIsland) -> IssuedCode:
        host = pending.host_id
        if not await self.redis.exists(self._k("pending", host)):
            await self.remember(pending)
        cur = await self.redis.get(self._k("host", host))
        ttl = await self.redis.ttl(self._k("host", host)) if cur else -2
        if cur and ttl > 30:
            return IssuedCode(code=cur.decode(), expires_in_s=int(ttl))
        n = await self.redis.incr(self._k("issued", host))
        if n == 1:
            await self.redis.expire(self._k("issued", host), 3600)
        if n > self.settings.per_host_per_hour:
            raise PairingRefused("too many pairing requests for this host; try again later")
        if cur:
            await self.redis.delete(self._k("code", _code_key(cur.decode())))
        code = make_code()
        ttl_s = self.settings.ttl_s
        pipe = self.redis.pipeline()
        pipe.set(self._k("code", _code_key(code)), host, ex=ttl_s)
        pipe.set(self._k("host", host), code, ex=ttl_s)
        pipe.expire(self._k("pending", host), max(ttl_s, 86_400))
        await pipe.execute()
        return IssuedCode(code=code, expires_in_s=ttl_s)

    async def redeem(self, code: str) -> PendingIsland | None:
        out = await self._redeem(keys=[self._k("code", _code_key(code))], args=[self.prefix])
        if not out:
            return None
        host, raw = out[0].decode(), out[1]
        if raw:
            try:
                return msgspec.json.decode(raw, type=PendingIsland)
            except msgspec.DecodeError:
                pass
        return PendingIsland(host_id=host)

    async def failed_attempt(self, account_id: str) -> bool:
        k = self._k("fail", account_id)
        n = await self.redis.incr(k)
        if n == 1:
            await self.redis.expire(k, 60)
        return n <= self.settings.redeem_failures_per_min

    async def blocked(self, account_id: str) -> bool:
        raw = await self.redis.get(self._k("fail", account_id))
        return bool(raw) and int(raw) >= self.settings.redeem_failures_per_min

    async def close(self) -> None:
        await self.redis.aclose()


def build_pairing_codes(redis_url: str | None, prefix: str, settings: PairingSettings | None = None) -> Any:
    if redis_url:
        return RedisPairingCodes(redis_url, prefix, settings)
    return MemoryPairingCodes(settings)
