#!/usr/bin/env bash
# Install (if needed), lint, and run the whole test suite (real detector, Prefect, TF).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check .
# --durations: the slowest tests in the log, so that one that grew shows in CI
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
