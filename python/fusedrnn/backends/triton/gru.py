"""GRU recurrence and GRUCell kernels in Triton (the ``triton`` backend's GRU half).

Contract: ``fusedrnn.backends.reference`` (``gru_fwd``, ``gru_bwd``, ``gru_cell_fwd``,
``gru_cell_bwd``): same signatures, shapes, dtypes and padded-step semantics.

Recurrence kernels
------------------
One launch per layer and direction covers the whole sequence (persistent mode).  A program owns
``BU`` hidden units -- the r, z and n rows of W_hh for those units together -- for a tile of ``BB``
batch rows, and loads its slice of W_hh once, before the time loop; it stays on chip (registers /
shared memory, as the compiler places the ``tl.dot`` operand) for all T steps.

* single-program variant (``SPLIT=False``): one program owns every unit of its batch tile
  (``BU == HP``); h never leaves the program and no barrier is needed.  Used while the whole W_hh
  fits one program's budget (small H).
* split variant (``SPLIT=True``): ``cdiv(H, BU)`` programs per batch tile.  Every step each program
  needs the whole h_{t-1} (forward) or the whole [dr, dz, dhn] (backward): they are exchanged
  through a double-buffered global (L2) buffer in the accumulation dtype, and programs meet at a
  grid barrier (atomic counter, bounded spin, error flag: a failed barrier raises, never hangs).
  ``SYNC=False`` runs the same kernel without barriers, one launch per step (the kernel boundary is
  the barrier): the "stepwise" mode, used where programs are not co-resident -- notably under the
  Triton interpreter, which runs programs one after another.

Forward step (program p, own units U):  h_full = hx[s%2] (SPLIT) | h_own;  [hr|hz|hn]_U = h_full @
W_{r,z,n}[U]^T + b_hh;  r, z, n, h_new as reference.py;  stores y, gates=[r,z,n,hn];  h_own ->
hx[(s+1)%2];  barrier.
Backward step (reverse time): phase A: own units' [dr_pre, dz_pre, dn_pre], dhn = dn_pre*r ->
dxproj, dhn, exchange buffer xb[s%2];  ``base = where(valid, dh_tot*z, dh)``;  barrier;  phase B:
dh_own = base + [dr|dz|dhn]_full @ W_hh[:, U] (padded rows contribute zeros, so the masked update
of reference.py falls out).  In stepwise mode phase B of step s runs at the start of the launch for
step s+1 (and a final launch with an empty step range finishes step T-1).

Per-step cost (one layer/direction, B=16, H=768, bf16, 48 programs of BU=16, HP=1024):
    FLOP  2*B*H*3H = 56.6 MFLOP per step (fwd; bwd the same), ~1.2 MFLOP per program: ~0.2 us on
          one SM's tensor cores.  (Padding H to HP=1024 costs 4/3 of that.)
    bytes W_hh 3H*H*2 = 3.5 MB read once per launch, never per step.  Per step and program:
          read h_full B*HP*4 = 64 KB from L2 (fp32 exchange buffer), xproj B*3BU*2 = 1.5 KB;
          write y B*BU*2 = 0.5 KB, gates B*4BU*2 = 2 KB, h B*BU*4 = 1 KB.  Whole grid per step:
          ~3.1 MB L2 reads (h broadcast), ~0.17 MB HBM traffic (xproj, y, gates) -> ~0.05 us at
          3.3 TB/s; the floor is latency: one L2 round trip for h + one grid barrier (~1 us).
    backward per program per step: read dy, gates, h_prev (~3 KB), write dxproj, dhn (~2 KB),
          exchange 3*B*BU*4 = 3 KB out, 3*B*HP*4 = 192 KB in (L2).

Variant rule (``_plan``): HP = next_pow2(max(H, 16)); BB = 16 batch rows per tile (``tl.dot``
needs >= 16); W budget per program ``W_BUDGET_BYTES`` (fits the register file of 8 warps with
room for the rest).  Single program if 3*HP*HP*elt <= budget, else the largest BU (power of 2,
>= 16) with 3*HP*BU*elt <= budget; the grid's programs per launch must be co-resident (<= SM count),
batch tiles are launched in groups that fit.  The largest H per dtype is ``max_hidden_size``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "gru_fwd",
    "gru_bwd",
    "gru_cell_fwd",
    "gru_cell_bwd",
    "max_hidden_size",
    "unsupported_gru",
    "aot_variants",
]

from . import _common as C
from ._common import grid_barrier, sigmoid as _sigmoid, tanh as _tanh

GATES = 3  # r, z, n rows of W_hh per hidden unit
MAX_SPIN_INTERPRET = 64  # the interpreter polls slowly: fail fast there (tests of the error path)
CELL_BLOCK = 1024


def max_hidden_size(dtype: torch.dtype, device=None) -> int:
    """Largest GRU hidden size the recurrence kernels run for ``dtype`` on ``device``."""
    return C.max_hidden_size(GATES, dtype, device)


def unsupported_gru(dtype: torch.dtype, hidden_size: int, device_type: str, device=None) -> Optional[str]:
    return C.unsupported_reason(GATES, hidden_size, 0, dtype, device_type, device)


def _variant(H: int, B: int, dtype: torch.dtype, device) -> "C.Variant":
    try:
        return C.select_variant(GATES, H, H, B, dtype, device)
    except ValueError as e:
        raise ValueError(f"fusedrnn triton GRU: hidden_size={H}: {e}") from None


def _upcast_dot(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 ``tl.dot`` returns garbage (triton 3.8): there the operands are rounded
    to bf16 and multiplied in fp32 (same values, same result up to summation order)."""
    return dtype == torch.bfloat16 and C.interpret_mode()


