// GRU recurrence and cell on CPU: per step one GEMM on the whole batch (h_{t-1} @ W_hh^T), then
// one fused pass over the B x H units.  Same structure and semantics as csrc/cpu/lstm.cpp.
#include <ATen/Dispatch.h>

#include "common.h"
#include "simd.h"
#include "fusedrnn/ops.h"

namespace fusedrnn {
namespace {

using cpu::host_lengths;
using cpu::parallel_units;

// h (B, H): running state in acc dtype, updated in place.
template <typename scalar_t>
void gru_fwd_loop(const Tensor& xproj, const Tensor& w, const Tensor& bias, const Tensor& h,
                  const std::vector<int64_t>& len, bool reverse, const Tensor& y, const Tensor& gates) {
  using acc = acc_t<scalar_t>;
  using V = cpu::PackOf<acc>;
  const int64_t T = xproj.size(0), B = xproj.size(1), G = xproj.size(2), H = G / 3;
  Tensor hp = at::empty({B, G}, h.options());  // h_{t-1} @ W_hh^T
  const Tensor wT = w.t();
  const scalar_t* x_all = xproj.data_ptr<scalar_t>();
  const acc* bias_p = cpu::ptr_or_null<acc>(bias);
  const acc* hp_p = hp.data_ptr<acc>();
  acc* h_p = h.data_ptr<acc>();
  scalar_t* y_all = y.data_ptr<scalar_t>();
  scalar_t* gates_all = gates.data_ptr<scalar_t>();

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    at::mm_out(hp, h, wT);
    const scalar_t* x_t = x_all + t * B * G;
    scalar_t* y_t = y_all + t * B * H;
    scalar_t* gates_t = gates_all + t * B * 4 * H;
    parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      scalar_t* gb = gates_t + b * 4 * H;
      if (t >= len[b]) {  // padded step: state unchanged, zeros out
        for (int64_t j = j0; j < j1; ++j) {
          gb[j] = gb[H + j] = gb[2 * H + j] = gb[3 * H + j] = scalar_t(0);
          y_t[b * H + j] = scalar_t(0);
        }
        return;
      }
      const scalar_t* xb = x_t + b * G;
      const acc* hpb = hp_p + b * G;
      for (int64_t j = j0; j < j1; j += V::kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(V::kLanes, j1 - j));
        V hid[3];
        for (int k = 0; k < 3; ++k) {
          hid[k] = cpu::load<V>(hpb + k * H + j, n) + cpu::load_or_zero<V>(bias_p ? bias_p + k * H + j : nullptr, n);
        }
        const auto st = gru_cell_forward<V>(cpu::load<V>(xb + j, n), cpu::load<V>(xb + H + j, n),
                                            cpu::load<V>(xb + 2 * H + j, n), hid[0], hid[1], hid[2],
                                            cpu::load<V>(h_p + b * H + j, n));
        cpu::store(gb + j, st.r, n);
        cpu::store(gb + H + j, st.z, n);
        cpu::store(gb + 2 * H + j, st.n, n);
        cpu::store(gb + 3 * H + j, hid[2], n);
        cpu::store(h_p + b * H + j, st.h, n);
        cpu::store(y_t + b * H + j, st.h, n);
      }
    });
  }
}

