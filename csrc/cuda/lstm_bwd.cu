// LSTM recurrence, backward: one persistent cooperative kernel walking the steps in the opposite
// order of the forward.  Only the sequential part is here: dxproj (= d pre-activations), dh0, dc0
// and, with a projection, dh_seq; the weight gradients are GEMMs over all steps in Python.
//
// Design (see lstm_fwd.cu / common.cuh):
//   * CTA i owns hidden units [i*U, i*U + U) for the pointwise part (c gradient in a fp32
//     workspace it alone touches) and the rows {u} of W_hh^T (U x 4H, staged once in shared
//     memory) for dh_{t-1} = dpre_t . W_hh.  U = 16*MT (full row tiles): for H = 768 on 132 SMs,
//     U = 16 -> 48 CTAs, 16 x 3072 x 2 B = 96 KB of W_hh^T per CTA.
//   * no projection, per step: pointwise (dpre of own units -> dxproj and a double-buffered
//     exchange buffer) | grid barrier | dh = dpre . W_hh^T-slice (tensor cores) for own units.
//     One barrier per step.
//   * projection (P < H): dh lives on P; CTA i also owns P-rows [i*Up, i*Up + Up):
//     dh_tot = dh + dy -> exchange (and dh_seq) | barrier | dm = dh_tot . W_hr (rows of W_hr^T for
//     own units) + pointwise -> dpre exchange | barrier | dh = dpre . W_hh (own P-rows of W_hh^T).
//   * padded steps: dxproj / dh_seq zero, dh and dc pass through unchanged.
// Per step at H = 768, B = 16, bf16: 75.5 MFLOP; each of the 48 CTAs reads the whole dpre_t
// (16 x 3072 x 2 B = 96 KB) from L2 (4.7 MB grid-wide) and issues 1 m-tile x 2 n-tiles x 192
// k-tiles = 384 mma.m16n8k16 (48 per warp, 192 KB of A-fragment shared loads).
#include "common.cuh"

