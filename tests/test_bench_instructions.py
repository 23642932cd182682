"""`python -m bench instructions`: its arithmetic and its refusals. The callgrind runs
themselves take minutes and are the benchmark, not a test."""

from __future__ import annotations

import pytest

from bench import instructions


def test_per_job_is_the_difference_over_the_jobs_between_two_sizes() -> None:
    small = {"jobs": 200, "instructions": 4_000_000_000}
    large = {"jobs": 1_200, "instructions": 6_100_000_000}
    assert instructions._per_job(small, large) == 2_100_000


def test_bad_sizes_are_refused_with_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--small", "0"], ["--jobs", "100", "--small", "200"], ["--jobs", str(instructions.MAX_JOBS + 1)]):
        with pytest.raises(SystemExit) as info:
            instructions.main(argv)
        assert info.value.code == 2
        assert "need 0 < --small < --jobs" in capsys.readouterr().err


def test_without_valgrind_or_the_revision_it_says_so_and_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    assert instructions.main([])["skipped"] == "valgrind not found"
    monkeypatch.setattr(instructions.shutil, "which", lambda name: "/usr/bin/valgrind")
    got = instructions.main(["--against", "no-such-revision-0000"])
    assert got["bench"] == "instructions" and "not in this checkout" in got["skipped"]
