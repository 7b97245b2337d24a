// The emulated CUDA ops (issue 9): the op functions of csrc/cuda compiled for the emulation
// (kernels_*.cpp, namespace fusedrnn_emu_kernels) registered as the CPU kernels of the
// `fusedrnn_emu` op library (schemas: csrc/ops.cpp), and their limit query.
#define FUSEDRNN_EMU_NAMESPACE fusedrnn_emu_kernels
#include "kernel_tu.h"
#include "fusedrnn/ops.h"
#undef fusedrnn

#include <torch/library.h>

#include "bindings.h"
#include "ops_emu.h"

TORCH_LIBRARY_IMPL(fusedrnn_emu, CPU, m) {
  namespace k = fusedrnn_emu_kernels;
  using fusedrnn_emu::emulated;
  m.impl("lstm_fwd", emulated<&k::lstm_fwd_cuda>("lstm_fwd"));
  m.impl("lstm_bwd", emulated<&k::lstm_bwd_cuda>("lstm_bwd"));
  m.impl("gru_fwd", emulated<&k::gru_fwd_cuda>("gru_fwd"));
  m.impl("gru_bwd", emulated<&k::gru_bwd_cuda>("gru_bwd"));
  m.impl("lstm_cell_fwd", emulated<&k::lstm_cell_fwd_cuda>("lstm_cell_fwd"));
  m.impl("lstm_cell_bwd", emulated<&k::lstm_cell_bwd_cuda>("lstm_cell_bwd"));
  m.impl("gru_cell_fwd", emulated<&k::gru_cell_fwd_cuda>("gru_cell_fwd"));
  m.impl("gru_cell_bwd", emulated<&k::gru_cell_bwd_cuda>("gru_cell_bwd"));
}

namespace fusedrnn_emu {

int64_t max_hidden_size(const std::string& mode, at::ScalarType dtype, int64_t proj_size) {
  return fusedrnn_emu_kernels::max_hidden_size_cuda(mode, dtype, -1, proj_size);
}

}  // namespace fusedrnn_emu