namespace fusedrnn {
namespace cuda_detail {
namespace {

template <typename T>
struct LstmBwdArgs {
  const T* dy;             // (T, B, P)
  const T* w_hh;           // (4H, P)
  const T* w_hr;           // (P, H) or null
  const T* c0;             // (B, H)
  const T* gates;          // (T, B, 4H)
  const acc_t<T>* cs;      // (T, B, H)
  const int64_t* lengths;  // (B) or null
  T* dxproj;               // (T, B, 4H)
  T* dh0;                  // (B, P)
  T* dc0;                  // (B, H)
  T* dh_seq;               // (T, B, P) (projection only)
  acc_t<T>* dh_state;      // (B, P) workspace, = dh_n on entry
  acc_t<T>* dc_state;      // (B, H) workspace, = dc_n on entry
  T* dpbuf;                // (2, Bpad, ldp) exchange of dpre (double-buffered), zero padding
  T* dtbuf;                // (Bpad, ldq) exchange of dh_tot (projection), zero padding
  unsigned int* barrier;
  int64_t T_, B, H, P;
  int64_t ldp, ldq, dpbuf_stride;
  int U, Up;
  SliceGeom g_b;  // W_hh^T slice: Up rows x 4H
  SliceGeom g_a;  // W_hr^T slice (projection): U rows x P
  int reverse;
};

template <typename T, class Eng>
__global__ void __launch_bounds__(kThreads, 1) lstm_bwd_kernel(const LstmBwdArgs<T> a) {
  using A = typename Eng::acc_t;
  constexpr int BN = Eng::BN;
  unsigned char* const smem = dev::dynamic_smem();
  const bool proj = a.w_hr != nullptr;
  uint4* ws_b = reinterpret_cast<uint4*>(smem);
  size_t off = align16(Eng::w_bytes(a.g_b.MT, a.g_b.KC));
  uint4* ws_a = reinterpret_cast<uint4*>(smem + off);
  if (proj) off += align16(Eng::w_bytes(a.g_a.MT, a.g_a.KC));
  A* red = reinterpret_cast<A*>(smem + off);

  const int64_t H = a.H, P = a.P, B = a.B, G = 4 * H, T_ = a.T_;
  const int U = a.U;
  const int64_t u0 = int64_t(dev::block_idx()) * U;
  const int nu = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(U), H - u0)));
  const int64_t p0 = int64_t(dev::block_idx()) * a.Up;
  const int np = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(a.Up), P - p0)));

  // W_hh^T rows p0..p0+np: row r, column k = W_hh[k][p0 + r].
  Eng::stage_w(ws_b, a.g_b.MT, a.g_b.KC, [&](int r, int k) -> A {
    if (r >= np || k >= G) return A(0);
    return to_acc(a.w_hh[int64_t(k) * P + p0 + r]);
  });
  if (proj) {  // W_hr^T rows u0..u0+nu: row r, column k = W_hr[k][u0 + r].
    Eng::stage_w(ws_a, a.g_a.MT, a.g_a.KC, [&](int r, int k) -> A {
      if (r >= nu || k >= P) return A(0);
      return to_acc(a.w_hr[int64_t(k) * H + u0 + r]);
    });
  }
  dev::sync_threads();

  const int rows_b = a.g_b.MT * 16, rows_a = a.g_a.MT * 16;

  // Inputs of the pointwise backward of (own unit j, batch b) at step t.
  struct Pre {
    A i, f, g, o, c, c_prev, dy;
    bool valid;
  };
  auto load_pre = [&](int64_t t, int j, int64_t b) {
    Pre q;
    const int64_t u = u0 + j, row = t * B + b;
    q.valid = a.lengths == nullptr || t < dev::ld_nc(a.lengths + b);
    const T* gp = a.gates + row * G + u;
    q.i = to_acc(gp[0]); q.f = to_acc(gp[H]); q.g = to_acc(gp[2 * H]); q.o = to_acc(gp[3 * H]);
    q.c = a.cs[row * H + u];
    // c_{t-1}: previous step in the forward order (c0 at each sequence's first step).
    bool from_seq;
    int64_t prow;
    if (!a.reverse) {
      from_seq = t > 0;
      prow = row - B;
    } else {
      from_seq = t + 1 < T_ && (a.lengths == nullptr || t + 1 < dev::ld_nc(a.lengths + b));
      prow = row + B;
    }
    q.c_prev = from_seq ? a.cs[prow * H + u] : A(to_acc(a.c0[b * H + u]));
    q.dy = proj ? A(0) : A(to_acc(a.dy[row * P + u]));
    return q;
  };

  // Latency hiding (as in lstm_fwd.cu): each thread's first item is the same every step (in the
  // pointwise phase and, without projection, in the dh epilogue): its dc (and dh) stay in
  // registers and its saved tensors for the next step are loaded before the grid barrier.
  const int first_nb = static_cast<int>(dev::min(int64_t(BN), B));
  const bool has_fixed = static_cast<int>(dev::thread_idx()) < nu * first_nb;
  const int fj = has_fixed ? static_cast<int>(dev::thread_idx()) % nu : 0;
  const int64_t fb = has_fixed ? static_cast<int>(dev::thread_idx()) / nu : 0;
  A f_dc = has_fixed ? a.dc_state[fb * H + u0 + fj] : A(0);
  A f_dh = (has_fixed && !proj) ? a.dh_state[fb * P + u0 + fj] : A(0);
  Pre f_pre{};
  if (has_fixed) f_pre = load_pre(a.reverse ? 0 : T_ - 1, fj, fb);

  unsigned int target = 0;
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = a.reverse ? s : T_ - 1 - s;  // opposite of the forward order
    const int64_t t_next = a.reverse ? t + 1 : t - 1;
    T* dp = a.dpbuf + (proj ? 0 : (s & 1) * a.dpbuf_stride);

    // Pointwise cell backward for (own unit j, batch b) given dh reaching m_t; returns dc_{t-1}.
    auto cell = [&](int j, int64_t b, const Pre& q, A dh_m, A dc) -> A {
      const int64_t u = u0 + j, row = t * B + b;
      T* dx = a.dxproj + row * G + u;
      T* dpr = dp + b * a.ldp + u;
      if (!q.valid) {
        const T z = zero_of<T>();
        dpr[0] = z; dpr[H] = z; dpr[2 * H] = z; dpr[3 * H] = z;
        dx[0] = z; dx[H] = z; dx[2 * H] = z; dx[3 * H] = z;
        return dc;
      }
      const LstmGrad<A> d = lstm_cell_backward<A>(q.i, q.f, q.g, q.o, q.c, q.c_prev, dh_m, dc);
      const T di = from_acc<T>(d.d_i), df = from_acc<T>(d.d_f), dg = from_acc<T>(d.d_g),
              dO = from_acc<T>(d.d_o);
      dpr[0] = di; dpr[H] = df; dpr[2 * H] = dg; dpr[3 * H] = dO;  // exchange first (critical path)
      dx[0] = di; dx[H] = df; dx[2 * H] = dg; dx[3 * H] = dO;
      return d.dc_prev;
    };
    auto is_valid = [&](int64_t b) { return a.lengths == nullptr || t < dev::ld_nc(a.lengths + b); };

    if (!proj) {
      for (int64_t idx = dev::thread_idx(); idx < int64_t(nu) * B; idx += kThreads) {
        const bool fixed = has_fixed && idx == int64_t(dev::thread_idx());
        const int j = static_cast<int>(idx % nu);
        const int64_t b = idx / nu;
        const Pre q = fixed ? f_pre : load_pre(t, j, b);
        const A dh = fixed ? f_dh : a.dh_state[b * P + u0 + j];
        if (fixed) {
          f_dc = cell(j, b, q, dh + q.dy, f_dc);
        } else {
          a.dc_state[b * H + u0 + j] = cell(j, b, q, dh + q.dy, a.dc_state[b * H + u0 + j]);
        }
      }
      if (has_fixed && s + 1 < T_) f_pre = load_pre(t_next, fj, fb);
      grid_barrier(a.barrier, target);
    } else {
      // dh_tot for own P-rows -> exchange + dh_seq
      for (int64_t idx = dev::thread_idx(); idx < int64_t(np) * B; idx += kThreads) {
        const int j = static_cast<int>(idx % np);
        const int64_t b = idx / np, p = p0 + j, row = t * B + b;
        if (is_valid(b)) {
          const T v = from_acc<T>(a.dh_state[b * P + p] + A(to_acc(a.dy[row * P + p])));
          a.dtbuf[b * a.ldq + p] = v;
          a.dh_seq[row * P + p] = v;
        } else {
          a.dtbuf[b * a.ldq + p] = zero_of<T>();
          a.dh_seq[row * P + p] = zero_of<T>();
        }
      }
      grid_barrier(a.barrier, target);
      // dm = dh_tot . W_hr for own units, then the cell
      for (int64_t n0 = 0; n0 < B; n0 += BN) {
        Eng::compute(ws_a, a.g_a.MT, a.g_a.KC, a.dtbuf + n0 * a.ldq, a.ldq, red);
        dev::sync_threads();
        const int nb = static_cast<int>(dev::min(int64_t(BN), B - n0));
        for (int idx = dev::thread_idx(); idx < nu * nb; idx += kThreads) {
          const bool fixed = has_fixed && n0 == 0 && idx == static_cast<int>(dev::thread_idx());
          const int j = idx % nu, n = idx / nu;
          const int64_t b = n0 + n;
          const Pre q = fixed ? f_pre : load_pre(t, j, b);
          const A dm = red_sum(red, rows_a, BN, j, n);
          if (fixed) {
            f_dc = cell(j, b, q, dm, f_dc);
          } else {
            a.dc_state[b * H + u0 + j] = cell(j, b, q, dm, a.dc_state[b * H + u0 + j]);
          }
        }
        dev::sync_threads();
      }
      if (has_fixed && s + 1 < T_) f_pre = load_pre(t_next, fj, fb);
      grid_barrier(a.barrier, target);
    }

    // dh_{t-1} = dpre_t . W_hh for own P-rows (padded steps: dh unchanged)
    for (int64_t n0 = 0; n0 < B; n0 += BN) {
      Eng::compute(ws_b, a.g_b.MT, a.g_b.KC, dp + n0 * a.ldp, a.ldp, red);
      dev::sync_threads();
      const int nb = static_cast<int>(dev::min(int64_t(BN), B - n0));
      for (int idx = dev::thread_idx(); idx < np * nb; idx += kThreads) {
        const bool fixed = !proj && has_fixed && n0 == 0 && idx == static_cast<int>(dev::thread_idx());
        const int j = idx % np, n = idx / np;
        const int64_t b = n0 + n;
        if (is_valid(b)) {
          const A v = red_sum(red, rows_b, BN, j, n);
          if (fixed) f_dh = v;
          else a.dh_state[b * P + p0 + j] = v;
        }
      }
      dev::sync_threads();
    }
  }
  if (has_fixed) {
    a.dc_state[fb * H + u0 + fj] = f_dc;
    if (!proj) a.dh_state[fb * P + u0 + fj] = f_dh;
  }
  dev::sync_threads();

  store_own_cols(a.dh0, a.dh_state, P, p0, np, B);
  store_own_cols(a.dc0, a.dc_state, H, u0, nu, B);
}

