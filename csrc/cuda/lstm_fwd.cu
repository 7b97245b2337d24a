// LSTM recurrence, forward: one persistent cooperative kernel per (layer, direction) call.
//
// Design (see common.cuh for the GEMM engines and the barrier):
//   * CTA i owns hidden units [i*U, i*U + U) with all four gates: W_hh rows {gate*H + u}, staged
//     once into shared memory (fragment order for tensor cores) and kept for every step.
//     U = floor(16*MT / 4) with MT = ceil(4*ceil(H/#SM)/16) m-tiles, so the row tiles are full and
//     the grid is ceil(H/U) <= #SM CTAs (one per SM).
//   * per step: out[4U x B] = W_slice . h_{t-1}^T on tensor cores (K split over the 8 warps, fp32
//     partials reduced in shared memory), then the pointwise cell (cell_math.h) for (unit, batch):
//     c stays fp32 in a global workspace owned by the CTA, h_t goes to a double-buffered, padded
//     exchange buffer; one grid barrier per step.  With a projection (P < H) the CTA also owns
//     P-rows of W_hr: m_t goes to an exchange buffer, barrier, h_t = W_hr_slice . m_t, barrier.
//   * padded steps (t >= lengths[b]) copy h, keep c, write zeros to y / gates / cs.
//
// Cost per step at the design point H = 768, B = 16, bf16 (no projection):
//   FLOP        2*B*H*4H = 75.5 MFLOP (tensor cores), pointwise ~0.3 MFLOP.
//   grid        U = 8 units (32 W rows, 2 m-tiles) -> 96 CTAs; W_hh slice 32 x 768 x 2 B = 48 KB smem.
//   per CTA     2 m-tiles x 2 n-tiles x 48 k-tiles = 192 mma.m16n8k16 (24 per warp);
//               96 KB of shared-memory A-fragment reads; 24 KB of h_{t-1} read from L2.
//   grid total  2.4 MB L2 -> SM (h broadcast), HBM: xproj 98 KB in, gates 98 KB + cs 49 KB +
//               y 25 KB out (~270 KB: 0.1 us at 3 TB/s), plus one grid barrier (~0.5-1 us).
//   floor       ~0.4 us (L2 broadcast) + barrier: the 1.5 us/step target is barrier-dominated.
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
  T* gates;            // (T, B, 4H)
  acc_t<T>* cs;        // (T, B, H)
  acc_t<T>* c_state;   // (B, H) workspace, = c0 on entry
  T* hbuf;             // (2, Bpad, ldh) exchange buffers, [0] = h0 on entry, zero padding
  T* mbuf;             // (Bpad, ldm) exchange buffer of m (projection), zero padding
  unsigned int* barrier;
  int64_t T_, B, H, P;
  int64_t ldh, ldm, hbuf_stride;
  int U, Up;           // units / projection rows per CTA
  SliceGeom g_hh, g_hr;
  int reverse;
};

