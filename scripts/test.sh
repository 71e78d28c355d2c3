#!/bin/sh
# The test command: set up (idempotent), then run the whole suite with real runc and ch-run.
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/setup.sh"
cd "$repo"
exec "${NODESTEPD_VENV:-/opt/nodestepd/venv}/bin/python" -m pytest -p no:cacheprovider "$@"
