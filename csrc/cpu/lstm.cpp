// LSTM recurrence and cell on CPU: argument checks, dtype conversions and output allocation around
// the vectorised kernels of kernels_impl.h (chosen per ISA by kernels()).  Semantics are those of
// python/fusedrnn/backends/reference.py.
#include "common.h"
#include "fusedrnn/ops.h"

namespace fusedrnn {

Tensor5 lstm_fwd_cpu(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                     const Tensor& c0, const OptTensor& w_hr, const OptTensor& lengths, bool reverse,
                     bool /*allow_tf32: no TF32 on CPU*/, bool save) {
  cpu::check_cpu(xproj, "xproj");
  const checks::Dims d = checks::lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths);
  const int64_t T = d.T, B = d.B, H = d.H, G = 4 * H, P = d.P;

  const auto dtype = xproj.scalar_type();
  const auto acc = cpu::acc_scalar_type(dtype);
  const Tensor x = xproj.contiguous();
  const Tensor w = cpu::acc_view(w_hh, acc);
  const Tensor bias = cpu::acc_or_undefined(b_hh, acc);
  const Tensor wr = cpu::acc_or_undefined(w_hr, acc);
  const Tensor h0a = cpu::acc_view(h0, acc), c0a = cpu::acc_view(c0, acc);
  const Tensor valid = cpu::valid_steps(lengths, T, B);
  const auto aopt = xproj.options().dtype(acc);
  Tensor y = at::empty({T, B, P}, xproj.options());
  // save = false (inference): the saved tensors are empty (0,) and the kernel skips their stores.
  Tensor gates = save ? at::empty({T, B, G}, xproj.options()) : at::empty({0}, xproj.options());
  Tensor cs = save ? at::empty({T, B, H}, aopt) : at::empty({0}, aopt);
  Tensor h_n = at::empty({B, P}, aopt);
  Tensor c_n = at::empty({B, H}, aopt);

  cpu::LstmFwdArgs a;
  a.s = {T, B, H, P, reverse, valid.data_ptr<uint8_t>(), cpu::recurrence_threads(B, P, G), cpu::kind_of(dtype)};
  a.xproj = x.data_ptr();
  a.w_hh = w.data_ptr();
  a.b_hh = cpu::ptr_or_null(bias);
  a.w_hr = cpu::ptr_or_null(wr);
  a.h0 = h0a.data_ptr();
  a.c0 = c0a.data_ptr();
  a.y = y.data_ptr();
  a.gates = save ? gates.data_ptr() : nullptr;
  a.cs = save ? cs.data_ptr() : nullptr;
  a.h_n = h_n.data_ptr();
  a.c_n = c_n.data_ptr();
  cpu::kernels().lstm_fwd(a);
  return {y, h_n.to(dtype), c_n.to(dtype), gates, cs};
}

Tensor4 lstm_bwd_cpu(const Tensor& dy, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w_hh,
                     const OptTensor& w_hr, const Tensor& c0, const Tensor& gates, const Tensor& cs,
                     const OptTensor& lengths, bool reverse, bool /*allow_tf32*/) {
  cpu::check_cpu(gates, "gates");
  const checks::Dims d = checks::lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths);
  const int64_t T = d.T, B = d.B, H = d.H, G = 4 * H, P = d.P;
  const bool proj = checks::defined(w_hr);
  cpu::check_same_dtype(gates, dy, "gates");

  const auto dtype = dy.scalar_type();
  const auto acc = cpu::acc_scalar_type(dtype);
  const Tensor w = cpu::acc_view(w_hh, acc);
  const Tensor wr = cpu::acc_or_undefined(w_hr, acc);
  const Tensor c0a = cpu::acc_view(c0, acc), csa = cpu::acc_view(cs, acc);
  const Tensor dhna = cpu::acc_view(dh_n, acc), dcna = cpu::acc_view(dc_n, acc);
  const Tensor dyc = dy.contiguous(), gc = gates.contiguous();
  const Tensor valid = cpu::valid_steps(lengths, T, B);
  const auto aopt = dy.options().dtype(acc);
  Tensor dxproj = at::empty({T, B, G}, dy.options());
  Tensor dh_seq = proj ? at::empty({T, B, P}, dy.options()) : at::empty({0}, dy.options());
  Tensor dh0 = at::empty({B, P}, aopt);
  Tensor dc0 = at::empty({B, H}, aopt);

  cpu::LstmBwdArgs a;
  a.s = {T, B, H, P, reverse, valid.data_ptr<uint8_t>(), cpu::recurrence_threads(B, G, P), cpu::kind_of(dtype)};
  a.dy = dyc.data_ptr();
  a.dh_n = dhna.data_ptr();
  a.dc_n = dcna.data_ptr();
  a.w_hh = w.data_ptr();
  a.w_hr = cpu::ptr_or_null(wr);
  a.c0 = c0a.data_ptr();
  a.gates = gc.data_ptr();
  a.cs = csa.data_ptr();
  a.dxproj = dxproj.data_ptr();
  a.dh0 = dh0.data_ptr();
  a.dc0 = dc0.data_ptr();
  a.dh_seq = proj ? dh_seq.data_ptr() : nullptr;
  cpu::kernels().lstm_bwd(a);
  return {dxproj, dh0.to(dtype), dc0.to(dtype), dh_seq};
}

