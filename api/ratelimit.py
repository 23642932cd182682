"""Per-key rate limits (GCRA), shared across processes through Redis.

The limit is `limit` requests per 60 s with bursts of up to `limit` (a token bucket
refilled continuously; GCRA keeps it as one number per key, the theoretical arrival
time). On Redis one Lua script does, atomically and in one round trip per request:
the revocation check of the key (api/auth.py), the GCRA step, and the key's exact
last-use time. Redis's own clock (`TIME`) is the clock, so processes agree on it.
Why not Litestar's RateLimitMiddleware: docs/decisions/0013-rate-limits.md.

Headers (api/auth.py): X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset
(Unix time in seconds at which the full allowance is back) and, on 429, Retry-After
(whole seconds, at least 1).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

WINDOW_MS = 60_000
_US = 1_000_000

_GCRA_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1, 0, 0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local ahead = new_tat - now
if ahead > window then
  return {0, 0, ahead - window, tat - now, tonumber(t[1])}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil(ahead / 1000) + 1000)
redis.call('HSET', KEYS[3], ARGV[3], string.format('%d', math.floor(now / 1000)))
return {1, math.floor((window - ahead) / interval), 0, ahead, tonumber(t[1])}
"""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    revoked: bool
    limit: int
    remaining: int
    reset_epoch_s: int  # when the whole allowance is back
    retry_after_s: int  # 0 when allowed

    def headers(self) -> dict[str, str]:
        out = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
               "X-RateLimit-Reset": str(self.reset_epoch_s)}
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after_s)
        return out


REVOKED = RateDecision(False, True, 0, 0, 0, 0)


def _decision(limit: int, allowed: bool, remaining: int, retry_us: int, ahead_us: int, now_s: int) -> RateDecision:
    return RateDecision(allowed=allowed, revoked=False, limit=limit, remaining=max(0, remaining),
                        reset_epoch_s=now_s + math.ceil(max(0, ahead_us) / _US),
                        retry_after_s=0 if allowed else max(1, math.ceil(retry_us / _US)))


class RateLimiter(Protocol):
    limit: int

    async def acquire(self, key_id: str) -> RateDecision: ...
    async def revoke(self, key_id: str, ttl_ms: int | None) -> None: ...
    async def last_used(self, key_ids: list[str]) -> dict[str, int]: ...


class MemoryRateLimiter:
    """The embedded default (one process): the same GCRA in a dict."""

    def __init__(self, limit_per_min: int, *, max_keys: int = 1_000_000) -> None:
        self.limit = limit_per_min
        self.interval_us = WINDOW_MS * 1000 // limit_per_min
        self.window_us = WINDOW_MS * 1000
        self.max_keys = max_keys
        self._tat: dict[str, int] = {}
        self._revoked: set[str] = set()
        self._last_used: dict[str, int] = {}
        self._lock = threading.Lock()

    async def acquire(self, key_id: str) -> RateDecision:
        return self.acquire_sync(key_id)

    def acquire_sync(self, key_id: str, now_us: int | None = None) -> RateDecision:
        now = time.time_ns() // 1000 if now_us is None else now_us
        with self._lock:
            if key_id in self._revoked:
                return REVOKED
            tat = max(self._tat.get(key_id, 0), now)
            new_tat = tat + self.interval_us
            ahead = new_tat - now
            now_s = now // _US
            if ahead > self.window_us:
                return _decision(self.limit, False, 0, ahead - self.window_us, tat - now, now_s)
            if len(self._tat) >= self.max_keys:
                self._tat = {k: v for k, v in self._tat.items() if v > now}
            self._tat[key_id] = new_tat
            self._last_used[key_id] = now // 1000
            return _decision(self.limit, True, (self.window_us - ahead) // self.interval_us, 0, ahead, now_s)

    async def revoke(self, key_id: str, ttl_ms: int | None) -> None:
        with self._lock:
            self._revoked.add(key_id)

    async def last_used(self, key_ids: list[str]) -> dict[str, int]:
        with self._lock:
            return {k: self._last_used[k] for k in key_ids if k in self._last_used}


class RedisRateLimiter:
    """Several processes, one Redis: one EVALSHA per request (see module docstring)."""

    def __init__(self, redis, prefix: str, limit_per_min: int) -> None:  # redis: redis.asyncio.Redis
        self.redis = redis
        self.prefix = prefix
        self.limit = limit_per_min
        self.interval_us = WINDOW_MS * 1000 // limit_per_min
        self.window_us = WINDOW_MS * 1000
        self._script = redis.register_script(_GCRA_LUA)
        self.last_used_key = f"{prefix}keys:last_used"

    def revoked_key(self, key_id: str) -> str:
        return f"{self.prefix}keys:revoked:{key_id}"

    async def acquire(self, key_id: str) -> RateDecision:
        res = await self._script(keys=[f"{self.prefix}rl:{key_id}", self.revoked_key(key_id), self.last_used_key],
                                 args=[self.interval_us, self.window_us, key_id])
        if int(res[0]) < 0:
            return REVOKED
        allowed = int(res[0]) == 1
        return _decision(self.limit, allowed, int(res[1]), int(res[2]), int(res[3]), int(res[4]))

    async def revoke(self, key_id: str, ttl_ms: int | None) -> None:
        if ttl_ms is not None and ttl_ms > 0:
            await self.redis.set(self.revoked_key(key_id), b"1", px=ttl_ms)
        else:
            await self.redis.set(self.revoked_key(key_id), b"1")

    async def last_used(self, key_ids: list[str]) -> dict[str, int]:
        if not key_ids:
            return {}
        values = await self.redis.hmget(self.last_used_key, key_ids)
        return {k: int(v) for k, v in zip(key_ids, values, strict=True) if v is not None}
