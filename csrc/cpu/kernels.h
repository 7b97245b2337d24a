// The interface between the ATen-facing CPU ops (lstm.cpp, gru.cpp) and the vectorised kernels.
//
// The kernels are compiled once per instruction set (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp: the same source, kernels_impl.h, with at::vec at that width) and chosen at run
// time by `kernels()` from torch's own CPU capability (so ATEN_CPU_CAPABILITY=default|avx2 applies).
// This header is plain C++ (no ATen): the per-ISA translation units include nothing they do not need.
//
// Notation as in python/fusedrnn/backends/reference.py: T steps, B batch, H hidden, P = proj_size or
// H, G = 4H (LSTM) / 3H (GRU).  "acc" is the accumulation type: double for fp64 data, float for
// fp32 / bf16 / fp16.  Every tensor is contiguous; pointers marked acc point to acc-typed memory,
// the others to the data dtype.
#pragma once

#include <cstdint>

namespace fusedrnn {
namespace cpu {

enum class ScalarKind : int { kFloat = 0, kDouble = 1, kBFloat16 = 2, kHalf = 3 };

// One recurrence call (one layer, one direction).
struct RnnShape {
  int64_t T = 0, B = 0, H = 0, P = 0;
  bool reverse = false;
  const uint8_t* valid = nullptr;  // (T, B): step t of sequence b is valid (t < lengths[b])
  int threads = 1;                 // threads the recurrence may use (>= 1)
  ScalarKind dtype = ScalarKind::kFloat;
};

struct LstmFwdArgs {
  RnnShape s;
  const void* xproj;  // (T, B, 4H)
  const void* w_hh;   // acc (4H, P)
  const void* b_hh;   // acc (4H) or null
  const void* w_hr;   // acc (P, H) or null (no projection)
  const void* h0;     // acc (B, P)
  const void* c0;     // acc (B, H)
  void* y;            // (T, B, P)
  void* gates;        // (T, B, 4H) activated [i, f, g, o], or null (inference: not stored)
  void* cs;           // acc (T, B, H) cell states, or null with gates
  void* h_n;          // acc (B, P)
  void* c_n;          // acc (B, H)
};

struct LstmBwdArgs {
  RnnShape s;
  const void* dy;     // (T, B, P)
  const void* dh_n;   // acc (B, P)
  const void* dc_n;   // acc (B, H)
  const void* w_hh;   // acc (4H, P)
  const void* w_hr;   // acc (P, H) or null
  const void* c0;     // acc (B, H)
  const void* gates;  // (T, B, 4H)
  const void* cs;     // acc (T, B, H)
  void* dxproj;       // (T, B, 4H)
  void* dh0;          // acc (B, P)
  void* dc0;          // acc (B, H)
  void* dh_seq;       // (T, B, P) when w_hr is given, else null
};

struct GruFwdArgs {
  RnnShape s;
  const void* xproj;  // (T, B, 3H)
  const void* w_hh;   // acc (3H, H)
  const void* b_hh;   // acc (3H) or null
  const void* h0;     // acc (B, H)
  void* y;            // (T, B, H)
  void* gates;        // (T, B, 4H) [r, z, n, hn], or null (inference: not stored)
  void* h_n;          // acc (B, H)
};

struct GruBwdArgs {
  RnnShape s;
  const void* dy;     // (T, B, H)
  const void* dh_n;   // acc (B, H)
  const void* w_hh;   // acc (3H, H)
  const void* h0;     // acc (B, H)
  const void* y;      // (T, B, H) the forward's outputs (h_{t-1} of the next step)
  const void* gates;  // (T, B, 4H)
  void* dxproj;       // (T, B, 3H)
  void* dh0;          // acc (B, H)
  void* dhn;          // (T, B, H)
};

// Cells: one step from precomputed GEMMs (igates = x @ W_ih^T, hgates = h @ W_hh^T).
struct CellShape {
  int64_t B = 0, H = 0;
  int threads = 1;
  ScalarKind dtype = ScalarKind::kFloat;
};

struct LstmCellFwdArgs {
  CellShape s;
  const void* igates;  // (B, 4H)
  const void* hgates;  // (B, 4H)
  const void* b_ih;    // acc (4H) or null
  const void* b_hh;    // acc (4H) or null
  const void* c;       // acc (B, H)
  void* h_new;         // (B, H)
  void* c_new;         // (B, H)
  void* gates;         // (B, 4H)
};

struct LstmCellBwdArgs {
  CellShape s;
  const void* dh_new;  // acc (B, H)
  const void* dc_new;  // acc (B, H)
  const void* c;       // acc (B, H)
  const void* c_new;   // acc (B, H)
  const void* gates;   // (B, 4H)
  void* dgates;        // (B, 4H)
  void* dc;            // (B, H)
};

struct GruCellFwdArgs {
  CellShape s;
  const void* igates;  // (B, 3H)
  const void* hgates;  // (B, 3H)
  const void* b_ih;    // acc (3H) or null
  const void* b_hh;    // acc (3H) or null
  const void* h;       // acc (B, H)
  void* h_new;         // (B, H)
  void* gates;         // (B, 4H)
};

struct GruCellBwdArgs {
  CellShape s;
  const void* dh_new;  // acc (B, H)
  const void* h;       // acc (B, H)
  const void* gates;   // (B, 4H)
  void* d_i;           // (B, 3H)
  void* d_h;           // (B, 3H)
  void* dh;            // (B, H)
};

// The vectorised elementary functions, exposed for the accuracy tests (fusedrnn_ext::cpu_activation).
enum class Activation : int { kExp = 0, kSigmoid = 1, kTanh = 2, kDSigmoid = 3, kDTanh = 4 };

struct Kernels {
  const char* isa;  // "default", "avx2", "avx512"
  void (*lstm_fwd)(const LstmFwdArgs&);
  void (*lstm_bwd)(const LstmBwdArgs&);
  void (*gru_fwd)(const GruFwdArgs&);
  void (*gru_bwd)(const GruBwdArgs&);
  void (*lstm_cell_fwd)(const LstmCellFwdArgs&);
  void (*lstm_cell_bwd)(const LstmCellBwdArgs&);
  void (*gru_cell_fwd)(const GruCellFwdArgs&);
  void (*gru_cell_bwd)(const GruCellBwdArgs&);
  // y[i] = fn(x[i]) for i < n; x, y are float (kind kFloat) or double (kDouble)
  void (*activation)(Activation fn, ScalarKind kind, const void* x, void* y, int64_t n);
  // whether a forward of T steps, B sequences, `gates` gate vectors per unit (4 LSTM, 3 GRU) and
  // float weights of hidden size H reads W_hh in place instead of packing it (short calls)
  bool (*reads_in_place)(int gates, int64_t T, int64_t B, int64_t H);
};

// Per-ISA tables; null when this build has no such variant (non-x86 or non-GCC builds).
const Kernels* kernels_default();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

// The table in use: the widest one torch's CPU capability allows, unless overridden by
// set_kernels_isa (tests).  Defined in dispatch.cpp.
const Kernels& kernels();

}  // namespace cpu
}  // namespace fusedrnn
