// Every CUDA built-in, intrinsic and inline-PTX instruction the kernels of csrc/cuda use, and
// nothing else: the kernel bodies (common.cuh, *.cu) reach the hardware only through the
// functions below.  A CUDA-semantics emulation on CPU (issue 9) compiles the same kernel source
// as host C++ by providing its own definitions of exactly this interface (selected by
// FUSEDRNN_CUDA_EMULATION), so what it runs is the code the GPU runs.
//
// Contract of each function (what an emulation must reproduce; "warp-collective" functions must be
// reached by every lane named in their mask - all 32 lanes for mma - with the same arguments where
// the PTX requires it, and they exchange data between the lanes of one warp):
//
//   types
//     dev::bf16, dev::f16                 16-bit storage types (bfloat16, IEEE half); trivially
//                                         copyable, 2 bytes, no arithmetic used on them.
//     uint4, float4, float2, double2, ulonglong2, make_float2
//                                         CUDA vector types (16-byte aligned: uint4, float4,
//                                         double2, ulonglong2).
//   thread geometry (1-D launches only; unsigned like the built-ins, so codegen is unchanged)
//     thread_idx()  threadIdx.x   block_idx()  blockIdx.x
//     block_dim()   blockDim.x    grid_dim()   gridDim.x
//   shared memory
//     dynamic_smem()        this block's dynamic shared memory (16-byte aligned; size set at
//                           launch, at most the device's opt-in limit).  No static __shared__
//                           data is used anywhere.
//     sync_threads()        __syncthreads(): block-wide barrier + shared/global memory ordering
//                           among the block's threads.
//   global memory
//     ld_cg(p)              ld.global.cg: load through L2, never from a (stale) L1 line.  Used for
//                           every read of data another CTA wrote during this launch (published by
//                           a grid barrier).  T: uint4, float4, float, double, bf16, f16.
//     ld_nc(p)              ld.global.nc (__ldg): read-only-cache load of data no thread writes
//                           during the launch.  T: int64_t.
//     red_add_release_gpu(p, v)  red.release.gpu.global.add.u32: *p += v, a release at gpu scope
//                           (all earlier writes of this thread - and, after a bar.sync, of its
//                           block - become visible before the add).  No return value.
//     ld_acquire_gpu(p)     ld.acquire.gpu.u32: load *p, an acquire at gpu scope (later reads of
//                           this thread - and, after a bar.sync, of its block - see what the
//                           releasing writers published).  An emulation should let other blocks
//                           run when a thread spins on it.
//     ld_relaxed_gpu(p)     ld.relaxed.gpu.global: a strong load at gpu scope (never an L1 line;
//                           no ordering of other accesses).  T = unsigned int, unsigned long long
//                           (one single-copy-atomic scalar), uint4 (four u32 elements, each
//                           atomic, not the vector), ulonglong2 (two u64 elements, each atomic).
//                           Used to spin on a counter and to poll flag-tagged exchange words; an
//                           emulation should let other blocks run on every call.
//     st_relaxed_gpu(p, v)  st.relaxed.gpu.global: a strong single-copy-atomic store of one
//                           unsigned int / unsigned long long (a flag-tagged exchange word).
//   warp collectives
//     sync_warp()           __syncwarp(): the 32 lanes of the warp reconverge (and their shared /
//                           global accesses before it are ordered before those after it).
//     shfl_sync(mask, v, src_lane)   __shfl_sync: returns v of lane src_lane (0..31) to every
//                           lane in mask; T: float, double.
//     mma_m16n8k16<T>(d, a, b0, b1)  mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: D = A.B + D
//                           for the warp's 16x8 fp32 tile; a = this lane's four .b32 registers of
//                           A (16x16, row-major), {b0, b1} its two of B (16x8, column-major),
//                           d its four fp32 of C/D, each register's elements per the PTX ISA
//                           fragment table of m16n8k16 (lane = 4*groupID + threadID_in_group).
//                           T = bf16 or f16 (element type of A and B; pairs packed low half first).
//     mma_m16n8k8_tf32(d, a, b0, b1) mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: as above
//                           for A 16x8 / B 8x8 in TF32 (each .b32 holds one tf32 value as
//                           produced by f32_to_tf32), fragment table of m16n8k8 .tf32.
//   conversions and math
//     f32_to_tf32(x)        cvt.rna.tf32.f32: x rounded to TF32 (10 mantissa bits, round to
//                           nearest, ties away from zero), returned as fp32 bit pattern with the
//                           low 13 bits zero.
//     bf16_to_f32, f16_to_f32        exact widening.
//     f32_to_bf16, f32_to_f16        round to nearest even (__float2bfloat16 / __float2half).
//     bits(bf16), bits(f16)          the 16-bit pattern (as unsigned short).
//     bf16_from_bits(u), f16_from_bits(u)   the value whose 16-bit pattern is u (inverse of bits).
//     float_as_uint(f), uint_as_float(u)    fp32 <-> its 32-bit pattern (__float_as_uint).
//     min(a, b), max(a, b)  int64_t minimum / maximum.
//     fma_rn(a, b, c)       a*b + c with one rounding (float and double).
//
// Besides these, the kernel source uses only standard C++ and the CUDA keywords __global__,
// __device__, __host__, __forceinline__, __launch_bounds__(n, m), __restrict__ and
// #pragma unroll, which an emulation defines away.  The host side of the runtime (launches,
// occupancy, device guard, workspace memset) is behind launch.cuh.
#pragma once

