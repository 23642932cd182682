"""The Compute Exchange's HTTP surface (docs/EXCHANGE.md, docs/API.md):

    GET    /api/v1/market/rates                    public   one MarketRate per Cargo
    GET    /api/v1/market/rates/{slug}             public   one MarketRate
    GET    /api/v1/market/history/{slug}?window=   public   MarketRate per bucket (1h|24h|7d|30d)
    GET    /api/v1/market/orderbook/{slug}         public   asks of online Islands by price range
    POST   /api/v1/market/asking-prices            write    an Island owner sets its asks
    GET    /api/v1/market/suggested-ask/{host_id}  read     owner only: rate x hardware-tier multiplier
    POST   /api/v1/market/quote                    read     what a Job would cost now (creates nothing)
    GET    /api/v1/market/bids                     read     the account's saved bids
    PUT    /api/v1/market/bids/{slug}              write    save a bid (budget link 2)
    DELETE /api/v1/market/bids/{slug}              write    delete it

Rates, asks, budgets and bids are credits per the Cargo's billing unit (JSON numbers);
quote prices (`expected_price`, `min_price`, `max_price`) are credits for the whole Job.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import msgspec
from litestar import MediaType, Request, Response, Router, delete, get, post, put
from litestar.params import FromPath, JSONBody

from api.errors import ApiError, from_refusal, not_found, validation_failed
from api.schemas import encode
from ledger.pricing import micro_to_credits
from scheduler import market as mkt
from scheduler.admission import AdmissionRefused, admit
from scheduler.cargo import UnknownCargo
from scheduler.islands import Island
from store.clock import ms_to_datetime
from store.unit_of_work import UnitOfWork

if TYPE_CHECKING:
    from api.services import ApiServices

RATE_WINDOW_MS = 3_600_000  # the rates endpoints summarise the last hour's clearings
ORDERBOOK_BUCKETS = 10
PUBLIC_PATHS = ("/api/v1/market/rates", "/api/v1/market/history/", "/api/v1/market/orderbook/")
READ_POSTS = frozenset({"/api/v1/market/quote"})  # a POST that changes nothing: the read scope


# ------------------------------------------------------------------ wire types
class AskingPricesRequest(msgspec.Struct, kw_only=True):
    host_id: str
    prices: dict[str, Any]


class BidRequest(msgspec.Struct, kw_only=True):
    max_price: str | int


class QuoteRequest(msgspec.Struct, kw_only=True):
    workload: str
    input: dict[str, Any]
    bid_price: str | None = None
    region: str | list[str] | None = None


class MarketRate(msgspec.Struct, kw_only=True):
    workload_slug: str
    avg_price: Decimal | None
    min_price: Decimal | None
    max_price: Decimal | None
    num_hosts: int
    timestamp: str
    median_price: Decimal | None = None
    avg_ask: Decimal | None = None
    surge_multiplier: Decimal = Decimal(1)
    surge_active: bool = False
    jobs: int = 0
    suggested_bid: Decimal | None = None
    current_rate: Decimal | None = None
    list_price: Decimal | None = None
    billing_unit: str = ""
    source: str = ""  # clearings (the last hour's) | asks (no clearing yet: online asks x surge) | list


def _c(micro: int | None) -> Decimal | None:
    return None if micro is None else micro_to_credits(int(micro))


def _permille(p: int) -> Decimal:
    return Decimal(p) / 1000


def _iso(ms: int) -> str:
    return ms_to_datetime(ms).isoformat()


def ok(obj: Any, status: int = 200) -> Response:
    return Response(content=encode(obj), status_code=status, media_type=MediaType.JSON)


def market_router(services: ApiServices) -> Router:
    c = services.coordinator
    sched = c.scheduler
    core = sched.core

    def cargo_of(slug: str) -> Any:
        cargo = sched.catalog.get(slug) if isinstance(slug, str) else None
        if cargo is None:
            raise not_found("workload")
        return cargo

    def read_models() -> Any:
        proj = services.projections
        return getattr(proj, "read", None) if proj is not None else None

    def rate_of(cargo: Any, now_ms: int, recent: dict[str, Any] | None) -> MarketRate:
        slug = cargo.slug
        approved, online, surge = core.market_snapshot(slug)
        list_rate = mkt.list_rate_micro(cargo)
        current = mkt.surged_micro(mkt.median_micro(online), surge) if online else list_rate
        if recent and recent["jobs"]:
            avg, low, high, med, source = (recent["avg_micro"], recent["min_micro"], recent["max_micro"],
                                           recent["median_micro"], "clearings")
        elif online:
            surged = [mkt.surged_micro(a, surge) for a in online]
            avg, low, high, med, source = sum(surged) // len(surged), surged[0], surged[-1], current, "asks"
        else:
            avg = low = high = med = list_rate
            source = "list"
        return MarketRate(
            workload_slug=slug, avg_price=_c(avg), min_price=_c(low), max_price=_c(high), num_hosts=len(online),
            timestamp=_iso(now_ms), median_price=_c(med),
            avg_ask=_c(sum(online) // len(online)) if online else None, surge_multiplier=_permille(surge),
            surge_active=surge > mkt.PERMILLE, jobs=recent["jobs"] if recent else 0,
            suggested_bid=_c(mkt.suggested_bid_micro(current)), current_rate=_c(current), list_price=_c(list_rate),
            billing_unit=mkt.billing_unit(cargo), source=source)

    async def recent_of(slugs: list[str], now_ms: int) -> dict[str, dict[str, Any]]:
        from projections.market import clearings, summarise

        read = read_models()
        if read is None:
            return {}

        def go() -> dict[str, dict[str, Any]]:
            return {s: summarise(clearings(read, s, now_ms - RATE_WINDOW_MS, now_ms + 1)) for s in slugs}

        try:
            return await asyncio.to_thread(go)
        except Exception:  # noqa: BLE001 - the read model may not exist yet: live asks answer
            return {}

    # -------------------------------------------------------------- public
    @get("/rates", summary="Market rate of every workload (public)")
    async def rates() -> Response:
        now = c.clock.now_ms()
        cargos = list(sched.catalog.all())
        recent = await recent_of([x.slug for x in cargos], now)
        return ok({"data": [rate_of(x, now, recent.get(x.slug)) for x in cargos]})

    @get("/rates/{slug:str}", summary="Market rate of one workload (public)")
    async def rate(slug: FromPath[str]) -> Response:
        cargo = cargo_of(slug)
        now = c.clock.now_ms()
        recent = await recent_of([cargo.slug], now)
        return ok({"data": rate_of(cargo, now, recent.get(cargo.slug))})

    @get("/history/{slug:str}", summary="Market rate per bucket over a window (public)")
    async def history(slug: FromPath[str], window: str = "24h") -> Response:
        from projections.market import WINDOWS
        from projections.market import history as history_rows

        cargo = cargo_of(slug)
        if window not in WINDOWS:
            raise validation_failed({"window": [f"must be one of {', '.join(WINDOWS)}"]})
        read = read_models()
        if read is None:
            raise ApiError(503, "unavailable", "the market read model is not available on this server",
                           headers={"Retry-After": "5"})
        now = c.clock.now_ms()
        try:
            rows = await asyncio.to_thread(history_rows, read, cargo.slug, window, now)
        except Exception as exc:  # noqa: BLE001 - e.g. the read model is still being created
            raise ApiError(503, "unavailable", "the market read model is not available yet; retry shortly",
                           headers={"Retry-After": "1"}) from exc
        out = []
        for r in rows:
            surge_on, surge_permille = r["surge_on"]
            suggested = mkt.suggested_bid_micro(r["median_micro"]) if r["median_micro"] is not None else None
            out.append(MarketRate(
                workload_slug=cargo.slug, avg_price=_c(r["avg_micro"]), min_price=_c(r["min_micro"]),
                max_price=_c(r["max_micro"]), num_hosts=r["num_hosts"], timestamp=_iso(r["start_ms"]),
                median_price=_c(r["median_micro"]), avg_ask=_c(r["avg_ask_micro"]),
                surge_multiplier=_permille(max(surge_permille, r["surge_permille"])),
                surge_active=surge_on or r["surge_permille"] > mkt.PERMILLE, jobs=r["jobs"],
                suggested_bid=_c(suggested), list_price=_c(mkt.list_rate_micro(cargo)),
                billing_unit=mkt.billing_unit(cargo), source="clearings"))
        return ok({"data": out})

    @get("/orderbook/{slug:str}", summary="Asks of online Islands bucketed by price (public)")
    async def orderbook(slug: FromPath[str]) -> Response:
        cargo = cargo_of(slug)
        asks = core.online_asks(cargo.slug)
        return ok({"data": {"workload_slug": cargo.slug, "billing_unit": mkt.billing_unit(cargo),
                            "buckets": orderbook_buckets(asks)}})

    # -------------------------------------------------------------- Island owners
    async def owned_island(request: Request, host_id: str) -> Island:
        try:
            island_id = UUID(str(host_id))
        except ValueError:
            raise not_found("host") from None

        def read(uow: UnitOfWork) -> Island | None:
            island = uow.get_or_none(island_id, fresh=services.fresh_reads)
            return island if isinstance(island, Island) else None

        island = await c.committer.aquery(read)
        if island is None or island.owner_account_id != str(request.user.account_id):
            raise not_found("host")
        return island

    @post("/asking-prices", status_code=200, summary="Set an Island's asking prices (its owner)")
    async def asking_prices(request: Request, data: JSONBody[AskingPricesRequest]) -> Response:
        island = await owned_island(request, data.host_id)
        try:
            await sched.aset_asking_prices(island.id, data.prices, by=f"owner:{request.user.account_id}")
        except mkt.BadAsk as exc:
            raise validation_failed(exc.errors) from None
        island = await owned_island(request, data.host_id)
        return ok({"data": {"host_id": str(island.id),
                            "prices": {k: micro_to_credits(v) for k, v in sorted(island.asks_micro.items())}}})

    @get("/suggested-ask/{host_id:str}", summary="Suggested asks for an Island (its owner)")
    async def suggested_ask(request: Request, host_id: FromPath[str]) -> Response:
        island = await owned_island(request, host_id)
        tier = int(island.capabilities.get("hardware_tier", 0))
        prices = {}
        for slug in island.capabilities.get("cargos", ()):
            cargo = sched.catalog.get(slug)
            if cargo is None:
                continue
            rate_micro = sched.market_rate_micro(slug) or mkt.list_rate_micro(cargo)
            prices[slug] = micro_to_credits(mkt.suggested_ask_micro(rate_micro, tier))
        return ok({"data": {"host_id": str(island.id), "hardware_tier": tier, "tier": mkt.TIER_NAMES.get(tier, ""),
                            "multiplier": _permille(mkt.TIER_MULTIPLIER_PERMILLE.get(tier, 1000)),
                            "prices": prices}})

    # -------------------------------------------------------------- consumers
    @post("/quote", status_code=200, summary="What a Job would cost now (creates nothing)")
    async def quote(request: Request, data: JSONBody[QuoteRequest]) -> Response:
        prefs: dict[str, Any] = {}
        if data.bid_price is not None:
            prefs["bid_price"] = data.bid_price
        if data.region is not None:
            prefs["region"] = data.region
        try:
            admitted = admit(sched.catalog, data.workload, data.input, prefs)
            budget = sched.resolve_budget(str(request.user.account_id), admitted, check=False)
        except AdmissionRefused as refusal:
            raise from_refusal(refusal) from None
        cargo = admitted.cargo
        _, _, surge = core.market_snapshot(cargo.slug)
        regions = frozenset(admitted.prefs.get("regions", ()))
        eligible = [a for a in core.online_asks(cargo.slug, regions) if a <= budget.budget_micro]
        list_rate = budget.list_rate_micro
        rate_micro = sched.market_rate_micro(cargo.slug) or list_rate

        def job_price(rate: int) -> int:
            return mkt.price_at_rate(admitted.hold_micro, rate, list_rate)

        if eligible:
            low = mkt.clearing_micro(eligible[0], surge, budget.budget_micro)
            mid = mkt.clearing_micro(mkt.median_micro(eligible), surge, budget.budget_micro)
            high = mkt.clearing_micro(eligible[-1], surge, budget.budget_micro)
        else:
            low = mid = high = None
        return ok({"data": {
            "workload_slug": cargo.slug, "billing_unit": mkt.billing_unit(cargo),
            "expected_price": _c(job_price(mid)) if mid is not None else None,
            "min_price": _c(job_price(low)) if low is not None else None,
            "max_price": _c(job_price(high)) if high is not None else None,
            "expected_rate": _c(mid), "min_rate": _c(low), "max_rate": _c(high),
            "surge_active": surge > mkt.PERMILLE, "surge_multiplier": _permille(surge),
            "eligible_hosts": len(eligible), "current_rate": _c(rate_micro),
            "suggested_bid": _c(mkt.suggested_bid_micro(rate_micro)),
            "budget": _c(budget.budget_micro), "budget_source": budget.source, "hold": _c(budget.hold_micro),
            "list_price": _c(list_rate)}})

    def bid_row(slug: str, micro: int | None) -> dict[str, Any]:
        return {"workload_slug": slug, "max_price": _c(micro)}

    @get("/bids", summary="The account's saved bids per workload")
    async def list_bids(request: Request) -> Response:
        bids = await sched.abids(request.user.account_id)
        return ok({"data": [bid_row(s, m) for s, m in sorted(bids.items())]})

    @put("/bids/{slug:str}", status_code=200, summary="Save the account's bid for a workload")
    async def put_bid(request: Request, slug: FromPath[str], data: JSONBody[BidRequest]) -> Response:
        cargo = cargo_of(slug)
        value = data.max_price if isinstance(data.max_price, str) else str(data.max_price)
        try:
            await sched.aset_bid(request.user.account_id, cargo.slug, value, by=f"key:{request.user.key_id}")
        except mkt.BadPrice as exc:
            raise validation_failed({"max_price": [str(exc)]}) from None
        except UnknownCargo:
            raise not_found("workload") from None
        bids = await sched.abids(request.user.account_id)
        return ok({"data": bid_row(cargo.slug, bids.get(cargo.slug))})

    @delete("/bids/{slug:str}", status_code=200, summary="Delete the account's bid for a workload")
    async def delete_bid(request: Request, slug: FromPath[str]) -> Response:
        cargo = cargo_of(slug)
        await sched.aset_bid(request.user.account_id, cargo.slug, None, by=f"key:{request.user.key_id}")
        return ok({"data": bid_row(cargo.slug, None)})

    return Router(path="/api/v1/market", route_handlers=[
        rates, rate, history, orderbook, asking_prices, suggested_ask, quote, list_bids, put_bid, delete_bid])


def orderbook_buckets(asks: list[int], buckets: int = ORDERBOOK_BUCKETS) -> list[dict[str, Any]]:
    """Sorted asks into at most `buckets` equal price ranges [min, max] (inclusive ends,
    integer widths rounded up); only ranges with Islands are listed."""
    if not asks:
        return []
    low, high = asks[0], asks[-1]
    width = max(1, -(-(high - low + 1) // buckets))
    counts: dict[int, int] = {}
    for a in asks:
        i = (a - low) // width
        counts[i] = counts.get(i, 0) + 1
    return [{"min_price": _c(low + i * width), "max_price": _c(min(high, low + (i + 1) * width - 1)), "hosts": n}
            for i, n in sorted(counts.items())]
