"""GRU recurrence and GRUCell kernels in Triton (the ``triton`` backend's GRU half).

Contract: ``fusedrnn.backends.reference`` (``gru_fwd``, ``gru_bwd``, ``gru_cell_fwd``,
``gru_cell_bwd``): same signatures, shapes, dtypes and padded-step semantics.  Gate order r, z, n;
n = tanh(x_n + r * (W_hn h + b_hn)); saved gates [r, z, n, hn] with hn = W_hn h + b_hn.

The plumbing is the LSTM's (``_common``: plans, split-K GEMM over K pieces, barrier, launch loop);
only the cell math differs.  Forward, program = ``BB`` batch rows x ``BU`` units: its W_hh rows
{g * H + u} are the B operand [H, 4 * BU] (column u * 4 + g; slot 3 is zero: the dot needs a
power-of-two N) on chip for the whole sequence.  Per step:
    [hr|hz|hn] = split4(h_{t-1} @ W^T) + b_hh;  r, z, n, h_new as reference.py (h in fp32/fp64
    registers, the exchange in the input dtype, exactly what the dot rounds to anyway)
    h_t (own units) -> exchange slot (t+1) % 2;  arrive;  y_t, gates_t;  prefetch xproj;  wait
(gates_t only with ``SAVE``: the inference variant, ``save=False``, has no gate stores.)
Backward, per step: phase A (own units) dr_pre, dz_pre, dn_pre, dhn = dn_pre * r (zeros where
padded) -> dxproj_t, dhn_t, exchange [dr|dz|dhn] (slot r % 2); base = where(valid, dh_tot * z,
dh); arrive / wait;  phase B: dh_U = base + [dr|dz|dhn]_all @ W_hh[:, U] (K = 3H).  One barrier
per step; dh stays in registers.  h_{t-1} for backward comes from y / h0 exactly as
``reference.previous_states`` (reverse: h0 at each sequence's own first step t = lengths-1).
"""

from __future__ import annotations

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
CELL = C.GRU_CELL
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