#include <cstdint>

#if defined(FUSEDRNN_CUDA_EMULATION)
// The emulation (issue 9) supplies the same names with host implementations.
#include "emulation/device_ops_emu.h"
#else

#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fusedrnn {
namespace dev {

using bf16 = __nv_bfloat16;
using f16 = __half;

// ------------------------------------------------------------------------------ thread geometry
__device__ __forceinline__ unsigned thread_idx() { return threadIdx.x; }
__device__ __forceinline__ unsigned block_idx() { return blockIdx.x; }
__device__ __forceinline__ unsigned block_dim() { return blockDim.x; }
__device__ __forceinline__ unsigned grid_dim() { return gridDim.x; }

// ------------------------------------------------------------------------------- shared memory
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char fusedrnn_dynamic_smem[];
  return fusedrnn_dynamic_smem;
}
__device__ __forceinline__ void sync_threads() { __syncthreads(); }

// ------------------------------------------------------------------------------- global memory
template <typename T>
__device__ __forceinline__ T ld_cg(const T* p) {
  if constexpr (sizeof(T) == 2) {  // bf16 / f16: no __ldcg overload, load the bits
    unsigned short v = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T r;
    memcpy(&r, &v, 2);
    return r;
  } else {
    return __ldcg(p);
  }
}

template <typename T>
__device__ __forceinline__ T ld_nc(const T* p) {
  return __ldg(p);
}

__device__ __forceinline__ void red_add_release_gpu(unsigned int* p, unsigned int v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned int ld_acquire_gpu(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned int ld_relaxed_gpu(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long ld_relaxed_gpu(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_relaxed_gpu(const uint4* p) {
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}
__device__ __forceinline__ ulonglong2 ld_relaxed_gpu(const ulonglong2* p) {
  ulonglong2 v;
  asm volatile("ld.relaxed.gpu.global.v2.u64 {%0,%1}, [%2];" : "=l"(v.x), "=l"(v.y) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed_gpu(unsigned int* p, unsigned int v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed_gpu(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// ------------------------------------------------------------------------------ warp collectives
__device__ __forceinline__ void sync_warp() { __syncwarp(); }

template <typename T>
__device__ __forceinline__ T shfl_sync(unsigned mask, T v, int src_lane) {
  return __shfl_sync(mask, v, src_lane);
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_m16n8k16<bf16>(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<f16>(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// -------------------------------------------------------------------------- conversions, math
__device__ __forceinline__ uint32_t f32_to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float bf16_to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float f16_to_f32(f16 x) { return __half2float(x); }
__device__ __forceinline__ bf16 f32_to_bf16(float x) { return __float2bfloat16(x); }
__device__ __forceinline__ f16 f32_to_f16(float x) { return __float2half(x); }
__device__ __forceinline__ unsigned short bits(bf16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ unsigned short bits(f16 x) { return __half_as_ushort(x); }
__device__ __forceinline__ bf16 bf16_from_bits(unsigned short u) { return __ushort_as_bfloat16(u); }
__device__ __forceinline__ f16 f16_from_bits(unsigned short u) { return __ushort_as_half(u); }
__device__ __forceinline__ unsigned int float_as_uint(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float uint_as_float(unsigned int u) { return __uint_as_float(u); }

// CUDA's integer min/max (std::min/max give other, equivalent SASS: kept as they were).
__device__ __forceinline__ int64_t min(int64_t a, int64_t b) { return ::min(a, b); }
__device__ __forceinline__ int64_t max(int64_t a, int64_t b) { return ::max(a, b); }

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return fma(a, b, c); }

}  // namespace dev
}  // namespace fusedrnn

#endif  // FUSEDRNN_CUDA_EMULATION
