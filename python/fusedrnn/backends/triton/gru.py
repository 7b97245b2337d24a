"""GRU recurrence and GRUCell kernels in Triton (the ``triton`` backend's GRU half).

Contract: ``fusedrnn.backends.reference`` (``gru_fwd``, ``gru_bwd``, ``gru_cell_fwd``,
``gru_cell_bwd``): same signatures, shapes, dtypes and padded-step semantics.  Gate order r, z, n;
n = tanh(x_n + r * (W_hn h + b_hn)); saved gates [r, z, n, hn] with hn = W_hn h + b_hn.

Recurrence kernels
------------------
One launch per layer and direction covers the whole sequence.  A program owns ``BU`` hidden units
-- the r, z and n rows of W_hh for those units together -- of a tile of ``BB`` batch rows, and
loads its W_hh slice once, before the time loop; the compiler keeps it in shared memory (the
``tl.dot`` operand) for all T steps, it is never re-read from HBM.  The recurrent GEMM is split-K
over warps (``_common.mma_splitk``): the slice is held as [KS, HP/KS, BU] and the K slices are the
batch dim of ``tl.dot``, so each warp reduces 1/KS of K (a plain [16, 1024] x [1024, 16] dot makes
every warp repeat the whole K and spills).  Variants (``_common.select_variant`` + ``_gru_variant``):

* ``single`` (``SPLIT=False``): one program owns every unit of its batch tile (BU == HP); h stays in
  registers, no barrier.  Small H (W_hh fits the per-program budget).
* ``persistent`` (``SPLIT=True, SYNC=True``): cdiv(H, BU) programs per batch tile (grid <= SM
  count, co-resident).  Every step each program needs the whole h_{t-1} (forward) or the whole
  [dr_pre, dz_pre, dhn] (backward): exchanged through a double-buffered global buffer (L2, ``.cg``
  loads) in the input dtype -- exactly the values the dot rounds to anyway; the own units' state
  stays in fp32/fp64 registers -- and the programs meet at ``_common.grid_barrier`` (atomic
  counter, bounded spin, error flag: a failed barrier raises RuntimeError, never hangs).
* ``stepwise`` (``SPLIT=True, SYNC=False``): the same kernel and grid, launched once per step (the
  kernel boundary is the barrier).  Under the Triton interpreter (programs run one after another)
  this is how the split logic runs with > 1 program; the runtime step range ``[step_begin,
  step_end)`` and the fp32/fp64 state buffers carry the recurrence across launches.

Forward step s (t = s, or T-1-s when reverse), own units U:
    h_full [KS, BB, HP/KS] <- hx[s % 2] (split) | h_own (single)
    [hr|hz|hn]_U = h_full @ W_{r,z,n}[U]^T + b_hh;  r, z, n, h_new as reference.py
    h_own = where(valid, h_new, h_own) -> hx[(s+1) % 2];  y_t, gates_t (zeros where padded);  barrier
Backward step s (t in the opposite order), phase A: own units' dr_pre, dz_pre, dn_pre, dhn = dn_pre*r
    (zeros where padded) -> dxproj_t, dhn_t, exchange xb[s % 2]; base = where(valid, dh_tot*z, dh);
    barrier;  phase B: dh_U = base + [dr|dz|dhn]_full @ W_hh[:, U]  (padded rows contribute zeros, so
    reference.py's masked update falls out).  Stepwise: phase B of step s runs at the start of the
    launch of step s+1 (``finish_pending``), and one last launch with an empty range finishes step T-1.
h_{t-1} for backward comes from y / h0 exactly as ``reference.previous_states`` (reverse: h0 at each
sequence's own first step t = lengths-1).

Per-step cost, GRU T=1024 B=16 H=768 bf16 (the performance target), 48 programs x BU=16, HP=1024,
8 warps, KS=8 (AOT sm_90: fwd 216 regs, no spills; bwd 255 regs, 16 B spills; 128 KiB shared):
    FLOP   2*B*H*3H = 56.6 MFLOP/step useful (75.5 executed with the pow2 padding of K), 1.57 MFLOP
           per program: ~0.2-0.3 us of mma.sync on one SM (M = 16 rows, no wgmma).
    on-chip W_hh slice 3*HP*BU*2 = 96 KiB per program read from shared memory every step: ~0.4 us
           at ~128 B/clk -- the per-program floor; W_hh total 3H*H*2 = 3.5 MB read from HBM once.
    forward, per program: h_full B*HP*2 = 32 KiB from L2 (1.5 MB over the grid ~ 0.3 us of L2
           bandwidth), xproj 1.5 KiB, writes y 0.5 KiB, gates 2 KiB, h 0.5 KiB; HBM per step
           ~0.17 MB (xproj + y + gates) ~ 0.05 us.  Plus one grid barrier (~0.5-1 us).
           Estimate ~1.2-1.5 us/step.
    backward, per program: dy, gates, h_prev ~3.5 KiB in, dxproj + dhn ~2 KiB out, exchange
           3*B*BU*2 = 1.5 KiB out and 3*B*HP*2 = 96 KiB in from L2 (4.6 MB over the grid ~ 0.8 us):
           the L2 broadcast of [dr|dz|dhn] dominates.  Estimate ~2 us/step.
    (Not measured: no GPU in this session.  cuDNN's figure must come from the benchmark suite.)

int64 offsets: every time-step offset t * B * G is an int64 scalar (per-step tile offsets are
int32: B * 4H < 2**31 is checked); T and B are runtime ints
(``do_not_specialize``); H is constexpr, padded to HP = pow2(max(H, 16)) with masks.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "gru_fwd",
    "gru_bwd",
    "gru_cell_fwd",
    "gru_cell_bwd",
    "check_supported",
    "max_hidden_size",
    "unsupported_gru",
    "aot_variants",
]

from . import _common as C
from ._common import tl, triton  # None without triton: the module still imports (backend unavailable)

GATES = 3  # r, z, n rows of W_hh per hidden unit
MAX_SPIN_INTERPRET = 64  # the interpreter polls slowly: fail fast there (tests of the error path)
CELL_BLOCK = 1024


def max_hidden_size(dtype: torch.dtype, device=None) -> int:
    """Largest GRU hidden size the recurrence kernels run for ``dtype`` on ``device``."""
    return C.max_hidden_size(GATES, dtype, device)


def unsupported_gru(dtype: torch.dtype, hidden_size: int, device_type: str, device=None) -> Optional[str]:
    return C.unsupported_reason(GATES, hidden_size, 0, dtype, device_type, device)


def check_supported(H: int, dtype: torch.dtype, device) -> None:
    """Raise ValueError (naming the limit) when the kernels do not run this size / dtype / device."""
    dev = torch.device(device)
    reason = C.unsupported_reason(GATES, H, 0, dtype, dev.type, dev)
    if reason is not None:
        raise ValueError(f"fusedrnn triton GRU: {reason}")


MAX_WARPS = 8  # 16 warps cap ptxas at 128 registers/thread: the GRU kernels spill there, not at 8
SMEM_MARGIN = 4 * 1024


def _gru_variant(H: int, B: int, dtype: torch.dtype, device=None, info=None, interpret=None,
                 backward: bool = False) -> "C.Variant":
    """``_common.select_variant`` (THE rule) with two GRU-kernel adjustments, both from the AOT
    report (tools/triton_aot.py):

    * at most 8 warps (the shared rule picks 16 for the largest W_hh slices, where 512 threads cap
      ptxas at 128 registers: H=768 bf16 spilled 76-116 B/thread per step, 0-16 B at 8 warps,
      KS = 8); single-program variants run 8 warps (4 for tiles under 512 elements): their
      pointwise tiles [block_b, pow2(H)] dominate registers (4 warps: [16, 64] spilled ~380 B).
    * split variants shrink ``block_b`` until the W_hh slice + the exchanged [block_b, pow2(H)]
      operand fit the device's shared memory (block_b = 64 at H = 768 bf16 needs 226 KiB); the
      backward keeps block_b = 16 when split (block_b = 32 spilled ~2 KiB/thread: its phase B
      holds three [32, pow2(H)] operands), at the price of more launch groups for B > 32."""
    v = C.select_variant(GATES, H, H, B, dtype, device, info=info, interpret=interpret)
    info = info or C.device_info(device)
    if v.mode == "single":
        # 8 warps from pow2(H) = 32 on (fewer spills of the [block_b, pow2(H)] tiles than 4 warps)
        w = MAX_WARPS if v.block_b * v.block_h >= 512 else 4
    else:
        w = min(v.num_warps, MAX_WARPS)
    if w != v.num_warps:
        v = dataclasses.replace(v, num_warps=w, ksplit_k=C.ksplit(v.block_k, w), ksplit_h=C.ksplit(v.block_h, w))
    if v.mode != "single":
        e = C.elt_size(dtype)
        w_bytes = C.weight_bytes_per_program(GATES, v.block_u, v.block_h, e)
        bb = C.MIN_TILE if backward else v.block_b
        while bb > C.MIN_TILE and w_bytes + bb * v.block_h * e > info.smem_bytes - SMEM_MARGIN:
            bb //= 2
        if bb != v.block_b:
            n_tiles = C.cdiv(B, bb)
            if v.mode == "persistent":
                n_tiles = max(1, min(n_tiles, info.sms // v.n_unit_progs))
            v = dataclasses.replace(v, block_b=bb, n_batch_tiles=n_tiles)
    return v


def _variant(H: int, B: int, dtype: torch.dtype, device, backward: bool = False) -> "C.Variant":
    check_supported(H, dtype, device)
    if B * 4 * H >= 2**31:
        raise ValueError(f"fusedrnn triton GRU: batch * 4 * hidden_size = {B * 4 * H} must be < 2**31 "
                         "(per-step offsets are int32; the time offset is int64)")
    return _gru_variant(H, B, dtype, device, backward=backward)


def _max_spins() -> int:
    return MAX_SPIN_INTERPRET if C.interpret_mode() else C.MAX_SPIN


if triton is not None:
    _sigmoid = C.sigmoid
    _tanh = C.tanh
    grid_barrier = C.grid_barrier

    # ---------------------------------------------------------------------------- jit helpers
    @triton.jit
    def _kdot(a, w, DOT_PREC: tl.constexpr, ACC: tl.constexpr):
        """Split-K recurrent GEMM: a [KS, BB, KC] @ w [KS, KC, BU] summed over the KS slices -> [BB, BU]
        (``_common.mma_splitk``: the K slices are the batch dim of ``tl.dot``, one per warp, so a warp
        keeps K/KS of W_hh instead of every warp repeating the whole K of a 16x16 tile, which spills).
        Operands arrive already in their dot dtype (upcast under the interpreter, see ``dot_upcast``)."""
        return C.mma_splitk(a, w, ACC, DOT_PREC, False)


    @triton.jit
    def _to_slices(x, BB: tl.constexpr, KS: tl.constexpr, KC: tl.constexpr):
        """[BB, KS*KC] (registers) -> [KS, BB, KC], the A operand of ``_kdot``."""
        return tl.permute(tl.reshape(x, [BB, KS, KC]), (1, 0, 2))


    # ---------------------------------------------------------------------------- forward kernel
    @triton.jit(do_not_specialize=["T", "B", "step_begin", "step_end", "tile0"])
    def _gru_fwd_kernel(
        xproj_ptr,  # (T, B, 3H) dtype
        w_ptr,  # (3H, H)
        b_ptr,  # (3H,) or dummy
        len_ptr,  # (B,) int64 or dummy
        hs_ptr,  # (B, H) acc: state between launches (h0 before the first)
        hx_ptr,  # (2, B, H) dtype: h exchange buffer, slot = step parity (SPLIT); slot 0 = h0
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
        HP: tl.constexpr,  # pow2(H): K of the recurrent GEMM
        BU: tl.constexpr,  # units per program
        BB: tl.constexpr,  # batch rows per program
        KS: tl.constexpr,  # K slices (one per warp)
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
        KC: tl.constexpr = HP // KS
        pid_u = tl.program_id(0)
        tile = tile0 + tl.program_id(1)
        rows = tile * BB + tl.arange(0, BB)  # [BB]
        row_ok = rows < B
        units = pid_u * BU + tl.arange(0, BU)  # [BU] own units
        unit_ok = units < H
        H64 = H
        B64 = B.to(tl.int64)

        # W_hh^T slices [KS, KC, BU]: wt_g[c, k, u] = W[g*H + u, c*KC + k]; loaded once, on chip
        kidx = C.kidx_b(HP, KS)  # [KS, KC, 1]
        w_off = units[None, None, :].to(tl.int64) * H + kidx
        w_msk = (kidx < H) & unit_ok[None, None, :]
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
        # per-step tile offsets in int32 (B * 4H < 2**31, checked by the launcher); the time-step
        # base t * B * G is an int64 scalar added to the pointer first
        own_off = rows[:, None] * H + units[None, :]  # into (B, H)
        own3_off = rows[:, None] * (3 * H) + units[None, :]  # into (B, 3H)
        own4_off = rows[:, None] * (4 * H) + units[None, :]  # into (B, 4H)
        # full h of the tile as split-K operand [KS, BB, KC]: hx[b, c*KC + k]
        hk = C.kidx_a(HP, KS)  # [KS, 1, KC]
        full_off = rows[None, :, None] * H + hk
        full_msk = row_ok[None, :, None] & (hk < H)
        slot = B64 * H

        h_own = tl.load(hs_ptr + own_off, mask=io_msk, other=0.0, cache_modifier=".cg").to(ACC)  # [BB, BU]
        zero = tl.zeros([BB, BU], dtype=ACC)
        for s in range(step_begin, step_end):
            if REVERSE:
                t = T - 1 - s
            else:
                t = s
            t64 = t.to(tl.int64)
            if SPLIT:
                hd = tl.load(hx_ptr + (s % 2) * slot + full_off, mask=full_msk, other=0.0, cache_modifier=".cg")
            else:
                hd = _to_slices(h_own.to(DT), BB, KS, KC)
            hd = hd.to(OP)
            x_t = xproj_ptr + t64 * B64 * (3 * H)
            x_r = tl.load(x_t + own3_off, mask=io_msk, other=0.0).to(ACC)
            x_z = tl.load(x_t + own3_off + H, mask=io_msk, other=0.0).to(ACC)
            x_n = tl.load(x_t + own3_off + 2 * H, mask=io_msk, other=0.0).to(ACC)
            hn = _kdot(hd, wt_n, DOT_PREC, ACC) + b_n[None, :]
            r = _sigmoid(x_r + _kdot(hd, wt_r, DOT_PREC, ACC) + b_r[None, :])
            z = _sigmoid(x_z + _kdot(hd, wt_z, DOT_PREC, ACC) + b_z[None, :])
            n = _tanh(x_n + r * hn)
            h_new = (1.0 - z) * n + z * h_own
            valid = (t < lens)[:, None]  # [BB, 1]
            h_own = tl.where(valid, h_new, h_own)
            if SPLIT:  # publish first: the other programs wait for it
                tl.store(hx_ptr + ((s + 1) % 2) * slot + own_off, h_own.to(DT), mask=io_msk)
            tl.store((y_ptr + t64 * B64 * H) + own_off, tl.where(valid, h_new, zero).to(DT), mask=io_msk)
            g_t = gates_ptr + t64 * B64 * (4 * H)
            tl.store(g_t + own4_off, tl.where(valid, r, zero).to(DT), mask=io_msk)
            tl.store(g_t + own4_off + H, tl.where(valid, z, zero).to(DT), mask=io_msk)
            tl.store(g_t + own4_off + 2 * H, tl.where(valid, n, zero).to(DT), mask=io_msk)
            tl.store(g_t + own4_off + 3 * H, tl.where(valid, hn, zero).to(DT), mask=io_msk)
            if SYNC:
                grid_barrier(bar_ptr + tile, N_UBLK * (s - step_begin + 1), err_ptr, N_UBLK, MAX_SPINS)

        tl.store(hs_ptr + own_off, h_own, mask=io_msk)
        tl.store(hn_ptr + own_off, h_own.to(DT), mask=io_msk)


    # --------------------------------------------------------------------------- backward kernel
    @triton.jit
    def _exchange_dot(xb_ptr, slot_off, full_off, full_msk, H, w_r, w_z, w_n, OP: tl.constexpr,
                      DOT_PREC: tl.constexpr, ACC: tl.constexpr):
        """[dr|dz|dhn] of the whole tile (exchange buffer slot, (B, 3H)) @ W_hh[:, U] -> [BB, BU].
        One gate at a time: each operand tile is dead before the next is loaded (shared memory)."""
        acc = _kdot(tl.load(xb_ptr + slot_off + full_off, mask=full_msk, other=0.0, cache_modifier=".cg").to(OP),
                    w_r, DOT_PREC, ACC)
        acc += _kdot(tl.load(xb_ptr + slot_off + full_off + H, mask=full_msk, other=0.0, cache_modifier=".cg").to(OP),
                     w_z, DOT_PREC, ACC)
        acc += _kdot(tl.load(xb_ptr + slot_off + full_off + 2 * H, mask=full_msk, other=0.0,
                             cache_modifier=".cg").to(OP), w_n, DOT_PREC, ACC)
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
        xb_ptr,  # (2, B, 3H) dtype: exchange buffer of [dr_pre, dz_pre, dhn] (SPLIT)
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
        KS: tl.constexpr,
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
        KC: tl.constexpr = HP // KS
        pid_u = tl.program_id(0)
        tile = tile0 + tl.program_id(1)
        rows = tile * BB + tl.arange(0, BB)
        row_ok = rows < B
        units = pid_u * BU + tl.arange(0, BU)
        unit_ok = units < H
        H64 = H
        B64 = B.to(tl.int64)

        # W_hh column slices [KS, KC, BU]: w_g[c, k, u] = W[g*H + c*KC + k, u]
        kidx = C.kidx_b(HP, KS)  # [KS, KC, 1]
        w_off = kidx.to(tl.int64) * H + units[None, None, :]
        w_msk = (kidx < H) & unit_ok[None, None, :]
        w_r = tl.load(w_ptr + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
        w_z = tl.load(w_ptr + H64 * H + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
        w_n = tl.load(w_ptr + 2 * H64 * H + w_off, mask=w_msk, other=0.0).to(DT).to(OP)
        if HAS_LENGTHS:
            lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
        else:
            lens = tl.where(row_ok, T, 0).to(tl.int64)

        io_msk = row_ok[:, None] & unit_ok[None, :]
        own_off = rows[:, None] * H + units[None, :]  # int32 tile offsets, as in the forward
        own3_off = rows[:, None] * (3 * H) + units[None, :]
        own4_off = rows[:, None] * (4 * H) + units[None, :]
        hk = C.kidx_a(HP, KS)  # [KS, 1, KC]
        full3_off = rows[None, :, None] * (3 * H) + hk
        full_msk = row_ok[None, :, None] & (hk < H)
        slot = B64 * (3 * H)

        if step_begin == 0:
            dh_own = tl.load(dhn_in_ptr + own_off, mask=io_msk, other=0.0).to(ACC)
        else:
            dh_own = tl.load(dst_ptr + own_off, mask=io_msk, other=0.0, cache_modifier=".cg")
        if SPLIT:
            if finish_pending != 0:
                dh_own += _exchange_dot(xb_ptr, ((step_begin - 1) % 2) * slot, full3_off, full_msk, H,
                                        w_r, w_z, w_n, OP, DOT_PREC, ACC)

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
            h_prev_y = tl.load((y_ptr + tp64 * B64 * H) + own_off, mask=io_msk & (~use_init), other=0.0)
            h_prev_0 = tl.load(h0_ptr + own_off, mask=io_msk & use_init, other=0.0)
            h_prev = tl.where(use_init, h_prev_0.to(ACC), h_prev_y.to(ACC))

            dh_tot = dh_own + tl.load((dy_ptr + t64 * B64 * H) + own_off, mask=io_msk, other=0.0).to(ACC)
            g_t = gates_ptr + t64 * B64 * (4 * H)
            r = tl.load(g_t + own4_off, mask=io_msk, other=0.0).to(ACC)
            z = tl.load(g_t + own4_off + H, mask=io_msk, other=0.0).to(ACC)
            n = tl.load(g_t + own4_off + 2 * H, mask=io_msk, other=0.0).to(ACC)
            hn = tl.load(g_t + own4_off + 3 * H, mask=io_msk, other=0.0).to(ACC)
            dn_pre = tl.where(valid, dh_tot * (1.0 - z) * (1.0 - n * n), zero)
            dz_pre = tl.where(valid, dh_tot * (h_prev - n) * z * (1.0 - z), zero)
            dr_pre = dn_pre * hn * r * (1.0 - r)
            dhn = dn_pre * r
            base = tl.where(valid, dh_tot * z, dh_own)
            if SPLIT:  # publish first: the other programs wait for it
                sl = (s % 2) * slot
                tl.store(xb_ptr + sl + own3_off, dr_pre.to(DT), mask=io_msk)
                tl.store(xb_ptr + sl + own3_off + H, dz_pre.to(DT), mask=io_msk)
                tl.store(xb_ptr + sl + own3_off + 2 * H, dhn.to(DT), mask=io_msk)
            dx_t = dx_ptr + t64 * B64 * (3 * H)
            tl.store(dx_t + own3_off, dr_pre.to(DT), mask=io_msk)
            tl.store(dx_t + own3_off + H, dz_pre.to(DT), mask=io_msk)
            tl.store(dx_t + own3_off + 2 * H, dn_pre.to(DT), mask=io_msk)
            tl.store((dhseq_ptr + t64 * B64 * H) + own_off, dhn.to(DT), mask=io_msk)
            if SPLIT:
                dh_own = base
                if SYNC:
                    grid_barrier(bar_ptr + tile, N_UBLK * (s - step_begin + 1), err_ptr, N_UBLK, MAX_SPINS)
                if (defer_last == 0) | (s + 1 < step_end):
                    dh_own += _exchange_dot(xb_ptr, sl, full3_off, full_msk, H, w_r, w_z, w_n, OP, DOT_PREC, ACC)
            else:
                dh_own = base
                dh_own += _kdot(_to_slices(dr_pre.to(DT), BB, KS, KC).to(OP), w_r, DOT_PREC, ACC)
                dh_own += _kdot(_to_slices(dz_pre.to(DT), BB, KS, KC).to(OP), w_z, DOT_PREC, ACC)
                dh_own += _kdot(_to_slices(dhn.to(DT), BB, KS, KC).to(OP), w_n, DOT_PREC, ACC)

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
    """(split, units per program, batch tiles, [(first tile, tiles)] per launch group): batch tiles
    run in groups of ``v.n_batch_tiles`` so a persistent grid stays co-resident."""
    n_tiles = C.cdiv(B, v.block_b)
    groups = [(t0, min(v.n_batch_tiles, n_tiles - t0)) for t0 in range(0, n_tiles, v.n_batch_tiles)]
    split = v.mode != "single"
    block_u = v.block_u if split else v.block_h
    return split, block_u, C.cdiv(B, v.block_b), groups


def _common_meta(v: "C.Variant", H: int, dt: torch.dtype, has_lengths: bool, reverse: bool) -> dict:
    split = v.mode != "single"
    return dict(
        H=H, HP=v.block_h, BU=v.block_u if split else v.block_h, BB=v.block_b,
        KS=v.ksplit_h, N_UBLK=v.n_unit_progs,
        HAS_LENGTHS=bool(has_lengths), REVERSE=bool(reverse), SPLIT=split, SYNC=v.mode == "persistent",
        DOT_PREC=C.dot_precision(dt), MAX_SPINS=_max_spins(), UPCAST_DOT=C.dot_upcast(dt),
        num_warps=v.num_warps, num_stages=v.num_stages, **C.launch_options(v),
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
    hs = h0.to(C.acc_dtype(dt)).contiguous().clone()  # h state between launches
    hx = torch.empty(2, B, H, dtype=dt, device=dev)  # h exchange (step parity)
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
            _gru_fwd_kernel[grid](xproj, w_hh, bias, lens, hs, hx, y, hn, gates, bar, err, T, B, s0, s1, t0, **meta)
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
    v = _variant(H, B, dt, dev, backward=True)
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
    xb = torch.empty(2 if split else 1, B, 3 * H, dtype=dt, device=dev)  # [dr|dz|dhn] exchange
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
def _aot_recurrence(kind: str, v: "C.Variant", H: int, dt: torch.dtype, precision: str, tag: str) -> dict:
    ty, aty = C.TL_NAMES[dt], C.TL_NAMES[C.acc_dtype(dt)]
    if kind == "fwd":
        fn = _gru_fwd_kernel
        meta = _fwd_meta(v, H, dt, True, True, False)
        ptrs = dict(xproj_ptr=ty, w_ptr=ty, b_ptr=ty, len_ptr="i64", hs_ptr=aty, hx_ptr=ty, y_ptr=ty, hn_ptr=ty,
                    gates_ptr=ty, bar_ptr="i32", err_ptr="i32")
    else:
        fn = _gru_bwd_kernel
        meta = _bwd_meta(v, H, dt, True, False)
        ptrs = dict(dy_ptr=ty, dhn_in_ptr=ty, w_ptr=ty, h0_ptr=ty, y_ptr=ty, gates_ptr=ty, len_ptr="i64",
                    dst_ptr=aty, xb_ptr=ty, dx_ptr=ty, dhseq_ptr=ty, dh0_ptr=ty, bar_ptr="i32", err_ptr="i32")
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    meta.pop("launch_cooperative_grid", None)  # a launch option, not a constexpr
    meta.update(DOT_PREC=precision, MAX_SPINS=C.MAX_SPIN, UPCAST_DOT=False)
    return C.aot_spec(f"gru_{kind} {tag}", fn, ptrs, meta, num_warps, num_stages)


def aot_variants(capability: int = 90) -> list:
    """Every GRU kernel variant the selection rule picks, at representative sizes up to the limit,
    as ``_common.aot_spec`` dicts for ``tools/triton_aot.py`` (compiled for ``capability``).

    Runtime flags that barely change the code are pinned to the heavier choice (bias, lengths);
    persistent (barrier) mode is what a GPU runs for split variants; stepwise (interpreter / tests)
    is compiled once per dtype at the smallest split size."""
    info = C.AOT_TARGETS[capability]
    sel = lambda H, B, dt: _gru_variant(H, B, dt, info=info, interpret=False)  # noqa: E731
    specs = []
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        ty = C.TL_NAMES[dt]
        limit = C.max_hidden_size(GATES, dt)
        single_max = max(h for h in range(1, limit + 1) if sel(h, 16, dt).mode == "single")
        mid = min(768, limit)
        for H in sorted({37, single_max, single_max + 1, mid, limit}):
            for B in (16, 256):
                for kind in ("fwd", "bwd"):
                    v = _gru_variant(H, B, dt, info=info, interpret=False, backward=kind == "bwd")
                    if B != 16 and (v.block_b == 16 or H != mid):
                        continue  # same kernel as B = 16; larger batch tiles only at one size
                    modes = [v.mode] + (["stepwise"] if H == single_max + 1 and B == 16 else [])
                    for mode in modes:
                        vv = dataclasses.replace(v, mode=mode)
                        for precision in ("ieee", "tf32") if dt == torch.float32 else ("ieee",):
                            tag = f"{ty} H={H} B={B} {mode} u={vv.block_u} b={vv.block_b} ks={vv.ksplit_h}" + (
                                " tf32" if precision == "tf32" else "")
                            specs.append(_aot_recurrence(kind, vv, H, dt, precision, tag))
        cell_ptrs_f = {n: ty for n in ("ig_ptr", "hg_ptr", "bih_ptr", "bhh_ptr", "h_ptr", "hnew_ptr", "gates_ptr")}
        specs.append(C.aot_spec(f"gru_cell_fwd {ty}", _gru_cell_fwd_kernel, cell_ptrs_f,
                                dict(H=768, HAS_BIH=True, HAS_BHH=True, BLOCK=CELL_BLOCK), 4))
        cell_ptrs_b = {n: ty for n in ("dhnew_ptr", "h_ptr", "gates_ptr", "di_ptr", "dhg_ptr", "dh_ptr")}
        specs.append(C.aot_spec(f"gru_cell_bwd {ty}", _gru_cell_bwd_kernel, cell_ptrs_b,
                                dict(H=768, BLOCK=CELL_BLOCK), 4))
    return specs
