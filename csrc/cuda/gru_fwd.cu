// GRU recurrence, forward: one persistent cooperative kernel per call (same structure as
// lstm_fwd.cu, see the notes there, in common.cuh and in fusedrnn/cuda_plan.h).
//   * CTA (iu, ib) owns hidden units [iu*U, iu*U + U) with the rows {gate*H + u} (gate in r, z, n) of
//     W_hh in shared memory, U = floor(16*MT / 3) (5, 10, 16 or 21), and serves batch group ib.
//   * per step: hp = h_{t-1} W_hh^T (tensor cores) + b_hh, pointwise GRU cell (fp32 h kept in
//     registers or a workspace owned by the CTA; the rounded h_t goes to the double-buffered exchange
//     first), then y and (training) the saved gates [r, z, n, hn]; one exchange per step.
// Per step at H = 768, B = 16, bf16 on an H200 (planner's choice): U = 21, 37 CTAs, 63 x 768 x 2 B
// = 96 KB of bf16 W_hh per CTA, flag exchange: predicted 1.5 us per step.
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
  T* gates;                // (T, B, 4H) [r, z, n, hn], or null: inference (nothing saved)
  acc_t<T>* h_state;       // (B, H) workspace, = h0 on entry
  void* hbuf;              // (2, gb*Bgp, ldh) exchange words, [0] = h0 on entry, zero padding
  unsigned int* barrier;   // one counter per batch group (barrier protocol)
  int64_t T_, B, H;
  int64_t ldh, hbuf_stride;
  Geom g;
  int reverse;
};

template <typename T>
struct GruRec {  // y and the saved gates of one item, stored after the exchange
  int64_t row = 0, col = 0;
  T h, v[4];
  bool on = false, valid = false;
};

