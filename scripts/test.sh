#!/usr/bin/env bash
# README command 2: set up .venv with the test dependencies (first run only) and run the whole
# test suite. Extra arguments go to pytest (e.g. -k parity, -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh" --test
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q "$@"
