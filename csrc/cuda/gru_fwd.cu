// GRU recurrence, forward: one persistent cooperative kernel per call (same structure as
// lstm_fwd.cu, see the notes there and in common.cuh).
//   * CTA i owns hidden units [i*U, i*U + U) with the rows {gate*H + u} (gate in r, z, n) of W_hh
//     in shared memory; U = floor(16*MT / 3), e.g. H = 768 on 132 SMs: U = 10, 77 CTAs, 30 rows
//     (2 m-tiles), 30 x 768 x 2 B = 46 KB of bf16 W_hh per CTA.
//   * per step: hp = h_{t-1} W_hh^T (tensor cores) + b_hh, pointwise GRU cell (fp32 h kept in a
//     workspace owned by the CTA; the rounded h_t goes to the double-buffered exchange buffer),
//     saved gates [r, z, n, hn]; one grid barrier per step.
// Per step at H = 768, B = 16, bf16: 2*B*H*3H = 56.6 MFLOP; 2 m-tiles x 2 n-tiles x 48 k-tiles =
// 192 mma per CTA; 24 KB of h_{t-1} per CTA from L2 (1.9 MB grid-wide).
#include "common.cuh"

namespace fusedrnn {
namespace cuda_detail {
namespace {

template <typename T>
struct GruFwdArgs {
  const T* xproj;          // (T, B, 3H)
  const T* w_hh;           // (3H, H)
  const T* b_hh;           // (3H) or null
  const int64_t* lengths;  // (B) or null
  T* y;                    // (T, B, H)
  T* h_n;                  // (B, H)
  T* gates;                // (T, B, 4H) [r, z, n, hn]
  acc_t<T>* h_state;       // (B, H) workspace, = h0 on entry
  T* hbuf;                 // (2, Bpad, ldh), [0] = h0 on entry, zero padding
  unsigned int* barrier;
  int64_t T_, B, H;
  int64_t ldh, hbuf_stride;
  int U;
  SliceGeom g_hh;
  int reverse;
};

template <typename T, class Eng>
__global__ void __launch_bounds__(kThreads, 1) gru_fwd_kernel(const GruFwdArgs<T> a) {
  using A = typename Eng::acc_t;
  constexpr int BN = Eng::BN;
  unsigned char* const smem = dev::dynamic_smem();
  uint4* ws = reinterpret_cast<uint4*>(smem);
  A* red = reinterpret_cast<A*>(smem + align16(Eng::w_bytes(a.g_hh.MT, a.g_hh.KC)));

  const int64_t H = a.H, B = a.B, G = 3 * H, G4 = 4 * H;
  const int U = a.U;
  const int64_t u0 = int64_t(dev::block_idx()) * U;
  const int nu = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(U), H - u0)));

  Eng::stage_w(ws, a.g_hh.MT, a.g_hh.KC, [&](int r, int k) -> A {
    const int gate = r / U, j = r % U;
    if (gate >= 3 || j >= nu || k >= H) return A(0);
    return to_acc(a.w_hh[(gate * H + u0 + j) * H + k]);
  });
  dev::sync_threads();

  const int rows = a.g_hh.MT * 16;

  // Latency hiding (as in lstm_fwd.cu): the first item of each thread is the same every step; its
  // fp32 h stays in a register and its xproj values are loaded before the grid barrier.
  const int first_nb = static_cast<int>(dev::min(int64_t(BN), B));
  const bool has_fixed = static_cast<int>(dev::thread_idx()) < nu * first_nb;
  const int fj = has_fixed ? static_cast<int>(dev::thread_idx()) % nu : 0;
  const int64_t fb = has_fixed ? static_cast<int>(dev::thread_idx()) / nu : 0;
  A f_h = has_fixed ? a.h_state[fb * H + u0 + fj] : A(0);
  FixedGateInputs<3, T, A> fx;
  fx.load_bias(has_fixed, a.b_hh, H, u0 + fj);
  auto prefetch = [&](int64_t t) { fx.load_step(has_fixed, a.xproj, a.lengths, t, B, H, fb, u0 + fj); };
  prefetch(a.reverse ? a.T_ - 1 : 0);

