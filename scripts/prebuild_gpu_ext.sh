#!/usr/bin/env bash
# Builds fusedrnn._C here for the GPU machine, so scripts/gpu_check.sh spends no device time on
# compiling (GUIDE section 6).  The result goes to .prebuilt/ (git-ignored; name it in the device
# tool's `carry`) with the hash of the sources it was built from; gpu_check.sh uses it only when
# that hash matches the checkout it runs on, else it builds there.
#
#   scripts/prebuild_gpu_ext.sh VENV_PYTHON [ARCHS]
#
# VENV_PYTHON: a Python with the GPU machine's torch (e.g. a side venv made with
#   python3.12 -m venv V && V/bin/pip install torch==2.11.0 numpy pybind11 ninja setuptools)
# ARCHS: FUSEDRNN_CUDA_ARCHS for the build (default 90a: H100/H200 SASS + PTX).
set -euo pipefail
PY=${1:?usage: $0 VENV_PYTHON [ARCHS]}
ARCHS=${2:-90a}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# a private copy of the tree: the build writes build/ and python/fusedrnn/_C*.so
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 tar cf - --) | tar xf - -C "$WORK"
(cd "$WORK" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} FUSEDRNN_CUDA_ARCHS="$ARCHS" MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1) || { tail -n 40 "$WORK/build.log"; exit 1; }
mkdir -p "$ROOT/.prebuilt"
rm -f "$ROOT"/.prebuilt/_C*.so
cp "$WORK"/python/fusedrnn/_C*.so "$ROOT/.prebuilt/"
bash "$ROOT/scripts/source_hash.sh" "$WORK" >"$ROOT/.prebuilt/source.sha256"
"$PY" -c "import torch, sys; print(torch.__version__, sys.version.split()[0])" >"$ROOT/.prebuilt/built_with.txt"
echo "$ARCHS" >>"$ROOT/.prebuilt/built_with.txt"
ls -la "$ROOT/.prebuilt"
