// Shared machinery of the persistent CUDA kernels (csrc/cuda/*.cu):
//   * storage-type <-> accumulation-type conversions and the dtype/engine dispatch,
//   * the grid-wide barrier used between time steps,
//   * the three "CTA GEMM engines" that compute, per step, out[row][n] = sum_k W[row][k] * X[n][k]
//     for the W slice a CTA keeps in shared memory for the whole sequence and an operand X
//     (h_{t-1}, m_t, dgates_t, ...) that the whole grid exchanged through global memory (L2),
//   * the launch planners' helpers and the on-chip size limits.
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
// (rows to a multiple of BN, columns to a multiple of 32, zero-filled) so no load needs a guard.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

#include <ATen/ATen.h>

#include "device_ops.cuh"
#include "launch.cuh"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/checks.h"
#include "fusedrnn/ops.h"

namespace fusedrnn {
namespace cuda_detail {

constexpr int kThreads = 256;  // 8 warps per CTA, one CTA per SM
constexpr int kWarps = kThreads / 32;
constexpr int kMaxMT = 4;      // at most 64 W rows per CTA per GEMM
constexpr int kChunk = 32;     // K granularity of the engines (and padding of exchange buffers)

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

// ------------------------------------------------------------------------------ grid barrier
// Monotonic arrival counter (zeroed before the launch): after the k-th barrier it holds
// k * gridDim.x.  Co-residency of all CTAs is guaranteed by the cooperative launch, so the spin
// terminates.  The fences make every global write issued before the barrier (by any thread of
// any CTA) visible to every read after it (release/acquire at gpu scope, made cumulative over the
// CTA by bar.sync, the pattern of CUTLASS's GenericBarrier); readers use ld.global.cg (ld_cg) so
// no stale L1 line is read.
__device__ __forceinline__ void grid_barrier(unsigned int* counter, unsigned int& target) {
  dev::sync_threads();  // every thread's writes of this step are ordered before thread 0's release
  target += dev::grid_dim();
  if (dev::thread_idx() == 0) {
    dev::red_add_release_gpu(counter, 1);
    unsigned int v;
    do {
      v = dev::ld_acquire_gpu(counter);
    } while (static_cast<int>(v - target) < 0);
  }
  dev::sync_threads();  // ... and thread 0's acquire before every thread's reads of the next step
}

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

// ================================================================ engine: bf16 / fp16 tensor cores
template <typename T, int NT_>
struct MmaEngine16 {
  using storage_t = T;
  using acc_t = float;
  static constexpr int NT = NT_;
  static constexpr int BN = 8 * NT_;
  static constexpr bool kTensorCores = true;

