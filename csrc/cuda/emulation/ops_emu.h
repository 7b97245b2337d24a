// Runs a CUDA op function (csrc/cuda/*.cu, compiled for the emulation) on CPU tensors inside an
// OpScope: inputs are copied into guarded buffers and named after the op's schema, outputs are
// named when the op returns, and whatever the launches found (out-of-bounds accesses, races,
// deadlocks) is raised as one error.
//
//   m.impl("lstm_fwd", fusedrnn_emu::emulated<&ns::lstm_fwd_cuda>("lstm_fwd"));
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Optional.h>

#include "runtime.h"

namespace fusedrnn_emu {

inline std::string tensor_desc(const at::Tensor& t) {
  std::ostringstream os;
  os << t.scalar_type() << t.sizes();
  return os.str();
}

// Argument names from the dispatcher schema of the op (fusedrnn_emu:: or fusedrnn_ext::).
inline std::vector<std::string> arg_names(const std::string& op, size_t n) {
  std::vector<std::string> names;
  for (const char* ns : {"fusedrnn_emu::", "fusedrnn_ext::"}) {
    auto h = c10::Dispatcher::singleton().findSchema({std::string(ns) + op, ""});
    if (h.has_value() && h->schema().arguments().size() == n) {
      for (const auto& a : h->schema().arguments()) names.push_back(a.name());
      return names;
    }
  }
  for (size_t i = 0; i < n; ++i) names.push_back("argument " + std::to_string(i));
  return names;
}

// A contiguous CPU input becomes a guarded copy; anything else goes through unchanged (the op's
// own checks reject it, or make their own contiguous copy inside the scope).
inline at::Tensor track(OpScope& scope, const at::Tensor& t, const std::string& name) {
  if (!t.defined() || !t.is_cpu() || !t.is_contiguous() || t.numel() == 0) return t;
  at::Tensor c = t.clone(at::MemoryFormat::Contiguous);
  scope.label(c.data_ptr(), "input '" + name + "' (" + tensor_desc(t) + ")", static_cast<int>(t.element_size()));
  return c;
}
inline c10::optional<at::Tensor> track(OpScope& scope, const c10::optional<at::Tensor>& t, const std::string& name) {
  if (!t.has_value()) return t;
  return track(scope, *t, name);
}
template <class T>
inline T track(OpScope&, const T& v, const std::string&) {
  return v;
}

template <class Tuple, size_t... I>
void label_outputs(OpScope& scope, const Tuple& out, std::index_sequence<I...>) {
  auto one = [&](const at::Tensor& t, size_t i) {
    if (t.defined() && t.numel() > 0) {
      scope.label(t.data_ptr(), "output " + std::to_string(i) + " (" + tensor_desc(t) + ")",
                  static_cast<int>(t.element_size()));
    }
  };
  (one(std::get<I>(out), I), ...);
}

template <auto Fn>
struct EmulatedOp;

template <class R, class... A, R (*Fn)(A...)>
struct EmulatedOp<Fn> {
  static inline const char* name = "";
  template <size_t... I>
  static std::tuple<std::decay_t<A>...> track_all(OpScope& scope, const std::vector<std::string>& names,
                                                   std::index_sequence<I...>, A... args) {
    return std::tuple<std::decay_t<A>...>{track(scope, args, names[I])...};
  }
  static R call(A... args) {
    OpScope scope(name);
    const std::vector<std::string> names = arg_names(name, sizeof...(A));
    auto tracked = track_all(scope, names, std::index_sequence_for<A...>{}, args...);
    R out = std::apply(Fn, tracked);
    label_outputs(scope, out, std::make_index_sequence<std::tuple_size<R>::value>{});
    scope.check();
    return out;
  }
};

// The emulated version of op function Fn, named `name` in reports.
template <auto Fn>
auto emulated(const char* name) {
  EmulatedOp<Fn>::name = name;
  return &EmulatedOp<Fn>::call;
}

}  // namespace fusedrnn_emu
