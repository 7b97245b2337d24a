// The launch.cuh interface (host side of the CUDA runtime) for the CUDA emulation (issue 9):
// included by launch.cuh in place of the CUDA runtime calls when FUSEDRNN_CUDA_EMULATION is
// defined (after fusedrnn/cuda_plan.h).  Tensors are CPU tensors; the "device" is the emulated
// device record (runtime.h), whose index changes with its configuration so the host-side caches
// keyed by device stay right.
#pragma once

#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <c10/core/Device.h>

#include "runtime.h"

namespace fusedrnn {
namespace cuda_detail {

// The ops run on CPU tensors under the emulation.
inline bool on_op_device(const at::Tensor& t) { return t.is_cpu(); }
constexpr const char* kOpDeviceName = "CPU (CUDA emulation)";

// There is one emulated device: nothing to make current.
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
  explicit DeviceGuard(c10::DeviceIndex) {}
};

inline int current_device() { return fusedrnn_emu::device().id; }

// Device facts used by the planner (same fields as the CUDA version): the emulated device's
// properties as torch.cuda.get_device_properties() would give them.
struct DeviceLimits {
  int device = 0;
  int sms = 0;
  plan::DeviceRecord record;
};
// The emulated device, whatever index is asked for (CPU tensors report -1).
inline DeviceLimits device_limits(int /*device*/) {
  const fusedrnn_emu::DeviceProps& p = fusedrnn_emu::device();
  DeviceLimits d;
  d.device = p.id;
  d.sms = p.sms;
  plan::DeviceRecord& r = d.record;
  r.name = p.record_name;
  r.major = p.cc_major;
  r.minor = p.cc_minor;
  r.multi_processor_count = p.sms;
  r.shared_memory_per_block_optin = static_cast<int64_t>(p.smem_optin);
  r.shared_memory_per_multiprocessor = static_cast<int64_t>(p.smem_per_sm);
  r.regs_per_multiprocessor = p.regs_per_sm;
  r.max_threads_per_multi_processor = p.max_threads_per_sm;
  r.total_memory = p.total_memory;
  r.L2_cache_size = p.l2_bytes;
  r.warp_size = 32;
  r.cooperative_launch = true;
  return d;
}

template <class Kernel>
inline int co_resident_ctas(Kernel /*kernel*/, int threads, size_t smem, const DeviceLimits& /*dev*/) {
  return fusedrnn_emu::co_resident_ctas(threads, smem);
}

template <class Kernel, class Args>
void invoke_kernel(const void* kernel, const void* args) {
  reinterpret_cast<Kernel>(const_cast<void*>(kernel))(*static_cast<const Args*>(args));
}

// One cooperative launch: all `grid` CTAs co-resident, and the planner's analytic co-residency
// (per_sm CTAs per SM) confirmed by the emulator's occupancy model (the same check as on the GPU).
template <class Kernel, class Args>
inline void launch_cooperative(Kernel kernel, int grid, int threads, size_t smem, const Args& args,
                               const DeviceLimits& dev, const char* what, int per_sm) {
  const int resident = co_resident_ctas(kernel, threads, smem, dev);
  TORCH_CHECK(grid <= resident && resident >= per_sm * dev.sms, "fusedrnn CUDA ", what,
              ": internal error: the analytic fit model (fusedrnn/cuda_plan.h) gives ", per_sm,
              " CTA(s) per SM with ", smem, " B of shared memory for a grid of ", grid,
              ", the emulated occupancy ", resident, " CTAs on ", dev.sms, " SMs");
  const Args copy = args;
  fusedrnn_emu::KernelLaunch l;
  l.kernel = reinterpret_cast<const void*>(kernel);
  l.invoke = &invoke_kernel<Kernel, Args>;
  l.args = &copy;
  l.what = what;
  l.grid = static_cast<unsigned>(grid);
  l.threads = static_cast<unsigned>(threads);
  l.smem = smem;
  l.cooperative = true;
  fusedrnn_emu::launch(l);
}

template <class Kernel, class Tuple>
void invoke_plain(const void* kernel, const void* args) {
  std::apply(reinterpret_cast<Kernel>(const_cast<void*>(kernel)), *static_cast<const Tuple*>(args));
}

// An ordinary launch (no dynamic shared memory).
template <typename... KArgs, typename... Args>
inline void launch_plain(void (*kernel)(KArgs...), unsigned int grid, int threads, Args... args) {
  using Kernel = void (*)(KArgs...);
  const std::tuple<std::decay_t<KArgs>...> packed(args...);
  fusedrnn_emu::KernelLaunch l;
  l.kernel = reinterpret_cast<const void*>(kernel);
  l.invoke = &invoke_plain<Kernel, std::tuple<std::decay_t<KArgs>...>>;
  l.args = &packed;
  l.grid = grid;
  l.threads = static_cast<unsigned>(threads);
  l.cooperative = false;
  fusedrnn_emu::launch(l);
}

// out (M, N, fp32) = a (M, K) . b (K, N) for bf16/fp16 a, b: on the GPU cuBLAS (a library call, not
// our kernel); here the same products (exact in fp32) summed in fp32 by ATen on CPU.
inline void gemm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
}

// Workspace fill (see Workspace in launch.cuh): the zeroed prefix is zero, the rest NaN-poisoned
// (0xFF bytes: NaN in every floating type), where the GPU leaves it uninitialised.
inline void workspace_fill(const at::Tensor& buf, size_t zeroed) {
  auto* p = static_cast<unsigned char*>(buf.data_ptr());
  std::memset(p, 0xff, static_cast<size_t>(buf.numel()));
  std::memset(p, 0, zeroed);
}

}  // namespace cuda_detail
}  // namespace fusedrnn
