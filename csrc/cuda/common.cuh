// Shared machinery of the persistent CUDA kernels (csrc/cuda/*.cu):
//   * storage-type <-> accumulation-type conversions and the dtype/engine dispatch,
//   * the two exchange protocols between time steps (split grid barrier; flag-tagged words),
//   * the three "CTA GEMM engines" that compute, per step, out[row][n] = sum_k W[row][k] * X[n][k]
//     for the W slice a CTA keeps in shared memory for the whole sequence and an operand X
//     (h_{t-1}, m_t, dgates_t, ...) that the grid exchanged through global memory (L2),
//   * the bridge to the launch planner (fusedrnn/cuda_plan.h: fit, geometry, cost model).
// Kernels reach the hardware only through device_ops.cuh (every intrinsic and inline PTX), the
// host code reaches the CUDA runtime only through launch.cuh: the seams a CPU emulation replaces.
//
// Engines (all write fp32/fp64 partial sums per warp into the shared buffer `red`; the caller's
// epilogue adds the kWarps partials of each output):
//   MmaEngine16<T, NT>  bf16/fp16, mma.sync m16n8k16, fp32 accumulate.   W stored fragment-ordered.
//   MmaEngineTF32<NT>   fp32 with TF32 allowed, mma.sync m16n8k8 tf32.    W stored fragment-ordered.
//   FmaEngine<T>        fp32 (no TF32) and fp64, plain FMA (exact order-independent math).
// Rows of W are the GEMM's M (16 per m-tile, MT <= kMaxMT m-tiles per CTA); the batch is N (8 per
// n-tile, NT n-tiles per pass, the batch loops over passes of BN = 8*NT columns); K (the reduction,
// = the size of the exchanged vector) is split over the kWarps warps in chunks of 32.
//
// Fragment trick: the MMA sums over k, so any permutation of k applied to both operands gives the
// same result.  We permute k inside every 32-wide chunk so that lane (g = lane/4, q = lane%4) owns
// the 8 contiguous elements X[n][32c + 8q .. 32c + 8q + 7] (16 bytes for 16-bit types): the B
// fragments of two m16n8k16 k-tiles come from ONE 16-byte global load (ld_cg: L2, never a stale
// L1 line), and W is laid out in shared memory in the same permuted fragment order when it is
// staged, so each A fragment is one conflict-free 16-byte shared load.  Exchange buffers are padded
// (rows to a multiple of BN per batch group, columns to a multiple of 32, zero-filled) so no load
// needs a guard.
//
// Exchange protocols (plan::Sync; the planner picks one per launch):
//   kSyncBarrier  elements stored plainly; per step (and batch group) the CTA stores its exchange
//                 elements, then arrive() (__syncthreads + one release-add by thread 0), then the
//                 stores nobody reads during the launch (y, gates, cell states) and the next step's
//                 prefetch, then wait() (thread 0 spins with relaxed loads, then ONE acquire load,
//                 then __syncthreads).  The release therefore only waits for the exchange stores.
//   kSyncFlags    no barrier at all: every exchanged element is stored together with the step's
//                 tag in one single-copy-atomic word (16-bit value | tag << 16 in 32 bits; fp32
//                 value | tag << 32 in 64 bits) with st.relaxed, and readers re-load (ld.relaxed)
//                 each 8-element fragment until all its tags are the expected one.  A tag names the
//                 step, so a reader never takes a stale value; a writer is never more than one
//                 step ahead of a reader (it needs the reader's own contribution first), so double
//                 buffering suffices.  Padding (rows past the group, columns past K) is never
//                 written and never checked.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include <ATen/ATen.h>

#include "device_ops.cuh"
#include "launch.cuh"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/checks.h"
#include "fusedrnn/cuda_plan.h"
#include "fusedrnn/ops.h"

