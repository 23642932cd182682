"""Benchmark runner: `python -m bench` runs all, `python -m bench NAME [args]` runs one.

Each benchmark is a module `bench/NAME.py` exposing `main(argv: list[str]) -> dict`.
The module prints whatever human-readable lines it likes; the runner prints the
returned dict as the single closing JSON line (it must contain "bench").
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys

import bench

SKIP = {"__main__", "common"}


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name not in SKIP)


def run_one(name: str, argv: list[str]) -> dict:
    module = importlib.import_module(f"bench.{name}")
    result = module.main(argv)
    assert isinstance(result, dict) and "bench" in result, f"bench.{name} must return a dict with 'bench'"
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    args = sys.argv[1:]
    names = available()
    if args and args[0] in ("-h", "--help"):
        print("usage: python -m bench [NAME [ARGS...]]\navailable: " + ", ".join(names))
        return 0
    if args:
        if args[0] not in names:
            print(f"unknown benchmark {args[0]!r}; available: {', '.join(names)}", file=sys.stderr)
            return 2
        run_one(args[0], args[1:])
        return 0
    for name in names:
        run_one(name, [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
