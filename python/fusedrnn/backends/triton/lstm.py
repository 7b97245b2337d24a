"""Triton LSTM kernels: recurrence forward, reverse-time backward, LSTMCell pointwise fwd / bwd.

Contract and semantics: ``fusedrnn.backends.reference`` (``lstm_fwd``, ``lstm_bwd``,
``lstm_cell_fwd``, ``lstm_cell_bwd``); gate order i, f, g, o.  Plans, limits, the shared GEMM /
barrier helpers and the launch loop: ``_common`` (its docstring has the selection rule).

Forward, program = ``BB`` batch rows x ``BU`` hidden units (all four gates of each).  Its W_hh
rows {g * H + u} are loaded once as the B operand [P, 4 * BU] (column u * 4 + g) in split-K
pieces and stay in shared memory.  Per step (phase A):
    pre[BB, 4BU] = h_{t-1}[BB, P] @ W^T      one dot chain, one split-K reduction (``C.gemm``)
    i, f, g, o = split4(pre) + xproj_t + b_hh (xproj_t prefetched during the previous barrier)
    c = f c + i g (fp32/fp64, registers for the whole launch);  m = o tanh(c)
    h_t (own units) -> exchange slot (t+1) % 2;  arrive;  gates_t, c_t, y_t;  prefetch;  wait
(gates_t and c_t only with ``SAVE``: the inference variant, ``save=False``, has no such stores.)
With a projection (phase B, after a barrier): program p owns a slice of P and computes
h_t[:, slice] = m_t @ W_hr[slice, :]^T with its W_hr slice on chip; a second barrier per step.
``single`` variants (one program owns every unit) keep h in registers and need no barrier.

Backward (reverse processing order), per step:
    phase A (own units): dh_tot = dh + dy_t (with a projection: dm = (dh + dy_t) @ W_hr[:, U]);
        dgates from the saved gates / c (dc carried in registers) -> exchange slot r % 2 (dtype);
        arrive;  dxproj_t;  prefetch of the next step's saved tensors;  wait
    phase B: dh[:, U] = dgates[BB, 4H] @ W_hh[:, U] (K = all 4H gate rows, W_hh^T slice on chip;
        padded rows exchanged zeros, so dh passes unchanged there).  Without a projection the
        program's phase-B columns are its own units: one barrier per step, dh stays in registers.
        With one, phase B owns a slice of P, publishes dh, second barrier.

Per-step cost at H = 768, B = 16, bf16 (forward, sm_90): 96 programs x 8 units, 4 warps, split
K = 4 x (128 + 64); W_hh slice 32 x 768 x 2 B = 48 KiB; h_{t-1} 24 KiB per program from L2;
one grid barrier.  BENCHMARKS.md "Triton design round 2" has the predictions per change.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from . import _common as C
from ._common import tl, triton

GATES = 4
CELL = C.LSTM_CELL

if triton is not None:
    sigmoid = C.sigmoid
    tanh = C.tanh

    @triton.jit
    def _xgates(xproj_ptr, b_i, b_f, b_g, b_o, t, B64, own_g, msk, H: tl.constexpr, ACC: tl.constexpr):
        """xproj_t + b_hh of the own [BB, BU] tiles, per gate (loaded ahead of their use)."""
        x = xproj_ptr + t.to(tl.int64) * B64 * (4 * H) + own_g
        x_i = tl.load(x, mask=msk, other=0.0).to(ACC) + b_i[None, :]
        x_f = tl.load(x + H, mask=msk, other=0.0).to(ACC) + b_f[None, :]
        x_g = tl.load(x + 2 * H, mask=msk, other=0.0).to(ACC) + b_g[None, :]
        x_o = tl.load(x + 3 * H, mask=msk, other=0.0).to(ACC) + b_o[None, :]
        return x_i, x_f, x_g, x_o

    # ------------------------------------------------------------------------------ forward
    @triton.jit(do_not_specialize=["T", "B", "tile0", "s_begin", "s_end", "N_U"])
    def _lstm_fwd_kernel(
        xproj_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, len_ptr,
        y_ptr, gates_ptr, cs_ptr,
        hbuf_ptr,  # (2, B, P) dtype: slot s % 2 holds h entering processing step s
        mbuf_ptr,  # (B, H) dtype: m = o * tanh(c) exchange of the projection phase
        cst_ptr,  # (B, H) acc: cell state, read at the start, written at the end
        sync_ptr, err_ptr,
        T, B, tile0, s_begin, s_end, N_U,
        H: tl.constexpr, P: tl.constexpr, BB: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr,
        A_KS: tl.constexpr, A_KC1: tl.constexpr, A_KC2: tl.constexpr, A_KC3: tl.constexpr, A_KC4: tl.constexpr,
        B_KS: tl.constexpr, B_KC1: tl.constexpr, B_KC2: tl.constexpr, B_KC3: tl.constexpr, B_KC4: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr,
        H_IN_REGS: tl.constexpr, PHASE_A: tl.constexpr, PHASE_B: tl.constexpr, SYNC: tl.constexpr,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, MAX_SPINS: tl.constexpr,
        SAVE: tl.constexpr,
    ):
        # SAVE False (inference): gates_ptr / cs_ptr are never touched; the compiled variant has no
        # stores for them (fewer instructions per step, nothing for the next release to wait for)
        G: tl.constexpr = 4 * H
        WDT: tl.constexpr = w_hh_ptr.dtype.element_ty
        ODT: tl.constexpr = y_ptr.dtype.element_ty
        OP: tl.constexpr = tl.float32 if UPCAST else WDT  # dtype of the dot operands
        pid_u = tl.program_id(0)
        tile = tile0 + tl.program_id(1)
        rows = tile * BB + tl.arange(0, BB)  # [BB]
        row_ok = rows < B
        B64 = B.to(tl.int64)
        sync = sync_ptr + tile
        if HAS_LENGTHS:
            lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
        else:
            lens = tl.where(row_ok, T, 0)
        n_bar = 0

        if PHASE_A:
            units = pid_u * BU + tl.arange(0, BU)  # [BU]
            unit_ok = units < H
            m_bu = row_ok[:, None] & unit_ok[None, :]
            own_g = rows[:, None] * G + units[None, :]  # into (B, 4H); int32 (B * 4H < 2**31)
            own_h = rows[:, None] * H + units[None, :]
            own_p = rows[:, None] * P + units[None, :]  # no projection: P == H
            # W_hh^T slice [P, 4 * BU] in split-K pieces, column u * 4 + g = row g * H + unit u
            n = tl.arange(0, 4 * BU)
            w_u = pid_u * BU + n // 4
            w_col = ((n % 4) * H + w_u).to(tl.int64) * P
            w_ok = w_u < H
            wa1, wa2, wa3, wa4 = C.load_w(w_hh_ptr, w_col, w_ok, 1, P, A_KS, A_KC1,
                A_KC2, A_KC3, A_KC4)
            if HAS_BIAS:
                b_i = tl.load(b_hh_ptr + units, mask=unit_ok, other=0.0).to(ACC)
                b_f = tl.load(b_hh_ptr + H + units, mask=unit_ok, other=0.0).to(ACC)
                b_g = tl.load(b_hh_ptr + 2 * H + units, mask=unit_ok, other=0.0).to(ACC)
                b_o = tl.load(b_hh_ptr + 3 * H + units, mask=unit_ok, other=0.0).to(ACC)
            else:
                b_i = tl.zeros([BU], dtype=ACC)
                b_f = b_i
                b_g = b_i
                b_o = b_i
            c = tl.load(cst_ptr + own_h, mask=m_bu, other=0.0)  # [BB, BU] acc
            if not HAS_PROJ:
                h_own = tl.load(hbuf_ptr + (s_begin % 2).to(tl.int64) * B64 * P + own_p, mask=m_bu, other=0.0,
                                cache_modifier=".cg").to(ACC)
            if REVERSE:
                t_first = T - 1 - s_begin
            else:
                t_first = s_begin
            x_i, x_f, x_g, x_o = _xgates(xproj_ptr, b_i, b_f, b_g, b_o, t_first, B64, own_g,
                                         m_bu & (s_begin < s_end), H, ACC)
        if HAS_PROJ:
            if PHASE_B:
                offs_p = pid_u * BP + tl.arange(0, BP)
                p_ok = offs_p < P
                m_bp = row_ok[:, None] & p_ok[None, :]
                own_pp = rows[:, None] * P + offs_p[None, :]
                # W_hr^T slice [H, BP]: h[:, p] = sum_j m[:, j] * w_hr[p, j]
                wp_col = offs_p.to(tl.int64) * H
                wb1, wb2, wb3, wb4 = C.load_w(w_hr_ptr, wp_col, p_ok, 1, H, B_KS, B_KC1,
                    B_KC2, B_KC3, B_KC4)
                h_own_p = tl.load(hbuf_ptr + (s_begin % 2).to(tl.int64) * B64 * P + own_pp, mask=m_bp, other=0.0,
                                  cache_modifier=".cg").to(ACC)

        s = s_begin
        while s < s_end:  # a while loop: the interpreter of triton 3.6 cannot take range() of runtime ints
            if REVERSE:
                t = T - 1 - s
            else:
                t = s
            t64 = t.to(tl.int64)
            slot_cur = (s % 2).to(tl.int64) * B64 * P
            slot_nxt = ((s + 1) % 2).to(tl.int64) * B64 * P
            valid = (t < lens)[:, None]  # [BB, 1]
            if PHASE_A:
                if H_IN_REGS:
                    pre = C.gemm_regs(h_own.to(OP), wa1, BB, A_KS, A_KC1, ACC, DOT_PRECISION, UPCAST)
                else:
                    pre = C.gemm(hbuf_ptr + slot_cur, rows * P, row_ok, hbuf_ptr, wa1, wa2, wa3, wa4, P, A_KS,
                                 A_KC1, A_KC2, A_KC3, A_KC4, False, OP, ACC, DOT_PRECISION, UPCAST)
                p_i, p_f, p_g, p_o = C.split4(pre, BB, BU)
                gi = sigmoid(p_i + x_i)
                gf = sigmoid(p_f + x_f)
                gg = tanh(p_g + x_g)
                go = sigmoid(p_o + x_o)
                c_new = gf * c + gi * gg
                m = go * tanh(c_new)
                c = tl.where(valid, c_new, c)
                # the exchange store first: the other programs wait for it
                if HAS_PROJ:
                    tl.store(mbuf_ptr + own_h, m.to(WDT), mask=m_bu)
                else:
                    h_own = tl.where(valid, m, h_own)
                    if not H_IN_REGS:
                        tl.store(hbuf_ptr + slot_nxt + own_p, h_own.to(WDT), mask=m_bu)
            if SYNC and not H_IN_REGS:
                n_bar += 1
                cur = C.barrier_arrive(sync, N_U)
            if PHASE_A:
                # stores nobody waits for, then the next step's inputs, while the barrier settles
                zero = tl.zeros_like(c_new)
                if SAVE:
                    g_t = gates_ptr + t64 * B64 * G + own_g
                    tl.store(g_t, tl.where(valid, gi, zero).to(ODT), mask=m_bu)
                    tl.store(g_t + H, tl.where(valid, gf, zero).to(ODT), mask=m_bu)
                    tl.store(g_t + 2 * H, tl.where(valid, gg, zero).to(ODT), mask=m_bu)
                    tl.store(g_t + 3 * H, tl.where(valid, go, zero).to(ODT), mask=m_bu)
                    tl.store(cs_ptr + t64 * B64 * H + own_h, tl.where(valid, c_new, zero), mask=m_bu)
                if not HAS_PROJ:
                    tl.store(y_ptr + t64 * B64 * P + own_p, tl.where(valid, m, zero).to(ODT), mask=m_bu)
                if REVERSE:
                    t_next = t - 1
                else:
                    t_next = t + 1
                x_i, x_f, x_g, x_o = _xgates(xproj_ptr, b_i, b_f, b_g, b_o, t_next, B64, own_g,
                                             m_bu & (s + 1 < s_end), H, ACC)
            if SYNC and not H_IN_REGS:
                C.barrier_wait(sync, cur, n_bar * N_U, err_ptr, N_U, MAX_SPINS)
            if HAS_PROJ:
                if PHASE_B:
                    hp = C.spread(C.gemm(mbuf_ptr, rows * H, row_ok, mbuf_ptr, wb1, wb2, wb3, wb4, H, B_KS,
                                         B_KC1, B_KC2, B_KC3, B_KC4, False, OP, ACC, DOT_PRECISION, UPCAST))
                    h_own_p = tl.where(valid, hp, h_own_p)
                    tl.store(hbuf_ptr + slot_nxt + own_pp, h_own_p.to(WDT), mask=m_bp)
                if SYNC:
                    n_bar += 1
                    cur = C.barrier_arrive(sync, N_U)
                if PHASE_B:
                    tl.store(y_ptr + t64 * B64 * P + own_pp, tl.where(valid, hp, tl.zeros_like(hp)).to(ODT), mask=m_bp)
                if SYNC:
                    C.barrier_wait(sync, cur, n_bar * N_U, err_ptr, N_U, MAX_SPINS)
            s += 1

        if PHASE_A:
            tl.store(cst_ptr + own_h, c, mask=m_bu)
            if H_IN_REGS:  # h never went through the exchange buffer: leave h_n where the launcher reads it
                tl.store(hbuf_ptr + (s_end % 2).to(tl.int64) * B64 * P + own_p, h_own.to(WDT), mask=m_bu)

    # ----------------------------------------------------------------------------- backward
    @triton.jit
    def _step_times(r, T, REVERSE: tl.constexpr):
        """(t, t_prev, s) of backward processing step r: s = T-1-r is the forward processing index,
        t its time index, t_prev the time index of the state entering it."""
        s = T - 1 - r
        if REVERSE:
            t = T - 1 - s
            t_prev = t + 1
        else:
            t = s
            t_prev = t - 1
        return t, t_prev, s

    @triton.jit
    def _bwd_inputs(dy_ptr, gates_ptr, cs_ptr, c_init, lens, r, r_end, T, B64, own_g, own_h, own_p, m_bu,
                    H: tl.constexpr, P: tl.constexpr, HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr,
                    ACC: tl.constexpr):
        """Saved tensors phase A of step r reads for the own units (loaded a step ahead)."""
        t, t_prev, s = _step_times(r, T, REVERSE)
        msk = m_bu & (r < r_end)
        t64 = t.to(tl.int64)
        if HAS_PROJ:
            dy = tl.zeros_like(c_init)
        else:
            dy = tl.load(dy_ptr + t64 * B64 * P + own_p, mask=msk, other=0.0).to(ACC)
        g = gates_ptr + t64 * B64 * (4 * H) + own_g
        gi = tl.load(g, mask=msk, other=0.0).to(ACC)
        gf = tl.load(g + H, mask=msk, other=0.0).to(ACC)
        gg = tl.load(g + 2 * H, mask=msk, other=0.0).to(ACC)
        go = tl.load(g + 3 * H, mask=msk, other=0.0).to(ACC)
        cc = tl.load(cs_ptr + t64 * B64 * H + own_h, mask=msk, other=0.0).to(ACC)
        prev_ok = ((s > 0) & (t_prev < lens))[:, None]  # [BB, 1]
        tp = tl.maximum(tl.minimum(t_prev, T - 1), 0).to(tl.int64)
        c_prev = tl.load(cs_ptr + tp * B64 * H + own_h, mask=msk & prev_ok, other=0.0).to(ACC)
        c_prev = tl.where(prev_ok, c_prev, c_init)
        return dy, gi, gf, gg, go, cc, c_prev

    @triton.jit(do_not_specialize=["T", "B", "tile0", "r_begin", "r_end", "N_U"])
    def _lstm_bwd_kernel(
        dy_ptr, w_hh_ptr, w_hr_ptr, gates_ptr, cs_ptr, c0_ptr, len_ptr,
        dxproj_ptr, dhseq_ptr,
        dhbuf_ptr,  # (2, B, P) acc: dh exchange, slot r % 2 entering step r (projection only)
        xb_ptr,  # (2, B, 4H) dtype: dgates exchange, slot r % 2 (a GEMM operand only)
        dst_ptr,  # (B, P) acc: dh state between launches (dh_n at the start)
        dcst_ptr,  # (B, H) acc: dc state between launches (dc_n at the start)
        sync_ptr, err_ptr,
        T, B, tile0, r_begin, r_end, N_U,
        H: tl.constexpr, P: tl.constexpr, BB: tl.constexpr, BU: tl.constexpr, BP: tl.constexpr,
        A_KS: tl.constexpr, A_KC1: tl.constexpr, A_KC2: tl.constexpr, A_KC3: tl.constexpr, A_KC4: tl.constexpr,
        B_KS: tl.constexpr, B_KC1: tl.constexpr, B_KC2: tl.constexpr, B_KC3: tl.constexpr, B_KC4: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, H_IN_REGS: tl.constexpr,
        PHASE_A: tl.constexpr, PHASE_B: tl.constexpr, SYNC: tl.constexpr,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, MAX_SPINS: tl.constexpr,
    ):
        G: tl.constexpr = 4 * H
        WDT: tl.constexpr = w_hh_ptr.dtype.element_ty
        ODT: tl.constexpr = dxproj_ptr.dtype.element_ty
        OP: tl.constexpr = tl.float32 if UPCAST else WDT
        pid_u = tl.program_id(0)
        tile = tile0 + tl.program_id(1)
        rows = tile * BB + tl.arange(0, BB)
        row_ok = rows < B
        B64 = B.to(tl.int64)
        sync = sync_ptr + tile
        if HAS_LENGTHS:
            lens = tl.load(len_ptr + rows, mask=row_ok, other=0)
        else:
            lens = tl.where(row_ok, T, 0)
        n_bar = 0
        units = pid_u * BU + tl.arange(0, BU)
        unit_ok = units < H
        m_bu = row_ok[:, None] & unit_ok[None, :]
        own_g = rows[:, None] * G + units[None, :]
        own_h = rows[:, None] * H + units[None, :]
        own_p = rows[:, None] * P + units[None, :]  # no projection: P == H

        if not HAS_PROJ:
            # launch with phase A: dh entering r_begin; stepwise phase-B launch: phase A's base
            dh_own = tl.load(dst_ptr + own_p, mask=m_bu, other=0.0)
        if PHASE_A:
            dc = tl.load(dcst_ptr + own_h, mask=m_bu, other=0.0)  # [BB, BU] acc
            c_init = tl.load(c0_ptr + own_h, mask=m_bu, other=0.0).to(ACC)
            if HAS_PROJ:
                # W_hr slice [P, BU]: dm[:, u] = sum_p dh_tot[:, p] * w_hr[p, u]
                wr_col = units.to(tl.int64)
                wa1, wa2, wa3, wa4 = C.load_w(w_hr_ptr, wr_col, unit_ok, H, P, A_KS, A_KC1,
                    A_KC2, A_KC3, A_KC4)
            dy_c, gi_n, gf_n, gg_n, go_n, cc_n, cp_n = _bwd_inputs(
                dy_ptr, gates_ptr, cs_ptr, c_init, lens, r_begin, r_end, T, B64, own_g, own_h, own_p, m_bu,
                H, P, HAS_PROJ, REVERSE, ACC)
        if PHASE_B:
            if HAS_PROJ:
                cols = pid_u * BP + tl.arange(0, BP)
                col_ok = cols < P
                m_bp = row_ok[:, None] & col_ok[None, :]
                own_pp = rows[:, None] * P + cols[None, :]
                dh_p = tl.load(dst_ptr + own_pp, mask=m_bp, other=0.0)
            else:
                cols = units
                col_ok = unit_ok
            # W_hh slice [4H, cols]: dh[:, j] = sum_k dgates[:, k] * w_hh[k, j]
            wb_col = cols.to(tl.int64)
            wb1, wb2, wb3, wb4 = C.load_w(w_hh_ptr, wb_col, col_ok, P, G, B_KS, B_KC1,
                B_KC2, B_KC3, B_KC4)

        r = r_begin
        while r < r_end:
            t, t_prev, s = _step_times(r, T, REVERSE)
            t64 = t.to(tl.int64)
            slot_x = (r % 2).to(tl.int64) * B64 * G
            valid = (t < lens)[:, None]
            if PHASE_A:
                if HAS_PROJ:
                    dm = C.spread(C.gemm(dhbuf_ptr + (r % 2).to(tl.int64) * B64 * P, rows * P, row_ok,
                                         dy_ptr + t64 * B64 * P, wa1, wa2, wa3, wa4, P, A_KS, A_KC1, A_KC2, A_KC3,
                                         A_KC4, True, OP, ACC, DOT_PRECISION, UPCAST))  # [BB, BU]
                else:
                    dm = dh_own + dy_c
                tc = tanh(cc_n)
                dc_tot = dc + dm * go_n * (1.0 - tc * tc)
                zero = tl.zeros_like(dc_tot)
                dp_i = tl.where(valid, dc_tot * gg_n * gi_n * (1.0 - gi_n), zero)
                dp_f = tl.where(valid, dc_tot * cp_n * gf_n * (1.0 - gf_n), zero)
                dp_g = tl.where(valid, dc_tot * gi_n * (1.0 - gg_n * gg_n), zero)
                dp_o = tl.where(valid, dm * tc * go_n * (1.0 - go_n), zero)
                dc = tl.where(valid, dc_tot * gf_n, dc)
                x_t = xb_ptr + slot_x + own_g  # the exchange store first: the other programs wait for it
                tl.store(x_t, dp_i.to(WDT), mask=m_bu)
                tl.store(x_t + H, dp_f.to(WDT), mask=m_bu)
                tl.store(x_t + 2 * H, dp_g.to(WDT), mask=m_bu)
                tl.store(x_t + 3 * H, dp_o.to(WDT), mask=m_bu)
                if not HAS_PROJ:
                    dh_own = tl.where(valid, zero, dh_own)  # + dgates @ W in phase B (zero where padded)
            if SYNC:
                n_bar += 1
                cur = C.barrier_arrive(sync, N_U)
            if PHASE_A:
                d_t = dxproj_ptr + t64 * B64 * G + own_g
                tl.store(d_t, dp_i.to(ODT), mask=m_bu)
                tl.store(d_t + H, dp_f.to(ODT), mask=m_bu)
                tl.store(d_t + 2 * H, dp_g.to(ODT), mask=m_bu)
                tl.store(d_t + 3 * H, dp_o.to(ODT), mask=m_bu)
                dy_c, gi_n, gf_n, gg_n, go_n, cc_n, cp_n = _bwd_inputs(
                    dy_ptr, gates_ptr, cs_ptr, c_init, lens, r + 1, r_end, T, B64, own_g, own_h, own_p, m_bu,
                    H, P, HAS_PROJ, REVERSE, ACC)
            if SYNC:
                C.barrier_wait(sync, cur, n_bar * N_U, err_ptr, N_U, MAX_SPINS)
            if PHASE_B:
                dh_new = C.spread(C.gemm(xb_ptr + slot_x, rows * G, row_ok, xb_ptr, wb1, wb2, wb3, wb4, G, B_KS,
                                         B_KC1, B_KC2, B_KC3, B_KC4, False, OP, ACC, DOT_PRECISION, UPCAST))
                if HAS_PROJ:
                    dy_p = tl.load(dy_ptr + t64 * B64 * P + own_pp, mask=m_bp, other=0.0).to(ACC)
                    dh_tot_p = dh_p + dy_p
                    dh_p = tl.where(valid, dh_new, dh_p)
                    tl.store(dhbuf_ptr + ((r + 1) % 2).to(tl.int64) * B64 * P + own_pp, dh_p, mask=m_bp)
                else:
                    dh_own = dh_own + dh_new
            if HAS_PROJ:
                if SYNC:
                    n_bar += 1
                    cur = C.barrier_arrive(sync, N_U)
                if PHASE_B:
                    tl.store(dhseq_ptr + t64 * B64 * P + own_pp,
                             tl.where(valid, dh_tot_p, tl.zeros_like(dh_tot_p)).to(ODT), mask=m_bp)
                if SYNC:
                    C.barrier_wait(sync, cur, n_bar * N_U, err_ptr, N_U, MAX_SPINS)
            r += 1

        if PHASE_A:
            tl.store(dcst_ptr + own_h, dc, mask=m_bu)
        if HAS_PROJ:
            if PHASE_B:
                tl.store(dst_ptr + own_pp, dh_p, mask=m_bp)
        else:
            tl.store(dst_ptr + own_p, dh_own, mask=m_bu)

    # ------------------------------------------------------------------------------- cells
    @triton.jit(do_not_specialize=["N", "H"])
    def _lstm_cell_fwd_kernel(
        ig_ptr, hg_ptr, bih_ptr, bhh_ptr, c_ptr, h_out, c_out, g_out, N, H,
        HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat (b, u), N = B*H
        mask = offs < N
        b = offs // H
        u = offs % H
        base = b * (4 * H) + u
        odt = h_out.dtype.element_ty
        pi = tl.load(ig_ptr + base, mask=mask, other=0.0).to(ACC) + tl.load(hg_ptr + base, mask=mask, other=0.0).to(ACC)
        pf = tl.load(ig_ptr + base + H, mask=mask, other=0.0).to(ACC) + tl.load(hg_ptr + base + H, mask=mask, other=0.0).to(ACC)
        pg = tl.load(ig_ptr + base + 2 * H, mask=mask, other=0.0).to(ACC) + tl.load(hg_ptr + base + 2 * H, mask=mask, other=0.0).to(ACC)
        po = tl.load(ig_ptr + base + 3 * H, mask=mask, other=0.0).to(ACC) + tl.load(hg_ptr + base + 3 * H, mask=mask, other=0.0).to(ACC)
        if HAS_BIH:
            pi += tl.load(bih_ptr + u, mask=mask, other=0.0).to(ACC)
            pf += tl.load(bih_ptr + u + H, mask=mask, other=0.0).to(ACC)
            pg += tl.load(bih_ptr + u + 2 * H, mask=mask, other=0.0).to(ACC)
            po += tl.load(bih_ptr + u + 3 * H, mask=mask, other=0.0).to(ACC)
        if HAS_BHH:
            pi += tl.load(bhh_ptr + u, mask=mask, other=0.0).to(ACC)
            pf += tl.load(bhh_ptr + u + H, mask=mask, other=0.0).to(ACC)
            pg += tl.load(bhh_ptr + u + 2 * H, mask=mask, other=0.0).to(ACC)
            po += tl.load(bhh_ptr + u + 3 * H, mask=mask, other=0.0).to(ACC)
        gi = sigmoid(pi)
        gf = sigmoid(pf)
        gg = tanh(pg)
        go = sigmoid(po)
        c_new = gf * tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC) + gi * gg
        h_new = go * tanh(c_new)
        tl.store(h_out + offs, h_new.to(odt), mask=mask)
        tl.store(c_out + offs, c_new.to(odt), mask=mask)
        tl.store(g_out + base, gi.to(odt), mask=mask)
        tl.store(g_out + base + H, gf.to(odt), mask=mask)
        tl.store(g_out + base + 2 * H, gg.to(odt), mask=mask)
        tl.store(g_out + base + 3 * H, go.to(odt), mask=mask)

    @triton.jit(do_not_specialize=["N", "H"])
    def _lstm_cell_bwd_kernel(
        dh_ptr, dc_ptr, c_ptr, cn_ptr, g_ptr, dg_out, dc_out, N, H, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        b = offs // H
        u = offs % H
        base = b * (4 * H) + u
        odt = dg_out.dtype.element_ty
        gi = tl.load(g_ptr + base, mask=mask, other=0.0).to(ACC)
        gf = tl.load(g_ptr + base + H, mask=mask, other=0.0).to(ACC)
        gg = tl.load(g_ptr + base + 2 * H, mask=mask, other=0.0).to(ACC)
        go = tl.load(g_ptr + base + 3 * H, mask=mask, other=0.0).to(ACC)
        tc = tanh(tl.load(cn_ptr + offs, mask=mask, other=0.0).to(ACC))
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(ACC)
        dc_tot = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(ACC) + dh * go * (1.0 - tc * tc)
        c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(dg_out + base, (dc_tot * gg * gi * (1.0 - gi)).to(odt), mask=mask)
        tl.store(dg_out + base + H, (dc_tot * c * gf * (1.0 - gf)).to(odt), mask=mask)
        tl.store(dg_out + base + 2 * H, (dc_tot * gi * (1.0 - gg * gg)).to(odt), mask=mask)
        tl.store(dg_out + base + 3 * H, (dh * tc * go * (1.0 - go)).to(odt), mask=mask)
        tl.store(dc_out + offs, (dc_tot * gf).to(odt), mask=mask)


# ====================================================================================== launchers
def check_supported(H: int, P: int, dtype: torch.dtype, device) -> None:
    """Raise ValueError (naming the limit) when the kernels do not run this shape/device."""
    dev = torch.device(device)
    reason = C.unsupported_reason(GATES, H, P if P != H else 0, dtype, dev.type, dev)
    if reason is not None:
        raise ValueError(f"fusedrnn triton LSTM: {reason}")


def _fwd_consts(H, P, dt, has_bias, has_lengths, has_proj, reverse, precision=None, upcast=None,
                save=True) -> dict:
    return dict(
        H=H, P=P, HAS_BIAS=bool(has_bias), HAS_LENGTHS=bool(has_lengths), HAS_PROJ=bool(has_proj),
        REVERSE=bool(reverse), ACC=C.acc_tl(dt), DOT_PRECISION=C.dot_precision(dt) if precision is None else precision,
        UPCAST=C.dot_upcast(dt) if upcast is None else upcast, SAVE=bool(save),
    )


def _bwd_consts(H, P, dt, has_lengths, has_proj, reverse, precision=None, upcast=None) -> dict:
    d = _fwd_consts(H, P, dt, False, has_lengths, has_proj, reverse, precision, upcast)
    del d["HAS_BIAS"], d["SAVE"]
    return d


def lstm_fwd(
    xproj: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, c0: Tensor,
    w_hr: Optional[Tensor], lengths: Optional[Tensor], reverse: bool, save: bool = True,
):
    """Contract of ``reference.lstm_fwd``: returns (y, h_n, c_n, gates, cs).

    ``save=False`` (inference): the kernel writes no gates / cell states; ``gates`` and ``cs`` come
    back as empty (0,) tensors of xproj's dtype / the accumulation dtype.  y, h_n and c_n are
    bitwise those of ``save=True`` (same kernel, only the two stores compiled out)."""
    T, B, G = xproj.shape
    H = G // 4
    P = w_hh.shape[1]
    dt = xproj.dtype
    acc = C.acc_dtype(dt)
    dev = xproj.device
    check_supported(H, P, dt, dev)
    xproj = xproj.contiguous()
    w = w_hh.to(dt).contiguous()
    wr = w_hr.to(dt).contiguous() if w_hr is not None else None
    bias = b_hh.contiguous() if b_hh is not None else None
    lens = lengths.to(device=dev, dtype=torch.int64).contiguous() if lengths is not None else None
    y = torch.empty(T, B, P, dtype=dt, device=dev)
    gates = torch.empty(T, B, G, dtype=dt, device=dev) if save else torch.empty(0, dtype=dt, device=dev)
    cs = torch.empty(T, B, H, dtype=acc, device=dev) if save else torch.empty(0, dtype=acc, device=dev)
    hbuf = torch.empty(2, B, P, dtype=dt, device=dev)  # h in xproj dtype: what y / h_n store anyway
    hbuf[0].copy_(h0)
    hbuf[1].zero_()
    cst = c0.to(acc).clone().contiguous()
    mbuf = torch.zeros(B, H, dtype=dt, device=dev) if wr is not None else hbuf  # unused without proj

    def make_args(save_: bool) -> tuple:
        if save:
            g, c = gates, cs
        elif save_:  # launch_forward's fallback to the training kernel: scratch buffers
            g, c = torch.empty(T, B, G, dtype=dt, device=dev), torch.empty(T, B, H, dtype=acc, device=dev)
        else:  # never-touched stand-ins of the same dtypes (same kernel signature)
            g, c = y, cst
        return (xproj, w, bias if bias is not None else w, wr if wr is not None else w,
                lens if lens is not None else cst, y, g, c, hbuf, mbuf, cst)

    consts = _fwd_consts(H, P, dt, bias is not None, lens is not None, wr is not None, reverse)
    C.launch_forward(_lstm_fwd_kernel, "lstm_fwd", CELL, H, P, B, T, dt, make_args, consts, dev, save)
    h_n = hbuf[T % 2].clone()
    c_n = cst.to(dt)
    return y, h_n, c_n, gates, cs


def lstm_bwd(
    dy: Tensor, dh_n: Tensor, dc_n: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], c0: Tensor,
    gates: Tensor, cs: Tensor, lengths: Optional[Tensor], reverse: bool,
):
    """Contract of ``reference.lstm_bwd``: returns (dxproj, dh0, dc0, dh_seq)."""
    T, B, G = gates.shape
    H = G // 4
    P = w_hh.shape[1]
    dt = dy.dtype
    acc = C.acc_dtype(dt)
    dev = dy.device
    check_supported(H, P, dt, dev)
    w = w_hh.to(dt).contiguous()
    wr = w_hr.to(dt).contiguous() if w_hr is not None else None
    lens = lengths.to(device=dev, dtype=torch.int64).contiguous() if lengths is not None else None
    dxproj = torch.empty(T, B, G, dtype=dt, device=dev)
    dh_seq = torch.empty(T, B, P, dtype=dt, device=dev) if wr is not None else torch.empty(0, dtype=dt, device=dev)
    dst = dh_n.to(acc).clone().contiguous()
    if wr is not None:
        dhbuf = torch.empty(2, B, P, dtype=acc, device=dev)
        dhbuf[0].copy_(dh_n)
        dhbuf[1].zero_()
    else:
        dhbuf = dst  # unused without projection
    xb = torch.zeros(2, B, G, dtype=dt, device=dev)
    dcst = dc_n.to(acc).clone().contiguous()
    args = (
        dy.contiguous(), w, wr if wr is not None else w, gates.contiguous(), cs.contiguous(), c0.contiguous(),
        lens if lens is not None else dcst, dxproj, dh_seq if wr is not None else dxproj, dhbuf, xb, dst, dcst,
    )
    consts = _bwd_consts(H, P, dt, lens is not None, wr is not None, reverse)
    C.launch_recurrence(_lstm_bwd_kernel, "lstm_bwd", CELL, True, H, P, B, T, dt, args, consts, dev)
    if T == 0:
        return dxproj, dh_n.clone(), dc_n.clone(), dh_seq
    return dxproj, dst.to(dt), dcst.to(dt), dh_seq


_CELL_BLOCK = 256


def lstm_cell_fwd(igates: Tensor, hgates: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], c: Tensor):
    """Contract of ``reference.lstm_cell_fwd``: returns (h_new, c_new, gates)."""
    B, G = igates.shape
    H = G // 4
    dt = igates.dtype
    if dt not in C.SUPPORTED_DTYPES:
        raise ValueError(f"fusedrnn triton LSTMCell: dtype {dt} is not supported")
    r = C.device_unsupported_reason(igates.device.type)
    if r is not None:
        raise ValueError(f"fusedrnn triton LSTMCell: {r}")
    h_new = torch.empty(B, H, dtype=dt, device=igates.device)
    c_new = torch.empty(B, H, dtype=dt, device=igates.device)
    gates = torch.empty(B, G, dtype=dt, device=igates.device)
    N = B * H
    if N > 0:
        ig = igates.contiguous()
        grid = (C.cdiv(N, _CELL_BLOCK),)
        _lstm_cell_fwd_kernel[grid](
            ig, hgates.contiguous(), b_ih.contiguous() if b_ih is not None else ig,
            b_hh.contiguous() if b_hh is not None else ig, c.contiguous(), h_new, c_new, gates, N, H,
            HAS_BIH=b_ih is not None, HAS_BHH=b_hh is not None, ACC=C.acc_tl(dt), BLOCK=_CELL_BLOCK,
        )
        C.count_launch("lstm_cell_fwd")
    return h_new, c_new, gates


def lstm_cell_bwd(dh_new: Tensor, dc_new: Tensor, c: Tensor, c_new: Tensor, gates: Tensor):
    """Contract of ``reference.lstm_cell_bwd``: returns (dgates, dc)."""
    B, G = gates.shape
    H = G // 4
    dt = gates.dtype
    if dt not in C.SUPPORTED_DTYPES:
        raise ValueError(f"fusedrnn triton LSTMCell: dtype {dt} is not supported")
    dgates = torch.empty(B, G, dtype=dt, device=gates.device)
    dc = torch.empty(B, H, dtype=dt, device=gates.device)
    N = B * H
    if N > 0:
        _lstm_cell_bwd_kernel[(C.cdiv(N, _CELL_BLOCK),)](
            dh_new.contiguous(), dc_new.contiguous(), c.contiguous(), c_new.contiguous(), gates.contiguous(),
            dgates, dc, N, H, ACC=C.acc_tl(dt), BLOCK=_CELL_BLOCK,
        )
        C.count_launch("lstm_cell_bwd")
    return dgates, dc


# ================================================================================ AOT variants
def _aot_ptrs(dt: torch.dtype, backward: bool) -> dict:
    ty, aty = C.TL_NAMES[dt], C.TL_NAMES[C.acc_dtype(dt)]
    if not backward:
        return dict(xproj_ptr=ty, w_hh_ptr=ty, b_hh_ptr=ty, w_hr_ptr=ty, len_ptr="i64", y_ptr=ty, gates_ptr=ty,
                    cs_ptr=aty, hbuf_ptr=ty, mbuf_ptr=ty, cst_ptr=aty, sync_ptr="i32", err_ptr="i32")
    return dict(dy_ptr=ty, w_hh_ptr=ty, w_hr_ptr=ty, gates_ptr=ty, cs_ptr=aty, c0_ptr=ty, len_ptr="i64",
                dxproj_ptr=ty, dhseq_ptr=ty, dhbuf_ptr=aty, xb_ptr=ty, dst_ptr=aty, dcst_ptr=aty,
                sync_ptr="i32", err_ptr="i32")


def aot_recurrence(v: "C.Variant", H: int, P: int, dt: torch.dtype, precision: str, pa: bool, pb: bool,
                   tag: str, save: bool = True) -> dict:
    """The AOT spec of the recurrence kernel ``v`` launches (phases ``pa`` / ``pb``; forward:
    ``save`` False is the inference kernel, named ``lstm_fwd_nosave``)."""
    proj = P != H
    if v.backward:
        fn, consts, kname = _lstm_bwd_kernel, _bwd_consts(H, P, dt, True, proj, False, precision, False), "lstm_bwd"
    else:
        fn, consts = _lstm_fwd_kernel, _fwd_consts(H, P, dt, True, True, proj, False, precision, False, save)
        kname = "lstm_fwd" if save else "lstm_fwd_nosave"
    consts.update(v.consts(), PHASE_A=pa, PHASE_B=pb, SYNC=v.mode != "stepwise", MAX_SPINS=C.MAX_SPIN)
    return C.aot_spec(f"{kname} {tag}", fn, _aot_ptrs(dt, v.backward), consts, v.num_warps, v.num_stages)


def aot_variants(capability: int) -> list:
    """Every kernel variant the selection rule picks for the AOT sizes of ``_common.aot_shapes``
    (representative sizes up to the limit, batches up to the largest chunk, projections), plus
    the cells, as ``_common.aot_spec`` dicts for ``tools/triton_aot.py``."""
    specs = C.aot_recurrence_specs(CELL, capability, aot_recurrence)
    for dt in C.SUPPORTED_DTYPES:
        ty = C.TL_NAMES[dt]
        for name, fn, ptrs, consts in (
            ("lstm_cell_fwd", _lstm_cell_fwd_kernel,
             dict(ig_ptr=ty, hg_ptr=ty, bih_ptr=ty, bhh_ptr=ty, c_ptr=ty, h_out=ty, c_out=ty, g_out=ty),
             dict(HAS_BIH=True, HAS_BHH=True, ACC=C.acc_tl(dt), BLOCK=_CELL_BLOCK)),
            ("lstm_cell_bwd", _lstm_cell_bwd_kernel,
             dict(dh_ptr=ty, dc_ptr=ty, c_ptr=ty, cn_ptr=ty, g_ptr=ty, dg_out=ty, dc_out=ty),
             dict(ACC=C.acc_tl(dt), BLOCK=_CELL_BLOCK)),
        ):
            specs.append(C.aot_spec(f"{name} {ty}", fn, ptrs, consts, 4))
    return specs
