// Argument checks of the op contract (ops.h), shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// implementations so both reject the same inputs with the same message, naming the tensor.
// Shapes and dims only (metadata: no device access, so they run before any device guard);
// devices and layout are checked by each backend (check_devices below, contiguity on CUDA).
// A kernel trusts these shapes for its pointer arithmetic: a short bias or a wrong w_hh would
// otherwise be read out of bounds.
#pragma once

#include <initializer_list>
#include <utility>

#include <ATen/ATen.h>

#include "fusedrnn/ops.h"

namespace fusedrnn {
namespace checks {

inline bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

inline void shape(const char* op, const Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "fusedrnn ", op, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
}
inline void opt_shape(const char* op, const OptTensor& t, at::IntArrayRef expected, const char* name) {
  if (defined(t)) shape(op, *t, expected, name);
}

// A (.., gates*H) tensor of `dim` dims: returns H (>= 1).
inline int64_t gate_dim(const char* op, const Tensor& t, int64_t dim, int64_t gates, const char* name,
                        const char* layout) {
  TORCH_CHECK(t.dim() == dim && t.size(dim - 1) % gates == 0 && t.size(dim - 1) > 0, "fusedrnn ", op, ": ",
              name, " must be ", layout, " with H >= 1, got ", t.sizes());
  return t.size(dim - 1) / gates;
}

// Optional per-sequence lengths: int64 (B,).
inline void lengths(const char* op, const OptTensor& t, int64_t B) {
  if (!defined(t)) return;
  TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == B, "fusedrnn ", op,
              ": lengths must be int64 of shape [", B, "], got ", t->scalar_type(), " of shape ", t->sizes());
}

// w_hh: (G, P) with P == H unless a projection w_hr (P, H) is given; returns P.
inline int64_t w_hh_proj(const char* op, const Tensor& w_hh, const OptTensor& w_hr, int64_t G, int64_t H) {
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == G, "fusedrnn ", op, ": w_hh must have shape [", G,
              ", P], got ", w_hh.sizes());
  const int64_t P = w_hh.size(1);
  if (defined(w_hr)) {
    shape(op, *w_hr, {P, H}, "w_hr");
  } else {
    TORCH_CHECK(P == H, "fusedrnn ", op, ": w_hh must have shape [", G, ", ", H,
                "] without a projection (w_hr), got ", w_hh.sizes());
  }
  return P;
}

struct Dims {
  int64_t T = 0, B = 0, H = 0, P = 0;
};

// ---- recurrences (one layer, one direction) ----------------------------------------------------
inline Dims lstm_fwd(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                     const Tensor& c0, const OptTensor& w_hr, const OptTensor& lens) {
  const char* op = "lstm_fwd";
  Dims d;
  d.H = gate_dim(op, xproj, 3, 4, "xproj", "(T, B, 4H)");
  d.T = xproj.size(0);
  d.B = xproj.size(1);
  d.P = w_hh_proj(op, w_hh, w_hr, 4 * d.H, d.H);
  opt_shape(op, b_hh, {4 * d.H}, "b_hh");
  shape(op, h0, {d.B, d.P}, "h0");
  shape(op, c0, {d.B, d.H}, "c0");
  lengths(op, lens, d.B);
  return d;
}

inline Dims lstm_bwd(const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w_hh,
                     const OptTensor& w_hr, const Tensor& c0, const Tensor& gates, const Tensor& cs,
                     const OptTensor& lens) {
  const char* op = "lstm_bwd";
  Dims d;
  d.H = gate_dim(op, gates, 3, 4, "gates", "(T, B, 4H)");
  d.T = gates.size(0);
  d.B = gates.size(1);
  d.P = w_hh_proj(op, w_hh, w_hr, 4 * d.H, d.H);
  shape(op, dy, {d.T, d.B, d.P}, "dy");
  shape(op, dh_n, {d.B, d.P}, "dh_n");
  shape(op, dc_n, {d.B, d.H}, "dc_n");
  shape(op, c0, {d.B, d.H}, "c0");
  shape(op, cs, {d.T, d.B, d.H}, "cs");
  lengths(op, lens, d.B);
  return d;
}

