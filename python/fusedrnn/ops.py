"""The op contract: torch.library custom ops between the modules and the kernel backends.

Per layer and direction the modules call one recurrence op (``fusedrnn::lstm_fwd`` /
``fusedrnn::gru_fwd``) on the input projection of all steps; the op dispatches to the backend
named by its ``backend`` argument (a concrete name, never "auto": see ``backends.resolve``).  The
backward ops walk time in reverse and return the gradient of the projection and of the initial
states; the weight gradients are large GEMMs over all steps, done here once for every backend.

Shapes, dtypes and semantics of every op are those of ``fusedrnn.backends.reference`` (the spec).
Each op has an explicit fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces
through it, and an autograd formula, so ``torch.library.opcheck`` passes; callers use ``call``
(see the autodiff section), which also covers torch.func transforms and forward-mode AD.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import backends
from .backends import reference as _spec
from .backends.reference import acc_dtype, previous_states, step_order, valid_mask

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


def _fresh(outputs):
    """The op's outputs as its fake promises them: contiguous tensors of their own (storage
    offset 0; torch.compile plans with the fake's metadata).  A backend may return views into one
    buffer (the Triton backward's dh0 / dc0); those few, small tensors are copied."""
    return tuple(
        t if t.storage_offset() == 0 and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
        for t in outputs
    )


def _seq(T: int, B: int, n: int, like: Tensor, dtype=None) -> Tensor:
    return like.new_empty((T, B, n), dtype=dtype or like.dtype)


_IMPLS = {}  # custom op -> its Python implementation (what torch.library dispatches to on CPU/CUDA)


def _custom_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())``, keeping the implementation at hand for
    the eager fast path of ``call``."""

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _IMPLS[op] = fn
        return op

    return register


def _check_saved(op: str, *saved: Tensor) -> None:
    """The backward ops need the (T, B, n) tensors a saving forward returns."""
    if any(t.dim() != 3 for t in saved):
        raise RuntimeError(
            f"fusedrnn::{op}: the saved tensors have shapes {[tuple(t.shape) for t in saved]}, not "
            "(T, B, n): they come from a forward that ran with save=False, which saves nothing to "
            "differentiate; run the forward with save=True"
        )


# =========================================================================================== LSTM
@_custom_op("fusedrnn::lstm_fwd")
def lstm_fwd(
    xproj: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_hr: Optional[Tensor],
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool,
    backend: str,
) -> Tensors5:
    """LSTM recurrence. Returns (y (T,B,P), h_n (B,P), c_n (B,H), gates (T,B,4H), cs (T,B,H)).

    ``save=False`` (inference, see ``needs_saving``): gates and cs are empty (0,) tensors and the
    backend writes neither; the backward then cannot run (it raises)."""
    T, B, G = xproj.shape
    if B == 0:  # nothing to compute: shapes only
        return _lstm_fwd_empty(xproj, w_hh, c0, save)
    return _fresh(backends.get(backend).lstm_fwd(
        xproj.contiguous(), w_hh.contiguous(), _c(b_hh), h0.contiguous(), c0.contiguous(),
        _c(w_hr), _lengths(lengths, xproj), reverse, save=save,
    ))


def _lstm_fwd_empty(xproj, w_hh, c0, save):
    return tuple(t.zero_() for t in _lstm_fwd_fake(xproj, w_hh, None, None, c0, None, None, False, save, ""))


@lstm_fwd.register_fake
def _lstm_fwd_fake(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, save, backend):
    T, B, G = xproj.shape
    H, P = G // 4, w_hh.shape[1]
    return (
        _seq(T, B, P, xproj),
        xproj.new_empty((B, P)),
        xproj.new_empty((B, H)),
        _seq(T, B, G, xproj) if save else xproj.new_empty((0,)),
        _seq(T, B, H, xproj, acc_dtype(xproj.dtype)) if save else xproj.new_empty((0,), dtype=acc_dtype(xproj.dtype)),
    )


@_custom_op("fusedrnn::lstm_bwd")
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
    _check_saved("lstm_bwd", gates, cs)
    if gates.shape[1] == 0:
        return _lstm_bwd_fake(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, backend, zero=True)
    return _fresh(backends.get(backend).lstm_bwd(
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), w_hh.contiguous(), _c(w_hr),
        c0.contiguous(), gates.contiguous(), cs.contiguous(), _lengths(lengths, dy), reverse,
    ))


@lstm_bwd.register_fake
def _lstm_bwd_fake(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, backend, zero=False):
    T, B, G = gates.shape
    make = dy.new_zeros if zero else dy.new_empty
    dh_seq = make((T, B, dy.shape[2])) if w_hr is not None else make((0,))
    return make((T, B, G)), make(dh_n.shape), make(dc_n.shape), dh_seq


# ============================================================================================ GRU
@_custom_op("fusedrnn::gru_fwd")
def gru_fwd(
    xproj: Tensor,
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    h0: Tensor,
    lengths: Optional[Tensor],
    reverse: bool,
    save: bool,
    backend: str,
) -> Tensors3:
    """GRU recurrence. Returns (y (T,B,H), h_n (B,H), gates (T,B,4H) = [r, z, n, hn]).

    ``save=False``: gates is an empty (0,) tensor, as for ``lstm_fwd``."""
    if xproj.shape[1] == 0:
        return tuple(t.zero_() for t in _gru_fwd_fake(xproj, w_hh, b_hh, h0, lengths, reverse, save, backend))
    return _fresh(backends.get(backend).gru_fwd(
        xproj.contiguous(), w_hh.contiguous(), _c(b_hh), h0.contiguous(), _lengths(lengths, xproj), reverse,
        save=save,
    ))


@gru_fwd.register_fake
def _gru_fwd_fake(xproj, w_hh, b_hh, h0, lengths, reverse, save, backend):
    T, B, G = xproj.shape
    H = G // 3
    gates = _seq(T, B, 4 * H, xproj) if save else xproj.new_empty((0,))
    return _seq(T, B, H, xproj), xproj.new_empty((B, H)), gates


@_custom_op("fusedrnn::gru_bwd")
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
    _check_saved("gru_bwd", gates)
    if gates.shape[1] == 0:
        return _gru_bwd_fake(dy, dh_n, w_hh, h0, y, gates, lengths, reverse, backend, zero=True)
    return _fresh(backends.get(backend).gru_bwd(
        dy.contiguous(), dh_n.contiguous(), w_hh.contiguous(), h0.contiguous(), y.contiguous(),
        gates.contiguous(), _lengths(lengths, dy), reverse,
    ))


@gru_bwd.register_fake
def _gru_bwd_fake(dy, dh_n, w_hh, h0, y, gates, lengths, reverse, backend, zero=False):
    T, B, G4 = gates.shape
    H = G4 // 4
    make = dy.new_zeros if zero else dy.new_empty
    return make((T, B, 3 * H)), make((B, H)), make((T, B, H))


# ========================================================================================== cells
@_custom_op("fusedrnn::lstm_cell_fwd")
def lstm_cell_fwd(
    igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], c: Tensor, backend: str
) -> Tensors3:
    """One fused LSTM step (bias adds + activations + state update).

    igates = x @ W_ih^T, hgates = h @ W_hh^T (B, 4H); returns (h_new, c_new (B, H), gates (B, 4H)).
    """
    if igates.shape[0] == 0:
        H = c.shape[1]
        return c.new_zeros((0, H)), c.new_zeros((0, H)), igates.new_zeros((0, 4 * H))
    return _fresh(backends.get(backend).lstm_cell_fwd(
        igates.contiguous(), hgates.contiguous(), _c(b_ih), _c(b_hh), c.contiguous()
    ))


@lstm_cell_fwd.register_fake
def _(igates, hgates, b_ih, b_hh, c, backend):
    B, G = igates.shape
    H = G // 4
    return igates.new_empty((B, H)), igates.new_empty((B, H)), igates.new_empty((B, G))


@_custom_op("fusedrnn::lstm_cell_bwd")
def lstm_cell_bwd(
    dh_new: Tensor, dc_new: Tensor, c: Tensor, c_new: Tensor, gates: Tensor, backend: str
) -> Tensors2:
    """Returns (dgates (B, 4H) = gradient of igates, hgates and both biases, dc (B, H))."""
    if gates.shape[0] == 0:
        return torch.zeros_like(gates), torch.zeros_like(c)
    return _fresh(backends.get(backend).lstm_cell_bwd(
        dh_new.contiguous(), dc_new.contiguous(), c.contiguous(), c_new.contiguous(), gates.contiguous()
    ))


@lstm_cell_bwd.register_fake
def _(dh_new, dc_new, c, c_new, gates, backend):
    return torch.empty_like(gates), torch.empty_like(c)


@_custom_op("fusedrnn::gru_cell_fwd")
def gru_cell_fwd(
    igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], h: Tensor, backend: str
) -> Tensors2:
    """One fused GRU step. igates = x @ W_ih^T, hgates = h @ W_hh^T (B, 3H).

    Returns (h_new (B, H), gates (B, 4H) = [r, z, n, hn]).
    """
    if igates.shape[0] == 0:
        H = h.shape[1]
        return h.new_zeros((0, H)), igates.new_zeros((0, 4 * H))
    return _fresh(backends.get(backend).gru_cell_fwd(
        igates.contiguous(), hgates.contiguous(), _c(b_ih), _c(b_hh), h.contiguous()
    ))


@gru_cell_fwd.register_fake
def _(igates, hgates, b_ih, b_hh, h, backend):
    B, G = igates.shape
    H = G // 3
    return igates.new_empty((B, H)), igates.new_empty((B, 4 * H))


@_custom_op("fusedrnn::gru_cell_bwd")
def gru_cell_bwd(dh_new: Tensor, h: Tensor, gates: Tensor, backend: str) -> Tensors3:
    """Returns (d_igates (B, 3H), d_hgates (B, 3H), dh (B, H): the direct z * dh_new path only)."""
    if gates.shape[0] == 0:
        H = h.shape[1]
        return h.new_zeros((0, 3 * H)), h.new_zeros((0, 3 * H)), torch.zeros_like(h)
    return _fresh(backends.get(backend).gru_cell_bwd(dh_new.contiguous(), h.contiguous(), gates.contiguous()))


@gru_cell_bwd.register_fake
def _(dh_new, h, gates, backend):
    B, H = h.shape
    return h.new_empty((B, 3 * H)), h.new_empty((B, 3 * H)), torch.empty_like(h)


# ======================================================================================= autodiff
# How a call is differentiated (see the README's compatibility section):
#
# * First-order reverse mode (loss.backward(), torch.autograd.grad) runs the backend's backward
#   kernel: the ``*_bwd`` ops above, plus the weight-gradient GEMMs here.
# * Higher-order reverse mode (create_graph=True, then backward again): the ``*_bwd`` ops are
#   differentiated through their spec, ``backends.reference`` (plain differentiable PyTorch), and
#   the ``*_fwd`` ops' backward accepts cotangents on their saved outputs (gates, cell states),
#   which only a second differentiation produces (see ``_lstm_saved_cotangents``).
# * torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap) and forward-mode AD
#   (torch.autograd.forward_ad): torch.library's generated autograd for custom ops is an
#   old-style autograd.Function, which functorch refuses ("must override the setup_context
#   staticmethod") and forward-mode AD silently skips (its outputs get no tangent: zeros).  Calls
#   made there go through an autograd.Function twin of the same op instead (``_TWINS``): its
#   forward and backward run the same kernels, its ``jvp`` is the forward-mode derivative of the
#   spec (torch.func.jvp of ``backends.reference``), and its vmap rule runs one call per slice.
# * Plain eager calls (the common case: no torch.compile, torch.func, forward AD, jit tracing,
#   torch function / dispatch mode or tensor subclass) skip torch.library's dispatch, whose Python
#   layers (the dispatcher's Python kernel, the generated autograd.Function, the aliasing check)
#   cost more than the CPU kernels of a small LSTM.  ``call`` then runs the op's implementation
#   directly, inside an autograd.Function whose setup and backward are the very functions
#   registered for the custom op (``_DIRECT``) when something requires grad, else bare.  Same
#   kernels, same saved tensors, same backward (and so the same double backward).
#
# The modules reach every op through ``call(op, *args)``, which picks the custom op, its direct
# eager form or its twin.


def _weight_grad(dgates: Tensor, inputs: Tensor) -> Tensor:
    """sum_t dgates_t^T @ inputs_t: (T,B,G) x (T,B,K) -> (G,K), one GEMM over all steps."""
    G, K = dgates.shape[-1], inputs.shape[-1]
    return dgates.reshape(-1, G).t().mm(inputs.reshape(-1, K).to(dgates.dtype))


def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _transformed(*tensors: Optional[Tensor]) -> bool:
    """Whether a call runs under a torch.func transform or carries forward-mode tangents."""
    if torch.compiler.is_compiling():
        return False  # torch.compile traces the custom ops themselves (fake + registered autograd)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if getattr(forward_ad, "_current_level", -1) < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def needs_saving(*tensors: Optional[Tensor]) -> bool:
    """The ``save`` argument of ``lstm_fwd`` / ``gru_fwd`` for a call on ``tensors`` (its inputs):
    whether anything may run its backward.  True when grad mode is on and some input requires
    grad, or under a torch.func transform or forward-mode AD (their rules may differentiate it).
    False under ``no_grad`` / ``inference_mode`` or when nothing requires grad: the forward then
    writes only y and the final states (about 1/7 of the bytes, issue 10).

    Always True while ``torch.jit.trace`` or ``torch.export`` records the call: the recorded
    graph keeps the value as a constant, and a graph traced under no_grad may be trained later.
    (torch.compile guards on grad mode and requires_grad, so it re-traces instead.)"""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    if torch._C._get_tracing_state() is not None or torch.compiler.is_exporting():
        return True
    return _transformed(*tensors)


_PLAIN = (Tensor, torch.nn.Parameter)


def _plain_eager(args) -> bool:
    """Whether a call on ``args`` is plain eager PyTorch, where torch.library's dispatch of a
    custom op would only reach its implementation and its registered autograd: not compiling or
    jit-tracing, no torch.func transform, no forward-AD level open, no torch function / dispatch
    mode active (FakeTensorMode, make_fx, ``with torch.device(...)``, ...) and no tensor
    subclass among the arguments."""
    if (
        torch.compiler.is_compiling()
        or torch._C._functorch.peek_interpreter_stack() is not None
        or getattr(forward_ad, "_current_level", -1) >= 0
        or torch._C._get_tracing_state() is not None
        or torch._C._len_torch_function_stack()
        or torch._C._len_torch_dispatch_stack()
    ):
        return False
    for a in args:
        if isinstance(a, Tensor) and type(a) not in _PLAIN:
            return False
    return True


def call(op, *args):
    """Run custom op ``op`` differentiably in every autodiff mode (see the section comment)."""
    if _plain_eager(args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return _DIRECT[op].apply(*args)
        return _IMPLS[op](*args)
    if _transformed(*(a for a in args if isinstance(a, Tensor))):
        return _TWINS[op].apply(*args)
    return op(*args)


def _previous_states_vjp(d_prev: Tensor, y: Tensor, h0: Tensor, lengths, reverse: bool):
    """Cotangents of (y, h0) from a cotangent of ``previous_states(y, h0, ...)`` (the state
    entering each step): a cotangent on the state a step reads is one on the output it came from."""
    _, vjp = torch.func.vjp(lambda s, i: previous_states(s, i, lengths, reverse), y, h0)
    return vjp(d_prev.to(y.dtype))


def _masked(t: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _lstm_gates_cotangent(dgates: Tensor, gates: Tensor) -> Tensor:
    """Cotangent of the pre-activations from one on the activated gates [i, f, g, o]:
    sigmoid' = s (1 - s) and tanh' = 1 - t^2, written in the activations (all that is saved)."""
    acc = acc_dtype(gates.dtype)
    i, f, g, o = gates.to(acc).chunk(4, dim=-1)
    di, df, dg, do = dgates.to(acc).chunk(4, dim=-1)
    return torch.cat([di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], dim=-1)


def _gru_gates_cotangent(dgates: Tensor, gates: Tensor) -> Tuple[Tensor, Tensor]:
    """Cotangents of (xproj, hidden projection) at one step from one on the saved
    [r, z, n, hn] (n = tanh(x_n + r * hn), hn = h_{t-1} @ W_hn^T + b_hn; PyTorch's GRU)."""
    acc = acc_dtype(gates.dtype)
    r, z, n, hn = gates.to(acc).chunk(4, dim=-1)
    dr, dz, dn, dhn = dgates.to(acc).chunk(4, dim=-1)
    dn_pre = dn * (1 - n * n)
    dr_pre = (dr + dn_pre * hn) * r * (1 - r)
    dz_pre = dz * z * (1 - z)
    d_x = torch.cat([dr_pre, dz_pre, dn_pre], dim=-1)
    d_h = torch.cat([dr_pre, dz_pre, dhn + dn_pre * r], dim=-1)
    return d_x, d_h


def _lstm_saved_cotangents(dgates, dcs, gates: Tensor, cs: Tensor, c0: Tensor, lengths, reverse: bool):
    """Cotangents on the saved gates / cell states (they appear only when a backward is itself
    differentiated) as (d_pre (T, B, 4H), dc0 (B, H)), d_pre being one more cotangent of the
    pre-activations, which the caller adds to the projection's gradient and, through W_hh, to
    the state each step reads.

    A cotangent on c_t flows back only through c (c_t = f_t c_{t-1} + i_t g_t): the elementwise
    scan lam_t = dcs_t + f_{t+1} lam_{t+1} over valid steps, reaching the i, f, g pre-activations
    of step t and, past the first step, c0.  Padded steps hold constant zeros: no cotangent.
    """
    T, B, G = gates.shape
    acc = cs.dtype
    valid = valid_mask(lengths, T, B, gates.device)
    d_pre = torch.zeros(T, B, G, dtype=acc, device=gates.device)
    if dgates is not None:
        d_pre = d_pre + _masked(_lstm_gates_cotangent(dgates, gates), valid)
    dc0 = torch.zeros_like(c0, dtype=acc)
    if dcs is not None:
        dcs = dcs.to(acc)
        i, f, g, _ = gates.to(acc).chunk(4, dim=-1)
        c_prev = previous_states(cs, c0.to(acc), lengths, reverse)
        lam = [None] * T
        carry = dc0
        for t in reversed(step_order(T, reverse)):
            m = valid[t].unsqueeze(-1)
            lam_t = torch.where(m, dcs[t] + carry, torch.zeros((), dtype=acc, device=gates.device))
            carry = torch.where(m, lam_t * f[t], carry)
            lam[t] = lam_t
        lam = torch.stack(lam)
        d_c = torch.cat(
            [lam * g * i * (1 - i), lam * c_prev * f * (1 - f), lam * i * (1 - g * g), torch.zeros_like(lam)],
            dim=-1,
        )
        d_pre = d_pre + d_c
        dc0 = carry
    return d_pre, dc0


# ------------------------------------------------------------------------------------------ LSTM
def _unsaved(ctx, op: str):
    if not ctx.saved:
        raise RuntimeError(
            f"fusedrnn::{op} ran with save=False (inference: no input required grad when it ran), "
            "so its backward has nothing to work from; call it with save=True to differentiate it"
        )


def _lstm_setup(ctx, inputs, output):
    xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, save, backend = inputs
    y, _, _, gates, cs = output
    ctx.saved = save
    ctx.set_materialize_grads(False)  # None marks outputs without cotangent (gates, cs: usually)
    ctx.save_for_backward(w_hh, w_hr, h0, c0, y, gates, cs, lengths)
    ctx.has_bias = b_hh is not None
    ctx.reverse = reverse
    ctx.backend = backend


def _lstm_backward(ctx, dy, dh_n, dc_n, dgates, dcs):
    _unsaved(ctx, "lstm_fwd")
    w_hh, w_hr, h0, c0, y, gates, cs, lengths = ctx.saved_tensors
    reverse = ctx.reverse
    dy = _zeros_if_none(dy, y)
    dh_n = _zeros_if_none(dh_n, h0)
    dc_n = _zeros_if_none(dc_n, c0)
    saved_cot = dgates is not None or dcs is not None
    if saved_cot:
        d_pre, dc0_extra = _lstm_saved_cotangents(dgates, dcs, gates, cs, c0, lengths, reverse)
        d_prev = d_pre.to(w_hh.dtype) @ w_hh  # cotangent of the state each step reads
        dy_extra, dh0_extra = _previous_states_vjp(d_prev, y, h0, lengths, reverse)
        dy = dy + dy_extra
    dxproj, dh0, dc0, dh_seq = call(
        lstm_bwd, dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, ctx.backend
    )
    if saved_cot:
        dxproj = dxproj + d_pre.to(dxproj.dtype)
        dh0 = dh0 + dh0_extra.to(dh0.dtype)
        dc0 = dc0 + dc0_extra.to(dc0.dtype)
    h_prev = previous_states(y, h0, lengths, reverse)
    dw_hh = _weight_grad(dxproj, h_prev).to(w_hh.dtype)
    db_hh = dxproj.sum(dim=(0, 1)).to(w_hh.dtype) if ctx.has_bias else None
    dw_hr = None
    if w_hr is not None:
        H = cs.shape[2]
        m = gates[..., 3 * H :].to(cs.dtype) * torch.tanh(cs)  # o * tanh(c), zero at padded steps
        dw_hr = _weight_grad(dh_seq, m).to(w_hr.dtype)
    return dxproj, dw_hh, db_hh, dh0, dc0, dw_hr, None, None, None, None


# ------------------------------------------------------------------------------------------- GRU
def _gru_setup(ctx, inputs, output):
    xproj, w_hh, b_hh, h0, lengths, reverse, save, backend = inputs
    y, _, gates = output
    ctx.saved = save
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(w_hh, h0, y, gates, lengths)
    ctx.has_bias = b_hh is not None
    ctx.reverse = reverse
    ctx.backend = backend


def _gru_backward(ctx, dy, dh_n, dgates):
    _unsaved(ctx, "gru_fwd")
    w_hh, h0, y, gates, lengths = ctx.saved_tensors
    reverse = ctx.reverse
    dy = _zeros_if_none(dy, y)
    dh_n = _zeros_if_none(dh_n, h0)
    if dgates is not None:  # only when this backward is itself differentiated
        valid = valid_mask(lengths, gates.shape[0], gates.shape[1], gates.device)
        dx_extra, dhp_extra = _gru_gates_cotangent(dgates, gates)
        dx_extra, dhp_extra = _masked(dx_extra, valid), _masked(dhp_extra, valid)
        dy_extra, dh0_extra = _previous_states_vjp(dhp_extra.to(w_hh.dtype) @ w_hh, y, h0, lengths, reverse)
        dy = dy + dy_extra
    dxproj, dh0, dhn = call(gru_bwd, dy, dh_n, w_hh, h0, y, gates, lengths, reverse, ctx.backend)
    H = dhn.shape[2]
    d_hproj = torch.cat([dxproj[..., : 2 * H], dhn], dim=2)
    if dgates is not None:
        dxproj = dxproj + dx_extra.to(dxproj.dtype)
        d_hproj = d_hproj + dhp_extra.to(d_hproj.dtype)
        dh0 = dh0 + dh0_extra.to(dh0.dtype)
    h_prev = previous_states(y, h0, lengths, reverse)
    dw_hh = _weight_grad(d_hproj, h_prev).to(w_hh.dtype)
    db_hh = d_hproj.sum(dim=(0, 1)).to(w_hh.dtype) if ctx.has_bias else None
    return dxproj, dw_hh, db_hh, dh0, None, None, None, None


# ----------------------------------------------------------------------------------------- cells
def _lstm_cell_setup(ctx, inputs, output):
    igates, hgates, b_ih, b_hh, c, backend = inputs
    _, c_new, gates = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(c, c_new, gates)
    ctx.bias = (b_ih is not None, b_hh is not None)
    ctx.backend = backend


def _lstm_cell_backward(ctx, dh_new, dc_new, dgates_saved):
    c, c_new, gates = ctx.saved_tensors
    dh_new = _zeros_if_none(dh_new, c_new)
    dc_new = _zeros_if_none(dc_new, c_new)
    dgates, dc = call(lstm_cell_bwd, dh_new, dc_new, c, c_new, gates, ctx.backend)
    if dgates_saved is not None:  # only when this backward is itself differentiated
        dgates = dgates + _lstm_gates_cotangent(dgates_saved, gates).to(dgates.dtype)
    db = dgates.sum(0)
    return (
        dgates,
        dgates,
        db if ctx.bias[0] else None,
        db if ctx.bias[1] else None,
        dc,
        None,
    )


def _gru_cell_setup(ctx, inputs, output):
    igates, hgates, b_ih, b_hh, h, backend = inputs
    _, gates = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, gates)
    ctx.bias = (b_ih is not None, b_hh is not None)
    ctx.backend = backend


