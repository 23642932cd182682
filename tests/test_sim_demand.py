"""Demand: arrival processes, shapes, and trace readers (the real Azure file and a
second format that is one small reader)."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from simulations.consumers import ConsumerClass, build_accounts
from simulations.demand import (DEFAULT_SIZES, JobShape, ShapeSampler, SizeSpec, burst_arrivals, diurnal_arrivals,
                                poisson_arrivals)
from simulations.traces import FORMATS, TraceError, read_trace, register, seconds_to_ns, timestamp_to_ns

AZURE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "azure_llm_2023_code.csv"
needs_azure = pytest.mark.skipif(not AZURE.is_file(), reason=f"shared trace not present at {AZURE}")

# A tiny image-generation trace (format "image-gen"): seconds, prompt length, steps, size, run time.
IMAGE_GEN_CSV = """timestamp_s,prompt_chars,steps,width,height,run_s
0.000,120,30,1024,1024,7.5
0.250,40,20,768,768,
1.5,999,50,1024,1536,21.25
1.5,7,30,1024,1024,6
"""


# ---------------------------------------------------------------------- Azure trace
@needs_azure
def test_azure_trace_reads_every_row_relative_to_the_first():
    jobs = read_trace(AZURE, "azure-llm")
    # The file holds 8,819 data rows (shared/traces/README.md says 8,818).
    assert len(jobs) == 8819
    assert jobs[0].arrival_ms == 0
    assert all(a.arrival_ms <= b.arrival_ms for a, b in zip(jobs, jobs[1:]))
    first = jobs[0]
    assert (first.cargo, first.prompt_tokens, first.completion_tokens) == ("llm-chat", 4808, 10)
    # 2023-11-16 18:17:04.0319600 - 18:17:03.9799600 = 52.0 ms
    assert jobs[1].arrival_ms == 52
    # last row 19:14:19.9280160 -> 57 min 15.9480560 s after the first
    assert jobs[-1].arrival_ms == 3_435_948
    assert (jobs[-1].prompt_tokens, jobs[-1].completion_tokens) == (549, 173)


@needs_azure
def test_azure_trace_time_scale_sample_and_limit():
    full = read_trace(AZURE)
    fast = read_trace(AZURE, time_scale=2.0)
    assert len(fast) == len(full)
    assert fast[-1].arrival_ms == 1_717_974  # half of 3_435_948
    slow = read_trace(AZURE, time_scale=0.5)
    assert slow[-1].arrival_ms == 2 * 3_435_948

    half = read_trace(AZURE, sample=0.5, seed=1)
    again = read_trace(AZURE, sample=0.5, seed=1)
    other = read_trace(AZURE, sample=0.5, seed=2)
    assert [j.arrival_ms for j in half] == [j.arrival_ms for j in again]
    assert [j.arrival_ms for j in half] != [j.arrival_ms for j in other]
    assert 0.45 * len(full) < len(half) < 0.55 * len(full)
    # sampling thins without shifting: kept rows keep their original times
    full_times = {(j.arrival_ms, j.prompt_tokens, j.completion_tokens) for j in full}
    assert all((j.arrival_ms, j.prompt_tokens, j.completion_tokens) in full_times for j in half)

    assert len(read_trace(AZURE, limit=100)) == 100
    assert [j.arrival_ms for j in read_trace(AZURE, limit=5)] == [j.arrival_ms for j in full[:5]]


def test_timestamps_are_parsed_exactly():
    a = timestamp_to_ns("2023-11-16 18:17:03.9799600")
    b = timestamp_to_ns("2023-11-16 18:17:04.0319600")
    assert b - a == 52_000_000
    assert timestamp_to_ns("2023-11-16T00:00:01") - timestamp_to_ns("2023-11-15 23:59:59.5") == 1_500_000_000
    assert seconds_to_ns("1.5") == 1_500_000_000
    for bad in ("2023-11-16 18:17", "2023-11-16 18:17:03,5", "2023-11-16 18:17:03.1234567890", "yesterday"):
        with pytest.raises(ValueError):
            timestamp_to_ns(bad)


def test_azure_reader_errors_name_the_problem(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.97,12\n")
    with pytest.raises(TraceError, match="missing column.*GeneratedTokens"):
        read_trace(p)
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,12,3\n2023-11-16 18:17:04,x,3\n")
    with pytest.raises(TraceError, match="line 3.*ContextTokens"):
        read_trace(p)
    with pytest.raises(TraceError, match="unknown trace format"):
        read_trace(p, "nope")
    with pytest.raises(TraceError, match="cannot open"):
        read_trace(tmp_path / "missing.csv")


# ---------------------------------------------------------------------- a second format
def test_image_gen_trace_is_one_small_reader(tmp_path):
    p = tmp_path / "images.csv"
    p.write_text(IMAGE_GEN_CSV)
    jobs = read_trace(p, "image-gen")
    assert [j.arrival_ms for j in jobs] == [0, 250, 1500, 1500]
    assert jobs[0] == JobShape(arrival_ms=0, cargo="sdxl", prompt_tokens=30, steps=30, width=1024, height=1024,
                               run_ms=7500)
    assert jobs[1].run_ms == 0  # no run time: the Island speed model decides
    assert (jobs[2].prompt_tokens, jobs[2].width, jobs[2].height, jobs[2].run_ms) == (250, 1024, 1536, 21250)
    assert jobs[3].steps == 30  # equal times keep file order
    assert [j.arrival_ms for j in read_trace(p, "image-gen", time_scale=10)] == [0, 25, 150, 150]


def test_registering_a_format_needs_only_a_reader(tmp_path):
    @register("test-minimal", columns=("t", "tokens"))
    def _minimal(rows):
        for row in rows:
            yield seconds_to_ns(row["t"]), JobShape(arrival_ms=0, cargo="llm-chat-lite",
                                                  prompt_tokens=int(row["tokens"]), completion_tokens=1)

    try:
        p = tmp_path / "m.csv"
        p.write_text("t,tokens\n10,5\n9.5,6\n")  # unsorted on purpose
        jobs = read_trace(p, "test-minimal")
        assert [(j.arrival_ms, j.prompt_tokens) for j in jobs] == [(0, 6), (500, 5)]
    finally:
        FORMATS.pop("test-minimal")


# ---------------------------------------------------------------------- arrival processes
def test_poisson_rate_and_determinism():
    times = list(poisson_arrivals(random.Random(1), 50.0, 0, 600_000))
    assert 0.95 * 30_000 < len(times) < 1.05 * 30_000
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 600_000
    assert times == list(poisson_arrivals(random.Random(1), 50.0, 0, 600_000))
    assert times != list(poisson_arrivals(random.Random(2), 50.0, 0, 600_000))


def test_diurnal_follows_the_hourly_curve():
    hourly = [0.0] * 24
    hourly[2] = 1.0
    hourly[3] = 3.0
    # t=0 is 01:30: hour 2 starts at 30 min, hour 3 at 90 min, hour 4 at 150 min
    times = list(diurnal_arrivals(random.Random(3), 10.0, hourly, day_offset_ms=90 * 60_000, end_ms=4 * 3_600_000))
    assert times and min(times) >= 30 * 60_000 and max(times) < 150 * 60_000
    h2 = sum(1 for t in times if t < 90 * 60_000)
    h3 = len(times) - h2
    assert 2.5 < h3 / h2 < 3.5
    with pytest.raises(ValueError):
        list(diurnal_arrivals(random.Random(3), 10.0, [0.0] * 24))


def test_bursts_only_arrive_while_on_when_the_base_rate_is_zero():
    times = list(burst_arrivals(random.Random(4), 0.0, 20.0, on_s=10, off_s=50, end_ms=600_000, fixed=True))
    assert times
    assert all(50_000 <= t % 60_000 < 60_000 for t in times)  # off 0-50 s, on 50-60 s of each minute
    assert 0.8 * 2000 < len(times) < 1.2 * 2000


# ---------------------------------------------------------------------- shapes
def test_shape_sampler_uses_accounts_mix_and_sizes():
    classes = [ConsumerClass(name="chat", count=10, cargo_mix={"llm-chat": 1.0}),
               ConsumerClass(name="img", count=10, kyc=False, cargo_mix={"sdxl": 1.0})]
    accounts = build_accounts(classes, random.Random(0))
    sizes = {k: msgspec.convert(d, SizeSpec) for k, d in DEFAULT_SIZES.items()}
    s = ShapeSampler(random.Random(5), accounts, sizes, classes=["img"])
    shapes = [s.shape(i) for i in range(200)]
    assert {x.cargo for x in shapes} == {"sdxl"}
    assert all(accounts[x.account].cls == "img" for x in shapes)
    assert all(x.steps in (20, 30, 50) and (x.width, x.height) in ((1024, 1024), (768, 768), (1024, 1536))
               for x in shapes)
    chat = ShapeSampler(random.Random(5), accounts, sizes, classes=["chat"])
    cs = [chat.shape(i) for i in range(500)]
    assert all(1 <= x.completion_tokens <= x.max_tokens == 1024 for x in cs)
    assert all(1 <= x.prompt_tokens <= 8000 for x in cs)
