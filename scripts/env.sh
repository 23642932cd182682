#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the project with its dev extras, once per
# change of pyproject.toml. Sourced by run.sh and test.sh.
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  echo "needs Python 3.11 or newer as '$PY' (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
STAMP="$ROOT/.venv/.installed-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$ROOT/.venv/bin/python" -m pip install -q -e "$ROOT[dev]"
  rm -f "$ROOT"/.venv/.installed-*
  touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
