"""The one benchmark harness: used by ``python -m fusedrnn.bench`` and by ``benchmarks/`` (pytest-benchmark).

For each (config, backend) it builds the module, checks it against an fp64 run on the same inputs,
then times an inference forward and a forward+backward, and estimates the floor.  ``torch`` rows are
plain ``torch.nn`` modules (cuDNN on CUDA, oneDNN/native on CPU) measured in the same process on the
same inputs and weights; every other backend is ``fusedrnn.<Mode>(..., backend=name)`` with the torch
module's state dict loaded.

What is measured
    fwd_ms       median over repetitions of one inference forward (module.eval(), torch.no_grad())
    fwdbwd_ms    median of forward (train mode) + torch.autograd.grad of every output (random
                 cotangents) with respect to the input, h0, c0 and every parameter
    CUDA timing uses torch.cuda.Event pairs around each repetition after warm-up; CPU timing uses
    the calling thread's CPU time (time.thread_time) for rows on one thread, which on a shared
    machine does not count the time other processes take from it, else time.perf_counter
    (``TimingOptions.clock``).  ``repeat`` > 1 times each row several times, interleaved across the
    backends of a config, and keeps the fastest run's median.  Repetitions rotate over a few independent input sets so caches do not
    flatter a row.  Nothing in the harness changes TF32 flags, clocks or other device settings.

Instruction counts (``--callgrind DIR`` in the CLI): the process runs under valgrind's callgrind and
each row reports ``fwd_ir`` / ``fwdbwd_ir``, the instructions executed per call with one thread:
with scope "ops" (the default) inside fusedrnn's C++ CPU ops only (csrc/cpu: the recurrences and
cells, not Python, not torch's GEMMs); with scope "call" everything the call executes (Python,
dispatch, GEMMs, kernels), for torch.nn rows too, which measures the per-call overhead of the
Python path.  They do not depend on the machine's load, so a change can be compared A/B where
timings on a shared machine cannot.  valgrind does not emulate AVX-512: the counts are those of
the AVX2 kernels (and of MKL's / oneDNN's AVX2 paths).

Correctness: ``max_rel_err`` is the largest relative norm ||a - b|| / ||b|| over the outputs (output
sequence, h_n, c_n; and the inference-forward output) and every gradient (input, h0, c0, each
parameter), where b comes from ``torch.nn`` in float64 run on the row's own first input set with the
row's weights (cast exactly to float64).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ..backends import rnn_tf32_enabled
from . import costmodel
from .configs import BenchConfig

# ====================================================================================== device rates
@dataclasses.dataclass(frozen=True)
class DeviceRates:
    """Peak rates used by the floor estimate (dense, no sparsity; vendor datasheet unless noted).

    hbm_Bps        HBM bandwidth, bytes/s
    l2_Bps         L2 read bandwidth, bytes/s.  NVIDIA publishes none; microbenchmarks of the H100
                   SXM measure about 5.5-7 TB/s, we take an optimistic 12 TB/s so the floor stays a
                   lower bound (it only matters for the per-step h exchange and for weights that
                   do not fit on chip).
    l2_bytes       L2 capacity
    sms            number of SMs
    onchip_per_sm  bytes per SM a persistent kernel can keep W_hh in (registers + shared memory;
                   H100: 256 KiB RF + 228 KiB SMEM, we count 320 KiB as usable for weights)
    flops          FLOP/s per math dtype: "bf16", "fp16" (tensor cores, fp32 accumulate), "tf32",
                   "fp32" (CUDA cores / no TF32), "fp64" (fp64 tensor cores)
    barrier_s      one grid-wide barrier (atomics through L2 + spin), ~1 us
    """

    name: str
    hbm_Bps: float
    l2_Bps: float
    l2_bytes: float
    sms: int
    onchip_per_sm: float
    flops: Dict[str, float]
    barrier_s: float = 1.0e-6
    note: str = ""


_KIB, _MIB = 1024.0, 1024.0 * 1024.0

H100_SXM = DeviceRates(
    name="H100 SXM5", hbm_Bps=3.35e12, l2_Bps=12e12, l2_bytes=50 * _MIB, sms=132,
    onchip_per_sm=320 * _KIB,
    flops={"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12, "fp64": 67e12},
)
H100_PCIE = dataclasses.replace(
    H100_SXM, name="H100 PCIe", hbm_Bps=2.0e12, l2_Bps=10e12, sms=114,
    flops={"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12, "fp64": 51e12},
)
H200 = dataclasses.replace(H100_SXM, name="H200 SXM", hbm_Bps=4.8e12)
A100 = DeviceRates(
    name="A100 SXM4 80GB", hbm_Bps=2.04e12, l2_Bps=5e12, l2_bytes=40 * _MIB, sms=108,
    onchip_per_sm=256 * _KIB,
    flops={"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "fp64": 19.5e12},
)


def device_rates(device_name: str) -> Optional[DeviceRates]:
    """Rates for a CUDA device name (None for CPU).  Unknown GPUs get the H100 SXM numbers, marked."""
    n = device_name.upper()
    if n.startswith("CPU"):
        return None
    if "H200" in n:
        return H200
    if "H100" in n or "H800" in n:
        return H100_PCIE if "PCIE" in n else H100_SXM
    if "A100" in n or "A800" in n:
        if "40GB" in n:
            return dataclasses.replace(A100, name="A100 40GB", hbm_Bps=1.555e12)
        return A100
    return dataclasses.replace(H100_SXM, note=f"unknown GPU {device_name!r}: H100 SXM rates assumed")


# ============================================================================================ floor
def _math_key(dtype: torch.dtype, tf32: bool) -> str:
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


def floor_estimate(cfg: BenchConfig, rates: Optional[DeviceRates], tokens: Optional[int] = None,
                   tf32: bool = False) -> Dict[str, Optional[float]]:
    """Lower-bound time (seconds) of the forward and of forward+backward on ``rates``.

    Model of the project's design (GUIDE section 2-3): per layer, the input projection of all steps
    is one GEMM; the recurrence is one persistent kernel that keeps W_hh on chip and exchanges
    h_{t-1} through L2 with one grid barrier per step.  Per step

        t_step = max(FLOP / peak, HBM bytes / HBM rate, L2 bytes / L2 rate) + barrier

    FLOP     2 * B_t * H * G per direction (G = 4H LSTM, 3H GRU), B_t = tokens / T (packed: mean)
    HBM      read xproj_t, write y_t (+ training: write gates and the fp32 cell state)
    L2       each CTA holding a slice of W_hh reads the whole h_{t-1} of its direction; weights
             that do not fit on chip are streamed every step (from L2 if they fit there, else HBM)
    barrier  only when W_hh needs more than one SM
    Backward: the same per step (dh = dgates . W_hh, read saved tensors, write dxproj), then the
    weight/input gradients as GEMMs over all steps.  Bidirectional layers run both directions
    concurrently (one barrier per step for both); layers run one after another.
    Cells: every call is one step, weights re-read from L2 (or HBM if larger), ``barrier_s`` stands
    for the per-call launch/synchronisation cost.
    Returns {"fwd_s", "fwdbwd_s", "per_step_s"}, all None without rates (CPU: cpu_floor_estimate).
    """
    if rates is None:
        return {"fwd_s": None, "fwdbwd_s": None, "per_step_s": None}
    dtype = cfg.torch_dtype
    es = dtype.itemsize
    acc_es = 8 if dtype == torch.float64 else 4
    peak = rates.flops[_math_key(dtype, tf32)]
    H, I, T = cfg.H, cfg.I, cfg.T
    G = cfg.gates * H

    def gemm(flop, nbytes):
        return max(flop / peak, nbytes / rates.hbm_Bps)

    if cfg.is_cell:
        B = cfg.B
        w_bytes = G * (I + H) * es
        w_rate = rates.l2_Bps if w_bytes <= rates.l2_bytes else rates.hbm_Bps
        act = es * B * (I + 2 * H + G)
        fwd_step = max(2 * B * G * (I + H) / peak, w_bytes / w_rate, act / rates.hbm_Bps) + rates.barrier_s
        bwd_step = max(4 * B * G * (I + H) / peak, 2 * w_bytes / w_rate,
                       2 * act / rates.hbm_Bps) + rates.barrier_s
        # the weight gradient: one more GEMM per call
        bwd_step += max(2 * B * G * (I + H) / peak, w_bytes / w_rate)
        return {"fwd_s": T * fwd_step, "fwdbwd_s": T * (fwd_step + bwd_step), "per_step_s": fwd_step}

    D = cfg.directions
    tokens = tokens if tokens is not None else T * cfg.B
    Bt = tokens / max(T, 1)
    fwd = fwdbwd = 0.0
    per_step = 0.0
    for layer in range(cfg.layers):
        I_l = I if layer == 0 else D * H
        w_hh = D * G * H * es
        ctas = max(1, math.ceil(w_hh / rates.onchip_per_sm))
        stream = 0.0
        if ctas > rates.sms:
            stream = w_hh - rates.sms * rates.onchip_per_sm
            ctas = rates.sms
        stream_l2 = stream if w_hh <= rates.l2_bytes else 0.0
        stream_hbm = stream - stream_l2
        barrier = rates.barrier_s if ctas > 1 else 0.0
        l2_step = ctas * Bt * H * es + stream_l2  # each CTA reads h_{t-1} of its direction
        rec_flop = 2 * D * Bt * H * G

        # forward: input GEMM (x -> xproj) then the recurrence
        in_gemm = gemm(2 * D * tokens * I_l * G, es * (tokens * I_l + D * tokens * G + D * G * I_l))

        def step(hbm_bytes):
            return max(rec_flop / peak, (hbm_bytes + stream_hbm) / rates.hbm_Bps,
                       l2_step / rates.l2_Bps) + barrier

        s_inf = step(D * Bt * es * (G + H))
        s_train = step(D * Bt * (es * (2 * G + H) + acc_es * H))  # + saved gates and cell state
        s_bwd = step(D * Bt * (es * (2 * G + 2 * H) + acc_es * H))  # gates, y/dy, c -> dxproj
        out_gemms = (
            gemm(2 * D * tokens * G * H, es * (D * tokens * (G + H)) + acc_es * D * G * H)  # dW_hh
            + gemm(2 * D * tokens * G * I_l, es * (D * tokens * G + tokens * I_l) + acc_es * D * G * I_l)  # dW_ih
            + gemm(2 * D * tokens * G * I_l, es * (D * tokens * G + tokens * I_l))  # dx
        )
        fwd += in_gemm + T * s_inf
        fwdbwd += in_gemm + T * s_train + T * s_bwd + out_gemms
        per_step += s_inf
    return {"fwd_s": fwd, "fwdbwd_s": fwdbwd, "per_step_s": per_step / cfg.layers}


# ======================================================================================== CPU floor
# On a CPU the floor is compute only: the FLOP of the call over the GEMM rate this machine reaches
# with torch.mm (MKL / oneDNN) at the row's thread count, measured in the run.  Every LSTM/GRU
# implementation, torch.nn's included, performs at least these multiply-adds (the input
# projection and the recurrent GEMM per step; backward: dx, dW_ih, dh, dW_hh), and the cell math
# only adds to them, so ``torch time / floor`` bounds the ratio any backend can reach over torch.nn
# on this machine (issue 11: where torch.nn already runs at the GEMM rate no backend can be much
# faster).  It is an estimate, not a hardware bound: the rate is MKL's at these shapes, which a
# kernel may exceed by a few percent (oneDNN's LSTM reached ~100 GFLOP/s where torch.mm measured
# 88-103 on the development machine).  Memory traffic is not modelled: at B = 1 the floor is loose
# (a GEMV streams W_hh).
# (M, K, N) of the GEMMs timed (2-5 MB of operands: L2/L3): the shapes at which MKL reached its best
# rate on the development machine.  Its rate varies by ~10% between shapes and, on a shared VM, over minutes
# (clock boost): the floor takes the best of the shapes, measured again before every config
# (``run_suite`` clears the cache) so that it is the rate of the moment the rows are timed.
CPU_GEMM_SHAPES = ((1024, 512, 512), (1024, 128, 512), (512, 256, 1024))
_cpu_gemm_rates: Dict[Tuple[torch.dtype, int], float] = {}


def cpu_gemm_rate(dtype: torch.dtype) -> float:
    """FLOP/s of torch.mm in ``dtype`` on CPU at the current torch thread count: the best over
    ``CPU_GEMM_SHAPES`` of 5 timings of 2 calls each (~0.15 s), cached per (dtype, threads).  bf16 / fp16
    take the faster of their own rate and fp32's: a backend may compute them in fp32 (the ``cpp``
    backend does)."""
    key = (dtype, torch.get_num_threads())
    if key not in _cpu_gemm_rates:
        gen = torch.Generator().manual_seed(0)
        reduced = dtype in (torch.bfloat16, torch.float16)
        # reduced types: one shape, few calls (CPUs without fp16 GEMMs take ~0.2 s per call)
        shapes, timings, calls = (CPU_GEMM_SHAPES[:1], 3, 1) if reduced else (CPU_GEMM_SHAPES, 5, 2)
        rate = 0.0
        for M, K, N in shapes:
            a = torch.randn(M, K, generator=gen).to(dtype)
            b = torch.randn(K, N, generator=gen).to(dtype)
            torch.mm(a, b)
            for _ in range(timings):
                t0 = time.perf_counter()
                for _ in range(calls):
                    torch.mm(a, b)
                rate = max(rate, calls * 2.0 * M * K * N / (time.perf_counter() - t0))
        if reduced:
            rate = max(rate, cpu_gemm_rate(torch.float32))
        _cpu_gemm_rates[key] = rate
    return _cpu_gemm_rates[key]


def cpu_floor_estimate(cfg: BenchConfig, rate: float, tokens: Optional[int] = None) -> Dict[str, Optional[float]]:
    """Lower-bound time (seconds) of the forward and forward+backward on a CPU doing ``rate`` FLOP/s.

    FLOP, G = 4H (LSTM) or 3H (GRU), D directions, I_l the layer's input width:
      forward      per layer and direction 2 * tokens * G * (I_l + H): the input projection of
                   every step and the recurrent GEMM of every step (cells: 2 * B * G * (I + H) per call)
      fwd+bwd      3x the forward: the forward, then dx (+ dh) and dW_ih (+ dW_hh), each a GEMM of
                   the same size (the inputs require grad in the benchmark)
    Returns {"fwd_s", "fwdbwd_s", "per_step_s"}."""
    G = cfg.gates * cfg.H
    if cfg.is_cell:
        per_call = 2.0 * cfg.B * G * (cfg.I + cfg.H)
        return {"fwd_s": cfg.T * per_call / rate, "fwdbwd_s": 3 * cfg.T * per_call / rate,
                "per_step_s": per_call / rate}
    D = cfg.directions
    tokens = tokens if tokens is not None else cfg.T * cfg.B
    flop = 0.0
    for layer in range(cfg.layers):
        I_l = cfg.I if layer == 0 else D * cfg.H
        flop += 2.0 * D * tokens * G * (I_l + cfg.H)
    fwd = flop / rate
    return {"fwd_s": fwd, "fwdbwd_s": 3 * fwd, "per_step_s": fwd / (cfg.T * cfg.layers)}


# ========================================================================================== inputs
@dataclasses.dataclass
class InputSet:
    """One set of inputs and output cotangents for a config (all leaves require grad)."""

    x: object  # Tensor (T, B, I) or PackedSequence; for cells (T, B, I): one slice per call
    x_leaf: Tensor
    h0: Tensor  # (L*D, B, H) or (B, H) for cells
    c0: Optional[Tensor]
    cotangents: List[Tensor]
    tokens: int

    def leaves(self) -> List[Tensor]:
        return [self.x_leaf, self.h0] + ([self.c0] if self.c0 is not None else [])

    def to(self, dtype: torch.dtype, device=None) -> "InputSet":
        """A detached copy in ``dtype`` (the fp64 reference run)."""

        def cv(t):
            return t.detach().to(device=device or t.device, dtype=dtype).requires_grad_(t.requires_grad)

        x_leaf = cv(self.x_leaf)
        if isinstance(self.x, PackedSequence):
            dev = x_leaf.device
            p = self.x
            x = PackedSequence(x_leaf, p.batch_sizes,
                               None if p.sorted_indices is None else p.sorted_indices.to(dev),
                               None if p.unsorted_indices is None else p.unsorted_indices.to(dev))
        else:
            x = x_leaf
        return InputSet(x, x_leaf, cv(self.h0), None if self.c0 is None else cv(self.c0),
                        [cv(c) for c in self.cotangents], self.tokens)


def make_inputs(cfg: BenchConfig, device, seed: int) -> InputSet:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = cfg.torch_dtype

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    T, B, I, H = cfg.T, cfg.B, cfg.I, cfg.H
    is_lstm = cfg.mode.startswith("LSTM")
    if cfg.is_cell:
        x = randn(T, B, I).requires_grad_()
        h0 = randn(B, H).requires_grad_()
        c0 = randn(B, H).requires_grad_() if is_lstm else None
        cot = [randn(T, B, H)] + ([randn(B, H)] if is_lstm else [])
        return InputSet(x, x, h0, c0, cot, T * B)
    LD = cfg.layers * cfg.directions
    h0 = randn(LD, B, H).requires_grad_()
    c0 = randn(LD, B, H).requires_grad_() if is_lstm else None
    if cfg.lengths is not None:
        lo, hi = cfg.lengths
        lengths = torch.randint(lo, hi + 1, (B,), generator=gen)
        lengths[int(torch.randint(0, B, (1,), generator=gen))] = hi  # T = hi exactly
        padded = randn(hi, B, I)
        packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
        data = packed.data.detach().requires_grad_()
        x = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        tokens = int(lengths.sum())
        out_cot = randn(tokens, cfg.directions * H)
        x_leaf = data
    else:
        x_leaf = randn(T, B, I).requires_grad_()
        x = x_leaf
        tokens = T * B
        out_cot = randn(T, B, cfg.directions * H)
    cot = [out_cot, randn(LD, B, H)] + ([randn(LD, B, H)] if is_lstm else [])
    return InputSet(x, x_leaf, h0, c0, cot, tokens)


# ========================================================================================= modules
def _fusedrnn():
    import fusedrnn  # noqa: PLC0415  (lazy: the harness must import without the modules)

    return fusedrnn


def torch_module(cfg: BenchConfig, device, seed: int = 0) -> torch.nn.Module:
    """The torch.nn module of a config, with deterministic weights, in the config's dtype."""
    torch.manual_seed(seed)
    cls = getattr(torch.nn, cfg.mode)
    if cfg.is_cell:
        m = cls(cfg.I, cfg.H, bias=True)
    else:
        m = cls(cfg.I, cfg.H, num_layers=cfg.layers, bidirectional=cfg.bidirectional)
    return m.to(device=device, dtype=cfg.torch_dtype)