inline Dims gru_fwd(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                    const OptTensor& lens) {
  const char* op = "gru_fwd";
  Dims d;
  d.H = gate_dim(op, xproj, 3, 3, "xproj", "(T, B, 3H)");
  d.T = xproj.size(0);
  d.B = xproj.size(1);
  d.P = d.H;
  shape(op, w_hh, {3 * d.H, d.H}, "w_hh");
  opt_shape(op, b_hh, {3 * d.H}, "b_hh");
  shape(op, h0, {d.B, d.H}, "h0");
  lengths(op, lens, d.B);
  return d;
}

inline Dims gru_bwd(const Tensor& dy, const Tensor& dh_n, const Tensor& w_hh, const Tensor& h0, const Tensor& y,
                    const Tensor& gates, const OptTensor& lens) {
  const char* op = "gru_bwd";
  Dims d;
  d.H = gate_dim(op, gates, 3, 4, "gates", "(T, B, 4H) [r, z, n, hn]");
  d.T = gates.size(0);
  d.B = gates.size(1);
  d.P = d.H;
  shape(op, w_hh, {3 * d.H, d.H}, "w_hh");
  shape(op, dy, {d.T, d.B, d.H}, "dy");
  shape(op, dh_n, {d.B, d.H}, "dh_n");
  shape(op, h0, {d.B, d.H}, "h0");
  shape(op, y, {d.T, d.B, d.H}, "y");
  lengths(op, lens, d.B);
  return d;
}

// ---- cells (one step from precomputed GEMMs) ----------------------------------------------------
inline Dims cell_fwd(const char* op, int64_t gates, const Tensor& igates, const Tensor& hgates,
                     const OptTensor& b_ih, const OptTensor& b_hh, const Tensor& state, const char* state_name) {
  Dims d;
  d.H = gate_dim(op, igates, 2, gates, "igates", gates == 4 ? "(B, 4H)" : "(B, 3H)");
  d.B = igates.size(0);
  d.P = d.H;
  shape(op, hgates, igates.sizes(), "hgates");
  opt_shape(op, b_ih, {gates * d.H}, "b_ih");
  opt_shape(op, b_hh, {gates * d.H}, "b_hh");
  shape(op, state, {d.B, d.H}, state_name);
  return d;
}
inline Dims lstm_cell_fwd(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih, const OptTensor& b_hh,
                          const Tensor& c) {
  return cell_fwd("lstm_cell_fwd", 4, igates, hgates, b_ih, b_hh, c, "c");
}
inline Dims gru_cell_fwd(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih, const OptTensor& b_hh,
                         const Tensor& h) {
  return cell_fwd("gru_cell_fwd", 3, igates, hgates, b_ih, b_hh, h, "h");
}

// Backward of a cell: gates (B, 4H) and every other tensor (B, H).
using Named = std::pair<const char*, const Tensor*>;  // (argument name, tensor or nullptr)
inline Dims cell_bwd(const char* op, const Tensor& gates, std::initializer_list<Named> bh) {
  Dims d;
  d.H = gate_dim(op, gates, 2, 4, "gates", "(B, 4H)");
  d.B = gates.size(0);
  d.P = d.H;
  for (const auto& nt : bh) shape(op, *nt.second, {d.B, d.H}, nt.first);
  return d;
}
inline Dims lstm_cell_bwd(const Tensor& dh_new, const Tensor& dc_new, const Tensor& c, const Tensor& c_new,
                          const Tensor& gates) {
  return cell_bwd("lstm_cell_bwd", gates, {{"dh_new", &dh_new}, {"dc_new", &dc_new}, {"c", &c}, {"c_new", &c_new}});
}
inline Dims gru_cell_bwd(const Tensor& dh_new, const Tensor& h, const Tensor& gates) {
  return cell_bwd("gru_cell_bwd", gates, {{"dh_new", &dh_new}, {"h", &h}});
}

// ---- devices -------------------------------------------------------------------------------------
// Every defined tensor is on `device`; the message names the first that is not.  Runs before any
// device guard is built from these tensors (a guard on the wrong device type fails opaquely).
inline void devices(const char* backend, const char* op, const at::Device& device, std::initializer_list<Named> ts) {
  for (const auto& nt : ts) {
    if (nt.second == nullptr || !nt.second->defined()) continue;
    TORCH_CHECK(nt.second->device() == device, "fusedrnn ", backend, " ", op, ": ", nt.first, " is on ",
                nt.second->device(), " but must be on ", device, " (all tensors on one device)");
  }
}
inline const Tensor* opt(const OptTensor& t) { return defined(t) ? &*t : nullptr; }

}  // namespace checks
}  // namespace fusedrnn
