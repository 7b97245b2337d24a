"""The recurrence math as plain PyTorch time loops: the spec every kernel must match.

Every backend implements the functions of this module with the same signatures, shapes and dtypes
(the op contract, see ``fusedrnn/ops.py``).  Nothing here calls torch's native RNN ops
(``_VF.lstm``, ``_VF.gru``, ``_VF.lstm_cell``, ``_VF.gru_cell``): the time loop, the gate math and
the backward formulas are written out, so in float64 this module is the truth the tests check
both torch.nn and every kernel against.

Notation (one layer, one direction):
    T time steps, B batch, H hidden size, P = proj_size or H (size of h), G = 4H (LSTM) / 3H (GRU).
    xproj   (T, B, G)  x_t @ W_ih^T + b_ih for every step (one GEMM outside the recurrence)
    w_hh    (G, P)     torch's weight_hh layout
    b_hh    (G,)       or None
    w_hr    (P, H)     LSTM projection (proj_size > 0) or None
    lengths (B,) int64 on xproj's device, or None (= all T).  Step t of sequence b is *valid* when
            t < lengths[b]; invalid (padded) steps leave the state unchanged, write zeros to y and
            to the saved tensors, and pass gradients through unchanged.
    reverse False: steps run t = 0 .. T-1; True: t = T-1 .. 0 (each sequence starts at its own end
            because padded steps are no-ops).

Gate order and formulas are PyTorch's:
    LSTM  [i, f, g, o] = xproj_t + h_{t-1} @ w_hh^T + b_hh  ->  sigmoid, sigmoid, tanh, sigmoid
          c_t = f * c_{t-1} + i * g;  m_t = o * tanh(c_t);  h_t = m_t (@ w_hr^T if projecting)
    GRU   [x_r, x_z, x_n] = xproj_t;  [h_r, h_z, h_n] = h_{t-1} @ w_hh^T + b_hh
          r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z);  n = tanh(x_n + r * h_n)
          h_t = (1 - z) * n + z * h_{t-1}

dtypes: outputs y / final states / gradients have xproj's dtype.  Math and the cell state run in
the accumulation dtype: float64 for float64 inputs, float32 otherwise.  Saved gates have xproj's
dtype; the saved cell states ``cs`` have the accumulation dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "acc_dtype",
    "valid_mask",
    "step_order",
    "previous_states",
    "lstm_fwd",
    "lstm_bwd",
    "gru_fwd",
    "gru_bwd",
    "lstm_cell_fwd",
    "lstm_cell_bwd",
    "gru_cell_fwd",
    "gru_cell_bwd",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the math and of the cell state: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def valid_mask(lengths: Optional[Tensor], T: int, B: int, device) -> Tensor:
    """(T, B) bool: step t of sequence b is valid (t < lengths[b])."""
    if lengths is None:
        return torch.ones(T, B, dtype=torch.bool, device=device)
    steps = torch.arange(T, device=device).unsqueeze(1)
    return steps < lengths.to(device=device, dtype=torch.int64).unsqueeze(0)


def step_order(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def previous_states(seq: Tensor, init: Tensor, lengths: Optional[Tensor], reverse: bool) -> Tensor:
    """State entering each step: (T, B, N) from the per-step states ``seq`` (T, B, N) and ``init`` (B, N).

    Forward: prev[t] = seq[t-1] (t > 0), init at t = 0.  Reverse: prev[t] = seq[t+1] while t+1 is
    a valid step, init at each sequence's first processed step t = lengths[b]-1 (and beyond).
    Values at invalid steps are irrelevant (their gradients are zero) but finite.
    """
    T, B = seq.shape[0], seq.shape[1]
    init = init.to(seq.dtype).unsqueeze(0)
    if T == 0:
        return seq
    if not reverse:
        return torch.cat([init, seq[:-1]], dim=0)
    shifted = torch.cat([seq[1:], init], dim=0)
    if lengths is None:
        return shifted
    nxt_valid = valid_mask(lengths, T + 1, B, seq.device)[1:]  # step t+1 valid
    return torch.where(nxt_valid.unsqueeze(-1), shifted, init)


def _empty_like_seq(xproj: Tensor, n: int, dtype=None) -> Tensor:
    T, B = xproj.shape[0], xproj.shape[1]
    return torch.zeros(T, B, n, dtype=dtype or xproj.dtype, device=xproj.device)


# --------------------------------------------------------------------------------------------- LSTM
def lstm_fwd(
    xproj: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_hr: Optional[Tensor],
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool = True,
):
    """LSTM recurrence, forward.

    Returns ``(y, h_n, c_n, gates, cs)``:
        y      (T, B, P) xproj.dtype  hidden state of every step (zeros at padded steps)
        h_n    (B, P)    xproj.dtype  state after each sequence's last valid step
        c_n    (B, H)    xproj.dtype
        gates  (T, B, 4H) xproj.dtype activated [i, f, g, o] (zeros at padded steps)
        cs     (T, B, H) accumulation dtype  cell state c_t (zeros at padded steps)
    ``save=False`` (inference: nothing will call the backward): ``gates`` and ``cs`` are empty
    tensors of shape (0,) with the same dtypes.
    """
    T, B, G = xproj.shape
    H = G // 4
    P = w_hh.shape[1]
    acc = acc_dtype(xproj.dtype)
    w = w_hh.to(acc)
    wr = w_hr.to(acc) if w_hr is not None else None
    bias = b_hh.to(acc) if b_hh is not None else None
    valid = valid_mask(lengths, T, B, xproj.device)
    h = h0.to(acc).clone()  # outputs must never alias inputs (custom-op rule)
    c = c0.to(acc).clone()
    y = _empty_like_seq(xproj, P)
    gates = _empty_like_seq(xproj, G)
    cs = _empty_like_seq(xproj, H, acc)
    for t in step_order(T, reverse):
        pre = xproj[t].to(acc) + h @ w.t()
        if bias is not None:
            pre = pre + bias
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        h_new = o * torch.tanh(c_new)
        if wr is not None:
            h_new = h_new @ wr.t()
        m = valid[t].unsqueeze(1)
        c = torch.where(m, c_new, c)
        h = torch.where(m, h_new, h)
        zero = torch.zeros((), dtype=acc, device=xproj.device)
        y[t] = torch.where(m, h_new, zero).to(xproj.dtype)
        gates[t] = torch.where(m, torch.cat([i, f, g, o], dim=1), zero).to(xproj.dtype)
        cs[t] = torch.where(m, c_new, zero)
    if not save:
        gates, cs = gates.new_empty((0,)), cs.new_empty((0,))
    return y, h.to(xproj.dtype), c.to(xproj.dtype), gates, cs


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
):
    """LSTM recurrence, backward (walks the steps in the opposite order of the forward).

    Inputs: the cotangents ``dy`` (T, B, P), ``dh_n`` (B, P), ``dc_n`` (B, H) and the forward's
    saved ``gates`` / ``cs``.  Returns ``(dxproj, dh0, dc0, dh_seq)``:
        dxproj (T, B, 4H) dy.dtype   gradient of the pre-activations = of xproj (and of b_hh,
                                      and of h_{t-1} @ w_hh^T); zeros at padded steps
        dh0    (B, P), dc0 (B, H)
        dh_seq (T, B, P) total gradient reaching h_t (used for dW_hr) when w_hr is given,
               else an empty (0,) tensor.
    """
    T, B, G = gates.shape
    H = G // 4
    acc = acc_dtype(dy.dtype)
    w = w_hh.to(acc)
    wr = w_hr.to(acc) if w_hr is not None else None
    valid = valid_mask(lengths, T, B, dy.device)
    c_prev_seq = previous_states(cs.to(acc), c0.to(acc), lengths, reverse)
    dh = dh_n.to(acc).clone()
    dc = dc_n.to(acc).clone()
    dxproj = torch.zeros(T, B, G, dtype=dy.dtype, device=dy.device)
    dh_seq = (
        torch.zeros(T, B, dy.shape[2], dtype=dy.dtype, device=dy.device)
        if wr is not None
        else torch.empty(0, dtype=dy.dtype, device=dy.device)
    )
    for t in reversed(step_order(T, reverse)):
        m = valid[t].unsqueeze(1)
        dh_tot = dh + dy[t].to(acc)
        i, f, g, o = gates[t].to(acc).chunk(4, dim=1)
        c = cs[t].to(acc)
        tc = torch.tanh(c)
        dm = dh_tot @ wr if wr is not None else dh_tot
        do = dm * tc
        dc_tot = dc + dm * o * (1 - tc * tc)
        di = dc_tot * g
        dg = dc_tot * i
        df = dc_tot * c_prev_seq[t]
        dpre = torch.cat(
            [di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], dim=1
        )
        dpre = torch.where(m, dpre, torch.zeros((), dtype=acc, device=dy.device))
        dxproj[t] = dpre.to(dy.dtype)
        if wr is not None:
            dh_seq[t] = torch.where(m, dh_tot, torch.zeros((), dtype=acc, device=dy.device)).to(dy.dtype)
        dh = torch.where(m, dpre @ w, dh)
        dc = torch.where(m, dc_tot * f, dc)
    return dxproj, dh.to(dy.dtype), dc.to(dy.dtype), dh_seq


# ---------------------------------------------------------------------------------------------- GRU
def gru_fwd(
    xproj: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    h0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool = True,
):
    """GRU recurrence, forward.

    Returns ``(y, h_n, gates)``:
        y      (T, B, H)  xproj.dtype  (zeros at padded steps)
        h_n    (B, H)     xproj.dtype
        gates  (T, B, 4H) xproj.dtype  [r, z, n, hn] with hn = h_{t-1} @ W_hn^T + b_hn, the
               pre-reset hidden part of the new gate that backward needs (zeros at padded steps);
               ``save=False``: an empty (0,) tensor of that dtype
    """
    T, B, G = xproj.shape
    H = G // 3
    acc = acc_dtype(xproj.dtype)
    w = w_hh.to(acc)
    bias = b_hh.to(acc) if b_hh is not None else None
    valid = valid_mask(lengths, T, B, xproj.device)
    h = h0.to(acc).clone()
    y = _empty_like_seq(xproj, H)
    gates = _empty_like_seq(xproj, 4 * H)
    zero = torch.zeros((), dtype=acc, device=xproj.device)
    for t in step_order(T, reverse):
        hp = h @ w.t()
        if bias is not None:
            hp = hp + bias
        xr, xz, xn = xproj[t].to(acc).chunk(3, dim=1)
        hr, hz, hn = hp.chunk(3, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h_new = (1 - z) * n + z * h
        m = valid[t].unsqueeze(1)
        h = torch.where(m, h_new, h)
        y[t] = torch.where(m, h_new, zero).to(xproj.dtype)
        gates[t] = torch.where(m, torch.cat([r, z, n, hn], dim=1), zero).to(xproj.dtype)
    if not save:
        gates = gates.new_empty((0,))
    return y, h.to(xproj.dtype), gates


def gru_bwd(
    dy: Tensor,
    dh_n: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    y: Tensor,
    gates: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
):
    """GRU recurrence, backward.

    ``y`` and ``h0`` give h_{t-1} (see ``previous_states``).  Returns ``(dxproj, dh0, dhn)``:
        dxproj (T, B, 3H) dy.dtype  [dr_pre, dz_pre, dn_pre]: gradient of xproj
        dh0    (B, H)
        dhn    (T, B, H)  dn_pre * r: gradient of the hidden new-gate part h_{t-1} @ W_hn^T + b_hn
               (the hidden projection's gradient is cat(dxproj[..., :2H], dhn))
    """
    T, B, G4 = gates.shape
    H = G4 // 4
    acc = acc_dtype(dy.dtype)
    w = w_hh.to(acc)
    valid = valid_mask(lengths, T, B, dy.device)
    h_prev_seq = previous_states(y.to(acc), h0.to(acc), lengths, reverse)
    dh = dh_n.to(acc).clone()
    dxproj = torch.zeros(T, B, 3 * H, dtype=dy.dtype, device=dy.device)
    dhn_seq = torch.zeros(T, B, H, dtype=dy.dtype, device=dy.device)
    zero = torch.zeros((), dtype=acc, device=dy.device)
    for t in reversed(step_order(T, reverse)):
        m = valid[t].unsqueeze(1)
        dh_tot = dh + dy[t].to(acc)
        r, z, n, hn = gates[t].to(acc).chunk(4, dim=1)
        h_prev = h_prev_seq[t]
        dn_pre = dh_tot * (1 - z) * (1 - n * n)
        dz_pre = dh_tot * (h_prev - n) * z * (1 - z)
        dr_pre = dn_pre * hn * r * (1 - r)
        dhn = dn_pre * r
        dx = torch.where(m, torch.cat([dr_pre, dz_pre, dn_pre], dim=1), zero)
        dhp = torch.where(m, torch.cat([dr_pre, dz_pre, dhn], dim=1), zero)
        dxproj[t] = dx.to(dy.dtype)
        dhn_seq[t] = dhp[:, 2 * H :].to(dy.dtype)
        dh = torch.where(m, dhp @ w + dh_tot * z, dh)
    return dxproj, dh.to(dy.dtype), dhn_seq


# --------------------------------------------------------------------------------------------- cells
def lstm_cell_fwd(
    igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], c: Tensor
):
    """One LSTM step from precomputed GEMMs: igates = x @ W_ih^T, hgates = h @ W_hh^T, (B, 4H).

    Returns ``(h_new (B, H), c_new (B, H), gates (B, 4H) activated [i, f, g, o])`` in igates.dtype.
    """
    acc = acc_dtype(igates.dtype)
    pre = igates.to(acc) + hgates.to(acc)
    if b_ih is not None:
        pre = pre + b_ih.to(acc)
    if b_hh is not None:
        pre = pre + b_hh.to(acc)
    i, f, g, o = pre.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c.to(acc) + i * g
    h_new = o * torch.tanh(c_new)
    dt = igates.dtype
    return h_new.to(dt), c_new.to(dt), torch.cat([i, f, g, o], dim=1).to(dt)


def lstm_cell_bwd(dh_new: Tensor, dc_new: Tensor, c: Tensor, c_new: Tensor, gates: Tensor):
    """Backward of ``lstm_cell_fwd``: returns ``(dgates (B, 4H), dc (B, H))``.

    dgates is the gradient of the pre-activations, i.e. of igates, hgates and both biases.
    """
    acc = acc_dtype(gates.dtype)
    i, f, g, o = gates.to(acc).chunk(4, dim=1)
    tc = torch.tanh(c_new.to(acc))
    dh = dh_new.to(acc)
    dc_tot = dc_new.to(acc) + dh * o * (1 - tc * tc)
    dpre = torch.cat(
        [
            dc_tot * g * i * (1 - i),
            dc_tot * c.to(acc) * f * (1 - f),
            dc_tot * i * (1 - g * g),
            dh * tc * o * (1 - o),
        ],
        dim=1,
    )
    dt = gates.dtype
    return dpre.to(dt), (dc_tot * f).to(dt)


def gru_cell_fwd(
    igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], h: Tensor
):
    """One GRU step from igates = x @ W_ih^T, hgates = h @ W_hh^T, (B, 3H).

    Returns ``(h_new (B, H), gates (B, 4H) [r, z, n, hn])`` in igates.dtype.
    """
    acc = acc_dtype(igates.dtype)
    xi = igates.to(acc)
    hp = hgates.to(acc)
    if b_ih is not None:
        xi = xi + b_ih.to(acc)
    if b_hh is not None:
        hp = hp + b_hh.to(acc)
    xr, xz, xn = xi.chunk(3, dim=1)
    hr, hz, hn = hp.chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    h_new = (1 - z) * n + z * h.to(acc)
    dt = igates.dtype
    return h_new.to(dt), torch.cat([r, z, n, hn], dim=1).to(dt)


def gru_cell_bwd(dh_new: Tensor, h: Tensor, gates: Tensor):
    """Backward of ``gru_cell_fwd``: returns ``(d_igates (B, 3H), d_hgates (B, 3H), dh (B, H))``.

    d_igates is also the gradient of b_ih, d_hgates of b_hh; dh is only the direct path
    (z * dh_new): the caller adds d_hgates @ W_hh.
    """
    acc = acc_dtype(gates.dtype)
    r, z, n, hn = gates.to(acc).chunk(4, dim=1)
    dh = dh_new.to(acc)
    dn_pre = dh * (1 - z) * (1 - n * n)
    dz_pre = dh * (h.to(acc) - n) * z * (1 - z)
    dr_pre = dn_pre * hn * r * (1 - r)
    dt = gates.dtype
    d_i = torch.cat([dr_pre, dz_pre, dn_pre], dim=1).to(dt)
    d_h = torch.cat([dr_pre, dz_pre, dn_pre * r], dim=1).to(dt)
    return d_i, d_h, (dh * z).to(dt)
