"""Drop-in torch.nn modules: input handling only (packed, unbatched, batch_first, hx, autocast).

``fusedrnn.LSTM`` / ``GRU`` / ``LSTMCell`` / ``GRUCell`` subclass their torch.nn counterparts, so
constructor, parameters (names, shapes, order, initialisation), ``state_dict`` and ``repr`` are
torch's.  The only addition is the keyword-only ``backend`` argument (see ``fusedrnn.backends``).
The compute goes through ``fusedrnn.functional`` -> ``fusedrnn.ops`` -> the chosen backend, except
for ``backend="torch"`` (or ``auto`` choosing torch), which calls torch.nn's own forward.

Bad input.  Every call is validated strictly first (shapes, dtypes, devices and the structure of
``hx``).  A call found invalid is handed to torch.nn's own forward, so the exception raised is
exactly torch's (type and message, on this device and torch version).  Where torch.nn would
instead accept the call silently (a state batch larger than a packed batch, whose extra rows it
drops; a Tensor where the tuple ``(h_0, c_0)`` is due, which it splits; extra tuple entries) or
would crash the process (LSTMCell with an unbatched input and batched states), fusedrnn raises its
own error naming the shapes and never calls torch.
"""

from __future__ import annotations

import contextvars
import copy
import os
import sys
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import backends, functional
from .functional import _cast
from .backends import RecurrenceConfig


# ------------------------------------------------------------------------------ backend choice
@torch.compiler.assume_constant_result
def _resolve(requested: str, mode: str, device_type: str, device_index: int, dtype: torch.dtype,
             hidden_size: int, proj_size: int, steps: Optional[int] = None, batch: Optional[int] = None) -> str:
    cfg = RecurrenceConfig(mode, device_type, device_index, dtype, hidden_size, proj_size)
    return backends.resolve(requested, cfg, None if steps is None else (steps, batch))


def _auto_requested(requested: str) -> bool:
    """Whether ``requested`` leaves the choice to ``auto`` (FUSEDRNN_BACKEND unset or "auto")."""
    return requested == "auto" and os.environ.get(backends.ENV_VAR, "") in ("", "auto")


# Kernel backends ``auto`` turns to, per device type, for a call torch.nn itself fails to run.
_WHEN_TORCH_FAILS = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton")}
_torch_failures: dict = {}  # call signature -> (backend, torch's error): torch is tried once


def _runnable(name: str, cfg: RecurrenceConfig) -> bool:
    if backends.unavailable_reason(name) is not None:
        return False
    return backends.get(name).unsupported(cfg) is None


def _signature(module, cfg: RecurrenceConfig, input, hx):
    """What decides whether torch.nn can run a call (not its sizes in time or batch)."""
    data = input.data if isinstance(input, PackedSequence) else input
    states = () if hx is None else (tuple(hx) if isinstance(hx, (tuple, list)) else (hx,))
    return (
        type(module), cfg, isinstance(input, PackedSequence), data.dim(), data.dtype,
        tuple(s.dtype for s in states), _autocast(cfg.device_type), torch.backends.mkldnn.enabled,
    )


def _torch_or_fallback(module, torch_forward, input, hx, cfg: RecurrenceConfig) -> Tuple[Optional[str], object]:
    """Run torch.nn's forward for an ``auto`` call; if torch.nn itself fails on this (valid)
    call, e.g. oneDNN's "could not create a primitive descriptor" for an LSTM under CPU autocast
    on a CPU without native fp16/bf16 support, return the kernel backend that runs it instead
    (with a one-time warning quoting torch's error).  Returns (None, result) or (backend, None)."""
    key = _signature(module, cfg, input, hx)
    if key not in _torch_failures:
        try:
            return None, torch_forward(input, hx)
        except RuntimeError as err:
            out_of_memory = isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)
            candidates = [n for n in _WHEN_TORCH_FAILS.get(cfg.device_type, ()) if _runnable(n, cfg)]
            if out_of_memory or not candidates:
                raise
            _torch_failures[key] = (candidates[0], str(err).splitlines()[0])
    backend, reason = _torch_failures[key]
    backends._warn_once(
        ("torch-failed", key),
        f"fusedrnn: backend='auto' runs this {cfg.mode} call ({cfg.dtype}, {cfg.device_type}) with "
        f"backend={backend!r} because torch.nn fails on it: {reason}",
    )
    return backend, None


