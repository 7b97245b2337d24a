// The stepwise strategy (fusedrnn/cuda_plan.h, Plan::stepwise) for large batches: per time step one
// tensor-core GEMM over the whole batch with an fp32 result (gemm_acc_out, launch.cuh: cuBLAS
// through ATen) and one pointwise kernel (one thread per (batch, unit), cell math of cell_math.h).
// W_hh is read from L2 every step instead of staying on chip, which beats the persistent kernels
// where their exchange traffic (unit slices x B x K per step) is larger: B = 256 at H = 1024 moves
// 8 MB of W per step here and 134 MB of gate gradients per backward step there.  bf16/fp16 without
// projection; the planner chooses it by its cost model.
//
// State between steps stays in the accumulation type (c, GRU h, dh, dc), exactly as in the
// persistent kernels; the GEMM operand (h_{t-1}, dpre_t) is rounded to the storage type as the
// persistent kernels' exchange is.  Padded steps keep the state and write zeros.
#include "common.cuh"

namespace fusedrnn {
namespace cuda_detail {
namespace {

constexpr int kStepThreads = 256;

inline unsigned int step_blocks(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, ceil_div(n, kStepThreads)));
}

__device__ __forceinline__ bool step_valid(const int64_t* lengths, int64_t t, int64_t b) {
  return lengths == nullptr || t < dev::ld_nc(lengths + b);
}

// ---------------------------------------------------------------------------------- LSTM
template <typename T>
struct LstmStepFwdArgs {
  const T* xproj;          // (T, B, 4H)
  const T* b_hh;           // (4H) or null
  const int64_t* lengths;  // (B) or null
  const float* hg;         // (B, 4H): h_{t-1} W_hh^T of this step
  T* y;                    // (T, B, H)
  T* gates;                // (T, B, 4H) or null (inference)
  float* cs;               // (T, B, H) or null
  float* c_state;          // (B, H)
  T* hbuf;                 // (B, H): h_{t-1} in, h_t out (the next GEMM's operand)
  int64_t B, H, t;
};

template <typename T>
__global__ void lstm_step_fwd_kernel(const LstmStepFwdArgs<T> a) {
  const int64_t idx = int64_t(dev::block_idx()) * dev::block_dim() + dev::thread_idx();
  if (idx >= a.B * a.H) return;
  const int64_t H = a.H, b = idx / H, u = idx % H, G = 4 * H, row = a.t * a.B + b;
  const T zero = zero_of<T>();
  T* gp = a.gates ? a.gates + row * G + u : nullptr;
  if (!step_valid(a.lengths, a.t, b)) {
    a.y[row * H + u] = zero;
    if (gp) {
      gp[0] = zero; gp[H] = zero; gp[2 * H] = zero; gp[3 * H] = zero;
      a.cs[row * H + u] = 0.f;
    }
    return;
  }
  float pre[4];
#pragma unroll
  for (int gi = 0; gi < 4; ++gi) {
    pre[gi] = a.hg[b * G + gi * H + u] + to_acc(a.xproj[row * G + gi * H + u]);
    if (a.b_hh) pre[gi] += to_acc(a.b_hh[gi * H + u]);
  }
  const LstmStep<float> st = lstm_cell_forward<float>(pre[0], pre[1], pre[2], pre[3], a.c_state[idx]);
  a.c_state[idx] = st.c;
  const T h = from_acc<T>(st.h);
  a.hbuf[idx] = h;
  a.y[row * H + u] = h;
  if (gp) {
    gp[0] = from_acc<T>(st.i);
    gp[H] = from_acc<T>(st.f);
    gp[2 * H] = from_acc<T>(st.g);
    gp[3 * H] = from_acc<T>(st.o);
    a.cs[row * H + u] = st.c;
  }
}

template <typename T>
struct LstmStepBwdArgs {
  const T* dy;             // (T, B, H)
  const T* c0;             // (B, H)
  const T* gates;          // (T, B, 4H)
  const float* cs;         // (T, B, H)
  const int64_t* lengths;  // (B) or null
  const float* dhg;        // (B, H): dpre of the previous processed step . W_hh
  T* dxproj;               // (T, B, 4H)
  T* dpre;                 // (B, 4H): this step's gate gradients (the next GEMM's operand)
  float* dh_state;         // (B, H)
  float* dc_state;         // (B, H)
  int64_t T_, B, H, t, t_prev;  // t_prev < 0: first processed step
  int reverse;
};

template <typename T>
__global__ void lstm_step_bwd_kernel(const LstmStepBwdArgs<T> a) {
  const int64_t idx = int64_t(dev::block_idx()) * dev::block_dim() + dev::thread_idx();
  if (idx >= a.B * a.H) return;
  const int64_t H = a.H, B = a.B, b = idx / H, u = idx % H, G = 4 * H, t = a.t, row = t * B + b;
  // dh reaching h_t: the previous processed step's GEMM where that step was valid, else unchanged
  float dh = a.dh_state[idx];
  if (a.t_prev >= 0 && step_valid(a.lengths, a.t_prev, b)) dh = a.dhg[idx];
  a.dh_state[idx] = dh;
  T* dx = a.dxproj + row * G + u;
  T* dp = a.dpre + b * G + u;
  const T zero = zero_of<T>();
  if (!step_valid(a.lengths, t, b)) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      dx[k * H] = zero;
      dp[k * H] = zero;
    }
    return;
  }
  const T* gp = a.gates + row * G + u;
  bool from_seq;
  int64_t prow;
  if (!a.reverse) {
    from_seq = t > 0;
    prow = row - B;
  } else {
    from_seq = t + 1 < a.T_ && step_valid(a.lengths, t + 1, b);
    prow = row + B;
  }
  const float c_prev = from_seq ? a.cs[prow * H + u] : to_acc(a.c0[b * H + u]);
  const LstmGrad<float> d = lstm_cell_backward<float>(to_acc(gp[0]), to_acc(gp[H]), to_acc(gp[2 * H]), to_acc(gp[3 * H]),
                                                      a.cs[row * H + u], c_prev, dh + to_acc(a.dy[row * H + u]),
                                                      a.dc_state[idx]);
  a.dc_state[idx] = d.dc_prev;
  const T v[4] = {from_acc<T>(d.d_i), from_acc<T>(d.d_f), from_acc<T>(d.d_g), from_acc<T>(d.d_o)};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    dx[k * H] = v[k];
    dp[k * H] = v[k];
  }
}

