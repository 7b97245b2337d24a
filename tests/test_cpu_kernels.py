"""The CPU kernels of the cpp backend (csrc/cpu) beyond test_cpp.py's grid:

* the vectorised activations of every instruction-set variant (avx512 / avx2 / default, whichever
  this CPU runs) against float64 truth over the whole float range and against the scalar library
  functions (libm's expf/tanhf, the formula 1 / (1 + expf(-x)) of cell_math.h), with exact
  saturation and exact zero derivatives far out;
* extreme pre-activations (+-30, +-100, +-1e4, +-1e30, +-inf) through the recurrences, cells and
  modules, outputs and every gradient against the float64 reference;
* every variant on the recurrence grid (all dtypes, hostile shapes, lengths, reverse, projection);
* the threaded recurrence: two threads give bitwise the results of one, and match the reference;
* no vector code of a wider ISA leaks into functions that baseline code may call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import re
import shutil
import subprocess

import pytest
import torch

from fusedrnn.backends import cpp, reference

if cpp.unavailable() is not None:
    pytest.skip(f"cpp backend: {cpp.unavailable()}", allow_module_level=True)

import fusedrnn  # noqa: E402
from test_cpp import check_gru, check_gru_cell, check_lstm, check_lstm_cell  # noqa: E402
from tolerances import assert_close  # noqa: E402

ops = torch.ops.fusedrnn_ext
ISAS = list(ops.cpu_supported_isas())
EXTREMES = [30.0, 100.0, 1e4, 1e30, math.inf]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with the CPU kernels of one instruction set, then restores the automatic choice."""
    ops.cpu_isa(request.param)
    try:
        yield request.param
    finally:
        ops.cpu_isa("auto")


def test_isa_selection():
    assert ISAS[-1] == "default" and len(set(ISAS)) == len(ISAS)
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):
        assert "avx2" in ISAS
    if cap == "AVX512":
        assert ISAS[0] == "avx512"
    assert ops.cpu_isa() == ISAS[0]
    with pytest.raises(RuntimeError, match="cannot run here"):
        ops.cpu_isa("sse9")
    assert ops.cpu_isa() == ISAS[0]


# ========================================================================== elementary functions
F32_MIN = torch.finfo(torch.float32).tiny
F64_MIN = torch.finfo(torch.float64).tiny


def _float32_sample() -> torch.Tensor:
    """~1M float32 values: every 4093rd bit pattern (all exponents, both signs, subnormals, inf, NaN)
    plus the special points."""
    bits = torch.arange(0, 2**32, 4093, dtype=torch.int64)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    x = bits.view(torch.float32)
    special = [0.0, -0.0, F32_MIN, -F32_MIN, 1e-45, -1e-45, torch.finfo(torch.float32).max, math.inf, -math.inf,
               math.nan, 0.5, -0.5, 1.0, -1.0, 88.72, 88.73, -87.3, -103.9, -104.0]
    special += [s * m for m in EXTREMES for s in (1, -1)]
    return torch.cat([x, torch.tensor(special, dtype=torch.float32)])


def _float64_sample(n: int = 200_000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**63), 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    x = bits.view(torch.float64)
    # plus a dense sample where the functions bend, and the special points
    dense = torch.linspace(-40, 40, 20001, dtype=torch.float64)
    special = [0.0, -0.0, F64_MIN, 5e-324, math.inf, -math.inf, math.nan, 709.8, 709.7, -745.2]
    special += [s * m for m in EXTREMES for s in (1, -1)]
    return torch.cat([x, dense, torch.tensor(special, dtype=torch.float64)])


def _truth(fn: str, x: torch.Tensor) -> torch.Tensor:
    """float64 values (float32 inputs) of the elementary functions."""
    x = x.double()
    if fn == "exp":
        return torch.exp(x)
    if fn == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-x))
    if fn == "tanh":
        return torch.tanh(x)
    raise ValueError(fn)


