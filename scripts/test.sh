#!/usr/bin/env bash
# Set up the environment and run the test suite (offline, CPU, tiny models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/python -m pytest "$@"