// dh (B, H): running gradient in acc dtype, updated in place.  h_{t-1} is read back from y (the
// forward's rounded outputs) and h0, as the reference does.
template <typename scalar_t>
void gru_bwd_loop(const Tensor& dy, const Tensor& w, const Tensor& h0, const Tensor& y, const Tensor& gates,
                  const std::vector<int64_t>& len, bool reverse, const Tensor& dh, const Tensor& dxproj,
                  const Tensor& dhn_seq) {
  using acc = acc_t<scalar_t>;
  using V = cpu::PackOf<acc>;
  const int64_t T = gates.size(0), B = gates.size(1), H = gates.size(2) / 4, G = 3 * H;
  Tensor dhp = at::empty({B, G}, dh.options());     // gradient of h_{t-1} @ W_hh^T + b_hh
  Tensor dh_new = at::empty({B, H}, dh.options());  // dhp @ W_hh
  const scalar_t* dy_all = dy.data_ptr<scalar_t>();
  const scalar_t* y_all = y.data_ptr<scalar_t>();
  const scalar_t* gates_all = gates.data_ptr<scalar_t>();
  const acc* h0_p = h0.data_ptr<acc>();
  acc* dh_p = dh.data_ptr<acc>();
  acc* dhp_p = dhp.data_ptr<acc>();
  const acc* dhn_p = dh_new.data_ptr<acc>();
  scalar_t* dx_all = dxproj.data_ptr<scalar_t>();
  scalar_t* dhs_all = dhn_seq.data_ptr<scalar_t>();

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? s : T - 1 - s;  // the forward's steps, last first
    const scalar_t* dy_t = dy_all + t * B * H;
    const scalar_t* g_t = gates_all + t * B * 4 * H;
    scalar_t* dx_t = dx_all + t * B * G;
    scalar_t* dhs_t = dhs_all + t * B * H;
    parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      acc* dpb = dhp_p + b * G;
      scalar_t* dxb = dx_t + b * G;
      if (t >= len[b]) {
        for (int64_t j = j0; j < j1; ++j) {
          for (int k = 0; k < 3; ++k) {
            dpb[k * H + j] = acc(0);
            dxb[k * H + j] = scalar_t(0);
          }
          dhs_t[b * H + j] = scalar_t(0);
        }
        return;
      }
      // h_{t-1}: the neighbouring step in the forward's order, or h0 at the sequence's first step.
      const scalar_t* y_prev = nullptr;
      if (!reverse) {
        if (t > 0) y_prev = y_all + (t - 1) * B * H + b * H;
      } else if (t + 1 < T && t + 1 < len[b]) {
        y_prev = y_all + (t + 1) * B * H + b * H;
      }
      const scalar_t* gb = g_t + b * 4 * H;
      for (int64_t j = j0; j < j1; j += V::kLanes) {
        const int n = static_cast<int>(std::min<int64_t>(V::kLanes, j1 - j));
        const int64_t u = b * H + j;
        const V h_prev = y_prev ? cpu::load<V>(y_prev + j, n) : cpu::load<V>(h0_p + u, n);
        const V dh_tot = cpu::load<V>(dh_p + u, n) + cpu::load<V>(dy_t + u, n);
        const auto d = gru_cell_backward<V>(cpu::load<V>(gb + j, n), cpu::load<V>(gb + H + j, n),
                                            cpu::load<V>(gb + 2 * H + j, n), cpu::load<V>(gb + 3 * H + j, n),
                                            h_prev, dh_tot);
        cpu::store(dpb + j, d.d_r, n);
        cpu::store(dpb + H + j, d.d_z, n);
        cpu::store(dpb + 2 * H + j, d.d_hid_n, n);
        cpu::store(dxb + j, d.d_r, n);
        cpu::store(dxb + H + j, d.d_z, n);
        cpu::store(dxb + 2 * H + j, d.d_n, n);
        cpu::store(dhs_t + u, d.d_hid_n, n);
        cpu::store(dh_p + u, d.dh_prev_direct, n);  // + dhp @ W_hh below
      }
    });
    at::mm_out(dh_new, dhp, w);
    parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
      if (t >= len[b]) return;
      for (int64_t j = j0; j < j1; ++j) dh_p[b * H + j] += dhn_p[b * H + j];
    });
  }
}

