// The CPU kernels for AVX-512 (F, BW, VL, DQ: torch's AVX512 capability; 16 floats per vector,
// SLEEF exp/tanh through at::vec).  Same scheme as kernels_avx2.cpp (see there for the target
// pragma, the hand-defined ISA macros and the weak-symbol check).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
// ABI notes on at::vec's internal helpers, and GCC 12's false positives on the _mm512_undefined_*
// placeholders of its own intrinsics.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FUSEDRNN_CPU_ISA_NAME "avx512"
#include "kernels_impl.h"

namespace fusedrnn {
namespace cpu {
const Kernels* kernels_avx512() { return &AVX512::kTable; }
}  // namespace cpu
}  // namespace fusedrnn
#else
#include "kernels.h"

namespace fusedrnn {
namespace cpu {
const Kernels* kernels_avx512() { return nullptr; }  // GCC on x86-64 only
}  // namespace cpu
}  // namespace fusedrnn
#endif