template <typename T, class Eng, int S>
__global__ void __launch_bounds__(kThreads, 1) gru_fwd_kernel(const GruFwdArgs<T> a) {
  using A = typename Eng::acc_t;
  using X = Xchg<T, S>;
  using W = typename X::word_t;
  constexpr int BN = Eng::BN;
  constexpr int kWave = kThreads * kMaxItems;
  const Geom& g = a.g;
  unsigned char* const smem = dev::dynamic_smem();
  uint4* ws = reinterpret_cast<uint4*>(smem);
  A* red = reinterpret_cast<A*>(smem + align16(Eng::w_bytes(g.a.MT, g.a.KC)));
  const bool save = a.gates != nullptr;

  const int64_t H = a.H, B = a.B, G = 3 * H, G4 = 4 * H;
  const int tid = static_cast<int>(dev::thread_idx());
  const Place pl = place_of(g, B);
  const int U = g.U;
  const int64_t u0 = int64_t(pl.iu) * U;
  const int nu = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(U), H - u0)));

  Eng::stage_w(ws, g.a.MT, g.a.KC, [&](int r, int k) -> A {
    const int gate = r / U, j = r % U;
    if (gate >= 3 || j >= nu || k >= H) return A(0);
    return to_acc(a.w_hh[(gate * H + u0 + j) * H + k]);
  });
  dev::sync_threads();

  const int rows = g.a.MT * 16;
  W* const hbuf = static_cast<W*>(a.hbuf) + pl.xrow0 * a.ldh;  // this group's rows

  // Latency hiding (as in lstm_fwd.cu): the items of the first wave of the first pass keep their
  // fp32 h in registers and have their xproj values loaded before the exchange wait.
  const int first_items = nu * static_cast<int>(dev::min(int64_t(BN), int64_t(pl.nb)));
  bool res[kMaxItems];
  int rj[kMaxItems];
  int64_t rb[kMaxItems];
  A r_h[kMaxItems];
  FixedGateInputs<3, T, A> fx[kMaxItems];
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    const int idx = tid + i * kThreads;
    res[i] = idx < first_items;
    rj[i] = res[i] ? idx % nu : 0;
    rb[i] = res[i] ? pl.b0 + idx / nu : 0;
    r_h[i] = res[i] ? a.h_state[rb[i] * H + u0 + rj[i]] : A(0);
    fx[i].load_bias(res[i], a.b_hh, H, u0 + rj[i]);
  }
  auto prefetch = [&](int64_t t) {
#pragma unroll
    for (int i = 0; i < kMaxItems; ++i) fx[i].load_step(res[i], a.xproj, a.lengths, t, B, H, rb[i], u0 + rj[i]);
  };
  prefetch(a.reverse ? a.T_ - 1 : 0);

  const T zero = zero_of<T>();
  auto flush = [&](const GruRec<T>& r) {
    if (!r.on) return;
    a.y[r.row * H + r.col] = r.valid ? r.h : zero;
    if (save) {
      T* gp = a.gates + r.row * G4 + r.col;
#pragma unroll
      for (int k = 0; k < 4; ++k) gp[k * H] = r.valid ? r.v[k] : zero;
    }
  };

  StepSync<S> sync{a.barrier + pl.ib * kCounterStride, static_cast<unsigned int>(g.gu), g.legacy != 0};
  for (int64_t s = 0; s < a.T_; ++s) {
    const int64_t t = a.reverse ? a.T_ - 1 - s : s;
    const W* hcur = hbuf + (s & 1) * a.hbuf_stride;
    W* hnxt = hbuf + ((s + 1) & 1) * a.hbuf_stride;
    const uint32_t tag_h = X::tag(s), tag_n = X::tag(s + 1);
    GruRec<T> rec[kMaxItems];
    for (int64_t n0 = 0; n0 < pl.nb; n0 += BN) {
      Eng::template compute<X>(ws, g.a.MT, g.a.KC, hcur + n0 * a.ldh, a.ldh, red, Check{tag_h, pl.nb - n0, H});
      dev::sync_threads();
      const int nb = static_cast<int>(dev::min(int64_t(BN), pl.nb - n0));
      const int items = nu * nb;
      const bool last_pass = n0 + BN >= pl.nb;
      for (int base = 0; base < items; base += kWave) {
        const bool defer = last_pass && base + kWave >= items && !g.legacy;
#pragma unroll
        for (int i = 0; i < kMaxItems; ++i) {
          const int idx = base + i * kThreads + tid;
          if (idx >= items) continue;
          const bool fixed = n0 == 0 && base == 0 && res[i];
          const int j = idx % nu, n = idx / nu;
          const int64_t b = pl.b0 + n0 + n, u = u0 + j;
          GruRec<T> r;
          r.on = true;
          r.row = t * B + b;
          r.col = u;
          r.valid = fixed ? fx[i].valid : (a.lengths == nullptr || t < dev::ld_nc(a.lengths + b));
          if (r.valid) {
            A hid[3], x[3];
            if (fixed) {
#pragma unroll
              for (int gi = 0; gi < 3; ++gi) {
                hid[gi] = red_sum(red, rows, BN, gi * U + j, n) + fx[i].bias[gi];
                x[gi] = fx[i].x[gi];
              }
            } else {
              const T* xp = a.xproj + r.row * G + u;
#pragma unroll
              for (int gi = 0; gi < 3; ++gi) {
                hid[gi] = red_sum(red, rows, BN, gi * U + j, n);
                if (a.b_hh) hid[gi] += A(to_acc(a.b_hh[gi * H + u]));
                x[gi] = to_acc(xp[gi * H]);
              }
            }
            const A h_prev = fixed ? r_h[i] : a.h_state[b * H + u];
            const GruStep<A> st = gru_cell_forward<A>(x[0], x[1], x[2], hid[0], hid[1], hid[2], h_prev);
            r.h = from_acc<T>(st.h);
            X::put(hnxt + (n0 + n) * a.ldh + u, r.h, tag_n);  // the exchange first: critical path
            r.v[0] = from_acc<T>(st.r);
            r.v[1] = from_acc<T>(st.z);
            r.v[2] = from_acc<T>(st.n);
            r.v[3] = from_acc<T>(hid[2]);
            if (fixed) r_h[i] = st.h;
            else a.h_state[b * H + u] = st.h;
          } else {
            X::put(hnxt + (n0 + n) * a.ldh + u, X::get(hcur + (n0 + n) * a.ldh + u), tag_n);
          }
          if (defer) rec[i] = r;
          else flush(r);
        }
      }
      dev::sync_threads();
    }
    if (s + 1 < a.T_) sync.arrive();
#pragma unroll
    for (int i = 0; i < kMaxItems; ++i) flush(rec[i]);
    if (s + 1 < a.T_) {
      prefetch(a.reverse ? t - 1 : t + 1);
      sync.wait();
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    if (res[i]) a.h_state[rb[i] * H + u0 + rj[i]] = r_h[i];
  }
  dev::sync_threads();
  for (int idx = tid; idx < nu * pl.nb; idx += kThreads) {
    const int j = idx % nu, n = idx / nu;
    const int64_t b = pl.b0 + n;
    a.h_n[b * H + u0 + j] = from_acc<T>(a.h_state[b * H + u0 + j]);
  }
}

}  // namespace
}  // namespace cuda_detail

