"""The ``triton`` backend: fused LSTM / GRU recurrence and cell kernels written in Triton.

LSTM kernels live in ``lstm.py``, GRU kernels in ``gru.py``; variants, limits and the shared
helpers in ``_common.py`` (its docstring has the selection rule and the size-limit table).
Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run).
An explicit ``backend="triton"`` never falls back: unsupported shapes raise ValueError.
"""

from __future__ import annotations

import importlib
from typing import Optional

from . import _common

_GRU_NAMES = ("gru_fwd", "gru_bwd", "gru_cell_fwd", "gru_cell_bwd")


def _lstm():
    from . import lstm

    return lstm


def _gru():
    """The GRU module, or None while it does not exist / does not import."""
    try:
        mod = importlib.import_module(__name__ + ".gru")
    except ModuleNotFoundError as e:
        if e.name != __name__ + ".gru":
            raise
        return None
    if not all(hasattr(mod, n) for n in _GRU_NAMES):
        return None
    return mod


def unavailable() -> Optional[str]:
    return _common.unavailable_reason()


def unsupported(cfg) -> Optional[str]:
    """None when the Triton kernels run ``cfg`` (a ``RecurrenceConfig``), else the reason."""
    if cfg.mode in ("GRU", "GRUCell"):
        mod = _gru()
        if mod is None:
            return "the Triton GRU kernels are not implemented yet (backends/triton/gru.py)"
        if hasattr(mod, "unsupported"):
            return mod.unsupported(cfg)
        gates = 3
    else:
        gates = 4
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
        import torch

        return torch.device("cuda", cfg.device_index if cfg.device_index is not None and cfg.device_index >= 0 else 0)
    return None


# ------------------------------------------------------------------------------- the op contract
def lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse):
    return _lstm().lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse)


def lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse):
    return _lstm().lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse)


def lstm_cell_fwd(igates, hgates, b_ih, b_hh, c):
    return _lstm().lstm_cell_fwd(igates, hgates, b_ih, b_hh, c)


def lstm_cell_bwd(dh_new, dc_new, c, c_new, gates):
    return _lstm().lstm_cell_bwd(dh_new, dc_new, c, c_new, gates)


def _gru_call(name, *args):
    mod = _gru()
    if mod is None:
        raise NotImplementedError(
            f"fusedrnn triton: {name} is not implemented yet (backends/triton/gru.py is missing)"
        )
    return getattr(mod, name)(*args)


def gru_fwd(xproj, w_hh, b_hh, h0, lengths, reverse):
    return _gru_call("gru_fwd", xproj, w_hh, b_hh, h0, lengths, reverse)


def gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, reverse):
    return _gru_call("gru_bwd", dy, dh_n, w_hh, h0, y, gates, lengths, reverse)


def gru_cell_fwd(igates, hgates, b_ih, b_hh, h):
    return _gru_call("gru_cell_fwd", igates, hgates, b_ih, b_hh, h)


def gru_cell_bwd(dh_new, h, gates):
    return _gru_call("gru_cell_bwd", dh_new, h, gates)
