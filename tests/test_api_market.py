"""The Compute Exchange over HTTP, on the embedded store and on PostgreSQL + Redis: public
rates / history / order book without a key, asking prices by the Island's owner only,
saved bids, quotes that create nothing, a Job's budget and clearing on its JSON, the 409
refusal for budget with the current rate, and bad input -> 4xx with a reason everywhere.
At the end the market projection rebuilt from the log equals the live one and the ledger
verifies."""

from __future__ import annotations

import uuid

import pytest

from ledger import audit
from projections.rebuild import verify
from store.factory import iter_log
from tests.api_harness import LiveServer, make_backend, wait_for

CHAT = {"workload": "llm-chat", "input": {"prompt": "Say hello", "max_tokens": 64}}


@pytest.fixture(scope="module", params=["embedded", "pg_redis"])
def srv(request, tmp_path_factory):
    backend = make_backend(request.param, tmp_path_factory.mktemp(request.param))
    server = LiveServer(backend, COORDINATOR_RATE_LIMIT_PER_MIN="100000", COORDINATOR_MAX_ASK_CREDITS="50")
    server.chat_island = server.island(name="chat-island")
    server.owner_key, _ = server.services.keys.issue(server.chat_island.owner, "owner", None)
    yield server
    server.stop()
    backend.cleanup()


def position(srv: LiveServer) -> int:
    return srv.c.app.recorder.max_notification_id() or 0


def market_writes(srv: LiveServer) -> int:
    """Events a market or Job request could write (API-key bookkeeping and the like are not counted)."""
    from eventsourcing.utils import get_topic

    from scheduler.islands import Island
    from scheduler.jobs import Job
    from scheduler.market import BidPreferences

    topics = tuple(get_topic(c) for c in (Job.Submitted, Island.AsksChanged, BidPreferences.BidSet,
                                          BidPreferences.Created)) + audit.LEDGER_TOPICS
    return sum(1 for _ in iter_log(srv.c.app, topics=topics))


def test_public_rates_history_and_orderbook_need_no_key(srv):
    with srv.client(None) as cl:
        rates = cl.get("/market/rates")
        assert rates.status_code == 200, rates.text
        data = rates.json()["data"]
        assert {r["workload_slug"] for r in data} == {c.slug for c in srv.c.scheduler.catalog.all()}
        chat = next(r for r in data if r["workload_slug"] == "llm-chat")
        for key in ("avg_price", "min_price", "max_price", "num_hosts", "timestamp", "median_price", "avg_ask",
                    "surge_multiplier", "surge_active", "jobs", "suggested_bid"):
            assert key in chat
        assert chat["num_hosts"] >= 1 and isinstance(chat["avg_price"], (int, float))
        one = cl.get("/market/rates/llm-chat").json()["data"]
        assert one["workload_slug"] == "llm-chat" and one["suggested_bid"] == pytest.approx(
            one["current_rate"] * 1.05, abs=1e-6)
        for window, buckets in (("1h", 12), ("24h", 24), ("7d", 28), ("30d", 30)):
            h = cl.get("/market/history/llm-chat", params={"window": window})
            assert h.status_code == 200, h.text
            assert len(h.json()["data"]) == buckets
        book = cl.get("/market/orderbook/llm-chat").json()["data"]
        assert book["workload_slug"] == "llm-chat" and sum(b["hosts"] for b in book["buckets"]) >= 1
        # bad input: a reason, never a 500
        assert cl.get("/market/rates/nope").status_code == 404
        assert cl.get("/market/history/nope").status_code == 404
        assert cl.get("/market/orderbook/nope").status_code == 404
        bad = cl.get("/market/history/llm-chat", params={"window": "2h"})
        assert bad.status_code == 422 and "window" in bad.json()["errors"]
        # the rest of the market needs a key
        assert cl.get("/market/bids").status_code == 401
        assert cl.post("/market/quote", json=CHAT).status_code == 401


