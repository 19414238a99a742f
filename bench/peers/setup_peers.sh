#!/usr/bin/env bash
# Create the virtual environments of the peer PTQ tools used side by side with leanlm:
#
#   bench/.venvs/llmcompressor   llm-compressor (vLLM) + compressed-tensors
#   bench/.venvs/modelopt        NVIDIA Model Optimizer (nvidia-modelopt), CPU fake-quant path
#
# Each also gets gensim and leanlm itself (pip install --no-deps -e <repo root>) so that the peer
# scripts in bench/peers/ can use leanlm's data and perplexity code.
#
# Usage: bash bench/peers/setup_peers.sh [--force] [llmcompressor|modelopt ...]
#   --force   rebuild the named environments from scratch
# Environment: PYTHON (default python3.11), PEER_VENVS (default <repo>/bench/.venvs).
#
# Idempotent: an environment whose tool (and leanlm) already imports is left alone.
# Torch is always pinned to 2.13.0 on the same pip line (the CPU wheel); an unpinned torch would
# pull a multi-GB CUDA build.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENVS="${PEER_VENVS:-$ROOT/bench/.venvs}"
TORCH_PIN="torch==2.13.0"

# Exact versions that were checked to work together on CPU with torch 2.13.0 / Python 3.11.
#  - llmcompressor 0.14.0.1 requires torch<=2.14.0, transformers>=5.15,<=5.17, compressed-tensors==0.19.0
#  - nvidia-modelopt 0.47.0 has no [torch] extra any more (torch support is in the base package); its
#    [hf] extra pulls deepspeed/diffusers/peft, which CPU fake-quant does not need, so only the
#    parts used are installed: transformers within the [hf] extra's range (>=4.57,<5.15), accelerate,
#    and requests (imported by modelopt.torch.utils but not declared as a dependency).
LLMC_PKGS=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0 gensim==4.4.0)
MODELOPT_PKGS=(nvidia-modelopt==0.47.0 transformers==5.14.1 accelerate requests gensim==4.4.0)

FORCE=0
ENVS=()
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    llmcompressor|modelopt) ENVS+=("$a") ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (expected --force, llmcompressor, modelopt)" >&2; exit 2 ;;
  esac
done
[ ${#ENVS[@]} -eq 0 ] && ENVS=(llmcompressor modelopt)

pick_python() {
  local c
  for c in "${PYTHON:-}" python3.11 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$c"; return 0
    fi
  done
  echo "need Python 3.11 (set PYTHON=...)" >&2; return 1
}
PY="$(pick_python)"

tool_check() {  # python code that must import for the env to count as ready
  case "$1" in
    llmcompressor) echo 'import torch, llmcompressor, compressed_tensors, transformers, gensim; from llmcompressor import oneshot; from llmcompressor.modifiers.quantization import GPTQModifier' ;;
    modelopt) echo 'import torch, transformers, gensim, modelopt; import modelopt.torch.quantization as mtq' ;;
  esac
}

tool_versions() {
  case "$1" in
    llmcompressor) echo 'import torch, transformers, llmcompressor, compressed_tensors, gensim; print(f"llmcompressor {llmcompressor.__version__}  compressed-tensors {compressed_tensors.__version__}  transformers {transformers.__version__}  torch {torch.__version__}  gensim {gensim.__version__}")' ;;
    modelopt) echo 'import torch, transformers, modelopt, gensim; print(f"nvidia-modelopt {modelopt.__version__}  transformers {transformers.__version__}  torch {torch.__version__}  gensim {gensim.__version__}")' ;;
  esac
}

packages() {
  case "$1" in
    llmcompressor) echo "${LLMC_PKGS[@]}" ;;
    modelopt) echo "${MODELOPT_PKGS[@]}" ;;
  esac
}

quiet_py() { "$@" >/dev/null 2>&1; }

setup_env() {
  local name="$1" venv="$VENVS/$1"
  local py="$venv/bin/python"
  echo "== $name ($venv)"
  if [ "$FORCE" = 1 ] && [ -d "$venv" ]; then
    echo "   --force: removing $venv"
    rm -rf "$venv"
  fi
  if [ -x "$py" ] && quiet_py "$py" -c "$(tool_check "$name")"; then
    echo "   $name already imports: skipping its install"
  else
    [ -x "$py" ] || "$PY" -m venv "$venv"
    # shellcheck disable=SC2046
    "$py" -m pip install $(packages "$name") "$TORCH_PIN"
    "$py" -c "$(tool_check "$name")"
  fi
  if [ -f "$ROOT/pyproject.toml" ]; then
    if quiet_py "$py" -c 'import leanlm' && [ "$FORCE" = 0 ]; then
      echo "   leanlm already importable"
    else
      "$py" -m pip install --no-deps -e "$ROOT"
    fi
  else
    echo "   note: $ROOT has no pyproject.toml: leanlm not installed (peer scripts will use bench/peers/_ppl.py)"
  fi
  echo "   versions: $("$py" -c "$(tool_versions "$name")" 2>/dev/null | tail -n 1)"
  "$py" -c 'import leanlm; print("   leanlm", leanlm.__version__, "from", leanlm.__file__)' 2>/dev/null || true
}

mkdir -p "$VENVS"
for e in "${ENVS[@]}"; do
  setup_env "$e"
done
