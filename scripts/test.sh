#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent), lint, and run the whole test suite on
# 2 workers with one torch thread each (--dist load: `loadscope` keeps module fixtures to one
# worker but measured 24.6 min of pytest against 15.8, big modules running alone at the end).
# lint-imports checks the layering in pyproject.toml's
# [tool.importlinter].
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
# Let Python cache the bytecode of what it imports: setup installs with --no-compile, and with
# PYTHONDONTWRITEBYTECODE set (as on the team's machines) every process the tests start compiled
# torch, open_clip and sympy from source again (~12 s to import the trainer instead of ~5 s).
unset PYTHONDONTWRITEBYTECODE
.venv/bin/ruff format --check clipkit tests scripts
.venv/bin/ruff check clipkit tests scripts
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -n 2 --dist load -q "$@"
