#!/usr/bin/env bash
# Create .venv (if missing) and install kface-pipeline into it with the extras named in $1
# (comma-separated; default "dev,demo": the test tools and the demo's public photo). The
# demo needs only "demo": JAX and Playwright (the dev tools, ~550 MB) are left out.
# Skipped when .venv already holds an install of this pyproject.toml with those extras
# (the stamp records the file's hash and the extras installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${1:-dev,demo}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.kface-installed
WANT="$(sha256sum pyproject.toml | cut -c1-64)"
HAVE=""
if [ -f "$STAMP" ] && [ -x .venv/bin/kface ]; then
  read -r HASH INSTALLED < "$STAMP" || true
  if [ "$HASH" = "$WANT" ]; then
    HAVE="${INSTALLED:-}"
    MISSING=0
    for extra in ${EXTRAS//,/ }; do
      [[ ",$HAVE," == *",$extra,"* ]] || MISSING=1
    done
    [ "$MISSING" = 0 ] && exit 0
  fi
fi
ALL="$(echo "$HAVE,$EXTRAS" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -)"
# pip's and setuptools' chatter (the editable-install notice) goes to a log, shown on failure;
# a line per step here, and pip's own lines of what it collects and installs, shortened
LOG=.venv/pip-install.log
echo "setup: installing kface-pipeline[$ALL] into .venv (TensorFlow: a few minutes the first time; log: $LOG)"
START=$SECONDS
if ! { .venv/bin/python -m pip install -q --upgrade pip \
       && .venv/bin/python -m pip install --progress-bar off -e ".[$ALL]"; } > "$LOG" 2>&1; then
  cat "$LOG" >&2
  exit 1
fi
echo "setup: $(grep '^Successfully installed' "$LOG" | wc -w | awk '{print ($1 > 2 ? $1 - 2 : 0)}')" \
     "packages installed or upgraded in $((SECONDS - START)) s"
echo "$WANT $ALL" > "$STAMP"
