// The CPU recurrences and cells, written once with at::vec and compiled once per instruction set:
// kernels_<isa>.cpp defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and includes this file, so every
// name below lives in fusedrnn::cpu::<ISA> (an inline namespace, as in ATen) and the variants never
// meet at link time.  Include nothing here that is not needed: this code is compiled for the target
// ISA, and only the dispatcher decides whether it may run.
//
// Design (per layer and direction; the input projection of all steps is one GEMM outside):
//   * W_hh (and W_hr) are packed once per call into panels: panel[group][k][v][lane], the K x N
//     operand of `out = a @ B` in groups of NV vectors, zero-padded, 64-byte aligned.  A thread
//     touches only its own groups, so its slice stays in its core's cache for the whole sequence.
//   * Each step is one pass (two with proj_size) over (column group, batch-row tile) items: a
//     register-tiled GEMM of the tile against the group's panel, then the cell math on the
//     accumulators before they leave the registers (bias, activations, state update, stores).
//     Forward: the group is one block of L hidden units with its NG gate columns (NG = 4 / 3), so
//     the epilogue sees every gate of its units.  Backward: dh_{t-1} = dpre_t @ W_hh is produced
//     block by block and each block's epilogue immediately runs the cell backward of step t-1 for
//     those units (the GEMM of one step is fused with the pointwise work of the next).
//   * Threads: one OpenMP team for the whole sequence, work split by column groups first (each
//     thread keeps the same weights every step), barrier between passes.
//   * Math and states in the accumulation type (float for fp32/bf16/fp16, double for fp64); the
//     exact semantics (padded steps, saved tensors) are those of backends/reference.py.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "kernels.h"
#include "parallel.h"

