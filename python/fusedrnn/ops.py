"""The op contract: torch.library custom ops between the modules and the kernel backends.

Per layer and direction the modules call one recurrence op (``fusedrnn::lstm_fwd`` /
``fusedrnn::gru_fwd``) on the input projection of all steps; the op dispatches to the backend
named by its ``backend`` argument (a concrete name, never "auto": see ``backends.resolve``).  The
backward ops walk time in reverse and return the gradient of the projection and of the initial
states; the weight gradients are large GEMMs over all steps, done here once for every backend.

Shapes, dtypes and semantics of every op are those of ``fusedrnn.backends.reference`` (the spec).
Each op has an explicit fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces
through it, and an autograd formula, so ``torch.library.opcheck`` passes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .backends.reference import acc_dtype, previous_states

Tensors2 = Tuple[Tensor, Tensor]
Tensors3 = Tuple[Tensor, Tensor, Tensor]
Tensors4 = Tuple[Tensor, Tensor, Tensor, Tensor]
Tensors5 = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _lengths(lengths: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    if lengths is None:
        return None
    return lengths.to(device=like.device, dtype=torch.int64).contiguous()


def _seq(T: int, B: int, n: int, like: Tensor, dtype=None) -> Tensor:
    return like.new_empty((T, B, n), dtype=dtype or like.dtype)


# =========================================================================================== LSTM
@torch.library.custom_op("fusedrnn::lstm_fwd", mutates_args=())
def lstm_fwd(
    xproj: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_hr: Optional[Tensor],
    lengths: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> Tensors5:
    """LSTM recurrence. Returns (y (T,B,P), h_n (B,P), c_n (B,H), gates (T,B,4H), cs (T,B,H))."""
    T, B, G = xproj.shape
    if B == 0:  # nothing to compute: shapes only
        return _lstm_fwd_empty(xproj, w_hh, c0)
    return backends.get(backend).lstm_fwd(
        xproj.contiguous(), w_hh.contiguous(), _c(b_hh), h0.contiguous(), c0.contiguous(),
        _c(w_hr), _lengths(lengths, xproj), reverse,
    )


def _lstm_fwd_empty(xproj, w_hh, c0):
    T, B, G = xproj.shape
    H, P = G // 4, w_hh.shape[1]
    return (
        _seq(T, B, P, xproj).zero_(),
        xproj.new_zeros((B, P)),
        xproj.new_zeros((B, H)),
        _seq(T, B, G, xproj).zero_(),
        _seq(T, B, H, xproj, acc_dtype(xproj.dtype)).zero_(),
    )


@lstm_fwd.register_fake
def _(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, backend):
    T, B, G = xproj.shape
    H, P = G // 4, w_hh.shape[1]
    return (
        _seq(T, B, P, xproj),
        xproj.new_empty((B, P)),
        xproj.new_empty((B, H)),
        _seq(T, B, G, xproj),
        _seq(T, B, H, xproj, acc_dtype(xproj.dtype)),
    )


@torch.library.custom_op("fusedrnn::lstm_bwd", mutates_args=())
def lstm_bwd(
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor,
    w_hh: Tensor,
    w_hr: Optional[Tensor],
    c0: Tensor,
    gates: Tensor,
    cs: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> Tensors4:
    """Returns (dxproj (T,B,4H), dh0 (B,P), dc0 (B,H), dh_seq (T,B,P) if w_hr else (0,))."""
    if gates.shape[1] == 0:
        return _lstm_bwd_fake(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, backend, zero=True)
    return backends.get(backend).lstm_bwd(
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), w_hh.contiguous(), _c(w_hr),
        c0.contiguous(), gates.contiguous(), cs.contiguous(), _lengths(lengths, dy), reverse,
    )


@lstm_bwd.register_fake
def _lstm_bwd_fake(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, backend, zero=False):
    T, B, G = gates.shape
    make = dy.new_zeros if zero else dy.new_empty
    dh_seq = make((T, B, dy.shape[2])) if w_hr is not None else make((0,))
    return make((T, B, G)), make(dh_n.shape), make(dc_n.shape), dh_seq


def _weight_grad(dgates: Tensor, inputs: Tensor) -> Tensor:
    """sum_t dgates_t^T @ inputs_t: (T,B,G) x (T,B,K) -> (G,K), one GEMM over all steps."""
    G, K = dgates.shape[-1], inputs.shape[-1]
    return dgates.reshape(-1, G).t().mm(inputs.reshape(-1, K).to(dgates.dtype))


def _lstm_setup(ctx, inputs, output):
    xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, backend = inputs
    y, _, _, gates, cs = output
    ctx.save_for_backward(w_hh, w_hr, h0, c0, y, gates, cs, lengths)
    ctx.has_bias = b_hh is not None
    ctx.reverse = reverse
    ctx.backend = backend


def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _lstm_backward(ctx, dy, dh_n, dc_n, _dgates, _dcs):
    w_hh, w_hr, h0, c0, y, gates, cs, lengths = ctx.saved_tensors
    dy = _zeros_if_none(dy, y)
    dh_n = _zeros_if_none(dh_n, h0)
    dc_n = _zeros_if_none(dc_n, c0)
    dxproj, dh0, dc0, dh_seq = lstm_bwd(
        dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, ctx.reverse, ctx.backend
    )
    h_prev = previous_states(y, h0, lengths, ctx.reverse)
    dw_hh = _weight_grad(dxproj, h_prev).to(w_hh.dtype)
    db_hh = dxproj.sum(dim=(0, 1)).to(w_hh.dtype) if ctx.has_bias else None
    dw_hr = None
    if w_hr is not None:
        H = cs.shape[2]
        m = gates[..., 3 * H :].to(cs.dtype) * torch.tanh(cs)  # o * tanh(c), zero at padded steps
        dw_hr = _weight_grad(dh_seq, m).to(w_hr.dtype)
    return dxproj, dw_hh, db_hh, dh0, dc0, dw_hr, None, None, None


lstm_fwd.register_autograd(_lstm_backward, setup_context=_lstm_setup)


# ============================================================================================ GRU
@torch.library.custom_op("fusedrnn::gru_fwd", mutates_args=())
def gru_fwd(
    xproj: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    h0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> Tensors3:
    """GRU recurrence. Returns (y (T,B,H), h_n (B,H), gates (T,B,4H) = [r, z, n, hn])."""
    if xproj.shape[1] == 0:
        T, B, G = xproj.shape
        H = G // 3
        return _seq(T, B, H, xproj).zero_(), xproj.new_zeros((B, H)), _seq(T, B, 4 * H, xproj).zero_()
    return backends.get(backend).gru_fwd(
        xproj.contiguous(), w_hh.contiguous(), _c(b_hh), h0.contiguous(), _lengths(lengths, xproj), reverse
    )


@gru_fwd.register_fake
def _(xproj, w_hh, b_hh, h0, lengths, reverse, backend):
    T, B, G = xproj.shape
    H = G // 3
    return _seq(T, B, H, xproj), xproj.new_empty((B, H)), _seq(T, B, 4 * H, xproj)


@torch.library.custom_op("fusedrnn::gru_bwd", mutates_args=())
def gru_bwd(
    dy: Tensor,
    dh_n: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    y: Tensor,
    gates: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    backend: str,
) -> Tensors3:
    """Returns (dxproj (T,B,3H), dh0 (B,H), dhn (T,B,H))."""
    if gates.shape[1] == 0:
        return _gru_bwd_fake(dy, dh_n, w_hh, h0, y, gates, lengths, reverse, backend, zero=True)
    return backends.get(backend).gru_bwd(
        dy.contiguous(), dh_n.contiguous(), w_hh.contiguous(), h0.contiguous(), y.contiguous(),
        gates.contiguous(), _lengths(lengths, dy), reverse,
    )


@gru_bwd.register_fake
def _gru_bwd_fake(dy, dh_n, w_hh, h0, y, gates, lengths, reverse, backend, zero=False):
    T, B, G4 = gates.shape
    H = G4 // 4
    make = dy.new_zeros if zero else dy.new_empty
    return make((T, B, 3 * H)), make((B, H)), make((T, B, H))


def _gru_setup(ctx, inputs, output):
    xproj, w_hh, b_hh, h0, lengths, reverse, backend = inputs
    y, _, gates = output
    ctx.save_for_backward(w_hh, h0, y, gates, lengths)
    ctx.has_bias = b_hh is not None
    ctx.reverse = reverse
    ctx.backend = backend


def _gru_backward(ctx, dy, dh_n, _dgates):
    w_hh, h0, y, gates, lengths = ctx.saved_tensors
    dy = _zeros_if_none(dy, y)
    dh_n = _zeros_if_none(dh_n, h0)
    dxproj, dh0, dhn = gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, ctx.reverse, ctx.backend)
    H = dhn.shape[2]
    d_hproj = torch.cat([dxproj[..., : 2 * H], dhn], dim=2)
    h_prev = previous_states(y, h0, lengths, ctx.reverse)
    dw_hh = _weight_grad(d_hproj, h_prev).to(w_hh.dtype)
    db_hh = d_hproj.sum(dim=(0, 1)).to(w_hh.dtype) if ctx.has_bias else None
    return dxproj, dw_hh, db_hh, dh0, None, None, None


gru_fwd.register_autograd(_gru_backward, setup_context=_gru_setup)


# ========================================================================================== cells
@torch.library.custom_op("fusedrnn::lstm_cell_fwd", mutates_args=())
def lstm_cell_fwd(
    igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], c: Tensor, backend: str
) -> Tensors3:
    """One fused LSTM step (bias adds + activations + state update).

    igates = x @ W_ih^T, hgates = h @ W_hh^T (B, 4H); returns (h_new, c_new (B, H), gates (B, 4H)).
    """
    if igates.shape[0] == 0:
        H = c.shape[1]
        return c.new_zeros((0, H)), c.new_zeros((0, H)), igates.new_zeros((0, 4 * H))
    return backends.get(backend).lstm_cell_fwd(
        igates.contiguous(), hgates.contiguous(), _c(b_ih), _c(b_hh), c.contiguous()
    )


@lstm_cell_fwd.register_fake
def _(igates, hgates, b_ih, b_hh, c, backend):
    B, G = igates.shape
    H = G // 4
    return igates.new_empty((B, H)), igates.new_empty((B, H)), igates.new_empty((B, G))


@torch.library.custom_op("fusedrnn::lstm_cell_bwd", mutates_args=())
def lstm_cell_bwd(
    dh_new: Tensor, dc_new: Tensor, c: Tensor, c_new: Tensor, gates: Tensor, backend: str
) -> Tensors2:
    """Returns (dgates (B, 4H) = gradient of igates, hgates and both biases, dc (B, H))."""
    if gates.shape[0] == 0:
        return torch.zeros_like(gates), torch.zeros_like(c)
    return backends.get(backend).lstm_cell_bwd(
        dh_new.contiguous(), dc_new.contiguous(), c.contiguous(), c_new.contiguous(), gates.contiguous()
    )


@lstm_cell_bwd.register_fake
def _(dh_new, dc_new, c, c_new, gates, backend):
    return torch.empty_like(gates), torch.empty_like(c)


def _lstm_cell_setup(ctx, inputs, output):
    igates, hgates, b_ih, b_hh, c, backend = inputs
    _, c_new, gates = output
    ctx.save_for_backward(c, c_new, gates)
    ctx.bias = (b_ih is not None, b_hh is not None)
    ctx.backend = backend


def _lstm_cell_backward(ctx, dh_new, dc_new, _dgates):
    c, c_new, gates = ctx.saved_tensors
    dh_new = _zeros_if_none(dh_new, c_new)
    dc_new = _zeros_if_none(dc_new, c_new)
    dgates, dc = lstm_cell_bwd(dh_new, dc_new, c, c_new, gates, ctx.backend)
    db = dgates.sum(0)
    return (
        dgates,
        dgates,
        db if ctx.bias[0] else None,
        db if ctx.bias[1] else None,
        dc,
        None,
    )


lstm_cell_fwd.register_autograd(_lstm_cell_backward, setup_context=_lstm_cell_setup)


@torch.library.custom_op("fusedrnn::gru_cell_fwd", mutates_args=())
def gru_cell_fwd(
    igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], h: Tensor, backend: str
) -> Tensors2:
    """One fused GRU step. igates = x @ W_ih^T, hgates = h @ W_hh^T (B, 3H).

    Returns (h_new (B, H), gates (B, 4H) = [r, z, n, hn]).
    """
    if igates.shape[0] == 0:
        H = h.shape[1]
        return h.new_zeros((0, H)), igates.new_zeros((0, 4 * H))
    return backends.get(backend).gru_cell_fwd(
        igates.contiguous(), hgates.contiguous(), _c(b_ih), _c(b_hh), h.contiguous()
    )


@gru_cell_fwd.register_fake
def _(igates, hgates, b_ih, b_hh, h, backend):
    B, G = igates.shape
    H = G // 3
    return igates.new_empty((B, H)), igates.new_empty((B, 4 * H))


@torch.library.custom_op("fusedrnn::gru_cell_bwd", mutates_args=())
def gru_cell_bwd(dh_new: Tensor, h: Tensor, gates: Tensor, backend: str) -> Tensors3:
    """Returns (d_igates (B, 3H), d_hgates (B, 3H), dh (B, H): the direct z * dh_new path only)."""
    if gates.shape[0] == 0:
        H = h.shape[1]
        return h.new_zeros((0, 3 * H)), h.new_zeros((0, 3 * H)), torch.zeros_like(h)
    return backends.get(backend).gru_cell_bwd(dh_new.contiguous(), h.contiguous(), gates.contiguous())


@gru_cell_bwd.register_fake
def _(dh_new, h, gates, backend):
    B, H = h.shape
    return h.new_empty((B, 3 * H)), h.new_empty((B, 3 * H)), torch.empty_like(h)


def _gru_cell_setup(ctx, inputs, output):
    igates, hgates, b_ih, b_hh, h, backend = inputs
    _, gates = output
    ctx.save_for_backward(h, gates)
    ctx.bias = (b_ih is not None, b_hh is not None)
    ctx.backend = backend


def _gru_cell_backward(ctx, dh_new, _dgates):
    h, gates = ctx.saved_tensors
    dh_new = _zeros_if_none(dh_new, h)
    d_i, d_h, dh = gru_cell_bwd(dh_new, h, gates, ctx.backend)
    return (
        d_i,
        d_h,
        d_i.sum(0) if ctx.bias[0] else None,
        d_h.sum(0) if ctx.bias[1] else None,
        dh,
        None,
    )


gru_cell_fwd.register_autograd(_gru_cell_backward, setup_context=_gru_cell_setup)
