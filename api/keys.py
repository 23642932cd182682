"""API keys: the `ApiKey` aggregate (one per key) and the account's `KeyRing` (which keys
it has, in creation order), issued, revoked and looked up through the group committer.

- A key is `ak_` + 43 characters of base62 (256 bits). Only its SHA-256 is stored; the
  key's id is derived from that hash (uuid5), so a lookup by key is one aggregate read.
  A fast hash is right for a 256-bit random secret (no dictionary to guess from).
- `prefix` (the first 8 characters) is shown so people can tell keys apart.
- Scopes: `read` (GET) and `write` (everything else).
- Revocation is an event; api/auth.py drops the key from every process's cache at once
  (a Redis marker checked on every request in the same round trip as the rate limit).
- `last_used_at`: the exact time lives in Redis / memory (written by the rate limiter,
  no event per request); a coarse `Used` event is saved at most once per hour per key
  so that the time survives restarts without a write per request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from store.clock import id_from_text, ms_to_datetime
from store.unit_of_work import GroupCommitter, UnitOfWork

KEY_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4c55-9a55-0a7c1e0c0010")
KEY_PREFIX = "ak_"
KEY_RANDOM_CHARS = 43  # 43 base62 characters = 256 bits
SHOWN_PREFIX_CHARS = 8
MAX_KEY_CHARS = 128
MAX_ACTIVE_KEYS_PER_ACCOUNT = 100
MAX_KEYS_PER_RING = 1_000  # revoked keys stay listed in the ring (audit), up to this bound
SCOPES = ("read", "write")
USED_EVENT_EVERY_MS = 3_600_000
_ALPHABET = string.ascii_letters + string.digits


class KeyError_(Exception):  # noqa: N801 - not the builtin KeyError
    """A key command was refused (too many keys, unknown key)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def new_secret() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(KEY_RANDOM_CHARS))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_for_hash(key_hash: str) -> UUID:
    return uuid.uuid5(KEY_NAMESPACE, key_hash)


def ring_id(account_id: UUID | str) -> UUID:
    return uuid.uuid5(KEY_NAMESPACE, f"ring:{account_id}")


class ApiKey(Aggregate):
    class Issued(Aggregate.Created):
        account_id: str
        name: str
        prefix: str
        key_hash: str
        scopes: list
        expires_at_ms: int  # 0 = never

    def __init__(self, account_id: str, name: str, prefix: str, key_hash: str, scopes: list,
                 expires_at_ms: int) -> None:
        self.account_id = account_id
        self.name = name
        self.prefix = prefix
        self.key_hash = key_hash
        self.scopes = list(scopes)
        self.expires_at_ms = expires_at_ms
        self.revoked_at = None
        self.last_used_ms = 0

    class Revoked(Aggregate.Event):
        by: str

        def apply(self, key: ApiKey) -> None:
            key.revoked_at = self.timestamp

    class Used(Aggregate.Event):
        """Coarse last use (at most one per key per hour); the exact time is live state."""

        at_ms: int

        def apply(self, key: ApiKey) -> None:
            key.last_used_ms = max(key.last_used_ms, self.at_ms)


class KeyRing(Aggregate):
    """An account's keys in creation order (the index behind GET /api-keys)."""

    class Created(Aggregate.Created):
        account_id: str

    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.key_ids: list[str] = []

    class KeyAdded(Aggregate.Event):
        key_id: str

        def apply(self, ring: KeyRing) -> None:
            ring.key_ids = [*ring.key_ids, self.key_id]


@dataclass(frozen=True)
class KeyRecord:
    """What authentication needs of a key (cached per process)."""

    key_id: str
    account_id: UUID
    scopes: frozenset[str]
    expires_at_ms: int
    revoked: bool
    last_used_ms: int

    def expired(self, now_ms: int) -> bool:
        return bool(self.expires_at_ms) and now_ms >= self.expires_at_ms


@dataclass(frozen=True)
class KeyInfo:
    """A key as the API shows it (never the secret)."""

    key_id: str
    account_id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: Any
    expires_at_ms: int
    revoked_at: Any
    last_used_ms: int


def _record(key: ApiKey) -> KeyRecord:
    return KeyRecord(str(key.id), id_from_text(key.account_id), frozenset(key.scopes), key.expires_at_ms,
                     key.revoked_at is not None, key.last_used_ms)


def _info(key: ApiKey) -> KeyInfo:
    return KeyInfo(str(key.id), key.account_id, key.name, key.prefix, list(key.scopes), key.created_on,
                   key.expires_at_ms, key.revoked_at, key.last_used_ms)


