// Fused LSTMCell / GRUCell pointwise kernels (forward and backward) for one step whose GEMMs were
// done outside (igates = x W_ih^T, hgates = h W_hh^T), and max_hidden_size_cuda.  One thread per
// (batch, unit) pair: all gates of a unit are read and written by the same thread; the math is
// cell_math.h in the accumulation type.
#include "common.cuh"

namespace fusedrnn {
namespace cuda_detail {
namespace {

constexpr int kCellThreads = 256;

inline unsigned int cell_blocks(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, ceil_div(n, kCellThreads)));
}

// One thread per (batch, unit) pair, n = B * H of them, on the current stream.
template <typename... KArgs, typename... Args>
void launch_cells(void (*kernel)(KArgs...), int64_t n, Args... args) {
  launch_plain(kernel, cell_blocks(n), kCellThreads, args...);
}

template <typename T>
__global__ void lstm_cell_fwd_kernel(const T* __restrict__ ig, const T* __restrict__ hg,
                                     const T* __restrict__ b_ih, const T* __restrict__ b_hh,
                                     const T* __restrict__ c, T* __restrict__ h_out,
                                     T* __restrict__ c_out, T* __restrict__ gates, int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(dev::block_idx()) * dev::block_dim() + dev::thread_idx();
  if (idx >= B * H) return;
  const int64_t b = idx / H, u = idx % H, G = 4 * H;
  A pre[4];
#pragma unroll
  for (int gi = 0; gi < 4; ++gi) {
    const int64_t o = b * G + gi * H + u;
    pre[gi] = A(to_acc(ig[o])) + A(to_acc(hg[o]));
    if (b_ih) pre[gi] += A(to_acc(b_ih[gi * H + u]));
    if (b_hh) pre[gi] += A(to_acc(b_hh[gi * H + u]));
  }
  const LstmStep<A> s = lstm_cell_forward<A>(pre[0], pre[1], pre[2], pre[3], A(to_acc(c[idx])));
  h_out[idx] = from_acc<T>(s.h);
  c_out[idx] = from_acc<T>(s.c);
  T* gp = gates + b * G + u;
  gp[0] = from_acc<T>(s.i);
  gp[H] = from_acc<T>(s.f);
  gp[2 * H] = from_acc<T>(s.g);
  gp[3 * H] = from_acc<T>(s.o);
}

template <typename T>
__global__ void lstm_cell_bwd_kernel(const T* __restrict__ dh_new, const T* __restrict__ dc_new,
                                     const T* __restrict__ c, const T* __restrict__ c_new,
                                     const T* __restrict__ gates, T* __restrict__ dgates,
                                     T* __restrict__ dc, int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(dev::block_idx()) * dev::block_dim() + dev::thread_idx();
  if (idx >= B * H) return;
  const int64_t b = idx / H, u = idx % H, G = 4 * H;
  const T* gp = gates + b * G + u;
  const LstmGrad<A> d = lstm_cell_backward<A>(to_acc(gp[0]), to_acc(gp[H]), to_acc(gp[2 * H]), to_acc(gp[3 * H]),
                                              to_acc(c_new[idx]), to_acc(c[idx]), to_acc(dh_new[idx]),
                                              to_acc(dc_new[idx]));
  T* dp = dgates + b * G + u;
  dp[0] = from_acc<T>(d.d_i);
  dp[H] = from_acc<T>(d.d_f);
  dp[2 * H] = from_acc<T>(d.d_g);
  dp[3 * H] = from_acc<T>(d.d_o);
  dc[idx] = from_acc<T>(d.dc_prev);
}

template <typename T>
__global__ void gru_cell_fwd_kernel(const T* __restrict__ ig, const T* __restrict__ hg,
                                    const T* __restrict__ b_ih, const T* __restrict__ b_hh,
                                    const T* __restrict__ h, T* __restrict__ h_out,
                                    T* __restrict__ gates, int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(dev::block_idx()) * dev::block_dim() + dev::thread_idx();
  if (idx >= B * H) return;
  const int64_t b = idx / H, u = idx % H, G = 3 * H;
  A x[3], hid[3];
#pragma unroll
  for (int gi = 0; gi < 3; ++gi) {
    const int64_t o = b * G + gi * H + u;
    x[gi] = to_acc(ig[o]);
    hid[gi] = to_acc(hg[o]);
    if (b_ih) x[gi] += A(to_acc(b_ih[gi * H + u]));
    if (b_hh) hid[gi] += A(to_acc(b_hh[gi * H + u]));
  }
  const GruStep<A> s = gru_cell_forward<A>(x[0], x[1], x[2], hid[0], hid[1], hid[2], A(to_acc(h[idx])));
  h_out[idx] = from_acc<T>(s.h);
  T* gp = gates + b * 4 * H + u;
  gp[0] = from_acc<T>(s.r);
  gp[H] = from_acc<T>(s.z);
  gp[2 * H] = from_acc<T>(s.n);
  gp[3 * H] = from_acc<T>(hid[2]);
}

template <typename T>
__global__ void gru_cell_bwd_kernel(const T* __restrict__ dh_new, const T* __restrict__ h,
                                    const T* __restrict__ gates, T* __restrict__ d_i,
                                    T* __restrict__ d_h, T* __restrict__ dh, int64_t B, int64_t H) {
  using A = acc_t<T>;
  const int64_t idx = int64_t(dev::block_idx()) * dev::block_dim() + dev::thread_idx();
  if (idx >= B * H) return;
  const int64_t b = idx / H, u = idx % H;
  const T* gp = gates + b * 4 * H + u;
  const GruGrad<A> d = gru_cell_backward<A>(to_acc(gp[0]), to_acc(gp[H]), to_acc(gp[2 * H]), to_acc(gp[3 * H]),
                                            to_acc(h[idx]), to_acc(dh_new[idx]));
  const int64_t o = b * 3 * H + u;
  const T dr = from_acc<T>(d.d_r), dz = from_acc<T>(d.d_z);
  d_i[o] = dr; d_i[o + H] = dz; d_i[o + 2 * H] = from_acc<T>(d.d_n);
  d_h[o] = dr; d_h[o + H] = dz; d_h[o + 2 * H] = from_acc<T>(d.d_hid_n);
  dh[idx] = from_acc<T>(d.dh_prev_direct);
}

// Calls f(T{}) with the CUDA storage type of `st`.
template <class F>
void dispatch_cell_storage(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kBFloat16: f(dev::bf16{}); break;
    case at::kHalf: f(dev::f16{}); break;
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    default: TORCH_CHECK(false, "fusedrnn CUDA cells: unsupported dtype ", st);
  }
}