  unsigned int target = 0;
  for (int64_t s = 0; s < a.T_; ++s) {
    const int64_t t = a.reverse ? a.T_ - 1 - s : s;
    const T* hcur = a.hbuf + (s & 1) * a.hbuf_stride;
    T* hnxt = a.hbuf + ((s + 1) & 1) * a.hbuf_stride;
    for (int64_t n0 = 0; n0 < B; n0 += BN) {
      Eng::compute(ws, a.g_hh.MT, a.g_hh.KC, hcur + n0 * a.ldh, a.ldh, red);
      dev::sync_threads();
      const int nb = static_cast<int>(dev::min(int64_t(BN), B - n0));
      for (int idx = dev::thread_idx(); idx < nu * nb; idx += kThreads) {
        const bool fixed = n0 == 0 && idx == static_cast<int>(dev::thread_idx());
        const int j = idx % nu, n = idx / nu;
        const int64_t b = n0 + n, u = u0 + j, row = t * B + b;
        const bool valid = fixed ? fx.valid : (a.lengths == nullptr || t < dev::ld_nc(a.lengths + b));
        T* gp = a.gates + row * G4 + u;
        if (valid) {
          A hid[3], x[3];
          if (fixed) {
#pragma unroll
            for (int gi = 0; gi < 3; ++gi) {
              hid[gi] = red_sum(red, rows, BN, gi * U + j, n) + fx.bias[gi];
              x[gi] = fx.x[gi];
            }
          } else {
            const T* xp = a.xproj + row * G + u;
#pragma unroll
            for (int gi = 0; gi < 3; ++gi) {
              hid[gi] = red_sum(red, rows, BN, gi * U + j, n);
              if (a.b_hh) hid[gi] += A(to_acc(a.b_hh[gi * H + u]));
              x[gi] = to_acc(xp[gi * H]);
            }
          }
          const A h_prev = fixed ? f_h : a.h_state[b * H + u];
          const GruStep<A> st = gru_cell_forward<A>(x[0], x[1], x[2], hid[0], hid[1], hid[2], h_prev);
          const T hv = from_acc<T>(st.h);
          hnxt[b * a.ldh + u] = hv;  // the exchange first: it is on the critical path
          a.y[row * H + u] = hv;
          gp[0] = from_acc<T>(st.r);
          gp[H] = from_acc<T>(st.z);
          gp[2 * H] = from_acc<T>(st.n);
          gp[3 * H] = from_acc<T>(hid[2]);
          if (fixed) f_h = st.h;
          else a.h_state[b * H + u] = st.h;
        } else {
          const T z = zero_of<T>();
          hnxt[b * a.ldh + u] = dev::ld_cg(hcur + b * a.ldh + u);
          a.y[row * H + u] = z;
          gp[0] = z; gp[H] = z; gp[2 * H] = z; gp[3 * H] = z;
        }
      }
      dev::sync_threads();
    }
    if (s + 1 < a.T_) {
      prefetch(a.reverse ? t - 1 : t + 1);
      grid_barrier(a.barrier, target);
    }
  }
  if (has_fixed) a.h_state[fb * H + u0 + fj] = f_h;
  dev::sync_threads();
  store_own_cols(a.h_n, a.h_state, H, u0, nu, B);
}

struct GruFwdPlan {
  bool ok = false;
  int U = 0, grid = 0;
  SliceGeom g_hh;
  size_t smem = 0;
};

template <class Eng>
GruFwdPlan plan_gru_fwd(int64_t H, const DeviceLimits& dev) {
  GruFwdPlan p;
  const int64_t mt = ceil_div(3 * ceil_div(H, dev.sms), 16);
  if (mt > kMaxMT) return p;
  p.U = static_cast<int>(mt * 16 / 3);
  p.grid = static_cast<int>(ceil_div(H, p.U));
  p.g_hh = slice_geom(3 * p.U, H);
  p.smem = align16(Eng::w_bytes(p.g_hh.MT, p.g_hh.KC)) + red_bytes<Eng>(p.g_hh.MT);
  p.ok = p.smem <= dev.smem_optin;
  return p;
}

}  // namespace

