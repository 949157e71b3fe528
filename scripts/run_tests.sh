#!/usr/bin/env bash
# Sets up what the tests need on a fresh machine and runs them: `bash scripts/run_tests.sh`.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh tests/core -q`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# torch + torchvision (open_clip needs torchvision); ComfyUI users already have both.
if ! "$PYTHON" -c "import torch, torchvision" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
"$PYTHON" -m pip install --quiet -r requirements-test.txt
# ComfyUI's comfy package (2024 core) for the host tier; its declared deps would pull another torch.
"$PYTHON" -m pip install --quiet --no-deps "notcomfy==0.1.0"

"$PYTHON" -m ruff check .
exec "$PYTHON" -m pytest "$@"
