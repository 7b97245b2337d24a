// LSTM recurrence and cell on CPU.  Per step: one GEMM on the whole batch (h_{t-1} @ W_hh^T via
// at::mm_out, BLAS-threaded), then one fused pass over the B x H units (bias add, activations,
// state update, masked stores; at::parallel_for).  Math and states in the accumulation dtype
// (float for fp32/bf16/fp16, double for fp64), exactly as python/fusedrnn/backends/reference.py.
#include <ATen/Dispatch.h>

#include "common.h"
#include "simd.h"
#include "fusedrnn/ops.h"

namespace fusedrnn {
namespace {

using cpu::host_lengths;
using cpu::parallel_units;

// h (B, P) and c (B, H) are the running states in acc dtype, updated in place.
template <typename scalar_t>
void lstm_fwd_loop(const Tensor& xproj, const Tensor& w, const Tensor& bias, const Tensor& wr, const Tensor& h,
                   const Tensor& c, const std::vector<int64_t>& len, bool reverse, const Tensor& y,
                   const Tensor& gates, const Tensor& cs) {
  using acc = acc_t<scalar_t>;
  using V = cpu::PackOf<acc>;
  const int64_t T = xproj.size(0), B = xproj.size(1), G = xproj.size(2), H = G / 4, P = w.size(1);
  const bool proj = wr.defined();
  const auto aopt = h.options();
  Tensor hp = at::empty({B, G}, aopt);                         // h_{t-1} @ W_hh^T
  Tensor m = proj ? at::empty({B, H}, aopt) : Tensor();        // o * tanh(c) before projection
  Tensor hproj = proj ? at::empty({B, P}, aopt) : Tensor();    // m @ W_hr^T
  const Tensor wT = w.t(), wrT = proj ? wr.t() : Tensor();

  const scalar_t* x_all = xproj.data_ptr<scalar_t>();
  const acc* bias_p = cpu::ptr_or_null<acc>(bias);
  const acc* hp_p = hp.data_ptr<acc>();
  acc* h_p = h.data_ptr<acc>();
  acc* c_p = c.data_ptr<acc>();
  acc* m_p = proj ? m.data_ptr<acc>() : nullptr;
  scalar_t* y_all = y.data_ptr<scalar_t>();
  scalar_t* gates_all = gates.data_ptr<scalar_t>();
  acc* cs_all = cs.data_ptr<acc>();

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    at::mm_out(hp, h, wT);
    const scalar_t* x_t = x_all + t * B * G;
    scalar_t* y_t = y_all + t * B * P;
    scalar_t* gates_t = gates_all + t * B * G;
    acc* cs_t = cs_all + t * B * H;
    parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      const scalar_t* xb = x_t + b * G;
      const acc* hpb = hp_p + b * G;
      scalar_t* gb = gates_t + b * G;
      if (t >= len[b]) {  // padded step: state unchanged, zeros out
        for (int64_t j = j0; j < j1; ++j) {
          gb[j] = gb[H + j] = gb[2 * H + j] = gb[3 * H + j] = scalar_t(0);
          cs_t[b * H + j] = acc(0);
          if (!proj) y_t[b * P + j] = scalar_t(0);
        }
        return;
      }
      for (int64_t j = j0; j < j1; j += V::kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(V::kLanes, j1 - j));
        V pre[4];
        for (int k = 0; k < 4; ++k) {
          const int64_t q = k * H + j;
          pre[k] = cpu::load<V>(xb + q, n) + cpu::load<V>(hpb + q, n) + cpu::load_or_zero<V>(bias_p ? bias_p + q : nullptr, n);
        }
        const auto st = lstm_cell_forward<V>(pre[0], pre[1], pre[2], pre[3], cpu::load<V>(c_p + b * H + j, n));
        cpu::store(gb + j, st.i, n);
        cpu::store(gb + H + j, st.f, n);
        cpu::store(gb + 2 * H + j, st.g, n);
        cpu::store(gb + 3 * H + j, st.o, n);
        cpu::store(cs_t + b * H + j, st.c, n);
        cpu::store(c_p + b * H + j, st.c, n);
        if (proj) {
          cpu::store(m_p + b * H + j, st.h, n);
        } else {
          cpu::store(h_p + b * P + j, st.h, n);
          cpu::store(y_t + b * P + j, st.h, n);
        }
      }
    });
    if (proj) {
      at::mm_out(hproj, m, wrT);
      const acc* hq = hproj.data_ptr<acc>();
      parallel_units(B, P, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool valid = t < len[b];
        for (int64_t j = j0; j < j1; ++j) {
          if (valid) h_p[b * P + j] = hq[b * P + j];
          y_t[b * P + j] = valid ? static_cast<scalar_t>(hq[b * P + j]) : scalar_t(0);
        }
      });
    }
  }
}