namespace fusedrnn {
namespace cuda_detail {

constexpr int kThreads = plan::kThreads;  // 8 warps per CTA, one CTA per SM
constexpr int kWarps = plan::kWarps;
constexpr int kMaxMT = plan::kMaxMT;      // at most 64 W rows per CTA per GEMM
constexpr int kChunk = plan::kChunk;      // K granularity of the engines (and padding of exchange buffers)
constexpr int kMaxItems = plan::kMaxItems;  // pointwise items per thread per wave

// ------------------------------------------------------------------------------ host helpers
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
__host__ __device__ inline size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

// ------------------------------------------------------------------------ dtype conversions
__device__ __forceinline__ float to_acc(dev::bf16 x) { return dev::bf16_to_f32(x); }
__device__ __forceinline__ float to_acc(dev::f16 x) { return dev::f16_to_f32(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ dev::bf16 from_acc<dev::bf16>(float v) { return dev::f32_to_bf16(v); }
template <>
__device__ __forceinline__ dev::f16 from_acc<dev::f16>(float v) { return dev::f32_to_f16(v); }
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return static_cast<T>(v); }  // double only

template <typename T>
__device__ __forceinline__ T zero_of() { return from_acc<T>(acc_t<T>(0)); }

__device__ __forceinline__ uint32_t bits16(dev::bf16 x) { return dev::bits(x); }
__device__ __forceinline__ uint32_t bits16(dev::f16 x) { return dev::bits(x); }
template <typename T>
__device__ __forceinline__ T from_bits16(uint32_t u);
template <>
__device__ __forceinline__ dev::bf16 from_bits16<dev::bf16>(uint32_t u) { return dev::bf16_from_bits(static_cast<unsigned short>(u)); }
template <>
__device__ __forceinline__ dev::f16 from_bits16<dev::f16>(uint32_t u) { return dev::f16_from_bits(static_cast<unsigned short>(u)); }
__device__ __forceinline__ uint32_t float_bits(float v) { return dev::float_as_uint(v); }
__device__ __forceinline__ float bits_float(uint32_t u) { return dev::uint_as_float(u); }

// Map at:: scalar types to the CUDA storage types the kernels use.
template <typename T>
struct AtType;
template <>
struct AtType<dev::bf16> { static constexpr at::ScalarType value = at::kBFloat16; };
template <>
struct AtType<dev::f16> { static constexpr at::ScalarType value = at::kHalf; };
template <>
struct AtType<float> { static constexpr at::ScalarType value = at::kFloat; };
template <>
struct AtType<double> { static constexpr at::ScalarType value = at::kDouble; };

template <typename T>
inline T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}
template <typename T>
inline const T* optr(const c10::optional<at::Tensor>& t) {
  return (t.has_value() && t->defined()) ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

// ------------------------------------------------------------------------- exchange protocols
constexpr int kSyncBarrier = static_cast<int>(plan::Sync::kBarrier);
constexpr int kSyncFlags = static_cast<int>(plan::Sync::kFlags);

// How a reader checks a flag-tagged operand: the expected tag, the rows of the exchange buffer
// (from the operand pointer on) that are real, and the real K (columns past it are padding).
struct Check {
  uint32_t tag = 0;
  int64_t rows = 0;
  int64_t k = 0;
};

// Exchange element of storage type T under protocol S: word_t (what the buffer holds), put (a
// writer's store of value v for the step tagged `tag`), get (a read of a value this CTA wrote, or
// one published by a barrier), tag(s) (the tag of step s).
template <typename T, int S, typename Enable = void>
struct Xchg;

template <typename T>
struct Xchg<T, kSyncBarrier> {
  using word_t = T;
  static constexpr bool kFlags = false;
  __device__ static uint32_t tag(int64_t) { return 0; }
  __device__ static void put(word_t* p, T v, uint32_t) { *p = v; }
  __device__ static T get(const word_t* p) { return dev::ld_cg(p); }
};

// 16-bit values: value bits | tag << 16 in one u32; tags cycle mod 65535 (a reader's stale
// candidate is two steps old, so any cycle longer than 2 is unambiguous).
template <typename T>
struct Xchg<T, kSyncFlags, typename std::enable_if<sizeof(T) == 2>::type> {
  using word_t = unsigned int;
  static constexpr bool kFlags = true;
  __device__ static uint32_t tag(int64_t s) { return static_cast<uint32_t>(s % 65535); }
  __device__ static void put(word_t* p, T v, uint32_t tag) { dev::st_relaxed_gpu(p, uint32_t(bits16(v)) | (tag << 16)); }
  __device__ static T get(const word_t* p) { return from_bits16<T>(dev::ld_relaxed_gpu(p) & 0xFFFFu); }
};

// fp32 values: value bits | tag << 32 in one u64; tags cycle mod 2^32 - 1.
template <>
struct Xchg<float, kSyncFlags> {
  using word_t = unsigned long long;
  static constexpr bool kFlags = true;
  __device__ static uint32_t tag(int64_t s) { return static_cast<uint32_t>(s % 0xFFFFFFFFll); }
  __device__ static void put(word_t* p, float v, uint32_t tag) {
    dev::st_relaxed_gpu(p, (static_cast<unsigned long long>(tag) << 32) | float_bits(v));
  }
  __device__ static float get(const word_t* p) { return bits_float(static_cast<uint32_t>(dev::ld_relaxed_gpu(p))); }
};

// Per-step synchronisation of one batch group (kSyncBarrier): a monotonic arrival counter per
// group (zeroed before the launch; after the k-th barrier it holds k * count).  Co-residency of all
// CTAs is guaranteed by the cooperative launch, so the spin terminates.  Release/acquire at gpu
// scope made cumulative over the CTA by bar.sync (the pattern of CUTLASS's GenericBarrier);
// readers use ld.global.cg so no stale L1 line is read.  `legacy`: the round-1 order (callers
// store everything before arrive) and an acquire load on every poll.
template <int S>
struct StepSync {
  unsigned int* counter;
  unsigned int count;
  bool legacy;
  unsigned int target = 0;
  __device__ void arrive() {
    dev::sync_threads();  // every thread's exchange stores are ordered before thread 0's release
    target += count;
    if (dev::thread_idx() == 0) dev::red_add_release_gpu(counter, 1);
  }
  __device__ void wait() {
    if (dev::thread_idx() == 0) {
      if (legacy) {
        while (static_cast<int>(dev::ld_acquire_gpu(counter) - target) < 0) {
        }
      } else {
        while (static_cast<int>(dev::ld_relaxed_gpu(counter) - target) < 0) {
        }
        (void)dev::ld_acquire_gpu(counter);  // synchronises with every arrival (release sequence)
      }
    }
    dev::sync_threads();  // ... and thread 0's acquire before every thread's reads of the next step
  }
};
template <>
struct StepSync<kSyncFlags> {
  unsigned int* counter;
  unsigned int count;
  bool legacy;
  __device__ void arrive() {}
  __device__ void wait() {}
};

// ATen dtype of an exchange word (the workspace is allocated and filled through ATen views).
template <typename W>
inline at::ScalarType word_dtype() {
  if constexpr (std::is_same<W, unsigned int>::value) return at::kInt;
  else if constexpr (std::is_same<W, unsigned long long>::value) return at::kLong;
  else return AtType<W>::value;
}

// Padded words per group row of an exchange buffer of K real columns: K rounded up to a chunk.
inline int64_t xchg_ld(int64_t K) { return round_up(K, kChunk); }

// Sum of the kWarps per-warp partials of output (row, n).
template <typename A>
__device__ __forceinline__ A red_sum(const A* red, int rows, int bn, int row, int n) {
  A s = A(0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[(w * rows + row) * bn + n];
  return s;
}

// Epilogue: dst[b*ld + c0 + j] = round(src[b*ld + c0 + j]) for the CTA's own columns
// c0 <= c0 + j < c0 + n of all B rows (fp32/fp64 state workspace -> storage-type output).
template <typename T, typename A>
__device__ __forceinline__ void store_own_cols(T* dst, const A* src, int64_t ld, int64_t c0, int n, int64_t B) {
  for (int64_t idx = dev::thread_idx(); idx < int64_t(n) * B; idx += kThreads) {
    const int j = static_cast<int>(idx % n);
    const int64_t b = idx / n;
    dst[b * ld + c0 + j] = from_acc<T>(src[b * ld + c0 + j]);
  }
}

// Latency hiding of the forward kernels: the gate inputs of the item (hidden unit u, batch b) a
// thread handles first in the first batch pass (the same every step): b_hh of its NG gates
// (constant) and, for step t, xproj_t (xproj is (T, B, NG*H)) and whether t is valid for b, loaded
// for the next step before the grid barrier (off the critical path).
template <int NG, typename T, typename A>
struct FixedGateInputs {
  A bias[NG], x[NG];
  bool valid = false;
  __device__ __forceinline__ void load_bias(bool has, const T* b_hh, int64_t H, int64_t u) {
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) bias[gi] = (has && b_hh) ? A(to_acc(b_hh[gi * H + u])) : A(0);
  }
  __device__ __forceinline__ void load_step(bool has, const T* xproj, const int64_t* lengths, int64_t t,
                                            int64_t B, int64_t H, int64_t b, int64_t u) {
    if (!has) return;
    const T* xp = xproj + (t * B + b) * (NG * H) + u;
#pragma unroll
    for (int gi = 0; gi < NG; ++gi) x[gi] = to_acc(xp[gi * H]);
    valid = lengths == nullptr || t < dev::ld_nc(lengths + b);
  }
};

// ================================================================= operand fragments (per lane)
// One lane's 8 consecutive elements X[row][32c + 8q .. +7] of one n-tile row, as loaded under
// protocol S: load(p) issues the loads, ready(tag, nvalid) checks the tags of its first nvalid
// elements (the rest is padding), and the data in the engine's operand form.
inline __device__ uint32_t pack_lo16(uint32_t a, uint32_t b) { return (a & 0xFFFFu) | (b << 16); }

template <int S>
struct Frag16;  // 16-bit elements
template <>
struct Frag16<kSyncBarrier> {
  uint4 v;
  template <typename W>
  __device__ void load(const W* p) { v = dev::ld_cg(reinterpret_cast<const uint4*>(p)); }
  __device__ bool ready(uint32_t, int) const { return true; }
  __device__ uint4 data() const { return v; }
};
template <>
struct Frag16<kSyncFlags> {
  uint4 lo, hi;  // 8 words: value | tag << 16
  __device__ void load(const unsigned int* p) {
    lo = dev::ld_relaxed_gpu(reinterpret_cast<const uint4*>(p));
    hi = dev::ld_relaxed_gpu(reinterpret_cast<const uint4*>(p) + 1);
  }
  __device__ bool ready(uint32_t tag, int nvalid) const {
    const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    bool ok = true;
#pragma unroll
    for (int e = 0; e < 8; ++e) ok &= (e >= nvalid) | ((w[e] >> 16) == tag);
    return ok;
  }
  __device__ uint4 data() const {
    uint4 r;
    r.x = pack_lo16(lo.x, lo.y);
    r.y = pack_lo16(lo.z, lo.w);
    r.z = pack_lo16(hi.x, hi.y);
    r.w = pack_lo16(hi.z, hi.w);
    return r;
  }
};

template <int S>
struct Frag32;  // fp32 elements
template <>
struct Frag32<kSyncBarrier> {
  float4 lo, hi;
  __device__ void load(const float* p) {
    lo = dev::ld_cg(reinterpret_cast<const float4*>(p));
    hi = dev::ld_cg(reinterpret_cast<const float4*>(p) + 1);
  }
  __device__ bool ready(uint32_t, int) const { return true; }
  __device__ void floats(float (&f)[8]) const {
    f[0] = lo.x; f[1] = lo.y; f[2] = lo.z; f[3] = lo.w;
    f[4] = hi.x; f[5] = hi.y; f[6] = hi.z; f[7] = hi.w;
  }
};
template <>
struct Frag32<kSyncFlags> {
  ulonglong2 w[4];  // 8 words: value | tag << 32
  __device__ void load(const unsigned long long* p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = dev::ld_relaxed_gpu(reinterpret_cast<const ulonglong2*>(p) + i);
  }
  __device__ bool ready(uint32_t tag, int nvalid) const {
    bool ok = true;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ok &= (2 * i >= nvalid) | (static_cast<uint32_t>(w[i].x >> 32) == tag);
      ok &= (2 * i + 1 >= nvalid) | (static_cast<uint32_t>(w[i].y >> 32) == tag);
    }
    return ok;
  }
  __device__ void floats(float (&f)[8]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = bits_float(static_cast<uint32_t>(w[i].x));
      f[2 * i + 1] = bits_float(static_cast<uint32_t>(w[i].y));
    }
  }
};

// Real elements of the lane's 8 (column 32c + 8q on) of a row that is real (row_ok), else 0.
__device__ __forceinline__ int frag_valid(bool row_ok, int c, int q, int64_t k) {
  if (!row_ok) return 0;
  const int64_t left = k - (int64_t(c) * kChunk + 8 * q);
  return left <= 0 ? 0 : (left >= 8 ? 8 : static_cast<int>(left));
}

// ================================================================ engine: bf16 / fp16 tensor cores
template <typename T, int NT_>
struct MmaEngine16 {
  using storage_t = T;
  using acc_t = float;
  static constexpr int NT = NT_;
  static constexpr int BN = 8 * NT_;
  static constexpr bool kTensorCores = true;
  static constexpr plan::Engine kKind = plan::Engine::kMma16;