if triton is not None:
    _sigmoid = C.sigmoid
    _tanh = C.tanh

    @triton.jit
    def _xgates(xproj_ptr, t, B64, own3, msk, H: tl.constexpr, ACC: tl.constexpr):
        """xproj_t of the own [BB, BU] tiles per gate r, z, n (loaded ahead of their use)."""
        x = xproj_ptr + t.to(tl.int64) * B64 * (3 * H) + own3
        x_r = tl.load(x, mask=msk, other=0.0).to(ACC)
        x_z = tl.load(x + H, mask=msk, other=0.0).to(ACC)
        x_n = tl.load(x + 2 * H, mask=msk, other=0.0).to(ACC)
        return x_r, x_z, x_n

    # ---------------------------------------------------------------------------- forward kernel
    @triton.jit(do_not_specialize=["T", "B", "tile0", "s_begin", "s_end", "N_U"])
    def _gru_fwd_kernel(
        xproj_ptr,  # (T, B, 3H) dtype
        w_ptr,  # (3H, H)
        b_ptr,  # (3H,) or dummy
        len_ptr,  # (B,) int64 or dummy
        hs_ptr,  # (B, H) acc: h state between launches (h0 before the first, h_n after the last)
        hx_ptr,  # (2, B, H) dtype: h exchange, slot s % 2 holds h entering processing step s
        y_ptr,  # (T, B, H) dtype
        gates_ptr,  # (T, B, 4H) dtype
        sync_ptr, err_ptr,
        T, B, tile0, s_begin, s_end, N_U,
        H: tl.constexpr, BB: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr,
        A_KS: tl.constexpr, A_KC1: tl.constexpr, A_KC2: tl.constexpr, A_KC3: tl.constexpr, A_KC4: tl.constexpr,
        B_KS: tl.constexpr, B_KC1: tl.constexpr, B_KC2: tl.constexpr, B_KC3: tl.constexpr, B_KC4: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, H_IN_REGS: tl.constexpr,
        PHASE_A: tl.constexpr, PHASE_B: tl.constexpr, SYNC: tl.constexpr,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, MAX_SPINS: tl.constexpr,
        SAVE: tl.constexpr,
    ):
        # SAVE False (inference): gates_ptr is never touched; the compiled variant has no gate stores
        DT: tl.constexpr = xproj_ptr.dtype.element_ty
        OP: tl.constexpr = tl.float32 if UPCAST else DT  # dtype of the dot operands
        pid_u = tl.program_id(0)
        tile = tile0 + tl.program_id(1)
        rows = tile * BB + tl.arange(0, BB)  # [BB]
        row_ok = rows < B
        units = pid_u * BU + tl.arange(0, BU)  # [BU] own units
        unit_ok = units < H
        m_bu = row_ok[:, None] & unit_ok[None, :]
        B64 = B.to(tl.int64)
        sync = sync_ptr + tile
        if HAS_LENGTHS:
            lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
        else:
            lens = tl.where(row_ok, T, 0)
        # per-step tile offsets in int32 (B * 4H < 2**31, checked by the launcher); the time-step
        # base t * B * G is an int64 scalar added to the pointer first
        own = rows[:, None] * H + units[None, :]  # into (B, H)
        own3 = rows[:, None] * (3 * H) + units[None, :]  # into (B, 3H)
        own4 = rows[:, None] * (4 * H) + units[None, :]  # into (B, 4H)

        # W_hh^T slice [H, 4 * BU] in split-K pieces: column u * 4 + g = row g * H + unit u (g < 3)
        n = tl.arange(0, 4 * BU)
        w_u = pid_u * BU + n // 4
        w_col = ((n % 4) * H + w_u).to(tl.int64) * H
        w_ok = (w_u < H) & (n % 4 < 3)
        wa1, wa2, wa3, wa4 = C.load_w(w_ptr, w_col, w_ok, 1, H, A_KS, A_KC1,
            A_KC2, A_KC3, A_KC4)
        if HAS_BIAS:
            b_r = tl.load(b_ptr + units, mask=unit_ok, other=0.0).to(ACC)
            b_z = tl.load(b_ptr + H + units, mask=unit_ok, other=0.0).to(ACC)
            b_n = tl.load(b_ptr + 2 * H + units, mask=unit_ok, other=0.0).to(ACC)
        else:
            b_r = tl.zeros([BU], dtype=ACC)
            b_z = b_r
            b_n = b_r

        h_own = tl.load(hs_ptr + own, mask=m_bu, other=0.0)  # [BB, BU] acc
        if REVERSE:
            t_first = T - 1 - s_begin
        else:
            t_first = s_begin
        x_r, x_z, x_n = _xgates(xproj_ptr, t_first, B64, own3, m_bu & (s_begin < s_end), H, ACC)
        n_bar = 0
        s = s_begin
        while s < s_end:  # a while loop: the interpreter of triton 3.6 cannot take range() of runtime ints
            if REVERSE:
                t = T - 1 - s
            else:
                t = s
            t64 = t.to(tl.int64)
            if H_IN_REGS:
                pre = C.gemm_regs(h_own.to(DT).to(OP), wa1, BB, A_KS, A_KC1, ACC, DOT_PRECISION, UPCAST)
            else:
                pre = C.gemm(hx_ptr + (s % 2).to(tl.int64) * B64 * H, rows * H, row_ok, hx_ptr, wa1, wa2, wa3, wa4,
                             H, A_KS, A_KC1, A_KC2, A_KC3, A_KC4, False, OP, ACC, DOT_PRECISION, UPCAST)
            hr, hz, hn, _unused = C.split4(pre, BB, BU)
            hn = hn + b_n[None, :]
            r = _sigmoid(x_r + hr + b_r[None, :])
            z = _sigmoid(x_z + hz + b_z[None, :])
            nn = _tanh(x_n + r * hn)
            h_new = (1.0 - z) * nn + z * h_own
            valid = (t < lens)[:, None]  # [BB, 1]
            h_own = tl.where(valid, h_new, h_own)
            if not H_IN_REGS:  # the exchange store first: the other programs wait for it
                tl.store(hx_ptr + ((s + 1) % 2).to(tl.int64) * B64 * H + own, h_own.to(DT), mask=m_bu)
                if SYNC:
                    n_bar += 1
                    cur = C.barrier_arrive(sync, N_U)
            zero = tl.zeros_like(h_new)
            tl.store((y_ptr + t64 * B64 * H) + own, tl.where(valid, h_new, zero).to(DT), mask=m_bu)
            if SAVE:
                g_t = gates_ptr + t64 * B64 * (4 * H) + own4
                tl.store(g_t, tl.where(valid, r, zero).to(DT), mask=m_bu)
                tl.store(g_t + H, tl.where(valid, z, zero).to(DT), mask=m_bu)
                tl.store(g_t + 2 * H, tl.where(valid, nn, zero).to(DT), mask=m_bu)
                tl.store(g_t + 3 * H, tl.where(valid, hn, zero).to(DT), mask=m_bu)
            if REVERSE:
                t_next = t - 1
            else:
                t_next = t + 1
            x_r, x_z, x_n = _xgates(xproj_ptr, t_next, B64, own3, m_bu & (s + 1 < s_end), H, ACC)
            if not H_IN_REGS:
                if SYNC:
                    C.barrier_wait(sync, cur, n_bar * N_U, err_ptr, N_U, MAX_SPINS)
            s += 1

        tl.store(hs_ptr + own, h_own, mask=m_bu)

    # --------------------------------------------------------------------------- backward kernel
    @triton.jit
    def _bwd_inputs(dy_ptr, h0_ptr, y_ptr, gates_ptr, lens, r, r_end, T, B64, own, own4, m_bu,
                    H: tl.constexpr, BB: tl.constexpr, REVERSE: tl.constexpr, ACC: tl.constexpr):
        """What phase A of processing step r reads for the own units (loaded a step ahead): dy_t,
        the saved r, z, n, hn and h_{t-1} as reference.previous_states (y of the neighbouring
        step, or h0 where the sequence starts: t = 0 forward; t = lengths-1 reverse)."""
        if REVERSE:
            t = r
            tp = t + 1
            use_init = (tp >= lens)[:, None] | (tp >= T)
        else:
            t = T - 1 - r
            tp = t - 1
            use_init = (tl.zeros([BB, 1], dtype=tl.int32) + tp) < 0
        msk = m_bu & (r < r_end)
        t64 = t.to(tl.int64)
        dy = tl.load((dy_ptr + t64 * B64 * H) + own, mask=msk, other=0.0).to(ACC)
        g_t = gates_ptr + t64 * B64 * (4 * H) + own4
        gr = tl.load(g_t, mask=msk, other=0.0).to(ACC)
        gz = tl.load(g_t + H, mask=msk, other=0.0).to(ACC)
        gn = tl.load(g_t + 2 * H, mask=msk, other=0.0).to(ACC)
        ghn = tl.load(g_t + 3 * H, mask=msk, other=0.0).to(ACC)
        tp64 = tl.minimum(tl.maximum(tp, 0), T - 1).to(tl.int64)
        h_prev_y = tl.load((y_ptr + tp64 * B64 * H) + own, mask=msk & (~use_init), other=0.0)
        h_prev_0 = tl.load(h0_ptr + own, mask=msk & use_init, other=0.0)
        h_prev = tl.where(use_init, h_prev_0.to(ACC), h_prev_y.to(ACC))
        return dy, gr, gz, gn, ghn, h_prev

    @triton.jit(do_not_specialize=["T", "B", "tile0", "r_begin", "r_end", "N_U"])
    def _gru_bwd_kernel(
        dy_ptr,  # (T, B, H) dtype
        w_ptr,  # (3H, H)
        h0_ptr,  # (B, H)
        y_ptr,  # (T, B, H)
        gates_ptr,  # (T, B, 4H) [r, z, n, hn]
        len_ptr,  # (B,) int64 or dummy
        dst_ptr,  # (B, H) acc: dh state between launches (dh_n at the start)
        xb_ptr,  # (2, B, 3H) dtype: exchange of [dr_pre, dz_pre, dhn], slot r % 2
        dx_ptr,  # (T, B, 3H) dtype out
        dhseq_ptr,  # (T, B, H) dtype out
        sync_ptr, err_ptr,
        T, B, tile0, r_begin, r_end, N_U,
        H: tl.constexpr, BB: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr,
        A_KS: tl.constexpr, A_KC1: tl.constexpr, A_KC2: tl.constexpr, A_KC3: tl.constexpr, A_KC4: tl.constexpr,
        B_KS: tl.constexpr, B_KC1: tl.constexpr, B_KC2: tl.constexpr, B_KC3: tl.constexpr, B_KC4: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, H_IN_REGS: tl.constexpr,
        PHASE_A: tl.constexpr, PHASE_B: tl.constexpr, SYNC: tl.constexpr,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, MAX_SPINS: tl.constexpr,
    ):
        DT: tl.constexpr = dy_ptr.dtype.element_ty
        OP: tl.constexpr = tl.float32 if UPCAST else DT
        G3: tl.constexpr = 3 * H
        pid_u = tl.program_id(0)
        tile = tile0 + tl.program_id(1)
        rows = tile * BB + tl.arange(0, BB)
        row_ok = rows < B
        units = pid_u * BU + tl.arange(0, BU)
        unit_ok = units < H
        m_bu = row_ok[:, None] & unit_ok[None, :]
        B64 = B.to(tl.int64)
        sync = sync_ptr + tile
        if HAS_LENGTHS:
            lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
        else:
            lens = tl.where(row_ok, T, 0)
        own = rows[:, None] * H + units[None, :]  # int32 tile offsets, as in the forward
        own3 = rows[:, None] * G3 + units[None, :]
        own4 = rows[:, None] * (4 * H) + units[None, :]

        # launch with phase A: dh entering r_begin; stepwise phase-B launch: phase A's base
        dh_own = tl.load(dst_ptr + own, mask=m_bu, other=0.0)  # [BB, BU] acc
        if PHASE_A:
            dy_c, gr, gz, gn, ghn, h_prev = _bwd_inputs(dy_ptr, h0_ptr, y_ptr, gates_ptr, lens, r_begin, r_end, T,
                                                        B64, own, own4, m_bu, H, BB, REVERSE, ACC)
        if PHASE_B:
            # W_hh slice [3H, BU]: dh[:, u] = sum_k [dr|dz|dhn][:, k] * w_hh[k, u]
            wb_col = units.to(tl.int64)
            wb1, wb2, wb3, wb4 = C.load_w(w_ptr, wb_col, unit_ok, H, G3, B_KS, B_KC1,
                B_KC2, B_KC3, B_KC4)

        n_bar = 0
        r = r_begin
        while r < r_end:
            if REVERSE:
                t = r
            else:
                t = T - 1 - r
            t64 = t.to(tl.int64)
            valid = (t < lens)[:, None]
            slot = (r % 2).to(tl.int64) * B64 * G3
            if PHASE_A:
                dh_tot = dh_own + dy_c
                zero = tl.zeros_like(dh_tot)
                dn_pre = tl.where(valid, dh_tot * (1.0 - gz) * (1.0 - gn * gn), zero)
                dz_pre = tl.where(valid, dh_tot * (h_prev - gn) * gz * (1.0 - gz), zero)
                dr_pre = dn_pre * ghn * gr * (1.0 - gr)
                dhn = dn_pre * gr
                x_t = xb_ptr + slot + own3  # the exchange store first: the other programs wait for it
                tl.store(x_t, dr_pre.to(DT), mask=m_bu)
                tl.store(x_t + H, dz_pre.to(DT), mask=m_bu)
                tl.store(x_t + 2 * H, dhn.to(DT), mask=m_bu)
                dh_own = tl.where(valid, dh_tot * gz, dh_own)  # + [dr|dz|dhn] @ W in phase B
            if SYNC:
                n_bar += 1
                cur = C.barrier_arrive(sync, N_U)
            if PHASE_A:
                dx_t = dx_ptr + t64 * B64 * G3 + own3
                tl.store(dx_t, dr_pre.to(DT), mask=m_bu)
                tl.store(dx_t + H, dz_pre.to(DT), mask=m_bu)
                tl.store(dx_t + 2 * H, dn_pre.to(DT), mask=m_bu)
                tl.store((dhseq_ptr + t64 * B64 * H) + own, dhn.to(DT), mask=m_bu)
                dy_c, gr, gz, gn, ghn, h_prev = _bwd_inputs(dy_ptr, h0_ptr, y_ptr, gates_ptr, lens, r + 1, r_end, T,
                                                            B64, own, own4, m_bu, H, BB, REVERSE, ACC)
            if SYNC:
                C.barrier_wait(sync, cur, n_bar * N_U, err_ptr, N_U, MAX_SPINS)
            if PHASE_B:
                dh_own += C.spread(C.gemm(xb_ptr + slot, rows * G3, row_ok, xb_ptr, wb1, wb2, wb3, wb4, G3, B_KS,
                                          B_KC1, B_KC2, B_KC3, B_KC4, False, OP, ACC, DOT_PRECISION, UPCAST))
            r += 1

        tl.store(dst_ptr + own, dh_own, mask=m_bu)


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
def _consts(H, dt, has_lengths, reverse, has_bias=None, precision=None, upcast=None, save=True) -> dict:
    """Constexprs of the recurrence kernels (``has_bias`` None: the backward kernel)."""
    d = dict(H=H, HAS_LENGTHS=bool(has_lengths), REVERSE=bool(reverse), ACC=C.acc_tl(dt),
             DOT_PRECISION=C.dot_precision(dt) if precision is None else precision,
             UPCAST=C.dot_upcast(dt) if upcast is None else upcast)
    if has_bias is not None:
        d["HAS_BIAS"] = bool(has_bias)
        d["SAVE"] = bool(save)
    return d