// dh (B, P) and dc (B, H): running gradients in acc dtype, updated in place.
template <typename scalar_t>
void lstm_bwd_loop(const Tensor& dy, const Tensor& w, const Tensor& wr, const Tensor& c0, const Tensor& gates,
                   const Tensor& cs, const std::vector<int64_t>& len, bool reverse, const Tensor& dh,
                   const Tensor& dc, const Tensor& dxproj, const Tensor& dh_seq) {
  using acc = acc_t<scalar_t>;
  using V = cpu::PackOf<acc>;
  const int64_t T = gates.size(0), B = gates.size(1), G = gates.size(2), H = G / 4, P = w.size(1);
  const bool proj = wr.defined();
  const auto aopt = dh.options();
  Tensor dpre = at::empty({B, G}, aopt);                    // gradient of the pre-activations
  Tensor dh_new = at::empty({B, P}, aopt);                  // dpre @ W_hh
  Tensor dm = proj ? at::empty({B, H}, aopt) : dh;          // gradient of o * tanh(c)

  const scalar_t* dy_all = dy.data_ptr<scalar_t>();
  const scalar_t* gates_all = gates.data_ptr<scalar_t>();
  const acc* cs_all = cs.data_ptr<acc>();
  const acc* c0_p = c0.data_ptr<acc>();
  acc* dh_p = dh.data_ptr<acc>();
  acc* dc_p = dc.data_ptr<acc>();
  acc* dpre_p = dpre.data_ptr<acc>();
  const acc* dhn_p = dh_new.data_ptr<acc>();
  scalar_t* dx_all = dxproj.data_ptr<scalar_t>();
  scalar_t* dhs_all = proj ? dh_seq.data_ptr<scalar_t>() : nullptr;

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
    const scalar_t* dy_t = dy_all + t * B * P;
    // dh <- dh + dy_t on valid rows: the total gradient reaching h_t.  Padded rows keep dh (their
    // results below are discarded).
    parallel_units(B, P, [&](int64_t b, int64_t j0, int64_t j1) {
      const bool valid = t < len[b];
      for (int64_t j = j0; j < j1; ++j) {
        if (valid) dh_p[b * P + j] += static_cast<acc>(dy_t[b * P + j]);
        if (proj) dhs_all[(t * B + b) * P + j] = valid ? static_cast<scalar_t>(dh_p[b * P + j]) : scalar_t(0);
      }
    });
    if (proj) at::mm_out(dm, dh, wr);
    const acc* dm_p = dm.data_ptr<acc>();
    const scalar_t* g_t = gates_all + t * B * G;
    const acc* cs_t = cs_all + t * B * H;
    scalar_t* dx_t = dx_all + t * B * G;
    parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      acc* dpb = dpre_p + b * G;
      scalar_t* dxb = dx_t + b * G;
      if (t >= len[b]) {
        for (int64_t j = j0; j < j1; ++j) {
          for (int k = 0; k < 4; ++k) {
            dpb[k * H + j] = acc(0);
            dxb[k * H + j] = scalar_t(0);
          }
        }
        return;
      }
      // c_{t-1}: the neighbouring step in the forward's order, or c0 at the sequence's first step.
      const acc* c_prev;
      if (!reverse) {
        c_prev = t > 0 ? cs_all + (t - 1) * B * H + b * H : c0_p + b * H;
      } else {
        c_prev = (t + 1 < T && t + 1 < len[b]) ? cs_all + (t + 1) * B * H + b * H : c0_p + b * H;
      }
      const scalar_t* gb = g_t + b * G;
      for (int64_t j = j0; j < j1; j += V::kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(V::kLanes, j1 - j));
        const auto d = lstm_cell_backward<V>(
            cpu::load<V>(gb + j, n), cpu::load<V>(gb + H + j, n), cpu::load<V>(gb + 2 * H + j, n),
            cpu::load<V>(gb + 3 * H + j, n), cpu::load<V>(cs_t + b * H + j, n), cpu::load<V>(c_prev + j, n),
            cpu::load<V>(dm_p + b * H + j, n), cpu::load<V>(dc_p + b * H + j, n));
        const V dk[4] = {d.d_i, d.d_f, d.d_g, d.d_o};
        for (int k = 0; k < 4; ++k) {
          cpu::store(dpb + k * H + j, dk[k], n);
          cpu::store(dxb + k * H + j, dk[k], n);
        }
        cpu::store(dc_p + b * H + j, d.dc_prev, n);
      }
    });
    at::mm_out(dh_new, dpre, w);
    parallel_units(B, P, [&](int64_t b, int64_t j0, int64_t j1) {
      if (t >= len[b]) return;
      for (int64_t j = j0; j < j1; ++j) dh_p[b * P + j] = dhn_p[b * P + j];
    });
  }
}