def test_asking_prices_by_the_owner_only_and_bad_values_change_nothing(srv):
    host = srv.chat_island.island_id
    _, stranger = srv.account()
    with srv.client(srv.owner_key) as cl:
        r = cl.post("/market/asking-prices", json={"host_id": host, "prices": {"llm-chat": "2.5", "_default": "1"}})
        assert r.status_code == 200, r.text
        assert r.json()["data"] == {"host_id": host, "prices": {"_default": 1, "llm-chat": 2.5}}
        rec = srv.c.scheduler.core.registry.islands[host]
        wait_for(lambda: rec.ask_for("llm-chat") == 2_500_000)
        before = market_writes(srv)
        for prices, field in (({"llm-chat": "-1"}, "prices.llm-chat"), ({"llm-chat": "x"}, "prices.llm-chat"),
                              ({"llm-chat": "0.0000001"}, "prices.llm-chat"), ({"nope": "1"}, "prices.nope"),
                              ({"_default": "51"}, "prices._default"), ({"llm-chat": 0.5}, "prices.llm-chat")):
            bad = cl.post("/market/asking-prices", json={"host_id": host, "prices": prices})
            assert bad.status_code == 422 and field in bad.json()["errors"], (prices, bad.text)
        assert cl.post("/market/asking-prices", json={"prices": {}}).status_code in (400, 422)
        assert cl.post("/market/asking-prices", json={"host_id": "not-a-uuid", "prices": {}}).status_code == 404
        assert market_writes(srv) == before
        assert rec.ask_for("llm-chat") == 2_500_000
        sug = cl.get(f"/market/suggested-ask/{host}").json()["data"]
        assert sug["hardware_tier"] == 2 and sug["multiplier"] == 1.2 and "llm-chat" in sug["prices"]
    with srv.client(stranger) as cl:
        other = cl.post("/market/asking-prices", json={"host_id": host, "prices": {"llm-chat": "1"}})
        assert other.status_code == 404
        assert cl.get(f"/market/suggested-ask/{host}").status_code == 404
    _, reader = srv.account(scopes=["read"])
    with srv.client(reader) as cl:
        assert cl.post("/market/asking-prices", json={"host_id": host, "prices": {}}).status_code == 403


def test_saved_bids_set_list_delete_and_decide_the_budget(srv):
    _, key = srv.account(credits=500)
    with srv.client(key) as cl:
        assert cl.get("/market/bids").json() == {"data": []}
        r = cl.put("/market/bids/llm-chat", json={"max_price": "2.75"})
        assert r.status_code == 200 and r.json()["data"] == {"workload_slug": "llm-chat", "max_price": 2.75}
        assert cl.get("/market/bids").json()["data"] == [{"workload_slug": "llm-chat", "max_price": 2.75}]
        job = cl.post("/jobs", json=CHAT).json()["data"]
        assert job["budget_source"] == "preference" and job["budget"] == 2.75
        assert cl.put("/market/bids/nope", json={"max_price": "1"}).status_code == 404
        for bad in ({"max_price": "-2"}, {"max_price": "abc"}, {"max_price": "100"}, {}):
            assert cl.put("/market/bids/llm-chat", json=bad).status_code in (400, 422), bad
        assert cl.delete("/market/bids/llm-chat").json()["data"] == {"workload_slug": "llm-chat", "max_price": None}
        assert cl.get("/market/bids").json()["data"] == []
        assert cl.delete("/market/bids/nope").status_code == 404
        job = cl.post("/jobs", json=CHAT).json()["data"]
        assert job["budget_source"] == "market"


