// LSTM recurrence, backward: one persistent cooperative kernel walking the steps in the opposite
// order of the forward.  Only the sequential part is here: dxproj (= d pre-activations), dh0, dc0
// and, with a projection, dh_seq; the weight gradients are GEMMs over all steps in Python.
//
// Design (see lstm_fwd.cu, common.cuh, fusedrnn/cuda_plan.h):
//   * grid gu unit slices x gb batch groups.  CTA (iu, ib) owns hidden units [iu*U, iu*U + U) for
//     the pointwise part (dc in registers or a workspace it alone touches) and the rows p of W_hh^T
//     (Up x 4H, staged once in shared memory) for dh_{t-1} = dpre_t . W_hh, for the group's rows.
//     U = 16*MT (full row tiles, up to 64).
//   * no projection, per step: pointwise (dpre of own units -> the double-buffered exchange, then
//     dxproj) | exchange | dh = dpre . W_hh^T-slice (tensor cores) for own units.  One exchange.
//   * projection (P < H): dh lives on P; CTA also owns P-rows [iu*Up, iu*Up + Up):
//     dh_tot = dh + dy -> exchange (then dh_seq) | dm = dh_tot . W_hr (rows of W_hr^T for own units)
//     + pointwise -> dpre exchange | dh = dpre . W_hh (own P-rows of W_hh^T).  Two exchanges.
//   * padded steps: dxproj / dh_seq zero, dh and dc pass through unchanged (zeros are still
//     exchanged: readers need every real row of every step).
// Per step at H = 768, B = 16, bf16 (planner's choice on an H200): U = 32, 24 unit slices x 2
// batch groups, 32 x 3072 x 2 B = 192 KB of W_hh^T per CTA; each CTA reads its group's dpre_t
// (8 x 3072 x 2 B = 48 KB) from L2 and issues 2 m-tiles x 1 n-tile x 192 k-tiles = 384 mma;
// predicted 2.5 us per step (BENCHMARKS.md, "CUDA design round 2").
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
  void* dpbuf;             // (2, gb*Bgp, ldp) exchange words of dpre, zero padding
  void* dtbuf;             // (2, gb*Bgp, ldq) exchange words of dh_tot (projection), zero padding
  unsigned int* barrier;   // one counter per batch group (barrier protocol)
  int64_t T_, B, H, P;
  int64_t ldp, ldq, dp_stride, dt_stride;
  Geom g;                  // a: W_hh^T slice (Up rows x 4H); b: W_hr^T slice (U rows x P)
  int reverse;
};

template <typename T>
struct GradRec {  // dxproj of one unit (or dh_seq of one P-row), stored after the exchange
  int64_t row = 0, col = 0;
  T v[4];
  bool on = false, valid = false;
};