  // Per (m-tile, chunk): 2 k-tiles x 32 lanes x one uint4 (4 packed pairs).
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
  __device__ static void compute(const uint4* __restrict__ ws, int MT, int KC,
                                 const T* __restrict__ X, int64_t ldx, float* red) {
    const int warp = dev::thread_idx() >> 5, lane = dev::thread_idx() & 31, g = lane >> 2, q = lane & 3;
    float acc[kMaxMT][NT][4];
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    // Chunks c = warp, warp + 8, ...; the operand loads run kDepth chunks ahead of the math so
    // that for H <= 1024 all of a step's loads are in flight at once (one exposed L2 latency).
    constexpr int kDepth = NT >= 4 ? 2 : 4;
    const T* xl = X + int64_t(g) * ldx + 8 * q;
    auto load = [&](uint4 (&dst)[NT], int c) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        dst[nt] = dev::ld_cg(reinterpret_cast<const uint4*>(xl + int64_t(nt * 8) * ldx + c * kChunk));
    };
    uint4 buf[kDepth][NT];
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      if (warp + i * kWarps < KC) load(buf[i], warp + i * kWarps);
    }
    for (int base = 0; warp + base * kWarps < KC; base += kDepth) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        const int c = warp + (base + i) * kWarps;
        if (c < KC) {
#pragma unroll
          for (int mt = 0; mt < kMaxMT; ++mt) {
            if (mt < MT) {
              const uint4* wp = ws + (size_t(mt * KC + c) * 2) * 32 + lane;
              const uint4 a0 = wp[0], a1 = wp[32];
#pragma unroll
              for (int nt = 0; nt < NT; ++nt) {
                dev::mma_m16n8k16<T>(acc[mt][nt], a0, buf[i][nt].x, buf[i][nt].y);
                dev::mma_m16n8k16<T>(acc[mt][nt], a1, buf[i][nt].z, buf[i][nt].w);
              }
            }
          }
          const int cn = c + kDepth * kWarps;
          if (cn < KC) load(buf[i], cn);
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

  __device__ static void compute(const uint4* __restrict__ ws, int MT, int KC,
                                 const float* __restrict__ X, int64_t ldx, float* red) {
    const int warp = dev::thread_idx() >> 5, lane = dev::thread_idx() & 31, g = lane >> 2, q = lane & 3;
    float acc[kMaxMT][NT][4];
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

    constexpr int kDepth = NT == 1 ? 4 : (NT == 2 ? 2 : 1);  // loads run ahead of the math
    const float* xl = X + int64_t(g) * ldx + 8 * q;
    auto load = [&](float4 (&dst)[NT][2], int c) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float4* p = reinterpret_cast<const float4*>(xl + int64_t(nt * 8) * ldx + c * kChunk);
        dst[nt][0] = dev::ld_cg(p);
        dst[nt][1] = dev::ld_cg(p + 1);
      }
    };
    float4 buf[kDepth][NT][2];
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      if (warp + i * kWarps < KC) load(buf[i], warp + i * kWarps);
    }
    for (int base = 0; warp + base * kWarps < KC; base += kDepth) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        const int c = warp + (base + i) * kWarps;
        if (c < KC) {
          uint32_t b[NT][8];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const float4 lo = buf[i][nt][0], hi = buf[i][nt][1];
            b[nt][0] = dev::f32_to_tf32(lo.x); b[nt][1] = dev::f32_to_tf32(lo.y);
            b[nt][2] = dev::f32_to_tf32(lo.z); b[nt][3] = dev::f32_to_tf32(lo.w);
            b[nt][4] = dev::f32_to_tf32(hi.x); b[nt][5] = dev::f32_to_tf32(hi.y);
            b[nt][6] = dev::f32_to_tf32(hi.z); b[nt][7] = dev::f32_to_tf32(hi.w);
          }
          const int cn = c + kDepth * kWarps;
          if (cn < KC) load(buf[i], cn);
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
// (r = lane%16, half = lane/16) owns rows mt*16 + r and batch columns 4*half .. 4*half+3; the
// chunk of X is loaded coalesced (lane = k) and broadcast with shuffles.
template <typename T>
struct FmaEngine {
  using storage_t = T;
  using acc_t = T;
  static constexpr int NT = 1;
  static constexpr int BN = 8;
  static constexpr bool kTensorCores = false;

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