class _BackendMixin:
    """The ``backend`` attribute shared by every fusedrnn module."""

    def _set_backend(self, backend: str) -> None:
        backends.check_backend_name(backend)
        self.backend = backend

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")

    # torch.ao.quantization's eager mode assigns ``qconfig`` to every module it visits, then
    # matches modules to quantized ones by exact class, which a fusedrnn module never is: the
    # setter turns that silent skip into an error or a warning (see ``_check_qconfig``).  The
    # value lives in ``__dict__["qconfig"]``, where torch.nn classes keep it.
    @property
    def qconfig(self):
        try:
            return self.__dict__["qconfig"]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'qconfig'") from None

    @qconfig.setter
    def qconfig(self, value):
        _check_qconfig(self, value)
        self.__dict__["qconfig"] = value

    @qconfig.deleter
    def qconfig(self):
        if self.__dict__.pop("qconfig", _MISSING) is _MISSING:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'qconfig'")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"

    def __prepare_scriptable__(self):
        """torch.jit.script calls this on every module before compiling: refuse clearly (and
        before anything is compiled or swapped) instead of failing deep inside TorchScript."""
        name = _twin_name(type(self))
        raise RuntimeError(
            f"fusedrnn.{name} cannot be compiled by torch.jit.script: its forward validates the call "
            "and dispatches to the chosen backend's kernels in Python, which TorchScript does not "
            "compile. Use torch.compile(model) (fullgraph works), or torch.jit.trace(model, "
            "example_inputs) (it records fusedrnn's custom ops; the traced module saves, and loads "
            "where fusedrnn is imported), or script the model before fusedrnn.convert (it then "
            f"runs torch.nn.{name})."
        )

    def _config(self, mode: str, input: Tensor, dtype: torch.dtype, proj_size: int = 0) -> RecurrenceConfig:
        dev = input.device
        return RecurrenceConfig(mode, dev.type, -1 if dev.index is None else dev.index, dtype,
                                self.hidden_size, proj_size)

    def _choose_backend(self, cfg: RecurrenceConfig, x: Optional[Tensor] = None) -> str:
        """The backend of a call; ``x`` (T, B, I), when given, lets ``auto`` see the call's steps
        and batch (its CPU rule for short calls).  Only in plain eager calls: a compiled, exported
        or jit-traced graph's backend must not depend on sizes that may stay symbolic or change at
        replay, so those use the hidden-size rule (measured on the eager path anyway)."""
        steps = batch = None
        if (x is not None and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
                and all(type(n) is int for n in x.shape[:2])):
            steps, batch = x.shape[0], x.shape[1]
        return _resolve(self.backend, cfg.mode, cfg.device_type, cfg.device_index, cfg.dtype,
                        cfg.hidden_size, cfg.proj_size, steps, batch)

    def _run_torch(self, torch_forward, input, hx, cfg: RecurrenceConfig):
        """(backend to run instead, torch's result): torch.nn's forward for a call resolved to
        "torch"; only ``auto`` may turn to a kernel backend when torch.nn fails."""
        if not _auto_requested(self.backend) or torch.compiler.is_compiling():
            return None, torch_forward(input, hx)
        return _torch_or_fallback(self, torch_forward, input, hx, cfg)


# --------------------------------------------------------------------------------- validation
class _Refuse(str):
    """A problem with a call that fusedrnn reports itself, without calling torch.nn (there,
    torch.nn would crash the process)."""


def _reject(torch_forward, args, problem: str, name: str):
    """Raise torch.nn's own exception for a call fusedrnn found invalid (``problem`` says why),
    or, where torch.nn would accept the call or crash on it, a RuntimeError naming ``problem``."""
    if not isinstance(problem, _Refuse):
        try:
            torch_forward(*args)
        except Exception as err:  # noqa: BLE001 - whatever torch.nn raises is the answer
            raise err from None
        problem = f"{problem} (torch.nn.{name} runs this call without an error; fusedrnn refuses it)"
    raise RuntimeError(f"fusedrnn.{name}: {problem}")