template <typename T, class Eng, int S>
__global__ void __launch_bounds__(kThreads, 1) lstm_bwd_kernel(const LstmBwdArgs<T> a) {
  using A = typename Eng::acc_t;
  using X = Xchg<T, S>;
  using W = typename X::word_t;
  constexpr int BN = Eng::BN;
  constexpr int kWave = kThreads * kMaxItems;
  const Geom& g = a.g;
  unsigned char* const smem = dev::dynamic_smem();
  const bool proj = a.w_hr != nullptr;
  uint4* ws_a = reinterpret_cast<uint4*>(smem);
  size_t off = align16(Eng::w_bytes(g.a.MT, g.a.KC));
  uint4* ws_b = reinterpret_cast<uint4*>(smem + off);
  if (proj) off += align16(Eng::w_bytes(g.b.MT, g.b.KC));
  A* red = reinterpret_cast<A*>(smem + off);

  const int64_t H = a.H, P = a.P, B = a.B, G = 4 * H, T_ = a.T_;
  const int tid = static_cast<int>(dev::thread_idx());
  const Place pl = place_of(g, B);
  const int U = g.U;
  const int64_t u0 = int64_t(pl.iu) * U;
  const int nu = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(U), H - u0)));
  const int64_t p0 = int64_t(pl.iu) * g.Up;
  const int np = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(g.Up), P - p0)));

  // W_hh^T rows p0..p0+np: row r, column k = W_hh[k][p0 + r].
  Eng::stage_w(ws_a, g.a.MT, g.a.KC, [&](int r, int k) -> A {
    if (r >= np || k >= G) return A(0);
    return to_acc(a.w_hh[int64_t(k) * P + p0 + r]);
  });
  if (proj) {  // W_hr^T rows u0..u0+nu: row r, column k = W_hr[k][u0 + r].
    Eng::stage_w(ws_b, g.b.MT, g.b.KC, [&](int r, int k) -> A {
      if (r >= nu || k >= P) return A(0);
      return to_acc(a.w_hr[int64_t(k) * H + u0 + r]);
    });
  }
  dev::sync_threads();

  const int rows_a = g.a.MT * 16, rows_b = g.b.MT * 16;
  W* const dpbuf = static_cast<W*>(a.dpbuf) + pl.xrow0 * a.ldp;  // this group's rows
  W* const dtbuf = proj ? static_cast<W*>(a.dtbuf) + pl.xrow0 * a.ldq : nullptr;

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

  // Latency hiding (as in lstm_fwd.cu): the items of the first wave of the first batch pass are
  // the same every step (in the pointwise phase and, without projection, in the dh epilogue):
  // their dc (and dh) stay in registers and their saved tensors for the next step are loaded
  // before the exchange wait.
  const int first_items = static_cast<int>(
      dev::min(int64_t(kWave), int64_t(nu) * dev::min(int64_t(BN), int64_t(pl.nb))));
  bool res[kMaxItems];
  int rj[kMaxItems];
  int64_t rb[kMaxItems];
  A r_dc[kMaxItems], r_dh[kMaxItems];
  Pre r_pre[kMaxItems];
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    const int idx = tid + i * kThreads;
    res[i] = idx < first_items;
    rj[i] = res[i] ? idx % nu : 0;
    rb[i] = res[i] ? pl.b0 + idx / nu : 0;
    r_dc[i] = res[i] ? a.dc_state[rb[i] * H + u0 + rj[i]] : A(0);
    r_dh[i] = (res[i] && !proj) ? a.dh_state[rb[i] * P + u0 + rj[i]] : A(0);
    if (res[i]) r_pre[i] = load_pre(a.reverse ? 0 : T_ - 1, rj[i], rb[i]);
  }

  const T zero = zero_of<T>();
  auto flush_dx = [&](const GradRec<T>& r) {
    if (!r.on) return;
    T* dx = a.dxproj + r.row * G + r.col;
#pragma unroll
    for (int k = 0; k < 4; ++k) dx[k * H] = r.valid ? r.v[k] : zero;
  };
  auto flush_seq = [&](const GradRec<T>& r) {
    if (r.on) a.dh_seq[r.row * P + r.col] = r.valid ? r.v[0] : zero;
  };

  StepSync<S> sync{a.barrier + pl.ib * kCounterStride, static_cast<unsigned int>(g.gu), g.legacy != 0};
  for (int64_t s = 0; s < T_; ++s) {
    const int64_t t = a.reverse ? s : T_ - 1 - s;  // opposite of the forward order
    const int64_t t_next = a.reverse ? t + 1 : t - 1;
    W* dp = dpbuf + (s & 1) * a.dp_stride;
    const uint32_t tag = X::tag(s + 1);
    auto is_valid = [&](int64_t b) { return a.lengths == nullptr || t < dev::ld_nc(a.lengths + b); };

    // Pointwise cell backward of item (j, n) given dh reaching m_t: publishes dpre, returns the
    // dxproj record and updates dc.
    auto cell = [&](int i, bool fixed, int j, int n, A dh_m_extra, bool dm_given) -> GradRec<T> {
      const int64_t b = pl.b0 + n, u = u0 + j;
      const Pre q = fixed ? r_pre[i] : load_pre(t, j, b);
      GradRec<T> r;
      r.on = true;
      r.row = t * B + b;
      r.col = u;
      r.valid = q.valid;
      W* dpr = dp + int64_t(n) * a.ldp + u;
      if (!q.valid) {
#pragma unroll
        for (int k = 0; k < 4; ++k) X::put(dpr + k * H, zero, tag);
        return r;  // dc passes through
      }
      const A dc = fixed ? r_dc[i] : a.dc_state[b * H + u];
      const A dh_m = dm_given ? dh_m_extra : (fixed ? r_dh[i] : a.dh_state[b * P + u]) + q.dy;
      const LstmGrad<A> d = lstm_cell_backward<A>(q.i, q.f, q.g, q.o, q.c, q.c_prev, dh_m, dc);
      r.v[0] = from_acc<T>(d.d_i);
      r.v[1] = from_acc<T>(d.d_f);
      r.v[2] = from_acc<T>(d.d_g);
      r.v[3] = from_acc<T>(d.d_o);
#pragma unroll
      for (int k = 0; k < 4; ++k) X::put(dpr + k * H, r.v[k], tag);  // the exchange first
      if (fixed) r_dc[i] = d.dc_prev;
      else a.dc_state[b * H + u] = d.dc_prev;
      return r;
    };

    GradRec<T> rec[kMaxItems];
    if (!proj) {
      const int items = nu * pl.nb;
      for (int base = 0; base < items; base += kWave) {
        const bool defer = base + kWave >= items && !g.legacy;
#pragma unroll
        for (int i = 0; i < kMaxItems; ++i) {
          const int idx = base + i * kThreads + tid;
          if (idx >= items) continue;
          const GradRec<T> r = cell(i, base == 0 && res[i], idx % nu, idx / nu, A(0), false);
          if (defer) rec[i] = r;
          else flush_dx(r);
        }
      }
      sync.arrive();
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) flush_dx(rec[i]);
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) {
        if (res[i] && s + 1 < T_) r_pre[i] = load_pre(t_next, rj[i], rb[i]);
      }
      sync.wait();
    } else {
      // dh_tot for own P-rows -> exchange (then dh_seq)
      W* dt = dtbuf + (s & 1) * a.dt_stride;
      const int items = np * pl.nb;
      for (int base = 0; base < items; base += kWave) {
        const bool defer = base + kWave >= items && !g.legacy;
#pragma unroll
        for (int i = 0; i < kMaxItems; ++i) {
          const int idx = base + i * kThreads + tid;
          if (idx >= items) continue;
          const int j = idx % np, n = idx / np;
          const int64_t b = pl.b0 + n, p = p0 + j;
          GradRec<T> r;
          r.on = true;
          r.row = t * B + b;
          r.col = p;
          r.valid = is_valid(b);
          r.v[0] = r.valid ? from_acc<T>(a.dh_state[b * P + p] + A(to_acc(a.dy[r.row * P + p]))) : zero;
          X::put(dt + int64_t(n) * a.ldq + p, r.v[0], tag);
          if (defer) rec[i] = r;
          else flush_seq(r);
        }
      }
      sync.arrive();
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) flush_seq(rec[i]);
      sync.wait();
      // dm = dh_tot . W_hr for own units, then the cell
      GradRec<T> drec[kMaxItems];
      for (int64_t n0 = 0; n0 < pl.nb; n0 += BN) {
        Eng::template compute<X>(ws_b, g.b.MT, g.b.KC, dt + n0 * a.ldq, a.ldq, red, Check{tag, pl.nb - n0, P});
        dev::sync_threads();
        const int nb = static_cast<int>(dev::min(int64_t(BN), pl.nb - n0));
        const int pitems = nu * nb;
        const bool last_pass = n0 + BN >= pl.nb;
        for (int base = 0; base < pitems; base += kWave) {
          const bool defer = last_pass && base + kWave >= pitems && !g.legacy;
#pragma unroll
          for (int i = 0; i < kMaxItems; ++i) {
            const int idx = base + i * kThreads + tid;
            if (idx >= pitems) continue;
            const int j = idx % nu, n = idx / nu;
            const A dm = red_sum(red, rows_b, BN, j, n);
            const GradRec<T> r = cell(i, n0 == 0 && base == 0 && res[i], j, static_cast<int>(n0) + n, dm, true);
            if (defer) drec[i] = r;
            else flush_dx(r);
          }
        }
        dev::sync_threads();
      }
      sync.arrive();
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) flush_dx(drec[i]);
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) {
        if (res[i] && s + 1 < T_) r_pre[i] = load_pre(t_next, rj[i], rb[i]);
      }
      sync.wait();
    }

    // dh_{t-1} = dpre_t . W_hh for own P-rows (padded steps: dh unchanged)
    for (int64_t n0 = 0; n0 < pl.nb; n0 += BN) {
      Eng::template compute<X>(ws_a, g.a.MT, g.a.KC, dp + n0 * a.ldp, a.ldp, red, Check{tag, pl.nb - n0, G});
      dev::sync_threads();
      const int nb = static_cast<int>(dev::min(int64_t(BN), pl.nb - n0));
      const int items = np * nb;
      for (int base = 0; base < items; base += kWave) {
#pragma unroll
        for (int i = 0; i < kMaxItems; ++i) {
          const int idx = base + i * kThreads + tid;
          if (idx >= items) continue;
          const bool fixed = !proj && n0 == 0 && base == 0 && res[i];
          const int j = idx % np, n = idx / np;
          const int64_t b = pl.b0 + n0 + n;
          if (is_valid(b)) {
            const A v = red_sum(red, rows_a, BN, j, n);
            if (fixed) r_dh[i] = v;
            else a.dh_state[b * P + p0 + j] = v;
          }
        }
      }
      dev::sync_threads();
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    if (res[i]) {
      a.dc_state[rb[i] * H + u0 + rj[i]] = r_dc[i];
      if (!proj) a.dh_state[rb[i] * P + u0 + rj[i]] = r_dh[i];
    }
  }
  dev::sync_threads();

  for (int idx = tid; idx < np * pl.nb; idx += kThreads) {
    const int j = idx % np, n = idx / np;
    const int64_t b = pl.b0 + n;
    a.dh0[b * P + p0 + j] = from_acc<T>(a.dh_state[b * P + p0 + j]);
  }
  for (int idx = tid; idx < nu * pl.nb; idx += kThreads) {
    const int j = idx % nu, n = idx / nu;
    const int64_t b = pl.b0 + n;
    a.dc0[b * H + u0 + j] = from_acc<T>(a.dc_state[b * H + u0 + j]);
  }
}

}  // namespace
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
  const plan::Plan p = make_plan(plan::Pass::kLstmBwd, dt, allow_tf32, H, P, B, proj, true, dev);
  if (!p.ok) raise_not_fit("lstm_bwd", p, dt, H, P, proj, dev);
  if (p.stepwise) {
    lstm_bwd_stepwise(dy, dh_n, dc_n, w, c0c, gatesc, csc, lengths, reverse, dxproj, dh0, dc0);
    return {dxproj, dh0, dc0, dh_seq};
  }
  dispatch_plan(dt, allow_tf32, p, [&](auto tag, auto sync) {
    using Tt = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    constexpr int S = decltype(sync)::value;
    using W = typename Xchg<Tt, S>::word_t;
    const Geom g = geom_of(p, Eng::BN);
    const int64_t rows = int64_t(p.gb) * g.Bgp;
    const int64_t ldp = xchg_ld(G), ldq = xchg_ld(P);
    const auto wdt = word_dtype<W>();
    // zeroed: counters, dpbuf (2, rows, ldp), dtbuf (2, rows, ldq); then dh_state = dh_n, dc_state = dc_n
    Workspace ws;
    const size_t o_barrier = ws.take(int64_t(p.gb) * kCounterStride, at::kInt);
    const size_t o_dpbuf = ws.take(2 * rows * ldp, wdt);
    const size_t o_dtbuf = proj ? ws.take(2 * rows * ldq, wdt) : 0;
    ws.mark_zeroed();
    const size_t o_dh = ws.take(B * P, acc), o_dc = ws.take(B * H, acc);
    ws.allocate(dy);
    ws.view(o_dh, acc, {B, P}).copy_(dh_n.reshape({B, P}));
    ws.view(o_dc, acc, {B, H}).copy_(dc_n.reshape({B, H}));
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
    a.dpbuf = ws.ptr<W>(o_dpbuf);
    a.dtbuf = proj ? ws.ptr<W>(o_dtbuf) : nullptr;
    a.barrier = ws.ptr<unsigned int>(o_barrier);
    a.T_ = T; a.B = B; a.H = H; a.P = P;
    a.ldp = ldp; a.ldq = ldq; a.dp_stride = rows * ldp; a.dt_stride = rows * ldq;
    a.g = g;
    a.reverse = reverse ? 1 : 0;
    launch_cooperative(lstm_bwd_kernel<Tt, Eng, S>, p.grid, kThreads, p.smem, a, dev, "lstm_bwd", p.ctas_per_sm);
  });
  return {dxproj, dh0, dc0, dh_seq};
}

}  // namespace fusedrnn
