"""Backend registry and selection.

Every backend is a module that implements the op contract of ``fusedrnn.backends.reference``
(``lstm_fwd``, ``lstm_bwd``, ``gru_fwd``, ``gru_bwd``, ``lstm_cell_fwd``, ``lstm_cell_bwd``,
``gru_cell_fwd``, ``gru_cell_bwd``, same signatures, shapes and dtypes) plus two questions:

    unavailable() -> Optional[str]
        None when the backend can run in this process, else the reason it cannot.
    unsupported(cfg: RecurrenceConfig) -> Optional[str]
        None when it runs this configuration, else the reason (naming the limit).

``torch`` is special: it is not an op backend, the modules hand the whole forward to torch.nn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import warnings
from typing import Optional, Tuple

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference", "torch")
KERNEL_BACKENDS = ("triton", "cuda", "cpp", "reference")
ENV_VAR = "FUSEDRNN_BACKEND"

_MODULES = {
    "reference": "fusedrnn.backends.reference_backend",
    "triton": "fusedrnn.backends.triton",
    "cuda": "fusedrnn.backends.cuda",
    "cpp": "fusedrnn.backends.cpp",
}


@dataclasses.dataclass(frozen=True)
class RecurrenceConfig:
    """What a backend needs to know to say whether it runs a module call."""

    mode: str  # "LSTM", "GRU", "LSTMCell", "GRUCell"
    device_type: str  # "cpu", "cuda", ...
    device_index: int
    dtype: torch.dtype
    hidden_size: int
    proj_size: int = 0


def rnn_tf32_enabled() -> bool:
    """Whether fp32 recurrent GEMMs may use TF32: the flag torch.nn.LSTM/GRU follow on CUDA.

    torch >= 2.9 resolves it per operator: ``torch.backends.cudnn.rnn.fp32_precision`` ("tf32",
    "ieee", or "none" = inherit; the getter returns the resolved value, and "none" at the top of
    the chain means IEEE, as the legacy ``allow_tf32 = False`` maps to "none").  Reading the
    legacy ``torch.backends.cudnn.allow_tf32`` raises there once conv and rnn differ, so it is read
    only on older torch, where it is the one flag.
    """
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        return rnn.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def rnn_tf32(enabled: bool):
    """Set the flag :func:`rnn_tf32_enabled` reads inside the block, then restore it (tests, bench)."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    if rnn is not None and hasattr(rnn, "fp32_precision"):
        old = rnn.fp32_precision
        rnn.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            rnn.fp32_precision = old
    else:  # pragma: no cover - torch < 2.9
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = enabled
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


_LOADED: dict = {}  # name -> imported backend module (a failed import is retried on the next call)


def _load(name: str):
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = importlib.import_module(_MODULES[name])
    return mod


def get(name: str):
    """The module implementing the op contract for backend ``name``."""
    if name not in _MODULES:
        raise ValueError(f"fusedrnn: unknown kernel backend {name!r}; choose from {KERNEL_BACKENDS}")
    return _load(name)


def unavailable_reason(name: str) -> Optional[str]:
    """None if backend ``name`` can run in this process, else why not."""
    if name == "torch":
        return None
    try:
        mod = _load(name)
    except ImportError as e:  # pragma: no cover - depends on the environment
        return f"cannot import its module ({e})"
    return mod.unavailable()


def available_backends() -> dict:
    """{backend: None if usable here, else the reason it is not}, for every explicit backend."""
    return {name: unavailable_reason(name) for name in BACKENDS if name != "auto"}


def check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"fusedrnn: unknown backend {backend!r}; choose from {BACKENDS}")


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# CPU: smallest hidden size from which the ``cpp`` backend is faster than torch.nn, per (mode, dtype,
# pass), measured with ``python -m fusedrnn.bench --suite cpu`` (BENCHMARKS.md "CPU"; README "CPU").
# "inference": grad mode off; "training": forward + backward.  A missing entry: torch.nn is faster
# at every size measured (cells: their per-call Python path costs more than torch's fused cell).
# The table holds for calls of several steps (the CPU suite: T = 16...256); short calls follow
# ``_cpu_short_call`` first.  For fp32 LSTM torch.nn (oneDNN) is at the machine's FMA peak from
# B = 16 on, where cpp wins only at H = 1024 and small batches.
_CPU_CPP_FROM_HIDDEN = {
    ("GRU", torch.float32, "inference"): 1,
    ("GRU", torch.float32, "training"): 1,
    ("GRU", torch.bfloat16, "inference"): 1,
    ("GRU", torch.bfloat16, "training"): 1,
    ("GRU", torch.float16, "inference"): 1,
    ("GRU", torch.float16, "training"): 1,
    ("GRU", torch.float64, "inference"): 1,
    ("GRU", torch.float64, "training"): 1,
    ("LSTM", torch.float32, "inference"): 1024,
    ("LSTM", torch.float32, "training"): 1024,
    ("LSTM", torch.bfloat16, "training"): 512,  # inference: oneDNN's bf16 dot products win
    ("LSTM", torch.float16, "inference"): 1,
    ("LSTM", torch.float16, "training"): 1,
    ("LSTM", torch.float64, "inference"): 1,
    ("LSTM", torch.float64, "training"): 1,
}


