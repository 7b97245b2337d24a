"""Kernel-level tests of the compiled backends (``cpp`` on CPU, ``cuda`` on GPU) against the spec.

Every case runs forward and backward of one op in the tested dtype through the backend and in
float64 through ``fusedrnn.backends.reference`` on the same (dtype-rounded) inputs, and compares
every output (including the saved gates / cell states) by relative norm ||out - ref|| / ||ref||.
Uninitialised memory is NaN-filled (torch's deterministic fill), so an element a kernel forgets to
write shows up as NaN.  The whole module is skipped when ``fusedrnn._C`` is not built.
"""

from __future__ import annotations

import pytest
import torch

from fusedrnn.backends import cpp, reference, rnn_tf32

if cpp.unavailable() is not None:
    pytest.skip(f"cpp backend: {cpp.unavailable()}", allow_module_level=True)

from fusedrnn.backends import cuda  # noqa: E402  (imports fusedrnn._C)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HIDDEN = [1, 3, 37, 129]
_CUDA_REASON = cuda.unavailable()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(_CUDA_REASON is not None, reason=f"cuda backend: {_CUDA_REASON}")


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    """torch.empty* (C++ at::empty included) returns NaN-filled memory inside each test."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill




def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if ref.numel() == 0:
        return 0.0
    diff = (out - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


def assert_close_all(outs, refs, names, tol):
    assert len(outs) == len(refs) == len(names)
    for out, ref, name in zip(outs, refs, names):
        assert torch.isfinite(out).all(), f"{name}: non-finite values (an unwritten element?)"
        err = rel_err(out, ref)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def _lengths(B: int, T: int, kind: str):
    if kind == "none":
        return None
    if kind == "unsorted":  # unsorted, includes a full-length and a length-1 sequence
        pattern = [max(1, T - 2), T, 1, max(1, T // 2), max(1, T - 1)]
        return torch.tensor([pattern[b % len(pattern)] for b in range(B)], dtype=torch.int64)
    raise ValueError(kind)


def _to(tensors, dtype, device):
    return [None if t is None else t.to(device=device, dtype=dtype) for t in tensors]


def _f64(tensors):
    return [None if t is None else t.detach().cpu().double() for t in tensors]


# ------------------------------------------------------------------------------------ LSTM
def check_lstm(backend, device, dtype, T, B, H, P=0, lengths="unsorted", reverse=False, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Pn = P or H
    k = 1.0 / max(H, 1) ** 0.5
    xproj = _rand(gen, T, B, 4 * H)
    w_hh = _rand(gen, 4 * H, Pn, scale=k)
    b_hh = _rand(gen, 4 * H, scale=k) if bias else None
    h0, c0 = _rand(gen, B, Pn), _rand(gen, B, H)
    w_hr = _rand(gen, Pn, H, scale=k) if P else None
    lens = _lengths(B, T, lengths)
    dy, dh_n, dc_n = _rand(gen, T, B, Pn), _rand(gen, B, Pn), _rand(gen, B, H)

    args = _to([xproj, w_hh, b_hh, h0, c0, w_hr], dtype, device)
    lens_d = None if lens is None else lens.to(device)
    fwd = backend.lstm_fwd(*args, lens_d, reverse)
    y, h_n, c_n, gates, cs = fwd
    assert [t.dtype for t in fwd] == [dtype] * 4 + [reference.acc_dtype(dtype)]
    grads = _to([dy, dh_n, dc_n], dtype, device)
    bwd = backend.lstm_bwd(*grads, args[1], args[5], args[4], gates, cs, lens_d, reverse)

    # truth: float64 reference on the same rounded inputs
    a64 = _f64(args)
    rf = reference.lstm_fwd(*a64, lens, reverse)
    rb = reference.lstm_bwd(*_f64(grads), a64[1], a64[5], a64[4], rf[3], rf[4], lens, reverse)
    tol = TOL[dtype]
    assert_close_all(fwd, rf, ["y", "h_n", "c_n", "gates", "cs"], tol)
    assert_close_all(bwd, rb, ["dxproj", "dh0", "dc0", "dh_seq"], tol)


# ------------------------------------------------------------------------------------- GRU
def check_gru(backend, device, dtype, T, B, H, lengths="unsorted", reverse=False, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = 1.0 / max(H, 1) ** 0.5
    xproj = _rand(gen, T, B, 3 * H)
    w_hh = _rand(gen, 3 * H, H, scale=k)
    b_hh = _rand(gen, 3 * H, scale=k) if bias else None
    h0 = _rand(gen, B, H)
    lens = _lengths(B, T, lengths)
    dy, dh_n = _rand(gen, T, B, H), _rand(gen, B, H)

    args = _to([xproj, w_hh, b_hh, h0], dtype, device)
    lens_d = None if lens is None else lens.to(device)
    fwd = backend.gru_fwd(*args, lens_d, reverse)
    y, h_n, gates = fwd
    assert [t.dtype for t in fwd] == [dtype] * 3
    grads = _to([dy, dh_n], dtype, device)
    bwd = backend.gru_bwd(*grads, args[1], args[3], y, gates, lens_d, reverse)

    a64 = _f64(args)
    rf = reference.gru_fwd(*a64, lens, reverse)
    # the backward reads h_{t-1} from y: feed the reference the backend's own (rounded) y so that
    # only the backward's error is measured here (the forward's y was checked above)
    rb = reference.gru_bwd(*_f64(grads), a64[1], a64[3], y.detach().cpu().double(), rf[2], lens, reverse)
    tol = TOL[dtype]
    assert_close_all(fwd, rf, ["y", "h_n", "gates"], tol)
    assert_close_all(bwd, rb, ["dxproj", "dh0", "dhn"], tol)


# ------------------------------------------------------------------------------------ cells
def check_lstm_cell(backend, device, dtype, B, H, bias=(True, True), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ig, hg = _rand(gen, B, 4 * H), _rand(gen, B, 4 * H)
    b_ih = _rand(gen, 4 * H) if bias[0] else None
    b_hh = _rand(gen, 4 * H) if bias[1] else None
    c = _rand(gen, B, H)
    dh, dc = _rand(gen, B, H), _rand(gen, B, H)
    args = _to([ig, hg, b_ih, b_hh, c], dtype, device)
    fwd = backend.lstm_cell_fwd(*args)
    h_new, c_new, gates = fwd
    gr = _to([dh, dc], dtype, device)
    bwd = backend.lstm_cell_bwd(*gr, args[4], c_new, gates)
    a64 = _f64(args)
    rf = reference.lstm_cell_fwd(*a64)
    rb = reference.lstm_cell_bwd(*_f64(gr), a64[4], rf[1], rf[2])
    assert_close_all(fwd, rf, ["h_new", "c_new", "gates"], TOL[dtype])
    assert_close_all(bwd, rb, ["dgates", "dc"], TOL[dtype])


def check_gru_cell(backend, device, dtype, B, H, bias=(True, True), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ig, hg = _rand(gen, B, 3 * H), _rand(gen, B, 3 * H)
    b_ih = _rand(gen, 3 * H) if bias[0] else None
    b_hh = _rand(gen, 3 * H) if bias[1] else None
    h = _rand(gen, B, H)
    dh = _rand(gen, B, H)
    args = _to([ig, hg, b_ih, b_hh, h], dtype, device)
    fwd = backend.gru_cell_fwd(*args)
    h_new, gates = fwd
    gr = _to([dh], dtype, device)
    bwd = backend.gru_cell_bwd(*gr, args[4], gates)
    a64 = _f64(args)
    rf = reference.gru_cell_fwd(*a64)
    rb = reference.gru_cell_bwd(*_f64(gr), a64[4], rf[1])
    assert_close_all(fwd, rf, ["h_new", "gates"], TOL[dtype])
    assert_close_all(bwd, rb, ["d_igates", "d_hgates", "dh"], TOL[dtype])


# ================================================================================ cpp (CPU)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", ["none", "unsorted"])
def test_lstm(dtype, H, reverse, lengths):
    check_lstm(cpp, "cpu", dtype, T=6, B=5, H=H, lengths=lengths, reverse=reverse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", ["none", "unsorted"])
def test_gru(dtype, H, reverse, lengths):
    check_gru(cpp, "cpu", dtype, T=6, B=5, H=H, lengths=lengths, reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H,P", [(3, 2), (37, 5), (129, 64), (1, 1)])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_lstm_proj(dtype, H, P, reverse):
    check_lstm(cpp, "cpu", dtype, T=5, B=4, H=H, P=P, lengths="unsorted", reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 4, 37), (7, 1, 37), (0, 3, 5), (3, 0, 5), (40, 2, 16)],
                         ids=["T1B1", "T1", "B1", "T0", "B0", "T40"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", ["lstm", "lstm_proj", "gru"])
def test_edge_shapes(dtype, shape, reverse, mode):
    T, B, H = shape
    lengths = "unsorted" if T > 0 and B > 0 else "none"
    if mode == "gru":
        check_gru(cpp, "cpu", dtype, T=T, B=B, H=H, lengths=lengths, reverse=reverse)
    else:
        check_lstm(cpp, "cpu", dtype, T=T, B=B, H=H, P=2 if mode == "lstm_proj" else 0, lengths=lengths,
                   reverse=reverse)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_no_bias_and_long_lengths(mode):
    # lengths beyond T mean "all T steps"; all-equal lengths must match lengths=None
    check = check_lstm if mode == "lstm" else check_gru
    check(cpp, "cpu", torch.float64, T=4, B=3, H=5, lengths="none", bias=False)
    T, B, H = 4, 3, 5
    gen = torch.Generator().manual_seed(1)
    G = 4 * H if mode == "lstm" else 3 * H
    x, w, h0 = _rand(gen, T, B, G), _rand(gen, G, H, scale=0.4), _rand(gen, B, H)
    full = torch.full((B,), T, dtype=torch.int64)
    if mode == "lstm":
        c0 = _rand(gen, B, H)
        a = cpp.lstm_fwd(x, w, None, h0, c0, None, full + 3, False)
        b = cpp.lstm_fwd(x, w, None, h0, c0, None, None, False)
    else:
        a = cpp.gru_fwd(x, w, None, h0, full + 3, True)
        b = cpp.gru_fwd(x, w, None, h0, None, True)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_inputs_not_modified_and_outputs_not_aliased():
    gen = torch.Generator().manual_seed(2)
    T, B, H = 3, 2, 4
    x, w, b = _rand(gen, T, B, 4 * H), _rand(gen, 4 * H, H), _rand(gen, 4 * H)
    h0, c0 = _rand(gen, B, H), _rand(gen, B, H)
    saved = [t.clone() for t in (x, w, b, h0, c0)]
    outs = cpp.lstm_fwd(x, w, b, h0, c0, None, None, False)
    for t, s in zip((x, w, b, h0, c0), saved):
        assert torch.equal(t, s)
    ptrs = {t.data_ptr() for t in (x, w, b, h0, c0)}
    assert not any(o.data_ptr() in ptrs for o in outs if o.numel())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN)
@pytest.mark.parametrize("bias", [(True, True), (False, True), (False, False)], ids=["bb", "nb", "nn"])
def test_cells(dtype, H, bias):
    check_lstm_cell(cpp, "cpu", dtype, B=4, H=H, bias=bias)
    check_gru_cell(cpp, "cpu", dtype, B=4, H=H, bias=bias)


def test_bad_inputs_raise():
    x = torch.randn(3, 2, 8)
    with pytest.raises(RuntimeError, match="w_hh"):
        cpp.lstm_fwd(x, torch.randn(8, 3), None, torch.zeros(2, 2), torch.zeros(2, 2), None, None, False)
    with pytest.raises(RuntimeError, match="lengths"):
        cpp.lstm_fwd(x, torch.randn(8, 2), None, torch.zeros(2, 2), torch.zeros(2, 2), None,
                     torch.tensor([1, 2, 3]), False)
    with pytest.raises(RuntimeError, match="h0"):
        cpp.gru_fwd(torch.randn(3, 2, 6), torch.randn(6, 2), None, torch.zeros(3, 2), None, False)


# ------------------------------------------------------------------------ argument checks
# Every C++ op checks the shapes of the op contract (csrc/include/fusedrnn/checks.h, shared by the
# CPU and CUDA implementations) and names the offending tensor: a kernel trusts these shapes for
# its pointer arithmetic (a short bias would be read out of bounds).  Each case: op, valid
# arguments, and one bad replacement (argument index, tensor, name the message must contain).
T_, B_, H_ = 3, 2, 4


def _valid_args():
    r = torch.randn
    lstm_fwd = [r(T_, B_, 4 * H_), r(4 * H_, H_), r(4 * H_), r(B_, H_), r(B_, H_), None,
                torch.tensor([3, 1]), False, False]
    lstm_bwd = [r(T_, B_, H_), r(B_, H_), r(B_, H_), r(4 * H_, H_), None, r(B_, H_), torch.rand(T_, B_, 4 * H_),
                r(T_, B_, H_), torch.tensor([3, 1]), False, False]
    gru_fwd = [r(T_, B_, 3 * H_), r(3 * H_, H_), r(3 * H_), r(B_, H_), torch.tensor([3, 1]), False, False]
    gru_bwd = [r(T_, B_, H_), r(B_, H_), r(3 * H_, H_), r(B_, H_), r(T_, B_, H_), torch.rand(T_, B_, 4 * H_),
               torch.tensor([3, 1]), False, False]
    lstm_cell_fwd = [r(B_, 4 * H_), r(B_, 4 * H_), r(4 * H_), r(4 * H_), r(B_, H_)]
    lstm_cell_bwd = [r(B_, H_), r(B_, H_), r(B_, H_), r(B_, H_), torch.rand(B_, 4 * H_)]
    gru_cell_fwd = [r(B_, 3 * H_), r(B_, 3 * H_), r(3 * H_), r(3 * H_), r(B_, H_)]
    gru_cell_bwd = [r(B_, H_), r(B_, H_), torch.rand(B_, 4 * H_)]
    return dict(lstm_fwd=lstm_fwd, lstm_bwd=lstm_bwd, gru_fwd=gru_fwd, gru_bwd=gru_bwd, lstm_cell_fwd=lstm_cell_fwd,
                lstm_cell_bwd=lstm_cell_bwd, gru_cell_fwd=gru_cell_fwd, gru_cell_bwd=gru_cell_bwd)


r_ = torch.randn
BAD_ARGS = [
    ("lstm_fwd", 0, r_(T_, B_, 4 * H_ + 1), "xproj"),
    ("lstm_fwd", 0, r_(T_, B_, 0), "xproj"),  # H = 0
    ("lstm_fwd", 1, r_(4 * H_ * H_), "w_hh"),  # w_hh.dim() == 1
    ("lstm_fwd", 1, r_(1, 4 * H_, H_), "w_hh"),
    ("lstm_fwd", 1, r_(4 * H_, H_ + 1), "w_hh"),  # P != H without w_hr
    ("lstm_fwd", 2, r_(4 * H_ - 1), "b_hh"),  # short bias
    ("lstm_fwd", 3, r_(B_, H_ + 1), "h0"),
    ("lstm_fwd", 4, r_(B_ + 1, H_), "c0"),
    ("lstm_fwd", 5, r_(H_, H_ + 1), "w_hr"),
    ("lstm_fwd", 6, torch.tensor([3, 1, 2]), "lengths"),
    ("lstm_fwd", 6, torch.tensor([2.5, 1.0]), "lengths"),  # not int64: never reinterpreted
    ("lstm_bwd", 0, r_(T_, B_ + 1, H_), "dy"),
    ("lstm_bwd", 1, r_(B_, H_ + 1), "dh_n"),
    ("lstm_bwd", 2, r_(B_, H_ - 1), "dc_n"),
    ("lstm_bwd", 3, r_(4 * H_), "w_hh"),
    ("lstm_bwd", 3, r_(4 * H_, H_ + 1), "w_hh"),  # P != H without w_hr
    ("lstm_bwd", 4, r_(H_ + 1, H_), "w_hr"),
    ("lstm_bwd", 5, r_(B_, 1), "c0"),
    ("lstm_bwd", 6, torch.rand(T_, B_, 4 * H_ + 2), "gates"),
    ("lstm_bwd", 7, r_(T_ + 1, B_, H_), "cs"),
    ("lstm_bwd", 8, torch.tensor([3]), "lengths"),
    ("gru_fwd", 0, r_(T_, B_, 3 * H_ + 1), "xproj"),
    ("gru_fwd", 1, r_(3 * H_ * H_), "w_hh"),
    ("gru_fwd", 1, r_(3 * H_, H_ + 1), "w_hh"),
    ("gru_fwd", 2, r_(3 * H_ - 1), "b_hh"),
    ("gru_fwd", 3, r_(B_, H_ + 1), "h0"),
    ("gru_fwd", 4, torch.tensor([3, 1], dtype=torch.int32), "lengths"),
    ("gru_bwd", 0, r_(T_, B_, H_ + 1), "dy"),
    ("gru_bwd", 1, r_(B_ + 1, H_), "dh_n"),
    ("gru_bwd", 2, r_(3 * H_ * H_), "w_hh"),
    ("gru_bwd", 3, r_(B_, H_ - 1), "h0"),
    ("gru_bwd", 4, r_(T_ - 1, B_, H_), "y"),
    ("gru_bwd", 5, torch.rand(T_, B_, 4 * H_ + 2), "gates"),
    ("gru_bwd", 6, torch.tensor([3, 1, 1]), "lengths"),
    ("lstm_cell_fwd", 1, r_(B_, 4 * H_ + 4), "hgates"),
    ("lstm_cell_fwd", 2, r_(4 * H_ - 1), "b_ih"),
    ("lstm_cell_fwd", 3, r_(2), "b_hh"),
    ("lstm_cell_fwd", 4, r_(B_, H_ + 1), "c"),
    ("lstm_cell_bwd", 0, r_(B_, H_ + 1), "dh_new"),
    ("lstm_cell_bwd", 1, r_(B_ + 1, H_), "dc_new"),
    ("lstm_cell_bwd", 2, r_(B_), "c"),
    ("lstm_cell_bwd", 3, r_(B_, 1), "c_new"),
    ("lstm_cell_bwd", 4, torch.rand(B_, 4 * H_ + 1), "gates"),
    ("gru_cell_fwd", 2, r_(3 * H_ + 1), "b_ih"),
    ("gru_cell_fwd", 3, r_(3 * H_ - 1), "b_hh"),
    ("gru_cell_fwd", 4, r_(B_, H_ + 1), "h"),
    ("gru_cell_bwd", 0, r_(B_, H_ + 1), "dh_new"),
    ("gru_cell_bwd", 1, r_(B_ + 1, H_), "h"),
]
_BAD_IDS = [f"{op}-{name}-{i}" for i, (op, _, _, name) in enumerate(BAD_ARGS)]


def _with_bad(op, index, bad):
    args = _valid_args()[op]
    args[index] = bad
    return args


@pytest.mark.parametrize("op", sorted(_valid_args()))
def test_valid_args_run(op):
    # the baseline of the cases below: only the replaced argument is wrong there
    getattr(torch.ops.fusedrnn_ext, op)(*_valid_args()[op])


@pytest.mark.parametrize("op,index,bad,name", BAD_ARGS, ids=_BAD_IDS)
def test_bad_args_named_cpu(op, index, bad, name):
    with pytest.raises(RuntimeError, match=rf"fusedrnn {op}: {name} must"):
        getattr(torch.ops.fusedrnn_ext, op)(*_with_bad(op, index, bad))


def test_lstm_bwd_rejects_p_without_projection():
    # w_hh (4H, P) with P != H but no w_hr, every other shape consistent with P: the CPU backward
    # used to run (reading the (B, P) state as (B, H)); it must raise like the forward does
    P = H_ + 3
    args = _valid_args()["lstm_bwd"]
    args[0], args[1], args[3] = torch.randn(T_, B_, P), torch.randn(B_, P), torch.randn(4 * H_, P)
    with pytest.raises(RuntimeError, match="fusedrnn lstm_bwd: w_hh must have shape .* without a projection"):
        cpp.lstm_bwd(*args[:-1])


# The CUDA implementations run the same checks before touching a device: called with CPU tensors
# (redispatched to the CUDA kernel, no GPU needed) they must name the bad tensor, and with valid
# shapes name the first tensor that is not on a CUDA device, instead of failing inside a
# CUDAGuard built from a CPU device.
def _has_cuda_kernels():
    return torch._C._dispatch_has_kernel_for_dispatch_key("fusedrnn_ext::lstm_fwd", "CUDA")


needs_cuda_kernels = pytest.mark.skipif(not _has_cuda_kernels(), reason="fusedrnn._C built without CUDA")


def _call_cuda_kernel(op, args):
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return getattr(torch.ops.fusedrnn_ext, op).default.redispatch(keys, *args)


@needs_cuda_kernels
@pytest.mark.parametrize("op,index,bad,name", BAD_ARGS, ids=_BAD_IDS)
def test_bad_args_named_cuda(op, index, bad, name):
    with pytest.raises(RuntimeError, match=rf"fusedrnn {op}: {name} must"):
        _call_cuda_kernel(op, _with_bad(op, index, bad))


@needs_cuda_kernels
@pytest.mark.parametrize("op", sorted(_valid_args()))
def test_cuda_op_rejects_cpu_tensors(op):
    first = {"lstm_fwd": "xproj", "gru_fwd": "xproj", "lstm_bwd": "dy", "gru_bwd": "dy", "lstm_cell_fwd": "igates",
             "gru_cell_fwd": "igates", "lstm_cell_bwd": "gates", "gru_cell_bwd": "gates"}[op]
    with pytest.raises(RuntimeError, match=rf"fusedrnn CUDA {op}: {first} must be a CUDA tensor, got cpu"):
        _call_cuda_kernel(op, _valid_args()[op])


def test_unsupported(monkeypatch):
    from fusedrnn.backends import RecurrenceConfig

    monkeypatch.delenv("FUSEDRNN_CUDA_EMULATION", raising=False)  # (it would run cuda on CPU)
    cfg = RecurrenceConfig("LSTM", "cpu", -1, torch.float32, 64)
    assert cpp.unsupported(cfg) is None
    assert "CPU" in cpp.unsupported(RecurrenceConfig("LSTM", "cuda", 0, torch.float32, 64))
    assert "CUDA" in cuda.unsupported(cfg)


def test_build_info():
    info = cpp.extension().build_info()
    assert set(info) >= {"with_cuda", "cuda_version", "cuda_archs", "torch_version"}
    assert info["torch_version"].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
    if info["with_cuda"]:
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
        assert info["cuda_archs"]
        assert hasattr(cpp.extension(), "max_hidden_size")


# -------------------------------------------------------------------------------- opcheck
def _opcheck_samples():
    gen = torch.Generator().manual_seed(3)
    T, B, H, P = 3, 4, 5, 2
    f = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    lens = torch.tensor([3, 1, 2, 3])
    x4, w, b, h0, c0 = f(T, B, 4 * H), f(4 * H, H), f(4 * H), f(B, H), f(B, H)
    wp, wr, h0p = f(4 * H, P), f(P, H), f(B, P)
    y, _, _, gates, cs = cpp.lstm_fwd(x4, w, b, h0, c0, None, lens, False)
    _, _, _, gates_p, cs_p = cpp.lstm_fwd(x4, wp, None, h0p, c0, wr, lens, True)
    x3, w3, b3 = f(T, B, 3 * H), f(3 * H, H), f(3 * H)
    gy, _, ggates = cpp.gru_fwd(x3, w3, b3, h0, lens, False)
    ops = torch.ops.fusedrnn_ext
    _, c_new, cg = cpp.lstm_cell_fwd(f(B, 4 * H), f(B, 4 * H), b, None, c0)
    _, gcg = cpp.gru_cell_fwd(f(B, 3 * H), f(B, 3 * H), None, b3, h0)
    return [
        (ops.lstm_fwd, (x4, w, b, h0, c0, None, lens, False, False)),
        (ops.lstm_fwd, (x4, wp, None, h0p, c0, wr, None, True, False)),
        (ops.lstm_bwd, (f(T, B, H), f(B, H), f(B, H), w, None, c0, gates, cs, lens, False, False)),
        (ops.lstm_bwd, (f(T, B, P), f(B, P), f(B, H), wp, wr, c0, gates_p, cs_p, lens, True, False)),
        (ops.gru_fwd, (x3, w3, b3, h0, lens, False, False)),
        (ops.gru_fwd, (x3, w3, None, h0, None, True, False)),
        (ops.gru_bwd, (f(T, B, H), f(B, H), w3, h0, gy, ggates, lens, False, False)),
        (ops.lstm_cell_fwd, (f(B, 4 * H), f(B, 4 * H), b, None, c0)),
        (ops.lstm_cell_bwd, (f(B, H), f(B, H), c0, c_new, cg)),
        (ops.gru_cell_fwd, (f(B, 3 * H), f(B, 3 * H), None, b3, h0)),
        (ops.gru_cell_bwd, (f(B, H), h0, gcg)),
    ]


@pytest.mark.parametrize("index", range(11))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op.default, args)


# ================================================================================ cuda (GPU)
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN + [256])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", ["none", "unsorted"])
def test_cuda_lstm(no_tf32, dtype, H, reverse, lengths):
    check_lstm(cuda, "cuda", dtype, T=6, B=5, H=H, lengths=lengths, reverse=reverse)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN + [256])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("lengths", ["none", "unsorted"])
def test_cuda_gru(no_tf32, dtype, H, reverse, lengths):
    check_gru(cuda, "cuda", dtype, T=6, B=5, H=H, lengths=lengths, reverse=reverse)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("H,P", [(3, 2), (37, 5), (129, 64)])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_cuda_lstm_proj(no_tf32, dtype, H, P, reverse):
    check_lstm(cuda, "cuda", dtype, T=5, B=4, H=H, P=P, reverse=reverse)


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 4, 37), (7, 1, 37), (0, 3, 5), (300, 3, 64)],
                         ids=["T1B1", "T1", "B1", "T0", "T300"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_cuda_edge_shapes(no_tf32, shape, mode):
    T, B, H = shape
    check = check_lstm if mode == "lstm" else check_gru
    check(cuda, "cuda", torch.float32, T=T, B=B, H=H, lengths="unsorted" if T > 0 else "none")


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_cuda_tf32(mode):
    global TOL
    saved = TOL[torch.float32]
    TOL[torch.float32] = 2e-3  # TF32: 10-bit mantissa in the recurrent GEMM
    try:
        with rnn_tf32(True):
            check = check_lstm if mode == "lstm" else check_gru
            check(cuda, "cuda", torch.float32, T=6, B=5, H=129)
    finally:
        TOL[torch.float32] = saved


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H", HIDDEN)
def test_cuda_cells(dtype, H):
    check_lstm_cell(cuda, "cuda", dtype, B=4, H=H)
    check_gru_cell(cuda, "cuda", dtype, B=4, H=H, bias=(False, True))


@gpu
@needs_cuda
def test_cuda_max_hidden_size():
    from fusedrnn.backends import RecurrenceConfig

    for mode in ("LSTM", "GRU"):
        for dtype in (torch.float32, torch.bfloat16):
            limit = cuda.max_hidden_size(mode, dtype, torch.cuda.current_device())
            assert limit > 0
            cfg = RecurrenceConfig(mode, "cuda", torch.cuda.current_device(), dtype, limit + 1)
            assert "max_hidden_size" in cuda.unsupported(cfg)


# ----------------------------------------------------------------- inference path (save=False)
def _fwd_args(mode, dtype, T=5, B=3, H=7, P=0, seed=4):
    gen = torch.Generator().manual_seed(seed)
    G = (4 if mode == "lstm" else 3) * H
    Pn = P or H
    args = [_rand(gen, T, B, G), _rand(gen, G, Pn, scale=H ** -0.5), _rand(gen, G), _rand(gen, B, Pn)]
    if mode == "lstm":
        args += [_rand(gen, B, H), _rand(gen, Pn, H, scale=H ** -0.5) if P else None]
    lens = torch.tensor([T, 1, max(1, T - 2)][:B] + [T] * max(0, B - 3), dtype=torch.int64)
    return [None if a is None else a.to(dtype) for a in args], lens


def check_save_false(backend, device, mode, dtype, P=0):
    args, lens = _fwd_args(mode, dtype, P=P)
    args = [None if a is None else a.to(device) for a in args]
    lens = lens.to(device)
    fwd = backend.lstm_fwd if mode == "lstm" else backend.gru_fwd
    full = fwd(*args, lens, False)
    inf = fwd(*args, lens, False, save=False)
    n_state = 3 if mode == "lstm" else 2
    saved = list(inf[n_state:])
    for s, f in zip(saved, full[n_state:]):
        assert s.shape == (0,) and s.dtype == f.dtype and s.device == f.device
    # the outputs are the same function of the inputs (same kernels; the geometry may differ)
    ref = (reference.lstm_fwd if mode == "lstm" else reference.gru_fwd)(*_f64(args), lens.cpu(), False)
    assert_close_all(inf[:n_state], ref[:n_state], ["y", "h_n", "c_n"][:n_state], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,P", [("lstm", 0), ("lstm", 3), ("gru", 0)])
def test_save_false_cpp(dtype, mode, P):
    check_save_false(cpp, "cpu", mode, dtype, P)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_save_false_reference(mode):
    args, lens = _fwd_args(mode, torch.float64)
    fwd = reference.lstm_fwd if mode == "lstm" else reference.gru_fwd
    full, inf = fwd(*args, lens, True), fwd(*args, lens, True, save=False)
    n = 3 if mode == "lstm" else 2
    for a, b in zip(full[:n], inf[:n]):
        assert torch.equal(a, b)
    assert all(t.shape == (0,) for t in inf[n:])
    assert [t.dtype for t in inf[n:]] == [t.dtype for t in full[n:]]


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_opcheck_save_false(mode):
    args, lens = _fwd_args(mode, torch.float32)
    op = torch.ops.fusedrnn_ext.lstm_fwd if mode == "lstm" else torch.ops.fusedrnn_ext.gru_fwd
    torch.library.opcheck(op.default, (*args, lens, False, False, False))


# ---------------------------------------------------- cuda (GPU): planner variants, fit, save
PLAN_VARIANTS = [("auto", 0), ("legacy", 0), ("barrier", 0), ("flags", 0), ("barrier", 3), ("flags", 2),
                 ("stepwise", 0)]


@pytest.fixture(params=PLAN_VARIANTS, ids=[f"{v}-g{g}" for v, g in PLAN_VARIANTS])
def plan_variant(request, monkeypatch):
    """FUSEDRNN_CUDA_PLAN / FUSEDRNN_CUDA_GROUPS for the test (read by the planner on every call)."""
    variant, groups = request.param
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", variant)
    monkeypatch.setenv("FUSEDRNN_CUDA_GROUPS", str(groups))
    return request.param


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,T,B,H,P", [("lstm", 6, 20, 129, 0), ("gru", 6, 20, 129, 0), ("lstm", 5, 70, 256, 0),
                                         ("gru", 5, 45, 300, 0), ("lstm", 5, 9, 100, 37), ("lstm", 4, 1, 3, 0)])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_cuda_plan_variants(plan_variant, no_tf32, dtype, mode, T, B, H, P, reverse):
    # every geometry and exchange protocol of the planner computes the same function
    if mode == "lstm":
        check_lstm(cuda, "cuda", dtype, T=T, B=B, H=H, P=P, lengths="unsorted", reverse=reverse)
    else:
        check_gru(cuda, "cuda", dtype, T=T, B=B, H=H, lengths="unsorted", reverse=reverse)


@gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_cuda_plan_variants_tf32(plan_variant, mode):
    global TOL
    saved = TOL[torch.float32]
    TOL[torch.float32] = 2e-3  # TF32: 10-bit mantissa in the recurrent GEMM
    try:
        with rnn_tf32(True):
            check = check_lstm if mode == "lstm" else check_gru
            check(cuda, "cuda", torch.float32, T=6, B=40, H=129)
    finally:
        TOL[torch.float32] = saved


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode,P", [("lstm", 0), ("lstm", 5), ("gru", 0)])
def test_cuda_save_false(no_tf32, dtype, mode, P):
    check_save_false(cuda, "cuda", mode, dtype, P)


@gpu
@needs_cuda
@pytest.mark.parametrize("mode,dtype,P", [("LSTM", torch.bfloat16, 0), ("GRU", torch.bfloat16, 0),
                                          ("LSTM", torch.bfloat16, 256), ("LSTM", torch.float32, 0),
                                          ("GRU", torch.float64, 0)])
def test_cuda_runs_at_the_limit(no_tf32, mode, dtype, P):
    # the analytic fit model's largest size launches (the occupancy API must agree, else the
    # launch raises an internal error) and computes the right values
    dev = torch.cuda.current_device()
    H = cuda.max_hidden_size(mode, dtype, dev, P)
    assert H > 0 and H == fusedrnn_max_hidden(mode, dtype, P)
    if mode == "LSTM":
        check_lstm(cuda, "cuda", dtype, T=3, B=2, H=H, P=P, lengths="none")
    else:
        check_gru(cuda, "cuda", dtype, T=3, B=2, H=H, lengths="none")


def fusedrnn_max_hidden(mode, dtype, P):
    import fusedrnn

    return fusedrnn.max_hidden_size(mode, dtype, backend="cuda", proj_size=P,
                                    device=torch.cuda.get_device_properties(torch.cuda.current_device()))


@gpu
@needs_cuda
def test_cuda_op_names_the_limit_beyond_it(no_tf32):
    H = cuda.max_hidden_size("LSTM", torch.bfloat16, torch.cuda.current_device()) + 1
    with pytest.raises(RuntimeError, match=rf"hidden_size={H} .*does not fit on chip.*largest hidden_size there is {H - 1}"):
        check_lstm(cuda, "cuda", torch.bfloat16, T=2, B=1, H=H, lengths="none")
