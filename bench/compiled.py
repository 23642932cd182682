"""The simulated Job with the hot modules compiled by Cython, against the same tree interpreted.

    python -m bench compiled [--jobs N] [--repeat R] [--no-binding]

Issue #17 asks for a 4.7x cut in the cost of a simulated Job, and its profile is flat
(docs/PERFORMANCE.md). One lever that needs no change to the code is to compile it: this
bench checks out this commit in a temporary git worktree, compiles the modules the profile
spends its time in (`HOT_MODULES`: routing, dispatch, commands, store, ledger, simulator)
with Cython in pure-Python mode, and runs the simulator's baseline scenario in that tree
and in this one, alternately, `--repeat` times each. Both must give the same simulator
digest (the same decisions). Reports the median CPU microseconds per Job of each (the
run's start, opening the accounts and Islands, included) and their ratio (above 1:
compiling is faster). Decision 0074 records what it showed.

Needs a C compiler, the Python headers and Cython: Cython is installed into a temporary
directory (`pip install --target`) when it is not importable, and the bench says so and
skips when any of the three is missing. About three minutes with the defaults (the
compilation takes most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, is_commit, median, worktree

MAX_JOBS = 100_000
MAX_REPEAT = 9

#: Where `python -m bench profile --no-pg` puts the own time of a simulated Job (areas of
#: our code), compiled as whole modules.
HOT_MODULES = (
    "routing/index.py", "routing/score.py", "routing/filters.py",
    "scheduler/dispatcher.py", "scheduler/registry.py", "scheduler/commands.py",
    "store/chain.py", "store/unit_of_work.py", "store/memory_recorder.py", "store/mapper.py", "store/clock.py",
    "ledger/service.py",
    "simulations/world.py", "simulations/real.py", "simulations/engine.py",
)

_MEASURE = """
import json, sys, time
sys.path.insert(0, ".")
from simulations.runner import build_world
from simulations.scenario import load_scenario, with_overrides
from simulations.systems import make_system
import store.chain
compiled = store.chain.__file__.endswith(".so")
res = with_overrides(load_scenario("baseline"), max_jobs=int(sys.argv[1]), unlimited_duration=True)
world = build_world(res, make_system("real"))
t = time.process_time()
world.run()
cpu = time.process_time() - t
print(json.dumps({"jobs": len(world.jobs), "cpu_s": cpu, "digest": world.log_digest(), "compiled": compiled}))
"""


def _skip(result: dict[str, Any], why: str) -> dict[str, Any]:
    print(f"compiled: {why}: skipped")
    return {**result, "skipped": why}


def _cython_path(tmp: Path) -> tuple[str | None, str]:
    """A PYTHONPATH under which `import Cython` works ("" if it already does), or None."""
    probe = [sys.executable, "-c", "import Cython"]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return "", "installed"
    target = tmp / "cython"
    got = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), "cython"],
                         capture_output=True, text=True, check=False)
    if got.returncode != 0:
        return None, got.stderr.strip()[-300:]
    return str(target), "installed into a temporary directory"


def _compile(tree: Path, pythonpath: str, binding: bool) -> None:
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else dict(os.environ)
    # annotation_typing off: our annotations are hints (a MetaDomainEvent is passed where
    # `type` is written). binding on (the default): compiled functions are full function
    # objects with signatures, as introspection expects; off: cheaper C-level functions.
    cmd = [sys.executable, "-m", "Cython.Build.Cythonize", "-i", "-3", "-j", "2",
           "-X", "annotation_typing=False", "-X", f"binding={binding}", *HOT_MODULES]
    got = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if got.returncode != 0:
        raise RuntimeError(f"cythonize failed: {got.stderr[-2000:]}")


def _run(tree: Path, jobs: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    got = subprocess.run([sys.executable, "-c", _MEASURE, str(jobs)], cwd=tree, env=env, capture_output=True,
                         text=True, check=False)
    if got.returncode != 0:
        raise RuntimeError(f"simulator run failed in {tree}: {got.stderr[-2000:]}")
    return json.loads([ln for ln in got.stdout.splitlines() if ln.startswith("{")][-1])


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench compiled")
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-binding", action="store_true", help="compile with Cython's binding=False")
    args = ap.parse_args(argv)
    if not 0 < args.jobs <= MAX_JOBS or not 0 < args.repeat <= MAX_REPEAT:
        ap.error(f"need 0 < --jobs <= {MAX_JOBS} and 0 < --repeat <= {MAX_REPEAT}")
    result: dict[str, Any] = {"bench": "compiled", "jobs": args.jobs, "binding": not args.no_binding}
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return _skip(result, "no C compiler")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return _skip(result, "no Python headers")
    if not is_commit("HEAD"):
        return _skip(result, "not a git checkout")

    with tempfile.TemporaryDirectory(prefix="bench-compiled-") as tmp_name:
        tmp = Path(tmp_name)
        pythonpath, how = _cython_path(tmp)
        if pythonpath is None:
            return _skip(result, f"Cython not importable and not installable ({how})")
        with worktree("HEAD", tmp / "tree") as tree:
            print(f"compiled: Cython {how}; compiling {len(HOT_MODULES)} modules of HEAD in {tree}")
            _compile(tree, pythonpath, not args.no_binding)
            runs: dict[str, list[dict[str, Any]]] = {"interpreted": [], "compiled": []}
            for _ in range(args.repeat):  # alternate, so a change of the machine's speed hits both
                runs["interpreted"].append(_run(ROOT, args.jobs))
                runs["compiled"].append(_run(tree, args.jobs))
    assert all(r["compiled"] for r in runs["compiled"]) and not any(r["compiled"] for r in runs["interpreted"])
    us = {k: median([1e6 * r["cpu_s"] / r["jobs"] for r in v]) for k, v in runs.items()}
    digests = {r["digest"] for v in runs.values() for r in v}
    same = len(digests) == 1
    for name, rs in runs.items():
        each = ", ".join(f"{1e6 * r['cpu_s'] / r['jobs']:.0f}" for r in rs)
        print(f"  {name}: CPU us per simulated Job {each} (median {us[name]:.0f})")
    ratio = us["interpreted"] / us["compiled"]
    print(f"compiled / interpreted speed: {ratio:.3f} (above 1: compiling helps); "
          f"simulator digests {'equal' if same else 'DIFFER'}")
    return {**result, "cpu_us_per_job": round(us["compiled"], 1), "baseline_cpu_us_per_job": round(us["interpreted"], 1),
            "ratio": round(ratio, 3), "same_digest": same, "repeat": args.repeat}
