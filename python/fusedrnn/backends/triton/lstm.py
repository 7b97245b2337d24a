"""Triton LSTM kernels: recurrence forward, reverse-time backward, LSTMCell pointwise fwd / bwd.

Contract and semantics: ``fusedrnn.backends.reference`` (``lstm_fwd``, ``lstm_bwd``,
``lstm_cell_fwd``, ``lstm_cell_bwd``); gate order i, f, g, o; variants and limits:
``_common`` (``select_variant``).

Forward, one program = ``block_b`` batch rows x ``block_u`` hidden units (all 4 gates of each):
the 4 slices W_hh[k*H + units, :] ^T ([block_k, block_u] each, padded to powers of 2, masked)
are loaded once before the time loop and stay on chip.  Per step (phase A):
    h_{t-1} [block_b, P] <- exchange buffer (L2, ``.cg``)
    pre_k = h_{t-1} @ W_k + xproj_t[:, k] (+ b_hh)      4 x tl.dot, fp32/fp64 accumulate
    i, f, g, o activations; c = f c + i g (fp32/fp64 registers, whole sequence); m = o tanh(c)
    store gates_t, cs_t (zeros at padded steps), own slice of h_t (or m_t when projecting), y_t
With a projection (phase B, after a barrier): program p owns a slice of P and computes
h_t[:, slice] = m_t @ W_hr[slice, :]^T with its W_hr slice on chip.  One grid barrier per step
(two when projecting); ``single`` variants need none.

Backward (reverse processing order), per step:
    phase A (unit slice): dh_tot = dh + dy_t; dm = dh_tot (@ W_hr slice); dgates for the own
        units from the saved gates / cs; dc carried in registers; store dxproj_t and the fp32
        dgates into an exchange buffer
    barrier
    phase B (slice of P): dh[:, slice] = sum_k dgates_k @ W_k[:, slice]  (W_hh slice on chip),
        dh_seq_t (projection) ; barrier.

Per-step budget of the forward, H = 768, B = 16, bf16 (48 programs, block_u = 16, block_k = 1024):
    FLOP   2 x 16 x 768 x 3072 = 75.5 MFLOP per step (1.6 MFLOP per program: tensor cores,
           ~ 0.05 us) -- the math is negligible.
    W_hh   128 KiB per program stays in shared memory for the whole sequence (Triton stages the
           ``tl.dot`` operand there); it is re-read from shared memory each step (128 KiB at
           ~128 B/clk ~ 0.55 us per step per SM) and never from HBM/L2 (4.7 MB total).
    h_{t-1} 16 x 768 x 2 B = 24 KiB per program from L2 (1.2 MB over the grid, ~0.2-0.3 us);
    xproj_t 16 x 3072 x 2 B = 96 KiB over the grid (HBM, prefetchable); writes gates_t 96 KiB,
           cs_t 48 KiB, y_t 24 KiB, h_t 24 KiB.
    sync   one grid barrier (atomics in L2, ~0.5-1 us).
    => floor ~1.5 us per step, set by the barrier + L2 round trip + shared-memory re-read of the
       weight slice.  Next steps (not done): the 4 gate GEMMs as one N = 4 * block_u GEMM (one
       split-K reduction instead of 4, block_u = 8 -> 96 programs and half the per-program
       weight re-read), weights pinned in registers.
Backward per step: the same W_hh^T slice GEMM (dh_{t-1} = dgates_t @ W_hh over a slice of P) +
an exchange of dgates (B x 4H) through L2 and two grid barriers.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from . import _common as C
from ._common import tl, triton

GATES = 4

if triton is not None:
    sigmoid = C.sigmoid
    tanh = C.tanh
    grid_barrier = C.grid_barrier
    mma = C.mma
    mma_splitk = C.mma_splitk
    kidx_a = C.kidx_a
    kidx_b = C.kidx_b

    # ------------------------------------------------------------------------------ forward
    @triton.jit(do_not_specialize=["T", "B", "b_start", "s_begin", "s_end", "N_U"])
    def _lstm_fwd_kernel(
        xproj_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, len_ptr,
        y_ptr, gates_ptr, cs_ptr,
        hbuf_ptr,  # (2, B, P) xproj dtype: ping-pong, hbuf[s % 2] = h entering processing step s
        mbuf_ptr,  # (B, H) xproj dtype: m = o * tanh(c) exchange for the projection phase
        cst_ptr,  # (B, H) acc: cell state, read at start, written at the end
        sync_ptr, err_ptr,
        T, B, b_start, s_begin, s_end, N_U,
        H: tl.constexpr, P: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, KS_K: tl.constexpr, KS_H: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PROJ: tl.constexpr,
        REVERSE: tl.constexpr, PHASE_A: tl.constexpr, PHASE_B: tl.constexpr, SYNC: tl.constexpr,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, MAX_SPINS: tl.constexpr,
    ):
        G: tl.constexpr = 4 * H
        pid_b = tl.program_id(0)
        pid_u = tl.program_id(1)
        wdt = w_hh_ptr.dtype.element_ty
        odt = y_ptr.dtype.element_ty
        offs_b = b_start + pid_b * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
        mask_b = offs_b < B
        rows = offs_b.to(tl.int64)
        offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)  # [BU]
        mask_u = offs_u < H
        offs_k = tl.arange(0, BLOCK_K)  # [BK] over P
        mask_k = offs_k < P
        m_bu = mask_b[:, None] & mask_u[None, :]
        m_bk = mask_b[:, None] & mask_k[None, :]
        sync = sync_ptr + pid_b
        n_bar = 0

        if HAS_LENGTHS:
            lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)

        if PHASE_A:
            # W_hh^T slices [KS, BK / KS, BU] (split K), one per gate: on chip for the whole sequence
            ka = kidx_a(BLOCK_K, KS_K)  # [KS, 1, BKs]
            kb = kidx_b(BLOCK_K, KS_K)  # [KS, BKs, 1]
            wk_mask = (kb < P) & mask_u[None, None, :]
            w_base = w_hh_ptr + kb.to(tl.int64) + offs_u[None, None, :].to(tl.int64) * P
            m_h3 = mask_b[None, :, None] & (ka < P)  # [KS, BB, BKs]
            w_i = tl.load(w_base + 0 * H * P, mask=wk_mask, other=0.0)
            w_f = tl.load(w_base + 1 * H * P, mask=wk_mask, other=0.0)
            w_g = tl.load(w_base + 2 * H * P, mask=wk_mask, other=0.0)
            w_o = tl.load(w_base + 3 * H * P, mask=wk_mask, other=0.0)
            if HAS_BIAS:
                b_i = tl.load(b_hh_ptr + 0 * H + offs_u, mask=mask_u, other=0.0).to(ACC)
                b_f = tl.load(b_hh_ptr + 1 * H + offs_u, mask=mask_u, other=0.0).to(ACC)
                b_g = tl.load(b_hh_ptr + 2 * H + offs_u, mask=mask_u, other=0.0).to(ACC)
                b_o = tl.load(b_hh_ptr + 3 * H + offs_u, mask=mask_u, other=0.0).to(ACC)
            c_ptrs = cst_ptr + rows[:, None] * H + offs_u[None, :]
            c = tl.load(c_ptrs, mask=m_bu, other=0.0)  # [BB, BU] acc
        if HAS_PROJ:
            if PHASE_B:
                offs_p = pid_u * BLOCK_P + tl.arange(0, BLOCK_P)
                mask_p = offs_p < P
                kah = kidx_a(BLOCK_H, KS_H)
                kbh = kidx_b(BLOCK_H, KS_H)
                # W_hr^T slice [KS, BH / KS, BP]: h[:, p] = sum_j m[:, j] * w_hr[p, j]
                wr = tl.load(
                    w_hr_ptr + offs_p[None, None, :].to(tl.int64) * H + kbh,
                    mask=(kbh < H) & mask_p[None, None, :], other=0.0,
                )
                m_bp = mask_b[:, None] & mask_p[None, :]

        for s in range(s_begin, s_end):
            if REVERSE:
                t = T - 1 - s
            else:
                t = s
            par = s % 2
            t64 = t.to(tl.int64)
            h_cur = hbuf_ptr + par.to(tl.int64) * B * P
            h_nxt = hbuf_ptr + (1 - par).to(tl.int64) * B * P
            if HAS_LENGTHS:
                valid = (t < lens)[:, None]  # [BB, 1]
            else:
                valid = (offs_b >= 0)[:, None]
            if PHASE_A:
                h_prev = tl.load(
                    h_cur + rows[None, :, None] * P + ka, mask=m_h3, other=0.0, cache_modifier=".cg"
                ).to(wdt)  # [KS, BB, BKs]
                x_base = xproj_ptr + (t64 * B + rows)[:, None] * G + offs_u[None, :]
                pre_i = mma_splitk(h_prev, w_i, ACC, DOT_PRECISION, UPCAST)
                pre_f = mma_splitk(h_prev, w_f, ACC, DOT_PRECISION, UPCAST)
                pre_g = mma_splitk(h_prev, w_g, ACC, DOT_PRECISION, UPCAST)
                pre_o = mma_splitk(h_prev, w_o, ACC, DOT_PRECISION, UPCAST)
                pre_i += tl.load(x_base + 0 * H, mask=m_bu, other=0.0).to(ACC)
                pre_f += tl.load(x_base + 1 * H, mask=m_bu, other=0.0).to(ACC)
                pre_g += tl.load(x_base + 2 * H, mask=m_bu, other=0.0).to(ACC)
                pre_o += tl.load(x_base + 3 * H, mask=m_bu, other=0.0).to(ACC)
                if HAS_BIAS:
                    pre_i += b_i[None, :]
                    pre_f += b_f[None, :]
                    pre_g += b_g[None, :]
                    pre_o += b_o[None, :]
                gi = sigmoid(pre_i)
                gf = sigmoid(pre_f)
                gg = tanh(pre_g)
                go = sigmoid(pre_o)
                c_new = gf * c + gi * gg
                m = go * tanh(c_new)
                zero = tl.zeros_like(c_new)
                g_base = gates_ptr + (t64 * B + rows)[:, None] * G + offs_u[None, :]
                tl.store(g_base + 0 * H, tl.where(valid, gi, zero).to(odt), mask=m_bu)
                tl.store(g_base + 1 * H, tl.where(valid, gf, zero).to(odt), mask=m_bu)
                tl.store(g_base + 2 * H, tl.where(valid, gg, zero).to(odt), mask=m_bu)
                tl.store(g_base + 3 * H, tl.where(valid, go, zero).to(odt), mask=m_bu)
                tl.store(cs_ptr + (t64 * B + rows)[:, None] * H + offs_u[None, :], tl.where(valid, c_new, zero), mask=m_bu)
                c = tl.where(valid, c_new, c)
                if HAS_PROJ:
                    tl.store(mbuf_ptr + rows[:, None] * H + offs_u[None, :], m.to(wdt), mask=m_bu)
                else:
                    own = rows[:, None] * P + offs_u[None, :]
                    h_own = tl.load(h_cur + own, mask=m_bu, other=0.0, cache_modifier=".cg")
                    tl.store(h_nxt + own, tl.where(valid, m.to(wdt), h_own), mask=m_bu)
                    tl.store(y_ptr + (t64 * B + rows)[:, None] * P + offs_u[None, :], tl.where(valid, m, zero).to(odt), mask=m_bu)
            if HAS_PROJ:
                if SYNC:
                    n_bar += 1
                    grid_barrier(sync, n_bar * N_U, err_ptr, N_U, MAX_SPINS)
                if PHASE_B:
                    m_all = tl.load(
                        mbuf_ptr + rows[None, :, None] * H + kah,
                        mask=mask_b[None, :, None] & (kah < H), other=0.0, cache_modifier=".cg",
                    ).to(wdt)  # [KS, BB, BHs]
                    hp = mma_splitk(m_all, wr, ACC, DOT_PRECISION, UPCAST)  # [BB, BP]
                    own_p = rows[:, None] * P + offs_p[None, :]
                    h_own_p = tl.load(h_cur + own_p, mask=m_bp, other=0.0, cache_modifier=".cg")
                    tl.store(h_nxt + own_p, tl.where(valid, hp.to(wdt), h_own_p), mask=m_bp)
                    tl.store(
                        y_ptr + (t64 * B + rows)[:, None] * P + offs_p[None, :],
                        tl.where(valid, hp, tl.zeros_like(hp)).to(odt), mask=m_bp,
                    )
            if SYNC:
                n_bar += 1
                grid_barrier(sync, n_bar * N_U, err_ptr, N_U, MAX_SPINS)

        if PHASE_A:
            tl.store(c_ptrs, c, mask=m_bu)

    # ----------------------------------------------------------------------------- backward
    @triton.jit(do_not_specialize=["T", "B", "b_start", "r_begin", "r_end", "N_U"])
    def _lstm_bwd_kernel(
        dy_ptr, w_hh_ptr, w_hr_ptr, gates_ptr, cs_ptr, c0_ptr, len_ptr,
        dxproj_ptr, dhseq_ptr,
        dhbuf_ptr,  # (2, B, P) acc: ping-pong dh (gradient reaching the state h), [r % 2] entering step r
        dpbuf_ptr,  # (B, 4H) xproj dtype (a GEMM operand only): dgates exchange
        dcst_ptr,  # (B, H) acc: dc state, read at start, written at the end
        sync_ptr, err_ptr,
        T, B, b_start, r_begin, r_end, N_U,
        H: tl.constexpr, P: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, KS_K: tl.constexpr, KS_H: tl.constexpr,
        HAS_LENGTHS: tl.constexpr, HAS_PROJ: tl.constexpr,
        REVERSE: tl.constexpr, PHASE_A: tl.constexpr, PHASE_B: tl.constexpr, SYNC: tl.constexpr,
        ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, MAX_SPINS: tl.constexpr,
    ):
        G: tl.constexpr = 4 * H
        pid_b = tl.program_id(0)
        pid_u = tl.program_id(1)
        wdt = w_hh_ptr.dtype.element_ty
        odt = dxproj_ptr.dtype.element_ty
        offs_b = b_start + pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        rows = offs_b.to(tl.int64)
        sync = sync_ptr + pid_b
        n_bar = 0
        if HAS_LENGTHS:
            lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)

        if PHASE_A:
            offs_u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
            mask_u = offs_u < H
            m_bu = mask_b[:, None] & mask_u[None, :]
            bu = rows[:, None] * H + offs_u[None, :]
            dc_ptrs = dcst_ptr + bu
            dc = tl.load(dc_ptrs, mask=m_bu, other=0.0)  # [BB, BU] acc
            c_init = tl.load(c0_ptr + bu, mask=m_bu, other=0.0).to(ACC)
            if HAS_PROJ:
                ka = kidx_a(BLOCK_K, KS_K)
                kb = kidx_b(BLOCK_K, KS_K)
                m_h3 = mask_b[None, :, None] & (ka < P)
                # W_hr slice [KS, BK / KS, BU]: dm[:, u] = sum_p dh_tot[:, p] * w_hr[p, u]
                wr = tl.load(
                    w_hr_ptr + kb.to(tl.int64) * H + offs_u[None, None, :],
                    mask=(kb < P) & mask_u[None, None, :], other=0.0,
                )
        if PHASE_B:
            offs_p = pid_u * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            m_bp = mask_b[:, None] & mask_p[None, :]
            kah = kidx_a(BLOCK_H, KS_H)
            kbh = kidx_b(BLOCK_H, KS_H)
            m_bh = mask_b[None, :, None] & (kah < H)  # [KS, BB, BHs]
            # W_hh slices [KS, BH / KS, BP] per gate: dh[:, p] = sum_k sum_j dpre_k[:, j] * w_hh[k*H + j, p]
            wb_mask = (kbh < H) & mask_p[None, None, :]
            wb_base = w_hh_ptr + kbh.to(tl.int64) * P + offs_p[None, None, :]
            v_i = tl.load(wb_base + 0 * H * P, mask=wb_mask, other=0.0)
            v_f = tl.load(wb_base + 1 * H * P, mask=wb_mask, other=0.0)
            v_g = tl.load(wb_base + 2 * H * P, mask=wb_mask, other=0.0)
            v_o = tl.load(wb_base + 3 * H * P, mask=wb_mask, other=0.0)

        for r in range(r_begin, r_end):
            s = T - 1 - r  # forward processing index of this step
            if REVERSE:
                t = T - 1 - s
                t_prev = t + 1
            else:
                t = s
                t_prev = t - 1
            par = r % 2
            t64 = t.to(tl.int64)
            dh_cur = dhbuf_ptr + par.to(tl.int64) * B * P
            dh_nxt = dhbuf_ptr + (1 - par).to(tl.int64) * B * P
            if HAS_LENGTHS:
                vb = t < lens
                prev_ok = (s > 0) & (t_prev < lens)
            else:
                vb = offs_b >= 0
                prev_ok = (offs_b >= 0) & (s > 0)
            valid = vb[:, None]
            if PHASE_A:
                if HAS_PROJ:
                    dh_tot = tl.load(dh_cur + rows[None, :, None] * P + ka, mask=m_h3, other=0.0, cache_modifier=".cg")
                    dh_tot += tl.load(dy_ptr + (t64 * B + rows)[None, :, None] * P + ka, mask=m_h3, other=0.0).to(ACC)
                    dm = mma_splitk(dh_tot.to(wdt), wr, ACC, DOT_PRECISION, UPCAST)  # [BB, BU]
                else:
                    dm = tl.load(dh_cur + rows[:, None] * P + offs_u[None, :], mask=m_bu, other=0.0, cache_modifier=".cg")
                    dm += tl.load(dy_ptr + (t64 * B + rows)[:, None] * P + offs_u[None, :], mask=m_bu, other=0.0).to(ACC)
                g_base = gates_ptr + (t64 * B + rows)[:, None] * G + offs_u[None, :]
                gi = tl.load(g_base + 0 * H, mask=m_bu, other=0.0).to(ACC)
                gf = tl.load(g_base + 1 * H, mask=m_bu, other=0.0).to(ACC)
                gg = tl.load(g_base + 2 * H, mask=m_bu, other=0.0).to(ACC)
                go = tl.load(g_base + 3 * H, mask=m_bu, other=0.0).to(ACC)
                cc = tl.load(cs_ptr + (t64 * B + rows)[:, None] * H + offs_u[None, :], mask=m_bu, other=0.0).to(ACC)
                tp = tl.maximum(tl.minimum(t_prev, T - 1), 0).to(tl.int64)
                c_prev = tl.load(
                    cs_ptr + (tp * B + rows)[:, None] * H + offs_u[None, :],
                    mask=m_bu & prev_ok[:, None], other=0.0,
                ).to(ACC)
                c_prev = tl.where(prev_ok[:, None], c_prev, c_init)
                tc = tanh(cc)
                d_o = dm * tc
                dc_tot = dc + dm * go * (1.0 - tc * tc)
                zero = tl.zeros_like(dc_tot)
                dp_i = tl.where(valid, dc_tot * gg * gi * (1.0 - gi), zero)
                dp_f = tl.where(valid, dc_tot * c_prev * gf * (1.0 - gf), zero)
                dp_g = tl.where(valid, dc_tot * gi * (1.0 - gg * gg), zero)
                dp_o = tl.where(valid, d_o * go * (1.0 - go), zero)
                dx_base = dxproj_ptr + (t64 * B + rows)[:, None] * G + offs_u[None, :]
                tl.store(dx_base + 0 * H, dp_i.to(odt), mask=m_bu)
                tl.store(dx_base + 1 * H, dp_f.to(odt), mask=m_bu)
                tl.store(dx_base + 2 * H, dp_g.to(odt), mask=m_bu)
                tl.store(dx_base + 3 * H, dp_o.to(odt), mask=m_bu)
                dp_base = dpbuf_ptr + rows[:, None] * G + offs_u[None, :]
                tl.store(dp_base + 0 * H, dp_i.to(wdt), mask=m_bu)
                tl.store(dp_base + 1 * H, dp_f.to(wdt), mask=m_bu)
                tl.store(dp_base + 2 * H, dp_g.to(wdt), mask=m_bu)
                tl.store(dp_base + 3 * H, dp_o.to(wdt), mask=m_bu)
                dc = tl.where(valid, dc_tot * gf, dc)
            if SYNC:
                n_bar += 1
                grid_barrier(sync, n_bar * N_U, err_ptr, N_U, MAX_SPINS)
            if PHASE_B:
                q_base = dpbuf_ptr + rows[None, :, None] * G + kah
                # the 4 gate GEMMs accumulate into one split-K partial, reduced over warps once;
                # load -> GEMM per gate keeps one staged operand alive at a time
                q = tl.load(q_base + 0 * H, mask=m_bh, other=0.0, cache_modifier=".cg")
                dhn3 = mma(q, v_i, None, ACC, DOT_PRECISION, UPCAST)
                q = tl.load(q_base + 1 * H, mask=m_bh, other=0.0, cache_modifier=".cg")
                dhn3 = mma(q, v_f, dhn3, ACC, DOT_PRECISION, UPCAST)
                q = tl.load(q_base + 2 * H, mask=m_bh, other=0.0, cache_modifier=".cg")
                dhn3 = mma(q, v_g, dhn3, ACC, DOT_PRECISION, UPCAST)
                q = tl.load(q_base + 3 * H, mask=m_bh, other=0.0, cache_modifier=".cg")
                dhn3 = mma(q, v_o, dhn3, ACC, DOT_PRECISION, UPCAST)  # [KS, BB, BP]
                dhn = tl.sum(dhn3, axis=0)  # [BB, BP]
                own_p = rows[:, None] * P + offs_p[None, :]
                dh_own = tl.load(dh_cur + own_p, mask=m_bp, other=0.0, cache_modifier=".cg")
                tl.store(dh_nxt + own_p, tl.where(valid, dhn, dh_own), mask=m_bp)
                if HAS_PROJ:
                    dy_own = tl.load(dy_ptr + (t64 * B + rows)[:, None] * P + offs_p[None, :], mask=m_bp, other=0.0).to(ACC)
                    tl.store(
                        dhseq_ptr + (t64 * B + rows)[:, None] * P + offs_p[None, :],
                        tl.where(valid, dh_own + dy_own, tl.zeros_like(dh_own)).to(odt), mask=m_bp,
                    )
            if SYNC:
                n_bar += 1
                grid_barrier(sync, n_bar * N_U, err_ptr, N_U, MAX_SPINS)

        if PHASE_A:
            tl.store(dc_ptrs, dc, mask=m_bu)

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
def _acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _consts(variant, H, P, dt, has_lengths, has_proj, reverse, has_bias=None, precision=None, upcast=None):
    """Constexprs of the recurrence kernels (``has_bias`` None: the backward kernel)."""
    d = dict(
        H=H, P=P, BLOCK_B=variant.block_b, BLOCK_U=variant.block_u, BLOCK_K=variant.block_k,
        BLOCK_H=variant.block_h, BLOCK_P=variant.block_p, KS_K=variant.ksplit_k, KS_H=variant.ksplit_h,
        HAS_LENGTHS=bool(has_lengths), HAS_PROJ=bool(has_proj), REVERSE=bool(reverse), ACC=_acc_tl(dt),
        DOT_PRECISION=C.dot_precision(dt) if precision is None else precision,
        UPCAST=C.dot_upcast(dt) if upcast is None else upcast,
    )
    if has_bias is not None:
        d["HAS_BIAS"] = bool(has_bias)
    return d


def check_supported(H: int, P: int, dtype: torch.dtype, device) -> None:
    """Raise ValueError (naming the limit) when the kernels do not run this shape/device."""
    dev = torch.device(device)
    reason = C.unsupported_reason(GATES, H, P if P != H else 0, dtype, dev.type, dev)
    if reason is not None:
        raise ValueError(f"fusedrnn triton LSTM: {reason}")


def _phases(variant: C.Variant, has_proj: bool, backward: bool):
    """(PHASE_A, PHASE_B) per launch of one step; stepwise splits the phases over launches."""
    two = backward or has_proj
    if variant.mode == "stepwise" and two:
        return [(True, False), (False, True)]
    return [(True, two)]


def _launch_recurrence(kernel, name, variant, T, B, args, consts, has_proj, backward, device):
    """Launch ``kernel`` over the whole sequence per the variant; raise if the barrier failed."""
    if T == 0:
        return
    grid_u = variant.n_unit_progs
    chunk = variant.batch_per_launch
    for b_start in range(0, B, chunk):
        n_tiles = min(variant.n_batch_tiles, C.cdiv(B - b_start, variant.block_b))
        grid = (n_tiles, grid_u)
        if variant.mode == "stepwise":
            ranges = [(s, s + 1) for s in range(T)]
            sync_flag = False
        else:
            ranges = [(0, T)]
            sync_flag = True
        sync, err = C.new_sync_buffers(n_tiles, device)
        for s0, s1 in ranges:
            for pa, pb in _phases(variant, has_proj, backward):
                kernel[grid](
                    *args, sync, err, T, B, b_start, s0, s1, grid_u,
                    PHASE_A=pa, PHASE_B=pb, SYNC=sync_flag,
                    MAX_SPINS=C.MAX_SPIN, num_warps=variant.num_warps, num_stages=variant.num_stages,
                    **C.launch_options(variant), **consts,
                )
                C.count_launch(name)
        if sync_flag and grid_u > 1:
            C.check_error_flag(err, name)


def lstm_fwd(
    xproj: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, c0: Tensor,
    w_hr: Optional[Tensor], lengths: Optional[Tensor], reverse: bool,
):
    """Contract of ``reference.lstm_fwd``: returns (y, h_n, c_n, gates, cs)."""
    T, B, G = xproj.shape
    H = G // 4
    P = w_hh.shape[1]
    dt = xproj.dtype
    acc = C.acc_dtype(dt)
    check_supported(H, P, dt, xproj.device)
    variant = C.select_variant(GATES, H, P, B, dt, xproj.device)
    dev = xproj.device
    xproj = xproj.contiguous()
    w = w_hh.to(dt).contiguous()
    wr = w_hr.to(dt).contiguous() if w_hr is not None else None
    bias = b_hh.contiguous() if b_hh is not None else None
    lens = lengths.to(device=dev, dtype=torch.int64).contiguous() if lengths is not None else None
    y = torch.empty(T, B, P, dtype=dt, device=dev)
    gates = torch.empty(T, B, G, dtype=dt, device=dev)
    cs = torch.empty(T, B, H, dtype=acc, device=dev)
    hbuf = torch.empty(2, B, P, dtype=dt, device=dev)  # h in xproj dtype: what y / h_n store anyway
    hbuf[0].copy_(h0)
    hbuf[1].zero_()
    cst = c0.to(acc).clone().contiguous()
    mbuf = torch.zeros(B, H, dtype=dt, device=dev) if wr is not None else hbuf  # unused without proj
    dummy = cst
    args = (
        xproj, w, bias if bias is not None else dummy, wr if wr is not None else w, lens if lens is not None else dummy,
        y, gates, cs, hbuf, mbuf, cst,
    )
    consts = _consts(variant, H, P, dt, lens is not None, wr is not None, reverse, has_bias=bias is not None)
    _launch_recurrence(_lstm_fwd_kernel, "lstm_fwd", variant, T, B, args, consts, wr is not None, False, dev)
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
    variant = C.select_variant(GATES, H, P, B, dt, dev)
    w = w_hh.to(dt).contiguous()
    wr = w_hr.to(dt).contiguous() if w_hr is not None else None
    lens = lengths.to(device=dev, dtype=torch.int64).contiguous() if lengths is not None else None
    dxproj = torch.empty(T, B, G, dtype=dt, device=dev)
    dh_seq = torch.empty(T, B, P, dtype=dt, device=dev) if wr is not None else torch.empty(0, dtype=dt, device=dev)
    dhbuf = torch.empty(2, B, P, dtype=acc, device=dev)
    dhbuf[0].copy_(dh_n)
    dhbuf[1].zero_()
    dpbuf = torch.zeros(B, G, dtype=dt, device=dev)
    dcst = dc_n.to(acc).clone().contiguous()
    args = (
        dy.contiguous(), w, wr if wr is not None else w, gates.contiguous(), cs.contiguous(), c0.contiguous(),
        lens if lens is not None else dcst, dxproj, dh_seq if wr is not None else dxproj, dhbuf, dpbuf, dcst,
    )
    consts = _consts(variant, H, P, dt, lens is not None, wr is not None, reverse)
    _launch_recurrence(_lstm_bwd_kernel, "lstm_bwd", variant, T, B, args, consts, wr is not None, True, dev)
    if T == 0:
        dh0 = dh_n.clone()
        dc0 = dc_n.clone()
    else:
        dh0 = dhbuf[T % 2].to(dt)
        dc0 = dcst.to(dt)
    return dxproj, dh0, dc0, dh_seq


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
            HAS_BIH=b_ih is not None, HAS_BHH=b_hh is not None, ACC=_acc_tl(dt), BLOCK=_CELL_BLOCK,
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
            dgates, dc, N, H, ACC=_acc_tl(dt), BLOCK=_CELL_BLOCK,
        )
        C.count_launch("lstm_cell_bwd")
    return dgates, dc


# ================================================================================ AOT variants
def aot_variants(capability: int) -> list:
    """Every kernel variant the selection rule can pick, at representative sizes up to the limit,
    as ``_common.aot_spec`` dicts for ``tools/triton_aot.py`` (compiled for ``capability``)."""
    info = C.AOT_TARGETS[capability]
    specs = []
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        ty = C.TL_NAMES[dt]
        aty = C.TL_NAMES[C.acc_dtype(dt)]
        limit = C.max_hidden_size(GATES, dt, info=info)
        # largest H that still runs in one program, then split sizes up to the limit
        single_max = max(h for h in range(1, limit + 1) if C.select_variant(GATES, h, h, 16, dt, info=info, interpret=False).mode == "single")
        mid = min(768, limit)
        proj_h = max(h for h in (2**k for k in range(4, 16)) if h <= limit and C.supports(GATES, h, h // 2, dt, info))
        sizes = sorted({(37, 37), (single_max, single_max), (single_max + 1, single_max + 1), (min(512, limit), min(512, limit)),
                        (mid, mid), (limit, limit), (proj_h, proj_h // 2)})
        seen = set()
        for H, P in sizes:
            for B in (16, 64, 256):  # larger batches change block_b / block_u; duplicates are skipped
                v = C.select_variant(GATES, H, P, B, dt, info=info, interpret=False)
                key = (H, P, dataclasses.replace(v, n_batch_tiles=0))  # compile-relevant fields only
                if key in seen:
                    continue
                seen.add(key)
                for precision in (("ieee", "tf32") if dt == torch.float32 else ("ieee",)):
                    proj = P != H
                    fwd_ptrs = dict(
                        xproj_ptr=ty, w_hh_ptr=ty, b_hh_ptr=ty, w_hr_ptr=ty, len_ptr="i64", y_ptr=ty, gates_ptr=ty,
                        cs_ptr=aty, hbuf_ptr=ty, mbuf_ptr=ty, cst_ptr=aty, sync_ptr="i32", err_ptr="i32",
                    )
                    bwd_ptrs = dict(
                        dy_ptr=ty, w_hh_ptr=ty, w_hr_ptr=ty, gates_ptr=ty, cs_ptr=aty, c0_ptr=ty, len_ptr="i64",
                        dxproj_ptr=ty, dhseq_ptr=ty, dhbuf_ptr=aty, dpbuf_ptr=ty, dcst_ptr=aty, sync_ptr="i32", err_ptr="i32",
                    )
                    tag = f"{ty} H={H} P={P} B={B} {v.mode} u={v.block_u} b={v.block_b}" + (" tf32" if precision == "tf32" else "")
                    # stepwise is only picked under the interpreter: compile it once per dtype (smallest split)
                    stepwise = v.mode == "persistent" and H == single_max + 1 and B == 16
                    for mode in (v.mode, "stepwise") if stepwise else (v.mode,):
                        vv = dataclasses.replace(v, mode=mode)
                        for direction in ("fwd", "bwd"):
                            phases = _phases(vv, proj, direction == "bwd")
                            for pa, pb in phases:
                                c = _consts(vv, H, P, dt, True, proj, False, has_bias=True if direction == "fwd" else None, precision=precision, upcast=False)
                                c.update(PHASE_A=pa, PHASE_B=pb, SYNC=mode != "stepwise", MAX_SPINS=C.MAX_SPIN)
                                fn = _lstm_fwd_kernel if direction == "fwd" else _lstm_bwd_kernel
                                ptrs = fwd_ptrs if direction == "fwd" else bwd_ptrs
                                ph = "" if mode != "stepwise" else (" A" if pa and not pb else (" B" if pb and not pa else " AB"))
                                specs.append(C.aot_spec(f"lstm_{direction} {tag}{' stepwise' + ph if mode == 'stepwise' else ''}", fn, ptrs, c, vv.num_warps, vv.num_stages))
        for name, fn, ptrs, consts in (
            ("lstm_cell_fwd", _lstm_cell_fwd_kernel,
             dict(ig_ptr=ty, hg_ptr=ty, bih_ptr=ty, bhh_ptr=ty, c_ptr=ty, h_out=ty, c_out=ty, g_out=ty),
             dict(HAS_BIH=True, HAS_BHH=True, ACC=_acc_tl(dt), BLOCK=_CELL_BLOCK)),
            ("lstm_cell_bwd", _lstm_cell_bwd_kernel,
             dict(dh_ptr=ty, dc_ptr=ty, c_ptr=ty, cn_ptr=ty, g_ptr=ty, dg_out=ty, dc_out=ty),
             dict(ACC=_acc_tl(dt), BLOCK=_CELL_BLOCK)),
        ):
            specs.append(C.aot_spec(f"{name} {ty}", fn, ptrs, consts, 4))
    return specs
