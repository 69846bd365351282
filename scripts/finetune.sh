#!/usr/bin/env bash
# README command 1: set up (first time) and run the fine-tune flow; arguments go to `python -m flows.finetune`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PREFECT_SERVER_ANALYTICS_ENABLED=false
exec python -m flows.finetune "$@"
