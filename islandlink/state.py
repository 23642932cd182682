"""Per-attempt stream state of the Island link: the last applied sequence number and the
output so far of each (Job, Island) attempt, so a replayed or out-of-order message is
refused and the final output is assembled once. In memory on the embedded default, in
Redis (one Lua call per message) when several processes share the Islands."""

from __future__ import annotations

import time
from typing import Any, Protocol

import structlog


log = structlog.get_logger("islandlink.bus")

from islandlink.bus import MAX_OUTPUT_BYTES


# ------------------------------------------------------------------ per-attempt stream state
APPEND, REPLACE, NONE = "append", "set", "none"
OK, BAD_SEQUENCE, TOO_LARGE = 1, 0, -1


class ChannelState(Protocol):
    async def advance(self, job_id: str, island_id: str, seq: int, mode: str, data: str,
                      limit: int = MAX_OUTPUT_BYTES) -> tuple[int, int]:
        """Apply stream message `seq` if it is the next one: (OK, seq) after appending or
        replacing the output; (BAD_SEQUENCE, last) or (TOO_LARGE, last) without change."""

    async def last_seq(self, job_id: str, island_id: str) -> int: ...
    async def result(self, job_id: str, island_id: str) -> str | None: ...
    async def forget(self, job_id: str, island_id: str) -> None: ...
    async def close(self) -> None: ...


class MemoryChannelState:
    def __init__(self, ttl_s: float = 86_400) -> None:
        self.ttl_s = ttl_s
        self._d: dict[tuple[str, str], list[Any]] = {}  # -> [last seq, parts, size, replaced, touched]
        self._next_sweep = 0.0

    async def advance(self, job_id: str, island_id: str, seq: int, mode: str, data: str,
                      limit: int = MAX_OUTPUT_BYTES) -> tuple[int, int]:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 60
            for k in [k for k, e in self._d.items() if now - e[4] > self.ttl_s]:
                del self._d[k]
        e = self._d.get((job_id, island_id))
        if e is None:
            e = self._d[(job_id, island_id)] = [0, [], 0, None, now]
        last = e[0]
        if seq != last + 1:
            return BAD_SEQUENCE, last
        if mode == APPEND:
            size = len(data.encode())
            if e[2] + size > limit:
                return TOO_LARGE, last
            e[1].append(data)
            e[2] += size
        elif mode == REPLACE:
            if len(data.encode()) > limit:
                return TOO_LARGE, last
            e[3] = data
        e[0] = seq
        e[4] = now
        return OK, seq

    async def last_seq(self, job_id: str, island_id: str) -> int:
        e = self._d.get((job_id, island_id))
        return e[0] if e else 0

    async def result(self, job_id: str, island_id: str) -> str | None:
        e = self._d.get((job_id, island_id))
        if e is None:
            return None
        return e[3] if e[3] is not None else "".join(e[1])

    async def forget(self, job_id: str, island_id: str) -> None:
        self._d.pop((job_id, island_id), None)

    async def close(self) -> None:
        pass


_ADVANCE_LUA = """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(ARGV[1])
if seq ~= last + 1 then return {0, last} end
local ttl = tonumber(ARGV[4])
local limit = tonumber(ARGV[5])
if ARGV[2] == 'append' then
  if redis.call('STRLEN', KEYS[2]) + string.len(ARGV[3]) > limit then return {-1, last} end
  redis.call('APPEND', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ttl)
elseif ARGV[2] == 'set' then
  if string.len(ARGV[3]) > limit then return {-1, last} end
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ttl)
end
redis.call('SET', KEYS[1], seq, 'PX', ttl)
return {1, seq}
"""


class RedisChannelState:
    def __init__(self, url: str, prefix: str, ttl_s: int = 86_400) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
        self.prefix = prefix
        self.ttl_ms = ttl_s * 1000
        self._advance = self.redis.register_script(_ADVANCE_LUA)

    def _keys(self, job_id: str, island_id: str) -> list[str]:
        return [f"{self.prefix}isl:seq:{job_id}:{island_id}", f"{self.prefix}isl:out:{job_id}:{island_id}"]

    async def advance(self, job_id: str, island_id: str, seq: int, mode: str, data: str,
                      limit: int = MAX_OUTPUT_BYTES) -> tuple[int, int]:
        code, last = await self._advance(keys=self._keys(job_id, island_id),
                                         args=[seq, mode, data, self.ttl_ms, limit])
        return int(code), int(last)

    async def last_seq(self, job_id: str, island_id: str) -> int:
        raw = await self.redis.get(self._keys(job_id, island_id)[0])
        return int(raw) if raw else 0

    async def result(self, job_id: str, island_id: str) -> str | None:
        raw = await self.redis.get(self._keys(job_id, island_id)[1])
        return raw.decode() if raw is not None else None

    async def forget(self, job_id: str, island_id: str) -> None:
        await self.redis.delete(*self._keys(job_id, island_id))

    async def close(self) -> None:
        await self.redis.aclose()
