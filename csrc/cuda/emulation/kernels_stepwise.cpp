// csrc/cuda/stepwise.cu compiled for the CUDA emulation (see kernel_tu.h).
#define FUSEDRNN_EMU_NAMESPACE fusedrnn_emu_kernels
#include "kernel_tu.h"
#include "../stepwise.cu"
