#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent), lint, and run the whole test suite on
# 2 workers with one torch thread each, a test module at a time per worker (--dist loadscope), so that
# module-scoped fixtures (trained runs, spawned ranks, the gpu_check dry run) are made once per
# module, not once per worker. (Under pytest 9.2, xdist 3.8's loadgroup no longer groups xdist_group marks.)
# lint-imports checks the layering in pyproject.toml's
# [tool.importlinter].
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
.venv/bin/ruff format --check clipkit tests scripts
.venv/bin/ruff check clipkit tests scripts
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -n 2 --dist loadscope -q "$@"