// ----------------------------------------------------------------------------------- GRU
template <typename T>
struct GruStepFwdArgs {
  const T* xproj;          // (T, B, 3H)
  const T* b_hh;           // (3H) or null
  const int64_t* lengths;  // (B) or null
  const float* hg;         // (B, 3H): h_{t-1} W_hh^T of this step
  T* y;                    // (T, B, H)
  T* gates;                // (T, B, 4H) [r, z, n, hn] or null
  float* h_state;          // (B, H)
  T* hbuf;                 // (B, H): the next GEMM's operand
  int64_t B, H, t;
};

template <typename T>
__global__ void gru_step_fwd_kernel(const GruStepFwdArgs<T> a) {
  const int64_t idx = int64_t(dev::block_idx()) * dev::block_dim() + dev::thread_idx();
  if (idx >= a.B * a.H) return;
  const int64_t H = a.H, b = idx / H, u = idx % H, G = 3 * H, row = a.t * a.B + b;
  const T zero = zero_of<T>();
  T* gp = a.gates ? a.gates + row * 4 * H + u : nullptr;
  if (!step_valid(a.lengths, a.t, b)) {
    a.y[row * H + u] = zero;
    if (gp) {
      gp[0] = zero; gp[H] = zero; gp[2 * H] = zero; gp[3 * H] = zero;
    }
    return;
  }
  float x[3], hid[3];
#pragma unroll
  for (int gi = 0; gi < 3; ++gi) {
    x[gi] = to_acc(a.xproj[row * G + gi * H + u]);
    hid[gi] = a.hg[b * G + gi * H + u];
    if (a.b_hh) hid[gi] += to_acc(a.b_hh[gi * H + u]);
  }
  const GruStep<float> st = gru_cell_forward<float>(x[0], x[1], x[2], hid[0], hid[1], hid[2], a.h_state[idx]);
  a.h_state[idx] = st.h;
  const T h = from_acc<T>(st.h);
  a.hbuf[idx] = h;
  a.y[row * H + u] = h;
  if (gp) {
    gp[0] = from_acc<T>(st.r);
    gp[H] = from_acc<T>(st.z);
    gp[2 * H] = from_acc<T>(st.n);
    gp[3 * H] = from_acc<T>(hid[2]);
  }
}