  __host__ __device__ static size_t w_bytes(int MT, int KC) { return size_t(MT) * KC * 2 * 32 * sizeof(uint4); }

  // get(row, k) -> acc value of W[row][k] (0 for padding rows/columns).
  template <class Get>
  __device__ static void stage_w(uint4* ws, int MT, int KC, Get get) {
    const int total = MT * KC * 2 * 32;
    for (int idx = dev::thread_idx(); idx < total; idx += kThreads) {
      const int lane = idx & 31, j = (idx >> 5) & 1, c = (idx >> 6) % KC, mt = (idx >> 6) / KC;
      const int g = lane >> 2, q = lane & 3;
      const int row = mt * 16 + g, k = c * kChunk + 8 * q + 4 * j;
      auto pack = [&](int r, int kk) -> uint32_t {
        return bits16(from_acc<T>(get(r, kk))) | (bits16(from_acc<T>(get(r, kk + 1))) << 16);
      };
      uint4 v;
      v.x = pack(row, k);          // a0: row g,   logical k 2q..2q+1
      v.y = pack(row + 8, k);      // a1: row g+8
      v.z = pack(row, k + 2);      // a2: row g,   logical k 2q+8..2q+9
      v.w = pack(row + 8, k + 2);  // a3: row g+8
      ws[idx] = v;
    }
  }