def gru_fwd(xproj: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, lengths: Optional[Tensor],
            reverse: bool, save: bool = True):
    """GRU recurrence forward; see ``reference.gru_fwd``.  Returns (y, h_n, gates).

    ``save=False`` (inference): the kernel writes no gates; ``gates`` comes back as an empty (0,)
    tensor of xproj's dtype.  y and h_n are bitwise those of ``save=True`` (same kernel, only the
    gate stores compiled out)."""
    T, B, G = xproj.shape
    H = G // 3
    dt, dev = xproj.dtype, xproj.device
    check_supported(H, dt, dev)
    y = torch.empty(T, B, H, dtype=dt, device=dev)
    gates = torch.empty(T, B, 4 * H, dtype=dt, device=dev) if save else torch.empty(0, dtype=dt, device=dev)
    if B == 0:
        return y, torch.empty(B, H, dtype=dt, device=dev), gates
    if T == 0:
        return y, h0.clone(), gates
    xproj, w_hh = xproj.contiguous(), w_hh.to(dt).contiguous()
    hs = h0.to(C.acc_dtype(dt)).contiguous().clone()  # h state between launches, h_n at the end
    hx = torch.empty(2, B, H, dtype=dt, device=dev)  # h exchange (step parity)
    hx[0].copy_(h0)
    hx[1].zero_()
    bias = b_hh.contiguous() if b_hh is not None else xproj
    lens = lengths.to(device=dev, dtype=torch.int64).contiguous() if lengths is not None else hs

    def make_args(save_: bool) -> tuple:
        # save=False: y stands in for the gates, never touched (same kernel signature); save=True
        # without ``save``: scratch gates (launch_forward's fallback)
        g = gates if save else (torch.empty(T, B, 4 * H, dtype=dt, device=dev) if save_ else y)
        return (xproj, w_hh, bias, lens, hs, hx, y, g)

    consts = _consts(H, dt, lengths is not None, reverse, has_bias=b_hh is not None)
    C.launch_forward(_gru_fwd_kernel, "gru_fwd", CELL, H, H, B, T, dt, make_args, consts, dev, save)
    return y, hs.to(dt), gates