template <typename T>
struct GruStepBwdArgs {
  const T* dy;             // (T, B, H)
  const T* h0;             // (B, H)
  const T* y;              // (T, B, H)
  const T* gates;          // (T, B, 4H)
  const int64_t* lengths;  // (B) or null
  const float* dhg;        // (B, H): [d_r, d_z, d_hn] of the previous processed step . W_hh
  T* dxproj;               // (T, B, 3H)
  T* dhn;                  // (T, B, H)
  T* dpre;                 // (B, 3H): this step's [d_r, d_z, d_hn] (the next GEMM's operand)
  float* dh_state;         // (B, H)
  float* ddirect;          // (B, H): this step's direct path dh_tot * z
  int64_t T_, B, H, t, t_prev;
  int reverse;
};

template <typename T>
__global__ void gru_step_bwd_kernel(const GruStepBwdArgs<T> a) {
  const int64_t idx = int64_t(dev::block_idx()) * dev::block_dim() + dev::thread_idx();
  if (idx >= a.B * a.H) return;
  const int64_t H = a.H, B = a.B, b = idx / H, u = idx % H, G = 3 * H, t = a.t, row = t * B + b;
  float dh = a.dh_state[idx];
  if (a.t_prev >= 0 && step_valid(a.lengths, a.t_prev, b)) dh = a.dhg[idx] + a.ddirect[idx];
  a.dh_state[idx] = dh;
  T* dx = a.dxproj + row * G + u;
  T* dp = a.dpre + b * G + u;
  const T zero = zero_of<T>();
  if (!step_valid(a.lengths, t, b)) {
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      dx[k * H] = zero;
      dp[k * H] = zero;
    }
    a.dhn[row * H + u] = zero;
    a.ddirect[idx] = 0.f;
    return;
  }
  const T* gp = a.gates + row * 4 * H + u;
  bool from_seq;
  int64_t prow;
  if (!a.reverse) {
    from_seq = t > 0;
    prow = row - B;
  } else {
    from_seq = t + 1 < a.T_ && step_valid(a.lengths, t + 1, b);
    prow = row + B;
  }
  const float h_prev = from_seq ? to_acc(a.y[prow * H + u]) : to_acc(a.h0[b * H + u]);
  const GruGrad<float> d = gru_cell_backward<float>(to_acc(gp[0]), to_acc(gp[H]), to_acc(gp[2 * H]), to_acc(gp[3 * H]),
                                                    h_prev, dh + to_acc(a.dy[row * H + u]));
  a.ddirect[idx] = d.dh_prev_direct;
  const T dr = from_acc<T>(d.d_r), dz = from_acc<T>(d.d_z), dhid = from_acc<T>(d.d_hid_n);
  dx[0] = dr;
  dx[H] = dz;
  dx[2 * H] = from_acc<T>(d.d_n);
  dp[0] = dr;
  dp[H] = dz;
  dp[2 * H] = dhid;
  a.dhn[row * H + u] = dhid;
}

// Rows whose last processed step (t_last) was valid take the last GEMM's result (+ direct path).
Tensor final_dh(const Tensor& dhg, const Tensor& dh_state, const OptTensor& lengths, int64_t t_last) {
  if (!checks::defined(lengths)) return dhg;
  const Tensor valid = lengths->gt(t_last).unsqueeze(1);
  return at::where(valid, dhg, dh_state);
}

}  // namespace

