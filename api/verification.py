"""Identity verification (KYC) as the account sees it (api-contract.md "Network
endpoints"): `GET /api/v1/verification/status` and `POST /api/v1/verification/request`.

States: `unverified` (never asked), `pending` (asked, an operator has not decided),
`verified`, `rejected` (an operator refused the request or withdrew a verification).
Asking writes `Account.VerificationRequested`; operators decide with the existing KYC
action (`POST /api/v1/admin/accounts/{id}/kyc` `{"verified": true|false}`), which writes
`KycVerified`, or `VerificationRejected` for a pending request (`KycRevoked` for a
verified account). `unlocks` lists what verification opens on this coordinator: spending
past the free-tier allowance and every Cargo that requires KYC (decision 0053).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import Body

from api.errors import ApiError, unauthorized, validation_failed
from api.schemas import encode, iso
from ledger.accounts import Account
from ledger.errors import AlreadyVerified, UnknownAccount
from ledger.pricing import micro_to_credits
from ledger.service import request_verification_in
from store.unit_of_work import UnitOfWork

if TYPE_CHECKING:
    from api.services import ApiServices

MAX_NOTE_CHARS = 500


class VerificationRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    note: str = ""


class VerificationOut(msgspec.Struct, kw_only=True):
    status: str
    verified_at: str | None
    requested_at: str | None
    unlocks: list[str]
    free_tier_credits: Any


class VerificationEnvelope(msgspec.Struct):
    data: VerificationOut


def verification_handlers(services: ApiServices) -> list[Any]:
    c = services.coordinator
    committer = c.committer
    fresh = services.fresh_reads

    def unlocks() -> list[str]:
        kyc_cargos = sorted(cg.slug for cg in c.scheduler.catalog.all() if cg.requires_kyc or not cg.free_tier)
        return ["spending_beyond_free_tier", *[f"cargo:{slug}" for slug in kyc_cargos]]

    def view(acct: Account) -> VerificationOut:
        return VerificationOut(status=acct.verification, verified_at=iso(acct.verified_at),
                               requested_at=iso(acct.verification_requested_at), unlocks=unlocks(),
                               free_tier_credits=micro_to_credits(c.ledger.config.free_tier_limit_micro))

    async def load(account_id: Any) -> VerificationOut:
        def read(uow: UnitOfWork) -> VerificationOut | None:
            acct = uow.get_or_none(account_id, fresh=fresh)
            return view(acct) if isinstance(acct, Account) else None

        out = await committer.aquery(read)
        if out is None:
            raise unauthorized("the API key's account does not exist")
        return out

    @get("/api/v1/verification/status", summary="The account's identity verification (KYC) and what it unlocks")
    async def verification_status(request: Request) -> Response:
        return Response(content=encode(VerificationEnvelope(await load(request.user.account_id))),
                        media_type="application/json")

    @post("/api/v1/verification/request", status_code=200,
          summary="Ask for identity verification (pending until an operator decides)")
    async def verification_request(request: Request,
                                   data: VerificationRequest | None = Body(default=None)) -> Response:
        note = (data.note if data is not None else "").strip()
        if len(note) > MAX_NOTE_CHARS:
            raise validation_failed({"note": [f"at most {MAX_NOTE_CHARS} characters"]})
        account_id = request.user.account_id
        try:
            created = await committer.aexecute(lambda uow: request_verification_in(
                uow, account_id, by=f"key:{request.user.key_id}", note=note))
        except AlreadyVerified as exc:
            raise ApiError(409, exc.code, exc.message) from None
        except UnknownAccount:
            raise unauthorized("the API key's account does not exist") from None
        out = await load(account_id)
        return Response(content=encode(VerificationEnvelope(out)), status_code=201 if created else 200,
                        media_type="application/json")

    return [verification_status, verification_request]
