// LSTM recurrence, forward: one persistent cooperative kernel per (layer, direction) call.
//
// Design (see common.cuh for the GEMM engines and the exchange protocols, fusedrnn/cuda_plan.h for
// the geometry and its cost model):
//   * the grid is gu unit slices x gb batch groups.  CTA (iu, ib) owns hidden units
//     [iu*U, iu*U + U) with all four gates: W_hh rows {gate*H + u}, staged once into shared memory
//     (fragment order for tensor cores) and kept for every step, and serves batch rows
//     [ib*Bg, ib*Bg + Bg).  Batch groups are independent recurrences: they never wait for each other.
//   * per step: out[4U x Bg] = W_slice . h_{t-1}^T on tensor cores (K split over the 8 warps, fp32
//     partials reduced in shared memory), then the pointwise cell (cell_math.h) for (unit, batch):
//     c stays fp32 (registers for the items a thread owns in the first wave, else a workspace the
//     CTA alone touches), h_t goes to the double-buffered exchange buffer first; y, the saved gates
//     and cell states (training only: `save`) are stored after the exchange is published.  With a
//     projection (P < H) the CTA also owns P-rows of W_hr: m_t is exchanged, then h_t = W_hr_slice . m_t.
//   * padded steps (t >= lengths[b]) copy h, keep c, write zeros to y / gates / cs.
//
// Cost per step at the design point H = 768, B = 16, bf16 (no projection, H200, planner's choice):
//   FLOP 2*B*H*4H = 75.5 MFLOP; U = 16 -> 48 CTAs, 64 W rows x 768 x 2 B = 96 KB smem each,
//   4 m-tiles x 2 n-tiles x 48 k-tiles = 384 mma per CTA; 24 KB of h_{t-1} per CTA (flag words: 48 KB);
//   predicted 1.7 us per step (BENCHMARKS.md, "CUDA design round 2").
#include "common.cuh"