def build_module(cfg: BenchConfig, backend: str, device, reference: torch.nn.Module) -> torch.nn.Module:
    """The module of ``backend`` for ``cfg`` holding ``reference``'s weights ("torch": reference itself)."""
    if backend == "torch":
        return reference
    cls = getattr(_fusedrnn(), cfg.mode)
    kwargs = dict(bias=True, device=device, dtype=cfg.torch_dtype, backend=backend)
    if not cfg.is_cell:
        kwargs.update(num_layers=cfg.layers, bidirectional=cfg.bidirectional)
    m = cls(cfg.I, cfg.H, **kwargs)
    m.load_state_dict(reference.state_dict())
    return m


def run_module(cfg: BenchConfig, m: torch.nn.Module, s: InputSet) -> List[Tensor]:
    """One call; returns the outputs in the order of ``s.cotangents``."""
    if cfg.is_cell:
        h, c = s.h0, s.c0
        hs = []
        for t in range(cfg.T):
            if c is None:
                h = m(s.x[t], h)
            else:
                h, c = m(s.x[t], (h, c))
            hs.append(h)
        return [torch.stack(hs)] + ([c] if c is not None else [])
    hx = (s.h0, s.c0) if s.c0 is not None else s.h0
    out, hn = m(s.x, hx)
    if isinstance(out, PackedSequence):
        out = out.data
    return [out] + (list(hn) if isinstance(hn, tuple) else [hn])