template <typename T, class Eng>
__global__ void __launch_bounds__(kThreads, 1) lstm_fwd_kernel(const LstmFwdArgs<T> a) {
  using A = typename Eng::acc_t;
  constexpr int BN = Eng::BN;
  unsigned char* const smem = dev::dynamic_smem();
  uint4* ws_hh = reinterpret_cast<uint4*>(smem);
  size_t off = align16(Eng::w_bytes(a.g_hh.MT, a.g_hh.KC));
  uint4* ws_hr = reinterpret_cast<uint4*>(smem + off);
  const bool proj = a.w_hr != nullptr;
  if (proj) off += align16(Eng::w_bytes(a.g_hr.MT, a.g_hr.KC));
  A* red = reinterpret_cast<A*>(smem + off);

  const int64_t H = a.H, P = a.P, B = a.B, G = 4 * H;
  const int U = a.U;
  const int64_t u0 = int64_t(dev::block_idx()) * U;
  const int nu = static_cast<int>(dev::min(int64_t(U), H - u0));
  const int64_t p0 = int64_t(dev::block_idx()) * a.Up;
  const int np = proj ? static_cast<int>(dev::max(int64_t(0), dev::min(int64_t(a.Up), P - p0))) : 0;

  // Stage this CTA's weights once.  Local W_hh row r = gate*U + j  <->  global row gate*H + u0 + j.
  Eng::stage_w(ws_hh, a.g_hh.MT, a.g_hh.KC, [&](int r, int k) -> A {
    const int gate = r / U, j = r % U;
    if (gate >= 4 || j >= nu || k >= P) return A(0);
    return to_acc(a.w_hh[(gate * H + u0 + j) * P + k]);
  });
  if (proj) {
    Eng::stage_w(ws_hr, a.g_hr.MT, a.g_hr.KC, [&](int r, int k) -> A {
      if (r >= np || k >= H) return A(0);
      return to_acc(a.w_hr[(p0 + r) * H + k]);
    });
  }
  dev::sync_threads();

  const int rows_hh = a.g_hh.MT * 16, rows_hr = a.g_hr.MT * 16;

  // Latency hiding: the item (unit j, batch n) a thread handles first in the first batch pass is
  // the same every step, so its cell state stays in a register and its xproj values for the next
  // step are loaded before the grid barrier (off the critical path).
  const int first_nb = static_cast<int>(dev::min(int64_t(BN), B));
  const bool has_fixed = static_cast<int>(dev::thread_idx()) < nu * first_nb;
  const int fj = has_fixed ? static_cast<int>(dev::thread_idx()) % nu : 0;
  const int64_t fb = has_fixed ? static_cast<int>(dev::thread_idx()) / nu : 0;
  A f_c = has_fixed ? a.c_state[fb * H + u0 + fj] : A(0);
  FixedGateInputs<4, T, A> fx;
  fx.load_bias(has_fixed, a.b_hh, H, u0 + fj);
  auto prefetch = [&](int64_t t) { fx.load_step(has_fixed, a.xproj, a.lengths, t, B, H, fb, u0 + fj); };
  prefetch(a.reverse ? a.T_ - 1 : 0);

  unsigned int target = 0;
  for (int64_t s = 0; s < a.T_; ++s) {
    const int64_t t = a.reverse ? a.T_ - 1 - s : s;
    const T* hcur = a.hbuf + (s & 1) * a.hbuf_stride;
    T* hnxt = a.hbuf + ((s + 1) & 1) * a.hbuf_stride;

    // ---- gates = xproj_t + h_{t-1} W_hh^T + b_hh, cell update (own units)
    for (int64_t n0 = 0; n0 < B; n0 += BN) {
      Eng::compute(ws_hh, a.g_hh.MT, a.g_hh.KC, hcur + n0 * a.ldh, a.ldh, red);
      dev::sync_threads();
      const int nb = static_cast<int>(dev::min(int64_t(BN), B - n0));
      for (int idx = dev::thread_idx(); idx < nu * nb; idx += kThreads) {
        const bool fixed = n0 == 0 && idx == static_cast<int>(dev::thread_idx());
        const int j = idx % nu, n = idx / nu;
        const int64_t b = n0 + n, u = u0 + j;
        const bool valid = fixed ? fx.valid : (a.lengths == nullptr || t < dev::ld_nc(a.lengths + b));
        const int64_t row = t * B + b;
        T* gp = a.gates + row * G + u;
        if (valid) {
          A pre[4];
          if (fixed) {
#pragma unroll
            for (int gi = 0; gi < 4; ++gi) pre[gi] = red_sum(red, rows_hh, BN, gi * U + j, n) + fx.x[gi] + fx.bias[gi];
          } else {
            const T* xp = a.xproj + row * G + u;
#pragma unroll
            for (int gi = 0; gi < 4; ++gi) {
              pre[gi] = red_sum(red, rows_hh, BN, gi * U + j, n) + A(to_acc(xp[gi * H]));
              if (a.b_hh) pre[gi] += A(to_acc(a.b_hh[gi * H + u]));
            }
          }
          const A c_prev = fixed ? f_c : a.c_state[b * H + u];
          const LstmStep<A> st = lstm_cell_forward<A>(pre[0], pre[1], pre[2], pre[3], c_prev);
          const T hv = from_acc<T>(st.h);
          if (proj) {
            a.mbuf[b * a.ldm + u] = hv;
          } else {
            hnxt[b * a.ldh + u] = hv;  // the exchange first: it is on the critical path
            a.y[row * P + u] = hv;
          }
          gp[0] = from_acc<T>(st.i);
          gp[H] = from_acc<T>(st.f);
          gp[2 * H] = from_acc<T>(st.g);
          gp[3 * H] = from_acc<T>(st.o);
          a.cs[row * H + u] = st.c;
          if (fixed) f_c = st.c;
          else a.c_state[b * H + u] = st.c;
        } else {
          const T z = zero_of<T>();
          if (!proj) {
            hnxt[b * a.ldh + u] = dev::ld_cg(hcur + b * a.ldh + u);
            a.y[row * P + u] = z;
          }
          gp[0] = z; gp[H] = z; gp[2 * H] = z; gp[3 * H] = z;
          a.cs[row * H + u] = A(0);
        }
      }
      dev::sync_threads();
    }
    if (proj) {
      // ---- h_t = m_t W_hr^T (own projection rows)
      grid_barrier(a.barrier, target);
      for (int64_t n0 = 0; n0 < B; n0 += BN) {
        Eng::compute(ws_hr, a.g_hr.MT, a.g_hr.KC, a.mbuf + n0 * a.ldm, a.ldm, red);
        dev::sync_threads();
        const int nb = static_cast<int>(dev::min(int64_t(BN), B - n0));
        for (int idx = dev::thread_idx(); idx < np * nb; idx += kThreads) {
          const int j = idx % np, n = idx / np;
          const int64_t b = n0 + n, p = p0 + j;
          const bool valid = a.lengths == nullptr || t < dev::ld_nc(a.lengths + b);
          const int64_t row = t * B + b;
          if (valid) {
            const T hv = from_acc<T>(red_sum(red, rows_hr, BN, j, n));
            a.y[row * P + p] = hv;
            hnxt[b * a.ldh + p] = hv;
          } else {
            a.y[row * P + p] = zero_of<T>();
            hnxt[b * a.ldh + p] = dev::ld_cg(hcur + b * a.ldh + p);
          }
        }
        dev::sync_threads();
      }
    }
    if (s + 1 < a.T_) {
      prefetch(a.reverse ? t - 1 : t + 1);
      grid_barrier(a.barrier, target);
    }
  }
  if (has_fixed) a.c_state[fb * H + u0 + fj] = f_c;
  dev::sync_threads();

  // ---- final states of the own slice (written by this CTA only; __syncthreads above)
  const T* hfin = a.hbuf + (a.T_ & 1) * a.hbuf_stride;
  const int own_p = proj ? np : nu;
  const int64_t own_p0 = proj ? p0 : u0;
  for (int64_t idx = dev::thread_idx(); idx < int64_t(own_p) * B; idx += kThreads) {
    const int j = static_cast<int>(idx % own_p);
    const int64_t b = idx / own_p;
    a.h_n[b * P + own_p0 + j] = dev::ld_cg(hfin + b * a.ldh + own_p0 + j);
  }
  store_own_cols(a.c_n, a.c_state, H, u0, nu, B);
}