def _autocast(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for ``device_type``, else None."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_dtype_problem(tensors, autocast: torch.dtype, device_type: str) -> Optional[str]:
    """Dtypes torch.nn runs under autocast: float32, float16 and bfloat16 (autocast casts them
    for the GEMMs); float64 reaches the GEMMs uncast and fails there."""
    allowed = {torch.float32, torch.float16, torch.bfloat16}
    for t in tensors:
        if t.dtype not in allowed:
            return f"{t.dtype} tensor under {device_type} autocast ({autocast}): only {sorted(map(str, allowed))} run"
    return None


def _device_problem(input: Tensor, tensors) -> Optional[str]:
    for t in tensors:
        if t is not None and t.device != input.device:
            return f"tensors on {input.device} and {t.device}"
    return None


def _state_tuple(hx, n: int, mode: str):
    """``hx`` as a tuple of ``n`` Tensors, or a problem: LSTM states are exactly (h, c), GRU's a
    Tensor.  (torch.nn splits a Tensor given for (h, c) in some paths and ignores extra tuple
    entries: fusedrnn does not guess.)"""
    if n == 1:
        return (hx,) if isinstance(hx, Tensor) else f"hx must be a Tensor for {mode}, got {type(hx).__name__}"
    if not isinstance(hx, (tuple, list)) or len(hx) != n or not all(isinstance(t, Tensor) for t in hx):
        what = f"a Tensor of shape {tuple(hx.shape)}" if isinstance(hx, Tensor) else (
            f"a {type(hx).__name__} of {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__)
        return f"hx must be a tuple (h_0, c_0) of two Tensors for {mode}, got {what}"
    return tuple(hx)


# ------------------------------------------------------------------------------------ LSTM / GRU
class _RNNCall(NamedTuple):
    """A validated RNN call, in the form functional.rnn takes."""

    x: Tensor  # (T, B, I) time-major, padded (packed input scattered into the caller's batch order)
    lengths: Optional[Tensor]  # (B,) per-sequence lengths of packed input, else None
    packed_index: Optional[Tuple[Tensor, Tensor]]  # (t, b) of every packed row, in packed order
    h0: Tensor  # (L*D, B, P)
    c0: Optional[Tensor]  # (L*D, B, H) for LSTM
    dtype: torch.dtype  # the recurrence runs in it
    out_dtypes: Tuple[torch.dtype, torch.dtype]  # (output and h_n, c_n): torch.nn's under autocast
    autocast: bool
    is_batched: bool


class _FusedRNNBase(_BackendMixin):
    """Shared forward of LSTM and GRU; ``self.mode`` is "LSTM" or "GRU"."""

    def _fused_forward(self, input, hx):
        self._update_flat_weights()
        torch_forward = super().forward
        call = self._prepare(input, hx)
        if isinstance(call, str):
            _reject(torch_forward, (input, hx), call, self.mode)
        data = input.data if isinstance(input, PackedSequence) else input
        cfg = self._config(self.mode, data, call.dtype, self.proj_size)
        backend = self._choose_backend(cfg, call.x)
        if backend == "torch":
            backend, result = self._run_torch(torch_forward, input, hx, cfg)
            if backend is None:
                return result
        return self._run_kernels(input, call, backend)

    def _prepare(self, input, hx):
        """torch.nn's input handling, strict: a _RNNCall, or a string naming the problem."""
        is_lstm = self.mode == "LSTM"
        H = self.hidden_size
        P = self.proj_size if self.proj_size > 0 else H
        LD = self.num_layers * (2 if self.bidirectional else 1)
        weight = self._flat_weights[0]
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes = input.data, input.batch_sizes
            if data.dim() != 2:
                return f"packed data must be 2-D (rows, input_size), got {data.dim()}-D"
            is_batched = True
            B = int(batch_sizes[0])
        else:
            if not isinstance(input, Tensor):
                return f"input must be a Tensor or PackedSequence, got {type(input).__name__}"
            if input.dim() not in (2, 3):
                return f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead"
            data = input
            is_batched = input.dim() == 3
            B = (input.size(0) if self.batch_first else input.size(1)) if is_batched else 1
            T = (input.size(1) if self.batch_first else input.size(0)) if is_batched else input.size(0)
            if T == 0:
                return "Expected sequence length to be larger than 0 in RNN"
        if data.size(-1) != self.input_size:
            return f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {data.size(-1)}"

        states = ()
        if hx is not None:
            states = _state_tuple(hx, 2 if is_lstm else 1, self.mode)
            if isinstance(states, str):
                return states
            expected = [(LD, B, P), (LD, B, H)] if is_lstm else [(LD, B, H)]
            for k, (s, shape) in enumerate(zip(states, expected)):
                shape = shape if is_batched else (shape[0], shape[2])
                if tuple(s.shape) != shape:
                    return f"Expected hidden[{k}] size {shape}, got {list(s.shape)}"

        problem = _device_problem(data, states + tuple(self._flat_weights))
        if problem:
            return problem
        autocast = _autocast(data.device.type)
        if autocast is None:
            for t in states + (data,):
                if t.dtype != weight.dtype:
                    return f"input, states and weights must share one dtype, got {t.dtype} and {weight.dtype}"
            dtype, out_dtypes = weight.dtype, (weight.dtype, weight.dtype)
        else:
            problem = _autocast_dtype_problem(states + (data,), autocast, data.device.type)
            if problem:
                return problem
            dtype, out_dtypes = self._autocast_dtypes(data, states, autocast, packed)

        if packed:
            t_idx, b_idx, lengths, T, _ = _packed_layout(batch_sizes, input.sorted_indices, data.device)
            x = data.new_zeros((T, B, data.size(-1))).index_put((t_idx, b_idx), data)
            packed_index = (t_idx, b_idx)
        else:
            lengths, packed_index = None, None
            x = data if is_batched else data.unsqueeze(0 if self.batch_first else 1)
            x = x.transpose(0, 1) if self.batch_first else x
        if hx is None:
            h0 = x.new_zeros((LD, B, P), dtype=dtype)
            c0 = x.new_zeros((LD, B, H), dtype=dtype) if is_lstm else None
        else:
            h0 = states[0] if is_batched else states[0].unsqueeze(1)
            c0 = None
            if is_lstm:
                c0 = states[1] if is_batched else states[1].unsqueeze(1)
        return _RNNCall(x, lengths, packed_index, h0, c0, dtype, out_dtypes, autocast is not None, is_batched)

    def _autocast_dtypes(self, data: Tensor, states, autocast: torch.dtype, packed: bool):
        """(dtype the recurrence runs in, (output/h_n dtype, c_n dtype)) as torch.nn returns them.

        CUDA (cuDNN): everything in the autocast dtype.  CPU: an LSTM that torch runs through
        oneDNN (``_onednn_lstm``) returns the autocast dtype; otherwise torch's CPU recurrence
        computes the gates' GEMMs in the autocast dtype and the state update in that dtype
        promoted with the states' (the given c_0 / h_0, else the input's); a projection (a GEMM)
        returns the autocast dtype.  (Read from ATen's RNN.cpp, checked on torch 2.11 and 2.14.)
        """
        if data.device.type != "cpu":
            return autocast, (autocast, autocast)
        is_lstm = self.mode == "LSTM"
        if is_lstm and not packed and self.proj_size == 0 and _onednn_lstm(data):
            return autocast, (autocast, autocast)
        # c_0 for LSTM, h_0 for GRU, promoted with the gates (which are in the autocast dtype)
        state = torch.promote_types(autocast, states[-1].dtype if states else data.dtype)
        h_dtype = autocast if (is_lstm and self.proj_size > 0) else state
        wide = torch.promote_types(h_dtype, state)
        return wide, (h_dtype, state)

    def _run_kernels(self, input, call: _RNNCall, backend: str):
        is_lstm = self.mode == "LSTM"
        per_direction = self._weights_per_direction()
        flat = self._flat_weights
        weights = [
            _to_layer_weights(flat[i : i + per_direction], is_lstm, self.bias, self.proj_size)
            for i in range(0, len(flat), per_direction)
        ]
        x, h0, c0 = call.x, call.h0, call.c0
        if x.dtype != call.dtype or h0.dtype != call.dtype or flat[0].dtype != call.dtype:
            x, h0 = x.to(call.dtype), h0.to(call.dtype)
            c0 = c0.to(call.dtype) if c0 is not None else None
            weights = [tuple(None if w is None else w.to(call.dtype) for w in lw) for lw in weights]
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False) if call.autocast else _nullcontext():
            y, h_n, c_n = functional.rnn(
                self.mode, x, call.lengths, h0, c0, weights,
                num_layers=self.num_layers, bidirectional=self.bidirectional,
                dropout=float(self.dropout), training=self.training, backend=backend,
                packed_index=call.packed_index,
            )
        out_dtype, c_dtype = call.out_dtypes
        y, h_n, c_n = _cast(y, out_dtype), _cast(h_n, out_dtype), _cast(c_n, c_dtype)
        if isinstance(input, PackedSequence):
            t_idx, b_idx = call.packed_index
            out = PackedSequence(y[t_idx, b_idx], input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        else:
            out = y.transpose(0, 1) if self.batch_first else y
            if not call.is_batched:
                out = out.squeeze(0 if self.batch_first else 1)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if c_n is not None else None
        return out, ((h_n, c_n) if is_lstm else h_n)

    def _weights_per_direction(self) -> int:
        n = 4 if self.bias else 2
        return n + (1 if getattr(self, "proj_size", 0) > 0 else 0)


def _onednn_lstm(data: Tensor) -> bool:
    """Whether torch.nn runs this (unpacked, unprojected) CPU LSTM input through oneDNN: the
    conditions of ATen's ``use_mkldnn`` (aten/src/ATen/native/RNN.cpp)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled) or data.numel() == 0:
        return False
    if data.dtype == torch.float32:
        return True
    if data.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if data.dtype == torch.float16:
        return not torch.is_grad_enabled() and torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def _packed_layout(batch_sizes: Tensor, sorted_indices: Optional[Tensor], device):
    """Index tensors mapping packed rows to (t, b) in the caller's batch order, and lengths.

    Row k of packed data is step t_idx[k] of sequence b_idx[k] (original order); lengths (B,).
    """
    bs = batch_sizes.to("cpu", torch.int64)
    T = bs.numel()
    B = int(bs[0]) if T > 0 else 0
    total = int(bs.sum())
    t_idx = torch.repeat_interleave(torch.arange(T), bs)
    starts = torch.cumsum(bs, 0) - bs
    j_idx = torch.arange(total) - torch.repeat_interleave(starts, bs)
    lengths_sorted = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)
    if sorted_indices is not None:
        order = sorted_indices.to("cpu", torch.int64)
        b_idx = order[j_idx]
        lengths = torch.empty_like(lengths_sorted)
        lengths[order] = lengths_sorted
    else:
        b_idx = j_idx
        lengths = lengths_sorted
    return t_idx.to(device), b_idx.to(device), lengths, T, B


def _to_layer_weights(w, is_lstm: bool, bias: bool, proj_size: int):
    """torch.nn's per-direction weight list -> (w_ih, w_hh, b_ih, b_hh, w_hr)."""
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
    w_hr = w[-1] if (is_lstm and proj_size > 0) else None
    return (w_ih, w_hh, b_ih, b_hh, w_hr)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class LSTM(_FusedRNNBase, nn.LSTM):
    """Drop-in ``torch.nn.LSTM`` running on fusedrnn's kernels.

    Same constructor as ``torch.nn.LSTM`` plus keyword-only ``backend`` in
    {"auto", "triton", "cuda", "cpp", "reference", "torch"} (``FUSEDRNN_BACKEND`` overrides "auto").
    Input (T, B, I) / (B, T, I) with ``batch_first`` / (T, I) unbatched / PackedSequence;
    ``hx`` a tuple (h_0 (L*D, B, P), c_0 (L*D, B, H)) or None; returns ``output, (h_n, c_n)``
    exactly as torch.nn.LSTM (dtypes under autocast included).  Bad input raises torch.nn's
    exception (see the module docstring for the cases fusedrnn refuses itself).
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_backend(backend)

    def forward(self, input, hx=None):  # noqa: D102 - same contract as torch.nn.LSTM
        return self._fused_forward(input, hx)


class GRU(_FusedRNNBase, nn.GRU):
    """Drop-in ``torch.nn.GRU`` running on fusedrnn's kernels (see ``LSTM`` for ``backend``)."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_backend(backend)

    def forward(self, input, hx=None):  # noqa: D102
        return self._fused_forward(input, hx)


# ------------------------------------------------------------------------------------------ cells
class _CellCall(NamedTuple):
    x: Tensor  # (B, I)
    states: Tuple[Tensor, ...]  # (h,) or (h, c), each (B, H)
    dtype: torch.dtype  # the fused cell runs in it; also the dtype of the results
    gemm_dtype: torch.dtype  # x @ W_ih^T and h @ W_hh^T run in it
    autocast: bool
    is_batched: bool


def _prepare_cell(module, input, hx, is_lstm: bool):
    """torch.nn's cell input handling, strict: a _CellCall, or a string naming the problem."""
    name = "LSTMCell" if is_lstm else "GRUCell"
    H = module.hidden_size
    if not isinstance(input, Tensor) or input.dim() not in (1, 2):
        return f"{name}: Expected input to be 1D or 2D"
    is_batched = input.dim() == 2
    B = input.size(0) if is_batched else 1
    states = ()
    if hx is not None:
        states = _state_tuple(hx, 2 if is_lstm else 1, name)
        if isinstance(states, str):
            return states
        for k, s in enumerate(states):
            if s.dim() != input.dim():
                problem = (
                    f"{'batched 2-D' if is_batched else 'unbatched 1-D'} input of shape "
                    f"{tuple(input.shape)} with a {s.dim()}-D hidden{k} of shape {tuple(s.shape)}: "
                    "input and states must both be batched or both unbatched"
                )
                if is_lstm and not is_batched and s.dim() == 2 and _torch_lstm_cell_checks_pass(module, input, states):
                    return _Refuse(problem + " (torch.nn.LSTMCell crashes the process on this call)")
                return problem
    if input.size(-1) != module.input_size:
        return f"input has inconsistent input_size: got {input.size(-1)} expected {module.input_size}"
    for k, s in enumerate(states):
        if tuple(s.shape) != ((B, H) if is_batched else (H,)):
            return f"hidden{k} has shape {tuple(s.shape)}, expected {(B, H) if is_batched else (H,)}"
    params = [module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh]
    problem = _device_problem(input, states + tuple(params))
    if problem:
        return problem
    weight_dtype = module.weight_ih.dtype
    autocast = _autocast(input.device.type)
    if autocast is None:
        # the GEMMs need x and h in the weights' dtype; LSTM's c is promoted (c_new = f * c + i * g)
        for t in (input, states[0]) if states else (input,):
            if t.dtype != weight_dtype:
                return f"mat1 and mat2 must have the same dtype, got {t.dtype} and {weight_dtype}"
        dtype = torch.promote_types(weight_dtype, states[-1].dtype) if states else weight_dtype
        gemm_dtype = weight_dtype
    else:
        problem = _autocast_dtype_problem(states + (input,), autocast, input.device.type)
        if problem:
            return problem
        if input.device.type == "cpu":
            # torch's CPU cells: GEMMs in the autocast dtype, the state update in that dtype
            # promoted with the state's (the given c / h, else the input's)
            dtype = torch.promote_types(autocast, states[-1].dtype if states else input.dtype)
        else:
            dtype = autocast  # CUDA autocast casts the whole cell
        gemm_dtype = dtype
    x = input if is_batched else input.unsqueeze(0)
    if states:
        states = states if is_batched else tuple(s.unsqueeze(0) for s in states)
    else:
        zeros = x.new_zeros((B, H), dtype=dtype)
        states = (zeros, zeros) if is_lstm else (zeros,)
    return _CellCall(x, states, dtype, gemm_dtype, autocast is not None, is_batched)


def _torch_lstm_cell_checks_pass(module, input: Tensor, states) -> bool:
    """Whether torch's native lstm_cell checks would pass on an unbatched input with the states
    torch.nn builds from ``states`` (each unsqueezed at dim 0): its state-update code then
    crashes the process instead of raising, so fusedrnn must never hand it this call."""
    if input.size(-1) != module.input_size:
        return False
    for s in states:
        s = s.unsqueeze(0)
        if s.dim() < 2 or s.size(0) != 1 or s.size(1) != module.hidden_size:
            return False
    return True


class _FusedCellBase(_BackendMixin):
    """Shared forward of LSTMCell and GRUCell; ``self._is_lstm`` says which."""

    def _cell_forward(self, input, hx):
        name = "LSTMCell" if self._is_lstm else "GRUCell"
        torch_forward = super().forward
        call = _prepare_cell(self, input, hx, self._is_lstm)
        if isinstance(call, str):
            _reject(torch_forward, (input, hx), call, name)
        cfg = self._config(name, call.x, call.dtype)
        backend = self._choose_backend(cfg)
        if backend == "torch":
            backend, result = self._run_torch(torch_forward, input, hx, cfg)
            if backend is None:
                return result
        params = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        x, states = call.x, call.states
        if call.gemm_dtype != self.weight_ih.dtype:
            params = [_cast(p, call.gemm_dtype) for p in params]
        x = _cast(x, call.gemm_dtype)
        with torch.autocast(x.device.type, enabled=False) if call.autocast else _nullcontext():
            if self._is_lstm:
                h, c = states
                out = functional.lstm_cell(x, _cast(h, call.gemm_dtype), _cast(c, call.dtype), *params,
                                           backend=backend, dtype=call.dtype)
            else:
                (h,) = states
                out = (functional.gru_cell(x, _cast(h, call.dtype), *params, backend=backend, dtype=call.dtype),)
        if not call.is_batched:
            out = tuple(o.squeeze(0) for o in out)
        return out if self._is_lstm else out[0]


class LSTMCell(_FusedCellBase, nn.LSTMCell):
    """Drop-in ``torch.nn.LSTMCell`` (fused bias + activations + state update).

    Input (B, I) or (I,); ``hx`` a tuple (h, c) of (B, H) / (H,) or None; returns (h', c').
    A ``c`` in a wider dtype than the input promotes the results, as torch.nn does.
    """

    _is_lstm = True

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):  # noqa: D102
        return self._cell_forward(input, hx)


class GRUCell(_FusedCellBase, nn.GRUCell):
    """Drop-in ``torch.nn.GRUCell`` (fused bias + activations + state update)."""

    _is_lstm = False

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:  # noqa: D102
        return self._cell_forward(input, hx)


# ---------------------------------------------------------------------------------------- convert
_TWINS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}
_combined_classes: dict = {}  # (user subclass, fusedrnn twin) -> the class converted instances get