namespace fusedrnn {
namespace cuda_detail {
namespace {

template <typename T>
struct LstmFwdArgs {
  const T* xproj;      // (T, B, 4H)
  const T* w_hh;       // (4H, P)
  const T* b_hh;       // (4H) or null
  const T* w_hr;       // (P, H) or null
  const int64_t* lengths;  // (B) or null
  T* y;                // (T, B, P)
  T* h_n;              // (B, P)
  T* c_n;              // (B, H)
  T* gates;            // (T, B, 4H), or null: inference (nothing saved)
  acc_t<T>* cs;        // (T, B, H), or null
  acc_t<T>* c_state;   // (B, H) workspace, = c0 on entry
  void* hbuf;          // (2, gb*Bgp, ldh) exchange words, [0] = h0 on entry, zero padding
  void* mbuf;          // (2, gb*Bgp, ldm) exchange words of m (projection), zero padding
  unsigned int* barrier;  // one counter per batch group (barrier protocol)
  int64_t T_, B, H, P;
  int64_t ldh, ldm, hbuf_stride, mbuf_stride;
  Geom g;
  int reverse;
};

// Stores of one pointwise item that no CTA reads during the launch (kept in registers across the
// exchange's publication, see StepSync).
template <typename T, typename A>
struct CellRec {
  int64_t row = 0;  // t * B + b
  int64_t col = 0;  // unit (m-phase) or P-row (projection phase)
  T h, i, f, g, o;
  A c;
  bool on = false, valid = false;
};

template <typename T, class Eng, int S>
__global__ void __launch_bounds__(kThreads, 1) lstm_fwd_kernel(const LstmFwdArgs<T> a) {
  using A = typename Eng::acc_t;
  using X = Xchg<T, S>;
  using W = typename X::word_t;
  constexpr int BN = Eng::BN;
  constexpr int kWave = kThreads * kMaxItems;
  const Geom& g = a.g;
  unsigned char* const smem = dev::dynamic_smem();
  uint4* ws_hh = reinterpret_cast<uint4*>(smem);
  size_t off = align16(Eng::w_bytes(g.a.MT, g.a.KC));
  uint4* ws_hr = reinterpret_cast<uint4*>(smem + off);
  const bool proj = a.w_hr != nullptr;
  if (proj) off += align16(Eng::w_bytes(g.b.MT, g.b.KC));
  A* red = reinterpret_cast<A*>(smem + off);
  const bool save = a.gates != nullptr;

  const int64_t H = a.H, P = a.P, B = a.B, G = 4 * H;
  const int tid = static_cast<int>(dev::thread_idx());
  const Place pl = place_of(g, B);
  const int U = g.U;
  const int64_t u0 = int64_t(pl.iu) * U;
  const int nu = static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(U), H - u0)));
  const int64_t p0 = int64_t(pl.iu) * g.Up;
  const int np = proj ? static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(g.Up), P - p0))) : 0;

  // Stage this CTA's weights once.  Local W_hh row r = gate*U + j  <->  global row gate*H + u0 + j.
  Eng::stage_w(ws_hh, g.a.MT, g.a.KC, [&](int r, int k) -> A {
    const int gate = r / U, j = r % U;
    if (gate >= 4 || j >= nu || k >= P) return A(0);
    return to_acc(a.w_hh[(gate * H + u0 + j) * P + k]);
  });
  if (proj) {
    Eng::stage_w(ws_hr, g.b.MT, g.b.KC, [&](int r, int k) -> A {
      if (r >= np || k >= H) return A(0);
      return to_acc(a.w_hr[(p0 + r) * H + k]);
    });
  }
  dev::sync_threads();

  const int rows_hh = g.a.MT * 16, rows_hr = g.b.MT * 16;
  W* const hbuf = static_cast<W*>(a.hbuf) + pl.xrow0 * a.ldh;  // this group's rows
  W* const mbuf = proj ? static_cast<W*>(a.mbuf) + pl.xrow0 * a.ldm : nullptr;

  // Latency hiding: the items of the first wave of the first batch pass (item i of a thread:
  // index tid + i*kThreads) are the same every step, so their cell states stay in registers and
  // their xproj values for the next step are loaded before the exchange wait.
  const int first_items = nu * static_cast<int>(dev::min(int64_t(BN), int64_t(pl.nb)));
  bool res[kMaxItems];
  int rj[kMaxItems];
  int64_t rb[kMaxItems];
  A r_c[kMaxItems];
  FixedGateInputs<4, T, A> fx[kMaxItems];
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    const int idx = tid + i * kThreads;
    res[i] = idx < first_items;
    rj[i] = res[i] ? idx % nu : 0;
    rb[i] = res[i] ? pl.b0 + idx / nu : 0;
    r_c[i] = res[i] ? a.c_state[rb[i] * H + u0 + rj[i]] : A(0);
    fx[i].load_bias(res[i], a.b_hh, H, u0 + rj[i]);
  }
  auto prefetch = [&](int64_t t) {
#pragma unroll
    for (int i = 0; i < kMaxItems; ++i) fx[i].load_step(res[i], a.xproj, a.lengths, t, B, H, rb[i], u0 + rj[i]);
  };
  prefetch(a.reverse ? a.T_ - 1 : 0);

  const T zero = zero_of<T>();
  auto flush_cell = [&](const CellRec<T, A>& r) {  // y (no projection), gates, cell state
    if (!r.on) return;
    if (!proj) a.y[r.row * P + r.col] = r.valid ? r.h : zero;
    if (save) {
      T* gp = a.gates + r.row * G + r.col;
      gp[0] = r.valid ? r.i : zero;
      gp[H] = r.valid ? r.f : zero;
      gp[2 * H] = r.valid ? r.g : zero;
      gp[3 * H] = r.valid ? r.o : zero;
      a.cs[r.row * H + r.col] = r.valid ? r.c : A(0);
    }
  };
  auto flush_proj = [&](const CellRec<T, A>& r) {  // y of a projected row
    if (r.on) a.y[r.row * P + r.col] = r.valid ? r.h : zero;
  };

  StepSync<S> sync{a.barrier + pl.ib * kCounterStride, static_cast<unsigned int>(g.gu), g.legacy != 0};
  for (int64_t s = 0; s < a.T_; ++s) {
    const int64_t t = a.reverse ? a.T_ - 1 - s : s;
    const W* hcur = hbuf + (s & 1) * a.hbuf_stride;
    W* hnxt = hbuf + ((s + 1) & 1) * a.hbuf_stride;
    W* mcur = proj ? mbuf + (s & 1) * a.mbuf_stride : nullptr;
    const uint32_t tag_h = X::tag(s), tag_n = X::tag(s + 1);
    CellRec<T, A> rec[kMaxItems];

    // ---- gates = xproj_t + h_{t-1} W_hh^T + b_hh, cell update (own units)
    for (int64_t n0 = 0; n0 < pl.nb; n0 += BN) {
      Eng::template compute<X>(ws_hh, g.a.MT, g.a.KC, hcur + n0 * a.ldh, a.ldh, red, Check{tag_h, pl.nb - n0, P});
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
          CellRec<T, A> r;
          r.on = true;
          r.row = t * B + b;
          r.col = u;
          r.valid = fixed ? fx[i].valid : (a.lengths == nullptr || t < dev::ld_nc(a.lengths + b));
          if (r.valid) {
            A pre[4];
            if (fixed) {
#pragma unroll
              for (int gi = 0; gi < 4; ++gi)
                pre[gi] = red_sum(red, rows_hh, BN, gi * U + j, n) + fx[i].x[gi] + fx[i].bias[gi];
            } else {
              const T* xp = a.xproj + r.row * G + u;
#pragma unroll
              for (int gi = 0; gi < 4; ++gi) {
                pre[gi] = red_sum(red, rows_hh, BN, gi * U + j, n) + A(to_acc(xp[gi * H]));
                if (a.b_hh) pre[gi] += A(to_acc(a.b_hh[gi * H + u]));
              }
            }
            const A c_prev = fixed ? r_c[i] : a.c_state[b * H + u];
            const LstmStep<A> st = lstm_cell_forward<A>(pre[0], pre[1], pre[2], pre[3], c_prev);
            r.h = from_acc<T>(st.h);
            // the exchange first: it is on the critical path
            if (proj) X::put(mcur + (n0 + n) * a.ldm + u, r.h, tag_n);
            else X::put(hnxt + (n0 + n) * a.ldh + u, r.h, tag_n);
            r.i = from_acc<T>(st.i);
            r.f = from_acc<T>(st.f);
            r.g = from_acc<T>(st.g);
            r.o = from_acc<T>(st.o);
            r.c = st.c;
            if (fixed) r_c[i] = st.c;
            else a.c_state[b * H + u] = st.c;
          } else if (!proj) {
            X::put(hnxt + (n0 + n) * a.ldh + u, X::get(hcur + (n0 + n) * a.ldh + u), tag_n);
          } else {
            X::put(mcur + (n0 + n) * a.ldm + u, zero, tag_n);  // read (and discarded) by the W_hr GEMM
          }
          if (defer) rec[i] = r;
          else flush_cell(r);
        }
      }
      dev::sync_threads();
    }
    if (proj) {
      // ---- m_t published; h_t = m_t W_hr^T (own projection rows)
      sync.arrive();
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) flush_cell(rec[i]);
      sync.wait();
      CellRec<T, A> prec[kMaxItems];
      for (int64_t n0 = 0; n0 < pl.nb; n0 += BN) {
        Eng::template compute<X>(ws_hr, g.b.MT, g.b.KC, mcur + n0 * a.ldm, a.ldm, red, Check{tag_n, pl.nb - n0, H});
        dev::sync_threads();
        const int nb = static_cast<int>(dev::min(int64_t(BN), pl.nb - n0));
        const int items = np * nb;
        const bool last_pass = n0 + BN >= pl.nb;
        for (int base = 0; base < items; base += kWave) {
          const bool defer = last_pass && base + kWave >= items && !g.legacy;
#pragma unroll
          for (int i = 0; i < kMaxItems; ++i) {
            const int idx = base + i * kThreads + tid;
            if (idx >= items) continue;
            const int j = idx % np, n = idx / np;
            const int64_t b = pl.b0 + n0 + n, p = p0 + j;
            CellRec<T, A> r;
            r.on = true;
            r.row = t * B + b;
            r.col = p;
            r.valid = a.lengths == nullptr || t < dev::ld_nc(a.lengths + b);
            if (r.valid) {
              r.h = from_acc<T>(red_sum(red, rows_hr, BN, j, n));
              X::put(hnxt + (n0 + n) * a.ldh + p, r.h, tag_n);
            } else {
              X::put(hnxt + (n0 + n) * a.ldh + p, X::get(hcur + (n0 + n) * a.ldh + p), tag_n);
            }
            if (defer) prec[i] = r;
            else flush_proj(r);
          }
        }
        dev::sync_threads();
      }
      if (s + 1 < a.T_) sync.arrive();
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) flush_proj(prec[i]);
    } else {
      if (s + 1 < a.T_) sync.arrive();
#pragma unroll
      for (int i = 0; i < kMaxItems; ++i) flush_cell(rec[i]);
    }
    if (s + 1 < a.T_) {
      prefetch(a.reverse ? t - 1 : t + 1);
      sync.wait();
    }
  }
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    if (res[i]) a.c_state[rb[i] * H + u0 + rj[i]] = r_c[i];
  }
  dev::sync_threads();

  // ---- final states of the own slice and group rows (written by this CTA only)
  const W* hfin = hbuf + (a.T_ & 1) * a.hbuf_stride;
  const int own = proj ? np : nu;
  const int64_t own0 = proj ? p0 : u0;
  for (int idx = tid; idx < own * pl.nb; idx += kThreads) {
    const int j = idx % own, n = idx / own;
    a.h_n[(pl.b0 + n) * P + own0 + j] = X::get(hfin + n * a.ldh + own0 + j);
  }
  for (int idx = tid; idx < nu * pl.nb; idx += kThreads) {
    const int j = idx % nu, n = idx / nu;
    const int64_t b = pl.b0 + n;
    a.c_n[b * H + u0 + j] = from_acc<T>(a.c_state[b * H + u0 + j]);
  }
}

}  // namespace
}  // namespace cuda_detail