struct BwdPlan {
  bool ok = false;
  int U = 0, Up = 0, grid = 0;
  SliceGeom g_b, g_a;
  size_t smem = 0;
};

template <class Eng>
BwdPlan plan_lstm_bwd(int64_t H, int64_t P, bool proj, const DeviceLimits& dev) {
  BwdPlan p;
  const int64_t mt = ceil_div(ceil_div(H, dev.sms), 16);
  if (mt > kMaxMT) return p;
  p.U = static_cast<int>(std::min<int64_t>(mt * 16, H));  // full row tiles: fewer CTAs
  p.grid = static_cast<int>(ceil_div(H, p.U));
  p.Up = proj ? static_cast<int>(ceil_div(P, p.grid)) : p.U;
  p.g_b = slice_geom(p.Up, 4 * H);
  int max_mt = p.g_b.MT;
  p.smem = align16(Eng::w_bytes(p.g_b.MT, p.g_b.KC));
  if (proj) {
    p.g_a = slice_geom(p.U, P);
    max_mt = std::max(max_mt, p.g_a.MT);
    p.smem += align16(Eng::w_bytes(p.g_a.MT, p.g_a.KC));
  } else {
    p.g_a = SliceGeom{1, 1};
  }
  if (max_mt > kMaxMT) return p;
  p.smem += red_bytes<Eng>(max_mt);
  p.ok = p.smem <= dev.smem_optin;
  return p;
}

}  // namespace