template <typename scalar_t>
void gru_cell_fwd_loop(const Tensor& igates, const Tensor& hgates, const Tensor& b_ih, const Tensor& b_hh,
                       const Tensor& h, const Tensor& h_new, const Tensor& gates) {
  using acc = acc_t<scalar_t>;
  using V = cpu::PackOf<acc>;
  const int64_t B = igates.size(0), G = igates.size(1), H = G / 3;
  const scalar_t* xi = igates.data_ptr<scalar_t>();
  const scalar_t* xh = hgates.data_ptr<scalar_t>();
  const acc* bi = cpu::ptr_or_null<acc>(b_ih);
  const acc* bh = cpu::ptr_or_null<acc>(b_hh);
  const acc* h_p = h.data_ptr<acc>();
  scalar_t* h_o = h_new.data_ptr<scalar_t>();
  scalar_t* g_o = gates.data_ptr<scalar_t>();
  parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j += V::kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(V::kLanes, j1 - j));
      V x[3], hid[3];
      for (int k = 0; k < 3; ++k) {
        const int64_t q = k * H + j;
        x[k] = cpu::load<V>(xi + b * G + q, n) + cpu::load_or_zero<V>(bi ? bi + q : nullptr, n);
        hid[k] = cpu::load<V>(xh + b * G + q, n) + cpu::load_or_zero<V>(bh ? bh + q : nullptr, n);
      }
      const auto st = gru_cell_forward<V>(x[0], x[1], x[2], hid[0], hid[1], hid[2], cpu::load<V>(h_p + b * H + j, n));
      scalar_t* gb = g_o + b * 4 * H;
      cpu::store(gb + j, st.r, n);
      cpu::store(gb + H + j, st.z, n);
      cpu::store(gb + 2 * H + j, st.n, n);
      cpu::store(gb + 3 * H + j, hid[2], n);
      cpu::store(h_o + b * H + j, st.h, n);
    }
  });
}

template <typename scalar_t>
void gru_cell_bwd_loop(const Tensor& dh_new, const Tensor& h, const Tensor& gates, const Tensor& d_i,
                       const Tensor& d_h, const Tensor& dh) {
  using acc = acc_t<scalar_t>;
  using V = cpu::PackOf<acc>;
  const int64_t B = gates.size(0), H = gates.size(1) / 4, G = 3 * H;
  const acc* dh_p = dh_new.data_ptr<acc>();
  const acc* h_p = h.data_ptr<acc>();
  const scalar_t* g_p = gates.data_ptr<scalar_t>();
  scalar_t* di_o = d_i.data_ptr<scalar_t>();
  scalar_t* dh_o = d_h.data_ptr<scalar_t>();
  scalar_t* dprev_o = dh.data_ptr<scalar_t>();
  parallel_units(B, H, [&](int64_t b, int64_t j0, int64_t j1) {
    const scalar_t* gb = g_p + b * 4 * H;
    for (int64_t j = j0; j < j1; j += V::kLanes) {
      const int n = static_cast<int>(std::min<int64_t>(V::kLanes, j1 - j));
      const int64_t u = b * H + j;
      const auto d = gru_cell_backward<V>(cpu::load<V>(gb + j, n), cpu::load<V>(gb + H + j, n),
                                          cpu::load<V>(gb + 2 * H + j, n), cpu::load<V>(gb + 3 * H + j, n),
                                          cpu::load<V>(h_p + u, n), cpu::load<V>(dh_p + u, n));
      cpu::store(di_o + b * G + j, d.d_r, n);
      cpu::store(dh_o + b * G + j, d.d_r, n);
      cpu::store(di_o + b * G + H + j, d.d_z, n);
      cpu::store(dh_o + b * G + H + j, d.d_z, n);
      cpu::store(di_o + b * G + 2 * H + j, d.d_n, n);
      cpu::store(dh_o + b * G + 2 * H + j, d.d_hid_n, n);
      cpu::store(dprev_o + u, d.dh_prev_direct, n);
    }
  });
}

}  // namespace

Tensor3 gru_fwd_cpu(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                    const OptTensor& lengths, bool reverse, bool /*allow_tf32: no TF32 on CPU*/, bool save) {
  cpu::check_cpu(xproj, "xproj");
  const checks::Dims d = checks::gru_fwd(xproj, w_hh, b_hh, h0, lengths);
  const int64_t T = d.T, B = d.B, H = d.H;
  const auto acc = cpu::acc_scalar_type(xproj.scalar_type());
  const Tensor w = w_hh.to(acc).contiguous();
  const Tensor bias = cpu::acc_or_undefined(b_hh, acc);
  Tensor h = cpu::acc_copy(h0, acc);
  const auto len = host_lengths(lengths, T, B);
  const Tensor x = xproj.contiguous();
  Tensor y = at::empty({T, B, H}, xproj.options());
  Tensor gates = at::empty({T, B, 4 * H}, xproj.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xproj.scalar_type(), "fusedrnn_gru_fwd_cpu", [&] {
    gru_fwd_loop<scalar_t>(x, w, bias, h, len, reverse, y, gates);
  });
  if (!save) gates = at::empty({0}, xproj.options());  // inference: not returned (op contract)
  return {y, h.to(xproj.scalar_type()), gates};
}

