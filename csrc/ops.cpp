// Dispatcher registration of the op contract (csrc/include/fusedrnn/ops.h) as `fusedrnn_ext::*`,
// with CPU kernels (csrc/cpu) and, when built with CUDA, CUDA kernels (csrc/cuda); the same schemas
// as `fusedrnn_emu::*`, whose CPU kernels are the CUDA kernels run by the CUDA emulation
// (csrc/cuda/emulation, registered there); plus the small pybind11 module `fusedrnn._C` (build
// facts, device limits, the emulator's controls in fusedrnn._C.emulation).  Importing
// fusedrnn._C registers the ops; python/fusedrnn/backends/cpp.py registers their fake (meta)
// implementations.
#include <string>

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "cuda/emulation/bindings.h"
#include "fusedrnn/ops.h"

#ifdef FUSEDRNN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#define FUSEDRNN_STRINGIFY_(x) #x
#define FUSEDRNN_STRINGIFY(x) FUSEDRNN_STRINGIFY_(x)

// The build passes the arch list as one token, archs joined by '_' (e.g. 80_90a).
#ifdef FUSEDRNN_CUDA_ARCHS
#define FUSEDRNN_CUDA_ARCHS_STR FUSEDRNN_STRINGIFY(FUSEDRNN_CUDA_ARCHS)
#else
#define FUSEDRNN_CUDA_ARCHS_STR ""
#endif

namespace {

void define_ops(torch::Library& m) {
  // Recurrences: one layer, one direction.  allow_tf32 lets fp32 recurrent GEMMs use TF32 (CUDA).
  m.def(
      "lstm_fwd(Tensor xproj, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor c0, Tensor? w_hr, "
      "Tensor? lengths, bool reverse, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_bwd(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor w_hh, Tensor? w_hr, Tensor c0, Tensor gates, "
      "Tensor cs, Tensor? lengths, bool reverse, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_fwd(Tensor xproj, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths, bool reverse, "
      "bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gru_bwd(Tensor dy, Tensor dh_n, Tensor w_hh, Tensor h0, Tensor y, Tensor gates, Tensor? lengths, "
      "bool reverse, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
  // Cells: one fused step from precomputed GEMMs.
  m.def(
      "lstm_cell_fwd(Tensor igates, Tensor hgates, Tensor? b_ih, Tensor? b_hh, Tensor c) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("lstm_cell_bwd(Tensor dh_new, Tensor dc_new, Tensor c, Tensor c_new, Tensor gates) -> (Tensor, Tensor)");
  m.def("gru_cell_fwd(Tensor igates, Tensor hgates, Tensor? b_ih, Tensor? b_hh, Tensor h) -> (Tensor, Tensor)");
  m.def("gru_cell_bwd(Tensor dh_new, Tensor h, Tensor gates) -> (Tensor, Tensor, Tensor)");
}

}  // namespace

TORCH_LIBRARY(fusedrnn_ext, m) { define_ops(m); }
// The CUDA kernels under the CUDA emulation, on CPU tensors (issue 9; CPU kernels registered in
// csrc/cuda/emulation/ops_emu.cpp).
TORCH_LIBRARY(fusedrnn_emu, m) { define_ops(m); }

TORCH_LIBRARY_IMPL(fusedrnn_ext, CPU, m) {
  m.impl("lstm_fwd", &fusedrnn::lstm_fwd_cpu);
  m.impl("lstm_bwd", &fusedrnn::lstm_bwd_cpu);
  m.impl("gru_fwd", &fusedrnn::gru_fwd_cpu);
  m.impl("gru_bwd", &fusedrnn::gru_bwd_cpu);
  m.impl("lstm_cell_fwd", &fusedrnn::lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &fusedrnn::lstm_cell_bwd_cpu);
  m.impl("gru_cell_fwd", &fusedrnn::gru_cell_fwd_cpu);
  m.impl("gru_cell_bwd", &fusedrnn::gru_cell_bwd_cpu);
}

#ifdef FUSEDRNN_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedrnn_ext, CUDA, m) {
  m.impl("lstm_fwd", &fusedrnn::lstm_fwd_cuda);
  m.impl("lstm_bwd", &fusedrnn::lstm_bwd_cuda);
  m.impl("gru_fwd", &fusedrnn::gru_fwd_cuda);
  m.impl("gru_bwd", &fusedrnn::gru_bwd_cuda);
  m.impl("lstm_cell_fwd", &fusedrnn::lstm_cell_fwd_cuda);
  m.impl("lstm_cell_bwd", &fusedrnn::lstm_cell_bwd_cuda);
  m.impl("gru_cell_fwd", &fusedrnn::gru_cell_fwd_cuda);
  m.impl("gru_cell_bwd", &fusedrnn::gru_cell_bwd_cuda);
}
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FUSEDRNN_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  std::string archs = FUSEDRNN_CUDA_ARCHS_STR;
  for (char& ch : archs) {
    if (ch == '_') ch = ';';
  }
  info["cuda_archs"] = archs;
#else
  info["with_cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = std::string();
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef __VERSION__
  info["compiler"] = std::string(__VERSION__);
#endif
  return info;
}

// dtype as a torch.dtype or its name ("float32", "torch.bfloat16", ...).
at::ScalarType dtype_from_py(const pybind11::handle& obj) {
  std::string name = pybind11::str(obj);
  const std::string prefix = "torch.";
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  if (name == "float32" || name == "float") return at::kFloat;
  if (name == "float64" || name == "double") return at::kDouble;
  if (name == "float16" || name == "half") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  TORCH_CHECK(false, "fusedrnn._C: unsupported dtype ", name);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedrnn compiled kernels; the ops are torch.ops.fusedrnn_ext.*";
  m.def("build_info", &build_info,
        "dict: with_cuda, cuda_version, cuda_archs (compiled), torch_version (compiled against), compiler");
#ifdef FUSEDRNN_WITH_CUDA
  m.def(
      "max_hidden_size",
      [](const std::string& mode, const pybind11::object& dtype, int64_t device_index) {
        return fusedrnn::max_hidden_size_cuda(mode, dtype_from_py(dtype), device_index);
      },
      pybind11::arg("mode"), pybind11::arg("dtype"), pybind11::arg("device_index"),
      "Largest hidden size the persistent CUDA kernels run for mode ('LSTM'/'GRU'), dtype and device");
#endif
  auto emu = m.def_submodule("emulation", "the CUDA emulation: the CUDA kernels run on CPU (issue 9, README)");
  fusedrnn_emu::add_bindings(emu);
  emu.def(
      "max_hidden_size",
      [](const std::string& mode, const pybind11::object& dtype) {
        return fusedrnn_emu::max_hidden_size(mode, dtype_from_py(dtype));
      },
      pybind11::arg("mode"), pybind11::arg("dtype"),
      "max_hidden_size of the emulated CUDA kernels on the emulated device");
}
