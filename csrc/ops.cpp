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
#include "fusedrnn/cuda_plan.h"
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
  // save=False (inference): the forward returns the saved tensors (gates, cs) as empty (0,) tensors
  // and writes nothing that only the backward needs.
  m.def(
      "lstm_fwd(Tensor xproj, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor c0, Tensor? w_hr, "
      "Tensor? lengths, bool reverse, bool allow_tf32, bool save=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lstm_bwd(Tensor dy, Tensor dh_n, Tensor dc_n, Tensor w_hh, Tensor? w_hr, Tensor c0, Tensor gates, "
      "Tensor cs, Tensor? lengths, bool reverse, bool allow_tf32) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gru_fwd(Tensor xproj, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths, bool reverse, "
      "bool allow_tf32, bool save=True) -> (Tensor, Tensor, Tensor)");
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

// ------------------------------------------------------------------ the CUDA planner, device-free
// fusedrnn/cuda_plan.h is plain C++: these bindings exist in CPU-only builds too, so limits and
// plans for any GPU are computed from its properties without one.
namespace plan = fusedrnn::plan;

// A plan::DeviceRecord from a dict with the names of torch.cuda.get_device_properties().
plan::DeviceRecord record_from_py(const pybind11::dict& d) {
  auto get_i = [&](const char* k) -> int64_t {
    TORCH_CHECK(d.contains(k), "fusedrnn._C: device record lacks '", k, "'");
    return d[k].cast<int64_t>();
  };
  plan::DeviceRecord r;
  r.name = d.contains("name") ? d["name"].cast<std::string>() : std::string("device");
  r.major = static_cast<int>(get_i("major"));
  r.minor = static_cast<int>(get_i("minor"));
  r.multi_processor_count = static_cast<int>(get_i("multi_processor_count"));
  r.shared_memory_per_block_optin = get_i("shared_memory_per_block_optin");
  r.shared_memory_per_multiprocessor = get_i("shared_memory_per_multiprocessor");
  r.regs_per_multiprocessor = get_i("regs_per_multiprocessor");
  r.max_threads_per_multi_processor = static_cast<int>(get_i("max_threads_per_multi_processor"));
  r.total_memory = get_i("total_memory");
  r.L2_cache_size = get_i("L2_cache_size");
  r.warp_size = static_cast<int>(get_i("warp_size"));
  TORCH_CHECK(r.warp_size == 32, "fusedrnn._C: the CUDA kernels need warp_size 32, got ", r.warp_size);
  r.cooperative_launch = d.contains("cooperative_launch") ? d["cooperative_launch"].cast<bool>() : true;
  return r;
}

bool mode_is_lstm(const std::string& mode) {
  TORCH_CHECK(mode == "LSTM" || mode == "GRU", "fusedrnn._C: mode must be 'LSTM' or 'GRU', got ", mode);
  return mode == "LSTM";
}

int dtype_kind_py(const pybind11::handle& dtype) {
  const at::ScalarType st = dtype_from_py(dtype);
  return st == at::kDouble ? 2 : (st == at::kFloat ? 1 : 0);
}

pybind11::dict plan_to_py(const plan::Plan& p) {
  pybind11::dict d;
  d["ok"] = p.ok;
  d["why"] = p.why;
  d["pass"] = std::string(plan::pass_name(p.pass));
  d["engine"] = std::string(plan::engine_name(p.engine));
  d["sync"] = std::string(p.sync == plan::Sync::kFlags ? "flags" : "barrier");
  d["legacy"] = p.legacy;
  d["stepwise"] = p.stepwise;
  d["U"] = p.U;
  d["Up"] = p.Up;
  d["unit_slices"] = p.gu;
  d["batch_groups"] = p.gb;
  d["group_rows"] = p.Bg;
  d["n_tiles"] = p.nt;
  d["grid"] = p.grid;
  d["smem"] = p.smem;
  d["ctas_per_sm"] = p.ctas_per_sm;
  pybind11::dict c;
  c["mma_us"] = p.cost.mma_us;
  c["smem_us"] = p.cost.smem_us;
  c["l2_us"] = p.cost.l2_us;
  c["lat_us"] = p.cost.lat_us;
  c["cell_us"] = p.cost.cell_us;
  c["sync_us"] = p.cost.sync_us;
  c["hbm_us"] = p.cost.hbm_us;
  c["step_us"] = p.cost.step_us;
  d["cost"] = c;
  return d;
}