def _output_names(cfg: BenchConfig) -> List[str]:
    if cfg.is_cell:
        return ["h_seq", "c_n"] if cfg.mode == "LSTMCell" else ["h_seq"]
    return ["output", "h_n", "c_n"] if cfg.mode == "LSTM" else ["output", "h_n"]


def _leaf_names(cfg: BenchConfig) -> List[str]:
    return ["grad_input", "grad_h0"] + (["grad_c0"] if cfg.mode.startswith("LSTM") else [])


def forward_backward(cfg: BenchConfig, m: torch.nn.Module, s: InputSet, params: Sequence[Tensor]):
    outs = run_module(cfg, m, s)
    grads = torch.autograd.grad(outs, s.leaves() + list(params), s.cotangents, allow_unused=True)
    return outs, grads


def results_dict(cfg, m, s, outs, grads, eval_out=None) -> Dict[str, Optional[Tensor]]:
    names = _output_names(cfg) + _leaf_names(cfg) + ["grad_" + n for n, _ in m.named_parameters()]
    d = dict(zip(names, list(outs) + list(grads)))
    if eval_out is not None:
        d["output_eval"] = eval_out
    return d


def rel_err(a: Optional[Tensor], b: Optional[Tensor]) -> float:
    """||a - b|| / ||b|| in float64 (absolute ||a - b|| where b is zero); inf when a is missing."""
    if b is None:
        return 0.0 if a is None else float("inf")
    if a is None:
        return float("inf")
    b = b.detach().to(torch.float64)
    a = a.detach().to(device=b.device, dtype=torch.float64)
    if a.shape != b.shape:
        return float("inf")
    nb = float(torch.linalg.vector_norm(b))
    nd = float(torch.linalg.vector_norm(a - b))
    return nd / nb if nb > 0 else nd


