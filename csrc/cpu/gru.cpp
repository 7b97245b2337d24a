// GRU recurrence and cell on CPU: argument checks, dtype conversions and output allocation around
// the vectorised kernels of kernels_impl.h.  Same structure as csrc/cpu/lstm.cpp.
#include "common.h"
#include "fusedrnn/ops.h"

namespace fusedrnn {

Tensor3 gru_fwd_cpu(const Tensor& xproj, const Tensor& w_hh, const OptTensor& b_hh, const Tensor& h0,
                    const OptTensor& lengths, bool reverse, bool /*allow_tf32: no TF32 on CPU*/, bool save) {
  cpu::check_cpu(xproj, "xproj");
  const checks::Dims d = checks::gru_fwd(xproj, w_hh, b_hh, h0, lengths);
  const int64_t T = d.T, B = d.B, H = d.H, G = 3 * H;
  const auto dtype = xproj.scalar_type();
  const auto acc = cpu::acc_scalar_type(dtype);
  const Tensor x = xproj.contiguous();
  const Tensor w = cpu::acc_view(w_hh, acc);
  const Tensor bias = cpu::acc_or_undefined(b_hh, acc);
  const Tensor h0a = cpu::acc_view(h0, acc);
  const Tensor valid = cpu::valid_steps(lengths, T, B);
  Tensor y = at::empty({T, B, H}, xproj.options());
  // save = false (inference): gates is empty (0,) and the kernel skips its stores.
  Tensor gates = save ? at::empty({T, B, 4 * H}, xproj.options()) : at::empty({0}, xproj.options());
  Tensor h_n = at::empty({B, H}, xproj.options().dtype(acc));
  cpu::GruFwdArgs a;
  a.s = {T, B, H, H, reverse, valid.data_ptr<uint8_t>(), cpu::recurrence_threads(B, H, G), cpu::kind_of(dtype)};
  a.xproj = x.data_ptr();
  a.w_hh = w.data_ptr();
  a.b_hh = cpu::ptr_or_null(bias);
  a.h0 = h0a.data_ptr();
  a.y = y.data_ptr();
  a.gates = save ? gates.data_ptr() : nullptr;
  a.h_n = h_n.data_ptr();
  cpu::kernels().gru_fwd(a);
  return {y, h_n.to(dtype), gates};
}

Tensor3 gru_bwd_cpu(const Tensor& dy, const Tensor& dh_n, const Tensor& w_hh, const Tensor& h0, const Tensor& y,
                    const Tensor& gates, const OptTensor& lengths, bool reverse, bool /*allow_tf32*/) {
  cpu::check_cpu(gates, "gates");
  const checks::Dims d = checks::gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths);
  const int64_t T = d.T, B = d.B, H = d.H;
  cpu::check_same_dtype(gates, dy, "gates");
  cpu::check_same_dtype(y, dy, "y");
  const auto dtype = dy.scalar_type();
  const auto acc = cpu::acc_scalar_type(dtype);
  const Tensor w = cpu::acc_view(w_hh, acc);
  const Tensor h0a = cpu::acc_view(h0, acc), dhna = cpu::acc_view(dh_n, acc);
  const Tensor dyc = dy.contiguous(), yc = y.contiguous(), gc = gates.contiguous();
  const Tensor valid = cpu::valid_steps(lengths, T, B);
  Tensor dxproj = at::empty({T, B, 3 * H}, dy.options());
  Tensor dhn = at::empty({T, B, H}, dy.options());
  Tensor dh0 = at::empty({B, H}, dy.options().dtype(acc));
  cpu::GruBwdArgs a;
  a.s = {T, B, H, H, reverse, valid.data_ptr<uint8_t>(), cpu::recurrence_threads(B, 3 * H, H), cpu::kind_of(dtype)};
  a.dy = dyc.data_ptr();
  a.dh_n = dhna.data_ptr();
  a.w_hh = w.data_ptr();
  a.h0 = h0a.data_ptr();
  a.y = yc.data_ptr();
  a.gates = gc.data_ptr();
  a.dxproj = dxproj.data_ptr();
  a.dh0 = dh0.data_ptr();
  a.dhn = dhn.data_ptr();
  cpu::kernels().gru_bwd(a);
  return {dxproj, dh0.to(dtype), dhn};
}

Tensor2 gru_cell_fwd_cpu(const Tensor& igates, const Tensor& hgates, const OptTensor& b_ih, const OptTensor& b_hh,
                         const Tensor& h) {
  cpu::check_cpu(igates, "igates");
  const checks::Dims d = checks::gru_cell_fwd(igates, hgates, b_ih, b_hh, h);
  const int64_t B = d.B, H = d.H;
  cpu::check_same_dtype(hgates, igates, "hgates");
  const auto dtype = igates.scalar_type();
  const auto acc = cpu::acc_scalar_type(dtype);
  const Tensor bi = cpu::acc_or_undefined(b_ih, acc), bh = cpu::acc_or_undefined(b_hh, acc);
  const Tensor ha = cpu::acc_view(h, acc);
  const Tensor xi = igates.contiguous(), xh = hgates.contiguous();
  Tensor h_new = at::empty({B, H}, igates.options());
  Tensor gates = at::empty({B, 4 * H}, igates.options());
  cpu::GruCellFwdArgs a;
  a.s = {B, H, cpu::cell_threads(B, H), cpu::kind_of(dtype)};
  a.igates = xi.data_ptr();
  a.hgates = xh.data_ptr();
  a.b_ih = cpu::ptr_or_null(bi);
  a.b_hh = cpu::ptr_or_null(bh);
  a.h = ha.data_ptr();
  a.h_new = h_new.data_ptr();
  a.gates = gates.data_ptr();
  cpu::kernels().gru_cell_fwd(a);
  return {h_new, gates};
}

Tensor3 gru_cell_bwd_cpu(const Tensor& dh_new, const Tensor& h, const Tensor& gates) {
  cpu::check_cpu(gates, "gates");
  const checks::Dims d = checks::gru_cell_bwd(dh_new, h, gates);
  const int64_t B = d.B, H = d.H;
  const auto dtype = gates.scalar_type();
  const auto acc = cpu::acc_scalar_type(dtype);
  const Tensor dha = cpu::acc_view(dh_new, acc), ha = cpu::acc_view(h, acc);
  const Tensor gc = gates.contiguous();
  Tensor d_i = at::empty({B, 3 * H}, gates.options());
  Tensor d_h = at::empty({B, 3 * H}, gates.options());
  Tensor dh = at::empty({B, H}, gates.options());
  cpu::GruCellBwdArgs a;
  a.s = {B, H, cpu::cell_threads(B, H), cpu::kind_of(dtype)};
  a.dh_new = dha.data_ptr();
  a.h = ha.data_ptr();
  a.gates = gc.data_ptr();
  a.d_i = d_i.data_ptr();
  a.d_h = d_h.data_ptr();
  a.dh = dh.data_ptr();
  cpu::kernels().gru_cell_bwd(a);
  return {d_i, d_h, dh};
}

}  // namespace fusedrnn
