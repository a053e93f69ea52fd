#!/usr/bin/env bash
# Kill-and-resume soak test (not part of CI): see scripts/soak.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/soak.py "$@"
