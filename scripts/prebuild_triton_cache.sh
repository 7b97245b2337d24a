#!/usr/bin/env bash
# Compiles here, without a GPU, the Triton kernels that scripts/gpu_check.sh launches (the standard
# benchmark suite and a representative subset of the @gpu tests' shapes) into a Triton cache for
# an H100/H200 (sm_90), so the GPU window spends no time on JIT compiles (issue 8).  The result
# goes to OUTDIR (default .triton_cache/, git-ignored; name it in the device tool's `carry`) with a
# manifest (triton version, hash of the installed triton, ptxas, kernel sources); gpu_check.sh
# uses it only when that manifest matches the machine it runs on, else a fresh cache.
#
#   scripts/prebuild_triton_cache.sh VENV_PYTHON [OUTDIR]
#
# VENV_PYTHON: a Python with the GPU machine's torch and triton (torch 2.11.0 + triton 3.6.0, the
#   side venv of scripts/prebuild_gpu_ext.sh); its triton must be the same build as the GPU
#   machine's, since the installed triton's files are part of every cache key.
# How it works and what is verified: tools/triton_cache.py.  About 5-10 minutes on 2 cores.
set -euo pipefail
PY=${1:?usage: $0 VENV_PYTHON [OUTDIR]}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR=${2:-$ROOT/.triton_cache}
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
unset TRITON_INTERPRET
"$PY" "$ROOT/tools/triton_cache.py" build "$OUTDIR" ${TRITON_CACHE_BUILD_ARGS:-}
# a fresh process repeating the launches must find every kernel in the cache
"$PY" "$ROOT/tools/triton_cache.py" verify "$OUTDIR"
du -sh "$OUTDIR"