def _gru_cell_backward(ctx, dh_new, dgates_saved):
    h, gates = ctx.saved_tensors
    dh_new = _zeros_if_none(dh_new, h)
    d_i, d_h, dh = call(gru_cell_bwd, dh_new, h, gates, ctx.backend)
    if dgates_saved is not None:  # only when this backward is itself differentiated
        dx_extra, dh_extra = _gru_gates_cotangent(dgates_saved, gates)
        d_i = d_i + dx_extra.to(d_i.dtype)
        d_h = d_h + dh_extra.to(d_h.dtype)
    return (
        d_i,
        d_h,
        d_i.sum(0) if ctx.bias[0] else None,
        d_h.sum(0) if ctx.bias[1] else None,
        dh,
        None,
    )


# ------------------------------------------------------------- derivatives of the spec (slow path)
def _spec_call(spec, args, diff_pos, diff_values):
    """``spec`` (a backends.reference function) on ``args`` minus the trailing backend name,
    with the tensors at ``diff_pos`` replaced by ``diff_values``."""
    args = list(args[:-1])
    for k, v in zip(diff_pos, diff_values):
        args[k] = v
    return spec(*args)


def _differentiable_positions(args, wanted) -> list:
    return [
        k for k, a in enumerate(args[:-1])
        if isinstance(a, Tensor) and a.is_floating_point() and wanted(k)
    ]


