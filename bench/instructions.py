"""Instructions per simulated Job, this tree against another revision, counted by callgrind.

    python -m bench instructions [--against REV] [--jobs N] [--small N0]

Wall-clock rates on the shared 2-core machine move by up to 2x within an hour, so a few
percent cannot be seen in them. `valgrind --tool=callgrind` counts the instructions the
process executes, which the load on the machine does not change. The simulator's
baseline scenario runs under it twice per tree, at `--small` and at `--jobs` Jobs. The
difference, divided by the difference in Jobs, is the cost of one Job without the
start-up (imports, building the fleet). The other revision is checked out in a temporary
git worktree and measured in the same run, with the same interpreter and PYTHONHASHSEED=0.
Both must give the same simulator digest: the same decisions, so the same work.

Needs valgrind and a git checkout (the revision must be in its history); says so and skips
otherwise. About three minutes with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import ROOT, is_commit, worktree

# The last commit before the fourth round of cuts (docs/PERFORMANCE.md): the default baseline.
DEFAULT_AGAINST = "624c196"
MAX_JOBS = 20_000  # callgrind runs ~50x slower than the interpreter: a bound on the run time

_MEASURE = """
import json, sys
sys.path.insert(0, ".")
from simulations.runner import build_world
from simulations.scenario import load_scenario, with_overrides
from simulations.systems import make_system
res = with_overrides(load_scenario("baseline"), max_jobs=int(sys.argv[1]), unlimited_duration=True)
world = build_world(res, make_system("real"))
world.run()
print(json.dumps({"jobs": len(world.jobs), "digest": world.log_digest()}))
"""


def _callgrind(tree: Path, jobs: int, out_dir: Path, tag: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir / f'{tag}-{jobs}.out'}",
         sys.executable, "-c", _MEASURE, str(jobs)],
        cwd=tree, env=env, capture_output=True, text=True, check=False)
    refs = re.search(r"refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or refs is None:
        raise RuntimeError(f"callgrind run failed in {tree} ({jobs} Jobs): {proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "instructions": int(refs.group(1).replace(",", ""))}


def _per_job(small: dict[str, Any], large: dict[str, Any]) -> float:
    jobs = large["jobs"] - small["jobs"]
    assert jobs > 0, (small, large)
    return (large["instructions"] - small["instructions"]) / jobs


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench instructions")
    ap.add_argument("--against", default=DEFAULT_AGAINST, help="git revision to compare with")
    ap.add_argument("--jobs", type=int, default=1_000)
    ap.add_argument("--small", type=int, default=200)
    args = ap.parse_args(argv)
    if not 0 < args.small < args.jobs <= MAX_JOBS:
        ap.error(f"need 0 < --small < --jobs <= {MAX_JOBS}")
    result: dict[str, Any] = {"bench": "instructions", "against": args.against}
    if shutil.which("valgrind") is None:
        print("instructions: valgrind not found (apt-get install valgrind): skipped")
        return {**result, "skipped": "valgrind not found"}
    if not is_commit(args.against):
        print(f"instructions: {args.against} is not a commit of this checkout: skipped")
        return {**result, "skipped": f"{args.against} not in this checkout"}

    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp, \
            worktree(args.against, Path(tmp) / "base") as base:
        runs = [(ROOT, "this"), (base, "base")]
        with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: two runs at a time
            futures = {(tag, n): pool.submit(_callgrind, tree, n, Path(tmp), tag)
                       for tree, tag in runs for n in (args.small, args.jobs)}
            got = {key: fut.result() for key, fut in futures.items()}
    this = _per_job(got[("this", args.small)], got[("this", args.jobs)])
    before = _per_job(got[("base", args.small)], got[("base", args.jobs)])
    same = all(got[("this", n)]["digest"] == got[("base", n)]["digest"] for n in (args.small, args.jobs))
    print(f"instructions per simulated Job: {this:,.0f} here, {before:,.0f} at {args.against} "
          f"({this / before:.4f} of it); simulator digests {'equal' if same else 'DIFFER'}")
    return {**result, "instructions_per_job": round(this), "baseline_instructions_per_job": round(before),
            "ratio": round(before / this, 4), "jobs": args.jobs, "small": args.small, "same_digest": same}
