#!/usr/bin/env bash
# The whole test suite: unit tests (seconds), then integration tests against real local
# clusters (minutes). Installs what it needs first, as the README's first command does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/haflow prereqs --install
.venv/bin/python -m pytest tests/unit tests/integration -v -p no:cacheprovider --timeout 900 "$@"