def _twin_of(cls) -> Optional[type]:
    """The fusedrnn twin of a subclass of nn.LSTM / GRU / LSTMCell / GRUCell, else None."""
    for base, twin in _TWINS.items():
        if issubclass(cls, base):
            return twin
    return None


def _twin_name(cls) -> str:
    twin = _twin_of(cls)
    return twin.__name__ if twin is not None else cls.__name__


def _new_converted(original: type, twin: type):
    """Unpickling helper for instances of a converted subclass (see ``_converted_class``)."""
    return object.__new__(_converted_class(original, twin))


def _reduce_converted(self, protocol):
    # the class is made at run time: pickle (and deepcopy) rebuild it from the user's class
    return _new_converted, (self._fusedrnn_original, _twin_of(type(self))), self.__getstate__()


def _converted_class(cls: type, twin: type) -> type:
    """The class of a converted instance of ``cls``: ``cls`` itself first in the MRO, then the
    fusedrnn twin, so a subclass's own forward (calling ``super().forward``) and attributes keep
    working and reach fusedrnn's forward.  One class per (cls, twin), made on first use."""
    if cls in _TWINS:
        return twin
    key = (cls, twin)
    if key not in _combined_classes:
        _combined_classes[key] = type(
            cls.__name__,
            (cls, twin),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "_fusedrnn_original": cls,
                "__reduce_ex__": _reduce_converted,
            },
        )
    return _combined_classes[key]


