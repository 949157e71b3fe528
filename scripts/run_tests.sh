#!/usr/bin/env bash
# Sets up what the tests need on a fresh machine and runs them: `bash scripts/run_tests.sh`.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh tests/core -q`).
#
# The host, server and browser tiers run on a ComfyUI checkout (v0.3.64 or newer): $COMFYUI_PATH,
# or the ComfyUI this pack is installed in (ComfyUI/custom_nodes/<pack>); without one they skip
# and say why.
#
# Everything is installed into a virtual environment of the tests' own (default
# ~/.cache/plora-tests/venv-<python version>, or $PLORA_TEST_VENV), never into the Python that
# runs this script (a ComfyUI user's venv stays exactly as it was).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${COMFYUI_PATH:-}" ] && [ -f ../../comfy/model_patcher.py ] && [ -f ../../main.py ]; then
  COMFYUI_PATH=$(cd ../.. && pwd)
  export COMFYUI_PATH
  echo "Testing against the ComfyUI this pack is installed in: $COMFYUI_PATH" >&2
fi

version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
VENV=${PLORA_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/plora-tests/venv-$version}
if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating the tests' own virtual environment in $VENV" >&2
  mkdir -p "$(dirname "$VENV")"
  if ! "$PYTHON" -m venv "$VENV"; then
    echo "Could not create a virtual environment with $PYTHON (Debian/Ubuntu: apt-get install python3-venv)." >&2
    exit 2
  fi
fi
VPY="$VENV/bin/python"
case "$("$VPY" -c 'import sys; print(sys.prefix)')" in
  "$("$PYTHON" -c 'import sys; print(sys.prefix)')")
    echo "Refusing to install into $PYTHON's own environment; set PLORA_TEST_VENV to a new folder." >&2
    exit 2 ;;
esac

# torch + torchvision (open_clip needs torchvision), then the test requirements
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
fi
"$VPY" -m pip install --quiet -r requirements-test.txt
# Earlier versions put the 2024 `comfy` core (PyPI's notcomfy) into this environment; the pack now needs a
# real ComfyUI checkout, and an installed `comfy` package would shadow it.
# (Only from this environment's own site-packages: never from a folder another environment lends it.)
if "$VPY" - <<'PY'
import importlib.metadata, sys
try:
    where = str(importlib.metadata.distribution("notcomfy").locate_file(""))
except importlib.metadata.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if where.startswith(sys.prefix) else 1)
PY
then
  "$VPY" -m pip uninstall --quiet --yes notcomfy
fi
# With a full ComfyUI checkout, the server tier runs it with this environment's Python: its
# requirements (torch and torchaudio aside) and playwright for the browser tier go here too.
if [ -n "${COMFYUI_PATH:-}" ] && [ -f "$COMFYUI_PATH/requirements.txt" ]; then
  grep -v -E '^(torch|torchaudio|torchvision)([^a-z_-]|$)' "$COMFYUI_PATH/requirements.txt" > "$VENV/comfyui-requirements.txt"
  # (requests: ComfyUI's frontend manager imports it without listing it)
  "$VPY" -m pip install --quiet -r "$VENV/comfyui-requirements.txt" playwright requests
  # The browser tier also opens the workflows with the newest frontend from PyPI, served by the checkout
  # (`--front-end-root`): installed into a folder of its own, so the checkout keeps the frontend it pins.
  FRONTEND_VERSION=${PLORA_FRONTEND_VERSION:-1.58.1}
  FRONTEND_DIR="$VENV/comfyui-frontend-newest"  # inside the tests' own environment, nowhere else
  if ! grep -qsx "Version: $FRONTEND_VERSION" "$FRONTEND_DIR"/comfyui_frontend_package-*.dist-info/METADATA; then
    rm -rf "$FRONTEND_DIR"
    "$VPY" -m pip install --quiet --no-deps --target "$FRONTEND_DIR" "comfyui-frontend-package==$FRONTEND_VERSION"
  fi
fi

"$VPY" -m ruff check .
exec "$VPY" -m pytest "$@"