Tensor3 gru_bwd_cpu(const Tensor& dy, const Tensor& dh_n, const Tensor& w_hh, const Tensor& h0, const Tensor& y,
                    const Tensor& gates, const OptTensor& lengths, bool reverse, bool /*allow_tf32*/) {
  cpu::check_cpu(gates, "gates");
  const checks::Dims d = checks::gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths);
  const int64_t T = d.T, B = d.B, H = d.H;
  cpu::check_same_dtype(gates, dy, "gates");
  cpu::check_same_dtype(y, dy, "y");
  const auto acc = cpu::acc_scalar_type(dy.scalar_type());
  const Tensor w = w_hh.to(acc).contiguous();
  const Tensor h0a = h0.to(acc).contiguous();
  Tensor dh = cpu::acc_copy(dh_n, acc);
  const auto len = host_lengths(lengths, T, B);
  const Tensor dyc = dy.contiguous(), yc = y.contiguous(), gc = gates.contiguous();
  Tensor dxproj = at::empty({T, B, 3 * H}, dy.options());
  Tensor dhn = at::empty({T, B, H}, dy.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "fusedrnn_gru_bwd_cpu", [&] {
    gru_bwd_loop<scalar_t>(dyc, w, h0a, yc, gc, len, reverse, dh, dxproj, dhn);
  });
  return {dxproj, dh.to(dy.scalar_type()), dhn};
}

Tensor2 gru_cell_fwd_cpu(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih, const OptTensor& b_hh,
                         const Tensor& h) {
  cpu::check_cpu(igates, "igates");
  const checks::Dims d = checks::gru_cell_fwd(igates, hgates, b_ih, b_hh, h);
  const int64_t B = d.B, H = d.H;
  cpu::check_same_dtype(hgates, igates, "hgates");
  const auto acc = cpu::acc_scalar_type(igates.scalar_type());
  const Tensor bi = cpu::acc_or_undefined(b_ih, acc), bh = cpu::acc_or_undefined(b_hh, acc);
  const Tensor ha = h.to(acc).contiguous();
  const Tensor xi = igates.contiguous(), xh = hgates.contiguous();
  Tensor h_new = at::empty({B, H}, igates.options());
  Tensor gates = at::empty({B, 4 * H}, igates.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, igates.scalar_type(), "fusedrnn_gru_cell_fwd_cpu", [&] {
    gru_cell_fwd_loop<scalar_t>(xi, xh, bi, bh, ha, h_new, gates);
  });
  return {h_new, gates};
}

Tensor3 gru_cell_bwd_cpu(const Tensor& dh_new, const Tensor& h, const Tensor& gates) {
  cpu::check_cpu(gates, "gates");
  const checks::Dims d = checks::gru_cell_bwd(dh_new, h, gates);
  const int64_t B = d.B, H = d.H;
  const auto acc = cpu::acc_scalar_type(gates.scalar_type());
  const Tensor dha = dh_new.to(acc).contiguous(), ha = h.to(acc).contiguous();
  const Tensor gc = gates.contiguous();
  Tensor d_i = at::empty({B, 3 * H}, gates.options());
  Tensor d_h = at::empty({B, 3 * H}, gates.options());
  Tensor dh = at::empty({B, H}, gates.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "fusedrnn_gru_cell_bwd_cpu", [&] {
    gru_cell_bwd_loop<scalar_t>(dha, ha, gc, d_i, d_h, dh);
  });
  return {d_i, d_h, dh};
}

}  // namespace fusedrnn
