"""The bare queue model end to end: runs, writes its outputs, is deterministic, keeps
its books on Jobs and slots straight under faults, and the CLI's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.baseline import BareQueue
from simulations.cli import main as cli_main
from simulations.metrics import PERCENTILES, WALL_KEYS, deterministic_view, nearest_rank, to_json
from simulations.report import PLOTS
from simulations.runner import run
from simulations.scenario import load_scenario, loads_scenario, with_overrides
from simulations.world import FIRST_TERMINAL

AZURE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_2023_code.csv"

SMALL = """
name = "small"
description = "a small mixed run"
seed = 4
start = "2026-01-05T19:00:00Z"
duration_s = 600
drain_s = 600
expect = ["jobs_unfinished == 0", "p99_wait_s < 1000", "kyc_violations == 0", "ledger_balanced == true"]

[[fleet]]
tier = "cpu"
count = 5
[[fleet]]
tier = "consumer-gpu"
count = 20
[[fleet]]
tier = "datacenter-gpu"
count = 2

[[consumers]]
name = "kyc"
count = 50
cargo_mix = { "llm-chat" = 0.6, "llm-chat-lite" = 0.3, "sdxl" = 0.1 }
[[consumers]]
name = "anon"
count = 50
kyc = false
balance = "0"
cargo_mix = { "llm-chat-lite" = 0.8, "sdxl" = 0.2 }
patience_s = 20