def _spec_setup(ctx, inputs, output):
    """Setup of a ``*_bwd`` op: keep every input; its derivative is the spec's."""
    ctx.set_materialize_grads(False)
    ctx.tensor_pos = [k for k, a in enumerate(inputs) if isinstance(a, Tensor)]
    ctx.consts = [None if isinstance(a, Tensor) else a for a in inputs]
    ctx.save_for_backward(*(inputs[k] for k in ctx.tensor_pos))


def _saved_args(ctx) -> list:
    args = list(ctx.consts)
    for k, t in zip(ctx.tensor_pos, ctx.saved_tensors):
        args[k] = t
    return args


def _spec_vjp(spec):
    """Backward of a ``*_bwd`` op: the vector-Jacobian product of its spec, itself differentiable
    (torch.func.vjp composes with autograd), so any order of reverse mode works."""

    def backward(ctx, *grads):
        args = _saved_args(ctx)
        diff_pos = _differentiable_positions(args, lambda k: ctx.needs_input_grad[k])
        result = [None] * len(args)
        if not diff_pos or all(g is None for g in grads):
            return tuple(result)
        outs, vjp = torch.func.vjp(
            lambda *d: _spec_call(spec, args, diff_pos, d), *(args[k] for k in diff_pos)
        )
        cot = tuple(torch.zeros_like(o) if g is None else g for g, o in zip(grads, outs))
        for k, g in zip(diff_pos, vjp(cot)):
            result[k] = g
        return tuple(result)

    return backward


