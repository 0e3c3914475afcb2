#!/usr/bin/env bash
# The whole test suite, as CI runs it: install, lint, format check, then every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh --test
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m pytest "$@"