[[demand]]
kind = "poisson"
rate_per_s = 3
[[demand]]
kind = "bursts"
consumers = ["anon"]
burst_rate_per_s = 10
on_s = 20
off_s = 100
"""

FAULTY = SMALL.replace('name = "small"', 'name = "faulty"') + """
[coordinator]
ack_timeout_s = 5
lease_s = 30
max_attempts = 3
[faults]
islands = true
rate_multiplier = 20
coordinator_restarts_s = [120, 400]
restart_downtime_s = 10
"""

REQUIRED = ("jobs_total", "jobs_completed", "jobs_failed", "jobs_timeout", "jobs_cancelled", "refusals", "wait_s",
            "ttft_s", "e2e_s", "island_utilisation", "credits", "karma", "kyc_violations", "free_tier_violations",
            "ledger_balanced", "log_digest", "sim_seconds", "wall_seconds", "jobs_per_wall_second")


def _check_books(result):
    m, world = result.metrics, result.world
    assert m["jobs_total"] == len(world.jobs) > 0
    assert m["jobs_total"] == sum(m[k] for k in ("jobs_completed", "jobs_failed", "jobs_timeout", "jobs_cancelled",
                                                 "jobs_refused", "jobs_unfinished"))
    assert m["protocol_errors"] == 0, world.protocol_errors[:3]
    if m["jobs_unfinished"] == 0:
        assert all(j.status >= FIRST_TERMINAL for j in world.jobs)
        assert world.tier_busy == [0] * len(world.tier_busy)
        assert all(st.busy == 0 and not st.jobs for st in world.ist)
    for st in world.ist:
        assert 0 <= st.busy <= st.spec.slots
    for j in world.jobs:
        if j.status == 4:  # completed
            assert j.arrival <= j.assigned <= j.first <= j.ended


def test_small_run_writes_every_output(tmp_path):
    res = loads_scenario(SMALL, source="small.toml")
    result = run(res, "bare-queue", out_dir=tmp_path)
    m = result.metrics
    for key in REQUIRED:
        assert key in m, key
    for series in ("wait_s", "ttft_s", "e2e_s"):
        assert [k for k in m[series] if k.startswith("p")] == [n for n, _ in PERCENTILES]
    assert m["system"] == "bare-queue"
    assert m["credits"] is None and m["karma"] is None and m["ledger_balanced"] is None
    assert m["free_tier_violations"] is None
    assert m["kyc_violations"] > 0  # anonymous image Jobs ran: the bare queue has no KYC rule
    assert m["jobs_cancelled"] > 0  # impatient consumers gave up during bursts
    assert set(m["island_utilisation"]["by_tier"]) == {"cpu", "consumer-gpu", "datacenter-gpu"}
    _check_books(result)

    files = {p.name for p in tmp_path.iterdir()}
    assert {"metrics.json", "report.md", *PLOTS} <= files
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((tmp_path / "metrics.json").read_bytes())
    assert on_disk["log_digest"] == m["log_digest"] and on_disk["jobs_total"] == m["jobs_total"]
    report = (tmp_path / "report.md").read_text()
    assert "# Simulation report: small" in report and "VIOLATED" in report and "UNMEASURED" in report
    assert [o.expectation.text for o in result.failed] == ["kyc_violations == 0", "ledger_balanced == true"]


def test_same_seed_same_bytes_other_seed_differs():
    res = loads_scenario(FAULTY)
    a = run(res, BareQueue()).metrics
    b = run(res, BareQueue()).metrics
    assert to_json(deterministic_view(a)) == to_json(deterministic_view(b))
    assert all(k not in deterministic_view(a) for k in WALL_KEYS)
    c = run(with_overrides(res, seed=5), BareQueue()).metrics
    assert c["log_digest"] != a["log_digest"]
    assert to_json(deterministic_view(c)) != to_json(deterministic_view(a))


def test_faults_keep_the_books_straight():
    result = run(loads_scenario(FAULTY), "bare-queue")
    m = result.metrics
    f = m["faults"]
    assert f["restarts"] == 2
    assert f["crashes"] > 0 and f["missed_acks"] > 0 and f["disconnects"] > 0 and f["hangs"] > 0
    assert f["requeues"] > 0 and f["revokes"] > 0
    assert m["jobs_unfinished"] == 0
    assert any(k.startswith("failed:") for k in m["end_reasons"]) or m["jobs_failed"] == 0
    _check_books(result)


def test_evening_availability_brings_home_gpus_online():
    res = loads_scenario(SMALL.replace('start = "2026-01-05T19:00:00Z"', 'start = "2026-01-05T14:00:00Z"')
                         .replace("duration_s = 600", "duration_s = 21600").replace("rate_per_s = 3", "rate_per_s = 0.2")
                         .replace("burst_rate_per_s = 10", "burst_rate_per_s = 0.5"))
    world = run(res, "bare-queue").world
    gpu = world.tier_names.index("consumer-gpu")
    dc = world.tier_names.index("datacenter-gpu")
    online = [o[gpu] for o in world.s_online]
    assert max(online) > 2 * min(online[:10])  # 14:00 few, 20:00 most
    assert {o[dc] for o in world.s_online} == {8}  # racks: always on (2 Islands x 4 slots)


def test_nearest_rank():
    v = list(range(1, 1001))
    assert [nearest_rank(v, q) for _, q in PERCENTILES] == [500, 900, 950, 990, 999]
    assert nearest_rank([7], 999) == 7
    assert nearest_rank([1, 2], 500) == 1 and nearest_rank([1, 2], 501) == 2


def test_cli_scenario_exit_codes(tmp_path, capsys):
    scen = tmp_path / "s.toml"
    scen.write_text(SMALL)
    assert cli_main([str(scen), "--quiet", "--jobs", "300", "--system", "bare-queue"]) == 1
    out = capsys.readouterr()
    assert "EXPECTATION VIOLATED  kyc_violations == 0" in out.out
    assert "log digest" in out.out and "not met" in out.err
    scen.write_text(SMALL.replace('expect = ["jobs_unfinished == 0", "p99_wait_s < 1000", "kyc_violations == 0", '
                                  '"ledger_balanced == true"]', 'expect = ["jobs_total == 300"]'))
    assert cli_main([str(scen), "--quiet", "--jobs", "300", "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert (tmp_path / "o" / "metrics.json").is_file() and not (tmp_path / "o" / "wait_cdf.png").exists()
    assert cli_main([str(tmp_path / "missing.toml")]) == 2
    assert cli_main([str(scen), "--duration", "soon"]) == 2
    assert cli_main([]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "not a duration" in err


def test_packaged_baseline_runs_capped():
    res = with_overrides(load_scenario("baseline"), max_jobs=3000, unlimited_duration=True)
    result = run(res, "bare-queue")
    assert result.metrics["jobs_total"] == 3000
    assert result.metrics["jobs_completed"] == 3000
    _check_books(result)


@pytest.mark.skipif(not AZURE.is_file(), reason=f"shared trace not present at {AZURE}")
def test_cli_trace_replay(tmp_path, capsys):
    code = cli_main(["--trace", str(AZURE), "--islands", "10", "--sample", "0.1", "--time-scale", "4", "--quiet",
                     "--seed", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "scenario trace-azure_llm_2023_code" in out
    assert cli_main(["--trace", str(AZURE)]) == 2  # --islands missing


def test_digest_does_not_depend_on_the_process(tmp_path):
    """String hashing is salted per process; nothing in the simulator may depend on it."""
    import os
    import subprocess
    import sys

    scen = tmp_path / "f.toml"
    scen.write_text(FAULTY)
    code = ("import sys; from simulations.scenario import load_scenario; from simulations.runner import run; "
            "print(run(load_scenario(sys.argv[1]), 'bare-queue').metrics['log_digest'])")
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", code, str(scen)], env=env, capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parents[1])
        digests.add(out.stdout.strip())
    assert len(digests) == 1
    assert digests == {run(loads_scenario(FAULTY), "bare-queue").metrics["log_digest"]}


class ChargingQueue(BareQueue):
    """A test double with toy rules (KYC for images, a free-tier allowance, flat prices,
    a karma number per Island): shows that the adapter contract fills every metric."""

    name = "charging-queue"
    PRICE = {"llm-chat": 5_000_000, "llm-chat-lite": 1_000_000, "sdxl": 10_000_000}

    def start(self, ctx):
        super().start(ctx)
        self.spent: dict[int, int] = {}
        self.account_of: dict[int, int] = {}
        self.kyc = {a.no: a.kyc for a in ctx.accounts}
        self.totals = [0, 0, 0, 0]
        self.karma = [10_000] * len(ctx.islands)

    def submit(self, job_no, shape, account, now_ms):
        price = self.PRICE[shape.cargo]
        if not account.kyc:
            if shape.cargo == "sdxl":
                return "kyc_required"
            if self.spent.get(account.no, 0) + price > self.ctx.free_tier_micro:
                return "free_tier_exhausted"
            self.spent[account.no] = self.spent.get(account.no, 0) + price  # the hold counts
        self.account_of[job_no] = account.no
        return super().submit(job_no, shape, account, now_ms)

    def complete(self, job_no, island_no, now_ms, run_ms):
        rec = self.jobs.get(job_no)
        if rec is None or rec[3] != island_no:
            return
        del self.jobs[job_no]
        if self.online[island_no]:
            self.slots_free[island_no] += 1
        price = self.PRICE[rec[1]]
        fee = price * 1500 // 10_000
        self.totals[0] += price
        self.totals[1] += price - fee
        self.totals[2] += fee
        self.karma[island_no] += 10
        self.hooks.job_ended(job_no, "completed", charged_micro=price)
        self._fill(island_no)

    def credit_totals(self):
        return tuple(self.totals)

    def finish(self, now_ms):
        k = sorted(self.karma)
        return {"credits": {"charged": self.totals[0], "earned_by_islands": self.totals[1], "fees": self.totals[2],
                            "released": self.totals[3]},
                "karma": {"min": k[0] / 1000, "median": k[len(k) // 2] / 1000, "max": k[-1] / 1000},
                "karma_values": k, "ledger_balanced": True, "log_digest": "stub"}


def test_a_system_with_rules_fills_every_metric(tmp_path):
    result = run(loads_scenario(SMALL), ChargingQueue(), out_dir=tmp_path)
    m = result.metrics
    assert m["system"] == "charging-queue"
    assert m["refusals"]["kyc_required"] > 0 and m["refusals"]["free_tier_exhausted"] > 0
    assert m["kyc_violations"] == 0 and m["free_tier_violations"] == 0
    assert m["ledger_balanced"] is True and m["system_log_digest"] == "stub"
    c = m["credits"]
    assert c["charged"] == c["earned_by_islands"] + c["fees"] > 0
    assert m["karma"]["min"] >= 10 and m["karma"]["max"] > m["karma"]["min"]
    assert result.failed == []  # every expectation of SMALL holds under rules
    assert "credits: charged" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "credit_flows.png").stat().st_size > (tmp_path / "karma.png").stat().st_size // 4
    _check_books(result)