Tensor3 gru_fwd_cuda(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                     const OptTensor& lengths, bool reverse, bool allow_tf32, bool save) {
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
  Tensor gates = save ? at::empty({T, B, 4 * H}, opts) : at::empty({0}, opts);
  if (T == 0 || B == 0) {
    h_n.copy_(h0.reshape({B, H}));
    return {y, h_n, gates};
  }
  const int device = xproj.get_device();
  const DeviceLimits dev = device_limits(device);
  const plan::Plan p = make_plan(plan::Pass::kGruFwd, dt, allow_tf32, H, H, B, false, save, dev);
  if (!p.ok) raise_not_fit("gru_fwd", p, dt, H, H, false, dev);
  if (p.stepwise) {
    gru_fwd_stepwise(xproj, w, bh, h0, lengths, reverse, y, h_n, gates, save);
    return {y, h_n, gates};
  }
  dispatch_plan(dt, allow_tf32, p, [&](auto tag, auto sync) {
    using Tt = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    constexpr int S = decltype(sync)::value;
    using W = typename Xchg<Tt, S>::word_t;
    const Geom g = geom_of(p, Eng::BN);
    const int64_t rows = int64_t(p.gb) * g.Bgp, ldh = xchg_ld(H);
    const auto wdt = word_dtype<W>();
    Workspace ws;  // zeroed: counters, hbuf (2, rows, ldh); then h_state (B, H) = h0
    const size_t o_barrier = ws.take(int64_t(p.gb) * kCounterStride, at::kInt);
    const size_t o_hbuf = ws.take(2 * rows * ldh, wdt);
    ws.mark_zeroed();
    const size_t o_h = ws.take(B * H, acc);
    ws.allocate(xproj);
    fill_exchange(ws.view(o_hbuf, wdt, {2, rows, ldh}).select(0, 0), h0.reshape({B, H}), g.Bg, g.Bgp, p.gb,
                  S == kSyncFlags, dt);
    ws.view(o_h, acc, {B, H}).copy_(h0.reshape({B, H}));
    GruFwdArgs<Tt> a;
    a.xproj = ptr<Tt>(xproj);
    a.w_hh = ptr<Tt>(w);
    a.b_hh = bh.defined() ? ptr<Tt>(bh) : nullptr;
    a.lengths = lengths_ptr(lengths);
    a.y = ptr<Tt>(y);
    a.h_n = ptr<Tt>(h_n);
    a.gates = save ? ptr<Tt>(gates) : nullptr;
    a.h_state = ws.ptr<acc_t<Tt>>(o_h);
    a.hbuf = ws.ptr<W>(o_hbuf);
    a.barrier = ws.ptr<unsigned int>(o_barrier);
    a.T_ = T; a.B = B; a.H = H;
    a.ldh = ldh; a.hbuf_stride = rows * ldh;
    a.g = g;
    a.reverse = reverse ? 1 : 0;
    launch_cooperative(gru_fwd_kernel<Tt, Eng, S>, p.grid, kThreads, p.smem, a, dev, "gru_fwd", p.ctas_per_sm);
  });
  return {y, h_n, gates};
}

}  // namespace fusedrnn
