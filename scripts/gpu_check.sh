#!/usr/bin/env bash
# The one-call GPU check (GUIDE section 6): run it first on any GPU machine, then fix what it shows.
#
#   scripts/gpu_check.sh OUTDIR
#
# Steps (each under `timeout`, logged to OUTDIR/<step>.log, the run continues past failures; the
# budget/minimum table is STEPS below):
#   info       nvidia-smi, compiler / torch / triton versions, commit
#   build      the carried pre-built extension (.prebuilt/, scripts/prebuild_gpu_ext.sh) when its
#              source hash matches, else setup.py build_ext --inplace, MAX_JOBS=16, SASS for this GPU
#   import     fusedrnn.available_backends()
#   extra      scripts/gpu_extra_checks.py: graph capture, sync-debug, TF32 new API, proj fit,
#              large batch, int64 offsets, barrier stress (JSON in OUTDIR/extra.json)
#   pytest     pytest -m gpu tests/  (GPU tests of every backend)
#   smoke      scripts/sanitizer_smoke.py --quick without sanitizer (fills the
#              Triton cache so the sanitizer runs do not compile)
#   memcheck   compute-sanitizer --tool memcheck over the smoke script
#   racecheck  compute-sanitizer --tool racecheck over the smoke script
#   bench      python -m fusedrnn.bench --suite standard (JSON, PNG, markdown), the time left
# Triton kernels come from the carried pre-compiled cache (.triton_cache/, made here by
# scripts/prebuild_triton_cache.sh) when its manifest matches this machine's triton, ptxas and the
# kernel sources, else from a fresh cache (compiled on first launch); the summary says which and
# how many kernels were still compiled here.
# A step's timeout is its budget, cut so that the steps after it keep their minimums within
# GPU_CHECK_BUDGET_S (default 510 s), so the whole script ends in under 9 minutes; time a step
# does not use goes to the later ones.
# The benchmark stops starting rows 30 s before its timeout and writes its JSON after every config.
#
# It never changes clocks, power limits, MIG or any other setting of the card (read-only queries).
#
# Environment: PYTHON (default: python on PATH), CUDA_HOME (default /usr/local/cuda),
#   GPU_CHECK_DRY_RUN=1 (no GPU: every step replaced by a listing/collection; CI runs this),
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
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
if [ -z "${FUSEDRNN_CUDA_ARCHS:-}" ]; then
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
  echo "source tree: $(git ls-files -z 2>/dev/null | xargs -0 cat 2>/dev/null | sha256sum | cut -c1-16) (sha256 of the tracked files' contents)"
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
print("cudnn.rnn.fp32_precision", getattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision", None), "matmul precision", torch.get_float32_matmul_precision())
EOF
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|pytest|pytest-benchmark|matplotlib|tqdm|pybind11|ninja|setuptools) " || true
}

build() {
  # A pre-built extension (scripts/prebuild_gpu_ext.sh, carried as .prebuilt/) is used when it was
  # built from exactly these sources and imports here; else build (about 200 s with MAX_JOBS=16).
  local want have
  want=$(bash scripts/source_hash.sh)
  have=$(cat .prebuilt/source.sha256 2>/dev/null || true)
  if [ -n "$have" ] && [ "$have" = "$want" ] && ls .prebuilt/_C*.so >/dev/null 2>&1; then
    cp .prebuilt/_C*.so python/fusedrnn/
    cat .prebuilt/built_with.txt 2>/dev/null
    if "$PY" -c "import fusedrnn._C as c; print('pre-built', c.__file__, c.build_info())"; then
      return 0
    fi
    echo "pre-built extension does not import here: building"
    rm -f python/fusedrnn/_C*.so
  else
    echo "no matching pre-built extension (want $want, have ${have:-none}): building"
  fi
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
# Triton's cache: the carried one when tools/triton_cache.py finds its manifest matching (it also
# points the entries at this folder), else a fresh one; a stale entry would never be hit anyway.
TCACHE="$ROOT/.triton_cache"
case "$cap" in [0-9]*) tc_cap=(--capability "$cap") ;; *) tc_cap=() ;; esac
if timeout 120 "$PY" tools/triton_cache.py check "$TCACHE" "${tc_cap[@]}"; then
  TCACHE_KIND="carried"
else
  TCACHE="$(mktemp -d "${TMPDIR:-/tmp}/fusedrnn_triton_cache.XXXXXX")"
  TCACHE_KIND="fresh"
  trap 'rm -rf "$TCACHE"' EXIT  # ours, and gone with the machine anyway
