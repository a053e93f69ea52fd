#!/usr/bin/env bash
# A separate venv with autofaiss (it pins faiss-cpu, which must never sit beside faiss-gpu), for
# the index benchmark's "what would autofaiss pick" comparison. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-autofaiss
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import autofaiss" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# autofaiss pins numpy<2; the newest pyarrow needs numpy>=2
"$VENV/bin/python" -m pip install -q autofaiss "pyarrow<20"
