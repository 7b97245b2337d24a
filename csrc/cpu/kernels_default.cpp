// The CPU kernels at the baseline instruction set (at::vec's portable vectors; exp/tanh are libm's).
// Used on CPUs without AVX2 and under ATEN_CPU_CAPABILITY=default.
#define CPU_CAPABILITY DEFAULT
#define FUSEDRNN_CPU_ISA_NAME "default"
#include "kernels_impl.h"

namespace fusedrnn {
namespace cpu {
const Kernels* kernels_default() { return &DEFAULT::kTable; }
}  // namespace cpu
}  // namespace fusedrnn