def tolerance(dtype: torch.dtype, tf32: bool) -> float:
    """The project's relative-norm tolerance for a dtype (docs/HELPERS.md, GUIDE section 4)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-3 if tf32 else 1e-5
    return 2e-2


# ========================================================================================== timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class TimingOptions:
    min_time_s: float = 0.25  # time per measurement (one of fwd / fwdbwd), after warm-up
    min_reps: int = 5
    max_reps: int = 200
    warmup: int = 3
    n_sets: int = 4  # input sets rotated over
    # timings per row, interleaved across the backends of a config; a row reports the fastest run's
    # median (on a shared machine other work only ever adds time)
    repeat: int = 1
    # CPU clock: "wall" (time.perf_counter), "thread" (time.thread_time: CPU time of the calling
    # thread, blind to time spent descheduled by other processes' work), "auto": thread when the
    # row runs on one thread (then both equal on an idle machine), else wall
    clock: str = "auto"

    @classmethod
    def for_device(cls, device: torch.device, suite: str = "standard") -> "TimingOptions":
        if device.type == "cuda":
            return cls(min_time_s=0.3, min_reps=10, max_reps=300, warmup=3, n_sets=4)
        if suite in ("quick", "tiny"):
            return cls(min_time_s=0.15, min_reps=3, max_reps=50, warmup=1, n_sets=2)
        if suite == "cpu":
            return cls(min_time_s=0.2, min_reps=3, max_reps=50, warmup=1, n_sets=2, repeat=3)
        return cls(min_time_s=0.5, min_reps=3, max_reps=30, warmup=1, n_sets=2)


def clock_name(device: torch.device, opts: TimingOptions) -> str:
    """The clock ``measure`` uses: "cuda-events", "thread" or "wall"."""
    if device.type == "cuda":
        return "cuda-events"
    if opts.clock not in ("wall", "auto", "thread"):
        raise ValueError(f"unknown clock {opts.clock!r} (auto, wall, thread)")
    # one thread's CPU time is the call's time only when the call runs on that thread alone
    if opts.clock in ("thread", "auto") and torch.get_num_threads() == 1:
        return "thread"
    return "wall"


def measure(fn: Callable[[int], object], device: torch.device, opts: TimingOptions):
    """Median milliseconds of ``fn(i)`` over repetitions (i rotates over the input sets), on the
    clock ``clock_name`` names.

    Returns (median_ms, reps, times_ms)."""
    clock = time.thread_time if clock_name(device, opts) == "thread" else time.perf_counter
    counter = [0]

    def call():
        fn(counter[0] % opts.n_sets)
        counter[0] += 1

    for _ in range(opts.warmup):
        call()
    _sync(device)
    t0 = time.perf_counter()
    call()
    _sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(max(opts.min_reps, min(opts.max_reps, opts.min_time_s / est)))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for k in range(reps):
            starts[k].record()
            call()
            ends[k].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(reps):
            t0 = clock()
            call()
            times.append((clock() - t0) * 1e3)
    return statistics.median(times), reps, times


# ======================================================================================= callgrind
CALLGRIND_ENV = "FUSEDRNN_BENCH_CALLGRIND"  # set in the process valgrind runs: its dump directory
# The ATen-facing CPU ops of csrc/cpu (callgrind collects inside these functions only).
CALLGRIND_FUNCTIONS = tuple(
    f"fusedrnn::{op}_cpu(*"
    for op in ("lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd", "lstm_cell_fwd", "lstm_cell_bwd", "gru_cell_fwd",
               "gru_cell_bwd")
)


CALLGRIND_SCOPES = ("ops", "call")


def callgrind_command(out_dir, argv: Sequence[str], scope: str = "ops") -> List[str]:
    """valgrind command line that reruns ``python -m fusedrnn.bench argv`` under callgrind: nothing is
    instrumented until the harness switches it on (imports run at valgrind's base speed); scope
    "ops" collects only the instructions inside ``CALLGRIND_FUNCTIONS``, "call" every instruction
    executed while instrumented (the harness zeroes the counts before the measured calls)."""
    if scope not in CALLGRIND_SCOPES:
        raise ValueError(f"callgrind scope {scope!r}: choose from {CALLGRIND_SCOPES}")
    collect = (
        ["--collect-atstart=no", *[f"--toggle-collect={f}" for f in CALLGRIND_FUNCTIONS]]
        if scope == "ops" else ["--collect-atstart=yes"]
    )
    return [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", *collect,
        f"--callgrind-out-file={Path(out_dir).resolve()}/callgrind.out.%p",
        sys.executable, "-m", "fusedrnn.bench", *argv,
    ]


class Callgrind:
    """Counts the instructions of fusedrnn's C++ CPU ops per call, inside a process started by
    ``callgrind_command`` (it talks to valgrind through ``callgrind_control``)."""

    def __init__(self, out_dir, scope: str = "ops"):
        self.dir = Path(out_dir)
        self.scope = scope  # as in ``callgrind_command``: "call" counts torch.nn rows too
        self.pid = os.getpid()
        self._ctl("--instr=on")

    def _ctl(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.pid)], check=True, capture_output=True, text=True)

    def _dumps(self):
        return {p: int(p.name.rsplit(".", 1)[1]) for p in self.dir.glob(f"callgrind.out.{self.pid}.*")}

    def count(self, fn: Callable[[int], object], reps: int = 2, n_sets: int = 1) -> float:
        """Instructions per call of ``fn(i)`` (one untimed call first: lazy initialisation)."""
        fn(0)
        self._ctl("--zero")
        for k in range(reps):
            fn(k % n_sets)
        before = self._dumps()
        self._ctl("--dump=fusedrnn-bench")
        new = {p: n for p, n in self._dumps().items() if p not in before}
        if not new:
            raise RuntimeError(f"callgrind wrote no dump to {self.dir}")
        total = None
        with open(max(new, key=new.get)) as f:
            for line in f:
                if line.startswith(("totals:", "summary:")):
                    total = int(line.split()[1])
        if total is None:
            raise RuntimeError("callgrind dump without totals")
        return total / reps


# ============================================================================================ case
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} threads, torch uses {torch.get_num_threads()})"


def _matmul_precision() -> str:
    """torch's fp32 matmul setting ("highest" = IEEE, "high" = TF32 allowed), read without the
    legacy flags (which raise on torch >= 2.9 when old and new APIs were mixed)."""
    return torch.get_float32_matmul_precision()


def tf32_enabled(cfg: BenchConfig, device: torch.device) -> bool:
    """Whether fp32 math of this row may use TF32: the flag that governs nn.LSTM/GRU (cuDNN)."""
    return device.type == "cuda" and cfg.torch_dtype == torch.float32 and rnn_tf32_enabled()


class Case:
    """One (config, backend) on a device: inputs, module, and the callables the timers run.

    ``forward()`` / ``forward_backward()`` run once on the next input set and synchronise (for
    pytest-benchmark); ``fwd(i)`` / ``fwdbwd(i)`` run on set i without synchronising (for events).
    """

    def __init__(self, cfg: BenchConfig, backend: str, device, n_sets: int = 4, seed: int = 0,
                 reference: Optional[torch.nn.Module] = None, inputs: Optional[List[InputSet]] = None):
        self.cfg, self.backend, self.device = cfg, backend, torch.device(device)
        self.reference = reference if reference is not None else torch_module(cfg, self.device, seed)
        self.inputs = inputs if inputs is not None else [
            make_inputs(cfg, self.device, seed + 1000 * (k + 1)) for k in range(n_sets)
        ]
        self.module = build_module(cfg, backend, self.device, self.reference)
        self.param_names = [n for n, _ in self.module.named_parameters()]
        self.params = [p for _, p in self.module.named_parameters()]
        self._next = 0

    def fwd(self, i: int):
        """Inference forward on set i (call inside ``self.eval_mode()``)."""
        with torch.no_grad():
            return run_module(self.cfg, self.module, self.inputs[i])

    @contextlib.contextmanager
    def eval_mode(self):
        self.module.eval()
        try:
            yield
        finally:
            self.module.train()

    def fwdbwd(self, i: int):
        return forward_backward(self.cfg, self.module, self.inputs[i], self.params)

    def _rotate(self) -> int:
        i = self._next % len(self.inputs)
        self._next += 1
        return i

    def forward(self) -> None:
        with self.eval_mode():
            self.fwd(self._rotate())
        _sync(self.device)

    def forward_backward(self) -> None:
        self.fwdbwd(self._rotate())
        _sync(self.device)

    def results(self) -> Dict[str, Optional[Tensor]]:
        """Outputs and gradients on input set 0 (and the inference output) for the accuracy check."""
        s = self.inputs[0]
        outs, grads = self.fwdbwd(0)
        with self.eval_mode():
            eval_out = self.fwd(0)[0]
        return results_dict(self.cfg, self.module, s, outs, grads, eval_out)


def reference_results(cfg: BenchConfig, ref: torch.nn.Module, s: InputSet) -> Dict[str, Optional[Tensor]]:
    """torch.nn in float64 on the row's inputs and weights (on the device, else on the CPU)."""
    last = None
    for dev in (s.x_leaf.device, torch.device("cpu")):
        try:
            m64 = copy.deepcopy(ref).to(device=dev, dtype=torch.float64)
            s64 = s.to(torch.float64, dev)
            params = [p for _, p in m64.named_parameters()]
            outs, grads = forward_backward(cfg, m64, s64, params)
            return results_dict(cfg, m64, s64, outs, grads, outs[0])
        except (RuntimeError, NotImplementedError) as e:  # e.g. no fp64 kernel on the device
            last = e
    raise RuntimeError(f"fp64 reference failed: {last}")


# ============================================================================================ rows
ROW_KEYS = (
    "config", "mode", "backend", "device", "dtype", "T", "B", "I", "H", "layers", "bidirectional",
    "packed", "tokens", "fwd_ms", "fwdbwd_ms", "fwd_reps", "fwdbwd_reps", "ratio_vs_torch",
    "fwd_ratio_vs_torch", "fwd_ceiling_vs_torch", "ceiling_vs_torch", "max_rel_err", "worst_tensor",
    "rel_errs", "tol", "err_vs_torch", "ok", "peak_mem_mb", "tokens_per_s", "per_step_us", "floor_ms",
    "floor_per_step_us", "fwd_over_floor", "floor_fwdbwd_ms", "fwdbwd_over_floor", "cpu_gemm_gflops",
    "threads", "clock", "fwd_ms_runs", "fwdbwd_ms_runs", "fwd_ir", "fwdbwd_ir", "error",
)


def empty_row(cfg: BenchConfig, backend: str, dev_name: str) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(config=cfg.name, mode=cfg.mode, backend=backend, device=dev_name, dtype=cfg.dtype,
               T=cfg.T, B=cfg.B, I=cfg.I, H=cfg.H, layers=cfg.layers, bidirectional=cfg.bidirectional,
               packed=cfg.lengths is not None)
    return row


def _error_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]


