#!/usr/bin/env bash
# The main job: the coordinator demo on the embedded default (SQLite file in ./.coordinator).
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/env.sh"
cd "$ROOT"
exec coordinator demo "$@"
