"""The layer stack: input GEMMs, directions, dropout and projections around the recurrence ops.

Everything here is plain differentiable PyTorch around the custom ops of ``fusedrnn.ops``; it is
shared by LSTM and GRU and by every backend.  Inputs are time-major and padded:
    x        (T, B, I)
    lengths  (B,) int64 or None (packed input: per-sequence lengths, any order)
    hx       (L*D, B, P) initial hidden states, cx (L*D, B, H) initial cell states (LSTM only)
    weights  per (layer, direction), in torch.nn's order: (w_ih, w_hh, b_ih, b_hh, w_hr)
Returns y (T, B, D*P), h_n (L*D, B, P) and, for LSTM, c_n (L*D, B, H).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

LayerWeights = Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def _input_projection(x: Tensor, dir_weights: Sequence[LayerWeights]) -> List[Tensor]:
    """x @ W_ih^T + b_ih for every step and every direction in one GEMM: [(T, B, G)] per direction."""
    if len(dir_weights) == 1:
        w_ih, _, b_ih, _, _ = dir_weights[0]
        return [F.linear(x, w_ih, b_ih)]
    w = torch.cat([d[0] for d in dir_weights], dim=0)
    b = None if dir_weights[0][2] is None else torch.cat([d[2] for d in dir_weights], dim=0)
    return list(F.linear(x, w, b).chunk(len(dir_weights), dim=-1))


def rnn(
    mode: str,
    x: Tensor,
    lengths: Optional[Tensor],
    hx: Tensor,
    cx: Optional[Tensor],
    weights: Sequence[LayerWeights],
    *,
    num_layers: int,
    bidirectional: bool,
    dropout: float,
    training: bool,
    backend: str,
    packed_index: Optional[Tuple[Tensor, Tensor]] = None,
):
    """Multi-layer (bi)directional LSTM ("LSTM") or GRU ("GRU") over padded time-major input.

    ``packed_index`` (packed input only): the (t, b) position of every packed row, in packed
    order.  Inter-layer dropout then draws its mask over those rows, as torch.nn draws it over
    the packed data, so a seeded run consumes the random stream exactly as torch.nn does.
    """
    num_dirs = 2 if bidirectional else 1
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int64)
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        dir_weights = weights[layer * num_dirs : (layer + 1) * num_dirs]
        projections = _input_projection(layer_input, dir_weights)
        outputs = []
        for d in range(num_dirs):
            idx = layer * num_dirs + d
            _, w_hh, _, b_hh, w_hr = dir_weights[d]
            if mode == "LSTM":
                args = (projections[d], w_hh, b_hh, hx[idx], cx[idx], w_hr)
                y, h, c, _, _ = ops.call(ops.lstm_fwd, *args, lengths, d == 1, ops.needs_saving(*args), backend)
                c_n.append(c)
            else:
                args = (projections[d], w_hh, b_hh, hx[idx])
                y, h, _ = ops.call(ops.gru_fwd, *args, lengths, d == 1, ops.needs_saving(*args), backend)
            outputs.append(y)
            h_n.append(h)
        layer_input = outputs[0] if num_dirs == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            if packed_index is None:
                layer_input = F.dropout(layer_input, p=dropout, training=True)
            else:
                rows = F.dropout(layer_input[packed_index], p=dropout, training=True)
                layer_input = torch.zeros_like(layer_input).index_put(packed_index, rows)
    return layer_input, _stack(h_n), _stack(c_n) if mode == "LSTM" else None


def _stack(states: List[Tensor]) -> Tensor:
    """The final states of every layer and direction, (L*D, B, N).  One layer and direction: a
    view of the op's own (fresh, unshared) output, which saves a copy and an autograd node."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states, dim=0)


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """``t.to(dtype)``; None stays None, and a tensor already in ``dtype`` is returned as it is
    without the call (what ``.to`` returns then too, for less than a dispatch: cells run per step)."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih, w_hh, b_ih, b_hh, backend: str,
              dtype: Optional[torch.dtype] = None):
    """One LSTM step: x (B, I), h (B, H), c (B, H) -> (h_new, c_new).

    The GEMMs run in the weights' dtype; the fused step in ``dtype`` (default: the GEMMs'), the
    dtype of c and of the results (a wider c promotes the step, as in torch.nn)."""
    igates, hgates = _cast(F.linear(x, w_ih), dtype), _cast(F.linear(h, w_hh), dtype)
    h_new, c_new, _ = ops.call(
        ops.lstm_cell_fwd, igates, hgates, _cast(b_ih, dtype), _cast(b_hh, dtype), _cast(c, dtype), backend
    )
    return h_new, c_new


def gru_cell(x: Tensor, h: Tensor, w_ih, w_hh, b_ih, b_hh, backend: str, dtype: Optional[torch.dtype] = None):
    """One GRU step: x (B, I), h (B, H) -> h_new (GEMMs in the weights' dtype, the step in ``dtype``)."""
    igates, hgates = _cast(F.linear(x, w_ih), dtype), _cast(F.linear(_cast(h, w_hh.dtype), w_hh), dtype)
    h_new, _ = ops.call(
        ops.gru_cell_fwd, igates, hgates, _cast(b_ih, dtype), _cast(b_hh, dtype), _cast(h, dtype), backend
    )
    return h_new