  // Per-warp partial GEMM over this warp's chunks; X points at row n0 of the exchange buffer.
  template <class X>
  __device__ static void compute(const uint4* __restrict__ ws, int MT, int KC, const typename X::word_t* __restrict__ Xp,
                                 int64_t ldx, float* red, const Check& chk) {
    const int warp = dev::thread_idx() >> 5, lane = dev::thread_idx() & 31, g = lane >> 2, q = lane & 3;
    float acc[kMaxMT][NT][4];
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    // Chunks c = warp, warp + 8, ...; the operand loads run kDepth chunks ahead of the math so
    // that for K <= 2048 (one n-tile) all of a step's loads are in flight at once.
    constexpr int kDepth = NT >= 4 ? 2 : (NT == 2 ? 4 : 8);
    const typename X::word_t* xl = Xp + int64_t(g) * ldx + 8 * q;
    bool row_ok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) row_ok[nt] = g + 8 * nt < chk.rows;
    Frag16<X::kFlags ? kSyncFlags : kSyncBarrier> buf[kDepth][NT];
    auto load = [&](int i, int c) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) buf[i][nt].load(xl + int64_t(nt * 8) * ldx + c * kChunk);
    };
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      if (warp + i * kWarps < KC) load(i, warp + i * kWarps);
    }
    for (int base = 0; warp + base * kWarps < KC; base += kDepth) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        const int c = warp + (base + i) * kWarps;
        if (c < KC) {
          if constexpr (X::kFlags) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const int nvalid = frag_valid(row_ok[nt], c, q, chk.k);
              while (!buf[i][nt].ready(chk.tag, nvalid)) buf[i][nt].load(xl + int64_t(nt * 8) * ldx + c * kChunk);
            }
            dev::sync_warp();  // lanes left their polls at different times: reconverge for mma.sync
          }
          uint4 b[NT];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) b[nt] = buf[i][nt].data();
          const int cn = c + kDepth * kWarps;
          if (cn < KC) load(i, cn);
