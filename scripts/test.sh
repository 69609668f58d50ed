#!/usr/bin/env bash
# Install healer, lint it, and run the whole test suite (CPU, offline; tiny random models built in-process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python -m ruff check .  # the linter settings are in pyproject.toml
python scripts/check_layers.py  # the import layers: [tool.importlinter] in pyproject.toml
exec python -m pytest -q --durations=15 "$@"
