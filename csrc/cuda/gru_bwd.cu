// GRU recurrence, backward: one persistent cooperative kernel walking the steps in the opposite
// order of the forward (structure of lstm_bwd.cu without projection):
//   * CTA i owns hidden units [i*U, i*U + U), U = 16*MT, and the rows {u} of W_hh^T (U x 3H) in
//     shared memory; H = 768 on 132 SMs: U = 16, 48 CTAs, 16 x 2304 x 2 B = 72 KB bf16.
//   * per step: pointwise GRU backward for own units (h_{t-1} read from y / h0 as the reference's
//     previous_states), dh = dh_tot * z (direct path) into the fp32 dh workspace, [d_r, d_z, d_hn]
//     to a double-buffered exchange buffer | grid barrier | dh += [d_r, d_z, d_hn] . W_hh for own
//     units (tensor cores).  One barrier per step.
// Per step at H = 768, B = 16, bf16: 56.6 MFLOP; 72 KB of dgates read per CTA from L2.
#include "common.cuh"

namespace fusedrnn {
namespace cuda_detail {
namespace {

template <typename T>
struct GruBwdArgs {
  const T* dy;             // (T, B, H)
  const T* w_hh;           // (3H, H)
  const T* h0;             // (B, H)
  const T* y;              // (T, B, H)
  const T* gates;          // (T, B, 4H) [r, z, n, hn]
  const int64_t* lengths;  // (B) or null
  T* dxproj;               // (T, B, 3H)
  T* dh0;                  // (B, H)
  T* dhn;                  // (T, B, H)
  acc_t<T>* dh_state;      // (B, H) workspace, = dh_n on entry
  T* dpbuf;                // (2, Bpad, ldp) exchange of [d_r, d_z, d_hn], zero padding
  unsigned int* barrier;
  int64_t T_, B, H;
  int64_t ldp, dpbuf_stride;
  int U;
  SliceGeom g_b;  // W_hh^T slice: U rows x 3H
  int reverse;
};

template <typename T, class Eng>
__global__ void __launch_bounds__(kThreads, 1) gru_bwd_kernel(const GruBwdArgs<T> a) {
  using A = typename Eng::acc_t;
  constexpr int BN = Eng::BN;
  unsigned char* const smem = dev::dynamic_smem();
  uint4* ws = reinterpret_cast<uint4*>(smem);
  A* red = reinterpret_cast<A*>(smem + align16(Eng::w_bytes(a.g_b.MT, a.g_b.KC)));

  const int64_t H = a.H, B = a.B, G = 3 * H, G4 = 4 * H, T_ = a.T_;
  const int U = a.U;
  const int64_t u0 = int64_t(dev::block_idx()) * U;
  const int nu = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(U), H - u0)));

  Eng::stage_w(ws, a.g_b.MT, a.g_b.KC, [&](int r, int k) -> A {
    if (r >= nu || k >= G) return A(0);
    return to_acc(a.w_hh[int64_t(k) * H + u0 + r]);
  });
  dev::sync_threads();

  const int rows = a.g_b.MT * 16;

  struct Pre {
    A r, z, n, hn, h_prev, dy;
    bool valid;
  };
  auto load_pre = [&](int64_t t, int j, int64_t b) {
    Pre q;
    const int64_t u = u0 + j, row = t * B + b;
    q.valid = a.lengths == nullptr || t < dev::ld_nc(a.lengths + b);
    const T* gp = a.gates + row * G4 + u;
    q.r = to_acc(gp[0]); q.z = to_acc(gp[H]); q.n = to_acc(gp[2 * H]); q.hn = to_acc(gp[3 * H]);
    // h_{t-1}: previous step in the forward order (h0 at each sequence's first step).
    bool from_seq;
    int64_t prow;
    if (!a.reverse) {
      from_seq = t > 0;
      prow = row - B;
    } else {
      from_seq = t + 1 < T_ && (a.lengths == nullptr || t + 1 < dev::ld_nc(a.lengths + b));
      prow = row + B;
    }
    q.h_prev = from_seq ? A(to_acc(a.y[prow * H + u])) : A(to_acc(a.h0[b * H + u]));
    q.dy = to_acc(a.dy[row * H + u]);
    return q;
  };