// ------------------------------------------------------------------------------- host loops
void lstm_fwd_stepwise(const Tensor& xproj, const Tensor& w, const Tensor& bh, const Tensor& h0, const Tensor& c0,
                       const OptTensor& lengths, bool reverse, const Tensor& y, const Tensor& h_n, const Tensor& c_n,
                       const Tensor& gates, const Tensor& cs, bool save) {
  const int64_t T = xproj.size(0), B = xproj.size(1), H = c0.size(-1);
  const auto dt = xproj.scalar_type();
  Tensor hbuf = h0.reshape({B, H}).to(dt).clone();
  Tensor c_state = c0.reshape({B, H}).to(at::kFloat).clone();
  Tensor hg = at::empty({B, 4 * H}, xproj.options().dtype(at::kFloat));
  const Tensor wt = w.t();  // (H, 4H)
  dispatch_storage(dt, [&](auto tag) {
    using St = decltype(tag);
    LstmStepFwdArgs<St> a;
    a.xproj = ptr<St>(xproj);
    a.b_hh = bh.defined() ? ptr<St>(bh) : nullptr;
    a.lengths = lengths_ptr(lengths);
    a.hg = hg.data_ptr<float>();
    a.y = ptr<St>(y);
    a.gates = save ? ptr<St>(gates) : nullptr;
    a.cs = save ? cs.data_ptr<float>() : nullptr;
    a.c_state = c_state.data_ptr<float>();
    a.hbuf = ptr<St>(hbuf);
    a.B = B;
    a.H = H;
    for (int64_t s = 0; s < T; ++s) {
      a.t = reverse ? T - 1 - s : s;
      gemm_acc_out(hg, hbuf, wt);
      launch_plain(lstm_step_fwd_kernel<St>, step_blocks(B * H), kStepThreads, a);
    }
  });
  h_n.copy_(hbuf);
  c_n.copy_(c_state);
}

void lstm_bwd_stepwise(const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w, const Tensor& c0,
                       const Tensor& gates, const Tensor& cs, const OptTensor& lengths, bool reverse,
                       const Tensor& dxproj, const Tensor& dh0, const Tensor& dc0) {
  const int64_t T = dy.size(0), B = dy.size(1), H = dy.size(2);
  const auto dt = dy.scalar_type();
  const auto f32 = dy.options().dtype(at::kFloat);
  Tensor dh_state = dh_n.reshape({B, H}).to(at::kFloat).clone();
  Tensor dc_state = dc_n.reshape({B, H}).to(at::kFloat).clone();
  Tensor dhg = at::empty({B, H}, f32);
  Tensor dpre = at::empty({B, 4 * H}, dy.options());
  dispatch_storage(dt, [&](auto tag) {
    using St = decltype(tag);
    LstmStepBwdArgs<St> a;
    a.dy = ptr<St>(dy);
    a.c0 = ptr<St>(c0);
    a.gates = ptr<St>(gates);
    a.cs = cs.data_ptr<float>();
    a.lengths = lengths_ptr(lengths);
    a.dhg = dhg.data_ptr<float>();
    a.dxproj = ptr<St>(dxproj);
    a.dpre = ptr<St>(dpre);
    a.dh_state = dh_state.data_ptr<float>();
    a.dc_state = dc_state.data_ptr<float>();
    a.T_ = T;
    a.B = B;
    a.H = H;
    a.reverse = reverse ? 1 : 0;
    a.t_prev = -1;
    for (int64_t s = 0; s < T; ++s) {
      a.t = reverse ? s : T - 1 - s;  // opposite of the forward order
      launch_plain(lstm_step_bwd_kernel<St>, step_blocks(B * H), kStepThreads, a);
      gemm_acc_out(dhg, dpre, w);  // (B, 4H) . (4H, H)
      a.t_prev = a.t;
    }
  });
  dh0.copy_(final_dh(dhg, dh_state, lengths, reverse ? T - 1 : 0));
  dc0.copy_(dc_state);
}