Tensor3 lstm_cell_fwd_cpu(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih, const OptTensor& b_hh,
                          const Tensor& c) {
  cpu::check_cpu(igates, "igates");
  const checks::Dims d = checks::lstm_cell_fwd(igates, hgates, b_ih, b_hh, c);
  const int64_t B = d.B, H = d.H, G = 4 * H;
  cpu::check_same_dtype(hgates, igates, "hgates");
  const auto dtype = igates.scalar_type();
  const auto acc = cpu::acc_scalar_type(dtype);
  const Tensor bi = cpu::acc_or_undefined(b_ih, acc), bh = cpu::acc_or_undefined(b_hh, acc);
  const Tensor ca = cpu::acc_view(c, acc);
  const Tensor xi = igates.contiguous(), xh = hgates.contiguous();
  Tensor h_new = at::empty({B, H}, igates.options());
  Tensor c_new = at::empty({B, H}, igates.options());
  Tensor gates = at::empty({B, G}, igates.options());
  cpu::LstmCellFwdArgs a;
  a.s = {B, H, cpu::cell_threads(B, H), cpu::kind_of(dtype)};
  a.igates = xi.data_ptr();
  a.hgates = xh.data_ptr();
  a.b_ih = cpu::ptr_or_null(bi);
  a.b_hh = cpu::ptr_or_null(bh);
  a.c = ca.data_ptr();
  a.h_new = h_new.data_ptr();
  a.c_new = c_new.data_ptr();
  a.gates = gates.data_ptr();
  cpu::kernels().lstm_cell_fwd(a);
  return {h_new, c_new, gates};
}

Tensor2 lstm_cell_bwd_cpu(const Tensor& dh_new, const Tensor& dc_new, const Tensor& c, const Tensor& c_new,
                          const Tensor& gates) {
  cpu::check_cpu(gates, "gates");
  const checks::Dims d = checks::lstm_cell_bwd(dh_new, dc_new, c, c_new, gates);
  const int64_t B = d.B, H = d.H, G = 4 * H;
  const auto dtype = gates.scalar_type();
  const auto acc = cpu::acc_scalar_type(dtype);
  const Tensor dha = cpu::acc_view(dh_new, acc), dca = cpu::acc_view(dc_new, acc);
  const Tensor ca = cpu::acc_view(c, acc), cna = cpu::acc_view(c_new, acc);
  const Tensor gc = gates.contiguous();
  Tensor dgates = at::empty({B, G}, gates.options());
  Tensor dc = at::empty({B, H}, gates.options());
  cpu::LstmCellBwdArgs a;
  a.s = {B, H, cpu::cell_threads(B, H), cpu::kind_of(dtype)};
  a.dh_new = dha.data_ptr();
  a.dc_new = dca.data_ptr();
  a.c = ca.data_ptr();
  a.c_new = cna.data_ptr();
  a.gates = gc.data_ptr();
  a.dgates = dgates.data_ptr();
  a.dc = dc.data_ptr();
  cpu::kernels().lstm_cell_bwd(a);
  return {dgates, dc};
}

}  // namespace fusedrnn
