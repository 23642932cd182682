"""`python -m bench compiled`: its refusals, its skips and its module list. The build and
the timed runs take minutes and are the benchmark, not a test."""

from __future__ import annotations

import pytest

from bench import compiled


def test_every_hot_module_exists_and_is_plain_python() -> None:
    for rel in compiled.HOT_MODULES:
        path = compiled.ROOT / rel
        assert path.is_file(), f"{rel} is in HOT_MODULES but not in the tree"
        assert path.suffix == ".py"
    assert len(set(compiled.HOT_MODULES)) == len(compiled.HOT_MODULES)


def test_bad_sizes_are_refused_with_a_reason(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--jobs", "0"], ["--repeat", "0"], ["--jobs", str(compiled.MAX_JOBS + 1)],
                 ["--repeat", str(compiled.MAX_REPEAT + 1)]):
        with pytest.raises(SystemExit) as info:
            compiled.main(argv)
        assert info.value.code == 2
        assert "need 0 < --jobs" in capsys.readouterr().err


def test_without_a_compiler_it_says_so_and_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    got = compiled.main([])
    assert got == {"bench": "compiled", "jobs": 10_000, "binding": True, "skipped": "no C compiler"}


def test_when_cython_cannot_be_had_it_says_why_and_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_cython_path", lambda tmp: (None, "no network"))
    got = compiled.main(["--no-binding"])
    if "skipped" in got and got["skipped"] in ("no C compiler", "no Python headers", "not a git checkout"):
        pytest.skip(f"this machine: {got['skipped']}")
    assert got["binding"] is False
    assert got["skipped"] == "Cython not importable and not installable (no network)"
