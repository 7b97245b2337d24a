#!/usr/bin/env bash
# Compile smoke test of the CUDA kernels (no GPU needed): compiles each csrc/cuda/*.cu for sm_80 and
# sm_90a with ptxas -v and prints registers / spills per kernel.  Fails on a compile error or on
# any spill in a kernel.  Usage: tools/cuda_compile_check.sh [file.cu ...]   (default: all)
# Env: CUDA_HOME (default /usr/local/cuda), PYTHON (default ./.venv/bin/python, else python3), NVCC_STD (default c++20,
# torch >= 2.13 headers need C++20), OUT (object/log folder, default a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; fi
PYTHON=${PYTHON:-python3}
NVCC_STD=${NVCC_STD:-c++20}
OUT=${OUT:-$(mktemp -d)}
TORCH_INC=$("$PYTHON" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# CUDA library headers shipped as pip wheels (cusparse.h etc. when the toolkit lacks them)
EXTRA_INC=$("$PYTHON" - <<'PY'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
print(" ".join("-I" + d for d in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))))
PY
)
FILES=("$@")
if [ ${#FILES[@]} -eq 0 ]; then FILES=(csrc/cuda/*.cu); fi
status=0
for f in "${FILES[@]}"; do
  b=$(basename "$f" .cu)
  echo "== $f"
  if ! "$CUDA_HOME/bin/nvcc" -c "$f" -o "$OUT/$b.o" -I csrc/include -I "$TORCH_INC" \
      -I "$TORCH_INC/torch/csrc/api/include" -I "$PY_INC" $EXTRA_INC \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
      -std="$NVCC_STD" -O3 --expt-relaxed-constexpr -DFUSEDRNN_WITH_CUDA -Xptxas -v \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ -Xcompiler -fPIC > "$OUT/$b.log" 2>&1; then
    grep -E "error" "$OUT/$b.log" | head -20
    status=1
    continue
  fi
  # one line per kernel and arch: regs, spills
  awk '/Compiling entry function/ {name=$7; arch=$9; gsub(/\047/, "", name); gsub(/\047/, "", arch)}
       /spill stores/ {spill=$5"/"$9}
       /Used [0-9]+ registers/ {print "  " arch, $5, "regs, spill", spill, name}' "$OUT/$b.log" \
    | c++filt | sed -E "s/fusedrnn::cuda_detail::(\(anonymous namespace\)::)?//g" | cut -c1-160
  if grep -qE "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/$b.log"; then
    echo "  SPILLS in $f"
    status=1
  fi
done
exit $status
