// The CUDA-semantics emulator the kernels of csrc/cuda run on under FUSEDRNN_CUDA_EMULATION
// (issue 9): the interface between the kernel-side headers (device_ops_emu.h, launch_emu.h) and
// the runtime (runtime.cpp).  Everything here lives in namespace fusedrnn_emu; the emulated kernel
// source itself is compiled into its own namespace (see kernel_tu.h), so the real CUDA objects and
// the emulated CPU objects coexist in one extension.
//
// Model (what a launch does; README "CUDA emulation" says what it shows and what it does not):
//   * every CUDA thread is a cooperative fiber with its own stack; a fiber runs until it reaches
//     __syncthreads, a warp collective (shfl_sync, mma.sync) or an acquire spin, then the next
//     fiber of its block runs.  A block runs one "slice" (from one __syncthreads to the next, or to
//     an acquire spin) at a time, and the blocks of a cooperative launch are interleaved slice by
//     slice in a seeded random order, so a missing grid barrier or a wrong double buffer changes
//     the numbers; the threads inside a slice run in a shuffled order, so a missing __syncthreads
//     does too.
//   * warp collectives exchange data between the 32 lanes: the last lane to arrive computes the
//     warp's result (mma.sync from the PTX ISA fragment tables) and hands each lane its part.
//   * memory the kernels see was allocated by a guarding allocator while the op ran: every buffer
//     ends at an inaccessible guard page, so an out-of-bounds access faults and is reported with
//     kernel, block, thread, buffer and element; shared memory likewise, per block.  Shared memory,
//     workspace and outputs start NaN-poisoned (0xFF bytes).
//   * a race checker at block granularity: writes are found by diffing memory after every slice
//     (plain stores have no hook), ld_cg reads are hooked, and release/acquire atomics carry vector
//     clocks between blocks.  A cross-block ld_cg read of a location written by a block it has not
//     synchronised with (through release/acquire), a write to a location such a block read or
//     wrote, and an ld_nc read of data written during the launch are reported.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#define FUSEDRNN_EMU_API __attribute__((visibility("hidden")))

// Nothing of the emulator is exported from the extension (a test module with its own copy of the
// runtime can be loaded next to it).
#pragma GCC visibility push(hidden)