int64_t gru_fwd_max_hidden(at::ScalarType dtype, int device) {
  const DeviceLimits dev = device_limits(device);
  return max_hidden_over_engines(dtype, [&](auto tag) {
    using T = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    return largest_fitting(int64_t(kMaxMT) * 16 / 3 * dev.sms, [&](int64_t H) {
      return plan_fits(gru_fwd_kernel<T, Eng>, plan_gru_fwd<Eng>(H, dev), dev);
    });
  });
}

}  // namespace cuda_detail

Tensor3 gru_fwd_cuda(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                     const OptTensor& lengths, bool reverse, bool allow_tf32) {
  using namespace cuda_detail;
  const checks::Dims d = checks::gru_fwd(xproj, w_hh, b_hh, h0, lengths);
  check_cuda_args("gru_fwd", true,
                  {{"xproj", &xproj}, {"w_hh", &w_hh}, {"b_hh", checks::opt(b_hh)}, {"h0", &h0},
                   {"lengths", checks::opt(lengths)}});
  const DeviceGuard guard(xproj.device());
  const int64_t T = d.T, B = d.B, H = d.H;
  const auto dt = xproj.scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto same = [&](const Tensor& t) { return t.scalar_type() == dt ? t : t.to(dt).contiguous(); };
  const Tensor w = same(w_hh);
  const Tensor bh = (b_hh.has_value() && b_hh->defined()) ? same(*b_hh) : Tensor();

  auto opts = xproj.options();
  Tensor y = at::empty({T, B, H}, opts);
  Tensor h_n = at::empty({B, H}, opts);
  Tensor gates = at::empty({T, B, 4 * H}, opts);
  if (T == 0 || B == 0) {
    h_n.copy_(h0.reshape({B, H}));
    return {y, h_n, gates};
  }
  const int device = xproj.get_device();
  const DeviceLimits dev = device_limits(device);
  const bool launched = launch_first_fitting(dt, allow_tf32, B, [&](auto tag) {
    using Tt = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    const GruFwdPlan p = plan_gru_fwd<Eng>(H, dev);
    if (!p.ok) return false;
    const int64_t Bpad = round_up(B, Eng::BN), ldh = round_up(H, kChunk);
    Workspace ws;  // zeroed: barrier, hbuf (2, Bpad, ldh); then h_state (B, H) = h0
    const size_t o_barrier = ws.take(1, at::kInt);
    const size_t o_hbuf = ws.take(2 * Bpad * ldh, dt);
    ws.mark_zeroed();
    const size_t o_h = ws.take(B * H, acc);
    ws.allocate(xproj);
    ws.view(o_hbuf, dt, {2, Bpad, ldh}).select(0, 0).narrow(0, 0, B).narrow(1, 0, H).copy_(h0);
    ws.view(o_h, acc, {B, H}).copy_(h0);
    GruFwdArgs<Tt> a;
    a.xproj = ptr<Tt>(xproj);
    a.w_hh = ptr<Tt>(w);
    a.b_hh = bh.defined() ? ptr<Tt>(bh) : nullptr;
    a.lengths = lengths_ptr(lengths);
    a.y = ptr<Tt>(y);
    a.h_n = ptr<Tt>(h_n);
    a.gates = ptr<Tt>(gates);
    a.h_state = ws.ptr<acc_t<Tt>>(o_h);
    a.hbuf = ws.ptr<Tt>(o_hbuf);
    a.barrier = ws.ptr<unsigned int>(o_barrier);
    a.T_ = T; a.B = B; a.H = H;
    a.ldh = ldh; a.hbuf_stride = Bpad * ldh;
    a.U = p.U; a.g_hh = p.g_hh;
    a.reverse = reverse ? 1 : 0;
    launch_cooperative(gru_fwd_kernel<Tt, Eng>, p.grid, kThreads, p.smem, a, dev, "gru_fwd");
    return true;
  });
  TORCH_CHECK(launched, "fusedrnn CUDA gru_fwd: hidden size H=", H, " (dtype ", dt,
              ") does not fit on chip; the limit on this device is H <= ",
              max_hidden_size_cuda("GRU", dt, device), " (max_hidden_size_cuda)");
  return {y, h_n, gates};
}

}  // namespace fusedrnn