// Launch geometry of one call (or of the limit query: B = 1).
struct FwdPlan {
  bool ok = false;
  int U = 0, Up = 0, grid = 0;
  SliceGeom g_hh, g_hr;
  size_t smem = 0;
};

template <class Eng>
FwdPlan plan_lstm_fwd(int64_t H, int64_t P, bool proj, const DeviceLimits& dev) {
  FwdPlan p;
  const int64_t u_min = ceil_div(H, dev.sms);
  const int64_t mt = ceil_div(4 * u_min, 16);
  if (mt > kMaxMT) return p;
  p.U = static_cast<int>(mt * 16 / 4);  // fill the row tiles: fewer CTAs, same work per CTA
  p.grid = static_cast<int>(ceil_div(H, p.U));
  p.g_hh = slice_geom(4 * p.U, P);
  int max_mt = p.g_hh.MT;
  p.smem = align16(Eng::w_bytes(p.g_hh.MT, p.g_hh.KC));
  if (proj) {
    p.Up = static_cast<int>(ceil_div(P, p.grid));
    p.g_hr = slice_geom(p.Up, H);
    if (p.g_hr.MT > kMaxMT) return p;
    max_mt = std::max(max_mt, p.g_hr.MT);
    p.smem += align16(Eng::w_bytes(p.g_hr.MT, p.g_hr.KC));
  } else {
    p.Up = p.U;
    p.g_hr = SliceGeom{1, 1};
  }
  p.smem += red_bytes<Eng>(max_mt);
  p.ok = p.smem <= dev.smem_optin;
  return p;
}

}  // namespace

