#!/usr/bin/env bash
# The whole test suite: unit tests (seconds), integration tests against real local clusters
# (minutes), then the lab tier (real Debian hosts under systemd-nspawn, minutes). Installs what
# it needs first, as the README's first command does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/haflow prereqs --install
.venv/bin/python -m pytest tests/unit tests/integration tests/lab -v -p no:cacheprovider --timeout 900 --durations=30 "$@"