namespace fusedrnn {
// Elementary functions of cell_math.h on vectors, declared before it so that its templates find
// them.  exp: at::vec's (SLEEF's 1-ulp expf/exp at AVX2/AVX-512, libm per lane at the default
// width).  tanh: for float SLEEF's 3.5-ulp tanhf at AVX2/AVX-512 (the 1-ulp one at::vec calls costs
// about 3x more and was 40% of a small LSTM's forward), libm per lane at the default width; double
// keeps the 1-ulp functions.  All of them saturate exactly (tanh(+-large) = +-1, exp(-large) = 0,
// exp(large) = inf), so sigmoid = 1 / (1 + exp(-x)) is exactly 0 or 1 far out and the derivatives
// computed from the activated values vanish there, as with torch's and libm's functions.
inline at::vec::Vectorized<float> exp_(const at::vec::Vectorized<float>& x) { return x.exp(); }
inline at::vec::Vectorized<double> exp_(const at::vec::Vectorized<double>& x) { return x.exp(); }
inline at::vec::Vectorized<float> tanh_(const at::vec::Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Sleef_tanhf16_u35(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return Sleef_tanhf8_u35(x);
#else
  return x.tanh();
#endif
}
inline at::vec::Vectorized<double> tanh_(const at::vec::Vectorized<double>& x) { return x.tanh(); }
}  // namespace fusedrnn

#include "fusedrnn/cell_math.h"

namespace fusedrnn {
namespace cpu {
inline namespace CPU_CAPABILITY {

template <typename A>
using Vec = at::vec::Vectorized<A>;

#if defined(__GNUC__)
#define FUSEDRNN_CPU_NOINLINE __attribute__((noinline))
#else
#define FUSEDRNN_CPU_NOINLINE
#endif
template <typename A>
constexpr int kLanes = Vec<A>::size();

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVecRegisters = 32;
#else
constexpr int kVecRegisters = 16;
#endif

// Batch rows of a register tile with NV accumulators per row: R * NV accumulators + NV weight
// vectors + one broadcast must fit the vector register file (AVX-512: 6 rows x 4 gates, 8 x 3;
// AVX2: 2 x 4, 3 x 3).
constexpr int max_rows(int nv) {
  const int r = (kVecRegisters - nv - 2) / nv;
  return r < 1 ? 1 : (r > 8 ? 8 : r);
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename A>
constexpr A kNaN = std::numeric_limits<A>::quiet_NaN();

struct Range {
  int64_t begin, end;
};
// Thread tid's share of n items (contiguous, sizes differ by at most one).
inline Range split(int64_t n, int tid, int nt) { return {n * tid / nt, n * (tid + 1) / nt}; }

// 64-byte aligned scratch owned by one call (raw new, no std containers: see kernels_avx2.cpp).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : p_(n > 0 ? static_cast<T*>(::operator new(sizeof(T) * static_cast<size_t>(n), std::align_val_t(64)))
                 : nullptr) {}
  // State scratch starts as NaN: a read of an element no step wrote poisons the results (and the
  // tests see it) instead of silently using stale memory.  O(B x G) per call: negligible.
  Scratch(int64_t n, T fill) : Scratch(n) {
    for (int64_t i = 0; i < n; ++i) p_[i] = fill;
  }
  ~Scratch() {
    if (p_ != nullptr) ::operator delete(p_, std::align_val_t(64));
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return p_; }

 private:
  T* p_;
};

// ---- loads and stores of n <= L lanes, converting storage <-> accumulation type -----------------
template <typename A, typename S>
inline Vec<A> vload(const S* p, int n) {
  constexpr int L = kLanes<A>;
  if constexpr (std::is_same_v<A, S>) {
    return n == L ? Vec<A>::loadu(p) : Vec<A>::loadu(p, n);  // partial loads zero the other lanes
  } else {
    static_assert(std::is_same_v<A, float>, "reduced types accumulate in float");
    Vec<float> out;
    if (n == L) {
      at::vec::load_to_float<S>(p, out);
    } else {
      S tmp[L];
      std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
      std::memcpy(static_cast<void*>(tmp), p, sizeof(S) * static_cast<size_t>(n));
      at::vec::load_to_float<S>(tmp, out);
    }
    return out;
  }
}

template <typename A, typename S>
inline void vstore(S* p, const Vec<A>& v, int n) {
  if constexpr (std::is_same_v<A, S>) {
    if (n == kLanes<A>) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  } else {
    at::vec::convert_from_float<S>(v, v).store(p, n);  // round to nearest even, first n lanes
  }
}

template <typename A, typename S>
inline void vzero(S* p, int n) {
  vstore<A>(p, Vec<A>(A(0)), n);
}

// ---- packing of the step GEMM operands ------------------------------------------------------
// panel[group][k][v][lane] = Bmat(k, column(group, v) + lane), zero where the lane is past the
// column run.  Two column schemes:
//   gates  (forward): group = block of L hidden units, vector v = gate v:  column v*H + group*L
//   blocks (backward, projection): group = NV consecutive blocks of L columns: column (group*NV+v)*L
struct Column {
  int64_t base;
  int n;  // valid lanes, 0..L
};

template <typename A, int NV>
inline Column gate_column(int64_t group, int v, int64_t H) {
  constexpr int L = kLanes<A>;
  const int64_t j0 = group * L;
  return {v * H + j0, static_cast<int>(std::min<int64_t>(L, H - j0))};
}

template <typename A, int NV>
inline Column block_column(int64_t group, int v, int64_t N) {
  constexpr int L = kLanes<A>;
  const int64_t c0 = (group * NV + v) * L;
  return {c0, static_cast<int>(std::clamp<int64_t>(N - c0, 0, L))};
}

// Transposes an L x L block held in L vectors (r[i][j] -> r[j][i]): log2(L) rounds of interleaving
// row i with row i + L/2 (each round rotates the bits of the element index by one).
template <typename A>
inline void transpose_block(Vec<A> (&r)[kLanes<A>]) {
  constexpr int L = kLanes<A>;
  for (int width = 1; width < L; width *= 2) {
    Vec<A> t[L];
    for (int i = 0; i < L / 2; ++i) {
      const auto p = at::vec::interleave2(r[i], r[i + L / 2]);
      t[2 * i] = p.first;
      t[2 * i + 1] = p.second;
    }
    for (int i = 0; i < L; ++i) r[i] = t[i];
  }
}

// Packs one group of Bmat = src^T, src row-major (N x K) with row stride ld: Bmat(k, c) = src[c*ld + k].
template <typename A, int NV, class ColumnFn>
inline void pack_transposed(const A* src, int64_t ld, int64_t K, int64_t group, ColumnFn column, A* dst) {
  constexpr int L = kLanes<A>;
  for (int v = 0; v < NV; ++v) {
    const Column col = column(group, v);
    for (int64_t k0 = 0; k0 < K; k0 += L) {
      if (col.n == L && k0 + L <= K) {
        Vec<A> r[L];
        for (int l = 0; l < L; ++l) r[l] = Vec<A>::loadu(src + (col.base + l) * ld + k0);
        transpose_block<A>(r);
        for (int kk = 0; kk < L; ++kk) r[kk].store(dst + ((k0 + kk) * NV + v) * L);
      } else {
        for (int64_t k = k0; k < std::min<int64_t>(K, k0 + L); ++k) {
          A* d = dst + (k * NV + v) * L;
          for (int l = 0; l < L; ++l) d[l] = l < col.n ? src[(col.base + l) * ld + k] : A(0);
        }
      }
    }
  }
}

// Packs one group of Bmat = src, src row-major (K x N) with row stride ld.
template <typename A, int NV, class ColumnFn>
inline void pack_rows(const A* src, int64_t ld, int64_t K, int64_t group, ColumnFn column, A* dst) {
  constexpr int L = kLanes<A>;
  Column cols[NV];
  for (int v = 0; v < NV; ++v) cols[v] = column(group, v);
  for (int64_t k = 0; k < K; ++k) {
    for (int v = 0; v < NV; ++v) {
      Vec<A>::loadu(src + k * ld + cols[v].base, cols[v].n).store(dst + (k * NV + v) * L);
    }
  }
}

template <typename A, int NV>
inline int64_t panel_group_elems(int64_t K) {
  return K * NV * kLanes<A>;
}

// ---- the register-tiled step GEMM -----------------------------------------------------------
// acc[r][v] = sum_k a[r * lda + k] * panel[k][v][:]  (R batch rows, NV vectors of L columns)
template <typename A, int R, int NV>
inline void tile_gemm(const A* a, int64_t lda, const A* panel, int64_t K, Vec<A> (&acc)[R][NV]) {
  constexpr int L = kLanes<A>;
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec<A>(A(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    const A* pk = panel + k * NV * L;
    Vec<A> w[NV];
    for (int v = 0; v < NV; ++v) w[v] = Vec<A>::loadu(pk + v * L);
    for (int r = 0; r < R; ++r) {
      const Vec<A> x(a[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(x, w[v], acc[r][v]);
    }
  }
}

// The same tile read from Bmat's source in place, for calls too short to repay packing:
// acc[r][v] = sum_k a[r * lda + k] * src[(column(group, v).base + lane) * ld + k] (Bmat = src^T,
// src row-major N x K), zero in lanes past the column run.  Dot products along k on src's rows,
// then one L x L transpose per L columns turns the L partial-sum vectors into the vector of their
// sums.  Two loads per FMA (half the packed tile's FMA rate), but no pass over src before the
// first step.  Row r outside column l: a row of `a` stays in L1 while the L source rows of a
// column run (64 KiB at K = 1024) stream from L2 once per row; the other order (each source chunk
// once into all R rows) keeps R rows of `a` and the partial sums live and measured 2x slower at
// H = 1024, B = 6, T = 1 on a Zen 4 core (2.09 vs 1.06 ms).
template <typename A, int R, int NV, class ColumnFn>
inline void tile_gemm_direct(const A* a, int64_t lda, const A* src, int64_t ld, int64_t K, int64_t group,
                             ColumnFn column, Vec<A> (&acc)[R][NV]) {
  constexpr int L = kLanes<A>;
  for (int v = 0; v < NV; ++v) {
    const Column col = column(group, v);
    for (int r = 0; r < R; ++r) {
      const A* ar = a + r * lda;
      Vec<A> part[L];
      for (int l = 0; l < L; ++l) {
        if (l >= col.n) {
          part[l] = Vec<A>(A(0));
          continue;
        }
        const A* wl = src + (col.base + l) * ld;
        Vec<A> s0(A(0)), s1(A(0)), s2(A(0)), s3(A(0));  // four chains cover the FMA latency
        int64_t k = 0;
        for (; k + 4 * L <= K; k += 4 * L) {
          s0 = at::vec::fmadd(Vec<A>::loadu(ar + k), Vec<A>::loadu(wl + k), s0);
          s1 = at::vec::fmadd(Vec<A>::loadu(ar + k + L), Vec<A>::loadu(wl + k + L), s1);
          s2 = at::vec::fmadd(Vec<A>::loadu(ar + k + 2 * L), Vec<A>::loadu(wl + k + 2 * L), s2);
          s3 = at::vec::fmadd(Vec<A>::loadu(ar + k + 3 * L), Vec<A>::loadu(wl + k + 3 * L), s3);
        }
        for (; k + L <= K; k += L) s0 = at::vec::fmadd(Vec<A>::loadu(ar + k), Vec<A>::loadu(wl + k), s0);
        if (k < K) {  // partial loads zero the lanes past K
          const int n = static_cast<int>(K - k);
          s1 = at::vec::fmadd(Vec<A>::loadu(ar + k, n), Vec<A>::loadu(wl + k, n), s1);
        }
        part[l] = (s0 + s1) + (s2 + s3);
      }
      transpose_block<A>(part);  // part[i][l] = partial sum i of column l
      Vec<A> sum = part[0];
      for (int i = 1; i < L; ++i) sum = sum + part[i];
      acc[r][v] = sum;
    }
  }
}

// Calls f(std::integral_constant<int, rows>) for a runtime rows in [1, R].
template <int R, class F>
inline void with_rows(int rows, F& f) {
  if constexpr (R > 1) {
    if (rows < R) {
      with_rows<R - 1>(rows, f);
      return;
    }
  }
  f(std::integral_constant<int, R>());
}

// One pass of a step on this thread's items: for each (column group, row tile), acc = a[tile rows]
// @ Bmat[group] and then epi(b, group, acc_row) for every row b of the tile.  need[b] == 0 means
// row b does not use its GEMM result (the tile's GEMM is skipped when no row needs it).  The tile
// GEMM is tile(rows_constant, group, b0, acc): from a packed panel (gemm_pass) or from Bmat's
// source in place (gemm_pass_direct).
template <typename A, int NV, class Tile, class Epi>
inline void gemm_pass_tiles(int tid, int nt, int64_t B, int64_t groups, const uint8_t* need, Tile& tile, Epi& epi) {
  constexpr int MR = max_rows(NV);
  const int64_t tiles = div_up(B, MR);
  const Range mine = split(groups * tiles, tid, nt);
  for (int64_t item = mine.begin; item < mine.end; ++item) {
    const int64_t group = item / tiles;
    const int64_t b0 = (item % tiles) * MR;
    const int rows = static_cast<int>(std::min<int64_t>(MR, B - b0));
    bool any = false;
    for (int r = 0; r < rows; ++r) any = any || need[b0 + r] != 0;
    auto run = [&](auto rows_c) {
      constexpr int R = decltype(rows_c)::value;
      Vec<A> acc[R][NV];
      if (any) {
        tile(rows_c, group, b0, acc);
      } else {
        for (int r = 0; r < R; ++r) {
          for (int v = 0; v < NV; ++v) acc[r][v] = Vec<A>(A(0));
        }
      }
      for (int r = 0; r < R; ++r) epi(b0 + r, group, acc[r]);
    };
    with_rows<MR>(rows, run);
  }
}

template <typename A, int NV, class Epi>
inline void gemm_pass(int tid, int nt, int64_t B, int64_t groups, const A* a, int64_t lda, const A* panel,
                      int64_t K, const uint8_t* need, Epi& epi) {
  auto tile = [&](auto rows_c, int64_t group, int64_t b0, auto& acc) {
    constexpr int R = decltype(rows_c)::value;
    tile_gemm<A, R, NV>(a + b0 * lda, lda, panel + group * panel_group_elems<A, NV>(K), K, acc);
  };
  gemm_pass_tiles<A, NV>(tid, nt, B, groups, need, tile, epi);
}

// gemm_pass with Bmat = src^T read in place (src row-major N x K, row stride ld; see tile_gemm_direct).
// Kept out of line: it runs one or two steps per call, and inlined into the forwards next to the
// packed path it made GCC stop inlining that hot path's tile and epilogue (the LSTM forward ran 2x
// slower at every T).
template <typename A, int NV, class ColumnFn, class Epi>
FUSEDRNN_CPU_NOINLINE void gemm_pass_direct(int tid, int nt, int64_t B, int64_t groups, const A* a, int64_t lda, const A* src,
                             int64_t ld, int64_t K, ColumnFn column, const uint8_t* need, Epi& epi) {
  auto tile = [&](auto rows_c, int64_t group, int64_t b0, auto& acc) {
    constexpr int R = decltype(rows_c)::value;
    tile_gemm_direct<A, R, NV>(a + b0 * lda, lda, src, ld, K, group, column, acc);
  };
  gemm_pass_tiles<A, NV>(tid, nt, B, groups, need, tile, epi);
}

// Whether a forward reads W_hh (and W_hr) in place instead of packing them: when the panel would be
// read at most twice (T steps x row tiles) and either the call has at most 4 rows in all (T x B:
// packing's pass over W cannot be repaid) or the weights exceed a core's L2 cache (every pass then
// streams W from L3 / memory, and one read in place beats read + write + read).  Measured on a
// Zen 4 core (1 MiB L2), T = 1: H = 256, B = 6 in place 89 us vs packed ~65 us (W in L2, the
// packed tile's FMA rate wins); H = 1024, B = 6: 1.06 ms vs ~1.7 ms.  The choice depends on T, B
// and the sizes only, so every thread count and both save modes compute the same sums.
constexpr int64_t kInPlaceWeightBytes = int64_t(2) << 20;  // above a typical per-core L2 (1-2 MiB)

template <int NV>
inline bool read_in_place(int64_t T, int64_t B, int64_t weight_bytes) {
  return T * div_up(B, max_rows(NV)) <= 2 && (T * B <= 4 || weight_bytes > kInPlaceWeightBytes);
}

// read_in_place of the LSTM (4 gate vectors per group) or GRU (3) forward with float weights of
// hidden size H (no projection), for the tests.
inline bool reads_in_place_entry(int gates, int64_t T, int64_t B, int64_t H) {
  const int64_t bytes = gates * H * H * static_cast<int64_t>(sizeof(float));
  return gates == 4 ? read_in_place<4>(T, B, bytes) : read_in_place<3>(T, B, bytes);
}

// Packs groups [0, groups) split over the team, then waits for the whole panel.
template <class PackGroup>
inline void pack_shared(int tid, int nt, int64_t groups, PackGroup pack_group) {
  const Range mine = split(groups, tid, nt);
  for (int64_t g = mine.begin; g < mine.end; ++g) pack_group(g);
}

template <class F>
inline void dispatch_dtype(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat:
      f(static_cast<float*>(nullptr));
      break;
    case ScalarKind::kDouble:
      f(static_cast<double*>(nullptr));
      break;
    case ScalarKind::kBFloat16:
      f(static_cast<c10::BFloat16*>(nullptr));
      break;
    case ScalarKind::kHalf:
      f(static_cast<c10::Half*>(nullptr));
      break;
  }
}

// ============================================================================================ LSTM
template <typename S>
void lstm_fwd_impl(const LstmFwdArgs& args) {
  using A = acc_t<S>;
  using V = Vec<A>;
  constexpr int L = kLanes<A>;
  constexpr int NVP = 4;  // column blocks per group of the projection GEMM
  const RnnShape& s = args.s;
  if (s.B == 0) return;  // nothing to compute (and no zero-size buffers to copy)
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P, G = 4 * H;
  const bool proj = args.w_hr != nullptr;
  const int64_t unit_blocks = div_up(H, L);            // gates GEMM: K = P, 4 gate vectors per block
  const int64_t proj_groups = proj ? div_up(P, NVP * L) : 0;  // h = m @ W_hr^T: K = H
  const bool direct = read_in_place<4>(T, B, (G * P + (proj ? P * H : 0)) * int64_t(sizeof(A)));
  Scratch<A> panel(direct ? 0 : unit_blocks * panel_group_elems<A, 4>(P));
  Scratch<A> panel_r(direct ? 0 : proj_groups * panel_group_elems<A, NVP>(H));
  Scratch<A> hbuf(2 * B * P, kNaN<A>);  // h_{t-1} / h_t, alternating
  Scratch<A> mbuf(proj ? B * H : 0, kNaN<A>);

  const A* w = static_cast<const A*>(args.w_hh);
  const A* wr = static_cast<const A*>(args.w_hr);
  const A* bias = static_cast<const A*>(args.b_hh);
  const S* x_all = static_cast<const S*>(args.xproj);
  S* y_all = static_cast<S*>(args.y);
  S* gates_all = static_cast<S*>(args.gates);
  A* cs_all = static_cast<A*>(args.cs);
  A* c = static_cast<A*>(args.c_n);  // the running cell state ends as c_n
  A* m = mbuf.get();
  std::memcpy(hbuf.get(), args.h0, sizeof(A) * B * P);
  std::memcpy(c, args.c0, sizeof(A) * B * H);

  auto gate_col = [&](int64_t gr, int v) { return gate_column<A, 4>(gr, v, H); };
  auto proj_col = [&](int64_t gr, int v) { return block_column<A, NVP>(gr, v, P); };
  auto body = [&](int tid, int nt) {
    if (!direct) {
      pack_shared(tid, nt, unit_blocks, [&](int64_t g) {
        pack_transposed<A, 4>(w, P, P, g, gate_col, panel.get() + g * panel_group_elems<A, 4>(P));
      });
      if (proj) {
        pack_shared(tid, nt, proj_groups, [&](int64_t g) {
          pack_transposed<A, NVP>(wr, H, H, g, proj_col, panel_r.get() + g * panel_group_elems<A, NVP>(H));
        });
      }
      team_barrier();
    }
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = s.reverse ? T - 1 - step : step;
      const uint8_t* valid = s.valid + t * B;
      const A* hp = hbuf.get() + (step & 1) * B * P;
      A* hn = hbuf.get() + ((step + 1) & 1) * B * P;
      const S* x_t = x_all + t * B * G;
      S* y_t = y_all + t * B * P;
      // gates / cs are null for inference (save = false): nothing the backward needs is stored.
      S* g_t = gates_all ? gates_all + t * B * G : nullptr;
      A* cs_t = cs_all ? cs_all + t * B * H : nullptr;

      auto cell = [&](int64_t b, int64_t block, const V* acc) {
        const int64_t j0 = block * L;
        const int n = static_cast<int>(std::min<int64_t>(L, H - j0));
        S* g_b = g_t ? g_t + b * G + j0 : nullptr;
        if (!valid[b]) {  // padded step: state unchanged, zeros out
          if (g_b) {
            for (int k = 0; k < 4; ++k) vzero<A>(g_b + k * H, n);
            vzero<A>(cs_t + b * H + j0, n);
          }
          if (proj) {
            vzero<A>(m + b * H + j0, n);
          } else {
            vzero<A>(y_t + b * P + j0, n);
            vstore<A>(hn + b * P + j0, vload<A>(hp + b * P + j0, n), n);
          }
          return;
        }
        const S* x_b = x_t + b * G + j0;
        V pre[4];
        for (int k = 0; k < 4; ++k) {
          pre[k] = acc[k] + vload<A>(x_b + k * H, n);
          if (bias != nullptr) pre[k] = pre[k] + vload<A>(bias + k * H + j0, n);
        }
        A* c_b = c + b * H + j0;
        const auto st = lstm_cell_forward<V>(pre[0], pre[1], pre[2], pre[3], vload<A>(c_b, n));
        if (g_b) {
          vstore<A>(g_b, st.i, n);
          vstore<A>(g_b + H, st.f, n);
          vstore<A>(g_b + 2 * H, st.g, n);
          vstore<A>(g_b + 3 * H, st.o, n);
          vstore<A>(cs_t + b * H + j0, st.c, n);
        }
        vstore<A>(c_b, st.c, n);
        if (proj) {
          vstore<A>(m + b * H + j0, st.h, n);
        } else {
          vstore<A>(hn + b * P + j0, st.h, n);
          vstore<A>(y_t + b * P + j0, st.h, n);
        }
      };
      if (direct) {
        gemm_pass_direct<A, 4>(tid, nt, B, unit_blocks, hp, P, w, P, P, gate_col, valid, cell);
      } else {
        gemm_pass<A, 4>(tid, nt, B, unit_blocks, hp, P, panel.get(), P, valid, cell);
      }

      if (proj) {
        team_barrier();  // every unit's m before h = m @ W_hr^T
        auto project = [&](int64_t b, int64_t group, const V* acc) {
          for (int v = 0; v < NVP; ++v) {
            const Column col = block_column<A, NVP>(group, v, P);
            if (col.n == 0) break;
            if (valid[b]) {
              vstore<A>(hn + b * P + col.base, acc[v], col.n);
              vstore<A>(y_t + b * P + col.base, acc[v], col.n);
            } else {
              vstore<A>(hn + b * P + col.base, vload<A>(hp + b * P + col.base, col.n), col.n);
              vzero<A>(y_t + b * P + col.base, col.n);
            }
          }
        };
        if (direct) {
          gemm_pass_direct<A, NVP>(tid, nt, B, proj_groups, m, H, wr, H, H, proj_col, valid, project);
        } else {
          gemm_pass<A, NVP>(tid, nt, B, proj_groups, m, H, panel_r.get(), H, valid, project);
        }
      }
      team_barrier();  // h_t complete before step t+1 reads it
    }
  };
  run_team(s.threads, body);
  std::memcpy(args.h_n, hbuf.get() + (T & 1) * B * P, sizeof(A) * B * P);
}

template <typename S>
void lstm_bwd_impl(const LstmBwdArgs& args) {
  using A = acc_t<S>;
  using V = Vec<A>;
  constexpr int NV = 4;  // column blocks per group of the backward GEMMs
  const RnnShape& s = args.s;
  if (s.B == 0) return;  // nothing to compute (and no zero-size buffers to copy)
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P, G = 4 * H;
  const bool proj = args.w_hr != nullptr;
  const int64_t h_groups = div_up(P, NV * kLanes<A>);               // dh = dpre @ W_hh: K = G, N = P
  const int64_t m_groups = proj ? div_up(H, NV * kLanes<A>) : 0;    // dm = dh @ W_hr: K = P, N = H
  Scratch<A> panel(h_groups * panel_group_elems<A, NV>(G));
  Scratch<A> panel_r(m_groups * panel_group_elems<A, NV>(P));
  Scratch<A> dpre(2 * B * G, kNaN<A>);  // gradient of the pre-activations, alternating steps
  Scratch<A> carry(B * P, kNaN<A>);     // gradient reaching h_t from the later steps (dh_n first)
  Scratch<A> dtot(proj ? B * P : 0, kNaN<A>);
  Scratch<uint8_t> none(B);       // "no row valid": the step before the first backward step
  std::memset(none.get(), 0, static_cast<size_t>(B));

  const A* w = static_cast<const A*>(args.w_hh);
  const A* wr = static_cast<const A*>(args.w_hr);
  const A* c0 = static_cast<const A*>(args.c0);
  const A* cs_all = static_cast<const A*>(args.cs);
  const S* dy_all = static_cast<const S*>(args.dy);
  const S* gates_all = static_cast<const S*>(args.gates);
  S* dx_all = static_cast<S*>(args.dxproj);
  S* dhs_all = static_cast<S*>(args.dh_seq);
  A* dh0 = static_cast<A*>(args.dh0);
  A* dc = static_cast<A*>(args.dc0);  // the running cell gradient ends as dc0
  std::memcpy(carry.get(), args.dh_n, sizeof(A) * B * P);
  std::memcpy(dc, args.dc_n, sizeof(A) * B * H);

  auto body = [&](int tid, int nt) {
    pack_shared(tid, nt, h_groups, [&](int64_t g) {
      pack_rows<A, NV>(w, P, G, g, [&](int64_t gr, int v) { return block_column<A, NV>(gr, v, P); },
                       panel.get() + g * panel_group_elems<A, NV>(G));
    });
    if (proj) {
      pack_shared(tid, nt, m_groups, [&](int64_t g) {
        pack_rows<A, NV>(wr, H, P, g, [&](int64_t gr, int v) { return block_column<A, NV>(gr, v, H); },
                         panel_r.get() + g * panel_group_elems<A, NV>(P));
      });
    }
    team_barrier();
    for (int64_t step = 0; step <= T; ++step) {  // step T: only dh0 = dpre_0 @ W_hh remains
      // the forward's steps, last first; `prev` is the step processed just before this one
      const int64_t t = s.reverse ? step : T - 1 - step;
      const int64_t prev = s.reverse ? step - 1 : T - step;
      const uint8_t* pv = step == 0 ? none.get() : s.valid + prev * B;
      const A* dpre_prev = dpre.get() + ((step + 1) & 1) * B * G;
      A* dpre_cur = dpre.get() + (step & 1) * B * G;

      // dh reaching h (of step t) for the lanes [p0, p0 + n) of row b
      auto dh_in = [&](int64_t b, const V& acc, int64_t p0, int n) {
        A* car = carry.get() + b * P + p0;
        const V d = pv[b] ? acc : vload<A>(car, n);
        vstore<A>(car, d, n);
        return d;
      };
      if (step == T) {
        auto final_dh = [&](int64_t b, int64_t group, const V* acc) {
          for (int v = 0; v < NV; ++v) {
            const Column col = block_column<A, NV>(group, v, P);
            if (col.n == 0) break;
            vstore<A>(dh0 + b * P + col.base, dh_in(b, acc[v], col.base, col.n), col.n);
          }
        };
        gemm_pass<A, NV>(tid, nt, B, h_groups, dpre_prev, G, panel.get(), G, pv, final_dh);
        break;
      }

      const uint8_t* valid = s.valid + t * B;
      const S* dy_t = dy_all + t * B * P;
      const S* g_t = gates_all + t * B * G;
      const A* cs_t = cs_all + t * B * H;
      S* dx_t = dx_all + t * B * G;
      // cell backward of step t for units [j0, j0 + n) of row b, given the gradient dm reaching m_t
      auto cell_bwd = [&](int64_t b, int64_t j0, int n, const V& dm) {
        A* dp_b = dpre_cur + b * G + j0;
        S* dx_b = dx_t + b * G + j0;
        const S* g_b = g_t + b * G + j0;
        // c_{t-1}: the neighbouring step in the forward's order, or c0 at the sequence's first step
        const A* c_prev;
        if (!s.reverse) {
          c_prev = t > 0 ? cs_all + (t - 1) * B * H : c0;
        } else {
          c_prev = (t + 1 < T && s.valid[(t + 1) * B + b]) ? cs_all + (t + 1) * B * H : c0;
        }
        A* dc_b = dc + b * H + j0;
        const auto d = lstm_cell_backward<V>(vload<A>(g_b, n), vload<A>(g_b + H, n), vload<A>(g_b + 2 * H, n),
                                             vload<A>(g_b + 3 * H, n), vload<A>(cs_t + b * H + j0, n),
                                             vload<A>(c_prev + b * H + j0, n), dm, vload<A>(dc_b, n));
        const V dk[4] = {d.d_i, d.d_f, d.d_g, d.d_o};
        for (int k = 0; k < 4; ++k) {
          vstore<A>(dp_b + k * H, dk[k], n);
          vstore<A>(dx_b + k * H, dk[k], n);
        }
        vstore<A>(dc_b, d.dc_prev, n);
      };
      auto padded = [&](int64_t b, int64_t j0, int n) {  // zeros out; dh, dc pass through
        for (int k = 0; k < 4; ++k) {
          vzero<A>(dpre_cur + b * G + j0 + k * H, n);
          vzero<A>(dx_t + b * G + j0 + k * H, n);
        }
      };

      if (!proj) {
        auto fused = [&](int64_t b, int64_t group, const V* acc) {
          for (int v = 0; v < NV; ++v) {
            const Column col = block_column<A, NV>(group, v, H);
            if (col.n == 0) break;
            const V d = dh_in(b, acc[v], col.base, col.n);
            if (valid[b]) {
              cell_bwd(b, col.base, col.n, d + vload<A>(dy_t + b * P + col.base, col.n));
            } else {
              padded(b, col.base, col.n);
            }
          }
        };
        gemm_pass<A, NV>(tid, nt, B, h_groups, dpre_prev, G, panel.get(), G, pv, fused);
      } else {
        S* dhs_t = dhs_all + t * B * P;
        auto total = [&](int64_t b, int64_t group, const V* acc) {
          for (int v = 0; v < NV; ++v) {
            const Column col = block_column<A, NV>(group, v, P);
            if (col.n == 0) break;
            const V d = dh_in(b, acc[v], col.base, col.n);
            A* dt_b = dtot.get() + b * P + col.base;
            if (valid[b]) {
              const V tot = d + vload<A>(dy_t + b * P + col.base, col.n);
              vstore<A>(dt_b, tot, col.n);
              vstore<A>(dhs_t + b * P + col.base, tot, col.n);
            } else {
              vzero<A>(dt_b, col.n);
              vzero<A>(dhs_t + b * P + col.base, col.n);
            }
          }
        };
        gemm_pass<A, NV>(tid, nt, B, h_groups, dpre_prev, G, panel.get(), G, pv, total);
        team_barrier();  // the whole dh_t before dm_t = dh_t @ W_hr
        auto through_proj = [&](int64_t b, int64_t group, const V* acc) {
          for (int v = 0; v < NV; ++v) {
            const Column col = block_column<A, NV>(group, v, H);
            if (col.n == 0) break;
            if (valid[b]) {
              cell_bwd(b, col.base, col.n, acc[v]);
            } else {
              padded(b, col.base, col.n);
            }
          }
        };
        gemm_pass<A, NV>(tid, nt, B, m_groups, dtot.get(), P, panel_r.get(), P, valid, through_proj);
      }
      team_barrier();  // dpre_t complete before the next step's GEMM
    }
  };
  run_team(s.threads, body);
}

// ============================================================================================= GRU
template <typename S>
void gru_fwd_impl(const GruFwdArgs& args) {
  using A = acc_t<S>;
  using V = Vec<A>;
  constexpr int L = kLanes<A>;
  const RnnShape& s = args.s;
  if (s.B == 0) return;  // nothing to compute (and no zero-size buffers to copy)
  const int64_t T = s.T, B = s.B, H = s.H, G = 3 * H;
  const int64_t unit_blocks = div_up(H, L);  // K = H, 3 gate vectors per block
  const bool direct = read_in_place<3>(T, B, G * H * int64_t(sizeof(A)));  // no panel: W_hh in place
  Scratch<A> panel(direct ? 0 : unit_blocks * panel_group_elems<A, 3>(H));
  Scratch<A> hbuf(2 * B * H, kNaN<A>);

  const A* w = static_cast<const A*>(args.w_hh);
  const A* bias = static_cast<const A*>(args.b_hh);
  const S* x_all = static_cast<const S*>(args.xproj);
  S* y_all = static_cast<S*>(args.y);
  S* gates_all = static_cast<S*>(args.gates);
  std::memcpy(hbuf.get(), args.h0, sizeof(A) * B * H);

  auto gate_col = [&](int64_t gr, int v) { return gate_column<A, 3>(gr, v, H); };
  auto body = [&](int tid, int nt) {
    if (!direct) {
      pack_shared(tid, nt, unit_blocks, [&](int64_t g) {
        pack_transposed<A, 3>(w, H, H, g, gate_col, panel.get() + g * panel_group_elems<A, 3>(H));
      });
      team_barrier();
    }
    for (int64_t step = 0; step < T; ++step) {
      const int64_t t = s.reverse ? T - 1 - step : step;
      const uint8_t* valid = s.valid + t * B;
      const A* hp = hbuf.get() + (step & 1) * B * H;
      A* hn = hbuf.get() + ((step + 1) & 1) * B * H;
      const S* x_t = x_all + t * B * G;
      S* y_t = y_all + t * B * H;
      S* g_t = gates_all ? gates_all + t * B * 4 * H : nullptr;  // null: inference (save = false)
      auto cell = [&](int64_t b, int64_t block, const V* acc) {
        const int64_t j0 = block * L;
        const int n = static_cast<int>(std::min<int64_t>(L, H - j0));
        S* g_b = g_t ? g_t + b * 4 * H + j0 : nullptr;
        if (!valid[b]) {  // padded step: state unchanged, zeros out
          if (g_b) {
            for (int k = 0; k < 4; ++k) vzero<A>(g_b + k * H, n);
          }
          vzero<A>(y_t + b * H + j0, n);
          vstore<A>(hn + b * H + j0, vload<A>(hp + b * H + j0, n), n);
          return;
        }
        V hid[3];
        for (int k = 0; k < 3; ++k) {
          hid[k] = acc[k];
          if (bias != nullptr) hid[k] = hid[k] + vload<A>(bias + k * H + j0, n);
        }
        const S* x_b = x_t + b * G + j0;
        const auto st = gru_cell_forward<V>(vload<A>(x_b, n), vload<A>(x_b + H, n), vload<A>(x_b + 2 * H, n), hid[0],
                                            hid[1], hid[2], vload<A>(hp + b * H + j0, n));
        if (g_b) {
          vstore<A>(g_b, st.r, n);
          vstore<A>(g_b + H, st.z, n);
          vstore<A>(g_b + 2 * H, st.n, n);
          vstore<A>(g_b + 3 * H, hid[2], n);
        }
        vstore<A>(hn + b * H + j0, st.h, n);
        vstore<A>(y_t + b * H + j0, st.h, n);
      };
      if (direct) {
        gemm_pass_direct<A, 3>(tid, nt, B, unit_blocks, hp, H, w, H, H, gate_col, valid, cell);
      } else {
        gemm_pass<A, 3>(tid, nt, B, unit_blocks, hp, H, panel.get(), H, valid, cell);
      }
      team_barrier();
    }
  };
  run_team(s.threads, body);
  std::memcpy(args.h_n, hbuf.get() + (T & 1) * B * H, sizeof(A) * B * H);
}

template <typename S>
void gru_bwd_impl(const GruBwdArgs& args) {
  using A = acc_t<S>;
  using V = Vec<A>;
  constexpr int NV = 4;
  const RnnShape& s = args.s;
  if (s.B == 0) return;  // nothing to compute (and no zero-size buffers to copy)
  const int64_t T = s.T, B = s.B, H = s.H, G = 3 * H;
  const int64_t groups = div_up(H, NV * kLanes<A>);  // dh = dhp @ W_hh: K = 3H, N = H
  Scratch<A> panel(groups * panel_group_elems<A, NV>(G));
  Scratch<A> dhp(2 * B * G, kNaN<A>);  // gradient of h_{t-1} @ W_hh^T + b_hh, alternating steps
  Scratch<A> carry(B * H, kNaN<A>);    // gradient reaching h_t from the later steps (dh_n first)
  Scratch<A> direct(B * H, kNaN<A>);   // dh_t * z_t: the direct path to h_{t-1}
  Scratch<uint8_t> none(B);
  std::memset(none.get(), 0, static_cast<size_t>(B));

  const A* w = static_cast<const A*>(args.w_hh);
  const A* h0 = static_cast<const A*>(args.h0);
  const S* dy_all = static_cast<const S*>(args.dy);
  const S* y_all = static_cast<const S*>(args.y);
  const S* gates_all = static_cast<const S*>(args.gates);
  S* dx_all = static_cast<S*>(args.dxproj);
  S* dhn_all = static_cast<S*>(args.dhn);
  A* dh0 = static_cast<A*>(args.dh0);
  std::memcpy(carry.get(), args.dh_n, sizeof(A) * B * H);

  auto body = [&](int tid, int nt) {
    pack_shared(tid, nt, groups, [&](int64_t g) {
      pack_rows<A, NV>(w, H, G, g, [&](int64_t gr, int v) { return block_column<A, NV>(gr, v, H); },
                       panel.get() + g * panel_group_elems<A, NV>(G));
    });
    team_barrier();
    for (int64_t step = 0; step <= T; ++step) {  // step T: only dh0 remains
      const int64_t t = s.reverse ? step : T - 1 - step;
      const int64_t prev = s.reverse ? step - 1 : T - step;
      const uint8_t* pv = step == 0 ? none.get() : s.valid + prev * B;
      const A* dhp_prev = dhp.get() + ((step + 1) & 1) * B * G;
      A* dhp_cur = dhp.get() + (step & 1) * B * G;
      auto dh_in = [&](int64_t b, const V& acc, int64_t j0, int n) {
        A* car = carry.get() + b * H + j0;
        const V d = pv[b] ? acc + vload<A>(direct.get() + b * H + j0, n) : vload<A>(car, n);
        vstore<A>(car, d, n);
        return d;
      };
      if (step == T) {
        auto final_dh = [&](int64_t b, int64_t group, const V* acc) {
          for (int v = 0; v < NV; ++v) {
            const Column col = block_column<A, NV>(group, v, H);
            if (col.n == 0) break;
            vstore<A>(dh0 + b * H + col.base, dh_in(b, acc[v], col.base, col.n), col.n);
          }
        };
        gemm_pass<A, NV>(tid, nt, B, groups, dhp_prev, G, panel.get(), G, pv, final_dh);
        break;
      }
      const uint8_t* valid = s.valid + t * B;
      const S* dy_t = dy_all + t * B * H;
      const S* g_t = gates_all + t * B * 4 * H;
      S* dx_t = dx_all + t * B * G;
      S* dhn_t = dhn_all + t * B * H;
      auto fused = [&](int64_t b, int64_t group, const V* acc) {
        for (int v = 0; v < NV; ++v) {
          const Column col = block_column<A, NV>(group, v, H);
          if (col.n == 0) break;
          const int64_t j0 = col.base;
          const int n = col.n;
          const V d_in = dh_in(b, acc[v], j0, n);
          A* dp_b = dhp_cur + b * G + j0;
          S* dx_b = dx_t + b * G + j0;
          if (!valid[b]) {  // zeros out; dh passes through
            for (int k = 0; k < 3; ++k) {
              vzero<A>(dp_b + k * H, n);
              vzero<A>(dx_b + k * H, n);
            }
            vzero<A>(dhn_t + b * H + j0, n);
            continue;
          }
          // h_{t-1}: the forward's previous output (rounded, as saved), or h0 at the sequence's start
          const S* y_prev = nullptr;
          if (!s.reverse) {
            if (t > 0) y_prev = y_all + (t - 1) * B * H;
          } else if (t + 1 < T && s.valid[(t + 1) * B + b]) {
            y_prev = y_all + (t + 1) * B * H;
          }
          const V h_prev = y_prev != nullptr ? vload<A>(y_prev + b * H + j0, n) : vload<A>(h0 + b * H + j0, n);
          const S* g_b = g_t + b * 4 * H + j0;
          const auto d = gru_cell_backward<V>(vload<A>(g_b, n), vload<A>(g_b + H, n), vload<A>(g_b + 2 * H, n),
                                              vload<A>(g_b + 3 * H, n), h_prev,
                                              d_in + vload<A>(dy_t + b * H + j0, n));
          vstore<A>(dp_b, d.d_r, n);
          vstore<A>(dp_b + H, d.d_z, n);
          vstore<A>(dp_b + 2 * H, d.d_hid_n, n);
          vstore<A>(dx_b, d.d_r, n);
          vstore<A>(dx_b + H, d.d_z, n);
          vstore<A>(dx_b + 2 * H, d.d_n, n);
          vstore<A>(dhn_t + b * H + j0, d.d_hid_n, n);
          vstore<A>(direct.get() + b * H + j0, d.dh_prev_direct, n);
        }
      };
      gemm_pass<A, NV>(tid, nt, B, groups, dhp_prev, G, panel.get(), G, pv, fused);
      team_barrier();
    }
  };
  run_team(s.threads, body);
}

// =========================================================================================== cells
// fn(b, j0, n) over the B x H units in blocks of L, rows split over the team.
template <typename A, class F>
inline void for_units(const CellShape& s, F&& fn) {
  constexpr int L = kLanes<A>;
  auto body = [&](int tid, int nt) {
    const Range rows = split(s.B, tid, nt);
    for (int64_t b = rows.begin; b < rows.end; ++b) {
      for (int64_t j0 = 0; j0 < s.H; j0 += L) fn(b, j0, static_cast<int>(std::min<int64_t>(L, s.H - j0)));
    }
  };
  run_team(s.threads, body);
}

template <typename S>
void lstm_cell_fwd_impl(const LstmCellFwdArgs& a) {
  using A = acc_t<S>;
  using V = Vec<A>;
  const int64_t H = a.s.H, G = 4 * H;
  const S* xi = static_cast<const S*>(a.igates);
  const S* xh = static_cast<const S*>(a.hgates);
  const A* bi = static_cast<const A*>(a.b_ih);
  const A* bh = static_cast<const A*>(a.b_hh);
  const A* c = static_cast<const A*>(a.c);
  S* h_o = static_cast<S*>(a.h_new);
  S* c_o = static_cast<S*>(a.c_new);
  S* g_o = static_cast<S*>(a.gates);
  for_units<A>(a.s, [&](int64_t b, int64_t j0, int n) {
    V pre[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t q = k * H + j0;
      pre[k] = vload<A>(xi + b * G + q, n) + vload<A>(xh + b * G + q, n);
      if (bi != nullptr) pre[k] = pre[k] + vload<A>(bi + q, n);
      if (bh != nullptr) pre[k] = pre[k] + vload<A>(bh + q, n);
    }
    const auto st = lstm_cell_forward<V>(pre[0], pre[1], pre[2], pre[3], vload<A>(c + b * H + j0, n));
    S* g_b = g_o + b * G + j0;
    vstore<A>(g_b, st.i, n);
    vstore<A>(g_b + H, st.f, n);
    vstore<A>(g_b + 2 * H, st.g, n);
    vstore<A>(g_b + 3 * H, st.o, n);
    vstore<A>(c_o + b * H + j0, st.c, n);
    vstore<A>(h_o + b * H + j0, st.h, n);
  });
}

template <typename S>
void lstm_cell_bwd_impl(const LstmCellBwdArgs& a) {
  using A = acc_t<S>;
  using V = Vec<A>;
  const int64_t H = a.s.H, G = 4 * H;
  const A* dh = static_cast<const A*>(a.dh_new);
  const A* dcn = static_cast<const A*>(a.dc_new);
  const A* c = static_cast<const A*>(a.c);
  const A* cn = static_cast<const A*>(a.c_new);
  const S* g = static_cast<const S*>(a.gates);
  S* dg_o = static_cast<S*>(a.dgates);
  S* dc_o = static_cast<S*>(a.dc);
  for_units<A>(a.s, [&](int64_t b, int64_t j0, int n) {
    const int64_t u = b * H + j0;
    const S* g_b = g + b * G + j0;
    const auto d = lstm_cell_backward<V>(vload<A>(g_b, n), vload<A>(g_b + H, n), vload<A>(g_b + 2 * H, n),
                                         vload<A>(g_b + 3 * H, n), vload<A>(cn + u, n), vload<A>(c + u, n),
                                         vload<A>(dh + u, n), vload<A>(dcn + u, n));
    S* d_b = dg_o + b * G + j0;
    vstore<A>(d_b, d.d_i, n);
    vstore<A>(d_b + H, d.d_f, n);
    vstore<A>(d_b + 2 * H, d.d_g, n);
    vstore<A>(d_b + 3 * H, d.d_o, n);
    vstore<A>(dc_o + u, d.dc_prev, n);
  });
}

template <typename S>
void gru_cell_fwd_impl(const GruCellFwdArgs& a) {
  using A = acc_t<S>;
  using V = Vec<A>;
  const int64_t H = a.s.H, G = 3 * H;
  const S* xi = static_cast<const S*>(a.igates);
  const S* xh = static_cast<const S*>(a.hgates);
  const A* bi = static_cast<const A*>(a.b_ih);
  const A* bh = static_cast<const A*>(a.b_hh);
  const A* h = static_cast<const A*>(a.h);
  S* h_o = static_cast<S*>(a.h_new);
  S* g_o = static_cast<S*>(a.gates);
  for_units<A>(a.s, [&](int64_t b, int64_t j0, int n) {
    V x[3], hid[3];
    for (int k = 0; k < 3; ++k) {
      const int64_t q = k * H + j0;
      x[k] = vload<A>(xi + b * G + q, n);
      if (bi != nullptr) x[k] = x[k] + vload<A>(bi + q, n);
      hid[k] = vload<A>(xh + b * G + q, n);
      if (bh != nullptr) hid[k] = hid[k] + vload<A>(bh + q, n);
    }
    const auto st = gru_cell_forward<V>(x[0], x[1], x[2], hid[0], hid[1], hid[2], vload<A>(h + b * H + j0, n));
    S* g_b = g_o + b * 4 * H + j0;
    vstore<A>(g_b, st.r, n);
    vstore<A>(g_b + H, st.z, n);
    vstore<A>(g_b + 2 * H, st.n, n);
    vstore<A>(g_b + 3 * H, hid[2], n);
    vstore<A>(h_o + b * H + j0, st.h, n);
  });
}

template <typename S>
void gru_cell_bwd_impl(const GruCellBwdArgs& a) {
  using A = acc_t<S>;
  using V = Vec<A>;
  const int64_t H = a.s.H, G = 3 * H;
  const A* dh = static_cast<const A*>(a.dh_new);
  const A* h = static_cast<const A*>(a.h);
  const S* g = static_cast<const S*>(a.gates);
  S* di_o = static_cast<S*>(a.d_i);
  S* dh_o = static_cast<S*>(a.d_h);
  S* dprev_o = static_cast<S*>(a.dh);
  for_units<A>(a.s, [&](int64_t b, int64_t j0, int n) {
    const int64_t u = b * H + j0;
    const S* g_b = g + b * 4 * H + j0;
    const auto d = gru_cell_backward<V>(vload<A>(g_b, n), vload<A>(g_b + H, n), vload<A>(g_b + 2 * H, n),
                                        vload<A>(g_b + 3 * H, n), vload<A>(h + u, n), vload<A>(dh + u, n));
    S* di_b = di_o + b * G + j0;
    S* dh_b = dh_o + b * G + j0;
    vstore<A>(di_b, d.d_r, n);
    vstore<A>(dh_b, d.d_r, n);
    vstore<A>(di_b + H, d.d_z, n);
    vstore<A>(dh_b + H, d.d_z, n);
    vstore<A>(di_b + 2 * H, d.d_n, n);
    vstore<A>(dh_b + 2 * H, d.d_hid_n, n);
    vstore<A>(dprev_o + u, d.dh_prev_direct, n);
  });
}

// ===================================================================================== activations
template <typename A>
void activation_impl(Activation fn, const A* x, A* y, int64_t count) {
  using V = Vec<A>;
  constexpr int L = kLanes<A>;
  for (int64_t i = 0; i < count; i += L) {
    const int n = static_cast<int>(std::min<int64_t>(L, count - i));
    const V v = vload<A>(x + i, n);
    V r;
    switch (fn) {
      case Activation::kExp:
        r = exp_(v);
        break;
      case Activation::kSigmoid:
        r = sigmoid<V>(v);
        break;
      case Activation::kTanh:
        r = tanh_(v);
        break;
      case Activation::kDSigmoid:
        r = dsigmoid_from_value<V>(sigmoid<V>(v));
        break;
      case Activation::kDTanh:
        r = dtanh_from_value<V>(tanh_(v));
        break;
    }
    vstore<A>(y + i, r, n);
  }
}

// ========================================================================================= entries
#define FUSEDRNN_CPU_ENTRY(name, Args)                                                 \
  inline void name##_entry(const Args& a) {                                            \
    dispatch_dtype(a.s.dtype, [&](auto tag) { name##_impl<std::remove_pointer_t<decltype(tag)>>(a); }); \
  }
FUSEDRNN_CPU_ENTRY(lstm_fwd, LstmFwdArgs)
FUSEDRNN_CPU_ENTRY(lstm_bwd, LstmBwdArgs)
FUSEDRNN_CPU_ENTRY(gru_fwd, GruFwdArgs)
FUSEDRNN_CPU_ENTRY(gru_bwd, GruBwdArgs)
FUSEDRNN_CPU_ENTRY(lstm_cell_fwd, LstmCellFwdArgs)
FUSEDRNN_CPU_ENTRY(lstm_cell_bwd, LstmCellBwdArgs)
FUSEDRNN_CPU_ENTRY(gru_cell_fwd, GruCellFwdArgs)
FUSEDRNN_CPU_ENTRY(gru_cell_bwd, GruCellBwdArgs)
#undef FUSEDRNN_CPU_ENTRY

inline void activation_entry(Activation fn, ScalarKind kind, const void* x, void* y, int64_t n) {
  if (kind == ScalarKind::kDouble) {
    activation_impl<double>(fn, static_cast<const double*>(x), static_cast<double*>(y), n);
  } else {
    activation_impl<float>(fn, static_cast<const float*>(x), static_cast<float*>(y), n);
  }
}

// The table of this ISA: constant-initialised (no code runs when the library loads, so an ISA the
// CPU lacks is never executed unless the dispatcher picks it).
constexpr Kernels kTable = {FUSEDRNN_CPU_ISA_NAME,
                            &lstm_fwd_entry,
                            &lstm_bwd_entry,
                            &gru_fwd_entry,
                            &gru_bwd_entry,
                            &lstm_cell_fwd_entry,
                            &lstm_cell_bwd_entry,
                            &gru_cell_fwd_entry,
                            &gru_cell_bwd_entry,
                            &activation_entry,
                            &reads_in_place_entry};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace fusedrnn