template <typename scalar_t>
void lstm_cell_fwd_loop(const Tensor& igates, const Tensor& hgates, const Tensor& b_ih, const Tensor& b_hh,
                        const Tensor& c, const Tensor& h_new, const Tensor& c_new, const Tensor& gates) {
  using acc = acc_t<scalar_t>;
  using V = cpu::PackOf<acc>;
  const int64_t B = igates.size(0), G = igates.size(1), H = G / 4;
  const scalar_t* xi = igates.data_ptr<scalar_t>();
  const scalar_t* xh = hgates.data_ptr<scalar_t>();
  const acc* bi = cpu::ptr_or_null<acc>(b_ih);
  const acc* bh = cpu::ptr_or_null<acc>(b_hh);
  const acc* c_p = c.data_ptr<acc>();
  scalar_t* h_o = h_new.data_ptr<scalar_t>();
  scalar_t* c_o = c_new.data_ptr<scalar_t>();
  scalar_t* g_o = gates.data_ptr<scalar_t>();
  parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j += V::kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(V::kLanes, j1 - j));
      V pre[4];
      for (int k = 0; k < 4; ++k) {
        const int64_t q = k * H + j;
        pre[k] = cpu::load<V>(xi + b * G + q, n) + cpu::load<V>(xh + b * G + q, n) +
                 cpu::load_or_zero<V>(bi ? bi + q : nullptr, n) + cpu::load_or_zero<V>(bh ? bh + q : nullptr, n);
      }
      const auto st = lstm_cell_forward<V>(pre[0], pre[1], pre[2], pre[3], cpu::load<V>(c_p + b * H + j, n));
      scalar_t* gb = g_o + b * G;
      cpu::store(gb + j, st.i, n);
      cpu::store(gb + H + j, st.f, n);
      cpu::store(gb + 2 * H + j, st.g, n);
      cpu::store(gb + 3 * H + j, st.o, n);
      cpu::store(c_o + b * H + j, st.c, n);
      cpu::store(h_o + b * H + j, st.h, n);
    }
  });
}

template <typename scalar_t>
void lstm_cell_bwd_loop(const Tensor& dh_new, const Tensor& dc_new, const Tensor& c, const Tensor& c_new,
                        const Tensor& gates, const Tensor& dgates, const Tensor& dc) {
  using acc = acc_t<scalar_t>;
  using V = cpu::PackOf<acc>;
  const int64_t B = gates.size(0), G = gates.size(1), H = G / 4;
  const acc* dh_p = dh_new.data_ptr<acc>();
  const acc* dcn_p = dc_new.data_ptr<acc>();
  const acc* c_p = c.data_ptr<acc>();
  const acc* cn_p = c_new.data_ptr<acc>();
  const scalar_t* g_p = gates.data_ptr<scalar_t>();
  scalar_t* dg_o = dgates.data_ptr<scalar_t>();
  scalar_t* dc_o = dc.data_ptr<scalar_t>();
  parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
    const scalar_t* gb = g_p + b * G;
    scalar_t* db = dg_o + b * G;
    for (int64_t j = j0; j < j1; j += V::kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(V::kLanes, j1 - j));
      const int64_t u = b * H + j;
      const auto d = lstm_cell_backward<V>(cpu::load<V>(gb + j, n), cpu::load<V>(gb + H + j, n),
                                           cpu::load<V>(gb + 2 * H + j, n), cpu::load<V>(gb + 3 * H + j, n),
                                           cpu::load<V>(cn_p + u, n), cpu::load<V>(c_p + u, n),
                                           cpu::load<V>(dh_p + u, n), cpu::load<V>(dcn_p + u, n));
      cpu::store(db + j, d.d_i, n);
      cpu::store(db + H + j, d.d_f, n);
      cpu::store(db + 2 * H + j, d.d_g, n);
      cpu::store(db + 3 * H + j, d.d_o, n);
      cpu::store(dc_o + u, d.dc_prev, n);
    }
  });
}

}  // namespace

Tensor5 lstm_fwd_cpu(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                     const Tensor& c0, const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                     bool /*allow_tf32: no TF32 on CPU*/, bool save) {
  cpu::check_cpu(xproj, "xproj");
  const checks::Dims d = checks::lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths);
  const int64_t T = d.T, B = d.B, H = d.H, G = 4 * H, P = d.P;

  const auto acc = cpu::acc_scalar_type(xproj.scalar_type());
  const Tensor w = w_hh.to(acc).contiguous();
  const Tensor bias = cpu::acc_or_undefined(b_hh, acc);
  const Tensor wr = cpu::acc_or_undefined(w_hr, acc);
  Tensor h = cpu::acc_copy(h0, acc);
  Tensor c = cpu::acc_copy(c0, acc);
  const auto len = host_lengths(lengths, T, B);
  const Tensor x = xproj.contiguous();
  Tensor y = at::empty({T, B, P}, xproj.options());
  Tensor gates = at::empty({T, B, G}, xproj.options());
  Tensor cs = at::empty({T, B, H}, xproj.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xproj.scalar_type(), "fusedrnn_lstm_fwd_cpu", [&] {
    lstm_fwd_loop<scalar_t>(x, w, bias, wr, h, c, len, reverse, y, gates, cs);
  });
  if (!save) {  // inference: the saved tensors are computed here but not returned (op contract)
    gates = at::empty({0}, xproj.options());
    cs = at::empty({0}, xproj.options().dtype(acc));
  }
  return {y, h.to(xproj.scalar_type()), c.to(xproj.scalar_type()), gates, cs};
}

