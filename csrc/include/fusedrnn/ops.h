// The op contract in C++: one declaration per op and device.  Shapes, dtypes and semantics are
// those of python/fusedrnn/backends/reference.py (the spec); csrc/ops.cpp registers them as
// dispatcher ops `fusedrnn_ext::<name>` with a CPU and (when built with CUDA) a CUDA kernel.
//
// Notation: T steps, B batch, H hidden, P = proj_size or H, G = 4H (LSTM) / 3H (GRU).
// All tensors are contiguous (the Python op layer guarantees it); lengths is int64 (B,) on the
// same device as the data; optional tensors may be undefined.
#pragma once

#include <string>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace fusedrnn {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---- LSTM recurrence -------------------------------------------------------------------------
// returns (y (T,B,P), h_n (B,P), c_n (B,H), gates (T,B,4H) [i,f,g,o], cs (T,B,H) in acc dtype);
// save = false (inference): gates and cs are empty (0,) tensors of the same dtypes, nothing that
// only the backward needs is written.
Tensor5 lstm_fwd_cpu(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                     const Tensor& c0, const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                     bool allow_tf32, bool save);
// returns (dxproj (T,B,4H), dh0 (B,P), dc0 (B,H), dh_seq (T,B,P) if w_hr else (0,))
Tensor4 lstm_bwd_cpu(const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w_hh,
                     const OptTensor& w_hr, const Tensor& c0, const Tensor& gates, const Tensor& cs,
                     const OptTensor& lengths, bool reverse, bool allow_tf32);
// ---- GRU recurrence --------------------------------------------------------------------------
// returns (y (T,B,H), h_n (B,H), gates (T,B,4H) [r,z,n,hn]); save = false: gates is empty (0,)
Tensor3 gru_fwd_cpu(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                    const OptTensor& lengths, bool reverse, bool allow_tf32, bool save);
// returns (dxproj (T,B,3H), dh0 (B,H), dhn (T,B,H))
Tensor3 gru_bwd_cpu(const Tensor& dy, const Tensor& dh_n, const Tensor& w_hh, const Tensor& h0,
                    const Tensor& y, const Tensor& gates, const OptTensor& lengths, bool reverse,
                    bool allow_tf32);
// ---- cells -----------------------------------------------------------------------------------
Tensor3 lstm_cell_fwd_cpu(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih,
                          const OptTensor& b_hh, const Tensor& c);               // (h, c_new, gates)
Tensor2 lstm_cell_bwd_cpu(const Tensor& dh_new, const Tensor& dc_new, const Tensor& c,
                          const Tensor& c_new, const Tensor& gates);             // (dgates, dc)
Tensor2 gru_cell_fwd_cpu(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih,
                         const OptTensor& b_hh, const Tensor& h);                // (h_new, gates)
Tensor3 gru_cell_bwd_cpu(const Tensor& dh_new, const Tensor& h, const Tensor& gates);  // (d_i, d_h, dh)

#if defined(FUSEDRNN_WITH_CUDA) || defined(FUSEDRNN_CUDA_EMULATION)
// Same contract on CUDA tensors (csrc/cuda/*.cu).  allow_tf32: fp32 recurrent GEMMs may use TF32.
// (Under FUSEDRNN_CUDA_EMULATION the same source is compiled for CPU tensors in its own namespace.)
Tensor5 lstm_fwd_cuda(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                      const Tensor& c0, const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                      bool allow_tf32, bool save);
Tensor4 lstm_bwd_cuda(const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w_hh,
                      const OptTensor& w_hr, const Tensor& c0, const Tensor& gates, const Tensor& cs,
                      const OptTensor& lengths, bool reverse, bool allow_tf32);
Tensor3 gru_fwd_cuda(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                     const OptTensor& lengths, bool reverse, bool allow_tf32, bool save);
Tensor3 gru_bwd_cuda(const Tensor& dy, const Tensor& dh_n, const Tensor& w_hh, const Tensor& h0,
                     const Tensor& y, const Tensor& gates, const OptTensor& lengths, bool reverse,
                     bool allow_tf32);
Tensor3 lstm_cell_fwd_cuda(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih,
                           const OptTensor& b_hh, const Tensor& c);
Tensor2 lstm_cell_bwd_cuda(const Tensor& dh_new, const Tensor& dc_new, const Tensor& c,
                           const Tensor& c_new, const Tensor& gates);
Tensor2 gru_cell_fwd_cuda(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih,
                          const OptTensor& b_hh, const Tensor& h);
Tensor3 gru_cell_bwd_cuda(const Tensor& dh_new, const Tensor& h, const Tensor& gates);

// Largest hidden size the persistent kernels keep on chip for this device, dtype ("LSTM"/"GRU")
// and proj_size (0: none), from the device's properties (fusedrnn/cuda_plan.h); 0 if none.
int64_t max_hidden_size_cuda(const std::string& mode, at::ScalarType dtype, int64_t device_index,
                             int64_t proj_size = 0);
#endif

}  // namespace fusedrnn
