#!/usr/bin/env bash
# Install healer and run the embedded CPU demo recipe end to end:
# SmolLM2-135M-Instruct -> prune 20% of blocks -> heal (CPT + KD) -> LoRA -> eval -> release.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec healer run demo "$@"
