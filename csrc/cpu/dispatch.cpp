// Chooses the CPU kernel table of kernels.h at run time, and registers the CPU-only helper ops the
// tests use to reach every variant:
//   fusedrnn_ext::cpu_isa(str isa="") -> str        the variant in use; "default" / "avx2" / "avx512"
//                                                   selects one (RuntimeError if this CPU or build
//                                                   lacks it), "auto" restores the automatic choice
//   fusedrnn_ext::cpu_supported_isas() -> str[]     the variants this CPU and build can run
//   fusedrnn_ext::cpu_recurrence_threads(int B, int K, int N) -> int
//                                                   threads a recurrence with step GEMM (B x K) @
//                                                   (K x N) uses now (torch.get_num_threads() at most)
//   fusedrnn_ext::cpu_reads_in_place(str mode, int T, int B, int H) -> bool
//                                                   whether the variant in use runs a float forward
//                                                   of T steps, B sequences, hidden size H ("lstm" /
//                                                   "gru") on W_hh read in place instead of packed
//   fusedrnn_ext::cpu_activation(Tensor x, str fn) -> Tensor
//                                                   the vectorised exp / sigmoid / tanh / dsigmoid /
//                                                   dtanh (derivatives from the activated value) of
//                                                   the variant in use, on a float32/float64 CPU tensor
#include <atomic>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "common.h"
#include "kernels.h"

namespace fusedrnn {
namespace cpu {
namespace {

// The variants this process may run, widest first.  torch's capability string honours
// ATEN_CPU_CAPABILITY and already checked the CPU (AVX512: F/BW/VL/DQ + FMA; AVX2: AVX2 + FMA).
std::vector<const Kernels*> supported() {
  const std::string cap = at::get_cpu_capability();
  std::vector<const Kernels*> out;
  if (cap == "AVX512" && kernels_avx512() != nullptr) out.push_back(kernels_avx512());
  if ((cap == "AVX512" || cap == "AVX2") && kernels_avx2() != nullptr) out.push_back(kernels_avx2());
  out.push_back(kernels_default());
  return out;
}

const Kernels* automatic() {
  static const Kernels* best = supported().front();
  return best;
}

std::atomic<const Kernels*> g_selected{nullptr};

std::string cpu_isa(const std::string& isa) {
  if (isa == "auto") {
    g_selected.store(nullptr);
  } else if (!isa.empty()) {
    const Kernels* found = nullptr;
    std::string names;
    for (const Kernels* k : supported()) {
      names += std::string(names.empty() ? "" : ", ") + k->isa;
      if (isa == k->isa) found = k;
    }
    TORCH_CHECK(found != nullptr, "fusedrnn: CPU kernel variant '", isa, "' cannot run here (supported: ", names,
                "; torch's CPU capability is ", at::get_cpu_capability(), ")");
    g_selected.store(found);
  }
  return kernels().isa;
}

std::vector<std::string> cpu_supported_isas() {
  std::vector<std::string> out;
  for (const Kernels* k : supported()) out.emplace_back(k->isa);
  return out;
}

int64_t cpu_recurrence_threads(int64_t B, int64_t K, int64_t N) { return recurrence_threads(B, K, N); }

bool cpu_reads_in_place(const std::string& mode, int64_t T, int64_t B, int64_t H) {
  TORCH_CHECK(mode == "lstm" || mode == "gru", "fusedrnn: cpu_reads_in_place: mode must be 'lstm' or 'gru', got '",
              mode, "'");
  return kernels().reads_in_place(mode == "lstm" ? 4 : 3, T, B, H);
}

at::Tensor cpu_activation(const at::Tensor& x, const std::string& fn) {
  TORCH_CHECK(x.device().is_cpu(), "fusedrnn: cpu_activation needs a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "fusedrnn: cpu_activation needs float32 or float64, got ", x.scalar_type());
  Activation a;
  if (fn == "exp") {
    a = Activation::kExp;
  } else if (fn == "sigmoid") {
    a = Activation::kSigmoid;
  } else if (fn == "tanh") {
    a = Activation::kTanh;
  } else if (fn == "dsigmoid") {
    a = Activation::kDSigmoid;
  } else if (fn == "dtanh") {
    a = Activation::kDTanh;
  } else {
    TORCH_CHECK(false, "fusedrnn: cpu_activation: unknown function '", fn,
                "' (exp, sigmoid, tanh, dsigmoid, dtanh)");
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  kernels().activation(a, x.scalar_type() == at::kDouble ? ScalarKind::kDouble : ScalarKind::kFloat,
                       xc.data_ptr(), y.data_ptr(), xc.numel());
  return y;
}

}  // namespace

const Kernels& kernels() {
  const Kernels* k = g_selected.load(std::memory_order_acquire);
  return k != nullptr ? *k : *automatic();
}

}  // namespace cpu
}  // namespace fusedrnn

TORCH_LIBRARY_FRAGMENT(fusedrnn_ext, m) {
  m.def("cpu_isa(str isa=\"\") -> str", &fusedrnn::cpu::cpu_isa);
  m.def("cpu_supported_isas() -> str[]", &fusedrnn::cpu::cpu_supported_isas);
  m.def("cpu_recurrence_threads(int B, int K, int N) -> int", &fusedrnn::cpu::cpu_recurrence_threads);
  m.def("cpu_reads_in_place(str mode, int T, int B, int H) -> bool", &fusedrnn::cpu::cpu_reads_in_place);
  m.def("cpu_activation(Tensor x, str fn) -> Tensor", &fusedrnn::cpu::cpu_activation);
}
