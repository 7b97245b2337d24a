"""The ``cuda`` backend: the persistent CUDA kernels of the compiled extension (csrc/cuda).

Same op contract as ``fusedrnn.backends.reference``.  fp32 recurrences may use TF32 exactly when
``torch.backends.cudnn.rnn.fp32_precision`` allows it (the flag that governs torch.nn.LSTM/GRU;
the legacy ``cudnn.allow_tf32`` on torch < 2.9): see :func:`fusedrnn.backends.rnn_tf32_enabled`.
With ``FUSEDRNN_CUDA_EMULATION=1`` the same kernels also run on CPU tensors, under the CUDA
emulation (:mod:`fusedrnn.backends.cuda_emulation`).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import cpp as _cpp  # loads fusedrnn._C and registers the fusedrnn_ext fakes
from . import cuda_emulation as _emu
from . import rnn_tf32_enabled

_MODE_LIMIT = {"LSTM": "LSTM", "LSTMCell": "LSTM", "GRU": "GRU", "GRUCell": "GRU"}


def _tf32() -> bool:
    return rnn_tf32_enabled()


# ------------------------------------------------------------------------------ availability
def unavailable() -> Optional[str]:
    if _emu.requested():  # CPU tensors through the CUDA emulation (CUDA tensors: see unsupported)
        return _emu.unavailable()
    return _gpu_unavailable()


def _gpu_unavailable() -> Optional[str]:
    reason = _cpp.extension_error()
    if reason is not None:
        return reason
    if not _cpp.extension().build_info().get("with_cuda", False):
        return "fusedrnn._C was built without CUDA (torch without CUDA or no nvcc at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def max_hidden_size(mode: str, dtype: torch.dtype, device_index: int) -> int:
    """Largest hidden size the CUDA kernels run for this mode ("LSTM"/"GRU"), dtype and device."""
    name = str(dtype).replace("torch.", "")
    return int(_cpp.extension().max_hidden_size(_MODE_LIMIT.get(mode, mode), name, int(device_index)))


def unsupported(cfg) -> Optional[str]:
    if _emu.requested():
        if cfg.device_type == "cpu":
            return _emu.unsupported(cfg)
        if _gpu_unavailable() is not None:
            return _gpu_unavailable()
    if cfg.device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors only (got device {cfg.device_type!r})"
    if cfg.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {cfg.dtype} is not supported (float32, float64, bfloat16, float16)"
    if cfg.mode in ("LSTMCell", "GRUCell"):
        return None  # the cells are elementwise: no on-chip weight limit
    index = cfg.device_index if cfg.device_index is not None and cfg.device_index >= 0 else torch.cuda.current_device()
    limit = max_hidden_size(cfg.mode, cfg.dtype, index)
    if cfg.hidden_size > limit:
        return (
            f"hidden_size={cfg.hidden_size} exceeds the largest hidden size the persistent CUDA kernels keep "
            f"on chip for {cfg.mode} in {cfg.dtype} on this device (max_hidden_size={limit})"
        )
    return None


# ------------------------------------------------------------------------------ op contract
# The dispatcher ops of the compiled extension with the TF32 flag: torch.ops.fusedrnn_ext on CUDA
# tensors, torch.ops.fusedrnn_emu (the same kernels under the CUDA emulation) on CPU tensors.
def _ops(t):
    return _emu.ops() if t.device.type == "cpu" else torch.ops.fusedrnn_ext


def lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse):
    return _ops(xproj).lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, _tf32())


def lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse):
    return _ops(dy).lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, _tf32())


def gru_fwd(xproj, w_hh, b_hh, h0, lengths, reverse):
    return _ops(xproj).gru_fwd(xproj, w_hh, b_hh, h0, lengths, reverse, _tf32())


def gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, reverse):
    return _ops(dy).gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, reverse, _tf32())


def lstm_cell_fwd(igates, hgates, b_ih, b_hh, c):
    return _ops(igates).lstm_cell_fwd(igates, hgates, b_ih, b_hh, c)


def lstm_cell_bwd(dh_new, dc_new, c, c_new, gates):
    return _ops(gates).lstm_cell_bwd(dh_new, dc_new, c, c_new, gates)


def gru_cell_fwd(igates, hgates, b_ih, b_hh, h):
    return _ops(igates).gru_cell_fwd(igates, hgates, b_ih, b_hh, h)


def gru_cell_bwd(dh_new, h, gates):
    return _ops(gates).gru_cell_bwd(dh_new, h, gates)