// Input in the reference dtype `dt`, contiguous (devices were checked by check_cuda_args).
Tensor prep(const Tensor& t, at::ScalarType dt) { return t.to(dt).contiguous(); }
Tensor prep_opt(const OptTensor& t, at::ScalarType dt) { return checks::defined(t) ? prep(*t, dt) : Tensor(); }

}  // namespace
}  // namespace cuda_detail

Tensor3 lstm_cell_fwd_cuda(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih,
                           const OptTensor& b_hh, const Tensor& c) {
  using namespace cuda_detail;
  const checks::Dims d = checks::lstm_cell_fwd(igates, hgates, b_ih, b_hh, c);
  check_cuda_args("lstm_cell_fwd", false,
                  {{"igates", &igates}, {"hgates", &hgates}, {"b_ih", checks::opt(b_ih)}, {"b_hh", checks::opt(b_hh)},
                   {"c", &c}});
  const DeviceGuard guard(igates.device());
  const auto dt = igates.scalar_type();
  const int64_t B = d.B, H = d.H;
  const Tensor ig = prep(igates, dt), hg = prep(hgates, dt);
  const Tensor bi = prep_opt(b_ih, dt), bh = prep_opt(b_hh, dt);
  const Tensor cc = prep(c, dt);
  Tensor h_new = at::empty({B, H}, ig.options()), c_new = at::empty({B, H}, ig.options());
  Tensor gates = at::empty({B, 4 * H}, ig.options());
  if (B * H == 0) return {h_new, c_new, gates};
  dispatch_cell_storage(dt, [&](auto tag) {
    using T = decltype(tag);
    launch_cells(lstm_cell_fwd_kernel<T>, B * H,
                 ptr<T>(ig), ptr<T>(hg), ptr<T>(bi), ptr<T>(bh),
                 ptr<T>(cc), ptr<T>(h_new), ptr<T>(c_new), ptr<T>(gates), B, H);
  });
  return {h_new, c_new, gates};
}

