"""Benchmark suite of fusedrnn: ``python -m fusedrnn.bench --help``.

One harness (``harness``) times every (config, backend) against torch.nn in the same process,
checks accuracy against float64 on the same inputs and estimates the device floor; ``configs``
holds the suites, ``report`` the table / JSON / markdown / plots.  ``benchmarks/`` (pytest-benchmark)
is built on the same harness.
"""

from .configs import SUITES, BenchConfig, suite
from .harness import Case, TimingOptions, default_backends, environment, floor_estimate, run_suite

__all__ = [
    "BenchConfig",
    "Case",
    "SUITES",
    "TimingOptions",
    "default_backends",
    "environment",
    "floor_estimate",
    "run_suite",
    "suite",
    "main",
]


def main(argv=None) -> int:
    from .__main__ import main as _main  # noqa: PLC0415

    return _main(argv)
