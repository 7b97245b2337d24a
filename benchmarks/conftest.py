"""pytest-benchmark suite on the fusedrnn.bench harness (not part of the CI test run: tests/ is).

    pytest benchmarks/ --benchmark-only                      # CPU: tiny configs; GPU: standard suite
    FUSEDRNN_BENCH_SUITE=quick FUSEDRNN_BENCH_BACKENDS="torch triton" pytest benchmarks/ --benchmark-only
    FUSEDRNN_BENCH_FILTER='lstm-h768*' pytest benchmarks/ --benchmark-only --benchmark-json out.json

Environment:
    FUSEDRNN_BENCH_SUITE     suite name (default: standard on CUDA, tiny on CPU)
    FUSEDRNN_BENCH_BACKENDS  space-separated backends (default: fusedrnn.bench.default_backends)
    FUSEDRNN_BENCH_FILTER    space-separated globs over config names
    FUSEDRNN_BENCH_DEVICE    cpu / cuda (default: cuda if available)
"""

import os

import torch

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # pragma: no cover
    collect_ignore = ["test_bench.py"]

_device = os.environ.get("FUSEDRNN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if _device == "cpu" and "triton" in os.environ.get("FUSEDRNN_BENCH_BACKENDS", "").split():
    # Triton on CPU is the interpreter; the variable must be set before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