Tensor4 lstm_bwd_cpu(const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w_hh,
                     const OptTensor& w_hr, const Tensor& c0, const Tensor& gates, const Tensor& cs,
                     const OptTensor& lengths, bool reverse, bool /*allow_tf32*/) {
  cpu::check_cpu(gates, "gates");
  const checks::Dims d = checks::lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths);
  const int64_t T = d.T, B = d.B, H = d.H, G = 4 * H, P = d.P;
  const bool proj = checks::defined(w_hr);
  cpu::check_same_dtype(gates, dy, "gates");

  const auto acc = cpu::acc_scalar_type(dy.scalar_type());
  const Tensor w = w_hh.to(acc).contiguous();
  const Tensor wr = cpu::acc_or_undefined(w_hr, acc);
  const Tensor c0a = c0.to(acc).contiguous();
  const Tensor csa = cs.to(acc).contiguous();
  Tensor dh = cpu::acc_copy(dh_n, acc);
  Tensor dc = cpu::acc_copy(dc_n, acc);
  const auto len = host_lengths(lengths, T, B);
  const Tensor dyc = dy.contiguous(), gc = gates.contiguous();
  Tensor dxproj = at::empty({T, B, G}, dy.options());
  Tensor dh_seq = proj ? at::empty({T, B, P}, dy.options()) : at::empty({0}, dy.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "fusedrnn_lstm_bwd_cpu", [&] {
    lstm_bwd_loop<scalar_t>(dyc, w, wr, c0a, gc, csa, len, reverse, dh, dc, dxproj, dh_seq);
  });
  return {dxproj, dh.to(dy.scalar_type()), dc.to(dy.scalar_type()), dh_seq};
}

Tensor3 lstm_cell_fwd_cpu(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih, const OptTensor& b_hh,
                          const Tensor& c) {
  cpu::check_cpu(igates, "igates");
  const checks::Dims d = checks::lstm_cell_fwd(igates, hgates, b_ih, b_hh, c);
  const int64_t B = d.B, H = d.H, G = 4 * H;
  cpu::check_same_dtype(hgates, igates, "hgates");
  const auto acc = cpu::acc_scalar_type(igates.scalar_type());
  const Tensor bi = cpu::acc_or_undefined(b_ih, acc), bh = cpu::acc_or_undefined(b_hh, acc);
  const Tensor ca = c.to(acc).contiguous();
  const Tensor xi = igates.contiguous(), xh = hgates.contiguous();
  Tensor h_new = at::empty({B, H}, igates.options());
  Tensor c_new = at::empty({B, H}, igates.options());
  Tensor gates = at::empty({B, G}, igates.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, igates.scalar_type(), "fusedrnn_lstm_cell_fwd_cpu", [&] {
    lstm_cell_fwd_loop<scalar_t>(xi, xh, bi, bh, ca, h_new, c_new, gates);
  });
  return {h_new, c_new, gates};
}

Tensor2 lstm_cell_bwd_cpu(const Tensor& dh_new, const Tensor& dc_new, const Tensor& c, const Tensor& c_new,
                          const Tensor& gates) {
  cpu::check_cpu(gates, "gates");
  const checks::Dims d = checks::lstm_cell_bwd(dh_new, dc_new, c, c_new, gates);
  const int64_t B = d.B, H = d.H, G = 4 * H;
  const auto acc = cpu::acc_scalar_type(gates.scalar_type());
  const Tensor dha = dh_new.to(acc).contiguous(), dca = dc_new.to(acc).contiguous();
  const Tensor ca = c.to(acc).contiguous(), cna = c_new.to(acc).contiguous();
  const Tensor gc = gates.contiguous();
  Tensor dgates = at::empty({B, G}, gates.options());
  Tensor dc = at::empty({B, H}, gates.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "fusedrnn_lstm_cell_bwd_cpu", [&] {
    lstm_cell_bwd_loop<scalar_t>(dha, dca, ca, cna, gc, dgates, dc);
  });
  return {dgates, dc};
}

}  // namespace fusedrnn
