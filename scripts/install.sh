#!/usr/bin/env bash
# Install haflow itself into .venv (idempotent). On a fresh Debian 12 machine as root this also
# installs the Python venv support it needs; the cluster's own packages (etcd, HAProxy,
# PostgreSQL) are installed by `haflow up` / `haflow prereqs --install`.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}

if ! PY=$(pick_python) || ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing python3 and python3-venv with apt" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
    PY=$(pick_python) || { echo "error: no Python >= 3.11 found after apt; install one and re-run" >&2; exit 2; }
  else
    echo "error: haflow needs Python >= 3.11 with venv; run: sudo apt-get install -y python3 python3-venv" >&2
    exit 2
  fi
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  rm -rf .venv
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/haflow --version
