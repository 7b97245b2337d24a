#!/usr/bin/env bash
# The one-call GPU check (GUIDE section 6): run it first on any GPU machine, then fix what it shows.
#
#   scripts/gpu_check.sh OUTDIR
#
# Steps (each under `timeout`, logged to OUTDIR/<step>.log, the run continues past failures):
#   info       nvidia-smi, compiler / torch / triton versions, commit            (budget  20 s)
#   build      setup.py build_ext --inplace, MAX_JOBS=16, SASS for this GPU only (budget 200 s)
#   import     fusedrnn.available_backends()                                     (budget  30 s)
#   pytest     pytest -m gpu tests/  (GPU tests of every backend)                (budget 150 s)
#   smoke      scripts/sanitizer_smoke.py --quick without sanitizer (fills the
#              Triton cache so the sanitizer runs do not compile)                (budget  60 s)
#   memcheck   compute-sanitizer --tool memcheck over the smoke script           (budget  90 s)
#   racecheck  compute-sanitizer --tool racecheck over the smoke script          (budget  90 s)
#   bench      python -m fusedrnn.bench --suite standard (JSON, PNG, markdown)   (the rest, >= 120 s)
# A step's timeout is its budget, cut so that the steps after it keep their minimum (import 15,
# pytest 60, smoke 30, memcheck 40, racecheck 40, bench 120 s) within GPU_CHECK_BUDGET_S (default 510 s),
# so the whole script ends in under 9 minutes; time a step does not use goes to the later ones.
# The benchmark stops starting rows 30 s before its timeout and writes its JSON after every config.
#
# It never changes clocks, power limits, MIG or any other setting of the card (read-only queries).
#
# Environment: PYTHON (default: python on PATH), CUDA_HOME (default /usr/local/cuda),
#   GPU_CHECK_BUDGET_S, GPU_CHECK_VERBOSE=1 (stream full logs, default: the tail of each),
#   FUSEDRNN_CUDA_ARCHS (default: this GPU's, e.g. 90a on H100), GPU_CHECK_SKIP="memcheck racecheck",
#   GPU_CHECK_BENCH_ARGS (extra arguments for the benchmark CLI), GPU_CHECK_T_<STEP> (a step's budget,
#   e.g. GPU_CHECK_T_PYTEST=240), GPU_CHECK_SANITIZER_ARGS (extra compute-sanitizer options).
set -u -o pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-510}
DEADLINE=$((START + BUDGET))
VERBOSE=${GPU_CHECK_VERBOSE:-0}
SKIP=" ${GPU_CHECK_SKIP:-} "

PY=${PYTHON:-$(command -v python || command -v python3)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -d "$CUDA_HOME/bin" ] && export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS=16
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # real GPU kernels, never the interpreter
if [ -z "${FUSEDRNN_CUDA_ARCHS:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
  case "$cap" in
    90) export FUSEDRNN_CUDA_ARCHS="90a" ;;
    [0-9][0-9]|[0-9][0-9][0-9]) export FUSEDRNN_CUDA_ARCHS="$cap" ;;
  esac
fi

SANITIZER=$(command -v compute-sanitizer || true)
for c in "$CUDA_HOME/bin/compute-sanitizer" "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
  [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER="$c"
done

SUMMARY=()
FAILED=0

# step NAME BUDGET_S RESERVE_S COMMAND...   (RESERVE_S: seconds kept for the steps after this one)
step() {
  local name=$1 budget=$2 reserve=$3
  shift 3
  local override="GPU_CHECK_T_${name^^}"  # e.g. GPU_CHECK_T_PYTEST=240
  budget=${!override:-$budget}
  local log="$OUT/$name.log"
  local now left t t0 rc dt status
  now=$(date +%s)
  left=$((DEADLINE - now - reserve))
  t=$budget
  [ "$left" -lt "$t" ] && t=$left
  if [[ "$SKIP" == *" $name "* ]]; then
    SUMMARY+=("$(printf '%-10s SKIP     (GPU_CHECK_SKIP)' "$name")")
    return 0
  fi
  if [ "$t" -lt 5 ]; then
    SUMMARY+=("$(printf '%-10s SKIP     (no time left)' "$name")")
    return 0
  fi
  echo
  echo "=== [$name] $(date -u +%H:%M:%S) timeout ${t}s: $*"
  t0=$(date +%s)
  if [ "$VERBOSE" = "1" ]; then
    timeout --kill-after=5 "$t" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    timeout --kill-after=5 "$t" bash -c '"$@"' "$name" "$@" >"$log" 2>&1
    rc=$?
    if [ "$name" = "info" ]; then cat "$log"; else tail -n "${GPU_CHECK_TAIL:-25}" "$log"; fi
  fi
  dt=$(($(date +%s) - t0))
  case $rc in
    0) status="PASS" ;;
    124|137) status="TIMEOUT"; FAILED=1 ;;
    *) status="FAIL"; FAILED=1 ;;
  esac
  SUMMARY+=("$(printf '%-10s %-8s rc=%-3s %4ss of %4ss  %s' "$name" "$status" "$rc" "$dt" "$t" "$log")")
  echo "=== [$name] $status (rc=$rc) in ${dt}s"
  return 0
}

info() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if git rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (dirty)')"
  else
    echo "commit: unknown (no git repository here)"
  fi
  echo "python: $PY"
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,mig.mode.current \
    --format=csv 2>/dev/null
  nvcc --version 2>&1 | tail -n 2
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  echo "FUSEDRNN_CUDA_ARCHS=${FUSEDRNN_CUDA_ARCHS:-} MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
print("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32)
EOF
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|pytest-benchmark|matplotlib|tqdm|pybind11|ninja|setuptools) " || true
}

build() {
  "$PY" setup.py build_ext --inplace && "$PY" -c "import fusedrnn._C as c; print('built', c.__file__)"
}

import_check() {
  "$PY" - <<'EOF'
import fusedrnn, torch
print("fusedrnn", fusedrnn.__version__, "from", fusedrnn.__file__)
bad = {}
for name, reason in fusedrnn.available_backends().items():
    print(f"  {name:10s} {'available' if reason is None else reason}")
    if name in ("cuda", "triton") and reason is not None:
        bad[name] = reason
raise SystemExit(1 if bad else 0)
EOF
}

sanitize() {  # sanitize TOOL
  if [ -z "$SANITIZER" ]; then
    echo "compute-sanitizer not found (PATH, $CUDA_HOME/bin)"
    return 3
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$1" --error-exitcode 99 --print-limit 30 \
    ${GPU_CHECK_SANITIZER_ARGS:-} "$PY" scripts/sanitizer_smoke.py --quick
}

bench() {
  local t=$1
  local tb=$((t > 90 ? t - 30 : t * 2 / 3))
  "$PY" -m fusedrnn.bench --suite standard --device cuda --time-budget "$tb" --no-progress \
    --json "$OUT/bench.json" --plot "$OUT/speedup.png" --markdown "$OUT/bench.md" ${GPU_CHECK_BENCH_ARGS:-}
  local rc=$?
  if [ ! -f "$OUT/bench.md" ] && [ -f "$OUT/bench.json" ]; then  # killed: render what was saved
    "$PY" -m fusedrnn.bench --from-json "$OUT/bench.json" --plot "$OUT/speedup.png" --markdown "$OUT/bench.md"
  fi
  return $rc
}

# the steps run in child shells (under timeout): export what they use
export -f info build import_check sanitize bench
export PY OUT SANITIZER

echo "fusedrnn GPU check -> $OUT (budget ${BUDGET}s)"
step info      20 395 info
step build    200 305 build
step import    30 290 import_check
step pytest   150 230 "$PY" -m pytest -m gpu tests/ -q -rfEs -p no:cacheprovider --durations=15 \
                          --junitxml="$OUT/pytest_gpu.xml"
step smoke     60 200 "$PY" scripts/sanitizer_smoke.py --quick
step memcheck  90 160 sanitize memcheck
step racecheck 90 120 sanitize racecheck
bench_t=$((DEADLINE - $(date +%s)))
step bench "$bench_t" 0 bench "$bench_t"
# a killed benchmark leaves its JSON (written after every config): render it
if [ ! -f "$OUT/bench.md" ] && [ -f "$OUT/bench.json" ]; then
  "$PY" -m fusedrnn.bench --from-json "$OUT/bench.json" --plot "$OUT/speedup.png" --markdown "$OUT/bench.md" \
    >"$OUT/bench_render.log" 2>&1
fi

{
  echo
  echo "==================== fusedrnn GPU check summary ($(( $(date +%s) - START ))s) ===================="
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  [ -f "$OUT/bench.md" ] && echo && sed -n '1,40p' "$OUT/bench.md"
} | tee "$OUT/summary.txt"
exit $FAILED