def _spec_jvp(spec):
    """Forward-mode derivative of an op: the Jacobian-vector product of its spec."""

    def jvp(ctx, *tangents):
        args = list(ctx.jvp_consts)
        for k, t in zip(ctx.jvp_tensor_pos, ctx.saved_tensors):
            args[k] = t
        diff_pos = _differentiable_positions(args, lambda k: tangents[k] is not None)
        if not diff_pos:
            return tuple(torch.zeros_like(o) for o in _spec_call(spec, args, [], []))
        f = lambda *d: _spec_call(spec, args, diff_pos, d)  # noqa: E731
        primals = tuple(args[k] for k in diff_pos)
        tans = tuple(tangents[k] for k in diff_pos)
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return torch.func.jvp(f, primals, tans)[1]
        # plain torch.autograd.forward_ad: its level is already open (torch.func.jvp would nest
        # one) and forward grads are off inside jvp(): switch them on for the spec
        with forward_ad._set_fwd_grad_enabled(True):
            duals = [forward_ad.make_dual(forward_ad.unpack_dual(p).primal, t) for p, t in zip(primals, tans)]
            outs = f(*duals)
            return tuple(_zeros_if_none(forward_ad.unpack_dual(o).tangent, o) for o in outs)

    return jvp


def _twin(op, spec, setup, backward):
    """autograd.Function running custom op ``op`` under torch.func transforms / forward-mode AD.

    Its vmap rule runs one call per vmapped slice: the kernels take one batch, and the spec
    (used by jvp and by higher-order backward) writes its results step by step into buffers,
    which vmap cannot batch.
    """

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.jvp_tensor_pos = [k for k, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.jvp_consts = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_forward(*(inputs[k] for k in ctx.jvp_tensor_pos))

    def forward(*args):
        return op(*args)

    def vmap(info, in_dims, *args):
        results = []
        for i in range(info.batch_size):
            sliced = [a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]
            results.append(cls.apply(*sliced))
        outs = tuple(torch.stack(o) for o in zip(*results))
        return outs, (0,) * len(outs)

    name = "".join(part.capitalize() for part in op._name.split("::")[-1].split("_")) + "Function"
    cls = type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(_spec_jvp(spec)),
            "vmap": staticmethod(vmap),
        },
    )
    return cls