#pragma unroll
          for (int mt = 0; mt < kMaxMT; ++mt) {
            if (mt < MT) {
              const uint4* wp = ws + (size_t(mt * KC + c) * 2) * 32 + lane;
              const uint4 a0 = wp[0], a1 = wp[32];
#pragma unroll
              for (int nt = 0; nt < NT; ++nt) {
                dev::mma_m16n8k16<T>(acc[mt][nt], a0, b[nt].x, b[nt].y);
                dev::mma_m16n8k16<T>(acc[mt][nt], a1, b[nt].z, b[nt].w);
              }
            }
          }
        }
      }
    }
    const int rows = MT * 16;
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt) {
      if (mt < MT) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int row = mt * 16 + g, n = nt * 8 + 2 * q;
          *reinterpret_cast<float2*>(red + (warp * rows + row) * BN + n) =
              make_float2(acc[mt][nt][0], acc[mt][nt][1]);
          *reinterpret_cast<float2*>(red + (warp * rows + row + 8) * BN + n) =
              make_float2(acc[mt][nt][2], acc[mt][nt][3]);
        }
      }
    }
  }
};

// ============================================================================ engine: fp32 TF32
template <int NT_>
struct MmaEngineTF32 {
  using storage_t = float;
  using acc_t = float;
  static constexpr int NT = NT_;
  static constexpr int BN = 8 * NT_;
  static constexpr bool kTensorCores = true;
  static constexpr plan::Engine kKind = plan::Engine::kTf32;

  // Per (m-tile, chunk): 4 k-tiles (k = 8) x 32 lanes x one uint4.
  __host__ __device__ static size_t w_bytes(int MT, int KC) { return size_t(MT) * KC * 4 * 32 * sizeof(uint4); }

  // Lane q owns physical k = 32c + 8q .. 8q+7; k-tile j uses its elements 2j (logical k q) and
  // 2j+1 (logical k q+4).
  template <class Get>
  __device__ static void stage_w(uint4* ws, int MT, int KC, Get get) {
    const int total = MT * KC * 4 * 32;
    for (int idx = dev::thread_idx(); idx < total; idx += kThreads) {
      const int lane = idx & 31, j = (idx >> 5) & 3, c = (idx >> 7) % KC, mt = (idx >> 7) / KC;
      const int g = lane >> 2, q = lane & 3;
      const int row = mt * 16 + g, k = c * kChunk + 8 * q + 2 * j;
      uint4 v;
      v.x = dev::f32_to_tf32(get(row, k));
      v.y = dev::f32_to_tf32(get(row + 8, k));
      v.z = dev::f32_to_tf32(get(row, k + 1));
      v.w = dev::f32_to_tf32(get(row + 8, k + 1));
      ws[idx] = v;
    }
  }

  template <class X>
  __device__ static void compute(const uint4* __restrict__ ws, int MT, int KC, const typename X::word_t* __restrict__ Xp,
                                 int64_t ldx, float* red, const Check& chk) {
    const int warp = dev::thread_idx() >> 5, lane = dev::thread_idx() & 31, g = lane >> 2, q = lane & 3;
    float acc[kMaxMT][NT][4];
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    constexpr int kDepth = NT == 1 ? 4 : (NT == 2 ? 2 : 1);  // loads run ahead of the math
    const typename X::word_t* xl = Xp + int64_t(g) * ldx + 8 * q;
    bool row_ok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) row_ok[nt] = g + 8 * nt < chk.rows;
    Frag32<X::kFlags ? kSyncFlags : kSyncBarrier> buf[kDepth][NT];
    auto load = [&](int i, int c) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) buf[i][nt].load(xl + int64_t(nt * 8) * ldx + c * kChunk);
    };
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      if (warp + i * kWarps < KC) load(i, warp + i * kWarps);
    }
    for (int base = 0; warp + base * kWarps < KC; base += kDepth) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        const int c = warp + (base + i) * kWarps;
        if (c < KC) {
          if constexpr (X::kFlags) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
              const int nvalid = frag_valid(row_ok[nt], c, q, chk.k);
              while (!buf[i][nt].ready(chk.tag, nvalid)) buf[i][nt].load(xl + int64_t(nt * 8) * ldx + c * kChunk);
            }
            dev::sync_warp();  // reconverge for mma.sync
          }
          uint32_t b[NT][8];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            float f[8];
            buf[i][nt].floats(f);
#pragma unroll
            for (int e = 0; e < 8; ++e) b[nt][e] = dev::f32_to_tf32(f[e]);
          }
          const int cn = c + kDepth * kWarps;
          if (cn < KC) load(i, cn);
#pragma unroll
          for (int mt = 0; mt < kMaxMT; ++mt) {
            if (mt < MT) {
              const uint4* wp = ws + (size_t(mt * KC + c) * 4) * 32 + lane;
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const uint4 a = wp[j * 32];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                  dev::mma_m16n8k8_tf32(acc[mt][nt], a, b[nt][2 * j], b[nt][2 * j + 1]);
                }
              }
            }
          }
        }
      }
    }
    const int rows = MT * 16;
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt) {
      if (mt < MT) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int row = mt * 16 + g, n = nt * 8 + 2 * q;
          *reinterpret_cast<float2*>(red + (warp * rows + row) * BN + n) =
              make_float2(acc[mt][nt][0], acc[mt][nt][1]);
          *reinterpret_cast<float2*>(red + (warp * rows + row + 8) * BN + n) =
              make_float2(acc[mt][nt][2], acc[mt][nt][3]);
        }
      }
    }
  }
};