namespace fusedrnn_emu {

struct Fiber;
struct Block;

// The CUDA thread the running fiber is (valid while a kernel runs).
struct ThreadState {
  unsigned tid = 0;
  unsigned bid = 0;
  Block* block = nullptr;
  unsigned char* smem = nullptr;
};
FUSEDRNN_EMU_API extern ThreadState* g_thread;
// gridDim.x / blockDim.x of the running launch.
FUSEDRNN_EMU_API extern unsigned g_grid_dim;
FUSEDRNN_EMU_API extern unsigned g_block_dim;

// ------------------------------------------------------------------ device-side hooks
FUSEDRNN_EMU_API void sync_threads();
// __shfl_sync of an 8-byte (or 4-byte) value: *value (this lane's) becomes the value of lane src.
FUSEDRNN_EMU_API void shfl_sync(unsigned mask, void* value, unsigned bytes, int src_lane);
enum class MmaKind : int { kBf16 = 0, kF16 = 1, kTf32 = 2 };
// mma.sync m16n8k16 (bf16 / f16) or m16n8k8 (tf32): this lane's registers, per the PTX ISA tables.
FUSEDRNN_EMU_API void mma_sync(MmaKind kind, float* d, const uint32_t a[4], uint32_t b0, uint32_t b1);
// Cache-qualified loads: called before the load itself (race checker, alignment).
FUSEDRNN_EMU_API void on_ld_cg(const void* p, unsigned bytes, unsigned align);
FUSEDRNN_EMU_API void on_ld_nc(const void* p, unsigned bytes, unsigned align);
FUSEDRNN_EMU_API void red_add_release_gpu(unsigned* p, unsigned v);
FUSEDRNN_EMU_API unsigned ld_acquire_gpu(const unsigned* p);
// ld.relaxed.gpu of `bytes` bytes (elements of `elem` bytes, each single-copy atomic) into *out.
// A thread that loads an address again without having been suspended since its last load of it is
// polling: it is suspended first, so the other blocks run.
FUSEDRNN_EMU_API void ld_relaxed_gpu(const void* p, void* out, unsigned bytes, unsigned elem);
// st.relaxed.gpu of one 4- or 8-byte word (a strong store: the race checker tells it from a plain
// store, so a strong load of a plain store by an unsynchronised block is reported).
FUSEDRNN_EMU_API void st_relaxed_gpu(void* p, const void* v, unsigned bytes);
// __syncwarp() with the full mask: a warp collective without data.
FUSEDRNN_EMU_API void sync_warp();

// ------------------------------------------------------------------ device properties
// What the planner asks (launch.cuh builds its plan::DeviceRecord from these; names in brackets
// are torch.cuda.get_device_properties()'s) plus what occupancy needs.  Presets: "H100", "H200",
// "A100" with their real SM counts; `sms` overrides the count (a small count keeps tests fast while
// the planners still build multi-block grids).
struct DeviceProps {
  std::string name;
  std::string record_name;      // [name]: "emulated H100 with 9 SMs"
  int sms = 0;                  // [multi_processor_count]
  size_t smem_optin = 0;        // cudaDevAttrMaxSharedMemoryPerBlockOptin
  size_t smem_per_sm = 0;       // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  size_t smem_reserved = 0;     // cudaDevAttrReservedSharedMemoryPerBlock
  int regs_per_sm = 0;          // 32-bit registers per SM
  int max_regs_per_thread = 0;  // the occupancy model assumes a kernel uses all of them
  int max_threads_per_sm = 0;
  int max_blocks_per_sm = 0;
  int cc_major = 0, cc_minor = 0;
  int64_t total_memory = 0;     // [total_memory] (the cost model tells an H200 by its HBM)
  int64_t l2_bytes = 0;         // [L2_cache_size]
  int id = 0;                   // the "device index" of this configuration (keys the host caches)
};
FUSEDRNN_EMU_API const DeviceProps& device();
// Selects a preset (and SM count, 0 = the preset's); returns the new properties.
FUSEDRNN_EMU_API const DeviceProps& set_device(const std::string& name, int sms);
// Co-resident CTAs of `threads` threads and `smem` bytes of dynamic shared memory on the device.
FUSEDRNN_EMU_API int co_resident_ctas(int threads, size_t smem);

// ------------------------------------------------------------------ launches (host side)
using KernelInvoker = void (*)(const void* kernel, const void* args);
struct KernelLaunch {
  const void* kernel = nullptr;  // the __global__ function (for its name)
  KernelInvoker invoke = nullptr;
  const void* args = nullptr;
  const char* what = nullptr;    // op-level name of a cooperative launch, or null
  unsigned grid = 0, threads = 0;
  size_t smem = 0;
  bool cooperative = false;
};
// Runs a launch to completion on this thread.  Launch-configuration errors (the ones the CUDA
// runtime reports) throw; what goes wrong inside the kernel (out-of-bounds access, race, deadlock)
// is recorded and raised by the op scope (ops_emu.h) when the op returns.
FUSEDRNN_EMU_API void launch(const KernelLaunch& l);

// ------------------------------------------------------------------ emulated op scope
// Everything a launch touches must be allocated by the guarding allocator while an op scope is
// open (ops_emu.h opens one around every emulated op): inputs are copied into guarded buffers,
// outputs and workspaces are allocated there by at::empty.
class FUSEDRNN_EMU_API OpScope {
 public:
  explicit OpScope(const char* op);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;
  // Names a buffer for reports (an op input or output).
  void label(const void* data, const std::string& what, int elem_size);
  // Throws (c10::Error) with every problem the launches of this op recorded.
  void check() const;

 private:
  const char* op_;
  void* prev_allocator_;
};

// Launch statistics (for tests: every kernel of csrc/cuda is executed): kernel name -> launches.
FUSEDRNN_EMU_API std::vector<std::pair<std::string, long>> kernel_launch_counts();
FUSEDRNN_EMU_API void reset_kernel_launch_counts();
// Short names (as in kernel_launch_counts) of the void functions of namespace `ns` compiled into
// the shared object that holds this runtime: the kernel instantiations that exist (with helpers
// the caller filters out by name).
FUSEDRNN_EMU_API std::vector<std::string> compiled_functions(const std::string& ns);
// The most recent launches (at most 4096): kernel, grid, threads per block, dynamic shared memory.
struct LaunchRecord {
  std::string kernel;
  unsigned grid = 0, threads = 0;
  size_t smem = 0;
  bool cooperative = false;
};
FUSEDRNN_EMU_API std::vector<LaunchRecord> launch_log();
FUSEDRNN_EMU_API void clear_launch_log();

// Options of the scheduler and the checker.
struct Options {
  std::string block_order = "random";   // random | round_robin
  std::string thread_order = "shuffle"; // shuffle | forward | reverse
  uint64_t seed = 0;
  bool race_check = true;
  size_t stack_bytes = 64 << 10;        // per fiber
};
FUSEDRNN_EMU_API Options& options();

}  // namespace fusedrnn_emu

#pragma GCC visibility pop
