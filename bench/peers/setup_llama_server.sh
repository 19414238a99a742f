#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` (the serving baseline of bench/serve.py, issue 18).
#
# The sources are the llama.cpp tree vendored in the llama-cpp-python sdist on PyPI, so nothing is
# fetched from anywhere but PyPI and the server is the same llama.cpp the project's llama-cpp-python
# wheel wraps (llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp@0c1e57098, ggml 0.25.3).
#
# Usage: bash bench/peers/setup_llama_server.sh [--force]
#   --force   rebuild from scratch
# Environment: LLAMA_SERVER_DIR (default ~/.cache/leanlm/peers/llama-server), PIP (default the
#   project venv's pip <repo>/.venv/bin/pip, else python3 -m pip), JOBS (default 2).
#
# Result: $LLAMA_SERVER_DIR/bin/llama-server and $LLAMA_SERVER_DIR/VERSION (one line:
#   "llama-cpp-python==X llama.cpp@COMMIT ggml=V"). Idempotent: exits at once if both exist.
#
# Build choices: CPU only, -DGGML_NATIVE=ON (tuned for this machine's CPU, like the wheel built from
# source here), Release; no web UI (LLAMA_BUILD_UI=OFF and LLAMA_USE_PREBUILT_UI=OFF, the latter
# would download UI assets from Hugging Face), no OpenSSL (plain HTTP on localhost), no tests or
# examples. LLAMA_CURL no longer exists in this version (it is deprecated and ignored).
set -euo pipefail

VERSION="0.3.36"          # llama-cpp-python sdist that carries the llama.cpp sources
LLAMA_COMMIT="0c1e57098"  # from that sdist's CHANGELOG ("update llama.cpp to ggml-org/llama.cpp@...")

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DEST="${LLAMA_SERVER_DIR:-$HOME/.cache/leanlm/peers/llama-server}"
JOBS="${JOBS:-2}"
if [ -z "${PIP:-}" ]; then
  if [ -x "$ROOT/.venv/bin/pip" ]; then PIP="$ROOT/.venv/bin/pip"; else PIP="python3 -m pip"; fi
fi

FORCE=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (expected --force)" >&2; exit 2 ;;
  esac
done

if [ "$FORCE" = 0 ] && [ -x "$DEST/bin/llama-server" ] && [ -s "$DEST/VERSION" ]; then
  echo "llama-server already built: $DEST/bin/llama-server ($(cat "$DEST/VERSION"))"
  exit 0
fi
for tool in cmake c++ tar; do
  command -v "$tool" >/dev/null 2>&1 || { echo "need $tool on PATH to build llama-server (install it, e.g. apt-get install cmake g++)" >&2; exit 1; }
done

mkdir -p "$DEST"
WORK="$DEST/src"
rm -rf "$WORK" "$DEST/bin" "$DEST/VERSION"
mkdir -p "$WORK"

echo "downloading llama-cpp-python==$VERSION sdist from PyPI"
$PIP download "llama-cpp-python==$VERSION" --no-deps --no-binary :all: -d "$WORK" -q
tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$SRC/tools/server/server.cpp" ] || { echo "no llama.cpp server sources in the sdist ($SRC)" >&2; exit 1; }
GGML_VER="$(sed -n 's/^set(GGML_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\))/\2/p' "$SRC/ggml/CMakeLists.txt" | paste -sd. -)"

cmake -B "$WORK/build" -S "$SRC" \
  -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_COMMIT="$LLAMA_COMMIT"
cmake --build "$WORK/build" --target llama-server -j "$JOBS"

mkdir -p "$DEST/bin.tmp"
cp "$WORK/build/bin/llama-server" "$DEST/bin.tmp/llama-server"
"$DEST/bin.tmp/llama-server" --version >/dev/null 2>&1 || { echo "built llama-server does not run ($DEST/bin.tmp/llama-server --version)" >&2; exit 1; }
mv "$DEST/bin.tmp" "$DEST/bin"
echo "llama-cpp-python==$VERSION llama.cpp@$LLAMA_COMMIT ggml=$GGML_VER" > "$DEST/VERSION.tmp"
mv "$DEST/VERSION.tmp" "$DEST/VERSION"
rm -rf "$WORK"
echo "built $DEST/bin/llama-server ($(cat "$DEST/VERSION"))"