def _parametrized_class(module, twin: type) -> type:
    """A parametrized module (torch.nn.utils.parametrize) has a class made for it over its
    original class, holding the parametrized tensors as properties.  Its converted class is the
    same over the converted original, so torch's bookkeeping (``type_before_parametrizations``,
    ``remove_parametrizations``) sees the fusedrnn class as the original."""
    cls = type(module)
    original = cls.__bases__[0]
    base = original if issubclass(original, _BackendMixin) else _converted_class(original, twin)
    return _reparametrized(cls, base)


def _reparametrized(cls: type, base: type) -> type:
    """The parametrized class ``cls`` (torch.nn.utils.parametrize) over another original class."""
    own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__", "__doc__")}
    return type(cls.__name__, (base,), own)


def _scripted_rnns(model) -> list:
    """Names of TorchScript modules inside ``model`` compiled from an RNN torch.nn class."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            for sub_name, sub in module.named_modules():
                if getattr(sub, "original_name", None) in ("LSTM", "GRU", "LSTMCell", "GRUCell"):
                    found[".".join(n for n in (name, sub_name) if n)] = None
    return list(found)


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every LSTM / GRU / LSTMCell / GRUCell inside ``model`` a fusedrnn module, in place.

    Every instance of the four torch.nn classes is converted, subclasses included (a subclass
    keeps its own methods, first in the MRO, e.g. a ``forward`` that calls ``super().forward``),
    and parametrized modules (``torch.nn.utils.parametrize``, e.g. ``weight_norm``) keep their
    parametrizations.  The modules keep their identity, parameters (same Parameter objects, so
    optimizers stay valid), device, dtype, training mode and hooks; only their class changes.
    Modules already converted get ``backend``.  Returns ``model`` (converted itself when it is
    one of those modules).

    Raises TypeError for a TorchScript module (its code is compiled: convert before scripting);
    warns when TorchScript submodules hold RNNs, which stay as they are.
    """
    backends.check_backend_name(backend)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            "fusedrnn.convert: the model is a TorchScript module (torch.jit.script / trace output); "
            "its code is compiled and its modules cannot change class. Convert the nn.Module "
            "before scripting or tracing it."
        )
    scripted = _scripted_rnns(model)
    if scripted:
        warnings.warn(
            f"fusedrnn.convert: TorchScript submodules hold RNNs that cannot be converted and "
            f"stay torch.nn's: {', '.join(scripted)}",
            RuntimeWarning,
            stacklevel=2,
        )
    for module in model.modules():
        cls = type(module)
        twin = _twin_of(cls)
        if twin is None or isinstance(module, torch.jit.ScriptModule):
            continue
        if not isinstance(module, _BackendMixin):
            if parametrize.is_parametrized(module):
                module.__class__ = _parametrized_class(module, twin)
            else:
                module.__class__ = _converted_class(cls, twin)
        module.backend = backend
    return model