// ================================================================== engine: plain FMA (fp32/fp64)
// W row-major in shared memory with a padded row stride (conflict-free column reads).  Lane
// (r = lane%16, half = lane/16) owns rows mt*16 + r and batch columns 4*half .. 4*half+3.  Each
// warp loads its chunk of X coalesced (lane = k), stages it transposed in its slice of the `red`
// buffer (x[k][n]) and every lane reads its four columns of row k as one 16-byte (fp64: two)
// shared load that the whole half-warp shares (a broadcast): no shuffles.  The next chunk's loads
// are issued before the current chunk's math.  The partial sums go to `red` after a CTA barrier
// (every warp has left its stage by then).  Barrier protocol only.
template <typename T>
struct FmaEngine {
  using storage_t = T;
  using acc_t = T;
  static constexpr int NT = 1;
  static constexpr int BN = 8;
  static constexpr bool kTensorCores = false;
  static constexpr plan::Engine kKind = sizeof(T) == 8 ? plan::Engine::kFma64 : plan::Engine::kFma32;
  using vec_t = typename std::conditional<sizeof(T) == 8, double2, float4>::type;
  static constexpr int kVec = sizeof(vec_t) / sizeof(T);  // elements per 16-byte shared access

  __host__ __device__ static int ldw(int KC) { return KC * kChunk + 1; }
  __host__ __device__ static size_t w_bytes(int MT, int KC) { return size_t(MT) * 16 * (KC * kChunk + 1) * sizeof(T); }

  template <class Get>
  __device__ static void stage_w(uint4* ws_raw, int MT, int KC, Get get) {
    T* ws = reinterpret_cast<T*>(ws_raw);
    const int ld = KC * kChunk + 1, K = KC * kChunk;
    const int total = MT * 16 * K;
    for (int idx = dev::thread_idx(); idx < total; idx += kThreads) {
      const int row = idx / K, k = idx % K;
      ws[row * ld + k] = get(row, k);
    }
  }

  template <class X>
  __device__ static void compute(const uint4* __restrict__ ws_raw, int MT, int KC, const typename X::word_t* __restrict__ Xp,
                                 int64_t ldx, T* red, const Check&) {
    static_assert(!X::kFlags, "the FMA engine exchanges through the barrier protocol only");
    const T* ws = reinterpret_cast<const T*>(ws_raw);
    const int warp = dev::thread_idx() >> 5, lane = dev::thread_idx() & 31, r = lane & 15, half = lane >> 4;
    const int ld = KC * kChunk + 1;
    T* stage = red + warp * kChunk * 8;  // [32 k][8 n] of this warp
    T acc[kMaxMT][4];
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mt][j] = T(0);
    T x[8];
    auto load = [&](int c) {
#pragma unroll
      for (int n = 0; n < 8; ++n) x[n] = dev::ld_cg(Xp + int64_t(n) * ldx + c * kChunk + lane);
    };
    if (warp < KC) load(warp);
    for (int c = warp; c < KC; c += kWarps) {
      dev::sync_warp();  // the previous chunk's broadcasts are read
      vec_t* dst = reinterpret_cast<vec_t*>(stage + lane * 8);
#pragma unroll
      for (int v = 0; v < 8 / kVec; ++v) dst[v] = pack_vec(x, v);
      dev::sync_warp();
      if (c + kWarps < KC) load(c + kWarps);
#pragma unroll 4
      for (int kk = 0; kk < kChunk; ++kk) {
        T v[4];
        const vec_t* src = reinterpret_cast<const vec_t*>(stage + kk * 8 + 4 * half);
        unpack_vec(src, v);
#pragma unroll
        for (int mt = 0; mt < kMaxMT; ++mt) {
          if (mt < MT) {
            const T w = ws[(mt * 16 + r) * ld + c * kChunk + kk];
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[mt][j] = dev::fma_rn(w, v[j], acc[mt][j]);
          }
        }
      }
    }
    dev::sync_threads();  // every warp is out of its stage: the partials may overwrite it
    const int rows = MT * 16;
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt) {
      if (mt < MT) {
#pragma unroll
        for (int j = 0; j < 4; ++j) red[(warp * rows + mt * 16 + r) * BN + 4 * half + j] = acc[mt][j];
      }
    }
  }

 private:
  __device__ static vec_t pack_vec(const T (&x)[8], int v) {
    vec_t out;
    if constexpr (sizeof(T) == 8) {
      out.x = x[2 * v];
      out.y = x[2 * v + 1];
    } else {
      out.x = x[4 * v];
      out.y = x[4 * v + 1];
      out.z = x[4 * v + 2];
      out.w = x[4 * v + 3];
    }
    return out;
  }
  __device__ static void unpack_vec(const vec_t* src, T (&v)[4]) {
    if constexpr (sizeof(T) == 8) {
      const double2 a = src[0], b = src[1];
      v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
    } else {
      const float4 a = src[0];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    }
  }
};

// ------------------------------------------------------------------------------ dispatch
template <typename T_, class Eng_>
struct EngineTag {
  using T = T_;
  using Eng = Eng_;
};