  // Latency hiding (as in lstm_bwd.cu): each thread's first item keeps dh in a register and has
  // its saved tensors for the next step loaded before the grid barrier.
  const int first_nb = static_cast<int>(dev::min(int64_t(BN), B));
  const bool has_fixed = static_cast<int>(dev::thread_idx()) < nu * first_nb;
  const int fj = has_fixed ? static_cast<int>(dev::thread_idx()) % nu : 0;
  const int64_t fb = has_fixed ? static_cast<int>(dev::thread_idx()) / nu : 0;
  A f_dh = has_fixed ? a.dh_state[fb * H + u0 + fj] : A(0);
  Pre f_pre{};
  if (has_fixed) f_pre = load_pre(a.reverse ? 0 : T_ - 1, fj, fb);

  unsigned int target = 0;
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = a.reverse ? s : T_ - 1 - s;
    T* dp = a.dpbuf + (s & 1) * a.dpbuf_stride;

    for (int64_t idx = dev::thread_idx(); idx < int64_t(nu) * B; idx += kThreads) {
      const bool fixed = has_fixed && idx == int64_t(dev::thread_idx());
      const int j = static_cast<int>(idx % nu);
      const int64_t b = idx / nu, u = u0 + j, row = t * B + b;
      const Pre q = fixed ? f_pre : load_pre(t, j, b);
      T* dx = a.dxproj + row * G + u;
      T* dpr = dp + b * a.ldp + u;
      if (!q.valid) {
        const T z = zero_of<T>();
        dpr[0] = z; dpr[H] = z; dpr[2 * H] = z;
        dx[0] = z; dx[H] = z; dx[2 * H] = z;
        a.dhn[row * H + u] = z;
        continue;
      }
      const A dh_tot = (fixed ? f_dh : a.dh_state[b * H + u]) + q.dy;
      const GruGrad<A> d = gru_cell_backward<A>(q.r, q.z, q.n, q.hn, q.h_prev, dh_tot);
      const T dr = from_acc<T>(d.d_r), dz = from_acc<T>(d.d_z), dhid_n = from_acc<T>(d.d_hid_n);
      dpr[0] = dr; dpr[H] = dz; dpr[2 * H] = dhid_n;  // exchange first (critical path)
      dx[0] = dr; dx[H] = dz; dx[2 * H] = from_acc<T>(d.d_n);
      a.dhn[row * H + u] = dhid_n;
      if (fixed) f_dh = d.dh_prev_direct;
      else a.dh_state[b * H + u] = d.dh_prev_direct;
    }
    if (has_fixed && s + 1 < T_) f_pre = load_pre(a.reverse ? t + 1 : t - 1, fj, fb);
    grid_barrier(a.barrier, target);

    for (int64_t n0 = 0; n0 < B; n0 += BN) {
      Eng::compute(ws, a.g_b.MT, a.g_b.KC, dp + n0 * a.ldp, a.ldp, red);
      dev::sync_threads();
      const int nb = static_cast<int>(dev::min(int64_t(BN), B - n0));
      for (int idx = dev::thread_idx(); idx < nu * nb; idx += kThreads) {
        const bool fixed = has_fixed && n0 == 0 && idx == static_cast<int>(dev::thread_idx());
        const int j = idx % nu, n = idx / nu;
        const int64_t b = n0 + n;
        if (a.lengths == nullptr || t < dev::ld_nc(a.lengths + b)) {
          const A v = red_sum(red, rows, BN, j, n);
          if (fixed) f_dh += v;
          else a.dh_state[b * H + u0 + j] += v;
        }
      }
      dev::sync_threads();
    }
  }
  if (has_fixed) a.dh_state[fb * H + u0 + fj] = f_dh;
  dev::sync_threads();
  store_own_cols(a.dh0, a.dh_state, H, u0, nu, B);
}

struct GruBwdPlan {
  bool ok = false;
  int U = 0, grid = 0;
  SliceGeom g_b;
  size_t smem = 0;
};

template <class Eng>
GruBwdPlan plan_gru_bwd(int64_t H, const DeviceLimits& dev) {
  GruBwdPlan p;
  const int64_t mt = ceil_div(ceil_div(H, dev.sms), 16);
  if (mt > kMaxMT) return p;
  p.U = static_cast<int>(std::min<int64_t>(mt * 16, H));
  p.grid = static_cast<int>(ceil_div(H, p.U));
  p.g_b = slice_geom(p.U, 3 * H);
  p.smem = align16(Eng::w_bytes(p.g_b.MT, p.g_b.KC)) + red_bytes<Eng>(p.g_b.MT);
  p.ok = p.smem <= dev.smem_optin;
  return p;
}

}  // namespace

