// Helpers shared by the CPU recurrences (csrc/cpu/*.cpp): device/dtype checks (shapes: the shared
// fusedrnn/checks.h), lengths, and the parallel loop over (sequence, hidden unit) pairs.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include "fusedrnn/cell_math.h"
#include "fusedrnn/checks.h"

namespace fusedrnn {
namespace cpu {

// Units (one hidden unit of one sequence, a few exp/tanh each) per parallel task: below this the
// thread-pool hand-off costs more than the math.
constexpr int64_t kUnitsPerTask = 8192;

// fn(b, j_begin, j_end) over the B x N grid of units, split across at::parallel_for's threads.
template <typename F>
inline void parallel_units(int64_t B, int64_t N, const F& fn) {
  if (B == 0 || N == 0) return;
  at::parallel_for(0, B * N, kUnitsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin / N; b * N < end; ++b) {
      const int64_t j0 = std::max(begin - b * N, int64_t(0));
      const int64_t j1 = std::min(end - b * N, N);
      fn(b, j0, j1);
    }
  });
}

inline at::ScalarType acc_scalar_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-sequence lengths as a host vector (T for every sequence when lengths is undefined).
// Step t of sequence b is valid when t < len[b].
inline std::vector<int64_t> host_lengths(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  std::vector<int64_t> len(static_cast<size_t>(B), T);
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor l = lengths->to(at::kCPU, at::kLong).contiguous();
    TORCH_CHECK(l.dim() == 1 && l.size(0) == B, "fusedrnn: lengths must have shape (", B, "), got ",
                l.sizes());
    const int64_t* p = l.data_ptr<int64_t>();
    std::copy(p, p + B, len.begin());
  }
  return len;
}

// A copy in the accumulation dtype that owns its memory (outputs must never alias inputs).
inline at::Tensor acc_copy(const at::Tensor& t, at::ScalarType acc) {
  return t.to(t.options().dtype(acc), /*non_blocking=*/false, /*copy=*/true).contiguous();
}

// The accumulation-dtype, contiguous version of an optional input (undefined stays undefined).
inline at::Tensor acc_or_undefined(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(acc).contiguous();
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

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