def gru_bwd(dy: Tensor, dh_n: Tensor, w_hh: Tensor, h0: Tensor, y: Tensor, gates: Tensor,
            lengths: Optional[Tensor], reverse: bool):
    """GRU recurrence backward; see ``reference.gru_bwd``.  Returns (dxproj, dh0, dhn)."""
    T, B, G4 = gates.shape
    H = G4 // 4
    dt, dev = dy.dtype, dy.device
    check_supported(H, dt, dev)
    dx = torch.empty(T, B, 3 * H, dtype=dt, device=dev)
    dhseq = torch.empty(T, B, H, dtype=dt, device=dev)
    if B == 0:
        return dx, torch.empty(B, H, dtype=dt, device=dev), dhseq
    if T == 0:
        return dx, dh_n.clone(), dhseq
    dy, w_hh = dy.contiguous(), w_hh.to(dt).contiguous()
    h0, y, gates = h0.contiguous(), y.contiguous(), gates.contiguous()
    dst = dh_n.to(C.acc_dtype(dt)).contiguous().clone()  # dh between launches, dh0 at the end
    xb = torch.zeros(2, B, 3 * H, dtype=dt, device=dev)  # [dr|dz|dhn] exchange (step parity)
    lens = lengths.to(device=dev, dtype=torch.int64).contiguous() if lengths is not None else dst
    args = (dy, w_hh, h0, y, gates, lens, dst, xb, dx, dhseq)
    consts = _consts(H, dt, lengths is not None, reverse)
    C.launch_recurrence(_gru_bwd_kernel, "gru_bwd", CELL, True, H, H, B, T, dt, args, consts, dev)
    return dx, dst.to(dt), dhseq


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
def aot_recurrence(v: "C.Variant", H: int, P: int, dt: torch.dtype, precision: str, pa: bool, pb: bool,
                   tag: str, save: bool = True) -> dict:
    """The AOT spec of the recurrence kernel ``v`` launches (phases ``pa`` / ``pb``; forward:
    ``save`` False is the inference kernel, named ``gru_fwd_nosave``)."""
    ty, aty = C.TL_NAMES[dt], C.TL_NAMES[C.acc_dtype(dt)]
    kname = "gru_bwd" if v.backward else ("gru_fwd" if save else "gru_fwd_nosave")
    if not v.backward:
        fn = _gru_fwd_kernel
        consts = _consts(H, dt, True, False, True, precision, False, save)
        ptrs = dict(xproj_ptr=ty, w_ptr=ty, b_ptr=ty, len_ptr="i64", hs_ptr=aty, hx_ptr=ty, y_ptr=ty,
                    gates_ptr=ty, sync_ptr="i32", err_ptr="i32")
    else:
        fn = _gru_bwd_kernel
        consts = _consts(H, dt, True, False, None, precision, False)
        ptrs = dict(dy_ptr=ty, w_ptr=ty, h0_ptr=ty, y_ptr=ty, gates_ptr=ty, len_ptr="i64", dst_ptr=aty,
                    xb_ptr=ty, dx_ptr=ty, dhseq_ptr=ty, sync_ptr="i32", err_ptr="i32")
    consts.update(v.consts(), PHASE_A=pa, PHASE_B=pb, SYNC=v.mode != "stepwise", MAX_SPINS=C.MAX_SPIN)
    return C.aot_spec(f"{kname} {tag}", fn, ptrs, consts, v.num_warps, v.num_stages)


