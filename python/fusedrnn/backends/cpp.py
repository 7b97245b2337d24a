"""The ``cpp`` backend: the CPU kernels of the compiled extension (``torch.ops.fusedrnn_ext.*``).

Same op contract as ``fusedrnn.backends.reference`` (signatures, shapes, dtypes).  Importing this
module loads ``fusedrnn._C`` when it was built (which registers the ``fusedrnn_ext`` ops) and
registers the ops' fake implementations, so ``torch.library.opcheck`` and tracing work on them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import acc_dtype

try:
    from .. import _C  # noqa: F401  (registers torch.ops.fusedrnn_ext)

    _IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # not built (FUSEDRNN_SKIP_BUILD=1, pure Python checkout) or broken
    _C = None
    _IMPORT_ERROR = str(e)


def extension():
    """The compiled module ``fusedrnn._C``, or None when it is not available."""
    return _C


def extension_error() -> Optional[str]:
    """Why ``fusedrnn._C`` did not import (None when it did)."""
    if _C is not None:
        return None
    return (
        f"the compiled extension fusedrnn._C is not available ({_IMPORT_ERROR}); build it with "
        "`pip install --no-build-isolation .` (see setup.py)"
    )


# ------------------------------------------------------------------------------ fake impls
def _register_fakes() -> None:
    """Shape/dtype-only implementations of the fusedrnn_ext ops (for FakeTensor / opcheck)."""
    lib = "fusedrnn_ext::"

    @torch.library.register_fake(lib + "lstm_fwd")
    def _(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, allow_tf32):
        T, B, G = xproj.shape
        H, P = G // 4, w_hh.shape[1]
        return (
            xproj.new_empty((T, B, P)),
            xproj.new_empty((B, P)),
            xproj.new_empty((B, H)),
            xproj.new_empty((T, B, G)),
            xproj.new_empty((T, B, H), dtype=acc_dtype(xproj.dtype)),
        )

    @torch.library.register_fake(lib + "lstm_bwd")
    def _(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, allow_tf32):
        T, B, G = gates.shape
        dh_seq = dy.new_empty((T, B, dy.shape[2])) if w_hr is not None else dy.new_empty((0,))
        return dy.new_empty((T, B, G)), dy.new_empty(dh_n.shape), dy.new_empty(dc_n.shape), dh_seq

    @torch.library.register_fake(lib + "gru_fwd")
    def _(xproj, w_hh, b_hh, h0, lengths, reverse, allow_tf32):
        T, B, G = xproj.shape
        H = G // 3
        return xproj.new_empty((T, B, H)), xproj.new_empty((B, H)), xproj.new_empty((T, B, 4 * H))

    @torch.library.register_fake(lib + "gru_bwd")
    def _(dy, dh_n, w_hh, h0, y, gates, lengths, reverse, allow_tf32):
        T, B, G4 = gates.shape
        H = G4 // 4
        return dy.new_empty((T, B, 3 * H)), dy.new_empty((B, H)), dy.new_empty((T, B, H))

    @torch.library.register_fake(lib + "lstm_cell_fwd")
    def _(igates, hgates, b_ih, b_hh, c):
        B, G = igates.shape
        H = G // 4
        return igates.new_empty((B, H)), igates.new_empty((B, H)), igates.new_empty((B, G))

    @torch.library.register_fake(lib + "lstm_cell_bwd")
    def _(dh_new, dc_new, c, c_new, gates):
        B, G = gates.shape
        return gates.new_empty((B, G)), gates.new_empty((B, G // 4))

    @torch.library.register_fake(lib + "gru_cell_fwd")
    def _(igates, hgates, b_ih, b_hh, h):
        B, G = igates.shape
        H = G // 3
        return igates.new_empty((B, H)), igates.new_empty((B, 4 * H))

    @torch.library.register_fake(lib + "gru_cell_bwd")
    def _(dh_new, h, gates):
        B, G4 = gates.shape
        H = G4 // 4
        return gates.new_empty((B, 3 * H)), gates.new_empty((B, 3 * H)), gates.new_empty((B, H))


if _C is not None:
    _register_fakes()


def _ops():
    return torch.ops.fusedrnn_ext


# ------------------------------------------------------------------------------ availability
def unavailable() -> Optional[str]:
    return extension_error()


def unsupported(cfg) -> Optional[str]:
    if cfg.device_type != "cpu":
        return f"the cpp backend runs on CPU tensors only (got device {cfg.device_type!r})"
    if cfg.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {cfg.dtype} is not supported (float32, float64, bfloat16, float16)"
    return None


# ------------------------------------------------------------------------------ op contract
# The fusedrnn_ext ops dispatch on the tensors' device, so the cuda backend reuses these with
# its TF32 flag (CPU kernels ignore allow_tf32).
def lstm_fwd(xproj: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, c0: Tensor,
             w_hr: Optional[Tensor], lengths: Optional[Tensor], reverse: bool, allow_tf32: bool = False,
             save: bool = True):
    y, h_n, c_n, gates, cs = _ops().lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, allow_tf32)
    if not save:  # shim until the C++ save path merges
        gates, cs = gates.new_empty((0,)), cs.new_empty((0,))
    return y, h_n, c_n, gates, cs


def lstm_bwd(dy: Tensor, dh_n: Tensor, dc_n: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], c0: Tensor,
             gates: Tensor, cs: Tensor, lengths: Optional[Tensor], reverse: bool, allow_tf32: bool = False):
    return _ops().lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, allow_tf32)


def gru_fwd(xproj: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor],
            reverse: bool, allow_tf32: bool = False, save: bool = True):
    y, h_n, gates = _ops().gru_fwd(xproj, w_hh, b_hh, h0, lengths, reverse, allow_tf32)
    if not save:  # shim until the C++ save path merges
        gates = gates.new_empty((0,))
    return y, h_n, gates


def gru_bwd(dy: Tensor, dh_n: Tensor, w_hh: Tensor, h0: Tensor, y: Tensor, gates: Tensor,
            lengths: Optional[Tensor], reverse: bool, allow_tf32: bool = False):
    return _ops().gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, reverse, allow_tf32)


def lstm_cell_fwd(igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], c: Tensor):
    return _ops().lstm_cell_fwd(igates, hgates, b_ih, b_hh, c)


def lstm_cell_bwd(dh_new: Tensor, dc_new: Tensor, c: Tensor, c_new: Tensor, gates: Tensor):
    return _ops().lstm_cell_bwd(dh_new, dc_new, c, c_new, gates)


def gru_cell_fwd(igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], h: Tensor):
    return _ops().gru_cell_fwd(igates, hgates, b_ih, b_hh, h)


def gru_cell_bwd(dh_new: Tensor, h: Tensor, gates: Tensor):
    return _ops().gru_cell_bwd(dh_new, h, gates)
