// What csrc/ops.cpp needs from the CUDA emulation (issue 9): its Python bindings
// (fusedrnn._C.emulation) and the limit query of the emulated kernels.
#pragma once

#include <cstdint>
#include <string>

#include <c10/core/ScalarType.h>
#include <pybind11/pybind11.h>

#include "runtime.h"

namespace fusedrnn_emu {

// Adds set_device, device, set_options, options, kernel_launch_counts, reset_kernel_launch_counts.
FUSEDRNN_EMU_API void add_bindings(pybind11::module_& m);

// max_hidden_size_cuda of the emulated kernels on the emulated device (proj_size 0: none).
FUSEDRNN_EMU_API int64_t max_hidden_size(const std::string& mode, at::ScalarType dtype, int64_t proj_size);

}  // namespace fusedrnn_emu