plan::Options options_from_py(const std::string& variant, int64_t groups) {
  plan::Options o = plan::Options::from_env();
  if (variant == "legacy") o.mode = plan::Options::kLegacy;
  else if (variant == "barrier") o.mode = plan::Options::kBarrierOnly;
  else if (variant == "flags") o.mode = plan::Options::kFlagsOnly;
  else if (variant == "auto") o.mode = plan::Options::kAuto;
  else if (variant == "persistent") o.mode = plan::Options::kPersistent;
  else if (variant == "stepwise") o.mode = plan::Options::kStepwise;
  else TORCH_CHECK(variant.empty(), "fusedrnn._C: variant must be auto, persistent, legacy, barrier, flags or stepwise, got ",
                   variant);
  if (groups >= 0) o.groups = static_cast<int>(groups);
  return o;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedrnn compiled kernels; the ops are torch.ops.fusedrnn_ext.*";
  m.def("build_info", &build_info,
        "dict: with_cuda, cuda_version, cuda_archs (compiled), torch_version (compiled against), compiler");
#ifdef FUSEDRNN_WITH_CUDA
  m.def(
      "max_hidden_size",
      [](const std::string& mode, const pybind11::object& dtype, int64_t device_index, int64_t proj_size) {
        return fusedrnn::max_hidden_size_cuda(mode, dtype_from_py(dtype), device_index, proj_size);
      },
      pybind11::arg("mode"), pybind11::arg("dtype"), pybind11::arg("device_index"), pybind11::arg("proj_size") = 0,
      "Largest hidden size the persistent CUDA kernels run for mode ('LSTM'/'GRU'), dtype, device and proj_size");
#endif
  // The CUDA planner on a device record (dict with torch.cuda.get_device_properties() names);
  // available without CUDA.
  m.def(
      "cuda_max_hidden",
      [](const std::string& mode, const pybind11::object& dtype, int64_t proj_size, const pybind11::dict& rec) {
        return plan::max_hidden(mode_is_lstm(mode), dtype_kind_py(dtype), proj_size, record_from_py(rec));
      },
      pybind11::arg("mode"), pybind11::arg("dtype"), pybind11::arg("proj_size"), pybind11::arg("record"),
      "Largest hidden size whose forward and backward CUDA kernels fit the device record (0: none)");
  m.def(
      "cuda_max_proj",
      [](const std::string& mode, const pybind11::object& dtype, int64_t hidden_size, const pybind11::dict& rec) {
        return plan::max_proj(mode_is_lstm(mode), dtype_kind_py(dtype), hidden_size, record_from_py(rec));
      },
      pybind11::arg("mode"), pybind11::arg("dtype"), pybind11::arg("hidden_size"), pybind11::arg("record"),
      "Largest proj_size < hidden_size whose CUDA kernels fit the device record (0: none)");
  m.def(
      "cuda_fits",
      [](const std::string& mode, const pybind11::object& dtype, int64_t hidden_size, int64_t proj_size,
         const pybind11::dict& rec) {
        std::string why;
        const bool ok =
            plan::fits(mode_is_lstm(mode), dtype_kind_py(dtype), hidden_size, proj_size, record_from_py(rec), &why);
        return pybind11::make_tuple(ok, why);
      },
      pybind11::arg("mode"), pybind11::arg("dtype"), pybind11::arg("hidden_size"), pybind11::arg("proj_size"),
      pybind11::arg("record"), "(fits, why): whether forward and backward CUDA kernels fit the device record");
  m.def(
      "cuda_plan",
      [](const std::string& pass, const pybind11::object& dtype, bool tf32, int64_t H, int64_t P, int64_t B, bool proj,
         bool train, const pybind11::dict& rec, const std::string& variant, int64_t groups) {
        plan::Pass ps;
        if (pass == "lstm_fwd") ps = plan::Pass::kLstmFwd;
        else if (pass == "lstm_bwd") ps = plan::Pass::kLstmBwd;
        else if (pass == "gru_fwd") ps = plan::Pass::kGruFwd;
        else if (pass == "gru_bwd") ps = plan::Pass::kGruBwd;
        else TORCH_CHECK(false, "fusedrnn._C: unknown pass ", pass);
        const at::ScalarType st = dtype_from_py(dtype);
        const plan::Engine e = st == at::kDouble ? plan::Engine::kFma64
                               : st == at::kFloat ? (tf32 ? plan::Engine::kTf32 : plan::Engine::kFma32)
                                                  : plan::Engine::kMma16;
        return plan_to_py(plan::plan_pass(ps, e, H, P, B, proj, train, record_from_py(rec), options_from_py(variant, groups)));
      },
      pybind11::arg("pass_"), pybind11::arg("dtype"), pybind11::arg("tf32"), pybind11::arg("H"), pybind11::arg("P"),
      pybind11::arg("B"), pybind11::arg("proj"), pybind11::arg("train"), pybind11::arg("record"),
      pybind11::arg("variant") = "", pybind11::arg("groups") = -1,
      "The launch plan (geometry, exchange protocol, predicted per-step cost terms) the CUDA kernels would use; "
      "variant '' follows FUSEDRNN_CUDA_PLAN");
  auto emu = m.def_submodule("emulation", "the CUDA emulation: the CUDA kernels run on CPU (issue 9, README)");
  fusedrnn_emu::add_bindings(emu);
  emu.def(
      "max_hidden_size",
      [](const std::string& mode, const pybind11::object& dtype, int64_t proj_size) {
        return fusedrnn_emu::max_hidden_size(mode, dtype_from_py(dtype), proj_size);
      },
      pybind11::arg("mode"), pybind11::arg("dtype"), pybind11::arg("proj_size") = 0,
      "max_hidden_size of the emulated CUDA kernels on the emulated device (with proj_size; 0: none)");
}