int64_t lstm_fwd_max_hidden(at::ScalarType dtype, int device) {
  const DeviceLimits dev = device_limits(device);
  return max_hidden_over_engines(dtype, [&](auto tag) {
    using T = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    return largest_fitting(int64_t(kMaxMT) * 4 * dev.sms, [&](int64_t H) {
      return plan_fits(lstm_fwd_kernel<T, Eng>, plan_lstm_fwd<Eng>(H, H, false, dev), dev);
    });
  });
}

}  // namespace cuda_detail

Tensor5 lstm_fwd_cuda(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                      const Tensor& c0, const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                      bool allow_tf32) {
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
  Tensor gates = at::empty({T, B, G}, opts);
  Tensor cs = at::empty({T, B, H}, opts.dtype(acc));
  if (T == 0 || B == 0) {
    h_n.copy_(h0.reshape({B, P}));
    c_n.copy_(c0.reshape({B, H}));
    return {y, h_n, c_n, gates, cs};
  }

  const int device = xproj.get_device();
  const DeviceLimits dev = device_limits(device);
  const bool launched = launch_first_fitting(dt, allow_tf32, B, [&](auto tag) {
    using Tt = typename decltype(tag)::T;
    using Eng = typename decltype(tag)::Eng;
    const FwdPlan p = plan_lstm_fwd<Eng>(H, P, proj, dev);
    if (!p.ok) return false;
    const int64_t Bpad = round_up(B, Eng::BN);
    const int64_t ldh = round_up(P, kChunk), ldm = round_up(H, kChunk);
    Workspace ws;  // zeroed: barrier, hbuf (2, Bpad, ldh), mbuf (Bpad, ldm); then c_state (B, H) = c0
    const size_t o_barrier = ws.take(1, at::kInt);
    const size_t o_hbuf = ws.take(2 * Bpad * ldh, dt);
    const size_t o_mbuf = proj ? ws.take(Bpad * ldm, dt) : 0;
    ws.mark_zeroed();
    const size_t o_c = ws.take(B * H, acc);
    ws.allocate(xproj);
    ws.view(o_hbuf, dt, {2, Bpad, ldh}).select(0, 0).narrow(0, 0, B).narrow(1, 0, P).copy_(h0);
    ws.view(o_c, acc, {B, H}).copy_(c0);
    LstmFwdArgs<Tt> a;
    a.xproj = ptr<Tt>(xproj);
    a.w_hh = ptr<Tt>(w);
    a.b_hh = bh.defined() ? ptr<Tt>(bh) : nullptr;
    a.w_hr = proj ? ptr<Tt>(wr) : nullptr;
    a.lengths = lengths_ptr(lengths);
    a.y = ptr<Tt>(y);
    a.h_n = ptr<Tt>(h_n);
    a.c_n = ptr<Tt>(c_n);
    a.gates = ptr<Tt>(gates);
    a.cs = ptr<acc_t<Tt>>(cs);
    a.c_state = ws.ptr<acc_t<Tt>>(o_c);
    a.hbuf = ws.ptr<Tt>(o_hbuf);
    a.mbuf = proj ? ws.ptr<Tt>(o_mbuf) : nullptr;
    a.barrier = ws.ptr<unsigned int>(o_barrier);
    a.T_ = T; a.B = B; a.H = H; a.P = P;
    a.ldh = ldh; a.ldm = ldm; a.hbuf_stride = Bpad * ldh;
    a.U = p.U; a.Up = p.Up; a.g_hh = p.g_hh; a.g_hr = p.g_hr;
    a.reverse = reverse ? 1 : 0;
    launch_cooperative(lstm_fwd_kernel<Tt, Eng>, p.grid, kThreads, p.smem, a, dev, "lstm_fwd");
    return true;
  });
  TORCH_CHECK(launched, "fusedrnn CUDA lstm_fwd: hidden size H=", H, " (P=", P, ", dtype ", dt,
              ") does not fit on chip; the limit on this device is H <= ",
              max_hidden_size_cuda("LSTM", dt, device), " (max_hidden_size_cuda)");
  return {y, h_n, c_n, gates, cs};
}

}  // namespace fusedrnn