  __device__ static void compute(const uint4* __restrict__ ws_raw, int MT, int KC,
                                 const T* __restrict__ X, int64_t ldx, T* red) {
    const T* ws = reinterpret_cast<const T*>(ws_raw);
    const int warp = dev::thread_idx() >> 5, lane = dev::thread_idx() & 31, r = lane & 15, half = lane >> 4;
    const int ld = KC * kChunk + 1;
    T acc[kMaxMT][4];
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mt][j] = T(0);
    for (int c = warp; c < KC; c += kWarps) {
      T x[8];
#pragma unroll
      for (int n = 0; n < 8; ++n) x[n] = dev::ld_cg(X + int64_t(n) * ldx + c * kChunk + lane);
#pragma unroll 4
      for (int kk = 0; kk < kChunk; ++kk) {
        T v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const T lo = dev::shfl_sync(0xffffffffu, x[j], kk);
          const T hi = dev::shfl_sync(0xffffffffu, x[4 + j], kk);
          v[j] = half ? hi : lo;
        }
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
    const int rows = MT * 16;
#pragma unroll
    for (int mt = 0; mt < kMaxMT; ++mt) {
      if (mt < MT) {
#pragma unroll
        for (int j = 0; j < 4; ++j) red[(warp * rows + mt * 16 + r) * BN + 4 * half + j] = acc[mt][j];
      }
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

// n-tiles per batch pass for a batch of B (the launcher falls back to fewer if shared memory is short).
inline int preferred_nt(int64_t B) { return B <= 8 ? 1 : (B <= 16 ? 2 : 4); }

// Shared-memory bytes of the per-warp partial-sum buffer.
template <class Eng>
inline size_t red_bytes(int max_mt) {
  return size_t(kWarps) * max_mt * 16 * Eng::BN * sizeof(typename Eng::acc_t);
}

// Geometry of one W slice a CTA keeps on chip: rows (<= 16*kMaxMT) x K.
struct SliceGeom {
  int MT = 0;  // m-tiles (rows padded to 16*MT)
  int KC = 0;  // 32-wide K chunks (K padded to 32*KC)
};
inline SliceGeom slice_geom(int64_t rows, int64_t K) {
  SliceGeom s;
  s.MT = static_cast<int>(ceil_div(rows, 16));
  s.KC = static_cast<int>(ceil_div(K, kChunk));
  return s;
}

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

// Per-file limit functions (largest H whose pass fits on chip; 0 if none), used by
// max_hidden_size_cuda (cells.cu).  P = H (no projection), any batch.
int64_t lstm_fwd_max_hidden(at::ScalarType dtype, int device);
int64_t lstm_bwd_max_hidden(at::ScalarType dtype, int device);
int64_t gru_fwd_max_hidden(at::ScalarType dtype, int device);
int64_t gru_bwd_max_hidden(at::ScalarType dtype, int device);

// Largest H in [1, hi] with fits(H) (fits is monotone non-increasing in H in practice; we scan
// down from the analytic bound so a non-monotone corner can only make the answer conservative).
template <class Fits>
inline int64_t largest_fitting(int64_t hi, Fits fits) {
  for (int64_t h = hi; h >= 1; --h)
    if (fits(h)) return h;
  return 0;
}

// ------------------------------------------------------------------ launch-plan helpers (host)
// A plan (p.ok, p.grid, p.smem) that fits the device: its smem fits and all CTAs are co-resident.
template <class Kernel, class Plan>
inline bool plan_fits(Kernel kernel, const Plan& p, const DeviceLimits& dev) {
  return p.ok && co_resident_ctas(kernel, kThreads, p.smem, dev) >= p.grid;
}

// Limit query of one recurrence pass: the smallest over the engines `dtype` may use (fp32: with and
// without TF32; nt = 1) of query(EngineTag<T, Eng>{}) -> largest fitting H.
template <class Query>
inline int64_t max_hidden_over_engines(at::ScalarType dtype, Query query) {
  auto one = [&](bool tf32) {
    int64_t found = 0;
    dispatch_engine(dtype, tf32, 1, [&](auto tag) { found = query(tag); });
    return found;
  };
  int64_t best = one(false);
  if (dtype == at::kFloat) best = std::min(best, one(true));
  return best;
}

// Tries n-tile counts preferred_nt(B), /2, ..., 1: try_launch(EngineTag<T, Eng>{}) plans and
// launches, returning false when the plan does not fit.  Returns whether a launch happened.
template <class TryLaunch>
inline bool launch_first_fitting(at::ScalarType dt, bool allow_tf32, int64_t B, TryLaunch try_launch) {
  bool launched = false;
  for (int nt = preferred_nt(B); nt >= 1 && !launched; nt /= 2) {
    dispatch_engine(dt, allow_tf32, nt, [&](auto tag) {
      if (launched) return;
      launched = try_launch(tag);
    });
  }
  return launched;
}

inline const int64_t* lengths_ptr(const c10::optional<at::Tensor>& lengths) {
  return checks::defined(lengths) ? lengths->data_ptr<int64_t>() : nullptr;
}

}  // namespace cuda_detail
}  // namespace fusedrnn
