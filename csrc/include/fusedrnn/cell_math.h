// Gate activations and state updates of one LSTM / GRU step, forward and backward, for one hidden
// unit of one sequence.  Shared by the CPU loops (csrc/cpu) and the CUDA kernels (csrc/cuda): the
// formulas are those of python/fusedrnn/backends/reference.py, written once.
//
// Every function is templated on the accumulation type `T` (float for fp32/bf16/fp16 inputs,
// double for fp64: see `AccType`).  Callers convert loads to T and results back to storage dtype.
// No ATen / CUDA headers are needed: this file compiles as plain C++ and under nvcc.
//
// Gate order (PyTorch's):  LSTM [i, f, g, o];  GRU [r, z, n] (+ saved hn).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDRNN_HD __host__ __device__ __forceinline__
#else
#define FUSEDRNN_HD inline
#endif

namespace fusedrnn {

// Accumulation type of a storage type: double stays double, everything else (float, at::Half,
// at::BFloat16, __half, __nv_bfloat16) accumulates in float.  (Not at::acc_type: on CPU that maps
// float to double.)
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// ---- elementary functions (float / double overloads, host and device) ------------------------
FUSEDRNN_HD float exp_(float x) { return ::expf(x); }
FUSEDRNN_HD double exp_(double x) { return ::exp(x); }
FUSEDRNN_HD float tanh_(float x) { return ::tanhf(x); }
FUSEDRNN_HD double tanh_(double x) { return ::tanh(x); }

// 1 / (1 + e^-x): exp overflows to inf for x << 0 and the quotient is then exactly 0 (no NaN).
template <typename T>
FUSEDRNN_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// Derivatives expressed through the activated value (what the backward has saved).
template <typename T>
FUSEDRNN_HD T dsigmoid_from_value(T s) {  // d sigmoid(x)/dx with s = sigmoid(x)
  return s * (T(1) - s);
}
template <typename T>
FUSEDRNN_HD T dtanh_from_value(T t) {  // d tanh(x)/dx with t = tanh(x)
  return T(1) - t * t;
}

// ================================================================================== LSTM
// One unit after one step: activated gates, new cell state c, and m = o * tanh(c) (the hidden
// state before the optional projection h = m @ W_hr^T; without projection h = m).
template <typename T>
struct LstmStep {
  T i, f, g, o;
  T c;
  T h;
};

// pre_* are the full pre-activations: xproj + h_{t-1} @ W_hh^T + b_hh (cells: + both biases).
template <typename T>
FUSEDRNN_HD LstmStep<T> lstm_cell_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  LstmStep<T> s;
  s.i = sigmoid(pre_i);
  s.f = sigmoid(pre_f);
  s.g = tanh_(pre_g);
  s.o = sigmoid(pre_o);
  s.c = s.f * c_prev + s.i * s.g;
  s.h = s.o * tanh_(s.c);
  return s;
}

// Gradients of one unit: d_* are the gradients of the pre-activations (= of xproj, of b_hh and of
// h_{t-1} @ W_hh^T); dc_prev is the cell-state gradient flowing to step t-1.
template <typename T>
struct LstmGrad {
  T d_i, d_f, d_g, d_o;
  T dc_prev;
};

// i, f, g, o: activated gates of the step;  c: its cell state c_t;  c_prev: c_{t-1};
// dh: total gradient reaching m_t = o * tanh(c_t) (dy_t + dh from step t+1, already multiplied
// by W_hr when projecting);  dc: gradient reaching c_t from step t+1 (or dc_n).
template <typename T>
FUSEDRNN_HD LstmGrad<T> lstm_cell_backward(T i, T f, T g, T o, T c, T c_prev, T dh, T dc) {
  const T tc = tanh_(c);
  const T dc_tot = dc + dh * o * dtanh_from_value(tc);
  LstmGrad<T> d;
  d.d_i = dc_tot * g * dsigmoid_from_value(i);
  d.d_f = dc_tot * c_prev * dsigmoid_from_value(f);
  d.d_g = dc_tot * i * dtanh_from_value(g);
  d.d_o = dh * tc * dsigmoid_from_value(o);
  d.dc_prev = dc_tot * f;
  return d;
}

// =================================================================================== GRU
// One unit after one step: r, z, n and the new hidden state.  The caller saves [r, z, n, hn]
// where hn is its own hidden_n argument below (backward needs it).
template <typename T>
struct GruStep {
  T r, z, n;
  T h;
};

// x_*: input part xproj (= x @ W_ih^T + b_ih);  hid_*: hidden part h_{t-1} @ W_hh^T + b_hh.
template <typename T>
FUSEDRNN_HD GruStep<T> gru_cell_forward(T x_r, T x_z, T x_n, T hid_r, T hid_z, T hid_n, T h_prev) {
  GruStep<T> s;
  s.r = sigmoid(x_r + hid_r);
  s.z = sigmoid(x_z + hid_z);
  s.n = tanh_(x_n + s.r * hid_n);
  s.h = (T(1) - s.z) * s.n + s.z * h_prev;
  return s;
}

// d_r, d_z, d_n: gradients of the input pre-activations [x_r, x_z, x_n] (= of xproj, b_ih);
// d_hid_n = d_n * r: gradient of the hidden part hid_n (the hidden projection's gradient is
// [d_r, d_z, d_hid_n]);  dh_prev_direct = dh * z: the direct path to h_{t-1} (the caller adds
// [d_r, d_z, d_hid_n] @ W_hh).
template <typename T>
struct GruGrad {
  T d_r, d_z, d_n;
  T d_hid_n;
  T dh_prev_direct;
};

// r, z, n, hid_n: the saved gates of the step;  h_prev: h_{t-1};  dh: total gradient reaching h_t.
template <typename T>
FUSEDRNN_HD GruGrad<T> gru_cell_backward(T r, T z, T n, T hid_n, T h_prev, T dh) {
  GruGrad<T> d;
  d.d_n = dh * (T(1) - z) * dtanh_from_value(n);
  d.d_z = dh * (h_prev - n) * dsigmoid_from_value(z);
  d.d_r = d.d_n * hid_n * dsigmoid_from_value(r);
  d.d_hid_n = d.d_n * r;
  d.dh_prev_direct = dh * z;
  return d;
}

}  // namespace fusedrnn