_SPEC = {
    lstm_fwd: (_spec.lstm_fwd, _lstm_setup, _lstm_backward),
    gru_fwd: (_spec.gru_fwd, _gru_setup, _gru_backward),
    lstm_cell_fwd: (_spec.lstm_cell_fwd, _lstm_cell_setup, _lstm_cell_backward),
    gru_cell_fwd: (_spec.gru_cell_fwd, _gru_cell_setup, _gru_cell_backward),
    lstm_bwd: (_spec.lstm_bwd, _spec_setup, _spec_vjp(_spec.lstm_bwd)),
    gru_bwd: (_spec.gru_bwd, _spec_setup, _spec_vjp(_spec.gru_bwd)),
    lstm_cell_bwd: (_spec.lstm_cell_bwd, _spec_setup, _spec_vjp(_spec.lstm_cell_bwd)),
    gru_cell_bwd: (_spec.gru_cell_bwd, _spec_setup, _spec_vjp(_spec.gru_cell_bwd)),
}
def _direct(op, setup, backward):
    """autograd.Function running ``op``'s implementation without torch.library's dispatch, with
    the setup and backward registered for ``op`` (plain eager calls only: see ``call``).

    It is written in the combined form (``forward(ctx, *args)`` calling the setup), as
    torch.library's own generated Function is: with a separate ``setup_context`` staticmethod,
    ``Function.apply`` binds the arguments through ``inspect.signature`` on every call (~10 us)."""
    impl = _IMPLS[op]

    def forward(ctx, *args):
        output = impl(*args)
        setup(ctx, args, output)
        return output

    name = "".join(part.capitalize() for part in op._name.split("::")[-1].split("_")) + "Direct"
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_TWINS = {}
_DIRECT = {}
for _op, (_spec_fn, _setup, _backward) in _SPEC.items():
    _op.register_autograd(_backward, setup_context=_setup)
    _TWINS[_op] = _twin(_op, _spec_fn, _setup, _backward)
    _DIRECT[_op] = _direct(_op, _setup, _backward)
