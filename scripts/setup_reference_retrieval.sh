#!/usr/bin/env bash
# A separate venv with clip-retrieval (its pins: numpy<2, faiss-cpu, pyarrow<16, flask, ...; none
# may sit beside clipkit's faiss-gpu and numpy 2), for the serve tests (ClipClient against
# `clipkit retrieve serve`) and the serve benchmark (`clip-retrieval back` side by side).
# Idempotent; prints why when clip-retrieval cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-clipretrieval
VERSION=2.45.0
check() {
  "$VENV/bin/python" -c "from clip_retrieval.clip_client import ClipClient; import clip_retrieval.clip_back" 2>/dev/null
}
if [ -x "$VENV/bin/python" ] && check; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch from the wheel this machine keeps on disk (a CPU/CUDA build of the same version as
# clipkit's venv), so clip-retrieval's open-ended `torch` pin does not fetch another one.
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# clip-anytorch (its `clip` module) imports pkg_resources, which setuptools 81 removed.
"$VENV/bin/python" -m pip install -q "clip-retrieval==$VERSION" "setuptools<81"
check || { echo "clip-retrieval installed but does not import:" >&2;
  "$VENV/bin/python" -c "import clip_retrieval.clip_back" >&2; exit 1; }