# ----------------------------------------------------------------------------------- quantization
_MISSING = object()
_TORCH_CLASS = {twin: base for base, twin in _TWINS.items()}
# True inside fusedrnn.quantize_dynamic: torch then sees the modules it can match as torch.nn's,
# and treats the rest (subclasses of fusedrnn's classes) as it treats subclasses of torch.nn's
_quantizing_as_torch = contextvars.ContextVar("fusedrnn_quantizing_as_torch", default=False)


def _check_qconfig(module, qconfig) -> None:
    """Called when something (torch.ao.quantization's eager mode: ``propagate_qconfig_``, hence
    ``quantize_dynamic``, ``prepare``, ``quantize``) assigns ``module.qconfig``.

    torch matches a module to its qconfig and to its quantized class by exact class (its tables
    are keyed by ``torch.nn.LSTM`` ..., and ``from_float`` checks ``type(module)``), so it never
    quantizes a fusedrnn module, and says nothing.  A qconfig given to this module (by its name,
    by a parent's qconfig, or by a fusedrnn class in the spec) is a request torch would leave
    unanswered: raise.  None is what torch gives every module its spec does not name, a fusedrnn
    module even when the spec names ``torch.nn.LSTM``: warn that it stays float, when the spec
    does name this module's torch.nn class (read from torch's propagation frame); None set by a
    user (``module.qconfig = None``: keep it float) or from a spec that names no RNN is silent.
    """
    if _quantizing_as_torch.get():
        return
    if qconfig is None and not _spec_names_torch_class(module):
        return
    name = _twin_name(type(module))
    how = (f"fusedrnn.quantize_dynamic(model, ...) takes torch's arguments and quantizes it as "
           f"the torch.nn.{name} it replaces (or quantize before fusedrnn.convert)")
    if qconfig is not None:
        raise RuntimeError(
            f"fusedrnn.{name}: torch.ao.quantization gave this module a qconfig, but it matches "
            f"modules to their quantized classes by exact class (torch.nn.{name}, not fusedrnn's), "
            f"so it would leave this module in float without a word. {how}."
        )
    warnings.warn(
        f"fusedrnn.{name}: torch.ao.quantization leaves this module in float: it matches qconfigs "
        f"and quantized classes by exact class, so a fusedrnn module is skipped even where the "
        f"qconfig_spec names torch.nn.{name} (as quantize_dynamic's default does). {how}.",
        RuntimeWarning,
        stacklevel=3,
    )