def test_quote_creates_nothing_and_a_job_shows_budget_and_clearing(srv):
    _, key = srv.account(credits=500, scopes=["read"])
    _, writer = srv.account(credits=500)
    with srv.client(key) as cl:
        before = market_writes(srv)
        q = cl.post("/market/quote", json={**CHAT, "bid_price": "3"})
        assert q.status_code == 200, q.text
        d = q.json()["data"]
        for k in ("workload_slug", "expected_price", "min_price", "max_price", "surge_active", "surge_multiplier",
                  "eligible_hosts", "suggested_bid", "budget", "budget_source"):
            assert k in d
        assert d["budget"] == 3 and d["budget_source"] == "bid" and d["eligible_hosts"] >= 1
        assert d["min_price"] <= d["expected_price"] <= d["max_price"]
        assert market_writes(srv) == before  # nothing written
        far = cl.post("/market/quote", json={**CHAT, "bid_price": "3", "region": "mars"}).json()["data"]
        assert far["eligible_hosts"] == 0 and far["expected_price"] is None and far["budget"] == 3
        for bad in ({"workload": "nope", "input": {}}, {"workload": "llm-chat", "input": {"max_tokens": 0}},
                    {**CHAT, "bid_price": "-1"}, {"input": {}}):
            r = cl.post("/market/quote", json=bad)
            assert r.status_code in (400, 422), (bad, r.text)
    with srv.client(writer) as cl:
        job = cl.post("/jobs", json={**CHAT, "bid_price": "3"}).json()["data"]
        assert job["budget"] == 3 and job["budget_source"] == "bid"
        done = wait_for(lambda: (j := cl.get(f"/jobs/{job['id']}").json()["data"])["status"] == "completed" and j)
        ask = srv.c.scheduler.core.registry.islands[srv.chat_island.island_id].ask_for("llm-chat") / 1e6
        assert done["clearing_price"] == pytest.approx(ask) and done["clearing_price"] <= done["budget"]
        listed = cl.get("/jobs").json()["data"]
        assert any(j["id"] == job["id"] and j["budget_source"] == "bid" for j in listed)


def test_refused_for_budget_with_the_current_rate(srv):
    _, key = srv.account(credits=500)
    with srv.client(key) as cl:
        before = market_writes(srv)
        r = cl.post("/jobs", json={**CHAT, "bid_price": "0.01"})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "no_island_within_budget" and isinstance(err["current_rate"], (int, float))
        assert err["current_rate"] > 0.01 and err["budget"] == 0.01
        assert market_writes(srv) == before
        batch = cl.post("/jobs/batch", json={"workload": "llm-chat", "inputs": [CHAT["input"]] * 2,
                                             "bid_price": "0.01"})
        assert batch.status_code == 409 and batch.json()["error"]["code"] == "no_island_within_budget"
        oa = cl.post("/chat/completions", json={"model": "mistral-7b-instruct", "bid_price": "0.01",
                                                "messages": [{"role": "user", "content": "hi"}]})
        assert oa.status_code == 409, oa.text
        ok = cl.post("/jobs/batch", json={"workload": "llm-chat", "inputs": [CHAT["input"]] * 2, "bid_price": "4"})
        assert ok.status_code == 201, ok.text


def test_history_shows_clearings_and_the_projection_rebuilds_equal(srv):
    _, key = srv.account(credits=500)
    with srv.client(key) as cl:
        job = cl.post("/jobs", json={**CHAT, "bid_price": "3"}).json()["data"]
        wait_for(lambda: cl.get(f"/jobs/{job['id']}").json()["data"]["status"] == "completed")

        def bucket():
            rows = cl.get("/market/history/llm-chat", params={"window": "1h"}).json()["data"]
            return sum(r["jobs"] for r in rows) >= 1 and rows

        rows = wait_for(bucket)
        busy = [r for r in rows if r["jobs"]]
        assert all(r["min_price"] <= r["median_price"] <= r["max_price"] for r in busy)
        rate = cl.get("/market/rates/llm-chat").json()["data"]
        assert rate["jobs"] >= 1 and rate["source"] == "clearings"
    proj = srv.services.projections
    proj.read.wait_for(position(srv), 10)
    result = verify(srv.c.app, proj.db, ["market"])
    assert result.ok, result.difference and result.difference.describe()
    assert result.rows.get("proj_market_clearings", 0) >= 1
    f = audit.fold(iter_log(srv.c.app, topics=audit.LEDGER_TOPICS), check=True)
    assert not f.violations, f.violations[:3]


def test_unknown_host_and_bad_host_ids_are_404(srv):
    with srv.client(srv.owner_key) as cl:
        assert cl.get(f"/market/suggested-ask/{uuid.uuid4()}").status_code == 404
        assert cl.get("/market/suggested-ask/xyz").status_code == 404
        r = cl.post("/market/asking-prices", json={"host_id": str(uuid.uuid4()), "prices": {"llm-chat": "1"}})
        assert r.status_code == 404
