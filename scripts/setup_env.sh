#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs fusedrnn with everything its tests and benchmarks need.
# Sourced by scripts/test.sh and scripts/bench.sh; needs only a Python >= 3.10 on PATH.
#   FUSEDRNN_PYTHON    interpreter to create the venv with (default: python3)
#   FUSEDRNN_TORCH     torch requirement (default: torch==2.14.1, the CUDA 13.0 build, so the CUDA
#                      extension compiles wherever nvcc 13 is present)
#   FUSEDRNN_SKIP_BUILD=1  install without compiling the C++/CUDA extension
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${FUSEDRNN_PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null
echo "[setup] installing torch and dependencies"
"$VPY" -m pip install -q "${FUSEDRNN_TORCH:-torch==2.14.1}" numpy pybind11 ninja setuptools wheel \
  pytest pytest-benchmark expecttest matplotlib tqdm
# CUDA home: /usr/local/bin/nvcc may be a wrapper script, so do not let torch guess from PATH.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "[setup] building and installing fusedrnn (CUDA_HOME=${CUDA_HOME:-none}, MAX_JOBS=${MAX_JOBS:-auto})"
start=$(date +%s)
"$VPY" -m pip install -q --no-build-isolation --no-deps -e . 
echo "[setup] fusedrnn installed in $(( $(date +%s) - start )) s"
"$VPY" -c "import fusedrnn, json; print('[setup] backends:', json.dumps({k: (v or 'ok') for k, v in fusedrnn.available_backends().items()}, indent=1))"