int64_t gru_bwd_max_hidden(at::ScalarType dtype, int device) {
  const DeviceLimits dev = device_limits(device);
  return max_hidden_over_engines(dtype, [&](auto tag) {
    using T = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    return largest_fitting(int64_t(kMaxMT) * 16 * dev.sms, [&](int64_t H) {
      return plan_fits(gru_bwd_kernel<T, Eng>, plan_gru_bwd<Eng>(H, dev), dev);
    });
  });
}

}  // namespace cuda_detail

Tensor3 gru_bwd_cuda(const Tensor& dy, const Tensor& dh_n, const Tensor& w_hh, const Tensor& h0,
                     const Tensor& y, const Tensor& gates, const OptTensor& lengths, bool reverse,
                     bool allow_tf32) {
  using namespace cuda_detail;
  const checks::Dims d = checks::gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths);
  check_cuda_args("gru_bwd", true,
                  {{"dy", &dy}, {"dh_n", &dh_n}, {"w_hh", &w_hh}, {"h0", &h0}, {"y", &y}, {"gates", &gates},
                   {"lengths", checks::opt(lengths)}});
  const DeviceGuard guard(dy.device());
  const int64_t T = d.T, B = d.B, H = d.H, G = 3 * H;
  const auto dt = dy.scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto same = [&](const Tensor& t) { return t.scalar_type() == dt ? t : t.to(dt).contiguous(); };
  const Tensor w = same(w_hh), h0c = same(h0), yc = same(y), gatesc = same(gates);

  auto opts = dy.options();
  Tensor dxproj = at::empty({T, B, G}, opts);
  Tensor dh0 = at::empty({B, H}, opts);
  Tensor dhn = at::empty({T, B, H}, opts);
  if (T == 0 || B == 0) {
    dh0.copy_(dh_n.reshape({B, H}));
    return {dxproj, dh0, dhn};
  }
  const int device = dy.get_device();
  const DeviceLimits dev = device_limits(device);
  const bool launched = launch_first_fitting(dt, allow_tf32, B, [&](auto tag) {
    using Tt = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    const GruBwdPlan p = plan_gru_bwd<Eng>(H, dev);
    if (!p.ok) return false;
    const int64_t Bpad = round_up(B, Eng::BN), ldp = round_up(G, kChunk);
    Workspace ws;  // zeroed: barrier, dpbuf (2, Bpad, ldp); then dh_state (B, H) = dh_n
    const size_t o_barrier = ws.take(1, at::kInt);
    const size_t o_dpbuf = ws.take(2 * Bpad * ldp, dt);
    ws.mark_zeroed();
    const size_t o_dh = ws.take(B * H, acc);
    ws.allocate(dy);
    ws.view(o_dh, acc, {B, H}).copy_(dh_n);
    GruBwdArgs<Tt> a;
    a.dy = ptr<Tt>(dy);
    a.w_hh = ptr<Tt>(w);
    a.h0 = ptr<Tt>(h0c);
    a.y = ptr<Tt>(yc);
    a.gates = ptr<Tt>(gatesc);
    a.lengths = lengths_ptr(lengths);
    a.dxproj = ptr<Tt>(dxproj);
    a.dh0 = ptr<Tt>(dh0);
    a.dhn = ptr<Tt>(dhn);
    a.dh_state = ws.ptr<acc_t<Tt>>(o_dh);
    a.dpbuf = ws.ptr<Tt>(o_dpbuf);
    a.barrier = ws.ptr<unsigned int>(o_barrier);
    a.T_ = T; a.B = B; a.H = H;
    a.ldp = ldp; a.dpbuf_stride = Bpad * ldp;
    a.U = p.U; a.g_b = p.g_b;
    a.reverse = reverse ? 1 : 0;
    launch_cooperative(gru_bwd_kernel<Tt, Eng>, p.grid, kThreads, p.smem, a, dev, "gru_bwd");
    return true;
  });
  TORCH_CHECK(launched, "fusedrnn CUDA gru_bwd: hidden size H=", H, " (dtype ", dt,
              ") does not fit on chip; the limit on this device is H <= ",
              max_hidden_size_cuda("GRU", dt, device), " (max_hidden_size_cuda)");
  return {dxproj, dh0, dhn};
}

}  // namespace fusedrnn
