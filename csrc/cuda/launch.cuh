// Host side of the CUDA runtime the ops use, and nothing else: device attributes, occupancy,
// kernel launches (cooperative and plain), the device guard, the current stream and the per-launch
// workspace with its memset.  The op functions in csrc/cuda/*.cu reach the CUDA runtime only through
// this header (and the kernels only through device_ops.cuh), so a CPU emulation of the kernels
// (issue 9, FUSEDRNN_CUDA_EMULATION) replaces exactly these two headers.
//
//   DeviceLimits device_limits(device)    the device's plan::DeviceRecord (what the planner of
//                                         fusedrnn/cuda_plan.h reads: SMs, shared memory, registers,
//                                         threads, cooperative launch), cached per device.
//   int current_device()                  the current CUDA device index.
//   DeviceGuard                           RAII: makes a device (or a tensor's device) current.
//   co_resident_ctas(kernel, threads, smem, dev)   CTAs of `threads` threads and `smem` bytes of
//                                         dynamic shared memory that fit on dev at once (cached).
//   launch_cooperative(kernel, grid, threads, smem, args, dev, what, per_sm)   cooperative launch
//                                         of kernel(args) on the current stream, after confirming
//                                         with the occupancy API the planner's analytic
//                                         co-residency (per_sm CTAs per SM): a disagreement raises.
//   launch_plain(kernel, grid, threads, args...)    ordinary launch on the current stream.
//   Workspace                             one byte allocation per launch; a prefix zeroed by one
//                                         cudaMemsetAsync on the current stream (workspace_fill).
//   gemm_acc_out(out, a, b)               out (M, N, fp32) = a (M, K) . b (K, N) for bf16/fp16 a, b
//                                         with fp32 accumulation (cuBLAS through ATen's mm.dtype_out),
//                                         on the current stream: the stepwise strategy's GEMM.
//   on_op_device(t), kOpDeviceName        whether t is on the device the ops run on, and its name
//                                         for error messages.
// emulation/launch_emu.h provides the same names (the Workspace class below is shared).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "fusedrnn/cuda_plan.h"

#if defined(FUSEDRNN_CUDA_EMULATION)
#include "emulation/launch_emu.h"
#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace fusedrnn {
namespace cuda_detail {

using DeviceGuard = c10::cuda::CUDAGuard;

// The device the ops' tensors live on (the emulation runs the same ops on CPU tensors).
inline bool on_op_device(const at::Tensor& t) { return t.is_cuda(); }
constexpr const char* kOpDeviceName = "CUDA";

inline int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// Device facts used by the planner (fusedrnn/cuda_plan.h).
struct DeviceLimits {
  int device = 0;
  int sms = 0;
  plan::DeviceRecord record;
};
// Cached per device (cudaGetDeviceProperties is slow).
inline DeviceLimits device_limits(int device) {
  static std::mutex mu;
  static std::vector<DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1);
  if (cache[device].sms == 0) {
    cudaDeviceProp prop{};
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    plan::DeviceRecord& r = cache[device].record;
    r.name = prop.name;
    r.major = prop.major;
    r.minor = prop.minor;
    r.multi_processor_count = prop.multiProcessorCount;
    r.shared_memory_per_block_optin = static_cast<int64_t>(prop.sharedMemPerBlockOptin);
    r.shared_memory_per_multiprocessor = static_cast<int64_t>(prop.sharedMemPerMultiprocessor);
    r.regs_per_multiprocessor = prop.regsPerMultiprocessor;
    r.max_threads_per_multi_processor = prop.maxThreadsPerMultiProcessor;
    r.total_memory = static_cast<int64_t>(prop.totalGlobalMem);
    r.L2_cache_size = prop.l2CacheSize;
    r.warp_size = prop.warpSize;
    r.cooperative_launch = prop.cooperativeLaunch != 0;
    cache[device].device = device;
    cache[device].sms = prop.multiProcessorCount;
  }
  return cache[device];
}

