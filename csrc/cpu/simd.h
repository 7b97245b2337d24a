// A fixed-width pack of accumulation-type values for the CPU loops.  The cell math of
// fusedrnn/cell_math.h is instantiated on Pack<float, 8>: every operation is a loop over the
// lanes that the compiler vectorises (SSE2 at the x86-64 baseline, wider with -march), and
// exp/tanh are branch-free polynomial versions of their own (libm's scalar expf/tanhf cost ~10x
// more per element and never vectorise without -ffast-math).  Accuracy: exp within ~2 ulp, tanh
// and sigmoid within ~4 ulp of float, far inside the 1e-5 relative tolerance of the fp32 tests.
// double keeps libm (fp64 is the precision mode, not the speed mode).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fusedrnn {
namespace cpu {

template <typename T, int N>
struct Pack {
  static constexpr int kLanes = N;
  T v[N];
  Pack() = default;
  Pack(T x) {  // NOLINT(google-explicit-constructor): cell_math writes T(1)
    for (int i = 0; i < N; ++i) v[i] = x;
  }
};

#define FUSEDRNN_PACK_BINOP(op)                                              \
  template <typename T, int N>                                               \
  inline Pack<T, N> operator op(const Pack<T, N>& a, const Pack<T, N>& b) { \
    Pack<T, N> r;                                                            \
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] op b.v[i];                   \
    return r;                                                                \
  }
FUSEDRNN_PACK_BINOP(+)
FUSEDRNN_PACK_BINOP(-)
FUSEDRNN_PACK_BINOP(*)
FUSEDRNN_PACK_BINOP(/)
#undef FUSEDRNN_PACK_BINOP

template <typename T, int N>
inline Pack<T, N> operator-(const Pack<T, N>& a) {
  Pack<T, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = -a.v[i];
  return r;
}

// e^x for float, Cephes-style: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial, 2^n
// through the exponent bits.  Inputs are clamped to [-87, 88] (results stay normal floats: the
// sigmoid of x < -87 comes out ~1e-38 instead of smaller, an absolute error below 1e-37).
inline float exp_lane(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh for float: odd Taylor polynomial for |x| < 0.4 (no cancellation near 0), else
// 1 - 2 / (e^{2|x|} + 1); both evaluated and selected, so the lane loop stays branch-free.
inline float tanh_lane(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float x2 = x * x;
  float p = 21844.0f / 6081075.0f;
  p = p * x2 - 1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float small = x + x * x2 * p;
  const float e = exp_lane(2.0f * (ax > 9.0f ? 9.0f : ax));
  const float big_abs = 1.0f - 2.0f / (e + 1.0f);
  const float big = x < 0.0f ? -big_abs : big_abs;
  return ax < 0.4f ? small : big;
}

template <int N>
inline Pack<float, N> exp_(const Pack<float, N>& a) {
  Pack<float, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = exp_lane(a.v[i]);
  return r;
}
template <int N>
inline Pack<float, N> tanh_(const Pack<float, N>& a) {
  Pack<float, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = tanh_lane(a.v[i]);
  return r;
}
template <int N>
inline Pack<double, N> exp_(const Pack<double, N>& a) {
  Pack<double, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = std::exp(a.v[i]);
  return r;
}
template <int N>
inline Pack<double, N> tanh_(const Pack<double, N>& a) {
  Pack<double, N> r;
  for (int i = 0; i < N; ++i) r.v[i] = std::tanh(a.v[i]);
  return r;
}

// The pack type for an accumulation type: 8 floats / 4 doubles (one AVX register, two SSE).
template <typename acc>
using PackOf = Pack<acc, 32 / sizeof(acc)>;

// Loads n <= N lanes (converted to acc; missing lanes are 0) and stores n lanes (converted back).
template <typename P, typename S>
inline P load(const S* p, int n) {
  P r;
  using T = decltype(r.v[0] + 0);
  if (n == P::kLanes) {
    for (int i = 0; i < P::kLanes; ++i) r.v[i] = static_cast<T>(p[i]);
  } else {
    for (int i = 0; i < P::kLanes; ++i) r.v[i] = i < n ? static_cast<T>(p[i]) : T(0);
  }
  return r;
}

template <typename P, typename S>
inline P load_or_zero(const S* p, int n) {
  return p ? load<P>(p, n) : P(0);
}

template <typename S, typename P>
inline void store(S* p, const P& x, int n) {
  if (n == P::kLanes) {
    for (int i = 0; i < P::kLanes; ++i) p[i] = static_cast<S>(x.v[i]);
  } else {
    for (int i = 0; i < n; ++i) p[i] = static_cast<S>(x.v[i]);
  }
}

}  // namespace cpu
}  // namespace fusedrnn
