"""Forward and forward+backward of every (config, backend) with pytest-benchmark.

The callables are ``fusedrnn.bench.harness.Case.forward`` / ``forward_backward``: one call on the
next of a few rotating input sets, then ``torch.cuda.synchronize`` (on CUDA), so pytest-benchmark's
wall-clock timer measures device time.  Groups are "<config> <pass>", so each group's table compares
the backends of one config.  Accuracy checks and ratios are the CLI's job (``python -m
fusedrnn.bench``); the floor estimate is attached as extra_info.  Settings: see conftest.py.
"""

import fnmatch
import os

import pytest
import torch

from fusedrnn.bench import configs as C
from fusedrnn.bench import harness

DEVICE = torch.device(os.environ.get("FUSEDRNN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
WARMUP = 3 if DEVICE.type == "cuda" else 1
N_SETS = 4 if DEVICE.type == "cuda" else 2


def bench_configs():
    name = os.environ.get("FUSEDRNN_BENCH_SUITE") or ("standard" if DEVICE.type == "cuda" else "tiny")
    cfgs = C.suite(name, DEVICE.type)
    globs = os.environ.get("FUSEDRNN_BENCH_FILTER", "").split()
    if globs:
        cfgs = [c for c in cfgs if any(fnmatch.fnmatch(c.name, g) for g in globs)]
    return cfgs


def bench_backends():
    return os.environ.get("FUSEDRNN_BENCH_BACKENDS", "").split() or harness.default_backends(DEVICE)


class _Cases:
    """One harness.Case per (config, backend); only the current config's cases are kept alive."""

    def __init__(self):
        self.config = None
        self.cases = {}
        self.reference = self.inputs = self.unavailable = None

    def get(self, cfg, backend):
        if self.unavailable is None:
            try:
                self.unavailable = harness._fusedrnn().available_backends()
            except Exception as e:  # noqa: BLE001
                self.unavailable = {b: f"fusedrnn does not import: {e}" for b in ("triton", "cuda", "cpp", "reference")}
        reason = harness.skip_reason(cfg, backend, DEVICE, self.unavailable)
        if reason:
            pytest.skip(reason)
        if self.config != cfg.name:
            self.cases.clear()
            self.reference = self.inputs = None
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            self.config = cfg.name
            self.reference = harness.torch_module(cfg, DEVICE)
            self.inputs = [harness.make_inputs(cfg, DEVICE, 1000 * (k + 1)) for k in range(N_SETS)]
        if backend not in self.cases:
            try:
                case = harness.Case(cfg, backend, DEVICE, reference=self.reference, inputs=self.inputs)
                case.forward()  # the first call resolves the backend (and compiles kernels)
            except (NotImplementedError, ValueError) as e:
                if isinstance(e, NotImplementedError) or "does not support" in str(e):
                    pytest.skip(f"{backend}: {e}")
                raise
            self.cases[backend] = case
        return self.cases[backend]


_CASES = _Cases()

PARAMS = [
    pytest.param(cfg, backend, pass_, id=f"{cfg.name}-{backend}-{pass_}")
    for cfg in bench_configs()
    for backend in bench_backends()
    for pass_ in ("fwd", "fwdbwd")
]


@pytest.mark.parametrize("cfg, backend, pass_", PARAMS)
def test_rnn(benchmark, cfg, backend, pass_):
    case = _CASES.get(cfg, backend)
    fn = case.forward if pass_ == "fwd" else case.forward_backward
    for _ in range(WARMUP):
        fn()
    benchmark.group = f"{cfg.name} {pass_}"
    rates = harness.device_rates(harness.device_name(DEVICE)) if DEVICE.type == "cuda" else None
    floor = harness.floor_estimate(cfg, rates, case.inputs[0].tokens, harness.tf32_enabled(cfg, DEVICE))
    key = "fwd_s" if pass_ == "fwd" else "fwdbwd_s"
    benchmark.extra_info.update(
        config=cfg.name, backend=backend, device=harness.device_name(DEVICE), dtype=cfg.dtype,
        tokens=case.inputs[0].tokens, floor_ms=None if floor[key] is None else floor[key] * 1e3,
    )
    benchmark(fn)
