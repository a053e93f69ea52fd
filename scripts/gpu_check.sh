#!/usr/bin/env bash
# GPU check (issue 20): bf16/fp16 training throughput, torchrun resume, method costs, faiss GPU
# index, zero-shot images/s; <= 8 minutes on one H100/H200. `--dry-run` runs it tiny on CPU.
#   scripts/gpu_check.sh [--dry-run] [--out DIR] [--steps data,bf16,...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/scripts/gpu_check.py" "$@"