Tensor2 lstm_cell_bwd_cuda(const Tensor& dh_new, const Tensor& dc_new, const Tensor& c,
                           const Tensor& c_new, const Tensor& gates) {
  using namespace cuda_detail;
  const checks::Dims d = checks::lstm_cell_bwd(dh_new, dc_new, c, c_new, gates);
  check_cuda_args("lstm_cell_bwd", false,
                  {{"gates", &gates}, {"dh_new", &dh_new}, {"dc_new", &dc_new}, {"c", &c}, {"c_new", &c_new}});
  const DeviceGuard guard(gates.device());
  const auto dt = gates.scalar_type();
  const int64_t B = d.B, H = d.H;
  const Tensor g = prep(gates, dt), dh = prep(dh_new, dt);
  const Tensor dcn = prep(dc_new, dt), cc = prep(c, dt);
  const Tensor cn = prep(c_new, dt);
  Tensor dgates = at::empty({B, 4 * H}, g.options()), dc = at::empty({B, H}, g.options());
  if (B * H == 0) return {dgates, dc};
  dispatch_cell_storage(dt, [&](auto tag) {
    using T = decltype(tag);
    launch_cells(lstm_cell_bwd_kernel<T>, B * H,
                 ptr<T>(dh), ptr<T>(dcn), ptr<T>(cc), ptr<T>(cn), ptr<T>(g), ptr<T>(dgates), ptr<T>(dc), B, H);
  });
  return {dgates, dc};
}

Tensor2 gru_cell_fwd_cuda(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih,
                          const OptTensor& b_hh, const Tensor& h) {
  using namespace cuda_detail;
  const checks::Dims d = checks::gru_cell_fwd(igates, hgates, b_ih, b_hh, h);
  check_cuda_args("gru_cell_fwd", false,
                  {{"igates", &igates}, {"hgates", &hgates}, {"b_ih", checks::opt(b_ih)}, {"b_hh", checks::opt(b_hh)},
                   {"h", &h}});
  const DeviceGuard guard(igates.device());
  const auto dt = igates.scalar_type();
  const int64_t B = d.B, H = d.H;
  const Tensor ig = prep(igates, dt), hg = prep(hgates, dt);
  const Tensor bi = prep_opt(b_ih, dt), bh = prep_opt(b_hh, dt);
  const Tensor hh = prep(h, dt);
  Tensor h_new = at::empty({B, H}, ig.options()), gates = at::empty({B, 4 * H}, ig.options());
  if (B * H == 0) return {h_new, gates};
  dispatch_cell_storage(dt, [&](auto tag) {
    using T = decltype(tag);
    launch_cells(gru_cell_fwd_kernel<T>, B * H,
                 ptr<T>(ig), ptr<T>(hg), ptr<T>(bi), ptr<T>(bh),
                 ptr<T>(hh), ptr<T>(h_new), ptr<T>(gates), B, H);
  });
  return {h_new, gates};
}

Tensor3 gru_cell_bwd_cuda(const Tensor& dh_new, const Tensor& h, const Tensor& gates) {
  using namespace cuda_detail;
  const checks::Dims d = checks::gru_cell_bwd(dh_new, h, gates);
  check_cuda_args("gru_cell_bwd", false, {{"gates", &gates}, {"dh_new", &dh_new}, {"h", &h}});
  const DeviceGuard guard(gates.device());
  const auto dt = gates.scalar_type();
  const int64_t B = d.B, H = d.H;
  const Tensor g = prep(gates, dt), dh = prep(dh_new, dt);
  const Tensor hh = prep(h, dt);
  Tensor d_i = at::empty({B, 3 * H}, g.options()), d_h = at::empty({B, 3 * H}, g.options());
  Tensor dh_prev = at::empty({B, H}, g.options());
  if (B * H == 0) return {d_i, d_h, dh_prev};
  dispatch_cell_storage(dt, [&](auto tag) {
    using T = decltype(tag);
    launch_cells(gru_cell_bwd_kernel<T>, B * H,
                 ptr<T>(dh), ptr<T>(hh), ptr<T>(g), ptr<T>(d_i), ptr<T>(d_h), ptr<T>(dh_prev), B, H);
  });
  return {d_i, d_h, dh_prev};
}

// Largest H whose forward and backward persistent kernels both fit on chip (proj_size 0: P = H),
// from the analytic model of fusedrnn/cuda_plan.h and this device's properties.  Ignores
// allow_tf32: for fp32 it holds with and without TF32.
int64_t max_hidden_size_cuda(const std::string& mode, at::ScalarType dtype, int64_t device_index, int64_t proj_size) {
  using namespace cuda_detail;
  TORCH_CHECK(mode == "LSTM" || mode == "GRU", "fusedrnn max_hidden_size_cuda: mode must be LSTM or GRU, got ", mode);
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat || dtype == at::kDouble,
              "fusedrnn max_hidden_size_cuda: unsupported dtype ", dtype);
  TORCH_CHECK(proj_size == 0 || mode == "LSTM", "fusedrnn max_hidden_size_cuda: proj_size is an LSTM option");
  const int device = device_index < 0 ? current_device() : static_cast<int>(device_index);
  return plan::max_hidden(mode == "LSTM", dtype_kind(dtype), proj_size, device_limits(device).record);
}

}  // namespace fusedrnn