def aot_variants(capability: int = 90) -> list:
    """Every GRU kernel variant the selection rule picks for the AOT sizes of ``_common.aot_shapes``
    (representative sizes up to the limit, batches up to the largest chunk), plus the cells, as
    ``_common.aot_spec`` dicts for ``tools/triton_aot.py``."""
    specs = C.aot_recurrence_specs(CELL, capability, aot_recurrence)
    for dt in C.SUPPORTED_DTYPES:
        ty = C.TL_NAMES[dt]
        cell_ptrs_f = {n: ty for n in ("ig_ptr", "hg_ptr", "bih_ptr", "bhh_ptr", "h_ptr", "hnew_ptr", "gates_ptr")}
        specs.append(C.aot_spec(f"gru_cell_fwd {ty}", _gru_cell_fwd_kernel, cell_ptrs_f,
                                dict(H=768, HAS_BIH=True, HAS_BHH=True, BLOCK=CELL_BLOCK), 4))
        cell_ptrs_b = {n: ty for n in ("dhnew_ptr", "h_ptr", "gates_ptr", "di_ptr", "dhg_ptr", "dh_ptr")}
        specs.append(C.aot_spec(f"gru_cell_bwd {ty}", _gru_cell_bwd_kernel, cell_ptrs_b,
                                dict(H=768, BLOCK=CELL_BLOCK), 4))
    return specs