int64_t lstm_bwd_max_hidden(at::ScalarType dtype, int device) {
  const DeviceLimits dev = device_limits(device);
  return max_hidden_over_engines(dtype, [&](auto tag) {
    using T = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    return largest_fitting(int64_t(kMaxMT) * 16 * dev.sms, [&](int64_t H) {
      return plan_fits(lstm_bwd_kernel<T, Eng>, plan_lstm_bwd<Eng>(H, H, false, dev), dev);
    });
  });
}

}  // namespace cuda_detail

Tensor4 lstm_bwd_cuda(const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w_hh,
                      const OptTensor& w_hr, const Tensor& c0, const Tensor& gates, const Tensor& cs,
                      const OptTensor& lengths, bool reverse, bool allow_tf32) {
  using namespace cuda_detail;
  const checks::Dims d = checks::lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths);
  check_cuda_args("lstm_bwd", true,
                  {{"dy", &dy}, {"dh_n", &dh_n}, {"dc_n", &dc_n}, {"w_hh", &w_hh}, {"w_hr", checks::opt(w_hr)},
                   {"c0", &c0}, {"gates", &gates}, {"cs", &cs}, {"lengths", checks::opt(lengths)}});
  const DeviceGuard guard(dy.device());
  const int64_t T = d.T, B = d.B, H = d.H, G = 4 * H, P = d.P;
  const bool proj = checks::defined(w_hr);
  const auto dt = dy.scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto same = [&](const Tensor& t) { return t.scalar_type() == dt ? t : t.to(dt).contiguous(); };
  const Tensor w = same(w_hh), wr = proj ? same(*w_hr) : Tensor();
  const Tensor c0c = same(c0), gatesc = same(gates);
  const Tensor csc = cs.scalar_type() == acc ? cs : cs.to(acc).contiguous();

  auto opts = dy.options();
  Tensor dxproj = at::empty({T, B, G}, opts);
  Tensor dh0 = at::empty({B, P}, opts);
  Tensor dc0 = at::empty({B, H}, opts);
  Tensor dh_seq = proj ? at::empty({T, B, P}, opts) : at::empty({0}, opts);
  if (T == 0 || B == 0) {
    dh0.copy_(dh_n.reshape({B, P}));
    dc0.copy_(dc_n.reshape({B, H}));
    return {dxproj, dh0, dc0, dh_seq};
  }

  const int device = dy.get_device();
  const DeviceLimits dev = device_limits(device);
  const bool launched = launch_first_fitting(dt, allow_tf32, B, [&](auto tag) {
    using Tt = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    const BwdPlan p = plan_lstm_bwd<Eng>(H, P, proj, dev);
    if (!p.ok) return false;
    const int64_t Bpad = round_up(B, Eng::BN);
    const int64_t ldp = round_up(G, kChunk), ldq = round_up(P, kChunk);
    // zeroed: barrier, dpbuf (1 or 2, Bpad, ldp), dtbuf (Bpad, ldq); then dh_state = dh_n, dc_state = dc_n
    Workspace ws;
    const size_t o_barrier = ws.take(1, at::kInt);
    const size_t o_dpbuf = ws.take((proj ? 1 : 2) * Bpad * ldp, dt);
    const size_t o_dtbuf = proj ? ws.take(Bpad * ldq, dt) : 0;
    ws.mark_zeroed();
    const size_t o_dh = ws.take(B * P, acc), o_dc = ws.take(B * H, acc);
    ws.allocate(dy);
    ws.view(o_dh, acc, {B, P}).copy_(dh_n);
    ws.view(o_dc, acc, {B, H}).copy_(dc_n);
    LstmBwdArgs<Tt> a;
    a.dy = ptr<Tt>(dy);
    a.w_hh = ptr<Tt>(w);
    a.w_hr = proj ? ptr<Tt>(wr) : nullptr;
    a.c0 = ptr<Tt>(c0c);
    a.gates = ptr<Tt>(gatesc);
    a.cs = ptr<acc_t<Tt>>(csc);
    a.lengths = lengths_ptr(lengths);
    a.dxproj = ptr<Tt>(dxproj);
    a.dh0 = ptr<Tt>(dh0);
    a.dc0 = ptr<Tt>(dc0);
    a.dh_seq = proj ? ptr<Tt>(dh_seq) : nullptr;
    a.dh_state = ws.ptr<acc_t<Tt>>(o_dh);
    a.dc_state = ws.ptr<acc_t<Tt>>(o_dc);
    a.dpbuf = ws.ptr<Tt>(o_dpbuf);
    a.dtbuf = proj ? ws.ptr<Tt>(o_dtbuf) : nullptr;
    a.barrier = ws.ptr<unsigned int>(o_barrier);
    a.T_ = T; a.B = B; a.H = H; a.P = P;
    a.ldp = ldp; a.ldq = ldq; a.dpbuf_stride = Bpad * ldp;
    a.U = p.U; a.Up = p.Up; a.g_b = p.g_b; a.g_a = p.g_a;
    a.reverse = reverse ? 1 : 0;
    launch_cooperative(lstm_bwd_kernel<Tt, Eng>, p.grid, kThreads, p.smem, a, dev, "lstm_bwd");
    return true;
  });
  TORCH_CHECK(launched, "fusedrnn CUDA lstm_bwd: hidden size H=", H, " (P=", P, ", dtype ", dt,
              ") does not fit on chip; the limit on this device is H <= ",
              max_hidden_size_cuda("LSTM", dt, device), " (max_hidden_size_cuda)");
  return {dxproj, dh0, dc0, dh_seq};
}

}  // namespace fusedrnn
