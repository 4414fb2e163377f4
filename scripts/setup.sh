#!/usr/bin/env bash
# Create .venv (if missing) and install kface-pipeline with its dev tools into it. Skipped
# when .venv already holds an install of this pyproject.toml (the stamp records its hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.kface-installed
WANT="$(sha256sum pyproject.toml | cut -c1-64)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x .venv/bin/kface ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev,demo]"
echo "$WANT" > "$STAMP"