# error prefixes of rows that did not run by design (not failures)
NOT_FAILURES = ("skipped", "unavailable", "unsupported")

INTERPRETER_LIMITS = dict(T=16, B=4, H=64)  # Triton rows on CPU run under TRITON_INTERPRET=1


def skip_reason(cfg: BenchConfig, backend: str, device: torch.device,
                unavailable: Dict[str, Optional[str]]) -> Optional[str]:
    if backend != "torch" and unavailable.get(backend):
        return f"unavailable: {unavailable[backend]}"
    if backend == "triton" and device.type == "cpu":
        lim = INTERPRETER_LIMITS
        if cfg.T > lim["T"] or cfg.B > lim["B"] or cfg.H > lim["H"]:
            return f"skipped: too large for the Triton interpreter on CPU (limits {lim})"
    return None


def _steps(cfg: BenchConfig) -> int:
    return cfg.T * (1 if cfg.is_cell else cfg.layers)


def _error_row(row: dict, e: BaseException) -> None:
    row["error"] = _error_text(e)
    if isinstance(e, NotImplementedError) or (isinstance(e, ValueError) and "does not support" in str(e)):
        row["error"] = "unsupported: " + row["error"]
    if os.environ.get("FUSEDRNN_BENCH_TRACEBACK"):
        traceback.print_exc()