def _max_spins() -> int:
    return MAX_SPIN_INTERPRET if C.interpret_mode() else C.MAX_SPIN


# ---------------------------------------------------------------------------- forward kernel
@triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end", "tile0"])
def _gru_fwd_kernel(
    xproj_ptr,  # (T, B, 3H) dtype
    w_ptr,  # (3H, H)
    b_ptr,  # (3H,) or dummy
    len_ptr,  # (B,) int64 or dummy
    hx_ptr,  # (2, B, H) acc: state / exchange buffer (double-buffered by step parity)
    y_ptr,  # (T, B, H) dtype
    hn_ptr,  # (B, H) dtype
    gates_ptr,  # (T, B, 4H) dtype
    bar_ptr,  # (n_tiles,) int32 barrier counters, zero at launch
    err_ptr,  # (1,) int32 error flag
    T,
    B,
    step_begin,
    step_end,
    tile0,
    H: tl.constexpr,
    HP: tl.constexpr,
    BU: tl.constexpr,
    BB: tl.constexpr,
    N_UBLK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    REVERSE: tl.constexpr,
    SPLIT: tl.constexpr,
    SYNC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MAX_SPINS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if xproj_ptr.dtype.element_ty == tl.float64 else tl.float32
    DT: tl.constexpr = xproj_ptr.dtype.element_ty
    OP: tl.constexpr = tl.float32 if UPCAST_DOT else DT  # dtype of the tl.dot operands
    pid_u = tl.program_id(0)
    tile = tile0 + tl.program_id(1)
    rows = tile * BB + tl.arange(0, BB)  # [BB]
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    units = pid_u * BU + tl.arange(0, BU)  # [BU] own units
    unit_ok = units < H
    ks = tl.arange(0, HP)  # [HP] input units of the recurrent GEMM
    k_ok = ks < H
    H64 = H
    B64 = B.to(tl.int64)

    # W_hh^T slices [HP, BU]: wt_g[k, u] = W[g*H + u, k]; loaded once, on chip for all steps
    w_off = units[None, :].to(tl.int64) * H + ks[:, None]
    w_msk = k_ok[:, None] & unit_ok[None, :]
    wt_r = tl.load(w_ptr + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
    wt_z = tl.load(w_ptr + H64 * H + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
    wt_n = tl.load(w_ptr + 2 * H64 * H + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
    if HAS_BIAS:
        b_r = tl.load(b_ptr + units, mask=unit_ok, other=0.0).to(ACC)
        b_z = tl.load(b_ptr + H + units, mask=unit_ok, other=0.0).to(ACC)
        b_n = tl.load(b_ptr + 2 * H + units, mask=unit_ok, other=0.0).to(ACC)
    else:
        b_r = tl.zeros([BU], dtype=ACC)
        b_z = tl.zeros([BU], dtype=ACC)
        b_n = tl.zeros([BU], dtype=ACC)
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
    else:
        lens = tl.where(row_ok, T, 0).to(tl.int64)

    io_msk = row_ok[:, None] & unit_ok[None, :]  # [BB, BU]
    own_off = rows64[:, None] * H + units[None, :]  # into (B, H)
    full_off = rows64[:, None] * H + ks[None, :]  # [BB, HP]
    full_msk = row_ok[:, None] & k_ok[None, :]
    buf = B64 * H  # one slot of hx

    # the launcher puts h0 (in the accumulation dtype) into slot 0 before the first launch
    h_own = tl.load(hx_ptr + (step_begin % 2) * buf + own_off, mask=io_msk, other=0.0, cache_modifier=".cg")
    for s in range(step_begin, step_end):
        if REVERSE:
            t = T - 1 - s
        else:
            t = s
        t64 = t.to(tl.int64)
        if SPLIT:
            h_full = tl.load(hx_ptr + (s % 2) * buf + full_off, mask=full_msk, other=0.0, cache_modifier=".cg")
        else:
            h_full = h_own
        hd = h_full.to(DT).to(OP)  # [BB, HP]
        if ACC == tl.float64:
            a_r = tl.dot(hd, wt_r, out_dtype=tl.float64)
            a_z = tl.dot(hd, wt_z, out_dtype=tl.float64)
            a_n = tl.dot(hd, wt_n, out_dtype=tl.float64)
        else:
            a_r = tl.dot(hd, wt_r, input_precision=DOT_PREC, out_dtype=tl.float32)
            a_z = tl.dot(hd, wt_z, input_precision=DOT_PREC, out_dtype=tl.float32)
            a_n = tl.dot(hd, wt_n, input_precision=DOT_PREC, out_dtype=tl.float32)
        x_off = t64 * B64 * (3 * H) + rows64[:, None] * (3 * H) + units[None, :]
        x_r = tl.load(xproj_ptr + x_off, mask=io_msk, other=0.0).to(ACC)
        x_z = tl.load(xproj_ptr + x_off + H, mask=io_msk, other=0.0).to(ACC)
        x_n = tl.load(xproj_ptr + x_off + 2 * H, mask=io_msk, other=0.0).to(ACC)
        hn = a_n + b_n[None, :]
        r = _sigmoid(x_r + a_r + b_r[None, :])
        z = _sigmoid(x_z + a_z + b_z[None, :])
        n = _tanh(x_n + r * hn)
        h_new = (1.0 - z) * n + z * h_own
        valid = (t < lens)[:, None]  # [BB, 1]
        h_own = tl.where(valid, h_new, h_own)
        zero = tl.zeros([BB, BU], dtype=ACC)
        y_off = t64 * B64 * H + own_off
        tl.store(y_ptr + y_off, tl.where(valid, h_new, zero).to(DT), mask=io_msk)
        g_off = t64 * B64 * (4 * H) + rows64[:, None] * (4 * H) + units[None, :]
        tl.store(gates_ptr + g_off, tl.where(valid, r, zero).to(DT), mask=io_msk)
        tl.store(gates_ptr + g_off + H, tl.where(valid, z, zero).to(DT), mask=io_msk)
        tl.store(gates_ptr + g_off + 2 * H, tl.where(valid, n, zero).to(DT), mask=io_msk)
        tl.store(gates_ptr + g_off + 3 * H, tl.where(valid, hn, zero).to(DT), mask=io_msk)
        if SPLIT:
            tl.store(hx_ptr + ((s + 1) % 2) * buf + own_off, h_own, mask=io_msk)
            if SYNC:
                grid_barrier(bar_ptr + tile, N_UBLK * (s - step_begin + 1), err_ptr, N_UBLK, MAX_SPINS)

    if not SPLIT:
        tl.store(hx_ptr + (step_end % 2) * buf + own_off, h_own, mask=io_msk)
    tl.store(hn_ptr + own_off, h_own.to(DT), mask=io_msk)


# --------------------------------------------------------------------------- backward kernel
@triton.jit
def _exchange_dot(xb_ptr, slot_off, full_off, full_msk, H, w_r, w_z, w_n, DT: tl.constexpr, OP: tl.constexpr,
                  DOT_PREC: tl.constexpr, ACC: tl.constexpr):
    """[dr|dz|dhn]_full (from the exchange buffer, (B, 3H) per slot) @ W_hh[:, U] -> [BB, BU]."""
    d_r = tl.load(xb_ptr + slot_off + full_off, mask=full_msk, other=0.0, cache_modifier=".cg").to(DT).to(OP)
    d_z = tl.load(xb_ptr + slot_off + full_off + H, mask=full_msk, other=0.0, cache_modifier=".cg").to(DT).to(OP)
    d_n = tl.load(xb_ptr + slot_off + full_off + 2 * H, mask=full_msk, other=0.0, cache_modifier=".cg").to(DT).to(OP)
    return _dot3(d_r, d_z, d_n, w_r, w_z, w_n, DOT_PREC, ACC)


@triton.jit
def _dot3(a_r, a_z, a_n, w_r, w_z, w_n, DOT_PREC: tl.constexpr, ACC: tl.constexpr):
    if ACC == tl.float64:
        acc = tl.dot(a_r, w_r, out_dtype=tl.float64)
        acc = tl.dot(a_z, w_z, acc, out_dtype=tl.float64)
        acc = tl.dot(a_n, w_n, acc, out_dtype=tl.float64)
    else:
        acc = tl.dot(a_r, w_r, input_precision=DOT_PREC, out_dtype=tl.float32)
        acc = tl.dot(a_z, w_z, acc, input_precision=DOT_PREC, out_dtype=tl.float32)
        acc = tl.dot(a_n, w_n, acc, input_precision=DOT_PREC, out_dtype=tl.float32)
    return acc


@triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end", "tile0", "finish_pending",
                               "defer_last"])
def _gru_bwd_kernel(
    dy_ptr,  # (T, B, H) dtype
    dhn_in_ptr,  # (B, H) dtype: gradient of h_n
    w_ptr,  # (3H, H)
    h0_ptr,  # (B, H)
    y_ptr,  # (T, B, H)
    gates_ptr,  # (T, B, 4H) [r, z, n, hn]
    len_ptr,  # (B,) int64 or dummy
    dst_ptr,  # (B, H) acc: dh state between launches
    xb_ptr,  # (2, B, 3H) acc: exchange buffer of [dr_pre, dz_pre, dhn] (SPLIT)
    dx_ptr,  # (T, B, 3H) dtype out
    dhseq_ptr,  # (T, B, H) dtype out
    dh0_ptr,  # (B, H) dtype out
    bar_ptr,
    err_ptr,
    T,
    B,
    step_begin,
    step_end,
    tile0,
    finish_pending,  # 1: phase B of step step_begin-1 is still due (stepwise mode)
    defer_last,  # 1: leave phase B of the last step to the next launch (stepwise mode)
    H: tl.constexpr,
    HP: tl.constexpr,
    BU: tl.constexpr,
    BB: tl.constexpr,
    N_UBLK: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    REVERSE: tl.constexpr,
    SPLIT: tl.constexpr,
    SYNC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    MAX_SPINS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    DT: tl.constexpr = dy_ptr.dtype.element_ty
    OP: tl.constexpr = tl.float32 if UPCAST_DOT else DT  # dtype of the tl.dot operands
    pid_u = tl.program_id(0)
    tile = tile0 + tl.program_id(1)
    rows = tile * BB + tl.arange(0, BB)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    units = pid_u * BU + tl.arange(0, BU)
    unit_ok = units < H
    ks = tl.arange(0, HP)
    k_ok = ks < H
    H64 = H
    B64 = B.to(tl.int64)

    # W_hh column slices [HP, BU]: w_g[k, u] = W[g*H + k, u]
    w_off = ks[:, None].to(tl.int64) * H + units[None, :]
    w_msk = k_ok[:, None] & unit_ok[None, :]
    w_r = tl.load(w_ptr + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
    w_z = tl.load(w_ptr + H64 * H + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
    w_n = tl.load(w_ptr + 2 * H64 * H + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
    else:
        lens = tl.where(row_ok, T, 0).to(tl.int64)

    io_msk = row_ok[:, None] & unit_ok[None, :]
    own_off = rows64[:, None] * H + units[None, :]
    own3_off = rows64[:, None] * (3 * H) + units[None, :]
    full3_off = rows64[:, None] * (3 * H) + ks[None, :]
    full_msk = row_ok[:, None] & k_ok[None, :]
    slot = B64 * (3 * H)

    if step_begin == 0:
        dh_own = tl.load(dhn_in_ptr + own_off, mask=io_msk, other=0.0).to(ACC)
    else:
        dh_own = tl.load(dst_ptr + own_off, mask=io_msk, other=0.0, cache_modifier=".cg")
    if SPLIT:
        if finish_pending != 0:
            dh_own += _exchange_dot(xb_ptr, ((step_begin - 1) % 2) * slot, full3_off, full_msk, H,
                                    w_r, w_z, w_n, DT, OP, DOT_PREC, ACC)

    zero = tl.zeros([BB, BU], dtype=ACC)
    for s in range(step_begin, step_end):
        if REVERSE:
            t = s
            tp = t + 1
        else:
            t = T - 1 - s
            tp = t - 1
        t64 = t.to(tl.int64)
        valid = (t < lens)[:, None]
        # h_{t-1} as reference.previous_states: y of the neighbouring step, or h0 where the
        # sequence starts (t = 0 forward; t = lengths-1 reverse)
        if REVERSE:
            use_init = (tp >= lens)[:, None] | (tp >= T)
        else:
            use_init = (tl.zeros([BB, 1], dtype=tl.int32) + tp) < 0
        tp64 = tl.minimum(tl.maximum(tp, 0), T - 1).to(tl.int64)
        h_prev_y = tl.load(y_ptr + tp64 * B64 * H + own_off, mask=io_msk & (~use_init), other=0.0)
        h_prev_0 = tl.load(h0_ptr + own_off, mask=io_msk & use_init, other=0.0)
        h_prev = tl.where(use_init, h_prev_0.to(ACC), h_prev_y.to(ACC))

        dh_tot = dh_own + tl.load(dy_ptr + t64 * B64 * H + own_off, mask=io_msk, other=0.0).to(ACC)
        g_off = t64 * B64 * (4 * H) + rows64[:, None] * (4 * H) + units[None, :]
        r = tl.load(gates_ptr + g_off, mask=io_msk, other=0.0).to(ACC)
        z = tl.load(gates_ptr + g_off + H, mask=io_msk, other=0.0).to(ACC)
        n = tl.load(gates_ptr + g_off + 2 * H, mask=io_msk, other=0.0).to(ACC)
        hn = tl.load(gates_ptr + g_off + 3 * H, mask=io_msk, other=0.0).to(ACC)
        dn_pre = dh_tot * (1.0 - z) * (1.0 - n * n)
        dz_pre = dh_tot * (h_prev - n) * z * (1.0 - z)
        dr_pre = dn_pre * hn * r * (1.0 - r)
        dn_pre = tl.where(valid, dn_pre, zero)
        dz_pre = tl.where(valid, dz_pre, zero)
        dr_pre = tl.where(valid, dr_pre, zero)
        dhn = dn_pre * r
        dx_off = t64 * B64 * (3 * H) + own3_off
        tl.store(dx_ptr + dx_off, dr_pre.to(DT), mask=io_msk)
        tl.store(dx_ptr + dx_off + H, dz_pre.to(DT), mask=io_msk)
        tl.store(dx_ptr + dx_off + 2 * H, dn_pre.to(DT), mask=io_msk)
        tl.store(dhseq_ptr + t64 * B64 * H + own_off, dhn.to(DT), mask=io_msk)
        base = tl.where(valid, dh_tot * z, dh_own)
        if SPLIT:
            sl = (s % 2) * slot
            tl.store(xb_ptr + sl + own3_off, dr_pre, mask=io_msk)
            tl.store(xb_ptr + sl + own3_off + H, dz_pre, mask=io_msk)
            tl.store(xb_ptr + sl + own3_off + 2 * H, dhn, mask=io_msk)
            dh_own = base
            if SYNC:
                grid_barrier(bar_ptr + tile, N_UBLK * (s - step_begin + 1), err_ptr, N_UBLK, MAX_SPINS)
            if (defer_last == 0) | (s + 1 < step_end):
                dh_own += _exchange_dot(xb_ptr, sl, full3_off, full_msk, H, w_r, w_z, w_n, DT, OP, DOT_PREC, ACC)
        else:
            dh_own = base + _dot3(dr_pre.to(DT).to(OP), dz_pre.to(DT).to(OP), dhn.to(DT).to(OP), w_r, w_z, w_n,
                                  DOT_PREC, ACC)

    tl.store(dst_ptr + own_off, dh_own, mask=io_msk)
    tl.store(dh0_ptr + own_off, dh_own.to(DT), mask=io_msk)


# ------------------------------------------------------------------------------ cell kernels
@triton.jit(do_not_specialize=["N"])
def _gru_cell_fwd_kernel(
    ig_ptr, hg_ptr, bih_ptr, bhh_ptr, h_ptr, hnew_ptr, gates_ptr, N,
    H: tl.constexpr, HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if ig_ptr.dtype.element_ty == tl.float64 else tl.float32
    DT: tl.constexpr = ig_ptr.dtype.element_ty
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat (b, u) of (B, H)
    msk = idx < N
    b = idx // H
    u = idx % H
    g3 = b * (3 * H) + u
    x_r = tl.load(ig_ptr + g3, mask=msk, other=0.0).to(ACC)
    x_z = tl.load(ig_ptr + g3 + H, mask=msk, other=0.0).to(ACC)
    x_n = tl.load(ig_ptr + g3 + 2 * H, mask=msk, other=0.0).to(ACC)
    h_r = tl.load(hg_ptr + g3, mask=msk, other=0.0).to(ACC)
    h_z = tl.load(hg_ptr + g3 + H, mask=msk, other=0.0).to(ACC)
    h_n = tl.load(hg_ptr + g3 + 2 * H, mask=msk, other=0.0).to(ACC)
    if HAS_BIH:
        x_r += tl.load(bih_ptr + u, mask=msk, other=0.0).to(ACC)
        x_z += tl.load(bih_ptr + H + u, mask=msk, other=0.0).to(ACC)
        x_n += tl.load(bih_ptr + 2 * H + u, mask=msk, other=0.0).to(ACC)
    if HAS_BHH:
        h_r += tl.load(bhh_ptr + u, mask=msk, other=0.0).to(ACC)
        h_z += tl.load(bhh_ptr + H + u, mask=msk, other=0.0).to(ACC)
        h_n += tl.load(bhh_ptr + 2 * H + u, mask=msk, other=0.0).to(ACC)
    r = _sigmoid(x_r + h_r)
    z = _sigmoid(x_z + h_z)
    n = _tanh(x_n + r * h_n)
    h = tl.load(h_ptr + idx, mask=msk, other=0.0).to(ACC)
    tl.store(hnew_ptr + idx, ((1.0 - z) * n + z * h).to(DT), mask=msk)
    g4 = b * (4 * H) + u
    tl.store(gates_ptr + g4, r.to(DT), mask=msk)
    tl.store(gates_ptr + g4 + H, z.to(DT), mask=msk)
    tl.store(gates_ptr + g4 + 2 * H, n.to(DT), mask=msk)
    tl.store(gates_ptr + g4 + 3 * H, h_n.to(DT), mask=msk)


@triton.jit(do_not_specialize=["N"])
def _gru_cell_bwd_kernel(
    dhnew_ptr, h_ptr, gates_ptr, di_ptr, dhg_ptr, dh_ptr, N, H: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if gates_ptr.dtype.element_ty == tl.float64 else tl.float32
    DT: tl.constexpr = gates_ptr.dtype.element_ty
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = idx < N
    b = idx // H
    u = idx % H
    g4 = b * (4 * H) + u
    r = tl.load(gates_ptr + g4, mask=msk, other=0.0).to(ACC)
    z = tl.load(gates_ptr + g4 + H, mask=msk, other=0.0).to(ACC)
    n = tl.load(gates_ptr + g4 + 2 * H, mask=msk, other=0.0).to(ACC)
    hn = tl.load(gates_ptr + g4 + 3 * H, mask=msk, other=0.0).to(ACC)
    dh = tl.load(dhnew_ptr + idx, mask=msk, other=0.0).to(ACC)
    h = tl.load(h_ptr + idx, mask=msk, other=0.0).to(ACC)
    dn_pre = dh * (1.0 - z) * (1.0 - n * n)
    dz_pre = dh * (h - n) * z * (1.0 - z)
    dr_pre = dn_pre * hn * r * (1.0 - r)
    g3 = b * (3 * H) + u
    tl.store(di_ptr + g3, dr_pre.to(DT), mask=msk)
    tl.store(di_ptr + g3 + H, dz_pre.to(DT), mask=msk)
    tl.store(di_ptr + g3 + 2 * H, dn_pre.to(DT), mask=msk)
    tl.store(dhg_ptr + g3, dr_pre.to(DT), mask=msk)
    tl.store(dhg_ptr + g3 + H, dz_pre.to(DT), mask=msk)
    tl.store(dhg_ptr + g3 + 2 * H, (dn_pre * r).to(DT), mask=msk)
    tl.store(dh_ptr + idx, (dh * z).to(DT), mask=msk)


# ---------------------------------------------------------------------------------- launchers
def _launch_plan(v: "C.Variant", B: int):
    """(mode flags, [(tile0, n_tiles)]): batch tiles in groups of ``v.n_batch_tiles`` per launch."""
    n_tiles = C.cdiv(B, v.block_b)
    groups = [(t0, min(v.n_batch_tiles, n_tiles - t0)) for t0 in range(0, n_tiles, v.n_batch_tiles)]
    split = v.mode != "single"
    block_u = v.block_u if split else v.block_h
    return split, block_u, C.cdiv(B, v.block_b), groups


def _common_meta(v: "C.Variant", H: int, dt: torch.dtype, has_lengths: bool, reverse: bool) -> dict:
    split = v.mode != "single"
    return dict(
        H=H, HP=v.block_h, BU=v.block_u if split else v.block_h, BB=v.block_b, N_UBLK=v.n_unit_progs,
        HAS_LENGTHS=bool(has_lengths), REVERSE=bool(reverse), SPLIT=split, SYNC=v.mode == "persistent",
        DOT_PREC=C.dot_precision(dt), MAX_SPINS=_max_spins(), UPCAST_DOT=_upcast_dot(dt),
        num_warps=v.num_warps, num_stages=v.num_stages,
    )


def _fwd_meta(v, H, dt, has_bias, has_lengths, reverse) -> dict:
    """Constexprs + launch options of ``_gru_fwd_kernel`` for variant ``v`` (launcher and AOT)."""
    return dict(_common_meta(v, H, dt, has_lengths, reverse), HAS_BIAS=bool(has_bias))


def _bwd_meta(v, H, dt, has_lengths, reverse) -> dict:
    """Constexprs + launch options of ``_gru_bwd_kernel`` for variant ``v`` (launcher and AOT)."""
    return _common_meta(v, H, dt, has_lengths, reverse)


def gru_fwd(xproj: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor],
            reverse: bool):
    """GRU recurrence forward; see ``reference.gru_fwd``.  Returns (y, h_n, gates)."""
    T, B, G = xproj.shape
    H = G // 3
    dt, dev = xproj.dtype, xproj.device
    v = _variant(H, B, dt, dev)
    y = torch.empty(T, B, H, dtype=dt, device=dev)
    gates = torch.empty(T, B, 4 * H, dtype=dt, device=dev)
    hn = torch.empty(B, H, dtype=dt, device=dev)
    if B == 0:
        return y, hn, gates
    if T == 0:
        hn.copy_(h0)
        return y, hn, gates
    xproj, w_hh = xproj.contiguous(), w_hh.contiguous()
    split, block_u, n_tiles, groups = _launch_plan(v, B)
    hx = torch.empty(2, B, H, dtype=C.acc_dtype(dt), device=dev)  # state / exchange (step parity)
    hx[0].copy_(h0)
    bar, err = C.new_sync_buffers(n_tiles, dev)
    bias = b_hh.contiguous() if b_hh is not None else xproj
    lens = lengths.to(device=dev, dtype=torch.int64).contiguous() if lengths is not None else bar
    sync = v.mode == "persistent"
    meta = _fwd_meta(v, H, dt, b_hh is not None, lengths is not None, reverse)
    steps = [(s, s + 1) for s in range(T)] if v.mode == "stepwise" else [(0, T)]
    for t0, nt in groups:
        grid = (v.n_unit_progs, nt)
        for s0, s1 in steps:
            _gru_fwd_kernel[grid](xproj, w_hh, bias, lens, hx, y, hn, gates, bar, err, T, B, s0, s1, t0, **meta)
            C.count_launch("gru_fwd")
    if sync and v.n_unit_progs > 1:
        C.check_error_flag(err, "GRU forward")
    return y, hn, gates


def gru_bwd(dy: Tensor, dh_n: Tensor, w_hh: Tensor, h0: Tensor, y: Tensor, gates: Tensor,
            lengths: Optional[Tensor], reverse: bool):
    """GRU recurrence backward; see ``reference.gru_bwd``.  Returns (dxproj, dh0, dhn)."""
    T, B, G4 = gates.shape
    H = G4 // 4
    dt, dev = dy.dtype, dy.device
    v = _variant(H, B, dt, dev)
    dx = torch.empty(T, B, 3 * H, dtype=dt, device=dev)
    dhseq = torch.empty(T, B, H, dtype=dt, device=dev)
    dh0 = torch.empty(B, H, dtype=dt, device=dev)
    if B == 0:
        return dx, dh0, dhseq
    if T == 0:
        dh0.copy_(dh_n)
        return dx, dh0, dhseq
    dy, dh_n, w_hh = dy.contiguous(), dh_n.contiguous(), w_hh.contiguous()
    h0, y, gates = h0.contiguous(), y.contiguous(), gates.contiguous()
    split, block_u, n_tiles, groups = _launch_plan(v, B)
    dst = torch.empty(B, H, dtype=C.acc_dtype(dt), device=dev)  # dh between launches
    xb = torch.empty(2 if split else 1, B, 3 * H, dtype=C.acc_dtype(dt), device=dev)  # [dr|dz|dhn] exchange
    bar, err = C.new_sync_buffers(n_tiles, dev)
    lens = lengths.to(device=dev, dtype=torch.int64).contiguous() if lengths is not None else bar
    sync = v.mode == "persistent"
    meta = _bwd_meta(v, H, dt, lengths is not None, reverse)
    if v.mode == "stepwise":  # one launch per step; phase B of step s runs in launch s+1, one more ends
        launches = [(s, s + 1, int(s > 0), 1) for s in range(T)] + [(T, T, 1, 0)]
    else:
        launches = [(0, T, 0, 0)]
    for t0, nt in groups:
        grid = (v.n_unit_progs, nt)
        for s0, s1, pending, defer in launches:
            _gru_bwd_kernel[grid](dy, dh_n, w_hh, h0, y, gates, lens, dst, xb, dx, dhseq, dh0, bar, err,
                                  T, B, s0, s1, t0, pending, defer, **meta)
            C.count_launch("gru_bwd")
    if sync and v.n_unit_progs > 1:
        C.check_error_flag(err, "GRU backward")
    return dx, dh0, dhseq


def gru_cell_fwd(igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], h: Tensor):
    """Fused GRUCell pointwise forward; see ``reference.gru_cell_fwd``.  Returns (h_new, gates)."""
    B, G = igates.shape
    H = G // 3
    dt = igates.dtype
    h_new = torch.empty(B, H, dtype=dt, device=igates.device)
    gates = torch.empty(B, 4 * H, dtype=dt, device=igates.device)
    N = B * H
    if N == 0:
        return h_new, gates
    igates, hgates, h = igates.contiguous(), hgates.contiguous(), h.contiguous()
    _gru_cell_fwd_kernel[(triton.cdiv(N, CELL_BLOCK),)](
        igates, hgates, b_ih.contiguous() if b_ih is not None else igates,
        b_hh.contiguous() if b_hh is not None else igates, h, h_new, gates, N,
        H=H, HAS_BIH=b_ih is not None, HAS_BHH=b_hh is not None, BLOCK=CELL_BLOCK, num_warps=4,
    )
    C.count_launch("gru_cell_fwd")
    return h_new, gates


def gru_cell_bwd(dh_new: Tensor, h: Tensor, gates: Tensor):
    """Fused GRUCell pointwise backward; see ``reference.gru_cell_bwd``.  Returns (d_i, d_h, dh)."""
    B, G4 = gates.shape
    H = G4 // 4
    dt = gates.dtype
    dev = gates.device
    d_i = torch.empty(B, 3 * H, dtype=dt, device=dev)
    d_h = torch.empty(B, 3 * H, dtype=dt, device=dev)
    dh = torch.empty(B, H, dtype=dt, device=dev)
    N = B * H
    if N == 0:
        return d_i, d_h, dh
    _gru_cell_bwd_kernel[(triton.cdiv(N, CELL_BLOCK),)](
        dh_new.contiguous(), h.contiguous(), gates.contiguous(), d_i, d_h, dh, N,
        H=H, BLOCK=CELL_BLOCK, num_warps=4,
    )
    C.count_launch("gru_cell_bwd")
    return d_i, d_h, dh


# ------------------------------------------------------------------------------------ AOT
_TSIG = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

# (H, B) shapes whose variants AOT compiles per dtype: the largest single-program H, a split H,
# the performance shape (768, bf16/fp16 only) and the limit; B=256 covers block_b > 16.
_AOT_SHAPES = {
    torch.bfloat16: [(128, 16), (129, 16), (768, 16), (768, 256), (1024, 16)],
    torch.float16: [(128, 16), (768, 16), (1024, 16)],
    torch.float32: [(64, 16), (129, 16), (512, 16), (512, 256)],
    torch.float64: [(32, 16), (129, 16), (256, 16)],
}


def _aot_spec(kind: str, H: int, B: int, dtype: torch.dtype) -> dict:
    """One compile spec: {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}.

    Runtime flags that do not change register use much are pinned to the heavier choice
    (bias, lengths); persistent (barrier) mode is what a GPU runs for split variants.
    """
    v = C.select_variant(GATES, H, H, B, dtype, None)
    if v.mode == "stepwise":  # the selection ran under the interpreter: compile what a GPU runs
        v = C.Variant(**{**v.__dict__, "mode": "persistent"})
    d = _TSIG[dtype]
    a = "fp64" if dtype == torch.float64 else "fp32"
    if kind == "fwd":
        fn = _gru_fwd_kernel
        meta = _fwd_meta(v, H, dtype, True, True, False)
        ptrs = dict(xproj_ptr=d, w_ptr=d, b_ptr=d, len_ptr="i64", hx_ptr=a, y_ptr=d, hn_ptr=d, gates_ptr=d,
                    bar_ptr="i32", err_ptr="i32")
        ints = ["T", "B", "step_begin", "step_end", "tile0"]
    else:
        fn = _gru_bwd_kernel
        meta = _bwd_meta(v, H, dtype, True, False)
        ptrs = dict(dy_ptr=d, dhn_in_ptr=d, w_ptr=d, h0_ptr=d, y_ptr=d, gates_ptr=d, len_ptr="i64", dst_ptr=a,
                    xb_ptr=a, dx_ptr=d, dhseq_ptr=d, dh0_ptr=d, bar_ptr="i32", err_ptr="i32")
        ints = ["T", "B", "step_begin", "step_end", "tile0", "finish_pending", "defer_last"]
    meta = dict(meta, MAX_SPINS=C.MAX_SPIN, UPCAST_DOT=False,
                DOT_PREC="tf32" if dtype == torch.float32 else "ieee")
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    sig = {name: "*" + t for name, t in ptrs.items()}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in meta})
    assert set(sig) == set(fn.arg_names), (sorted(sig), fn.arg_names)
    sig = {name: sig[name] for name in fn.arg_names}
    return dict(
        name=f"gru_{kind}_{d}_H{H}_{v.mode}_bb{v.block_b}_bu{meta['BU']}_w{num_warps}",
        fn=fn, signature=sig, constexprs=meta, num_warps=num_warps, num_stages=num_stages,
    )


def _aot_cell_spec(kind: str, dtype: torch.dtype) -> dict:
    d = _TSIG[dtype]
    if kind == "cell_fwd":
        fn = _gru_cell_fwd_kernel
        sig = {n: "*" + d for n in ("ig_ptr", "hg_ptr", "bih_ptr", "bhh_ptr", "h_ptr", "hnew_ptr", "gates_ptr")}
        sig["N"] = "i32"
        consts = dict(H=256, HAS_BIH=True, HAS_BHH=True, BLOCK=CELL_BLOCK)
    else:
        fn = _gru_cell_bwd_kernel
        sig = {n: "*" + d for n in ("dhnew_ptr", "h_ptr", "gates_ptr", "di_ptr", "dhg_ptr", "dh_ptr")}
        sig["N"] = "i32"
        consts = dict(H=256, BLOCK=CELL_BLOCK)
    sig.update({n: "constexpr" for n in consts})
    assert list(sig) == fn.arg_names, (list(sig), fn.arg_names)
    return dict(name=f"gru_{kind}_{d}", fn=fn, signature=sig, constexprs=consts, num_warps=4, num_stages=1)


def aot_variants():
    """Compile specs of the GRU kernels for ``tools/triton_aot.py``: a list of dicts
    ``{"name", "fn" (JITFunction), "signature" ({arg: type}), "constexprs" ({arg: value}),
    "num_warps", "num_stages"}`` ready for ``triton.compile(ASTSource(fn, signature, constexprs),
    target=GPUTarget("cuda", arch, 32), options={"num_warps": ..., "num_stages": ...})``."""
    specs = []
    for dtype, shapes in _AOT_SHAPES.items():
        for H, B in shapes:
            for kind in ("fwd", "bwd"):
                specs.append(_aot_spec(kind, H, B, dtype))
        for kind in ("cell_fwd", "cell_bwd"):
            specs.append(_aot_cell_spec(kind, dtype))
    return specs
