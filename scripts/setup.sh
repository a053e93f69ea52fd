#!/usr/bin/env bash
# Make .venv and install clipkit (editable) with its test extras. Idempotent: a second run only
# checks that the install is still current (a stamp keyed by pyproject.toml's hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.clipkit-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# --no-compile: pip would byte-compile every file of torch & co. at install; Python compiles
# (and caches) the modules a run imports, a small share of them.
.venv/bin/python -m pip install -q --no-compile --upgrade pip
# Pinned: on the team's machines pip takes these from local disk; unpinned torch downloads GBs.
.venv/bin/python -m pip install -q --no-compile "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --no-compile -e ".[test]"
echo "$want" > "$stamp"