def _spec_names_torch_class(module) -> bool:
    """Whether torch.ao.quantization is assigning ``module.qconfig`` from a qconfig spec that names
    the torch.nn class this module replaces (so a user asked for it to be quantized).  Reads the
    spec from the frame of torch's ``_propagate_qconfig_helper`` (its ``qconfig_dict``); outside
    that helper (a user's own assignment) False; a helper without that local (another torch
    version): True, so the skip is never silent."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_propagate_qconfig_helper" and "torch" in frame.f_code.co_filename:
            spec = frame.f_locals.get("qconfig_dict", _MISSING)
            if not isinstance(spec, dict):
                return True
            bases = [c for c in type(module).__mro__ if c in _TWINS]
            return any(c in spec for c in bases)
        frame = frame.f_back
    return False


def _torch_class(module) -> Optional[type]:
    """The class torch.nn would have given ``module``: the torch.nn class for fusedrnn's own
    classes, the user's class for a converted subclass, the same parametrized class over either
    for a parametrized module.  None for a class fusedrnn did not make (a user's subclass of a
    fusedrnn class), which torch.ao.quantization then treats as it treats a subclass of torch's."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        original = _torch_class_of(cls.__bases__[0])
        return None if original is None else _reparametrized(cls, original)
    return _torch_class_of(cls)