def start_row(cfg: BenchConfig, backend: str, device: torch.device, opts: TimingOptions,
              reference: torch.nn.Module, inputs: List[InputSet], ref64: Optional[dict],
              dev_name: str, check: bool = True, counter: Optional[Callgrind] = None):
    """A row's setup and accuracy check (and, with ``counter``, its instruction counts).

    Returns (row, case): case is None when the row is complete (error or instruction counts)."""
    row = empty_row(cfg, backend, dev_name)
    row["threads"] = torch.get_num_threads() if device.type == "cpu" else None
    row["tokens"] = inputs[0].tokens
    tf32 = tf32_enabled(cfg, device)
    row["tol"] = tolerance(cfg.torch_dtype, tf32)
    if device.type == "cuda":
        fl = floor_estimate(cfg, device_rates(dev_name), inputs[0].tokens, tf32)
    elif counter is None:  # CPU: the measured GEMM rate at this row's thread count
        row["cpu_gemm_gflops"] = cpu_gemm_rate(cfg.torch_dtype) / 1e9
        fl = cpu_floor_estimate(cfg, row["cpu_gemm_gflops"] * 1e9, inputs[0].tokens)
    else:
        fl = floor_estimate(cfg, None)
    row["floor_ms"] = None if fl["fwd_s"] is None else fl["fwd_s"] * 1e3
    row["floor_fwdbwd_ms"] = None if fl["fwdbwd_s"] is None else fl["fwdbwd_s"] * 1e3
    row["floor_per_step_us"] = None if fl["per_step_s"] is None else fl["per_step_s"] * 1e6
    try:
        case = Case(cfg, backend, device, reference=reference, inputs=inputs)
        if check and ref64 is not None:
            got = case.results()
            errs = {k: rel_err(got.get(k), v) for k, v in ref64.items()}
            worst = max(errs, key=lambda k: errs[k] if not math.isnan(errs[k]) else math.inf)
            row["rel_errs"] = errs
            row["worst_tensor"] = worst
            row["max_rel_err"] = errs[worst] if not math.isnan(errs[worst]) else math.inf
            del got
        if counter is not None:
            with case.eval_mode():
                row["fwd_ir"] = counter.count(case.fwd, n_sets=opts.n_sets)
            row["fwdbwd_ir"] = counter.count(case.fwdbwd, n_sets=opts.n_sets)
            return row, None
        return row, case
    except Exception as e:  # noqa: BLE001  (a row never crashes the suite)
        _error_row(row, e)
        return row, None


