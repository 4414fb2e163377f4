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
# pip's and setuptools' chatter (the editable-install notice) goes to a log, shown on failure
if ! { .venv/bin/python -m pip install -q --upgrade pip \
       && .venv/bin/python -m pip install -q -e ".[$ALL]"; } > .venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log >&2
  exit 1
fi
echo "$WANT $ALL" > "$STAMP"