def _torch_class_of(cls: type) -> Optional[type]:
    return _TORCH_CLASS.get(cls) or cls.__dict__.get("_fusedrnn_original")


def _as_torch_keys(spec, what: str):
    """``spec`` (a qconfig_spec set or dict, or a mapping) with fusedrnn's four classes replaced
    by the torch.nn classes they stand for; a clash (both named, different values) raises."""
    if isinstance(spec, set):
        return {_TORCH_CLASS.get(k, k) for k in spec}
    if not isinstance(spec, dict):
        return spec  # None, or something torch itself accepts or refuses
    out = {}
    for key, value in spec.items():
        key = _TORCH_CLASS.get(key, key)
        if key in out and out[key] is not value:
            raise ValueError(f"fusedrnn.quantize_dynamic: {what} gives {key} and its fusedrnn "
                             f"class different values")
        out[key] = value
    return out


def quantize_dynamic(model: nn.Module, qconfig_spec=None, dtype: torch.dtype = torch.qint8,
                     mapping=None, inplace: bool = False) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` for models holding fusedrnn modules.

    Same arguments and result as torch's, with every fusedrnn module (converted or built as one)
    seen as the module torch.nn would have: ``fusedrnn.LSTM`` as ``torch.nn.LSTM`` (and likewise
    GRU, LSTMCell, GRUCell), a converted subclass as the user's class, a parametrized module as
    the same parametrization over those.  So the result is what torch's quantize_dynamic gives for
    the model before ``convert``: the same ``torch.ao.nn.quantized.dynamic`` modules with the same
    weights (hence the same outputs), and the same errors (a parametrized RNN fails in torch's
    ``from_float``).  ``qconfig_spec`` and ``mapping`` may name fusedrnn's classes for the torch.nn
    ones.  Modules left in float (not named by the spec, or subclasses, which torch's tables do not
    match) stay the fusedrnn modules they were, with their ``backend``.

    torch.ao.quantization's own ``quantize_dynamic`` cannot do this: it matches exact classes
    (its qconfig tables and module mappings are keyed by ``torch.nn.LSTM`` ..., and ``from_float``
    checks ``type(module)``), so it would skip fusedrnn modules; fusedrnn makes that skip a
    RuntimeWarning, or a RuntimeError when the module was given a qconfig.

    Raises ValueError when ``qconfig_spec`` or ``mapping`` gives a torch.nn class and its fusedrnn
    class different values; otherwise whatever torch's quantize_dynamic raises for the same model
    written with torch.nn (the model is then left with its fusedrnn classes).
    """
    from torch.ao.quantization import quantize_dynamic as torch_quantize_dynamic

    qconfig_spec = _as_torch_keys(qconfig_spec, "qconfig_spec")
    mapping = _as_torch_keys(mapping, "mapping")
    if not inplace:
        model = copy.deepcopy(model)
    seen_as_torch = []  # (module, its fusedrnn class), restored whatever torch does
    token = _quantizing_as_torch.set(True)
    try:
        for module in model.modules():
            torch_cls = _torch_class(module) if isinstance(module, _BackendMixin) else None
            if torch_cls is not None:
                seen_as_torch.append((module, type(module)))
                module.__class__ = torch_cls
        return torch_quantize_dynamic(model, qconfig_spec, dtype, mapping, inplace=True)
    finally:
        for module, cls in seen_as_torch:
            module.__class__ = cls
        _quantizing_as_torch.reset(token)