fi
export TRITON_CACHE_DIR="$TCACHE"
tcache_entries() { find "$TRITON_CACHE_DIR" -mindepth 2 -maxdepth 2 -name '__grp__*.json' 2>/dev/null | wc -l; }
TCACHE_N0=$(tcache_entries)
echo "triton cache: $TCACHE_KIND, $TRITON_CACHE_DIR ($TCACHE_N0 kernels)"
# name budget minimum: a step gets at most its budget, and leaves the later steps their minimums
STEPS=(
  "info 20 5"
  "build 200 15"
  "import 30 10"
  "extra 90 30"
  "pytest 150 60"
  "smoke 60 20"
  "memcheck 90 30"
  "racecheck 60 20"
  "bench 0 90"
)
reserve_after() {  # sum of the minimums of the steps after $1
  local seen=0 sum=0 n b m
  for entry in "${STEPS[@]}"; do
    read -r n b m <<<"$entry"
    if [ "$seen" = 1 ] && [[ "$SKIP" != *" $n "* ]]; then sum=$((sum + m)); fi  # skipped steps keep nothing
    [ "$n" = "$1" ] && seen=1
  done
  echo "$sum"
}
budget_of() { local n b m; for entry in "${STEPS[@]}"; do read -r n b m <<<"$entry"; [ "$n" = "$1" ] && echo "$b"; done; }
run_step() { step "$1" "$(budget_of "$1")" "$(reserve_after "$1")" "${@:2}"; }

# one line per test as it ends (a step killed at its timeout still shows how far it got), and a
# per-test timeout where pytest-timeout is installed (the GPU image has it), so one hang cannot
# take the whole step
PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(-p timeout --timeout "${GPU_CHECK_TEST_TIMEOUT:-120}")
# Triton compiles one kernel at a time per process and the GPU tests are small: with pytest-xdist
# (on the GPU image) several workers share the GPU and the 16 host cores compile in parallel.
# Correctness tests only: the benchmark runs alone.  Persistent kernels are cooperative launches,
# and kernels of different processes do not share the SMs at once without MPS, so co-residency holds.
PYTEST_XDIST=()
"$PY" -c "import xdist" 2>/dev/null && PYTEST_XDIST=(-n "${GPU_CHECK_PYTEST_WORKERS:-6}")

if [ "${GPU_CHECK_DRY_RUN:-0}" = "1" ]; then
  # CI (no GPU): the control flow, budgets and summary, and every script's argument parsing and
  # imports, with each device-only step replaced by a listing / collection, so the script cannot rot
  run_step info info
  run_step build bash -c 'echo "dry run: source hash $(bash scripts/source_hash.sh); would build or use .prebuilt/"'
  run_step import "$PY" -c "import fusedrnn; print(fusedrnn.available_backends())"
  run_step extra "$PY" scripts/gpu_extra_checks.py --list
  run_step pytest "$PY" -m pytest -m gpu tests/ --collect-only -q -p no:cacheprovider
  run_step smoke "$PY" scripts/sanitizer_smoke.py --list
  run_step memcheck bash -c 'declare -F sanitize >/dev/null && echo "dry run: would run compute-sanitizer --tool memcheck"'
  run_step racecheck bash -c 'declare -F sanitize >/dev/null && echo "dry run: would run compute-sanitizer --tool racecheck"'
  step bench 60 0 "$PY" -m fusedrnn.bench --suite standard --device cpu --list
else
  run_step info info
  run_step build build
  run_step import import_check
  run_step extra "$PY" scripts/gpu_extra_checks.py --json "$OUT/extra.json"
  run_step pytest "$PY" -m pytest -m gpu tests/ -v --tb=short -rfEs -p no:cacheprovider --durations=15 \
                            "${PYTEST_TIMEOUT[@]}" "${PYTEST_XDIST[@]}" --junitxml="$OUT/pytest_gpu.xml"
  run_step smoke "$PY" scripts/sanitizer_smoke.py --quick
  run_step memcheck sanitize memcheck
  run_step racecheck sanitize racecheck
  bench_t=$((DEADLINE - $(date +%s)))
  step bench "$bench_t" 0 bench "$bench_t"
fi
# a killed benchmark leaves its JSON (written after every config): render it
if [ ! -f "$OUT/bench.md" ] && [ -f "$OUT/bench.json" ]; then
  "$PY" -m fusedrnn.bench --from-json "$OUT/bench.json" --plot "$OUT/speedup.png" --markdown "$OUT/bench.md" \
    >"$OUT/bench_render.log" 2>&1
fi

{
  echo
  echo "==================== fusedrnn GPU check summary ($(( $(date +%s) - START ))s) ===================="
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  tc_n=$(tcache_entries)
  echo "triton cache: $TCACHE_KIND ($TCACHE_N0 kernels carried), $((tc_n - TCACHE_N0)) compiled during this check"
  [ -f "$OUT/bench.md" ] && echo && sed -n '1,40p' "$OUT/bench.md"
} | tee "$OUT/summary.txt"
exit $FAILED
