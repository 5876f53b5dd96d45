#!/usr/bin/env bash
# Create .venv with the pinned toolchain (CPU torch 2.13.0) and install unmask in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
.venv/bin/python -c "import torch, unmask; print(f'unmask {unmask.__version__} with torch {torch.__version__} ready in .venv')"
