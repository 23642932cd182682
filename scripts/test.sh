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
# The web app's browser tests (tests/test_web_browser.py) drive Debian's Chromium; install it
# when missing where we can (root + apt-get). Under CI=true the tests fail without it.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing chromium and chromium-driver for the browser tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
      || echo "test: could not install chromium (the browser tests skip, or fail under CI=true)" >&2
  else
    echo "test: chromium missing and not root: the browser tests skip (CI=true fails instead)" >&2
  fi
fi
export COORDINATOR_SCREENSHOTS="${COORDINATOR_SCREENSHOTS:-$ROOT/screenshots}"
echo "test: browser screenshots go to $COORDINATOR_SCREENSHOTS" >&2
set +e
python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "test: pytest collected no tests" >&2
  exit 1
fi
exit $rc
