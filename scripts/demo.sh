#!/usr/bin/env bash
# Set up the environment and run the main job: the Custom Diffusion demo on the embedded toy world.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/customdiff demo "$@"