def _ulp_error(got: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|got - truth| in units of the last place of truth rounded to dtype.  Where the rounded truth
    is inf or NaN, got must equal it (error 0, else inf).  Below the normal range the unit is the
    smallest normal: results there may flush to zero, as the scalar formula 1 / (1 + expf(-x)) does
    (expf(104) overflows), an absolute error below 1.2e-38."""
    tiny = torch.finfo(dtype).tiny
    rounded = truth.to(dtype)
    special = ~torch.isfinite(rounded)
    mag = rounded.abs()
    ulp = (torch.nextafter(mag, torch.tensor(math.inf, dtype=dtype)) - mag).double()
    ulp = torch.where(mag < tiny, tiny, ulp)
    err = (got.double() - truth).abs() / ulp
    same = (got == rounded) | (torch.isnan(got) & torch.isnan(rounded))
    return torch.where(special, torch.where(same, 0.0, math.inf), err)


# bounds in ulps against float64 truth: SLEEF's exp is 1-ulp, its float tanh 3.5-ulp; sigmoid adds
# an addition and a division to exp; libm (the default variant) is within 1-2 ulp.
ULP_BOUND = {"exp": 1.5, "sigmoid": 3.0, "tanh": 4.0}


@pytest.mark.parametrize("fn", ["exp", "sigmoid", "tanh"])
def test_float32_activations_whole_range(isa, fn):
    x = _float32_sample()
    got = ops.cpu_activation(x, fn)
    err = _ulp_error(got, _truth(fn, x), torch.float32)
    worst = int(torch.argmax(torch.nan_to_num(err, nan=math.inf)))
    assert float(err.max()) <= ULP_BOUND[fn], f"{fn}({x[worst].item()!r}) = {got[worst].item()!r}: {err[worst]:.2f} ulp"


@pytest.mark.parametrize("fn", ["exp", "sigmoid", "tanh"])
def test_float64_activations_whole_range(isa, fn):
    x = _float64_sample()
    got = ops.cpu_activation(x, fn)
    # truth: Python's math module (libm's exp / tanh, correctly rounded to within 1 ulp)
    ref = []
    for v in x.tolist():
        if fn == "tanh":
            ref.append(math.tanh(v))
        else:
            arg = v if fn == "exp" else -v
            try:
                e = math.exp(arg)
            except OverflowError:
                e = math.inf
            ref.append(e if fn == "exp" else 1.0 / (1.0 + e))
    ref = torch.tensor(ref, dtype=torch.float64)
    # both sides are within ~1 ulp of the exact value: 2.5 ulp apart at most (sigmoid 3.5)
    err = _ulp_error(got, ref, torch.float64)
    assert float(err.max()) <= (3.5 if fn == "sigmoid" else 2.5), fn


def _libm():
    name = ctypes.util.find_library("m")
    if name is None:
        pytest.skip("libm not found")
    lib = ctypes.CDLL(name)
    for f in ("expf", "tanhf"):
        getattr(lib, f).restype = ctypes.c_float
        getattr(lib, f).argtypes = [ctypes.c_float]
    return lib


@pytest.mark.parametrize("fn", ["exp", "sigmoid", "tanh"])
def test_float32_activations_match_scalar_libm(isa, fn):
    """The issue's wording: vector == scalar library function (libm's expf / tanhf, and cell_math.h's
    sigmoid formula evaluated with expf in float32) to a few ulp, on a sample of the whole range."""
    lib = _libm()
    x = _float32_sample()[::50]
    vals = x.tolist()
    if fn == "exp":
        ref = [lib.expf(v) for v in vals]
    elif fn == "tanh":
        ref = [lib.tanhf(v) for v in vals]
    else:
        ref = [float(torch.tensor(1.0, dtype=torch.float32) / (1.0 + torch.tensor(lib.expf(-v), dtype=torch.float32)))
               for v in vals]
    ref = torch.tensor(ref, dtype=torch.float32)
    got = ops.cpu_activation(x, fn)
    exact = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
    err = _ulp_error(got, ref.double(), torch.float32)
    assert float(torch.where(exact, 0.0, err).max()) <= ULP_BOUND[fn] + 1.0, fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_saturation_is_exact(isa, dtype):
    """tanh = +-1 and sigmoid = 0 / 1 exactly far out, so the derivatives computed from the
    activated values (what the backward uses) are exactly 0; NaN propagates."""
    big = torch.tensor([m for m in EXTREMES], dtype=dtype)
    for x in (big, -big):
        t = ops.cpu_activation(x, "tanh")
        assert torch.equal(t, torch.sign(x)), t
        assert torch.equal(ops.cpu_activation(x, "dtanh"), torch.zeros_like(x))
    pos = big if dtype == torch.float32 else big[1:]  # double: sigmoid(30) = 1 - 9.4e-14 is not 1
    assert torch.equal(ops.cpu_activation(pos, "sigmoid"), torch.ones_like(pos))
    assert torch.equal(ops.cpu_activation(pos, "dsigmoid"), torch.zeros_like(pos))
    # exp(-x) overflows (float: from 89, double: from 710): sigmoid is exactly 0 further out
    neg = -big[1:] if dtype == torch.float32 else -big[2:]
    assert torch.equal(ops.cpu_activation(neg, "sigmoid"), torch.zeros_like(neg))
    assert torch.equal(ops.cpu_activation(neg, "dsigmoid"), torch.zeros_like(neg))
    s30 = ops.cpu_activation(torch.tensor([-30.0], dtype=dtype), "sigmoid")
    assert float(s30) == pytest.approx(1.0 / (1.0 + math.exp(30.0)), rel=1e-6)
    ds30 = ops.cpu_activation(torch.tensor([-30.0], dtype=dtype), "dsigmoid")
    assert float(ds30) == pytest.approx(math.exp(-30.0), rel=1e-6)
    nan = torch.tensor([math.nan], dtype=dtype)
    for fn in ("exp", "sigmoid", "tanh", "dsigmoid", "dtanh"):
        assert torch.isnan(ops.cpu_activation(nan, fn)).all(), fn


def test_float64_sigmoid_underflow():
    x = torch.tensor([-745.2, -800.0, -1e30, -math.inf], dtype=torch.float64)
    assert torch.equal(ops.cpu_activation(x, "sigmoid"), torch.zeros_like(x))
    assert torch.equal(ops.cpu_activation(x, "dsigmoid"), torch.zeros_like(x))


def test_activation_op_rejects_bad_input():
    with pytest.raises(RuntimeError, match="unknown function"):
        ops.cpu_activation(torch.zeros(3), "relu")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.cpu_activation(torch.zeros(3, dtype=torch.float16), "tanh")


# ================================================================ extreme inputs through the ops
def _extreme(gen, shape, magnitude, dtype):
    """Half the entries +-magnitude (random signs), half N(0, 1)."""
    n = torch.randn(*shape, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0).double()
    big = torch.rand(*shape, generator=gen) < 0.5
    return torch.where(big, sign * magnitude, n).to(dtype)


def _check_finite_and_close(outs, refs, names, dtype):
    for o, name in zip(outs, names):
        assert torch.isfinite(o).all(), f"{name}: non-finite values"
    assert_close(outs, refs, dtype, names)


@pytest.mark.parametrize("magnitude", [30.0, 1e4, math.inf], ids=lambda m: f"{m:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["lstm", "lstm_proj", "gru"])
def test_recurrence_extreme_preactivations(isa, mode, dtype, magnitude):
    gen = torch.Generator().manual_seed(11)
    T, B, H = 5, 3, 21
    P = 7 if mode == "lstm_proj" else H
    G = 3 * H if mode == "gru" else 4 * H
    k = 1.0 / H**0.5
    xproj = _extreme(gen, (T, B, G), magnitude, dtype)
    w_hh = (torch.randn(G, P, generator=gen, dtype=torch.float64) * k).to(dtype)
    b_hh = (torch.randn(G, generator=gen, dtype=torch.float64) * k).to(dtype)
    h0 = torch.randn(B, P, generator=gen, dtype=torch.float64).to(dtype)
    lengths = torch.tensor([5, 2, 4])
    dy = torch.randn(T, B, P, generator=gen, dtype=torch.float64).to(dtype)
    dh_n = torch.randn(B, P, generator=gen, dtype=torch.float64).to(dtype)
    f64 = lambda ts: [None if t is None else t.double() for t in ts]  # noqa: E731
    if mode == "gru":
        fwd = cpp.gru_fwd(xproj, w_hh, b_hh, h0, lengths, True)
        bwd = cpp.gru_bwd(dy, dh_n, w_hh, h0, fwd[0], fwd[2], lengths, True)
        rf = reference.gru_fwd(*f64([xproj, w_hh, b_hh, h0]), lengths, True)
        rb = reference.gru_bwd(*f64([dy, dh_n, w_hh, h0, fwd[0], rf[2]]), lengths, True)
        _check_finite_and_close(list(fwd) + list(bwd), list(rf) + list(rb),
                                ["y", "h_n", "gates", "dxproj", "dh0", "dhn"], dtype)
        return
    c0 = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    w_hr = (torch.randn(P, H, generator=gen, dtype=torch.float64) * k).to(dtype) if mode == "lstm_proj" else None
    dc_n = torch.randn(B, H, generator=gen, dtype=torch.float64).to(dtype)
    fwd = cpp.lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, False)
    bwd = cpp.lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, fwd[3], fwd[4], lengths, False)
    a64 = f64([xproj, w_hh, b_hh, h0, c0, w_hr])
    rf = reference.lstm_fwd(*a64, lengths, False)
    rb = reference.lstm_bwd(*f64([dy, dh_n, dc_n]), a64[1], a64[5], a64[4], rf[3], rf[4], lengths, False)
    _check_finite_and_close(list(fwd) + list(bwd), list(rf) + list(rb),
                            ["y", "h_n", "c_n", "gates", "cs", "dxproj", "dh0", "dc0", "dh_seq"], dtype)


@pytest.mark.parametrize("magnitude", EXTREMES, ids=lambda m: f"{m:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cells_extreme_preactivations(isa, dtype, magnitude):
    gen = torch.Generator().manual_seed(12)
    B, H = 4, 19
    f64 = lambda ts: [None if t is None else t.double() for t in ts]  # noqa: E731
    ig, hg = _extreme(gen, (B, 4 * H), magnitude, dtype), _extreme(gen, (B, 4 * H), 1.0, dtype)
    c = torch.randn(B, H, generator=gen).to(dtype)
    dh, dc = torch.randn(B, H, generator=gen).to(dtype), torch.randn(B, H, generator=gen).to(dtype)
    fwd = cpp.lstm_cell_fwd(ig, hg, None, None, c)
    bwd = cpp.lstm_cell_bwd(dh, dc, c, fwd[1], fwd[2])
    rf = reference.lstm_cell_fwd(*f64([ig, hg]), None, None, c.double())
    rb = reference.lstm_cell_bwd(*f64([dh, dc, c]), rf[1], rf[2])
    _check_finite_and_close(list(fwd) + list(bwd), list(rf) + list(rb), ["h", "c", "gates", "dgates", "dc"], dtype)
    ig3, hg3 = _extreme(gen, (B, 3 * H), magnitude, dtype), _extreme(gen, (B, 3 * H), 1.0, dtype)
    h = torch.randn(B, H, generator=gen).to(dtype)
    gf = cpp.gru_cell_fwd(ig3, hg3, None, None, h)
    gb = cpp.gru_cell_bwd(dh, h, gf[1])
    rgf = reference.gru_cell_fwd(*f64([ig3, hg3]), None, None, h.double())
    rgb = reference.gru_cell_bwd(dh.double(), h.double(), rgf[1])
    _check_finite_and_close(list(gf) + list(gb), list(rgf) + list(rgb), ["h", "gates", "d_i", "d_h", "dh"], dtype)


@pytest.mark.parametrize("magnitude", [100.0, 1e4, 1e30], ids=lambda m: f"{m:g}")
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_module_gradients_at_extreme_inputs(isa, mode, magnitude):
    """The issue's case: inputs of magnitude 1e30 saturate every gate; dW_ih must be 0 as in float64,
    not ~1e23 from a derivative floor.  All outputs and gradients vs torch.nn in float64, within the
    fp32 tolerance or 2x torch.nn's own fp32 error (at magnitude 100 and 1e4 float32 itself rounds
    sigmoid(17+) to 1, so the tiny float64 gradients are lost by torch.nn as well)."""
    torch.manual_seed(3)
    ref = getattr(torch.nn, mode)(16, 24, num_layers=1)
    m = getattr(fusedrnn, mode)(16, 24, num_layers=1, backend="cpp")
    m.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 16) * magnitude

    def run(module, inp):
        inp = inp.clone().requires_grad_()
        out, hn = module(inp)
        outs = [out] + (list(hn) if isinstance(hn, tuple) else [hn])
        gen = torch.Generator().manual_seed(4)
        cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, [inp] + list(module.parameters()), cot)
        return outs + list(grads)

    got = run(m, x)
    torch_fp32 = run(ref, x)
    ref = ref.double()
    want = run(ref, x.double())
    names = ["out", "h_n"] + (["c_n"] if mode == "LSTM" else []) + ["dx"] + [n for n, _ in m.named_parameters()]
    for g, name in zip(got, names):
        assert torch.isfinite(g).all(), name
    assert_close(got, want, torch.float32, names, torch_outs=torch_fp32)
    if magnitude == 1e30:  # every gate saturated: exactly the float64 zeros
        for name in ["dx"] + [n for n, _ in m.named_parameters()]:
            assert torch.equal(got[names.index(name)], torch.zeros_like(got[names.index(name)])), name


# ======================================================================= every ISA on the grid
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 5, 37), (3, 13, 129), (1, 1, 1), (4, 7, 16)], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_recurrences_per_isa(isa, dtype, shape, reverse):
    T, B, H = shape
    check_lstm(cpp, "cpu", dtype, T=T, B=B, H=H, lengths="unsorted", reverse=reverse)
    check_gru(cpp, "cpu", dtype, T=T, B=B, H=H, lengths="unsorted", reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H,P", [(37, 19), (20, 33), (3, 1)])
def test_lstm_proj_per_isa(isa, dtype, H, P):
    check_lstm(cpp, "cpu", dtype, T=5, B=9, H=H, P=P, lengths="unsorted", reverse=True)


def _expect_in_place(isa, mode, T, B, H):
    """kernels_impl.h read_in_place: at most two passes over the panel (T x row tiles), and at most
    4 rows in all or float weights over 2 MiB.  Rows per tile (LSTM, GRU): 6 / 8 with AVX-512's 32
    vector registers, 2 / 3 with 16."""
    mr = {"lstm": 6, "gru": 8}[mode] if isa == "avx512" else {"lstm": 2, "gru": 3}[mode]
    gates = 4 if mode == "lstm" else 3
    return T * -(-B // mr) <= 2 and (T * B <= 4 or gates * H * H * 4 > 2 << 20)


def test_reads_in_place_rule():
    for isa_name in ISAS:
        ops.cpu_isa(isa_name)
        try:
            for mode in ("lstm", "gru"):
                for T, B, H in [(1, 1, 64), (2, 2, 64), (1, 5, 64), (3, 1, 64), (1, 64, 1024), (1, 6, 1024), (2, 6, 1024)]:
                    assert ops.cpu_reads_in_place(mode, T, B, H) == _expect_in_place(isa_name, mode, T, B, H)
                assert ops.cpu_reads_in_place(mode, 1, 1, 64) and not ops.cpu_reads_in_place(mode, 3, 1, 64)
        finally:
            ops.cpu_isa("auto")
    with pytest.raises(RuntimeError, match="mode must be"):
        ops.cpu_reads_in_place("rnn", 1, 1, 8)


# Short calls read W_hh / W_hr in place instead of packing them (see _expect_in_place): few rows at
# any size, and up to two row tiles when the weights exceed 2 MiB.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (2, 2), (2, 1), (1, 5), (2, 3)], ids=str)
@pytest.mark.parametrize("H", [1, 16, 37, 129])
def test_short_calls_per_isa(isa, dtype, T, B, H):
    for mode in ("lstm", "gru"):
        assert ops.cpu_reads_in_place(mode, T, B, H) == _expect_in_place(isa, mode, T, B, H), (mode, T, B)
    if H == 1 and dtype in (torch.bfloat16, torch.float16):
        pytest.skip("a relative-norm check over T*B single units in 8/11-bit mantissas measures one rounding")
    for reverse in (False, True):
        check_lstm(cpp, "cpu", dtype, T=T, B=B, H=H, lengths="unsorted", reverse=reverse)
        check_gru(cpp, "cpu", dtype, T=T, B=B, H=H, lengths="unsorted", reverse=reverse)
    if dtype != torch.float16:
        check_lstm(cpp, "cpu", dtype, T=T, B=B, H=H, P=max(1, H // 2 + 3), lengths="unsorted")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,B", [(1, 12), (2, 6), (1, 7), (1, 2)], ids=str)
def test_short_calls_large_weights_per_isa(isa, dtype, T, B):
    """Weights over 2 MiB (H = 520): in place for up to two row tiles, tails in every dimension."""
    H = 520
    check_lstm(cpp, "cpu", dtype, T=T, B=B, H=H, lengths="unsorted", reverse=True)
    check_gru(cpp, "cpu", dtype, T=T, B=B, H=H, lengths="unsorted")
    check_lstm(cpp, "cpu", dtype, T=T, B=B, H=H, P=300, lengths="unsorted")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cells_per_isa(isa, dtype):
    check_lstm_cell(cpp, "cpu", dtype, B=5, H=37)
    check_gru_cell(cpp, "cpu", dtype, B=5, H=37, bias=(False, True))


# ==================================================================================== threading
def _threads(n):
    class _Ctx:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)

    return _Ctx()


def test_thread_rule_respects_torch_threads():
    with _threads(1):
        assert ops.cpu_recurrence_threads(64, 1024, 4096) == 1
    with _threads(2):
        assert ops.cpu_recurrence_threads(64, 1024, 4096) == 2
        assert ops.cpu_recurrence_threads(1, 16, 64) == 1  # too small to share


def _run_all(mode, dtype, T, B, H, P, lengths, reverse, seed=5):
    gen = torch.Generator().manual_seed(seed)
    G = 3 * H if mode == "gru" else 4 * H
    k = 1.0 / H**0.5
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    xproj, w, b, h0 = r(T, B, G), r(G, P, scale=k), r(G, scale=k), r(B, P)
    dy, dh_n = r(T, B, P), r(B, P)
    if mode == "gru":
        fwd = cpp.gru_fwd(xproj, w, b, h0, lengths, reverse)
        bwd = cpp.gru_bwd(dy, dh_n, w, h0, fwd[0], fwd[2], lengths, reverse)
        return list(fwd) + list(bwd)
    c0, dc_n = r(B, H), r(B, H)
    w_hr = r(P, H, scale=k) if P != H else None
    fwd = cpp.lstm_fwd(xproj, w, b, h0, c0, w_hr, lengths, reverse)
    bwd = cpp.lstm_bwd(dy, dh_n, dc_n, w, w_hr, c0, fwd[3], fwd[4], lengths, reverse)
    return list(fwd) + list(bwd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode,H,P", [("lstm", 96, 96), ("lstm", 100, 50), ("gru", 130, 130)])
@pytest.mark.parametrize("B,lengths,reverse", [(40, "unsorted", True), (64, None, False), (3, "unsorted", False)])
def test_two_threads_bitwise_equal_one(isa, dtype, mode, H, P, B, lengths, reverse):
    """Work is split by column groups and row tiles: the same arithmetic per element, any split."""
    T = 7
    lens = None
    if lengths == "unsorted":
        lens = torch.tensor([[T, 1, T - 2, 3, T - 1][b % 5] for b in range(B)])
    G = 3 * H if mode == "gru" else 4 * H
    with _threads(2):
        if B >= 40:  # the big cases really run on two threads
            assert ops.cpu_recurrence_threads(B, P, G) == 2 and ops.cpu_recurrence_threads(B, G, P) == 2
        two = _run_all(mode, dtype, T, B, H, P, lens, reverse)
    with _threads(1):
        one = _run_all(mode, dtype, T, B, H, P, lens, reverse)
    for a, b in zip(two, one):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode,P", [("lstm", 520), ("lstm", 300), ("gru", 520)])
def test_two_threads_bitwise_equal_one_short_call(isa, mode, P):
    """A streaming step (T = 1, W_hh read in place) large enough for two threads: same bits."""
    H = 520
    G = 3 * H if mode == "gru" else 4 * H
    with _threads(2):
        assert ops.cpu_recurrence_threads(2, P, G) == 2
        two = _run_all(mode, torch.float32, 1, 2, H, P, None, False)
    with _threads(1):
        one = _run_all(mode, torch.float32, 1, 2, H, P, None, False)
    for a, b in zip(two, one):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_threaded_matches_reference(mode):
    with _threads(2):
        if mode == "lstm":
            check_lstm(cpp, "cpu", torch.float32, T=9, B=40, H=72, lengths="unsorted", reverse=True)
            check_lstm(cpp, "cpu", torch.float32, T=9, B=40, H=72, P=40, lengths="unsorted")
        else:
            check_gru(cpp, "cpu", torch.float32, T=9, B=40, H=90, lengths="unsorted", reverse=True)
        check_lstm_cell(cpp, "cpu", torch.float32, B=300, H=130)
        check_gru_cell(cpp, "cpu", torch.float32, B=300, H=130)


# ============================================================== ISA code stays in its namespaces
@pytest.mark.no_poison
def test_no_wide_vector_code_outside_isa_namespaces():
    """kernels_avx2.cpp / kernels_avx512.cpp compile shared headers for a wider ISA.  An inline
    function they emit out of line may be merged by the linker with a baseline caller's copy; it must
    then not contain AVX code.  Every function of the library that uses ymm/zmm registers must be
    ISA-specific (AVX2 / AVX512 in its name) or a SLEEF function."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not available")
    lib = cpp.extension().__file__
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", lib], capture_output=True, text=True,
                         check=True).stdout
    bad = set()
    func = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        if func and ("%ymm" in line or "%zmm" in line):
            if not re.search(r"avx2|avx512|sleef", func, re.IGNORECASE):
                bad.add(func)
    assert not bad, sorted(bad)[:20]