// Calls f(EngineTag<T, Eng>{}) for the storage dtype, TF32 switch and n-tile count nt (1, 2, 4;
// ignored by the FMA engine).
template <class F>
inline void dispatch_engine(at::ScalarType st, bool allow_tf32, int nt, F&& f) {
  switch (st) {
    case at::kBFloat16:
      if (nt >= 4) f(EngineTag<dev::bf16, MmaEngine16<dev::bf16, 4>>{});
      else if (nt == 2) f(EngineTag<dev::bf16, MmaEngine16<dev::bf16, 2>>{});
      else f(EngineTag<dev::bf16, MmaEngine16<dev::bf16, 1>>{});
      break;
    case at::kHalf:
      if (nt >= 4) f(EngineTag<dev::f16, MmaEngine16<dev::f16, 4>>{});
      else if (nt == 2) f(EngineTag<dev::f16, MmaEngine16<dev::f16, 2>>{});
      else f(EngineTag<dev::f16, MmaEngine16<dev::f16, 1>>{});
      break;
    case at::kFloat:
      if (allow_tf32) {
        if (nt >= 4) f(EngineTag<float, MmaEngineTF32<4>>{});
        else if (nt == 2) f(EngineTag<float, MmaEngineTF32<2>>{});
        else f(EngineTag<float, MmaEngineTF32<1>>{});
      } else {
        f(EngineTag<float, FmaEngine<float>>{});
      }
      break;
    case at::kDouble:
      f(EngineTag<double, FmaEngine<double>>{});
      break;
    default:
      TORCH_CHECK(false, "fusedrnn CUDA: unsupported dtype ", st);
  }
}

// Calls f(T{}) with the CUDA 16-bit storage type of `st` (the stepwise kernels).
template <class F>
inline void dispatch_storage(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kBFloat16: f(dev::bf16{}); break;
    case at::kHalf: f(dev::f16{}); break;
    default: TORCH_CHECK(false, "fusedrnn CUDA: internal error: the stepwise path runs bf16/fp16, got ", st);
  }
}

// The stepwise strategy (stepwise.cu, plan::Plan::stepwise): per step one GEMM over the batch and
// one pointwise kernel.  Outputs are allocated by the callers (gates / cs unused when !save).
void lstm_fwd_stepwise(const Tensor& xproj, const Tensor& w, const Tensor& bh, const Tensor& h0, const Tensor& c0,
                       const OptTensor& lengths, bool reverse, const Tensor& y, const Tensor& h_n, const Tensor& c_n,
                       const Tensor& gates, const Tensor& cs, bool save);
void lstm_bwd_stepwise(const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w, const Tensor& c0,
                       const Tensor& gates, const Tensor& cs, const OptTensor& lengths, bool reverse,
                       const Tensor& dxproj, const Tensor& dh0, const Tensor& dc0);
void gru_fwd_stepwise(const Tensor& xproj, const Tensor& w, const Tensor& bh, const Tensor& h0,
                      const OptTensor& lengths, bool reverse, const Tensor& y, const Tensor& h_n, const Tensor& gates,
                      bool save);
void gru_bwd_stepwise(const Tensor& dy, const Tensor& dh_n, const Tensor& w, const Tensor& h0, const Tensor& y,
                      const Tensor& gates, const OptTensor& lengths, bool reverse, const Tensor& dxproj,
                      const Tensor& dh0, const Tensor& dhn);

// --------------------------------------------------------------------------- planner bridge
// plan::Engine of a dtype under the caller's TF32 flag, and the dtype class of the limits.
inline plan::Engine engine_kind(at::ScalarType st, bool allow_tf32) {
  switch (st) {
    case at::kBFloat16:
    case at::kHalf: return plan::Engine::kMma16;
    case at::kFloat: return allow_tf32 ? plan::Engine::kTf32 : plan::Engine::kFma32;
    case at::kDouble: return plan::Engine::kFma64;
    default: TORCH_CHECK(false, "fusedrnn CUDA: unsupported dtype ", st);
  }
}
inline int dtype_kind(at::ScalarType st) {
  return st == at::kDouble ? 2 : (st == at::kFloat ? 1 : 0);
}

// The launch plan of one call (fusedrnn/cuda_plan.h; FUSEDRNN_CUDA_PLAN / _GROUPS switches).
inline plan::Plan make_plan(plan::Pass pass, at::ScalarType st, bool allow_tf32, int64_t H, int64_t P, int64_t B,
                            bool proj, bool train, const DeviceLimits& dev) {
  return plan::plan_pass(pass, engine_kind(st, allow_tf32), H, P, B, proj, train, dev.record,
                         plan::Options::from_env());
}

// The error of a pass that does not fit: what does not fit, and the limit for this proj_size.
[[noreturn]] inline void raise_not_fit(const char* op, const plan::Plan& p, at::ScalarType st, int64_t H, int64_t P,
                                       bool proj, const DeviceLimits& dev) {
  const bool lstm = plan::is_lstm(p.pass);
  const int64_t limit = plan::max_hidden(lstm, dtype_kind(st), proj ? P : 0, dev.record);
  const std::string with = proj ? " with proj_size=" + std::to_string(P) : std::string();
  TORCH_CHECK(false, "fusedrnn CUDA ", op, ": hidden_size=", H, with, " (", st, ") does not fit on chip on ",
              dev.record.name, " (", p.why, "); the largest hidden_size", with, " there is ", limit,
              " (fusedrnn.max_hidden_size)");
}