Tensor5 lstm_fwd_cuda(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                      const Tensor& c0, const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                      bool allow_tf32, bool save) {
  using namespace cuda_detail;
  const checks::Dims d = checks::lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths);
  check_cuda_args("lstm_fwd", true,
                  {{"xproj", &xproj}, {"w_hh", &w_hh}, {"b_hh", checks::opt(b_hh)}, {"h0", &h0}, {"c0", &c0},
                   {"w_hr", checks::opt(w_hr)}, {"lengths", checks::opt(lengths)}});
  const DeviceGuard guard(xproj.device());
  const int64_t T = d.T, B = d.B, H = d.H, G = 4 * H, P = d.P;
  const bool proj = checks::defined(w_hr);
  const auto dt = xproj.scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  auto same = [&](const Tensor& t) { return t.scalar_type() == dt ? t : t.to(dt); };
  const Tensor w = same(w_hh);
  const Tensor bh = (b_hh.has_value() && b_hh->defined()) ? same(*b_hh) : Tensor();
  const Tensor wr = proj ? same(*w_hr) : Tensor();

  auto opts = xproj.options();
  Tensor y = at::empty({T, B, P}, opts);
  Tensor h_n = at::empty({B, P}, opts);
  Tensor c_n = at::empty({B, H}, opts);
  Tensor gates = save ? at::empty({T, B, G}, opts) : at::empty({0}, opts);
  Tensor cs = save ? at::empty({T, B, H}, opts.dtype(acc)) : at::empty({0}, opts.dtype(acc));
  if (T == 0 || B == 0) {
    h_n.copy_(h0.reshape({B, P}));
    c_n.copy_(c0.reshape({B, H}));
    return {y, h_n, c_n, gates, cs};
  }

  const int device = xproj.get_device();
  const DeviceLimits dev = device_limits(device);
  const plan::Plan p = make_plan(plan::Pass::kLstmFwd, dt, allow_tf32, H, P, B, proj, save, dev);
  if (!p.ok) raise_not_fit("lstm_fwd", p, dt, H, P, proj, dev);
  if (p.stepwise) {
    lstm_fwd_stepwise(xproj, w, bh, h0, c0, lengths, reverse, y, h_n, c_n, gates, cs, save);
    return {y, h_n, c_n, gates, cs};
  }
  dispatch_plan(dt, allow_tf32, p, [&](auto tag, auto sync) {
    using Tt = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    constexpr int S = decltype(sync)::value;
    using W = typename Xchg<Tt, S>::word_t;
    const Geom g = geom_of(p, Eng::BN);
    const int64_t rows = int64_t(p.gb) * g.Bgp;
    const int64_t ldh = xchg_ld(P), ldm = xchg_ld(H);
    const auto wdt = word_dtype<W>();
    Workspace ws;  // zeroed: counters, hbuf (2, rows, ldh), mbuf (2, rows, ldm); then c_state (B, H) = c0
    const size_t o_barrier = ws.take(int64_t(p.gb) * kCounterStride, at::kInt);
    const size_t o_hbuf = ws.take(2 * rows * ldh, wdt);
    const size_t o_mbuf = proj ? ws.take(2 * rows * ldm, wdt) : 0;
    ws.mark_zeroed();
    const size_t o_c = ws.take(B * H, acc);
    ws.allocate(xproj);
    fill_exchange(ws.view(o_hbuf, wdt, {2, rows, ldh}).select(0, 0), h0.reshape({B, P}), g.Bg, g.Bgp, p.gb,
                  S == kSyncFlags, dt);
    ws.view(o_c, acc, {B, H}).copy_(c0.reshape({B, H}));
    LstmFwdArgs<Tt> a;
    a.xproj = ptr<Tt>(xproj);
    a.w_hh = ptr<Tt>(w);
    a.b_hh = bh.defined() ? ptr<Tt>(bh) : nullptr;
    a.w_hr = proj ? ptr<Tt>(wr) : nullptr;
    a.lengths = lengths_ptr(lengths);
    a.y = ptr<Tt>(y);
    a.h_n = ptr<Tt>(h_n);
    a.c_n = ptr<Tt>(c_n);
    a.gates = save ? ptr<Tt>(gates) : nullptr;
    a.cs = save ? ptr<acc_t<Tt>>(cs) : nullptr;
    a.c_state = ws.ptr<acc_t<Tt>>(o_c);
    a.hbuf = ws.ptr<W>(o_hbuf);
    a.mbuf = proj ? ws.ptr<W>(o_mbuf) : nullptr;
    a.barrier = ws.ptr<unsigned int>(o_barrier);
    a.T_ = T; a.B = B; a.H = H; a.P = P;
    a.ldh = ldh; a.ldm = ldm; a.hbuf_stride = rows * ldh; a.mbuf_stride = rows * ldm;
    a.g = g;
    a.reverse = reverse ? 1 : 0;
    launch_cooperative(lstm_fwd_kernel<Tt, Eng, S>, p.grid, kThreads, p.smem, a, dev, "lstm_fwd", p.ctas_per_sm);
  });
  return {y, h_n, c_n, gates, cs};
}

}  // namespace fusedrnn
