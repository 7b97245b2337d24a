// The device_ops.cuh interface (see its contract) implemented on CPU for the CUDA emulation
// (issue 9): included by device_ops.cuh in place of the CUDA definitions when
// FUSEDRNN_CUDA_EMULATION is defined.  Thread geometry, shared memory and every collective come
// from the emulator (runtime.h); the arithmetic (TF32 / bf16 / fp16 rounding, fma) is exact
// host code with the PTX semantics.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "runtime.h"

// The CUDA keywords the kernel source uses, defined away (host C++).  __restrict__ is GNU C++.
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// CUDA's vector types (vector_types.h): same sizes and alignments.
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(16) ulonglong2 {
  unsigned long long x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace fusedrnn {
namespace dev {

// 16-bit storage types: the bit pattern only (the kernels do no arithmetic on them).
struct bf16 {
  unsigned short x;
};
struct f16 {
  unsigned short x;
};

// ------------------------------------------------------------------------------ thread geometry
inline unsigned thread_idx() { return fusedrnn_emu::g_thread->tid; }
inline unsigned block_idx() { return fusedrnn_emu::g_thread->bid; }
inline unsigned block_dim() { return fusedrnn_emu::g_block_dim; }
inline unsigned grid_dim() { return fusedrnn_emu::g_grid_dim; }

// ------------------------------------------------------------------------------- shared memory
inline unsigned char* dynamic_smem() { return fusedrnn_emu::g_thread->smem; }
inline void sync_threads() { fusedrnn_emu::sync_threads(); }

// ------------------------------------------------------------------------------- global memory
template <typename T>
inline T ld_cg(const T* p) {
  fusedrnn_emu::on_ld_cg(p, sizeof(T), alignof(T));
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
inline T ld_nc(const T* p) {
  fusedrnn_emu::on_ld_nc(p, sizeof(T), alignof(T));
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

inline void red_add_release_gpu(unsigned int* p, unsigned int v) { fusedrnn_emu::red_add_release_gpu(p, v); }
inline unsigned int ld_acquire_gpu(const unsigned int* p) { return fusedrnn_emu::ld_acquire_gpu(p); }

// ld.relaxed.gpu / st.relaxed.gpu: strong (single-copy-atomic per element) accesses; the
// emulator lets other blocks run when a thread polls (runtime.h).
inline unsigned int ld_relaxed_gpu(const unsigned int* p) {
  unsigned int v;
  fusedrnn_emu::ld_relaxed_gpu(p, &v, 4, 4);
  return v;
}
inline unsigned long long ld_relaxed_gpu(const unsigned long long* p) {
  unsigned long long v;
  fusedrnn_emu::ld_relaxed_gpu(p, &v, 8, 8);
  return v;
}
inline uint4 ld_relaxed_gpu(const uint4* p) {
  uint4 v;
  fusedrnn_emu::ld_relaxed_gpu(p, &v, 16, 4);
  return v;
}
inline ulonglong2 ld_relaxed_gpu(const ulonglong2* p) {
  ulonglong2 v;
  fusedrnn_emu::ld_relaxed_gpu(p, &v, 16, 8);
  return v;
}
inline void st_relaxed_gpu(unsigned int* p, unsigned int v) { fusedrnn_emu::st_relaxed_gpu(p, &v, 4); }
inline void st_relaxed_gpu(unsigned long long* p, unsigned long long v) { fusedrnn_emu::st_relaxed_gpu(p, &v, 8); }

// ------------------------------------------------------------------------------ warp collectives
inline void sync_warp() { fusedrnn_emu::sync_warp(); }

template <typename T>
inline T shfl_sync(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shfl_sync: 4- or 8-byte values");
  fusedrnn_emu::shfl_sync(mask, &v, sizeof(T), src_lane);
  return v;
}

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1);
template <>
inline void mma_m16n8k16<bf16>(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  const uint32_t regs[4] = {a.x, a.y, a.z, a.w};
  fusedrnn_emu::mma_sync(fusedrnn_emu::MmaKind::kBf16, d, regs, b0, b1);
}
template <>
inline void mma_m16n8k16<f16>(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  const uint32_t regs[4] = {a.x, a.y, a.z, a.w};
  fusedrnn_emu::mma_sync(fusedrnn_emu::MmaKind::kF16, d, regs, b0, b1);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  const uint32_t regs[4] = {a.x, a.y, a.z, a.w};
  fusedrnn_emu::mma_sync(fusedrnn_emu::MmaKind::kTf32, d, regs, b0, b1);
}

// -------------------------------------------------------------------------- conversions, math
// cvt.rna.tf32.f32: round the magnitude to 10 mantissa bits, ties away from zero (adding half an
// ulp of TF32 to the sign-magnitude bits does exactly that, carrying into the exponent), low 13
// bits zero.  NaN and infinity pass through.
inline uint32_t f32_to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;
}

inline float bf16_to_f32(bf16 x) { return c10::detail::f32_from_bits(x.x); }
inline float f16_to_f32(f16 x) { return c10::detail::fp16_ieee_to_fp32_value(x.x); }
inline bf16 f32_to_bf16(float x) { return bf16{c10::detail::round_to_nearest_even(x)}; }
inline f16 f32_to_f16(float x) { return f16{c10::detail::fp16_ieee_from_fp32_value(x)}; }
inline unsigned short bits(bf16 x) { return x.x; }
inline unsigned short bits(f16 x) { return x.x; }
inline bf16 bf16_from_bits(unsigned short u) { return bf16{u}; }
inline f16 f16_from_bits(unsigned short u) { return f16{u}; }
inline unsigned int float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a < b ? b : a; }

inline float fma_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

}  // namespace dev
}  // namespace fusedrnn