void gru_fwd_stepwise(const Tensor& xproj, const Tensor& w, const Tensor& bh, const Tensor& h0,
                      const OptTensor& lengths, bool reverse, const Tensor& y, const Tensor& h_n, const Tensor& gates,
                      bool save) {
  const int64_t T = xproj.size(0), B = xproj.size(1), H = h0.size(-1);
  const auto dt = xproj.scalar_type();
  Tensor hbuf = h0.reshape({B, H}).to(dt).clone();
  Tensor h_state = h0.reshape({B, H}).to(at::kFloat).clone();
  Tensor hg = at::empty({B, 3 * H}, xproj.options().dtype(at::kFloat));
  const Tensor wt = w.t();  // (H, 3H)
  dispatch_storage(dt, [&](auto tag) {
    using St = decltype(tag);
    GruStepFwdArgs<St> a;
    a.xproj = ptr<St>(xproj);
    a.b_hh = bh.defined() ? ptr<St>(bh) : nullptr;
    a.lengths = lengths_ptr(lengths);
    a.hg = hg.data_ptr<float>();
    a.y = ptr<St>(y);
    a.gates = save ? ptr<St>(gates) : nullptr;
    a.h_state = h_state.data_ptr<float>();
    a.hbuf = ptr<St>(hbuf);
    a.B = B;
    a.H = H;
    for (int64_t s = 0; s < T; ++s) {
      a.t = reverse ? T - 1 - s : s;
      gemm_acc_out(hg, hbuf, wt);
      launch_plain(gru_step_fwd_kernel<St>, step_blocks(B * H), kStepThreads, a);
    }
  });
  h_n.copy_(h_state);
}

void gru_bwd_stepwise(const Tensor& dy, const Tensor& dh_n, const Tensor& w, const Tensor& h0, const Tensor& y,
                      const Tensor& gates, const OptTensor& lengths, bool reverse, const Tensor& dxproj,
                      const Tensor& dh0, const Tensor& dhn) {
  const int64_t T = dy.size(0), B = dy.size(1), H = dy.size(2);
  const auto dt = dy.scalar_type();
  const auto f32 = dy.options().dtype(at::kFloat);
  Tensor dh_state = dh_n.reshape({B, H}).to(at::kFloat).clone();
  Tensor ddirect = at::zeros({B, H}, f32);
  Tensor dhg = at::empty({B, H}, f32);
  Tensor dpre = at::empty({B, 3 * H}, dy.options());
  dispatch_storage(dt, [&](auto tag) {
    using St = decltype(tag);
    GruStepBwdArgs<St> a;
    a.dy = ptr<St>(dy);
    a.h0 = ptr<St>(h0);
    a.y = ptr<St>(y);
    a.gates = ptr<St>(gates);
    a.lengths = lengths_ptr(lengths);
    a.dhg = dhg.data_ptr<float>();
    a.dxproj = ptr<St>(dxproj);
    a.dhn = ptr<St>(dhn);
    a.dpre = ptr<St>(dpre);
    a.dh_state = dh_state.data_ptr<float>();
    a.ddirect = ddirect.data_ptr<float>();
    a.T_ = T;
    a.B = B;
    a.H = H;
    a.reverse = reverse ? 1 : 0;
    a.t_prev = -1;
    for (int64_t s = 0; s < T; ++s) {
      a.t = reverse ? s : T - 1 - s;
      launch_plain(gru_step_bwd_kernel<St>, step_blocks(B * H), kStepThreads, a);
      gemm_acc_out(dhg, dpre, w);  // (B, 3H) . (3H, H)
      a.t_prev = a.t;
    }
  });
  dh0.copy_(final_dh(dhg + ddirect, dh_state, lengths, reverse ? T - 1 : 0));
}

}  // namespace cuda_detail
}  // namespace fusedrnn
