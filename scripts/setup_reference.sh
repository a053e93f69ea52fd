#!/usr/bin/env bash
# A separate venv with open_clip's own trainer (open_clip_torch[training] pins webdataset<=0.2.86,
# which clipkit does not use), for side-by-side benchmarks. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-openclip
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import open_clip_train" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q "open_clip_torch[training]==3.3.0"
