"""The ``triton`` backend: fused LSTM / GRU recurrence and cell kernels written in Triton.

LSTM kernels live in ``lstm.py``, GRU kernels in ``gru.py``; variants, limits and the shared
helpers in ``_common.py`` (its docstring has the selection rule and the size-limit table).
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run).
An explicit ``backend="triton"`` never falls back: unsupported shapes raise ValueError.
The recurrence forwards take ``save`` (default True): False is the inference path (nothing for
the backward is written; ``gates`` / ``cs`` come back as empty (0,) tensors).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _common


def _lstm():
    from . import lstm  # imported on first use: triton is optional for the package

    return lstm


def _gru():
    from . import gru

    return gru


def unavailable() -> Optional[str]:
    return _common.unavailable_reason()


def unsupported(cfg) -> Optional[str]:
    """None when the Triton kernels run ``cfg`` (a ``RecurrenceConfig``), else the reason."""
    gates = 3 if cfg.mode in ("GRU", "GRUCell") else 4
    if cfg.mode in ("LSTMCell", "GRUCell"):
        r = _common.device_unsupported_reason(cfg.device_type)
        if r is None and cfg.dtype not in _common.SUPPORTED_DTYPES:
            r = f"dtype {cfg.dtype} is not supported"
        return r
    return _common.unsupported_reason(
        gates, cfg.hidden_size, cfg.proj_size, cfg.dtype, cfg.device_type, _device(cfg)
    )


def _device(cfg):
    if cfg.device_type == "cuda":
        return torch.device("cuda", cfg.device_index if cfg.device_index is not None and cfg.device_index >= 0 else 0)
    return None


# ------------------------------------------------------------------------------- the op contract
def _on_device(fn):
    """Run ``fn`` with its first tensor's CUDA device current: Triton launches on the current
    device and reads its properties there, so tensors on cuda:1 while cuda:0 is current would run
    (or fail) on the wrong GPU without this guard."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = args[0].device
        if dev.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)

    return wrapper


@_on_device
def lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, save=True):
    return _lstm().lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, save)


@_on_device
def lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse):
    return _lstm().lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse)


@_on_device
def lstm_cell_fwd(igates, hgates, b_ih, b_hh, c):
    return _lstm().lstm_cell_fwd(igates, hgates, b_ih, b_hh, c)


@_on_device
def lstm_cell_bwd(dh_new, dc_new, c, c_new, gates):
    return _lstm().lstm_cell_bwd(dh_new, dc_new, c, c_new, gates)


@_on_device
def gru_fwd(xproj, w_hh, b_hh, h0, lengths, reverse, save=True):
    return _gru().gru_fwd(xproj, w_hh, b_hh, h0, lengths, reverse, save)


@_on_device
def gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, reverse):
    return _gru().gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, reverse)


@_on_device
def gru_cell_fwd(igates, hgates, b_ih, b_hh, h):
    return _gru().gru_cell_fwd(igates, hgates, b_ih, b_hh, h)


@_on_device
def gru_cell_bwd(dh_new, h, gates):
    return _gru().gru_cell_bwd(dh_new, h, gates)