// Calls f(EngineTag<T, Eng>{}, std::integral_constant<int, S>{}) for the plan's engine, n-tiles
// and exchange protocol (the FMA engines are instantiated for the barrier protocol only).
template <class F>
inline void dispatch_plan(at::ScalarType st, bool allow_tf32, const plan::Plan& p, F&& f) {
  dispatch_engine(st, allow_tf32, p.nt, [&](auto tag) {
    using Eng = typename decltype(tag)::Eng;
    TORCH_CHECK(Eng::kKind == p.engine, "fusedrnn CUDA: internal error: planned engine ", plan::engine_name(p.engine),
                " differs from the dispatched one");
    if constexpr (Eng::kTensorCores && !(Eng::kKind == plan::Engine::kTf32 && Eng::NT > 2)) {  // plan::flags_ok
      if (p.sync == plan::Sync::kFlags) {
        f(tag, std::integral_constant<int, kSyncFlags>{});
      } else {
        f(tag, std::integral_constant<int, kSyncBarrier>{});
      }
    } else {
      TORCH_CHECK(p.sync == plan::Sync::kBarrier, "fusedrnn CUDA: internal error: flag exchange planned for ",
                  plan::engine_name(p.engine), " with ", p.nt, " n-tiles");
      f(tag, std::integral_constant<int, kSyncBarrier>{});
    }
  });
}

// Geometry every kernel reads from its arguments (the plan, flattened for the device).
struct Geom {
  int U = 0, Up = 0;       // units / P-rows per CTA
  int gu = 1;              // unit slices per batch group
  int64_t Bg = 0;          // batch rows per group
  int64_t Bgp = 0;         // exchange rows per group (Bg rounded up to BN)
  plan::Slice a, b;        // the W slices (see plan::Plan)
  int legacy = 0;
};
inline Geom geom_of(const plan::Plan& p, int bn) {
  Geom g;
  g.U = p.U;
  g.Up = p.Up;
  g.gu = p.gu;
  g.Bg = p.Bg;
  g.Bgp = round_up(p.Bg, bn);
  g.a = p.a;
  g.b = p.b;
  g.legacy = p.legacy ? 1 : 0;
  return g;
}

// This CTA's place in the grid: unit slice iu, batch group ib with rows [b0, b0 + nb) of the batch
// and exchange rows [ib * Bgp, ...) of each buffer.
struct Place {
  int iu, ib;
  int64_t b0, xrow0;
  int nb;
};
__device__ __forceinline__ Place place_of(const Geom& g, int64_t B) {
  Place p;
  p.iu = static_cast<int>(dev::block_idx() % static_cast<unsigned>(g.gu));
  p.ib = static_cast<int>(dev::block_idx() / static_cast<unsigned>(g.gu));
  p.b0 = int64_t(p.ib) * g.Bg;
  p.nb = static_cast<int>(dev::max(int64_t(0), dev::min(g.Bg, B - p.b0)));
  p.xrow0 = int64_t(p.ib) * g.Bgp;
  return p;
}

// Counters of the per-group barriers, one 128-byte line each.
constexpr int kCounterStride = 32;

// Devices and layout of a CUDA op's tensors, checked after the shapes (fusedrnn/checks.h) and
// before the CUDAGuard is built from the first one: the first must be a CUDA tensor, every other
// defined one on its device, and (contiguous = true) all contiguous, since the kernels index raw
// pointers.  Messages name the tensor.
inline void check_cuda_args(const char* op, bool contiguous, std::initializer_list<checks::Named> ts) {
  const checks::Named& first = *ts.begin();
  TORCH_CHECK(on_op_device(*first.second), "fusedrnn CUDA ", op, ": ", first.first, " must be a ", kOpDeviceName,
              " tensor, got ", first.second->device());
  checks::devices("CUDA", op, first.second->device(), ts);
  if (!contiguous) return;
  for (const auto& nt : ts) {
    TORCH_CHECK(nt.second == nullptr || !nt.second->defined() || nt.second->is_contiguous(), "fusedrnn CUDA ",
                op, ": ", nt.first, " must be contiguous");
  }
}

inline const int64_t* lengths_ptr(const c10::optional<at::Tensor>& lengths) {
  return checks::defined(lengths) ? lengths->data_ptr<int64_t>() : nullptr;
}

// Exchange buffer h0 -> rows of each group (flag protocol: tag 0 = the tag of step 0): fills
// buf (groups * Bgp, ld) words from src (B, n) of storage dtype st.  Runs as ATen ops on the
// current stream into the zeroed workspace.
inline void fill_exchange(const at::Tensor& words, const at::Tensor& src, int64_t Bg, int64_t Bgp, int gb,
                          bool flags, at::ScalarType st) {
  const int64_t B = src.size(0), n = src.size(1);
  for (int ib = 0; ib < gb; ++ib) {
    const int64_t b0 = ib * Bg, nb = std::min(Bg, B - b0);
    if (nb <= 0) break;
    at::Tensor dst = words.narrow(0, ib * Bgp, nb).narrow(1, 0, n);
    at::Tensor part = src.narrow(0, b0, nb).to(st);
    if (!flags) {
      dst.copy_(part);
    } else if (at::elementSize(st) == 2) {  // u32 words: value bits in the low half, tag 0
      dst.copy_(part.contiguous().view(at::kShort).to(at::kInt).bitwise_and(0xFFFF));
    } else {  // u64 words: fp32 bits in the low half, tag 0
      dst.copy_(part.contiguous().view(at::kInt).to(at::kLong).bitwise_and(0xFFFFFFFFll));
    }
  }
}

}  // namespace cuda_detail
}  // namespace fusedrnn
