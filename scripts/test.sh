#!/usr/bin/env bash
# The test command: environment, services, then the whole suite on the embedded store
# and on real PostgreSQL + Redis. Extra arguments go to pytest.
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"
if ! bash scripts/services.sh; then
  if [ "${CI:-}" = "true" ]; then
    echo "test: PostgreSQL or Redis is missing and CI=true: failing" >&2
    exit 1
  fi
  echo "test: PostgreSQL or Redis is missing: their tests will be skipped (CI=true fails instead)" >&2
fi
set +e
python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "test: pytest collected no tests" >&2
  exit 1
fi
exit $rc