# ------------------------------------------------------------------ commands
def issue_in(uow: UnitOfWork, account_id: UUID, name: str, scopes: list[str], expires_at_ms: int,
             secret: str) -> KeyInfo:
    from ledger.service import load_account

    load_account(uow, account_id)  # UnknownAccount if it does not exist
    ring = uow.get_or_none(ring_id(account_id))
    if ring is None:
        ring = KeyRing._create(KeyRing.Created, id=ring_id(account_id), account_id=str(account_id),
                               timestamp=ms_to_datetime(uow.now_ms))
        uow.add(ring)
    elif len(ring.key_ids) >= MAX_KEYS_PER_RING:
        raise KeyError_("too_many_keys", f"an account may have at most {MAX_KEYS_PER_RING} keys in all")
    else:
        active = sum(1 for kid in ring.key_ids if (k := uow.get_or_none(UUID(kid))) is not None
                     and k.revoked_at is None and not (k.expires_at_ms and k.expires_at_ms <= uow.now_ms))
        if active >= MAX_ACTIVE_KEYS_PER_ACCOUNT:
            raise KeyError_("too_many_keys", f"an account may have at most {MAX_ACTIVE_KEYS_PER_ACCOUNT} active keys")
    key_hash = hash_key(secret)
    key = ApiKey._create(ApiKey.Issued, id=key_id_for_hash(key_hash), account_id=str(account_id), name=name,
                         prefix=secret[:SHOWN_PREFIX_CHARS], key_hash=key_hash, scopes=sorted(set(scopes)),
                         expires_at_ms=expires_at_ms, timestamp=ms_to_datetime(uow.now_ms))
    uow.add(key)
    ring.trigger_event(KeyRing.KeyAdded, key_id=str(key.id), timestamp=ms_to_datetime(uow.now_ms))
    return _info(key)


def revoke_in(uow: UnitOfWork, account_id: UUID, key_id: UUID, by: str) -> KeyInfo:
    key = uow.get_or_none(key_id)
    if not isinstance(key, ApiKey) or key.account_id != str(account_id):
        raise KeyError_("not_found", "API key not found")
    if key.revoked_at is None:
        key.trigger_event(ApiKey.Revoked, by=by[:200], timestamp=ms_to_datetime(uow.now_ms))
    return _info(key)


def mark_used_in(uow: UnitOfWork, key_id: UUID, at_ms: int) -> None:
    key = uow.get_or_none(key_id)
    if isinstance(key, ApiKey) and at_ms - key.last_used_ms >= USED_EVENT_EVERY_MS:
        key.trigger_event(ApiKey.Used, at_ms=at_ms, timestamp=ms_to_datetime(uow.now_ms))


class KeyStore:
    """Key commands and reads through the group committer (sync for the CLI, async for HTTP)."""

    def __init__(self, committer: GroupCommitter, *, fresh_reads: bool) -> None:
        self.committer = committer
        self.fresh = fresh_reads  # several processes: re-read aggregates from the store

    @staticmethod
    def _check(name: str, scopes: list[str] | None) -> list[str]:
        scopes = list(scopes or SCOPES)
        if not all(s in SCOPES for s in scopes):
            raise KeyError_("invalid_scope", f"scopes must be among {', '.join(SCOPES)}")
        return scopes

    def _issue_command(self, account_id: UUID, name: str, scopes: list[str] | None,
                       expires_at_ms: int) -> tuple[str, Callable[[UnitOfWork], KeyInfo]]:
        checked = self._check(name, scopes)
        secret = new_secret()
        return secret, lambda uow: issue_in(uow, account_id, name, checked, expires_at_ms, secret)

    def issue(self, account_id: UUID, name: str, scopes: list[str] | None = None,
              expires_at_ms: int = 0) -> tuple[str, KeyInfo]:
        secret, command = self._issue_command(account_id, name, scopes, expires_at_ms)
        return secret, self.committer.execute(command)

    async def aissue(self, account_id: UUID, name: str, scopes: list[str] | None = None,
                     expires_at_ms: int = 0) -> tuple[str, KeyInfo]:
        secret, command = self._issue_command(account_id, name, scopes, expires_at_ms)
        return secret, await self.committer.aexecute(command)

    async def arevoke(self, account_id: UUID, key_id: UUID, by: str) -> KeyInfo:
        return await self.committer.aexecute(lambda uow: revoke_in(uow, account_id, key_id, by))

    async def alist(self, account_id: UUID) -> list[KeyInfo]:
        fresh = self.fresh

        def read(uow: UnitOfWork) -> list[KeyInfo]:
            ring = uow.get_or_none(ring_id(account_id), fresh=fresh)
            if not isinstance(ring, KeyRing):
                return []
            out = []
            for kid in ring.key_ids:
                key = uow.get_or_none(UUID(kid), fresh=fresh)
                if isinstance(key, ApiKey) and key.revoked_at is None:
                    out.append(_info(key))
            return out

        return await self.committer.aquery(read)

    async def alookup(self, key_hash: str) -> KeyRecord | None:
        key_id = key_id_for_hash(key_hash)
        fresh = self.fresh

        def read(uow: UnitOfWork) -> KeyRecord | None:
            key = uow.get_or_none(key_id, fresh=fresh)
            if not isinstance(key, ApiKey) or not hmac.compare_digest(key.key_hash, key_hash):
                return None
            return _record(key)

        return await self.committer.aquery(read)

    def mark_used(self, key_id: str, at_ms: int) -> None:
        """Fire and forget: a coarse durable last-use time (at most hourly per key)."""
        try:
            fut = self.committer.submit(lambda uow: mark_used_in(uow, UUID(key_id), at_ms))
        except Exception:  # noqa: BLE001 - best effort: the live value is in Redis / memory
            return
        fut.add_done_callback(lambda f: f.exception())
