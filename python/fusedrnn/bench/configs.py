"""Benchmark configurations and suites.

A ``BenchConfig`` names one module call: the module kind, sizes, dtype and input form.  Suites are
lists of configs:

    quick      small CPU-friendly configs (seconds on a 2-core CPU); on CUDA two standard configs
               are added.
    cpu        the CPU suite: LSTM and GRU over H 64..1024 x B 1..64 at T=64, T 16 and 256,
               bf16 / fp16 / fp64 at H 128 and 512, and short calls (T 1..4: streaming), each at 1
               and 2 threads (minutes on a 2-core CPU); every row times inference (fwd) and
               training (fwd+bwd).
    standard   the GPU suite whose names are quoted in BENCHMARKS.md (keep the names stable).
    full       standard + sweeps over B, H and T for LSTM and GRU + LSTMCell / GRUCell rows.
    tiny       the smallest configs, for the Triton interpreter and the tests.

Names spell the config: ``<mode><layers>[-bidir]-h<H>-b<B>-t<T>[-packed]-<dtype>[-thr<N>]``.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

MODES = ("LSTM", "GRU", "LSTMCell", "GRUCell")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmarked call.

    mode        "LSTM", "GRU", "LSTMCell" or "GRUCell"
    T           sequence length (packed: the longest length); for cells: the number of cell calls
                chained in a Python loop (the state of one call feeds the next)
    B, I, H     batch, input size, hidden size
    layers      num_layers (sequence modules only)
    bidirectional
    dtype       key of ``DTYPES``
    lengths     (lo, hi): packed input with per-sequence lengths drawn uniformly in [lo, hi]
                (packed with ``enforce_sorted=False``), T is then ``hi``; None: a dense batch
    sweep       axis name ("B", "H", "T") when the config is a point of a sweep (for the plots)
    threads     CPU threads for the row (torch.set_num_threads, restored afterwards); None: the
                process setting (the CLI's --threads)
    """

    name: str
    mode: str
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "fp32"
    lengths: Optional[Tuple[int, int]] = None
    sweep: Optional[str] = None
    threads: Optional[int] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {tuple(DTYPES)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_cell(self) -> bool:
        return self.mode.endswith("Cell")

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def gates(self) -> int:
        """G / H: 4 for LSTM, 3 for GRU."""
        return 4 if self.mode.startswith("LSTM") else 3

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lengths"] = list(self.lengths) if self.lengths else None
        return d


def _name(mode, H, B, T, dtype, layers=1, bidir=False, packed=False, I=None, threads=None) -> str:
    s = mode.lower()
    if layers > 1:
        s += str(layers)
    if bidir:
        s += "-bidir"
    s += f"-h{H}"
    if I is not None and I != H:
        s += f"-i{I}"
    s += f"-b{B}"
    if not mode.endswith("Cell") or T != 1:
        s += f"-t{T}"
    if packed:
        s += "-packed"
    s += f"-{dtype}"
    if threads is not None:
        s += f"-thr{threads}"
    return s


def make(mode, H, B, T, dtype="fp32", I=None, layers=1, bidirectional=False, lengths=None,
         sweep=None, name=None, threads=None) -> BenchConfig:
    I = H if I is None else I
    if lengths is not None:
        T = lengths[1]
    name = name or _name(mode, H, B, T, dtype, layers, bidirectional, lengths is not None, I, threads)
    return BenchConfig(name=name, mode=mode, T=T, B=B, I=I, H=H, layers=layers,
                       bidirectional=bidirectional, dtype=dtype, lengths=lengths, sweep=sweep,
                       threads=threads)


# ------------------------------------------------------------------------------------- standard
STANDARD: List[BenchConfig] = [
    # fastrnns (pytorch/benchmarks/fastrnns) LSTM: fp32 with torch's default TF32 setting
    # (torch.backends.cudnn.allow_tf32 = True governs nn.LSTM), never changed by the harness.
    make("LSTM", 512, 64, 100, "fp32", name="fastrnns-lstm-fp32"),
    make("LSTM", 768, 16, 1024, "bf16", name="lstm-h768-b16-t1024-bf16"),
    make("LSTM", 768, 16, 1024, "fp16", name="lstm-h768-b16-t1024-fp16"),
    make("GRU", 768, 16, 1024, "bf16", name="gru-h768-b16-t1024-bf16"),
    make("LSTM", 1024, 4, 512, "bf16", name="lstm-h1024-b4-t512-bf16"),
    make("LSTM", 1024, 256, 128, "bf16", name="lstm-h1024-b256-t128-bf16"),
    # speech-style encoder: 80 filterbank features, 3 bidirectional layers, ragged batch
    make("LSTM", 512, 32, 400, "bf16", I=80, layers=3, bidirectional=True, lengths=(200, 400),
         name="lstm3-bidir-h512-b32-packed-bf16"),
    make("LSTM", 2048, 32, 256, "bf16", name="lstm-h2048-b32-t256-bf16"),
]

# ---------------------------------------------------------------------------------- quick (CPU)
QUICK_CPU: List[BenchConfig] = [
    make("LSTM", 64, 4, 16, "fp32"),
    make("LSTM", 128, 4, 16, "fp32"),
    make("GRU", 64, 4, 16, "fp32"),
    make("GRU", 128, 4, 16, "fp32"),
    make("LSTM", 64, 4, 16, "fp32", I=32, layers=2, bidirectional=True, lengths=(8, 16)),
    make("LSTMCell", 128, 4, 8, "fp32"),
    make("GRUCell", 128, 4, 8, "fp32"),
]

# the smallest configs: the Triton interpreter and the unit tests
TINY: List[BenchConfig] = [
    make("LSTM", 16, 2, 4, "fp32"),
    make("GRU", 16, 2, 4, "fp32"),
    make("LSTM", 16, 3, 4, "fp32", I=8, layers=2, bidirectional=True, lengths=(2, 4)),
    make("LSTMCell", 16, 2, 2, "fp32"),
    make("GRUCell", 16, 2, 2, "fp32"),
]

QUICK_CUDA_EXTRA = ["fastrnns-lstm-fp32", "lstm-h768-b16-t1024-bf16"]

# ------------------------------------------------------------------------------------------ CPU
# The CPU suite behind the `auto` rule on CPU (python/fusedrnn/backends/__init__.py): single-layer
# LSTM and GRU, I = H, over the H x B grid at T = 64 plus T = 16 / 256 and the other dtypes, each at
# 1 and 2 threads.  Every row times inference (fwd) and training (fwd+bwd) against torch.nn.
CPU_H = (64, 128, 256, 512, 1024)
CPU_B = (1, 4, 16, 64)
CPU_T = 64
CPU_THREADS = (1, 2)
# Short calls (streaming: one or a few steps per call), behind auto's short-call rule
# (backends._cpu_short_call): (T, B) pairs at these H, fp32, and one step of one sequence in the
# other dtypes at H = 256.
CPU_SHORT_TB = ((1, 1), (2, 1), (1, 4), (1, 16), (4, 4))
CPU_SHORT_H = (64, 256, 1024)


def _cpu_suite() -> List[BenchConfig]:
    out: List[BenchConfig] = []
    for threads in CPU_THREADS:
        for mode in ("LSTM", "GRU"):
            for H in CPU_H:
                for B in CPU_B:
                    out.append(make(mode, H, B, CPU_T, "fp32", threads=threads))
            for T in (16, 256):
                out.append(make(mode, 256, 4, T, "fp32", threads=threads))
            for dtype in ("bf16", "fp16", "fp64"):
                for H in (128, 512):
                    out.append(make(mode, H, 4, CPU_T, dtype, threads=threads))
            for H in CPU_SHORT_H:
                for T, B in CPU_SHORT_TB:
                    out.append(make(mode, H, B, T, "fp32", threads=threads))
            for dtype in ("bf16", "fp16", "fp64"):
                out.append(make(mode, 256, 1, 1, dtype, threads=threads))
    return out


def _sweeps() -> List[BenchConfig]:
    out: List[BenchConfig] = []
    for mode in ("LSTM", "GRU"):
        for B in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            out.append(make(mode, 1024, B, 256, "bf16", sweep="B"))
        for H in (128, 256, 384, 512, 768, 1024, 1536, 2048):
            out.append(make(mode, H, 16, 256, "bf16", sweep="H"))
        for T in (16, 64, 256, 1024, 4096):
            out.append(make(mode, 768, 16, T, "bf16", sweep="T"))
    for mode in ("LSTMCell", "GRUCell"):
        for H, B in ((256, 16), (512, 64), (1024, 16), (1024, 256), (2048, 32)):
            for dtype in ("bf16", "fp32"):
                out.append(make(mode, H, B, 16, dtype))
    return out


def _dedup(configs: List[BenchConfig]) -> List[BenchConfig]:
    seen, out = set(), []
    for c in configs:
        if c.name not in seen:
            seen.add(c.name)
            out.append(c)
    return out


SUITES = ("quick", "cpu", "standard", "full", "tiny")


def suite(name: str, device_type: str = "cpu") -> List[BenchConfig]:
    """The configs of suite ``name`` for a device type ("cpu" or "cuda")."""
    if name == "tiny":
        return list(TINY)
    if name == "quick":
        if device_type == "cuda":
            std = {c.name: c for c in STANDARD}
            return QUICK_CPU + [std[n] for n in QUICK_CUDA_EXTRA]
        return list(QUICK_CPU)
    if name == "cpu":
        return _cpu_suite()
    if name == "standard":
        return list(STANDARD)
    if name == "full":
        return _dedup(STANDARD + _sweeps())
    raise ValueError(f"unknown suite {name!r}; choose from {SUITES}")


def by_name(name: str) -> BenchConfig:
    for c in _dedup(TINY + QUICK_CPU + _cpu_suite() + STANDARD + _sweeps()):
        if c.name == name:
            return c
    raise KeyError(name)