def time_row(row: dict, case: "Case", device: torch.device, opts: TimingOptions) -> bool:
    """One timing of fwd and fwd+bwd appended to the row's runs; False (and the row's error) on failure."""
    try:
        row["clock"] = clock_name(device, opts)
        with case.eval_mode():
            ms, reps, _ = measure(case.fwd, device, opts)
        row["fwd_ms_runs"] = (row["fwd_ms_runs"] or []) + [ms]
        row["fwd_reps"] = (row["fwd_reps"] or 0) + reps
        ms, reps, _ = measure(case.fwdbwd, device, opts)
        row["fwdbwd_ms_runs"] = (row["fwdbwd_ms_runs"] or []) + [ms]
        row["fwdbwd_reps"] = (row["fwdbwd_reps"] or 0) + reps
        return True
    except Exception as e:  # noqa: BLE001
        _error_row(row, e)
        return False


def finish_row(cfg: BenchConfig, row: dict, case: "Case", device: torch.device) -> None:
    """Times of the row: the fastest of its runs' medians (a shared machine only ever adds time)."""
    try:
        row["fwd_ms"] = min(row["fwd_ms_runs"])
        row["fwdbwd_ms"] = min(row["fwdbwd_ms_runs"])
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            case.fwdbwd(0)
            _sync(device)
            row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / _MIB
        row["tokens_per_s"] = row["tokens"] / (row["fwdbwd_ms"] * 1e-3)
        row["per_step_us"] = row["fwd_ms"] * 1e3 / _steps(cfg)
        # CUDA rows: the cost model's terms
        row.update(costmodel.row_prediction(cfg, row["backend"], device, tf32_enabled(cfg, device)))
        if row["floor_ms"]:
            row["fwd_over_floor"] = row["fwd_ms"] / row["floor_ms"]
            row["fwdbwd_over_floor"] = row["fwdbwd_ms"] / row["floor_fwdbwd_ms"]
    except Exception as e:  # noqa: BLE001
        _error_row(row, e)


def bench_row(cfg: BenchConfig, backend: str, device: torch.device, opts: TimingOptions,
              reference: torch.nn.Module, inputs: List[InputSet], ref64: Optional[dict],
              dev_name: str, check: bool = True, counter: Optional[Callgrind] = None) -> dict:
    """Measure one (config, backend); exceptions become the row's ``error``.  With ``counter``
    the row gets instruction counts (fwd_ir, fwdbwd_ir) instead of timings."""
    row, case = start_row(cfg, backend, device, opts, reference, inputs, ref64, dev_name, check, counter)
    if case is not None:
        if all(time_row(row, case, device, opts) for _ in range(opts.repeat)):
            finish_row(cfg, row, case, device)
    del case
    return row


def finish_ratios(rows: List[dict]) -> None:
    """Fill ratio_vs_torch, fwd_ratio_vs_torch, err_vs_torch and ok from each config's torch row."""
    torch_rows = {r["config"]: r for r in rows if r["backend"] == "torch" and not r.get("error")}
    for r in rows:
        t = torch_rows.get(r["config"])
        if r.get("error"):
            continue
        if t is not None:
            if t["fwdbwd_ms"] and r["fwdbwd_ms"]:
                r["ratio_vs_torch"] = t["fwdbwd_ms"] / r["fwdbwd_ms"]
            if t["fwd_ms"] and r["fwd_ms"]:
                r["fwd_ratio_vs_torch"] = t["fwd_ms"] / r["fwd_ms"]
            # CPU rows: torch's time over the compute floor, about the most any backend running at
            # torch.mm's rate could gain over torch.nn here (see cpu_floor_estimate)
            if r.get("cpu_gemm_gflops") and t["fwd_ms"] and r.get("floor_ms"):
                r["fwd_ceiling_vs_torch"] = t["fwd_ms"] / r["floor_ms"]
            if r.get("cpu_gemm_gflops") and t["fwdbwd_ms"] and r.get("floor_fwdbwd_ms"):
                r["ceiling_vs_torch"] = t["fwdbwd_ms"] / r["floor_fwdbwd_ms"]
            if r["max_rel_err"] is not None and t["max_rel_err"]:
                r["err_vs_torch"] = r["max_rel_err"] / t["max_rel_err"]
        if r["max_rel_err"] is not None:
            allowed = r["tol"]
            if t is not None and t["max_rel_err"] is not None and math.isfinite(t["max_rel_err"]):
                allowed = max(allowed, 2.0 * t["max_rel_err"])  # "at most 2x torch's own error"
            r["ok"] = bool(math.isfinite(r["max_rel_err"]) and r["max_rel_err"] <= allowed)


