#!/usr/bin/env bash
# Runs the whole test suite in the local .venv (created on first use). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
