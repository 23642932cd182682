"""The web app's routes (docs/WEB.md): HTML pages rendered with Jinja, and a few JSON
helpers under /web/api that the pages' scripts call beside the consumer API (which they
call with the session, api/auth.py). Every route here has `opt={"own_auth": True}`: it
reads the signed-in account from the session itself, and everything it shows is scoped
to that account exactly as the API is (another account's Job or image is a 404).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import msgspec
from litestar import MediaType, Request, Response, Router, get, post
from litestar.params import Body, FromPath
from litestar.response import Redirect, Template
from litestar.enums import RequestEncodingType

from api.auth import SESSION_ACCOUNT, SESSION_KEY_ID, SESSION_SCOPES
from api.errors import ApiError, unauthorized
from api.schemas import encode
from api.services import ApiServices
from ledger.accounts import Account
from ledger.pricing import micro_to_credits
from ledger.service import balance_of
from projections.conversations import ConversationsView
from scheduler.jobs import TERMINAL, Job
from store.unit_of_work import UnitOfWork
from web.login_links import LinkRefused, LoginLinks
from web.markdown import render
from web.settings import WebSettings
from web.topup import TopUpRefused, topup_in

LOW_CREDITS_MICRO = 10_000_000  # the nudge under 10 credits (as the API's low_balance)
IMAGES_SHOWN = 10
STATEMENT_LINES = 100
OWN = {"own_auth": True}
STATIC_DIR = Path(__file__).parent / "static"
TEMPLATE_DIR = Path(__file__).parent / "templates"
READ_WAIT_S = 2.0
TYPICAL_COMPLETION_TOKENS = 500  # the catalog's typical request (scheduler/cargos.toml)


@dataclass
class Me:
    account_id: uuid.UUID
    email: str
    credits: Decimal
    held: Decimal
    free_tier_remaining: Decimal
    kyc_verified: bool
    low: bool
    via: str
    verification: str = "unverified"  # unverified | pending | verified | rejected (api/verification.py)


def _credits(micro: int) -> Decimal:
    return micro_to_credits(int(micro))


def _safe_next(value: str | None) -> str:
    """Only a local path (no scheme, no host, no `//`) is a place to go after sign-in."""
    if not value:
        return "/chat"
    parsed = urlparse(value)
    if parsed.scheme or parsed.netloc or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/chat"
    return value


def web_router(services: ApiServices, ws: WebSettings, links: LoginLinks, islands: Any = None) -> Router:
    c = services.coordinator
    committer = c.committer
    sched = c.scheduler
    fresh = services.fresh_reads

    def account_of(request: Request) -> uuid.UUID | None:
        session = request.scope.get("session")
        if not isinstance(session, dict) or not session.get(SESSION_ACCOUNT):
            return None
        try:
            return uuid.UUID(str(session[SESSION_ACCOUNT]))
        except ValueError:
            return None

    async def me_of(request: Request) -> Me | None:
        account_id = account_of(request)
        if account_id is None:
            return None

        def read(uow: UnitOfWork) -> Me | None:
            acct = uow.get_or_none(account_id, fresh=fresh)
            if not isinstance(acct, Account):
                return None
            bal = balance_of(c.ledger.config, acct)
            return Me(account_id, bal.email, _credits(bal.spendable_micro), _credits(bal.held_micro),
                      _credits(bal.free_tier_remaining_micro), bal.kyc_verified,
                      bal.spendable_micro < LOW_CREDITS_MICRO, str(request.session.get("via", "key")),
                      str(getattr(acct, "verification", "verified" if bal.kyc_verified else "unverified")))

        return await committer.aquery(read)

    def to_login(request: Request) -> Redirect:
        return Redirect(path=f"/login?next={quote(request.url.path)}", status_code=303)

    def page(name: str, me: Me | None, active: str, status: int = 200, **ctx: Any) -> Template:
        return Template(template_name=name, status_code=status, media_type=MediaType.HTML,
                        context={"me": me, "active": active, "topup_micro": ws.topup_micro, **ctx})

    def not_found_page(me: Me | None, what: str) -> Template:
        return page("404.html", me, "", status=404, what=what)

    def read_models() -> Any:
        proj = services.projections
        if proj is None:
            raise ApiError(503, "unavailable", "the read models are not available on this server",
                           headers={"Retry-After": "5"})
        return proj.read

    def caught_up(rm: Any) -> None:
        lister = services.job_lister
        position = lister.last_position() if lister is not None and hasattr(lister, "last_position") else 0
        rm.wait_for(position, READ_WAIT_S)

    async def require_api_me(request: Request) -> Me:
        me = await me_of(request)
        if me is None:
            raise unauthorized("sign in first")
        return me

    # -------------------------------------------------------------- sign-in
    @get("/", opt=OWN, include_in_schema=False)
    async def root(request: Request) -> Redirect:
        return Redirect(path="/chat" if account_of(request) else "/login", status_code=303)

    @get("/login", opt=OWN, include_in_schema=False)
    async def login_page(request: Request) -> Template:
        nxt = _safe_next(request.query_params.get("next"))
        return page("login.html", None, "login", next=nxt, error=None)

    @post("/login", opt=OWN, include_in_schema=False)
    async def login_submit(request: Request, data: dict[str, Any] = Body(media_type=RequestEncodingType.URL_ENCODED)
                           ) -> Any:
        key = str(data.get("api_key") or "").strip()
        nxt = _safe_next(str(data.get("next") or ""))
        try:
            record = await services.authenticator.authenticate(key)
        except ApiError as exc:
            return page("login.html", None, "login", status=401, next=nxt,
                        error="That API key was not accepted." if exc.status == 401 else exc.message)
        request.set_session({SESSION_ACCOUNT: str(record.account_id), SESSION_KEY_ID: record.key_id,
                             SESSION_SCOPES: sorted(record.scopes), "via": "key"})
        return Redirect(path=nxt, status_code=303)

    @get("/login/link/{token:str}", opt=OWN, include_in_schema=False)
    async def link_page(token: FromPath[str]) -> Template:
        try:
            info = await links.apeek(token)
        except LinkRefused as exc:
            return page("link.html", None, "login", status=410, error=exc.reason, token=None, email=None)
        email = await committer.aquery(lambda uow: getattr(uow.get_or_none(uuid.UUID(info.account_id)), "email", ""))
        return page("link.html", None, "login", error=None, token=token, email=email)

    @post("/login/link/{token:str}", opt=OWN, include_in_schema=False)
    async def link_submit(request: Request, token: FromPath[str]) -> Any:
        try:
            info = await links.aredeem(token)
        except LinkRefused as exc:
            return page("link.html", None, "login", status=410, error=exc.reason, token=None, email=None)
        request.set_session({SESSION_ACCOUNT: info.account_id, SESSION_KEY_ID: f"web-link:{info.account_id}",
                             SESSION_SCOPES: ["read", "write"], "via": "link"})
        return Redirect(path="/chat", status_code=303)

    @post("/logout", opt=OWN, include_in_schema=False)
    async def logout(request: Request) -> Redirect:
        request.clear_session()
        return Redirect(path="/login", status_code=303)

    # -------------------------------------------------------------- pages
    @get(["/chat", "/chat/{conversation_id:str}"], opt=OWN, include_in_schema=False)
    async def chat_page(request: Request) -> Any:
        me = await me_of(request)
        if me is None:
            return to_login(request)
        conv = request.path_params.get("conversation_id") or ""
        return page("chat.html", me, "chat", conversation_id=conv)

    @get("/image", opt=OWN, include_in_schema=False)
    async def image_page(request: Request) -> Any:
        me = await me_of(request)
        if me is None:
            return to_login(request)
        cargos = [cg for cg in sched.catalog.all() if cg.kind == "image" and cg.enabled]
        cargo = cargos[0] if cargos else None
        needs_kyc = bool(cargo and cargo.requires_kyc and not me.kyc_verified)
        bounds = msgspec.to_builtins(cargo.image) if cargo is not None and getattr(cargo, "image", None) else {}
        return page("image.html", me, "image", cargo=cargo, needs_kyc=needs_kyc, bounds=bounds)

    @get("/jobs/{job_id:str}", opt=OWN, include_in_schema=False)
    async def job_page(request: Request, job_id: FromPath[str]) -> Any:
        me = await me_of(request)
        if me is None:
            return to_login(request)
        job = await own_job(job_id, me.account_id)
        if job is None:
            return not_found_page(me, "Job")
        prompt = job.input.get("prompt") or next((m.get("content") for m in reversed(job.input.get("messages") or [])
                                                  if m.get("role") == "user"), "")
        html = render(job.output) if job.kind == "chat" and job.output else ""
        return page("job.html", me, "", job=job, prompt=prompt, output_html=html)

    @get("/account/credits", opt=OWN, include_in_schema=False)
    async def credits_page(request: Request) -> Any:
        me = await me_of(request)
        if me is None:
            return to_login(request)
        lines, unavailable = await statement(me.account_id)
        return page("credits.html", me, "credits", lines=lines, unavailable=unavailable,
                    topup=_credits(ws.topup_micro), topup_cap=_credits(ws.topup_max_balance_micro))

    @get("/account/keys", opt=OWN, include_in_schema=False)
    async def keys_page(request: Request) -> Any:
        me = await me_of(request)
        if me is None:
            return to_login(request)
        return page("keys.html", me, "keys")

    @get("/account/verification", opt=OWN, include_in_schema=False)
    async def verification_page(request: Request) -> Any:
        me = await me_of(request)
        if me is None:
            return to_login(request)
        kyc_cargos = [cg.name for cg in sched.catalog.all() if cg.requires_kyc and cg.enabled]
        return page("verification.html", me, "verification", kyc_cargos=kyc_cargos)

    @get("/account/islands", opt=OWN, include_in_schema=False)
    async def islands_page(request: Request) -> Any:
        me = await me_of(request)
        if me is None:
            return to_login(request)
        rows, unavailable = await my_islands(me.account_id)
        return page("islands.html", me, "islands", islands=rows, unavailable=unavailable)

    @get("/account/islands/pair", opt=OWN, include_in_schema=False)
    async def pair_page(request: Request) -> Any:
        me = await me_of(request)
        if me is None:
            return to_login(request)
        code = (request.query_params.get("code") or "").strip()[:32]
        return page("pair.html", me, "islands", code=code)

    @get("/exchange", opt=OWN, include_in_schema=False)
    async def exchange_page(request: Request) -> Template:
        me = await me_of(request)
        cargos = [cg for cg in sched.catalog.all() if cg.enabled]
        return page("exchange.html", me, "exchange", cargos=cargos)

    # -------------------------------------------------------------- reads
    async def own_job(job_id: str, account_id: uuid.UUID) -> Job | None:
        try:
            jid = uuid.UUID(job_id)
        except ValueError:
            return None

        def read(uow: UnitOfWork) -> Job | None:
            agg = uow.get_or_none(jid, fresh=fresh)
            return agg if isinstance(agg, Job) and agg.account_id == str(account_id) else None

        return await committer.aquery(read)

    async def statement(account_id: uuid.UUID) -> tuple[list[dict[str, Any]], bool]:
        from ledger import names

        try:
            rm = read_models()
        except ApiError:
            return [], True

        def read() -> list[dict[str, Any]]:
            caught_up(rm)
            rows = rm._q("SELECT time_ms, event, code, reference, amount_micro, balance_after_micro, position "
                         "FROM proj_ledger_entries WHERE ledger_account = ? ORDER BY position DESC, seq DESC LIMIT ?",
                         (names.spendable(account_id), STATEMENT_LINES))
            return [explain(*r) for r in rows]

        try:
            return await asyncio.to_thread(read), False
        except Exception:  # noqa: BLE001 - read model still being created
            return [], True

    def explain(time_ms: int, event: str, code: str, reference: str, amount: int, after: int, pos: int
                ) -> dict[str, Any]:
        job_id = reference[4:] if reference.startswith("job:") else ""
        what = {"hold": "held for a Job (its price is charged from the hold)", "release": "unused part of a hold returned",
                "post": "charged for a Job",
                "refund": "refunded", "grant": "credits granted", "purchase": "credits bought",
                "adjustment": "operator adjustment", "fee": "platform fee", "earning": "earned"}.get(code, code)
        if reference == "web:virtual-top-up":
            what = "virtual top-up"
        elif reference == "signup":
            what = "sign-up grant"
        return {"time_ms": time_ms, "what": what, "code": code, "job_id": job_id, "reference": reference,
                "amount": _credits(amount), "after": _credits(after)}

    async def my_islands(account_id: uuid.UUID) -> tuple[list[dict[str, Any]], bool]:
        try:
            rm = read_models()
        except ApiError:
            return [], True
        registry = sched.core.registry.islands

        def read() -> list[dict[str, Any]]:
            caught_up(rm)
            rows = rm.island_stats(owner_account_id=str(account_id), limit=100, now_ms=c.clock.now_ms())
            for r in rows:
                rec = registry.get(r["island_id"])
                r["online_now"] = bool(rec.online) if rec is not None else bool(r["online"])
                r["karma"] = Decimal(r["karma_milli"]) / 1000
                r["earned"] = _credits(r["earned_micro"])
            return rows

        try:
            return await asyncio.to_thread(read), False
        except Exception:  # noqa: BLE001
            return [], True

    # -------------------------------------------------------------- JSON helpers
    def ok(obj: Any, status: int = 200) -> Response:
        return Response(content=encode(obj), status_code=status, media_type=MediaType.JSON)

    @get("/web/api/me", opt=OWN, include_in_schema=False)
    async def api_me(request: Request) -> Response:
        me = await require_api_me(request)
        return ok({"data": {"email": me.email, "credits": me.credits, "held": me.held,
                            "free_tier_remaining": me.free_tier_remaining, "kyc_verified": me.kyc_verified,
                            "low_credits": me.low}})

    @get("/web/api/models", opt=OWN, include_in_schema=False)
    async def api_models(request: Request) -> Response:
        """Chat models with an Island online now that serves them (live registry)."""
        await require_api_me(request)
        counts: dict[tuple[str, str], int] = {}
        chat = [cg for cg in sched.catalog.all() if cg.kind == "chat" and cg.enabled]
        for rec in list(sched.core.registry.islands.values()):
            if not (rec.online and rec.approved) or rec.draining:
                continue
            caps = rec.capabilities or {}
            models = set(caps.get("models") or ())
            for cg in chat:
                if cg.slug not in (caps.get("cargos") or ()):
                    continue
                for m in sorted(cg.models):
                    if m in models:
                        counts[(m, cg.slug)] = counts.get((m, cg.slug), 0) + 1
        order = {cg.slug: i for i, cg in enumerate(chat)}
        defaults = {cg.slug: cg.model for cg in chat}
        ranked = sorted(counts.items(), key=lambda kv: (order[kv[0][1]], kv[0][0] != defaults[kv[0][1]], kv[0][0]))
        data = [{"id": m, "workload_slug": slug, "online_hosts": n} for (m, slug), n in ranked]
        return ok({"data": data})

    @get("/web/api/conversations", opt=OWN, include_in_schema=False)
    async def api_conversations(request: Request) -> Response:
        me = await require_api_me(request)
        rm = read_models()

        def read() -> list[dict[str, Any]]:
            caught_up(rm)
            return ConversationsView(rm).list_for_account(str(me.account_id))

        return ok({"data": await asyncio.to_thread(read)})

    @get("/web/api/conversations/{conversation_id:str}", opt=OWN, include_in_schema=False)
    async def api_conversation(request: Request, conversation_id: FromPath[str]) -> Response:
        """The conversation's turns: for each, the newest Job (a Regenerate replaces it)."""
        me = await require_api_me(request)
        rm = read_models()

        def read() -> list[dict[str, Any]]:
            caught_up(rm)
            return ConversationsView(rm).jobs(str(me.account_id), conversation_id[:64])

        jobs = await asyncio.to_thread(read)
        if not jobs:
            raise ApiError(404, "not_found", "conversation not found")
        by_turn: dict[int, dict[str, Any]] = {}
        for j in jobs:
            by_turn[j["turn"]] = j
        turns = []
        for turn in sorted(by_turn):
            j = by_turn[turn]
            rec = sched.core.registry.islands.get(j["island_id"]) if j["island_id"] else None
            usage = j["usage"] or {}
            turns.append({
                "turn": turn, "user": j["user_text"], "job_id": j["id"], "status": j["status"],
                "workload": j["cargo"], "model": j["model"], "error": j["error"],
                "html": render(j["output"]) if j["status"] == "completed" else "",
                "text": j["output"] or "", "island_name": rec.name if rec is not None else None,
                "duration_ms": (j["completed_at"] - j["started_at"]).total_seconds() * 1000
                if j["completed_at"] and j["started_at"] else None,
                "tokens_per_second": j["tokens_per_s_milli"] / 1000 if j["tokens_per_s_milli"] else None,
                "completion_tokens": usage.get("completion_tokens"),
                "settings": {k: j["input"].get(k) for k in ("temperature", "max_tokens", "system_prompt")},
                "terminal": j["status"] in TERMINAL})
        return ok({"data": {"id": conversation_id, "turns": turns}})

    @post("/web/api/render", opt=OWN, include_in_schema=False)
    async def api_render(request: Request) -> Response:
        """Markdown of a finished answer of the account's own Job, as safe HTML."""
        me = await require_api_me(request)
        body = await request.json()
        job = await own_job(str((body or {}).get("job_id") or ""), me.account_id)
        if job is None:
            raise ApiError(404, "not_found", "job not found")
        return ok({"data": {"html": render(job.output or "")}})

    @get("/web/api/images", opt=OWN, include_in_schema=False)
    async def api_images(request: Request) -> Response:
        me = await require_api_me(request)
        rm = read_models()

        def read() -> list[dict[str, Any]]:
            caught_up(rm)
            rows = rm._q("SELECT job_id, input, created_at_ms FROM proj_jobs WHERE account_id = ? AND kind = 'image' "
                         "AND status = 'completed' ORDER BY created_at_ms DESC, job_id DESC LIMIT ?",
                         (str(me.account_id), IMAGES_SHOWN))
            out = []
            for job_id, inp, created in rows:
                data = msgspec.json.decode(inp) if inp else {}
                out.append({"job_id": job_id, "url": f"/web/images/{job_id}.png", "prompt": data.get("prompt", ""),
                            "created_at_ms": created})
            return out

        return ok({"data": await asyncio.to_thread(read)})

    @get("/web/images/{name:str}", opt=OWN, include_in_schema=False)
    async def image_file(request: Request, name: FromPath[str]) -> Response:
        """A finished image Job's picture, to its owner only (404 for anyone else)."""
        me = await me_of(request)
        job_id = name[:-4] if name.endswith(".png") else name
        job = await own_job(job_id, me.account_id) if me is not None else None
        png = _png_of(job)
        if png is None:
            return Response(content=b"not found", status_code=404, media_type=MediaType.TEXT)
        headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
        if request.query_params.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="archipelag-{job_id[:8]}.png"'
        return Response(content=png, media_type="image/png", headers=headers)

    @post("/web/api/topup", opt=OWN, include_in_schema=False)
    async def api_topup(request: Request) -> Response:
        me = await require_api_me(request)
        idem = f"web-topup:{uuid.uuid4()}"
        try:
            after = await committer.aexecute(lambda uow: topup_in(uow, me.account_id, ws.topup_micro,
                                                                  ws.topup_max_balance_micro, idem))
        except TopUpRefused as exc:
            raise ApiError(409, "top_up_refused", exc.message) from None
        return ok({"data": {"credits": _credits(after), "added": _credits(ws.topup_micro)}})

    return Router(path="/", route_handlers=[
        root, login_page, login_submit, link_page, link_submit, logout, chat_page, image_page, job_page, credits_page,
        keys_page, verification_page, islands_page, pair_page, exchange_page, api_me, api_models,
        api_conversations, api_conversation, api_render, api_images, image_file, api_topup])


def _png_of(job: Job | None) -> bytes | None:
    if job is None or job.kind != "image" or job.status != "completed" or not job.output:
        return None
    try:
        obj = msgspec.json.decode(job.output)
        data = obj.get("image_data") if isinstance(obj, dict) else None
        return base64.b64decode(data, validate=True) if isinstance(data, str) else None
    except (msgspec.DecodeError, ValueError, binascii.Error):
        return None
