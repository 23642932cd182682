"""One-time login links (decision 0065): `coordinator accounts login-link ACCOUNT` and
`coordinator demo` print `<base>/login/link/<token>`; opening it shows a one-button page
whose POST signs the browser in and spends the link.

- The token is `ll_` + 43 base62 characters (256 bits); only its SHA-256 is stored, in a
  `LoginLink` aggregate whose id is derived from that hash (uuid5), so a lookup is one
  aggregate read and the CLI (another process) and the server share links through the
  event store, on the embedded default as on PostgreSQL.
- Short-lived: `expires_at_ms` (default 15 minutes, at most 24 hours).
- Single-use: `Redeemed` is the aggregate's second event; two redemptions racing on two
  processes conflict on the aggregate version and the group committer re-runs the loser,
  which then sees the link spent.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import uuid
from dataclasses import dataclass
from uuid import UUID

from eventsourcing.domain import Aggregate

from store.clock import ms_to_datetime
from store.unit_of_work import GroupCommitter, UnitOfWork

LINK_NAMESPACE = uuid.UUID("3b0c9a0e-5f43-4c1e-9d0e-7a1e0c0d0065")
TOKEN_PREFIX = "ll_"
TOKEN_RANDOM_CHARS = 43
MAX_TOKEN_CHARS = 64
DEFAULT_TTL_S = 900
MAX_TTL_S = 86_400
_ALPHABET = string.ascii_letters + string.digits


class LinkRefused(Exception):
    """The link cannot sign anyone in: unknown, expired or already used."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def link_id_for_hash(token_hash: str) -> UUID:
    return uuid.uuid5(LINK_NAMESPACE, token_hash)


class LoginLink(Aggregate):
    class Issued(Aggregate.Created):
        account_id: str
        token_hash: str
        expires_at_ms: int
        by: str

    def __init__(self, account_id: str, token_hash: str, expires_at_ms: int, by: str) -> None:
        self.account_id = account_id
        self.token_hash = token_hash
        self.expires_at_ms = expires_at_ms
        self.by = by
        self.redeemed_at_ms = 0

    class Redeemed(Aggregate.Event):
        at_ms: int

        def apply(self, link: LoginLink) -> None:
            link.redeemed_at_ms = self.at_ms


@dataclass(frozen=True)
class LinkInfo:
    account_id: str
    expires_at_ms: int


def _check(link: object, token_hash: str, now_ms: int) -> LoginLink:
    if not isinstance(link, LoginLink) or link.token_hash != token_hash:
        raise LinkRefused("this sign-in link is not valid")
    if link.redeemed_at_ms:
        raise LinkRefused("this sign-in link was already used")
    if now_ms >= link.expires_at_ms:
        raise LinkRefused("this sign-in link has expired")
    return link


def issue_in(uow: UnitOfWork, account_id: UUID, token: str, ttl_s: int, by: str) -> LinkInfo:
    from ledger.service import load_account

    load_account(uow, account_id)  # UnknownAccount if it does not exist
    token_hash = hash_token(token)
    expires = uow.now_ms + ttl_s * 1000
    link = LoginLink._create(LoginLink.Issued, id=link_id_for_hash(token_hash), account_id=str(account_id),
                             token_hash=token_hash, expires_at_ms=expires, by=by[:200],
                             timestamp=ms_to_datetime(uow.now_ms))
    uow.add(link)
    return LinkInfo(str(account_id), expires)


def redeem_in(uow: UnitOfWork, token: str) -> LinkInfo:
    token_hash = hash_token(token)
    link = _check(uow.get_or_none(link_id_for_hash(token_hash), fresh=True), token_hash, uow.now_ms)
    link.trigger_event(LoginLink.Redeemed, at_ms=uow.now_ms, timestamp=ms_to_datetime(uow.now_ms))
    return LinkInfo(link.account_id, link.expires_at_ms)


def well_formed(token: str) -> bool:
    return (token.startswith(TOKEN_PREFIX) and len(token) <= MAX_TOKEN_CHARS
            and all(ch in _ALPHABET for ch in token[len(TOKEN_PREFIX):]))


class LoginLinks:
    """Issue (CLI, demo) and peek / redeem (the web app) through the group committer."""

    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer

    def issue(self, account_id: UUID, *, ttl_s: int = DEFAULT_TTL_S, by: str = "operator") -> tuple[str, LinkInfo]:
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl must be 1..{MAX_TTL_S} s")
        token = TOKEN_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(TOKEN_RANDOM_CHARS))
        return token, self.committer.execute(lambda uow: issue_in(uow, account_id, token, ttl_s, by))

    async def apeek(self, token: str) -> LinkInfo:
        """Whether the link would sign in now (nothing changes; GET of the link page)."""
        if not well_formed(token):
            raise LinkRefused("this sign-in link is not valid")
        token_hash = hash_token(token)

        def read(uow: UnitOfWork) -> LinkInfo:
            link = _check(uow.get_or_none(link_id_for_hash(token_hash), fresh=True), token_hash, uow.now_ms)
            return LinkInfo(link.account_id, link.expires_at_ms)

        return await self.committer.aquery(read)

    async def aredeem(self, token: str) -> LinkInfo:
        if not well_formed(token):
            raise LinkRefused("this sign-in link is not valid")
        return await self.committer.aexecute(lambda uow: redeem_in(uow, token))
