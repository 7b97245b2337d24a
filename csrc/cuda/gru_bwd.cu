// GRU recurrence, backward: one persistent cooperative kernel walking the steps in the opposite
// order of the forward (structure of lstm_bwd.cu without projection):
//   * CTA (iu, ib) owns hidden units [iu*U, iu*U + U), U = 16*MT, and the rows {u} of W_hh^T (U x 3H)
//     in shared memory, for the rows of batch group ib.
//   * per step: pointwise GRU backward for own units (h_{t-1} read from y / h0 as the reference's
//     previous_states), dh = dh_tot * z (direct path) into the fp32 dh state, [d_r, d_z, d_hn] to
//     the double-buffered exchange (then dxproj and dhn) | exchange | dh += [d_r, d_z, d_hn] . W_hh
//     for own units (tensor cores).  One exchange per step.
// Per step at H = 768, B = 16, bf16 on an H200 (planner's choice): U = 32, 24 unit slices x 2 groups,
// 32 x 2304 x 2 B = 144 KB of W_hh^T per CTA, 36 KB of dgates per CTA from L2: predicted 2.3 us.
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
  void* dpbuf;             // (2, gb*Bgp, ldp) exchange words of [d_r, d_z, d_hn], zero padding
  unsigned int* barrier;   // one counter per batch group (barrier protocol)
  int64_t T_, B, H;
  int64_t ldp, dp_stride;
  Geom g;                  // a: W_hh^T slice (U rows x 3H)
  int reverse;
};

template <typename T>
struct GruGradRec {  // dxproj (3) and dhn of one item, stored after the exchange
  int64_t row = 0, col = 0;
  T dx[3], dhn;
  bool on = false, valid = false;
};

template <typename T, class Eng, int S>
__global__ void __launch_bounds__(kThreads, 1) gru_bwd_kernel(const GruBwdArgs<T> a) {
  using A = typename Eng::acc_t;
  using X = Xchg<T, S>;
  using W = typename X::word_t;
  constexpr int BN = Eng::BN;
  constexpr int kWave = kThreads * kMaxItems;
  const Geom& g = a.g;
  unsigned char* const smem = dev::dynamic_smem();
  uint4* ws = reinterpret_cast<uint4*>(smem);
  A* red = reinterpret_cast<A*>(smem + align16(Eng::w_bytes(g.a.MT, g.a.KC)));

  const int64_t H = a.H, B = a.B, G = 3 * H, G4 = 4 * H, T_ = a.T_;
  const int tid = static_cast<int>(dev::thread_idx());
  const Place pl = place_of(g, B);
  const int U = g.U;
  const int64_t u0 = int64_t(pl.iu) * U;
  const int nu = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(U), H - u0)));

  Eng::stage_w(ws, g.a.MT, g.a.KC, [&](int r, int k) -> A {
    if (r >= nu || k >= G) return A(0);
    return to_acc(a.w_hh[int64_t(k) * H + u0 + r]);
  });
  dev::sync_threads();

  const int rows = g.a.MT * 16;
  W* const dpbuf = static_cast<W*>(a.dpbuf) + pl.xrow0 * a.ldp;  // this group's rows

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

  // Latency hiding (as in lstm_bwd.cu): the items of the first wave of the first pass keep dh in
  // registers and have their saved tensors loaded before the exchange wait.
  const int first_items = static_cast<int>(
      dev::min(int64_t(kWave), int64_t(nu) * dev::min(int64_t(BN), int64_t(pl.nb))));
  bool res[kMaxItems];
  int rj[kMaxItems];
  int64_t rb[kMaxItems];
  A r_dh[kMaxItems];
  Pre r_pre[kMaxItems];
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    const int idx = tid + i * kThreads;
    res[i] = idx < first_items;
    rj[i] = res[i] ? idx % nu : 0;
    rb[i] = res[i] ? pl.b0 + idx / nu : 0;
    r_dh[i] = res[i] ? a.dh_state[rb[i] * H + u0 + rj[i]] : A(0);
    if (res[i]) r_pre[i] = load_pre(a.reverse ? 0 : T_ - 1, rj[i], rb[i]);
  }

  const T zero = zero_of<T>();
  auto flush = [&](const GruGradRec<T>& r) {
    if (!r.on) return;
    T* dx = a.dxproj + r.row * G + r.col;
#pragma unroll
    for (int k = 0; k < 3; ++k) dx[k * H] = r.valid ? r.dx[k] : zero;
    a.dhn[r.row * H + r.col] = r.valid ? r.dhn : zero;
  };

  StepSync<S> sync{a.barrier + pl.ib * kCounterStride, static_cast<unsigned int>(g.gu), g.legacy != 0};
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = a.reverse ? s : T_ - 1 - s;
    W* dp = dpbuf + (s & 1) * a.dp_stride;
    const uint32_t tag = X::tag(s + 1);

    GruGradRec<T> rec[kMaxItems];
    const int items = nu * pl.nb;
    for (int base = 0; base < items; base += kWave) {
      const bool defer = base + kWave >= items && !g.legacy;
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) {
        const int idx = base + i * kThreads + tid;
        if (idx >= items) continue;
        const bool fixed = base == 0 && res[i];
        const int j = idx % nu, n = idx / nu;
        const int64_t b = pl.b0 + n, u = u0 + j;
        const Pre q = fixed ? r_pre[i] : load_pre(t, j, b);
        GruGradRec<T> r;
        r.on = true;
        r.row = t * B + b;
        r.col = u;
        r.valid = q.valid;
        W* dpr = dp + int64_t(n) * a.ldp + u;
        if (!q.valid) {
#pragma unroll
          for (int k = 0; k < 3; ++k) X::put(dpr + k * H, zero, tag);
        } else {
          const A dh_tot = (fixed ? r_dh[i] : a.dh_state[b * H + u]) + q.dy;
          const GruGrad<A> d = gru_cell_backward<A>(q.r, q.z, q.n, q.hn, q.h_prev, dh_tot);
          r.dx[0] = from_acc<T>(d.d_r);
          r.dx[1] = from_acc<T>(d.d_z);
          r.dx[2] = from_acc<T>(d.d_n);
          r.dhn = from_acc<T>(d.d_hid_n);
          X::put(dpr, r.dx[0], tag);  // the exchange first (critical path)
          X::put(dpr + H, r.dx[1], tag);
          X::put(dpr + 2 * H, r.dhn, tag);
          if (fixed) r_dh[i] = d.dh_prev_direct;
          else a.dh_state[b * H + u] = d.dh_prev_direct;
        }
        if (defer) rec[i] = r;
        else flush(r);
      }
    }
    sync.arrive();
