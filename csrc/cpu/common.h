// Helpers shared by the ATen-facing CPU ops (lstm.cpp, gru.cpp): device/dtype checks (shapes: the
// shared fusedrnn/checks.h), the valid-step table, accumulation-dtype copies, the thread count of a
// call, and dtype -> kernel kind.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include "fusedrnn/checks.h"
#include "kernels.h"

namespace fusedrnn {
namespace cpu {

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline ScalarKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ScalarKind::kFloat;
    case at::kDouble:
      return ScalarKind::kDouble;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kHalf:
      return ScalarKind::kHalf;
    default:
      TORCH_CHECK(false, "fusedrnn (cpp backend): unsupported dtype ", t,
                  " (float32, float64, bfloat16, float16)");
  }
}

// (T, B) bytes: step t of sequence b is valid (t < lengths[b]; every step when lengths is undefined).
inline at::Tensor valid_steps(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  at::Tensor valid = at::empty({T, B}, at::TensorOptions().dtype(at::kByte));
  uint8_t* v = valid.data_ptr<uint8_t>();
  if (!lengths.has_value() || !lengths->defined()) {
    std::fill(v, v + T * B, uint8_t(1));
    return valid;
  }
  const at::Tensor l = lengths->to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(l.dim() == 1 && l.size(0) == B, "fusedrnn: lengths must have shape (", B, "), got ", l.sizes());
  const int64_t* len = l.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < B; ++b) v[t * B + b] = t < len[b] ? 1 : 0;
  }
  return valid;
}

// Multiply-adds per thread and step below which a second thread costs more than it saves: 2^18 is
// 16K AVX-512 FMAs, about 5 us on one core, against about 1 us for the team's barrier on an idle
// 2-core AMD EPYC (Zen 4), where an LSTM with H = 256, B = 4 (2^20 per step) ran its recurrence in
// 1.1 ms on two threads instead of 1.6 ms on one.  A first estimate: the machine it was tuned on
// was too busy to time two-thread runs finely (BENCHMARKS.md "CPU").
constexpr int64_t kMinStepMacsPerThread = int64_t(1) << 18;

// Threads for a recurrence whose step GEMM is (B x K) @ (K x N): torch.get_num_threads() at most.
inline int recurrence_threads(int64_t B, int64_t K, int64_t N) {
  const int64_t macs = B * K * N;
  const int64_t useful = std::max<int64_t>(1, macs / kMinStepMacsPerThread);
  return static_cast<int>(std::min<int64_t>(useful, std::max(1, at::get_num_threads())));
}

// Threads for a pointwise cell over B x H units (a few exp/tanh each).
constexpr int64_t kMinCellUnitsPerThread = 16384;
inline int cell_threads(int64_t B, int64_t H) {
  const int64_t useful = std::max<int64_t>(1, B * H / kMinCellUnitsPerThread);
  return static_cast<int>(std::min<int64_t>(useful, std::max(1, at::get_num_threads())));
}

// A copy in the accumulation dtype that owns its memory (outputs must never alias inputs).
inline at::Tensor acc_copy(const at::Tensor& t, at::ScalarType acc) {
  return t.to(t.options().dtype(acc), /*non_blocking=*/false, /*copy=*/true).contiguous();
}

// The accumulation-dtype, contiguous version of an input (may be the input itself: read only).
inline at::Tensor acc_view(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

// The accumulation-dtype, contiguous version of an optional input (undefined stays undefined).
inline at::Tensor acc_or_undefined(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(acc).contiguous();
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fusedrnn (cpp backend): ", name, " must be a CPU tensor, got ",
              t.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fusedrnn: ", name, " must have dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

}  // namespace cpu
}  // namespace fusedrnn
