// Launch planning of the persistent CUDA recurrence kernels (csrc/cuda), in plain C++: no CUDA
// runtime, no device needed.  This is the ONE place that decides
//   * whether a pass (LSTM/GRU, forward/backward) of hidden size H and h size P fits a device
//     (an analytic model of shared memory, registers, threads per SM and co-residency, read from
//     a DeviceRecord: the fields of torch.cuda.get_device_properties()),
//   * the launch geometry (units per CTA, batch groups, n-tiles, exchange protocol), chosen by a
//     per-step cost model among the geometries that fit,
//   * the limits max_hidden / max_proj that fusedrnn.max_hidden_size reports and that `auto`
//     falls back on.
// csrc/cuda/*.cu launch exactly the plan computed here (and, on a real device, confirm the fit
// with the occupancy API: a disagreement is an internal error, never a silent fallback); the
// Python side calls the same functions through fusedrnn._C (csrc/ops.cpp), also in a CPU-only
// build, so limits for an H100/H200/A100 are computed and tested on a machine without a GPU.
//
// Kernel structure the model describes (details in csrc/cuda/common.cuh and the .cu files):
// 256 threads (8 warps) per CTA, one CTA per SM (__launch_bounds__(256, 1): at most 255 registers
// per thread, so one CTA always fits the 64 K registers of an SM).  The grid is gu x gb CTAs: gu
// "unit slices" (CTA owns U hidden units with all their gates, and the matching W slice in
// shared memory for the whole sequence) times gb batch groups (CTA (iu, ib) serves batch rows
// [ib*Bg, ib*Bg + Bg); groups are independent recurrences that never wait for each other).
// Per step and pass, out = W_slice . X^T with X (h_{t-1}, m_t, dh_tot or dpre_t, exchanged through
// L2) split over the warps in 32-wide K chunks, partials reduced in shared memory, then the
// pointwise cell.  Exchange protocol between steps:
//   kBarrier  plain stores, a per-group arrive/wait barrier (release after the exchange stores
//             only, non-critical stores between arrive and wait, relaxed spin + one acquire);
//   kFlags    no barrier: each exchanged element travels with its step tag in one single-copy-
//             atomic word (16-bit value + 16-bit tag in 32 bits; fp32 value + 32-bit tag in 64
//             bits), stored with st.relaxed, polled with ld.relaxed until the tag matches.  Twice
//             the exchange bytes, no fence, no atomic, no barrier (tensor-core engines only).
// Besides the persistent kernels there is a *stepwise* strategy (csrc/cuda/stepwise.cu): per step
// one tensor-core GEMM over the whole batch (cuBLAS through ATen, fp32 output) and one pointwise
// kernel.  It streams W_hh from L2 every step instead of keeping it on chip, so it wins only where
// the persistent kernels' exchange traffic (unit slices x B x K per step) exceeds that: large
// batches.  bf16/fp16 without projection; chosen by the same cost model, never needed for a fit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace fusedrnn {
namespace plan {

constexpr int kThreads = 256;  // threads per CTA (8 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kMaxMT = 4;      // m-tiles (16 rows) per W slice
constexpr int kChunk = 32;     // K granularity of the engines
constexpr int kMaxItems = 2;   // pointwise items per thread per wave (records kept in registers)
// Shared memory the driver reserves per CTA on sm_80 and newer (cudaDevAttrReservedSharedMemoryPerBlock).
constexpr int64_t kReservedSmemPerBlock = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t align16(int64_t x) { return (x + 15) & ~int64_t(15); }

// ------------------------------------------------------------------------------- device record
// The fields of torch.cuda.get_device_properties() the planner reads (same names there).
struct DeviceRecord {
  std::string name;
  int major = 0, minor = 0;
  int multi_processor_count = 0;
  int64_t shared_memory_per_block_optin = 0;
  int64_t shared_memory_per_multiprocessor = 0;
  int64_t regs_per_multiprocessor = 0;
  int max_threads_per_multi_processor = 0;
  int64_t total_memory = 0;
  int64_t L2_cache_size = 0;
  int warp_size = 32;
  bool cooperative_launch = true;  // not in torch's properties; false only when the runtime says so
};

// ------------------------------------------------------------------------------------- engines
// Tensor-core engines for bf16/fp16 (m16n8k16) and fp32 with TF32 (m16n8k8); plain FMA for fp32
// without TF32 and for fp64.  Shared-memory formulas below are used by the engines themselves.
enum class Engine : int { kMma16 = 0, kTf32 = 1, kFma32 = 2, kFma64 = 3 };

inline int elem_bytes(Engine e) { return e == Engine::kMma16 ? 2 : (e == Engine::kFma64 ? 8 : 4); }
inline int acc_bytes(Engine e) { return e == Engine::kFma64 ? 8 : 4; }
inline bool tensor_cores(Engine e) { return e == Engine::kMma16 || e == Engine::kTf32; }
inline const char* engine_name(Engine e) {
  switch (e) {
    case Engine::kMma16: return "mma16";
    case Engine::kTf32: return "tf32";
    case Engine::kFma32: return "fma32";
    default: return "fma64";
  }
}
// Engines (and n-tiles) that have a flag-exchange kernel: the tensor-core engines, except TF32 with
// 4 n-tiles (its 64-bit flag words for 4 x 8 rows do not fit the registers without spilling).
inline bool flags_ok(Engine e, int nt) { return e == Engine::kMma16 || (e == Engine::kTf32 && nt <= 2); }
// Batch columns per pass: 8 per n-tile (FMA: one 8-column tile).
inline int bn_of(Engine e, int nt) { return tensor_cores(e) ? 8 * nt : 8; }
// Bytes of one W slice of MT m-tiles x KC chunks in shared memory (fragment order for tensor
// cores: exactly rows x K x element; FMA: rows of K + 1 elements, conflict-free column reads).
inline int64_t w_bytes(Engine e, int MT, int KC) {
  if (tensor_cores(e)) return int64_t(MT) * 16 * KC * kChunk * elem_bytes(e);
  return int64_t(MT) * 16 * (int64_t(KC) * kChunk + 1) * elem_bytes(e);
}
// FMA engine: each warp stages its 32 x 8 operand chunk in shared memory and broadcasts it from
// there (in the partial-sum buffer, which is written only after a CTA barrier that ends the
// K loop).
inline int64_t stage_bytes(Engine e) { return tensor_cores(e) ? 0 : int64_t(kWarps) * kChunk * 8 * elem_bytes(e); }
// Per-warp partial sums of one pass (kWarps x rows x BN in the accumulation type; FMA: at least
// the operand stage).
inline int64_t red_bytes(Engine e, int max_mt, int bn) {
  return std::max(int64_t(kWarps) * max_mt * 16 * bn * acc_bytes(e), stage_bytes(e));
}
// Operand chunks a warp keeps in flight (register double-buffering depth of the engines).
inline int load_depth(Engine e, int nt) {
  if (e == Engine::kMma16) return nt >= 4 ? 2 : (nt == 2 ? 4 : 8);
  if (e == Engine::kTf32) return nt >= 4 ? 1 : (nt == 2 ? 2 : 4);
  return 1;
}

// ----------------------------------------------------------------------------------- the plan
enum class Pass : int { kLstmFwd = 0, kLstmBwd = 1, kGruFwd = 2, kGruBwd = 3 };
enum class Sync : int { kBarrier = 0, kFlags = 1 };

inline bool is_lstm(Pass p) { return p == Pass::kLstmFwd || p == Pass::kLstmBwd; }
inline bool is_fwd(Pass p) { return p == Pass::kLstmFwd || p == Pass::kGruFwd; }
inline int gates_of(Pass p) { return is_lstm(p) ? 4 : 3; }
inline const char* pass_name(Pass p) {
  switch (p) {
    case Pass::kLstmFwd: return "lstm_fwd";
    case Pass::kLstmBwd: return "lstm_bwd";
    case Pass::kGruFwd: return "gru_fwd";
    default: return "gru_bwd";
  }
}

struct Slice {
  int MT = 0;  // m-tiles (rows padded to 16*MT)
  int KC = 0;  // 32-wide K chunks (K padded to 32*KC)
};
inline Slice slice_of(int64_t rows, int64_t K) {
  return Slice{static_cast<int>(ceil_div(rows, 16)), static_cast<int>(ceil_div(K, kChunk))};
}

// Predicted microseconds per time step, split by what limits it (see cost() below).
struct Cost {
  double mma_us = 0;     // tensor-core / FMA issue (per CTA), or the dependent-MMA chain if longer
  double smem_us = 0;    // shared-memory reads: W fragments + partial-sum reduction
  double l2_us = 0;      // exchange bytes from L2: per-SM bandwidth or the grid's aggregate
  double lat_us = 0;     // dependent L2 round trips of the operand loads
  double cell_us = 0;    // pointwise epilogues (partial sums, cell math, stores)
  double sync_us = 0;    // grid barrier(s), or the flag round trip
  double hbm_us = 0;     // HBM bytes of the step (xproj in; y, saved tensors out): a floor, overlapped
  double step_us = 0;    // the prediction: lat + max(mma, smem, l2) + cell per pass, + sync; >= hbm
};

struct Plan {
  bool ok = false;
  std::string why;        // !ok: what does not fit
  Pass pass = Pass::kLstmFwd;
  Engine engine = Engine::kMma16;
  Sync sync = Sync::kBarrier;
  bool legacy = false;    // the round-1 plan and barrier (all stores before the release; acquire spin)
  bool stepwise = false;  // per-step GEMM + pointwise kernel instead of a persistent kernel
  int U = 0;              // hidden units per CTA (pointwise owner; forward: W_hh rows gate*H + u)
  int Up = 0;             // P-rows per CTA (forward projection W_hr; backward W_hh^T rows)
  int gu = 0;             // unit slices (CTAs per batch group)
  int gb = 0;             // batch groups
  int64_t Bg = 0;         // batch rows per group (the last group may have fewer)
  int nt = 1;             // n-tiles per pass (BN = 8 * nt)
  int grid = 0;           // gu * gb
  Slice a, b;             // forward: a = W_hh slice (G*U x P), b = W_hr slice (Up x H);
                          // backward: a = W_hh^T slice (Up x G*H), b = W_hr^T slice (U x P)
  int64_t smem = 0;       // dynamic shared memory per CTA
  int ctas_per_sm = 0;    // analytic co-residency at this smem
  Cost cost;
};

// Planner switches (environment, read per call so a benchmark can compare geometries in one
// process): FUSEDRNN_CUDA_PLAN = auto (default: persistent or stepwise by the cost model) |
// persistent (never stepwise) | legacy (round-1 geometry and barrier) | barrier | flags (that
// exchange protocol where the engine has it) | stepwise (where available) ;
// FUSEDRNN_CUDA_GROUPS = n (force n batch groups where n fits).  Never changes results beyond
// rounding-order differences of the fp32 sums.
struct Options {
  enum Mode { kAuto = 0, kLegacy = 1, kBarrierOnly = 2, kFlagsOnly = 3, kPersistent = 4, kStepwise = 5 } mode = kAuto;
  int groups = 0;
  // Unknown values raise (std::invalid_argument): a mistyped variant must not silently run another.
  static Options from_env() {
    Options o;
    if (const char* v = std::getenv("FUSEDRNN_CUDA_PLAN")) {
      if (!*v || !std::strcmp(v, "auto")) o.mode = kAuto;
      else if (!std::strcmp(v, "legacy")) o.mode = kLegacy;
      else if (!std::strcmp(v, "barrier")) o.mode = kBarrierOnly;
      else if (!std::strcmp(v, "flags")) o.mode = kFlagsOnly;
      else if (!std::strcmp(v, "persistent")) o.mode = kPersistent;
      else if (!std::strcmp(v, "stepwise")) o.mode = kStepwise;
      else
        throw std::invalid_argument(std::string("fusedrnn: FUSEDRNN_CUDA_PLAN must be auto, persistent, legacy, "
                                                "barrier, flags or stepwise, got '") + v + "'");
    }
    if (const char* g = std::getenv("FUSEDRNN_CUDA_GROUPS")) {
      char* end = nullptr;
      const long n = std::strtol(g, &end, 10);
      if (*g && (*end || n < 0))
        throw std::invalid_argument(std::string("fusedrnn: FUSEDRNN_CUDA_GROUPS must be a number >= 0, got '") + g +
                                    "'");
      o.groups = static_cast<int>(n);
    }
    return o;
  }
};

// -------------------------------------------------------------------- analytic co-residency
// CTAs of kThreads threads and `smem` bytes of dynamic shared memory one SM holds at once:
// shared memory (the CTA's plus the driver's reservation), registers (the kernels are compiled
// with __launch_bounds__(kThreads, 1), so the compiler caps them at min(255, regs/kThreads) per
// thread; allocation granularity 8 per thread), threads, and the 32-CTA hardware limit.
inline int ctas_per_sm(int64_t smem, const DeviceRecord& d) {
  if (smem > d.shared_memory_per_block_optin) return 0;
  const int64_t by_smem = d.shared_memory_per_multiprocessor / (smem + kReservedSmemPerBlock);
  const int64_t regs_cap = std::min<int64_t>(255, d.regs_per_multiprocessor / kThreads);
  const int64_t by_regs = d.regs_per_multiprocessor / (round_up(regs_cap, 8) * kThreads);
  const int64_t by_threads = d.max_threads_per_multi_processor / kThreads;
  return static_cast<int>(std::max<int64_t>(0, std::min<int64_t>({by_smem, by_regs, by_threads, 32})));
}

// ------------------------------------------------------------------------- cost model constants
// Per-arch rates for comparing geometries (a model, calibrated on the round-1 H200 measurements
// recorded in BENCHMARKS.md; the benchmark prints each term next to the measured time so the
// next GPU run shows which constant is wrong).
struct Rates {
  double clock_ghz;         // SM clock under load
  double l2_latency_clk;    // one dependent L2 round trip of an operand load (loaded chip)
  double l2_sm_Bpc;         // L2 -> one SM, bytes per clock
  double l2_agg_Bps;        // the grid's aggregate L2 read rate for these broadcast reads
  double smem_Bpc;          // shared-memory bytes per clock per SM
  double mma_per_clk;       // mma.sync (m16n8k16 bf16 / m16n8k8 tf32) per clock per SM
  double mma_latency_clk;   // dependent mma.sync latency
  double fma32_per_clk;     // FFMA lanes per clock per SM
  double fma64_per_clk;     // DFMA lanes per clock per SM
  double hbm_Bps;
  double sync_clk;          // one __syncthreads
  double cell_clk;          // one pointwise wave (partial sums, cell math, stores issued)
  double barrier_legacy_us; // round-1 barrier: all stores drained by the release, acquire spin
  double barrier_fixed_clk; // split barrier beyond its L2 round trips (red, spin detection)
  double gemm_flops;        // stepwise: achieved bf16 GEMM rate of one step's (B x K) . (K x N)
  double gemm_min_us;       // stepwise: shortest GEMM (launch + one wave)
  double pointwise_min_us;  // stepwise: shortest pointwise kernel
  double host_step_us;      // stepwise: host time to enqueue one step (ATen GEMM + kernel launch)
};
inline Rates rates_of(const DeviceRecord& d) {
  Rates r{};
  if (d.major >= 9) {
    r = {1.98, 600, 64, 2.6e12, 128, 0.6, 33, 128, 64, 4.0e12, 40, 300, 2.4, 200, 450e12, 4.0, 2.5, 8.0};
    if (d.total_memory > (int64_t(100) << 30)) r.hbm_Bps = 4.8e12;  // H200 (141 GB HBM3e)
  } else {
    r = {1.41, 500, 64, 2.0e12, 128, 0.45, 33, 64, 32, 1.9e12, 40, 300, 2.6, 200, 200e12, 4.0, 2.5, 8.0};
  }
  return r;
}

// --------------------------------------------------------------------------------- geometry
struct Shape {
  Pass pass;
  Engine engine;
  int64_t H, P, B;
  bool proj;    // P < H with W_hr
  bool train;   // forward saves gates / cell states
};

// Shared memory and slices of one candidate (U, Up, nt) -> fills p.a, p.b, p.smem; false if a
// slice needs more than kMaxMT m-tiles.
inline bool size_candidate(const Shape& s, Plan& p) {
  const int G = gates_of(s.pass);
  const int bn = bn_of(s.engine, p.nt);
  int max_mt = 0;
  if (is_fwd(s.pass)) {
    p.a = slice_of(int64_t(G) * p.U, s.P);
    max_mt = p.a.MT;
    p.smem = align16(w_bytes(s.engine, p.a.MT, p.a.KC));
    if (s.proj) {
      p.b = slice_of(p.Up, s.H);
      max_mt = std::max(max_mt, p.b.MT);
      p.smem += align16(w_bytes(s.engine, p.b.MT, p.b.KC));
    } else {
      p.b = Slice{1, 1};
    }
  } else {
    p.a = slice_of(p.Up, int64_t(G) * s.H);
    max_mt = p.a.MT;
    p.smem = align16(w_bytes(s.engine, p.a.MT, p.a.KC));
    if (s.proj) {
      p.b = slice_of(p.U, s.P);
      max_mt = std::max(max_mt, p.b.MT);
      p.smem += align16(w_bytes(s.engine, p.b.MT, p.b.KC));
    } else {
      p.b = Slice{1, 1};
    }
  }
  if (max_mt > kMaxMT) return false;
  p.smem += align16(red_bytes(s.engine, max_mt, bn));
  return true;
}

// ------------------------------------------------------------------------------ cost model
// Per time step, every pass (batch rows of a group, BN at a time) is a dependent chain:
//   lat   ceil(chunks per warp / load depth) L2 round trips for the operand loads,
//   max(  mma   MMAs of the CTA at the issue rate, or the dependent chain of one accumulator,
//         smem  W fragments (once per pass) + the partial sums written and read back,
//         l2    exchange bytes of the CTA: per-SM L2 bandwidth, or grid x bytes over the
//               aggregate rate (every CTA of a unit column reads the same rows: broadcast) )
//   cell  pointwise waves (kThreads * kMaxItems items each) + two __syncthreads;
// plus per exchange the synchronisation: legacy barrier (measured round 1), split barrier (fence
// over the exchange stores, the arrival and the spin: about three L2 round trips) or a flag
// round trip (one).  HBM traffic is prefetched / written behind: it only floors the step.
namespace detail {
struct Acc {
  double mma = 0, smem = 0, l2 = 0, lat = 0, cell = 0, step = 0;  // clocks
};
inline void gemm_phase(const Shape& s, const Plan& p, const Rates& r, Slice w, int64_t items_per_pass,
                       double cell_clk, Acc& acc) {
  const Engine e = s.engine;
  const int bn = bn_of(e, p.nt);
  const int64_t passes = ceil_div(p.Bg, bn);
  const int64_t cpw = ceil_div(w.KC, kWarps);  // chunks per warp
  const double lat = double(ceil_div(cpw, load_depth(e, p.nt))) * r.l2_latency_clk;
  double mma = 0;
  if (tensor_cores(e)) {
    const int kt = e == Engine::kMma16 ? 2 : 4;  // mma k-tiles per 32-wide chunk
    const double n = double(w.MT) * p.nt * w.KC * kt;
    mma = std::max(n / r.mma_per_clk, double(cpw) * kt * r.mma_latency_clk);
  } else {
    const double n = double(w.MT) * 16 * w.KC * kChunk * bn;
    mma = n / (e == Engine::kFma32 ? r.fma32_per_clk : r.fma64_per_clk);
  }
  const double smem = double(w_bytes(e, w.MT, w.KC) + 2 * red_bytes(e, w.MT, bn)) / r.smem_Bpc;
  const int wb = elem_bytes(e) * (p.sync == Sync::kFlags ? 2 : 1);
  const double bytes = double(bn) * w.KC * kChunk * wb;
  const double agg_Bpc = r.l2_agg_Bps / (r.clock_ghz * 1e9);
  const double l2 = std::max(bytes / r.l2_sm_Bpc, p.grid * bytes / agg_Bpc);
  const double waves = double(ceil_div(std::max<int64_t>(items_per_pass, 1), int64_t(kThreads) * kMaxItems));
  const double cell = waves * cell_clk + 2 * r.sync_clk;
  acc.mma += passes * mma;
  acc.smem += passes * smem;
  acc.l2 += passes * l2;
  acc.lat += passes * lat;
  acc.cell += passes * cell;
  acc.step += passes * (lat + std::max({mma, smem, l2}) + cell);
}
}  // namespace detail

inline Cost cost(const Shape& s, const Plan& p, const DeviceRecord& d) {
  const Rates r = rates_of(d);
  const double us = 1e-3 / r.clock_ghz;  // microseconds per clock
  const int G = gates_of(s.pass);
  const int es = elem_bytes(s.engine);
  const int bn = bn_of(s.engine, p.nt);
  detail::Acc acc;
  int exchanges = 1;
  if (is_fwd(s.pass)) {
    detail::gemm_phase(s, p, r, p.a, int64_t(p.U) * std::min<int64_t>(bn, p.Bg), r.cell_clk, acc);
    if (s.proj) {
      detail::gemm_phase(s, p, r, p.b, int64_t(p.Up) * std::min<int64_t>(bn, p.Bg), r.cell_clk / 3, acc);
      exchanges = 2;
    }
  } else {
    // pointwise waves over the group's rows; items beyond the first wave were not prefetched
    const int64_t items = int64_t(p.U) * p.Bg;
    const double waves = double(ceil_div(items, int64_t(kThreads) * kMaxItems));
    const double point = waves * r.cell_clk + (waves - 1) * 2 * r.l2_latency_clk + 2 * r.sync_clk;
    acc.cell += point;
    acc.step += point;
    if (s.proj) {
      const int64_t dt_items = int64_t(p.Up) * p.Bg;
      const double dt = double(ceil_div(dt_items, int64_t(kThreads) * kMaxItems)) * r.cell_clk / 3;
      acc.cell += dt;
      acc.step += dt;
      detail::gemm_phase(s, p, r, p.b, int64_t(p.U) * std::min<int64_t>(bn, p.Bg), r.cell_clk, acc);
      exchanges = 2;
    }
    detail::gemm_phase(s, p, r, p.a, int64_t(p.Up) * std::min<int64_t>(bn, p.Bg), r.cell_clk / 3, acc);
  }
  double sync_clk = 0;
  if (p.sync == Sync::kFlags) {
    sync_clk = r.l2_latency_clk;
  } else if (p.legacy) {
    sync_clk = r.barrier_legacy_us / us;
  } else {
    sync_clk = 2 * r.l2_latency_clk + r.barrier_fixed_clk + 2 * r.sync_clk;
  }
  sync_clk *= exchanges;
  // HBM bytes of one step (the whole batch): forward reads xproj, writes y (+ gates, fp32 c);
  // backward reads dy and the saved tensors, writes dxproj.
  const double B = double(s.B), H = double(s.H), P = double(s.P);
  double hbm = 0;
  if (is_fwd(s.pass)) {
    hbm = B * (G * H + P) * es;
    if (s.train) hbm += B * 4 * H * es + (is_lstm(s.pass) ? B * H * 4 : 0);
  } else {
    hbm = B * (G * H + P + 4 * H) * es + (is_lstm(s.pass) ? B * H * 4 * 2 : B * H * es);
  }
  Cost c;
  c.mma_us = acc.mma * us;
  c.smem_us = acc.smem * us;
  c.l2_us = acc.l2 * us;
  c.lat_us = acc.lat * us;
  c.cell_us = acc.cell * us;
  c.sync_us = sync_clk * us;
  c.hbm_us = hbm / r.hbm_Bps * 1e6;
  c.step_us = std::max((acc.step + sync_clk) * us, c.hbm_us);
  return c;
}

// ---------------------------------------------------------------------------------- planning
inline int preferred_nt(int64_t B) { return B <= 8 ? 1 : (B <= 16 ? 2 : 4); }

// The round-1 geometry (kept selectable: FUSEDRNN_CUDA_PLAN=legacy): fewest units per CTA that
// fit the SMs, one batch group, the preferred n-tiles (fewer if shared memory is short).
inline Plan legacy_plan(const Shape& s, const DeviceRecord& d) {
  Plan p;
  p.pass = s.pass;
  p.engine = s.engine;
  p.legacy = true;
  p.sync = Sync::kBarrier;
  const int G = gates_of(s.pass);
  const int64_t sms = d.multi_processor_count;
  const int64_t u_min = ceil_div(s.H, sms);
  if (is_fwd(s.pass)) {
    const int64_t mt = ceil_div(G * u_min, 16);
    if (mt > kMaxMT) { p.why = "W_hh slice needs more than 64 rows per CTA"; return p; }
    p.U = static_cast<int>(mt * 16 / G);
    p.gu = static_cast<int>(ceil_div(s.H, p.U));
    p.Up = s.proj ? static_cast<int>(ceil_div(s.P, p.gu)) : p.U;
  } else {
    const int64_t mt = ceil_div(u_min, 16);
    if (mt > kMaxMT) { p.why = "W_hh^T slice needs more than 64 rows per CTA"; return p; }
    p.U = static_cast<int>(std::min<int64_t>(mt * 16, s.H));
    p.gu = static_cast<int>(ceil_div(s.H, p.U));
    p.Up = s.proj ? static_cast<int>(ceil_div(s.P, p.gu)) : p.U;
  }
  p.gb = 1;
  p.Bg = s.B;
  p.grid = p.gu;
  for (int nt = tensor_cores(s.engine) ? preferred_nt(s.B) : 1; nt >= 1; nt /= 2) {
    p.nt = nt;
    if (!size_candidate(s, p)) { p.why = "a W slice needs more than 64 rows per CTA"; return p; }
    p.ctas_per_sm = ctas_per_sm(p.smem, d);
    if (p.ctas_per_sm >= 1 && p.grid <= p.ctas_per_sm * sms) {
      p.ok = true;
      p.why.clear();
      p.cost = cost(s, p, d);
      return p;
    }
  }
  p.why = "shared memory: " + std::to_string(p.smem) + " B per CTA needed, " +
          std::to_string(d.shared_memory_per_block_optin) + " B available";
  return p;
}

// ------------------------------------------------------------------------------- stepwise
inline bool stepwise_ok(const Shape& s) { return s.engine == Engine::kMma16 && !s.proj; }

// One step = GEMM (fwd: h_{t-1} . W_hh^T, B x G*H x H; bwd: dpre . W_hh, B x H x G*H) with W_hh
// streamed from L2, then the pointwise kernel (its HBM bytes); the host enqueues both, so a step
// never takes less than host_step_us.  Terms: mma = GEMM, l2 = W_hh bytes, cell = pointwise,
// sync = what the host floor adds.
inline Plan stepwise_plan(const Shape& s, const DeviceRecord& d) {
  const Rates r = rates_of(d);
  Plan p;
  p.pass = s.pass;
  p.engine = s.engine;
  p.stepwise = true;
  p.ok = true;
  p.U = static_cast<int>(s.H);
  p.gu = 1;
  p.gb = 1;
  p.Bg = s.B;
  p.grid = static_cast<int>(ceil_div(s.B * s.H, kThreads));
  const int G = gates_of(s.pass);
  const double B = double(s.B), H = double(s.H), es = elem_bytes(s.engine);
  const double flop = 2.0 * B * H * G * H;
  const double w = G * H * H * es;
  const double gemm_us = std::max({flop / r.gemm_flops * 1e6, w / r.l2_agg_Bps * 1e6, r.gemm_min_us});
  double hbm = is_fwd(s.pass) ? B * (G * H + H) * es + (s.train ? B * 4 * H * es + B * H * 4 : 0)
                              : B * (2 * G * H + H + 4 * H) * es + B * H * 4 * 2;
  const double point_us = std::max(hbm / r.hbm_Bps * 1e6, r.pointwise_min_us);
  p.cost.mma_us = flop / r.gemm_flops * 1e6;
  p.cost.l2_us = w / r.l2_agg_Bps * 1e6;
  p.cost.cell_us = point_us;
  p.cost.hbm_us = hbm / r.hbm_Bps * 1e6;
  const double gpu = gemm_us + point_us;
  p.cost.sync_us = std::max(0.0, r.host_step_us - gpu);
  p.cost.step_us = std::max(gpu, r.host_step_us);
  return p;
}

inline Plan plan_pass(Pass pass, Engine engine, int64_t H, int64_t P, int64_t B, bool proj, bool train,
                      const DeviceRecord& d, Options o = Options()) {
  const Shape s{pass, engine, H, P, std::max<int64_t>(B, 1), proj, train};
  Plan best;
  best.pass = pass;
  best.engine = engine;
  if (!d.cooperative_launch || d.multi_processor_count <= 0) {
    best.why = "the device does not support cooperative launches";
    return best;
  }
  if (o.mode == Options::kLegacy) return legacy_plan(s, d);
  const int G = gates_of(pass);
  const int64_t sms = d.multi_processor_count;
  int64_t smallest_smem = -1;
  int prev_U = -1;
  for (int mt = 1; mt <= kMaxMT; ++mt) {
    Plan c;
    c.pass = pass;
    c.engine = engine;
    c.U = is_fwd(pass) ? 16 * mt / G : static_cast<int>(std::min<int64_t>(16 * mt, H));
    if (c.U == prev_U) break;  // U already covers H
    prev_U = c.U;
    c.gu = static_cast<int>(ceil_div(H, c.U));
    if (c.gu > sms) continue;
    c.Up = proj ? static_cast<int>(ceil_div(P, c.gu)) : c.U;
    for (int64_t gb = 1; gb <= std::min<int64_t>(s.B, sms / c.gu); ++gb) {
      const int64_t Bg = ceil_div(s.B, gb);
      if (ceil_div(s.B, Bg) != gb) continue;  // same grouping as a smaller gb
      if (o.groups > 0 && gb != o.groups) continue;
      c.gb = static_cast<int>(gb);
      c.Bg = Bg;
      c.grid = c.gu * c.gb;
      for (int nt : {1, 2, 4}) {
        if (!tensor_cores(engine) && nt > 1) break;
        if (nt > 1 && 8 * (nt / 2) >= Bg) break;  // wider passes than the group's rows
        c.nt = nt;
        if (!size_candidate(s, c)) continue;
        if (smallest_smem < 0 || c.smem < smallest_smem) smallest_smem = c.smem;
        c.ctas_per_sm = ctas_per_sm(c.smem, d);
        if (c.ctas_per_sm < 1 || c.grid > int64_t(c.ctas_per_sm) * sms) continue;
        for (Sync sync : {Sync::kBarrier, Sync::kFlags}) {
          if (sync == Sync::kFlags && (!flags_ok(engine, nt) || o.mode == Options::kBarrierOnly)) continue;
          if (sync == Sync::kBarrier && o.mode == Options::kFlagsOnly && flags_ok(engine, nt)) continue;
          c.sync = sync;
          c.cost = cost(s, c, d);
          const bool better = !best.ok || c.cost.step_us < best.cost.step_us * (1 - 1e-9) ||
                              (c.cost.step_us <= best.cost.step_us * (1 + 1e-9) && c.grid < best.grid);
          if (better) {
            best = c;
            best.ok = true;
          }
        }
      }
    }
  }
  // The stepwise strategy where it is available and the model prefers it (or it is forced); only
  // among shapes the persistent kernels fit, so the limits stay those of the on-chip design.
  if (best.ok && stepwise_ok(s) && o.mode != Options::kLegacy && o.mode != Options::kBarrierOnly &&
      o.mode != Options::kFlagsOnly && o.mode != Options::kPersistent) {
    Plan sw = stepwise_plan(s, d);
    if (o.mode == Options::kStepwise || sw.cost.step_us < best.cost.step_us) return sw;
  }
  if (!best.ok) {
    if (o.groups > 0) return plan_pass(pass, engine, H, P, B, proj, train, d, Options{o.mode, 0});
    if (smallest_smem < 0) {
      best.why = "a W slice needs more than " + std::to_string(16 * kMaxMT) + " rows on every one of the " +
                 std::to_string(sms) + " SMs";
    } else {
      best.why = "shared memory: at least " + std::to_string(smallest_smem) + " B per CTA needed, " +
                 std::to_string(d.shared_memory_per_block_optin) + " B available per block";
    }
  }
  return best;
}

// ------------------------------------------------------------------------------------ limits
// Engines a dtype may run on: fp32 uses TF32 or plain FMA depending on the caller's TF32 flag at
// call time, so a limit holds for both.  dtype codes: 0 bf16/fp16, 1 fp32, 2 fp64.
inline std::vector<Engine> engines_of(int dtype_kind) {
  if (dtype_kind == 0) return {Engine::kMma16};
  if (dtype_kind == 1) return {Engine::kTf32, Engine::kFma32};
  return {Engine::kFma64};
}

// Whether forward AND backward of (mode, H, P) fit on the device for every engine of the dtype.
// proj_size 0: no projection (P = H); otherwise 0 < proj_size < H.
inline bool fits(bool lstm, int dtype_kind, int64_t H, int64_t proj_size, const DeviceRecord& d,
                 std::string* why = nullptr) {
  const bool proj = proj_size > 0;
  const int64_t P = proj ? proj_size : H;
  if (H < 1 || (proj && P >= H)) {
    if (why) *why = "invalid shape";
    return false;
  }
  for (Engine e : engines_of(dtype_kind)) {
    for (bool fwd : {true, false}) {
      const Pass pass = lstm ? (fwd ? Pass::kLstmFwd : Pass::kLstmBwd) : (fwd ? Pass::kGruFwd : Pass::kGruBwd);
      const Plan p = plan_pass(pass, e, H, P, 1, proj, true, d);
      if (!p.ok) {
        if (why) *why = std::string(pass_name(pass)) + " (" + engine_name(e) + "): " + p.why;
        return false;
      }
    }
  }
  return true;
}

// Largest H (with projection proj_size, 0 = none) whose forward and backward fit; 0 if none.
inline int64_t max_hidden(bool lstm, int dtype_kind, int64_t proj_size, const DeviceRecord& d) {
  if (!d.cooperative_launch || d.multi_processor_count <= 0) return 0;
  const int G = lstm ? 4 : 3;
  const double cap = double(d.multi_processor_count) * double(d.shared_memory_per_block_optin);
  const double es = dtype_kind == 0 ? 2 : (dtype_kind == 1 ? 4 : 8);
  // no W_hh of more bytes than all SMs' shared memory: H * G * P * es <= cap
  int64_t hi = proj_size > 0 ? int64_t(cap / (G * proj_size * es)) : int64_t(std::sqrt(cap / (G * es)));
  hi = std::min<int64_t>(hi + 64, 1 << 16);
  const int64_t lo = proj_size > 0 ? proj_size + 1 : 1;
  for (int64_t h = hi; h >= lo; --h)
    if (fits(lstm, dtype_kind, h, proj_size, d)) return h;
  return 0;
}

// Largest proj_size < H whose forward and backward fit for hidden size H; 0 if none.
inline int64_t max_proj(bool lstm, int dtype_kind, int64_t H, const DeviceRecord& d) {
  for (int64_t p = H - 1; p >= 1; --p)
    if (fits(lstm, dtype_kind, H, p, d)) return p;
  return 0;
}

}  // namespace plan
}  // namespace fusedrnn
