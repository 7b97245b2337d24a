#!/usr/bin/env bash
# The test command (README): sets up ./.venv, builds fusedrnn, checks every kernel compiles for
# sm_80/sm_90, then runs the test suite (Triton kernels under the interpreter on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup_env.sh
VPY="$ROOT/.venv/bin/python"
status=0
if [ -f tools/triton_aot.py ]; then
  echo "[test] AOT-compiling every Triton kernel variant for sm_80 and sm_90"
  "$VPY" tools/triton_aot.py || status=1
fi
if [ -f tools/ptxas_report.py ]; then
  echo "[test] ptxas resource report of the CUDA extension"
  "$VPY" tools/ptxas_report.py || status=1
fi
if [ -f tools/cmake_check.sh ] && [ "${FUSEDRNN_SKIP_CMAKE:-0}" != "1" ]; then
  echo "[test] CMake build of the same sources"
  bash tools/cmake_check.sh || status=1
fi
echo "[test] pytest"
set +e
"$VPY" -m pytest tests/ -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] pytest collected no tests: failing"
  rc=1
fi
if [ "$rc" -ne 0 ] || [ "$status" -ne 0 ]; then
  echo "[test] FAILED (pytest rc=$rc, compile checks status=$status)"
  exit 1
fi
echo "[test] all green"
