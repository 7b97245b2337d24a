"""Drop-in torch.nn modules: input handling only (packed, unbatched, batch_first, hx, autocast).

``fusedrnn.LSTM`` / ``GRU`` / ``LSTMCell`` / ``GRUCell`` subclass their torch.nn counterparts, so
constructor, parameters (names, shapes, order, initialisation), ``state_dict``, ``repr`` and errors
are torch's.  The only addition is the keyword-only ``backend`` argument (see ``fusedrnn.backends``).
The compute goes through ``fusedrnn.functional`` -> ``fusedrnn.ops`` -> the chosen backend, except
for ``backend="torch"`` (or ``auto`` falling back), which calls torch.nn's own forward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import backends, functional
from .backends import RecurrenceConfig


# ---------------------------------------------------------------------------------------- helpers
@torch.compiler.assume_constant_result
def _resolve(requested: str, mode: str, device_type: str, device_index: int, dtype: torch.dtype,
             hidden_size: int, proj_size: int) -> str:
    cfg = RecurrenceConfig(mode, device_type, device_index, dtype, hidden_size, proj_size)
    return backends.resolve(requested, cfg)


def _compute_dtype(input: Tensor, weight: Tensor) -> Tuple[torch.dtype, bool]:
    """(dtype the recurrence runs in, whether autocast is active) for this call.

    torch.nn under CUDA autocast runs RNNs and cells in the autocast dtype; elsewhere the math runs
    in the weights' dtype (torch's CPU GRU/cells return float32 under CPU autocast).
    """
    device_type = input.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        if device_type == "cuda":
            return torch.get_autocast_dtype(device_type), True
        return weight.dtype, True
    return weight.dtype, False


def _check_same_device_and_dtype(input: Tensor, hiddens, params) -> None:
    """The checks torch's native RNN ops make (same messages), before any kernel runs."""
    for name, tensors, check_dtype in (("hidden", hiddens, True), ("parameter", params, False)):
        for t in tensors:
            if t is None:
                continue
            if t.device != input.device:
                raise RuntimeError(
                    f"Input and {name} tensors are not at the same device, found input tensor at "
                    f"{input.device} and {name} tensor at {t.device}"
                )
            if check_dtype and t.dtype != input.dtype:
                raise RuntimeError(
                    f"Input and {name} tensors are not the same dtype, found input tensor with "
                    f"{_scalar_name(input.dtype)} and {name} tensor with {_scalar_name(t.dtype)}"
                )


def _scalar_name(dtype: torch.dtype) -> str:
    return {
        torch.float32: "Float",
        torch.float64: "Double",
        torch.float16: "Half",
        torch.bfloat16: "BFloat16",
    }.get(dtype, str(dtype))


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


class _BackendMixin:
    """The ``backend`` attribute shared by every fusedrnn module."""

    def _set_backend(self, backend: str) -> None:
        backends.check_backend_name(backend)
        self.backend = backend

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"

    def _choose_backend(self, mode: str, input: Tensor, dtype: torch.dtype, proj_size: int = 0) -> str:
        dev = input.device
        return _resolve(self.backend, mode, dev.type, -1 if dev.index is None else dev.index, dtype,
                        self.hidden_size, proj_size)


