// The CPU kernels for AVX2 + FMA (8 floats per vector, SLEEF exp/tanh through at::vec).
//
// The target is set for this file only, by pragma, before any header (setup.py compiles every C++
// source with the same flags).  GCC's C++ front end does not define the ISA macros for a target
// pragma, so they are defined here as -mavx2 -mfma -mf16c would (sleef.h, which at::vec includes,
// declares its AVX2 functions only under __AVX2__).  at::vec picks its AVX2 code from
// CPU_CAPABILITY_AVX2 and puts it in the inline namespace at::vec::AVX2; our kernels live in
// fusedrnn::cpu::AVX2 (kernels_impl.h).  Nothing here runs unless dispatch.cpp finds torch's CPU
// capability at AVX2 or above.
//
// The hazard of compiling shared headers for a wider ISA: an inline function (c10, libstdc++) that
// is not inlined becomes a weak symbol that the linker may share with baseline code.  Every weak
// symbol of these objects is inside an ISA namespace or takes an ISA type (none is shared);
// tests/test_cpu_isa.py checks the built library for vector code outside the ISA namespaces.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
// at::vec's bf16 helpers return __m256 from lambdas; GCC notes the ABI (internal here, irrelevant).
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FUSEDRNN_CPU_ISA_NAME "avx2"
#include "kernels_impl.h"

namespace fusedrnn {
namespace cpu {
const Kernels* kernels_avx2() { return &AVX2::kTable; }
}  // namespace cpu
}  // namespace fusedrnn
#else
#include "kernels.h"

namespace fusedrnn {
namespace cpu {
const Kernels* kernels_avx2() { return nullptr; }  // GCC on x86-64 only
}  // namespace cpu
}  // namespace fusedrnn
#endif