#pragma unroll
    for (int i = 0; i < kMaxItems; ++i) flush(rec[i]);
#pragma unroll
    for (int i = 0; i < kMaxItems; ++i) {
      if (res[i] && s + 1 < T_) r_pre[i] = load_pre(a.reverse ? t + 1 : t - 1, rj[i], rb[i]);
    }
    sync.wait();

    for (int64_t n0 = 0; n0 < pl.nb; n0 += BN) {
      Eng::template compute<X>(ws, g.a.MT, g.a.KC, dp + n0 * a.ldp, a.ldp, red, Check{tag, pl.nb - n0, G});
      dev::sync_threads();
      const int nb = static_cast<int>(dev::min(int64_t(BN), pl.nb - n0));
      const int gitems = nu * nb;
      for (int base = 0; base < gitems; base += kWave) {
#pragma unroll
        for (int i = 0; i < kMaxItems; ++i) {
          const int idx = base + i * kThreads + tid;
          if (idx >= gitems) continue;
          const bool fixed = n0 == 0 && base == 0 && res[i];
          const int j = idx % nu, n = idx / nu;
          const int64_t b = pl.b0 + n0 + n;
          if (a.lengths == nullptr || t < dev::ld_nc(a.lengths + b)) {
            const A v = red_sum(red, rows, BN, j, n);
            if (fixed) r_dh[i] += v;
            else a.dh_state[b * H + u0 + j] += v;
          }
        }
      }
      dev::sync_threads();
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    if (res[i]) a.dh_state[rb[i] * H + u0 + rj[i]] = r_dh[i];
  }
  dev::sync_threads();
  for (int idx = tid; idx < nu * pl.nb; idx += kThreads) {
    const int j = idx % nu, n = idx / nu;
    const int64_t b = pl.b0 + n;
    a.dh0[b * H + u0 + j] = from_acc<T>(a.dh_state[b * H + u0 + j]);
  }
}

}  // namespace
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
  const plan::Plan p = make_plan(plan::Pass::kGruBwd, dt, allow_tf32, H, H, B, false, true, dev);
  if (!p.ok) raise_not_fit("gru_bwd", p, dt, H, H, false, dev);
  if (p.stepwise) {
    gru_bwd_stepwise(dy, dh_n, w, h0c, yc, gatesc, lengths, reverse, dxproj, dh0, dhn);
    return {dxproj, dh0, dhn};
  }
  dispatch_plan(dt, allow_tf32, p, [&](auto tag, auto sync) {
    using Tt = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    constexpr int S = decltype(sync)::value;
    using W = typename Xchg<Tt, S>::word_t;
    const Geom g = geom_of(p, Eng::BN);
    const int64_t rows = int64_t(p.gb) * g.Bgp, ldp = xchg_ld(G);
    const auto wdt = word_dtype<W>();
    Workspace ws;  // zeroed: counters, dpbuf (2, rows, ldp); then dh_state (B, H) = dh_n
    const size_t o_barrier = ws.take(int64_t(p.gb) * kCounterStride, at::kInt);
    const size_t o_dpbuf = ws.take(2 * rows * ldp, wdt);
    ws.mark_zeroed();
    const size_t o_dh = ws.take(B * H, acc);
    ws.allocate(dy);
    ws.view(o_dh, acc, {B, H}).copy_(dh_n.reshape({B, H}));
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
    a.dpbuf = ws.ptr<W>(o_dpbuf);
    a.barrier = ws.ptr<unsigned int>(o_barrier);
    a.T_ = T; a.B = B; a.H = H;
    a.ldp = ldp; a.dp_stride = rows * ldp;
    a.g = g;
    a.reverse = reverse ? 1 : 0;
    launch_cooperative(gru_bwd_kernel<Tt, Eng, S>, p.grid, kThreads, p.smem, a, dev, "gru_bwd", p.ctas_per_sm);
  });
  return {dxproj, dh0, dhn};
}

}  // namespace fusedrnn