# ------------------------------------------------------------------------------------ LSTM / GRU
class _FusedRNNBase(_BackendMixin):
    """Shared forward of LSTM and GRU; ``self.mode`` is "LSTM" or "GRU"."""

    def _fused_forward(self, input, hx):
        self._update_flat_weights()
        is_lstm = self.mode == "LSTM"
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        orig_input = input
        batch_sizes = None
        is_batched = True
        batch_dim = 0 if self.batch_first else 1

        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = orig_input
            max_batch_size = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead"
                )
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            if hx is not None:
                hx = self._check_hx_rank(hx, is_batched)

        if hx is None:
            zeros = lambda n: torch.zeros(  # noqa: E731
                self.num_layers * num_directions, max_batch_size, n, dtype=input.dtype, device=input.device
            )
            hx = (zeros(real_hidden_size), zeros(self.hidden_size)) if is_lstm else zeros(self.hidden_size)
        if is_lstm and batch_sizes is not None and input.size(-1) != self.input_size:
            # torch.nn.LSTM skips its Python checks for packed input; its first GEMM raises this.
            raise RuntimeError(
                f"mat1 and mat2 shapes cannot be multiplied ({input.size(0)}x{input.size(-1)} and "
                f"{self.input_size}x{4 * self.hidden_size})"
            )
        self.check_forward_args(input, hx, batch_sizes)

        weights = [
            tuple(self._flat_weights[i : i + self._weights_per_direction()])
            for i in range(0, len(self._flat_weights), self._weights_per_direction())
        ]
        hiddens = list(hx) if is_lstm else [hx]
        _check_same_device_and_dtype(input, hiddens, self._flat_weights)

        dtype, autocast = _compute_dtype(input, self._flat_weights[0])
        backend = self._choose_backend(self.mode, input, dtype, self.proj_size)
        if backend == "torch":
            # torch.nn takes hx in the caller's batch order and rank, as the user gave it
            return super().forward(orig_input, self._restore_hx_rank(hx, is_batched))

        if batch_sizes is not None:
            t_idx, b_idx, lengths, T, B = _packed_layout(batch_sizes, sorted_indices, input.device)
            x = input.new_zeros((T, B, input.size(-1)))
            x = x.index_put((t_idx, b_idx), input)
        else:
            lengths = None
            x = input.transpose(0, 1) if self.batch_first else input
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        weights = [_to_layer_weights(w, is_lstm, self.bias, self.proj_size) for w in weights]
        h0, c0 = (hx[0], hx[1]) if is_lstm else (hx, None)
        if autocast:
            x, h0 = x.to(dtype), h0.to(dtype)
            c0 = c0.to(dtype) if c0 is not None else None
            weights = [tuple(None if w is None else w.to(dtype) for w in lw) for lw in weights]
        with torch.autocast(input.device.type, enabled=False) if autocast else _nullcontext():
            y, h_n, c_n = functional.rnn(
                self.mode, x, lengths, h0, c0, weights,
                num_layers=self.num_layers, bidirectional=self.bidirectional,
                dropout=float(self.dropout), training=self.training, backend=backend,
            )

        if batch_sizes is not None:
            out = PackedSequence(y[t_idx, b_idx], batch_sizes, sorted_indices, unsorted_indices)
        else:
            out = y.transpose(0, 1) if self.batch_first else y
            if not is_batched:
                out = out.squeeze(batch_dim)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if c_n is not None else None
        return out, ((h_n, c_n) if is_lstm else h_n)

    def _weights_per_direction(self) -> int:
        n = 4 if self.bias else 2
        return n + (1 if getattr(self, "proj_size", 0) > 0 else 0)

    def _check_hx_rank(self, hx, is_batched: bool):
        """torch.nn's rank checks for a user-given hx; returns hx with a batch dim."""
        if self.mode == "LSTM":
            if is_batched:
                if hx[0].dim() != 3 or hx[1].dim() != 3:
                    raise RuntimeError(
                        "For batched 3-D input, hx and cx should "
                        f"also be 3-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
                return hx
            if hx[0].dim() != 2 or hx[1].dim() != 2:
                raise RuntimeError(
                    "For unbatched 2-D input, hx and cx should "
                    f"also be 2-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            return (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if is_batched:
            if hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor"
                )
            return hx
        if hx.dim() != 2:
            raise RuntimeError(
                f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
            )
        return hx.unsqueeze(1)

    @staticmethod
    def _restore_hx_rank(hx, is_batched: bool):
        if is_batched:
            return hx
        if isinstance(hx, tuple):
            return (hx[0].squeeze(1), hx[1].squeeze(1))
        return hx.squeeze(1)


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
    returns ``output, (h_n, c_n)`` exactly as torch.nn.LSTM.
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
def _check_cell_inputs(module, input: Tensor, hiddens, autocast: bool) -> None:
    """The checks of torch's native cell ops (same messages)."""
    if not autocast:
        for t in (input, *hiddens):
            if t.dtype != module.weight_ih.dtype:  # torch's first GEMM raises this
                raise RuntimeError(
                    f"mat1 and mat2 must have the same dtype, but got {_scalar_name(t.dtype)} "
                    f"and {_scalar_name(module.weight_ih.dtype)}"
                )
    if input.size(1) != module.input_size:
        raise RuntimeError(
            f"input has inconsistent input_size: got {input.size(1)} expected {module.input_size}"
        )
    for label, h in enumerate(hiddens):
        if input.size(0) != h.size(0):
            raise RuntimeError(
                f"Input batch size {input.size(0)} doesn't match hidden{label} batch size {h.size(0)}"
            )
        if h.size(1) != module.hidden_size:
            raise RuntimeError(
                f"hidden{label} has inconsistent hidden_size: got {h.size(1)}, expected {module.hidden_size}"
            )


class LSTMCell(_BackendMixin, nn.LSTMCell):
    """Drop-in ``torch.nn.LSTMCell`` (fused bias + activations + state update)."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None):  # noqa: D102
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead"
                    )
        dtype, autocast = _compute_dtype(input, self.weight_ih)
        backend = self._choose_backend("LSTMCell", input, dtype)
        if backend == "torch":
            return super().forward(input, hx)
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros, zeros)
        else:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if not is_batched else hx
        _check_cell_inputs(self, input, hx, autocast)
        params = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        _check_same_device_and_dtype(input, [], params)
        h, c = hx
        if autocast:
            input, h, c = input.to(dtype), h.to(dtype), c.to(dtype)
            params = [None if p is None else p.to(dtype) for p in params]
        with torch.autocast(input.device.type, enabled=False) if autocast else _nullcontext():
            h_new, c_new = functional.lstm_cell(input, h, c, *params, backend=backend)
        if not is_batched:
            h_new, c_new = h_new.squeeze(0), c_new.squeeze(0)
        return h_new, c_new


class GRUCell(_BackendMixin, nn.GRUCell):
    """Drop-in ``torch.nn.GRUCell`` (fused bias + activations + state update)."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._set_backend(backend)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:  # noqa: D102
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        dtype, autocast = _compute_dtype(input, self.weight_ih)
        backend = self._choose_backend("GRUCell", input, dtype)
        if backend == "torch":
            return super().forward(input, hx)
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        else:
            hx = hx.unsqueeze(0) if not is_batched else hx
        _check_cell_inputs(self, input, [hx], autocast)
        params = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        _check_same_device_and_dtype(input, [], params)
        h = hx
        if autocast:
            input, h = input.to(dtype), h.to(dtype)
            params = [None if p is None else p.to(dtype) for p in params]
        with torch.autocast(input.device.type, enabled=False) if autocast else _nullcontext():
            h_new = functional.gru_cell(input, h, *params, backend=backend)
        return h_new if is_batched else h_new.squeeze(0)


# ---------------------------------------------------------------------------------------- convert
_CONVERSIONS = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Turn every torch.nn LSTM/GRU/LSTMCell/GRUCell inside ``model`` into its fusedrnn twin, in place.

    The modules keep their identity, parameters (same Parameter objects, so optimizers stay
    valid), device, dtype, training mode and hooks; only their class changes.  Returns ``model``
    (converted itself when it is one of those modules).
    """
    backends.check_backend_name(backend)
    for module in model.modules():
        target = _CONVERSIONS.get(type(module))
        if target is not None:
            module.__class__ = target
            module.backend = backend
    return model