// Max co-resident CTAs of `kernel` (`threads` per CTA, `smem` bytes of dynamic shared memory) on
// dev, 0 if it cannot run; dev must be the current device.  Cached per (kernel, threads, smem,
// device): the attribute call and the occupancy query are paid once, not on every launch.  The
// kernel's dynamic shared-memory limit only ever grows (to the largest smem asked for on that
// device), so a cached answer for a smaller smem stays launchable.
template <class Kernel>
inline int co_resident_ctas(Kernel kernel, int threads, size_t smem, const DeviceLimits& dev) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t, int>, int> per_sm_cache;
  static std::map<std::pair<const void*, int>, size_t> smem_limit_set;
  const void* fn = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(fn, threads, smem, dev.device);
  auto it = per_sm_cache.find(key);
  if (it == per_sm_cache.end()) {
    size_t& limit = smem_limit_set[{fn, dev.device}];
    if (smem > limit) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      limit = smem;
    }
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
    it = per_sm_cache.emplace(key, per_sm).first;
  }
  return it->second * dev.sms;
}

// One cooperative launch on the current stream: all `grid` CTAs co-resident or an error.  The
// planner decided the fit analytically (per_sm CTAs per SM); the occupancy API must agree.
template <class Kernel, class Args>
inline void launch_cooperative(Kernel kernel, int grid, int threads, size_t smem, const Args& args,
                               const DeviceLimits& dev, const char* what, int per_sm) {
  const int resident = co_resident_ctas(kernel, threads, smem, dev);
  TORCH_CHECK(grid <= resident && resident >= per_sm * dev.sms, "fusedrnn CUDA ", what,
              ": internal error: the analytic fit model (fusedrnn/cuda_plan.h) gives ", per_sm,
              " CTA(s) per SM with ", smem, " B of shared memory for a grid of ", grid,
              ", the occupancy API ", resident, " CTAs on ", dev.sms, " SMs; please report this");
  Args copy = args;
  void* kargs[] = {reinterpret_cast<void*>(&copy)};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(grid), dim3(threads),
                                             kargs, smem, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// An ordinary launch (no dynamic shared memory) on the current stream.
template <typename... KArgs, typename... Args>
inline void launch_plain(void (*kernel)(KArgs...), unsigned int grid, int threads, Args... args) {
  kernel<<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Fills a fresh workspace: its first `zeroed` bytes become zero (one memset on the current stream).
inline void workspace_fill(const at::Tensor& buf, size_t zeroed) {
  if (zeroed > 0) {
    C10_CUDA_CHECK(cudaMemsetAsync(buf.data_ptr(), 0, zeroed, c10::cuda::getCurrentCUDAStream()));
  }
}

// out (M, N, fp32) = a (M, K) . b (K, N), a and b bf16/fp16: tensor-core GEMM, fp32 result.
inline void gemm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b, at::kFloat);
}

}  // namespace cuda_detail
}  // namespace fusedrnn

#endif  // FUSEDRNN_CUDA_EMULATION

namespace fusedrnn {
namespace cuda_detail {

// Per-launch scratch of a persistent kernel (grid-barrier counter, exchange buffers, fp32/fp64
// state) in ONE allocation, with one cudaMemsetAsync clearing the regions that must start at zero
// (taken first: the counter and the zero-padded exchange buffers).  Regions are 256-byte aligned.
class Workspace {
 public:
  // Reserves n elements of dtype; returns the region's byte offset.
  size_t take(int64_t n, at::ScalarType dtype) {
    const size_t off = bytes_;
    const size_t end = off + static_cast<size_t>(n) * at::elementSize(dtype);
    bytes_ = (end + 255) / 256 * 256;
    return off;
  }
  // Everything reserved so far starts at zero; later regions are filled by the caller.
  void mark_zeroed() { zeroed_ = bytes_; }
  // The allocation (on like's device, through the caching allocator) and the one memset, both on
  // the current stream.
  void allocate(const at::Tensor& like) {
    buf_ = at::empty({static_cast<int64_t>(bytes_)}, like.options().dtype(at::kByte));
    workspace_fill(buf_, zeroed_);
  }
  template <typename T>
  T* ptr(size_t off) const {
    return reinterpret_cast<T*>(static_cast<unsigned char*>(buf_.data_ptr()) + off);
  }
  // A typed view of a region (to fill it with ATen ops on the current stream).
  at::Tensor view(size_t off, at::ScalarType dtype, at::IntArrayRef shape) const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return buf_.narrow(0, static_cast<int64_t>(off), n * static_cast<int64_t>(at::elementSize(dtype)))
        .view(dtype)
        .view(shape);
  }

 private:
  size_t bytes_ = 0, zeroed_ = 0;
  at::Tensor buf_;
};

}  // namespace cuda_detail
}  // namespace fusedrnn