def _cpu_short_call(cfg: RecurrenceConfig, steps: int, batch: int) -> Optional[tuple]:
    """The rule for a call of ``steps`` time steps of ``batch`` sequences where the per-call costs
    outweigh the recurrence (streaming), or None: the hidden-size table decides.  Measured in eager
    single-layer calls, one thread, (T, B) = (1, 1), (2, 1), (1, 4), (1, 16), (4, 4) at H = 64 / 256
    / 1024 (the CPU suite's short rows; BENCHMARKS.md "Issue 11, second pass"): oneDNN's fp32 LSTM
    sets up its primitive and reorders the weights on every call, which costs more than the whole
    cpp call at up to 4 steps of up to 16 sequences (cpp 1.1-4.7x in inference, 0.99-9x in
    training; B = 64 not measured); torch.nn's own one-step path (GRU; LSTM in fp16 / fp64, with a
    projection, or with oneDNN disabled) is two GEMVs and a few pointwise ops, which beat
    fusedrnn's per-call Python path and its input GEMV (cpp 0.7-0.96x below H = 1024); a bf16 LSTM
    (oneDNN with bf16 dot products) keeps the table's answer."""
    onednn_lstm = (cfg.mode == "LSTM" and cfg.proj_size == 0 and torch.backends.mkldnn.enabled
                   and cfg.dtype in (torch.float32, torch.bfloat16))
    if onednn_lstm and cfg.dtype == torch.float32 and steps <= 4 and 1 <= batch <= 16:
        return ("cpp",)
    if steps == 1 and not onednn_lstm:
        return ()
    return None


def _cpu_candidates(cfg: RecurrenceConfig, shape: Optional[Tuple[int, int]] = None):
    """``("cpp",)`` where the measured rule says cpp is faster (or torch.nn cannot run), else ().
    ``shape``: the call's (steps, batch) when known (eager calls), else the hidden-size rule alone."""
    if cfg.mode == "LSTM" and torch.is_autocast_enabled("cpu"):
        # torch.nn's LSTM fails under CPU autocast on some machines (oneDNN "could not create a
        # primitive descriptor" for fp32 input under bf16 autocast): ours runs it
        return ("cpp",)
    if shape is not None:
        short = _cpu_short_call(cfg, *shape)
        if short is not None:
            return short
    phase = "training" if torch.is_grad_enabled() else "inference"
    start = _CPU_CPP_FROM_HIDDEN.get((cfg.mode, cfg.dtype, phase))
    return ("cpp",) if start is not None and cfg.hidden_size >= start else ()


def _auto_candidates(cfg: RecurrenceConfig, shape: Optional[Tuple[int, int]] = None):
    """Order in which ``auto`` tries backends.  The rule lives here, once."""
    if cfg.device_type == "cuda":
        return ("cuda", "triton")
    if cfg.device_type == "cpu":
        return _cpu_candidates(cfg, shape)
    return ()


def resolve(requested: str, cfg: RecurrenceConfig, shape: Optional[Tuple[int, int]] = None) -> str:
    """Concrete backend for one call.  Explicit backends never fall back: they raise.

    ``shape``: (time steps, batch) of the call, for ``auto``'s CPU rule on short calls; None
    (cells, compiled graphs) leaves the choice to the hidden-size rule."""
    check_backend_name(requested)
    if requested == "auto":
        env = os.environ.get(ENV_VAR, "")
        if env:
            check_backend_name(env)
            requested = env
    if requested == "torch":
        return "torch"
    if requested != "auto":
        reason = unavailable_reason(requested)
        if reason is None:
            reason = get(requested).unsupported(cfg)
            if reason is not None:
                raise ValueError(f"fusedrnn: backend={requested!r} does not support this {cfg.mode}: {reason}")
        else:
            raise NotImplementedError(f"fusedrnn: backend={requested!r} is not available: {reason}")
        return requested
    reasons = []
    for name in _auto_candidates(cfg, shape):
        reason = unavailable_reason(name)
        if reason is None:
            reason = get(name).unsupported(cfg)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    if reasons:
        _warn_once(
            ("auto", cfg),
            f"fusedrnn: backend='auto' falls back to torch for {cfg.mode} "
            f"({cfg.dtype}, hidden_size={cfg.hidden_size}, {cfg.device_type}) because "
            + "; ".join(reasons),
        )
    return "torch"