# ===================================================================================== environment
def git_commit() -> str:
    if os.environ.get("FUSEDRNN_GIT_COMMIT"):
        return os.environ["FUSEDRNN_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    for cwd in (here, Path.cwd()):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                 timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def git_dirty() -> Optional[bool]:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Top-level facts of a run: versions, device, date, commit, flags, floor rates."""
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    try:
        from fusedrnn import __version__ as fusedrnn_version  # noqa: PLC0415
    except Exception:  # noqa: BLE001
        fusedrnn_version = None
    try:
        backends = _fusedrnn().available_backends()
    except Exception as e:  # noqa: BLE001
        backends = {"error": _error_text(e)}
    name = device_name(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "device": name,
        "device_type": device.type,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python_version": platform.python_version(),
        "fusedrnn_version": fusedrnn_version,
        "platform": platform.platform(),
        "available_backends": backends,
        "rnn_tf32": rnn_tf32_enabled(),  # cudnn.rnn.fp32_precision == "tf32" (legacy cudnn.allow_tf32)
        "matmul_fp32_precision": _matmul_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "torch_num_threads": torch.get_num_threads(),
        "cpu_kernel_isa": _cpu_kernel_isa(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        rates = device_rates(name)
        env["floor_rates"] = dataclasses.asdict(rates) if rates else None
    else:
        env["floor_rates"] = None
    return env


def _cpu_kernel_isa() -> Optional[str]:
    """The instruction set of the cpp backend's CPU kernels in use (None without the extension)."""
    try:
        from ..backends import cpp  # noqa: PLC0415

        return None if cpp.unavailable() else torch.ops.fusedrnn_ext.cpu_isa()
    except Exception:  # noqa: BLE001
        return None


def default_backends(device: torch.device) -> List[str]:
    """torch + every usable kernel backend; on CPU torch, reference (+ cpp).  Triton on CPU runs
    only under the interpreter and only when asked for explicitly."""
    try:
        avail = _fusedrnn().available_backends()
    except Exception:  # noqa: BLE001
        avail = {}
    if device.type == "cuda":
        return ["torch"] + [b for b in ("cuda", "triton") if avail.get(b, "missing") is None]
    return ["torch", "reference"] + (["cpp"] if avail.get("cpp", "missing") is None else [])


# =========================================================================================== suite
@contextlib.contextmanager
def cpu_threads(n: Optional[int]):
    """torch.set_num_threads(n) inside the block (n None: unchanged), restored afterwards."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_suite(configs: Sequence[BenchConfig], backends: Sequence[str], device="cpu",
              opts: Optional[TimingOptions] = None, check: bool = True, seed: int = 0,
              time_budget_s: Optional[float] = None, progress=True,
              on_config_done: Optional[Callable[[List[dict]], None]] = None,
              counter: Optional[Callgrind] = None) -> List[dict]:
    """Every (config, backend) row; torch first within a config so ratios come from the same run.

    ``time_budget_s``: rows not started within the budget are recorded as skipped.
    ``on_config_done(rows_so_far)`` is called after each config (the CLI writes its JSON there).
    ``counter``: count instructions (``Callgrind``) instead of timing, with one thread; torch rows
    are skipped (only fusedrnn's own ops are counted).
    A config's ``threads`` sets torch.set_num_threads for its rows (CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    opts = opts or TimingOptions.for_device(device)
    backends = list(dict.fromkeys(backends))
    if "torch" in backends:  # the baseline of each config runs first
        backends.remove("torch")
        backends.insert(0, "torch")
    try:
        unavailable = _fusedrnn().available_backends()
    except Exception as e:  # noqa: BLE001
        unavailable = {b: f"fusedrnn does not import ({_error_text(e)})" for b in backends if b != "torch"}
    dev_name = device_name(device)
    t_start = time.perf_counter()
    rows: List[dict] = []
    bar = _progress(len(configs) * len(backends), progress)
    for cfg in configs:
        cfg_rows = []
        _cpu_gemm_rates.clear()  # the CPU floor's GEMM rate of this moment (see cpu_gemm_rate)
        threads = 1 if counter is not None else (cfg.threads if device.type == "cpu" else None)
        try:
            reference = torch_module(cfg, device, seed)
            inputs = [make_inputs(cfg, device, seed + 1000 * (k + 1)) for k in range(opts.n_sets)]
            ref64 = reference_results(cfg, reference, inputs[0]) if check else None
            setup_error = None
        except Exception as e:  # noqa: BLE001
            reference = inputs = ref64 = None
            setup_error = _error_text(e)
        started = []  # (row, case) per backend, in order
        for backend in backends:
            bar.set(f"{cfg.name} [{backend}]")
            row, case = None, None
            if counter is not None and backend == "torch" and counter.scope == "ops":
                row = empty_row(cfg, backend, dev_name)
                row["error"] = "skipped: callgrind counts only fusedrnn's C++ CPU ops"
            elif time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                row = empty_row(cfg, backend, dev_name)
                row["error"] = f"skipped: time budget of {time_budget_s:.0f} s exhausted"
            elif setup_error is not None:
                row = empty_row(cfg, backend, dev_name)
                row["error"] = f"setup failed: {setup_error}"
            else:
                reason = skip_reason(cfg, backend, device, unavailable)
                if reason:
                    row = empty_row(cfg, backend, dev_name)
                    row["error"] = reason
                else:
                    with cpu_threads(threads):
                        row, case = start_row(cfg, backend, device, opts, reference, inputs, ref64, dev_name,
                                              check, counter)
            started.append((row, case))
        # timings interleaved across backends: for r in repeats, each backend once
        with cpu_threads(threads):
            for _ in range(opts.repeat):
                for row, case in started:
                    if case is not None and not row.get("error"):
                        time_row(row, case, device, opts)
            for row, case in started:
                if case is not None and not row.get("error"):
                    finish_row(cfg, row, case, device)
        for row, _ in started:
            cfg_rows.append(row)
            bar.update(row)
        started.clear()
        del reference, inputs, ref64
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        finish_ratios(cfg_rows)
        rows.extend(cfg_rows)
        if on_config_done is not None:
            on_config_done(rows)
    bar.close()
    return rows


class _progress:
    """tqdm when installed (progress=True), else one plain line per row to stderr
    (progress="lines", or tqdm missing); progress=False prints nothing."""

    def __init__(self, total: int, progress):
        self.total, self.n, self.enabled = total, 0, bool(progress)
        self.bar = None
        if progress is True and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm  # noqa: PLC0415

                self.bar = tqdm(total=total, desc="bench", unit="row", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def set(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(desc)
        elif self.enabled:  # so a log shows which row hung or crashed the process
            print(f"[{self.n + 1}/{self.total}] {desc} ...", file=sys.stderr, flush=True)

    def update(self, row: dict) -> None:
        self.n += 1
        if not self.enabled:
            return
        if row.get("error"):
            msg = f"{row['config']} [{row['backend']}]: {row['error'][:100]}"
        elif row.get("fwd_ir") is not None:
            msg = (f"{row['config']} [{row['backend']}]: fwd {row['fwd_ir'] / 1e6:.3f} M instr, "
                   f"fwd+bwd {row['fwdbwd_ir'] / 1e6:.3f} M instr")
        else:
            msg = (f"{row['config']} [{row['backend']}]: fwd {row['fwd_ms']:.3f} ms, "
                   f"fwd+bwd {row['fwdbwd_ms']:.3f} ms, err {row['max_rel_err'] if row['max_rel_err'] is not None else float('nan'):.1e}")
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
            self.bar.update(1)
        else:
            print(f"[{self.n}/{self.total}] {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
