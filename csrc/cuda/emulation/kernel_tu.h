// Prologue of a translation unit that compiles CUDA kernel source (csrc/cuda/*.cu) as host C++
// for the CUDA emulation (issue 9).  Usage, in a .cpp file:
//
//   #define FUSEDRNN_EMU_NAMESPACE fusedrnn_emu_kernels
//   #include "kernel_tu.h"
//   #include "../lstm_fwd.cu"
//
// Every name of the kernel source's namespace `fusedrnn` (the ops, the planners, the engines,
// cell_math.h, checks.h) becomes FUSEDRNN_EMU_NAMESPACE in this translation unit, so the emulated
// CPU objects and the real CUDA objects of the same source coexist in one extension without an
// ODR clash.  The headers every kernel file uses are included first, outside the renaming.
#pragma once

#ifndef FUSEDRNN_EMU_NAMESPACE
#error "define FUSEDRNN_EMU_NAMESPACE before including kernel_tu.h"
#endif

#define FUSEDRNN_CUDA_EMULATION 1

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "runtime.h"

// `#pragma unroll` means nothing to the host compiler (the build passes -Wno-unknown-pragmas:
// GCC's diagnostic pragmas cannot silence it).

#define fusedrnn FUSEDRNN_EMU_NAMESPACE
