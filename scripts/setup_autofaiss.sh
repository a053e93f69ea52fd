#!/usr/bin/env bash
# A separate venv with autofaiss (it pins faiss-cpu, which must never sit beside faiss-gpu), for
# the index benchmark's "what would autofaiss pick" comparison. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-autofaiss
FAISS=1.7.4
if [ -x "$VENV/bin/python" ] &&
  "$VENV/bin/python" -c "import autofaiss, faiss; assert faiss.__version__ == '$FAISS'" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# autofaiss pins numpy<2; the newest pyarrow needs numpy>=2. autofaiss 2.18 builds OPQ indexes
# with `OPQMatrix(d, M=..., d2=...)`, which faiss 1.15's bindings reject (TypeError), so it gets
# the faiss of its own era; clipkit's faiss reads the indexes it writes.
"$VENV/bin/python" -m pip install -q autofaiss "faiss-cpu==$FAISS" "pyarrow<20"
