"""Triton GRU kernels (``fusedrnn.backends.triton.gru``) against ``reference.py``.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest): the
single-program path, the split path launched stepwise (> 1 program per batch tile: the hidden-slice
logic and the h / [dr|dz|dhn] exchange) and the persistent path with one program (grid barrier as
a CTA barrier).  ``@pytest.mark.gpu`` tests run the same checks on CUDA with the persistent
multi-program grid barrier.
"""

import pytest
import torch

from fusedrnn.backends import reference as ref
from fusedrnn.backends import rnn_tf32_enabled
from tolerances import RTOL, TF32_RTOL, assert_close

triton = pytest.importorskip("triton")
from fusedrnn.backends.triton import _common as C  # noqa: E402
from fusedrnn.backends.triton import gru as G  # noqa: E402

CPU = torch.device("cpu")


def _dtname(dtype):
    return str(dtype).replace("torch.", "")


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else CPU


def _rtol(dtype, device):
    if dtype == torch.float32 and device.type == "cuda" and rnn_tf32_enabled():
        return TF32_RTOL
    return RTOL[dtype]


def _inputs(T, B, H, dtype, device, bias=True, lengths=None, scale=0.5):
    g = torch.Generator().manual_seed(1234 + 7 * T + 13 * B + H)
    f = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * scale)  # noqa: E731
    xproj = f(T, B, 3 * H)
    w = f(3 * H, H) / max(1.0, H**0.5) * 2
    b = f(3 * H) if bias else None
    h0 = f(B, H)
    dy = f(T, B, H)
    dhn = f(B, H)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device)
    return [cast(t) for t in (xproj, w, b, h0, dy, dhn)] + [lens]


def _reference(xproj, w, b, h0, dy, dhn, lens, reverse):
    """Reference in float64 on the (rounded) low-precision inputs."""
    d = lambda t: None if t is None else t.to(torch.float64).cpu()  # noqa: E731
    lens_c = None if lens is None else lens.cpu()
    y, hn, gates = ref.gru_fwd(d(xproj), d(w), d(b), d(h0), lens_c, reverse)
    dx, dh0, dhs = ref.gru_bwd(d(dy), d(dhn), d(w), d(h0), y, gates, lens_c, reverse)
    return (y, hn, gates), (dx, dh0, dhs)


def _check(T, B, H, dtype, device, reverse=False, lengths=None, bias=True, mode=None, block_u=None):
    xproj, w, b, h0, dy, dhn, lens = _inputs(T, B, H, dtype, device, bias, lengths)
    before = dict(C.LAUNCHES)
    ctx = C.force_variant(mode=mode, block_u=block_u) if (mode or block_u) else _nullctx()
    with ctx:
        y, hn, gates = G.gru_fwd(xproj, w, b, h0, lens, reverse)
        # backward on the kernel's own forward outputs (as ops.py does)
        dx, dh0, dhs = G.gru_bwd(dy, dhn, w, h0, y, gates, lens, reverse)
    assert C.LAUNCHES["gru_fwd"] > before.get("gru_fwd", 0)
    assert C.LAUNCHES["gru_bwd"] > before.get("gru_bwd", 0)
    (ry, rhn, rg), (rdx, rdh0, rdhs) = _reference(xproj, w, b, h0, dy, dhn, lens, reverse)
    for t, shape in ((y, (T, B, H)), (hn, (B, H)), (gates, (T, B, 4 * H)), (dx, (T, B, 3 * H)),
                     (dh0, (B, H)), (dhs, (T, B, H))):
        assert t.shape == shape and t.dtype == dtype and t.device.type == device.type
    rtol = _rtol(dtype, device)
    assert_close([y, hn, gates], [ry, rhn, rg], dtype, ["y", "h_n", "gates"], rtol=rtol)
    # backward compared with the reference backward run on the kernel's forward outputs, so a
    # forward rounding difference does not count twice
    d = lambda t: t.to(torch.float64).cpu()  # noqa: E731
    lens_c = None if lens is None else lens.cpu()
    rdx2, rdh02, rdhs2 = ref.gru_bwd(d(dy), d(dhn), d(w), d(h0), d(y), d(gates), lens_c, reverse)
    assert_close([dx, dh0, dhs], [rdx2, rdh02, rdhs2], dtype, ["dxproj", "dh0", "dhn"], rtol=rtol)
    if lens is not None:  # padded steps: exact zeros
        pad = ~ref.valid_mask(lens_c, T, B, CPU)
        for t in (y, gates, dx, dhs):
            assert (t.cpu()[pad] == 0).all()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------- CPU (interpreter)
@pytest.mark.parametrize("H", [1, 3, 37])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtname)
def test_single_program(H, dtype):
    _check(T=4, B=2, H=H, dtype=dtype, device=CPU)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtname)
def test_single_program_low_precision(dtype):
    _check(T=5, B=3, H=37, dtype=dtype, device=CPU)


def test_h129_fp32_split_auto():
    # H=129 pads to 256: the selection rule splits (stepwise under the interpreter)
    v = C.select_variant(3, 129, 129, 2, torch.float32, CPU)
    assert v.n_unit_progs > 1
    _check(T=2, B=2, H=129, dtype=torch.float32, device=CPU)


def test_h129_fp64():
    _check(T=2, B=1, H=129, dtype=torch.float64, device=CPU, reverse=True, lengths=[1])


def test_h129_bf16_split_auto():
    _check(T=2, B=2, H=129, dtype=torch.bfloat16, device=CPU, lengths=[2, 1])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dtname)
def test_unsorted_lengths(reverse, dtype):
    _check(T=5, B=3, H=3, dtype=dtype, device=CPU, reverse=reverse, lengths=[3, 5, 1])


def test_t1_b1_no_bias():
    _check(T=1, B=1, H=3, dtype=torch.float64, device=CPU, bias=False)
    _check(T=1, B=1, H=1, dtype=torch.float32, device=CPU, reverse=True)


@pytest.mark.parametrize("reverse,lengths", [(False, None), (True, [2, 4, 3])])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=_dtname)
def test_split_stepwise(reverse, lengths, dtype):
    # 37 units over 3 programs of 16 (the last one partly masked), one launch per step
    with C.force_variant(mode="stepwise", block_u=16):
        v = C.select_variant(3, 37, 37, 3, dtype, CPU)
    assert v.mode == "stepwise" and v.n_unit_progs == 3
    _check(T=4, B=3, H=37, dtype=dtype, device=CPU, reverse=reverse, lengths=lengths, mode="stepwise",
           block_u=16)


def test_split_stepwise_counts_launches():
    T = 3
    before = C.LAUNCHES["gru_fwd"], C.LAUNCHES["gru_bwd"]
    _check(T=T, B=2, H=20, dtype=torch.float64, device=CPU, mode="stepwise", block_u=16)
    assert C.LAUNCHES["gru_fwd"] - before[0] == T
    assert C.LAUNCHES["gru_bwd"] - before[1] == 2 * T  # phase A and phase B launches per step


@pytest.mark.parametrize("reverse,lengths", [(False, None), (True, [1, 4])])
def test_persistent_one_program(reverse, lengths):
    # split-mode code (exchange buffers + grid barrier) with a single program per tile
    before = C.LAUNCHES["gru_fwd"]
    _check(T=4, B=2, H=13, dtype=torch.float64, device=CPU, reverse=reverse, lengths=lengths,
           mode="persistent", block_u=16)
    assert C.LAUNCHES["gru_fwd"] - before == 1


def test_persistent_barrier_timeout_raises():
    # 2 programs per tile under the interpreter are never co-resident: the bounded spin must turn
    # the would-be hang into an error
    xproj, w, b, h0, *_ = _inputs(2, 1, 20, torch.float32, CPU)
    with C.force_variant(mode="persistent", block_u=16), pytest.raises(RuntimeError, match="barrier"):
        G.gru_fwd(xproj, w, b, h0, None, False)


def test_launch_counter_single():
    before = C.LAUNCHES["gru_fwd"], C.LAUNCHES["gru_bwd"]
    _check(T=6, B=2, H=3, dtype=torch.float32, device=CPU)
    # single program: one launch for the whole sequence
    assert (C.LAUNCHES["gru_fwd"] - before[0], C.LAUNCHES["gru_bwd"] - before[1]) == (1, 1)


def test_over_limit_raises():
    limit = G.max_hidden_size(torch.float32, CPU)
    assert limit >= 129
    H = limit + 1
    xproj = torch.zeros(1, 1, 3 * H)
    w = torch.zeros(3 * H, H)
    with pytest.raises(ValueError, match=str(limit)):
        G.gru_fwd(xproj, w, None, torch.zeros(1, H), None, False)
    assert str(limit) in G.unsupported_gru(torch.float32, H, "cpu", CPU)
    assert G.unsupported_gru(torch.float32, limit, "cpu", CPU) is None


def test_empty_batch_and_sequence():
    xproj, w, b, h0, dy, dhn, _ = _inputs(2, 0, 3, torch.float32, CPU)
    y, hn, gates = G.gru_fwd(xproj, w, b, h0, None, False)
    assert y.shape == (2, 0, 3) and hn.shape == (0, 3) and gates.shape == (2, 0, 12)
    xproj, w, b, h0, dy, dhn, _ = _inputs(0, 2, 3, torch.float32, CPU)
    y, hn, gates = G.gru_fwd(xproj, w, b, h0, None, False)
    assert y.shape == (0, 2, 3) and torch.equal(hn, h0)
    dx, dh0, dhs = G.gru_bwd(dy, dhn, w, h0, y, gates, None, False)
    assert dx.shape == (0, 2, 9) and dhs.shape == (0, 2, 3) and torch.equal(dh0, dhn)


# ------------------------------------------------------------------------ inference (save=False)
def _check_nosave(T, B, H, dtype, device, reverse=False, lengths=None, bias=True):
    """Issue 10 item 1: ``save=False`` returns a (0,) gates tensor of xproj's dtype and y, h_n
    bitwise equal to ``save=True`` (itself checked against the reference), with the same launches."""
    from fusedrnn.backends import triton as TB

    xproj, w, b, h0, _, _, lens = _inputs(T, B, H, dtype, device, bias, lengths)
    before = C.LAUNCHES["gru_fwd"]
    y, hn, gates = TB.gru_fwd(xproj, w, b, h0, lens, reverse)  # the backend entry point (ops.py)
    mid = C.LAUNCHES["gru_fwd"]
    y2, hn2, gates2 = TB.gru_fwd(xproj, w, b, h0, lens, reverse, save=False)
    assert C.LAUNCHES["gru_fwd"] - mid == mid - before
    assert gates.shape == (T, B, 4 * H) and gates2.shape == (0,) and gates2.dtype == dtype
    assert gates2.device.type == device.type
    for name, o, f in (("y", y2, y), ("h_n", hn2, hn)):
        assert o.shape == f.shape and o.dtype == f.dtype, name
        assert torch.isfinite(o).all() and torch.equal(o, f), name
    if T and B:
        d = lambda t: None if t is None else t.to(torch.float64).cpu()  # noqa: E731
        ry, rhn, _ = ref.gru_fwd(d(xproj), d(w), d(b), d(h0), None if lens is None else lens.cpu(), reverse)
        assert_close([y2, hn2], [ry, rhn], dtype, ["y", "h_n"], rtol=_rtol(dtype, device))
    return mid - before


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=_dtname)
@pytest.mark.parametrize("reverse", [False, True])
def test_nosave_single(dtype, reverse):
    # one program owns every unit (h in registers); a zero-length sequence among the lengths
    _check_nosave(T=5, B=4, H=13, dtype=dtype, device=CPU, reverse=reverse, lengths=[5, 0, 3, 1])


def test_nosave_split_stepwise():
    with C.force_variant(mode="stepwise", block_u=16):
        n = _check_nosave(T=4, B=3, H=37, dtype=torch.float64, device=CPU, reverse=True, lengths=[2, 0, 4])
    assert n == 4


def test_nosave_persistent_no_bias():
    with C.force_variant(mode="persistent", block_u=16):
        n = _check_nosave(T=4, B=2, H=13, dtype=torch.bfloat16, device=CPU, bias=False, lengths=[0, 4])
    assert n == 1


def test_nosave_multi_chunk_batch(monkeypatch):
    # on a (described) 1-SM device, 5 batch tiles of 16 rows need >= 2 sequential persistent launches
    one_sm = C.DeviceInfo(1, 227 * 1024, (9, 0), 228 * 1024)
    monkeypatch.setattr(C, "device_info", lambda device=None: one_sm)
    with C.force_variant(mode="persistent", block_u=32, block_b=16):
        v = C.select_variant(3, 21, 21, 80, torch.float32, info=one_sm)
        assert v.mode == "persistent" and C.cdiv(C.cdiv(80, v.block_b), v.n_batch_tiles) >= 2
        n = _check_nosave(T=3, B=80, H=21, dtype=torch.float32, device=CPU, lengths=[(i * 7) % 4 for i in range(80)])
    assert n >= 2


def test_nosave_falls_back_to_training_kernel(monkeypatch):
    # the inference kernel refused after compilation (as GRU bf16 H=1365 under triton 3.8 on sm_90,
    # 72 B of stack): the training kernel runs into scratch gates, results unchanged
    import fusedrnn.backends as backends

    real = C.checked_variant

    def fake(cands, compile_fn, key, info):
        if dict(key[4])["SAVE"] == "False":
            raise C.NoCompiledFit("fusedrnn triton: no variant fits the device after compilation: (test)")
        return real(cands, compile_fn, key, info)

    monkeypatch.setattr(C, "checked_variant", fake)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="training kernel"):
        _check_nosave(T=3, B=2, H=5, dtype=torch.float64, device=CPU, lengths=[0, 3])


def test_nosave_empty_shapes():
    for T, B in ((0, 2), (3, 0)):
        _check_nosave(T=T, B=B, H=3, dtype=torch.float32, device=CPU)


# ---------------------------------------------------------------------------------------- cells
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=_dtname)
@pytest.mark.parametrize("H,bias", [(1, True), (37, False), (129, True)])
def test_cell(dtype, H, bias):
    _check_cell(3, H, dtype, CPU, bias)


def _check_cell(B, H, dtype, device, bias):
    g = torch.Generator().manual_seed(H)
    f = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    ig, hg, h, dhnew = f(B, 3 * H), f(B, 3 * H), f(B, H), f(B, H)
    bih, bhh = (f(3 * H), f(3 * H)) if bias else (None, None)
    before = C.LAUNCHES["gru_cell_fwd"], C.LAUNCHES["gru_cell_bwd"]
    h_new, gates = G.gru_cell_fwd(ig, hg, bih, bhh, h)
    d_i, d_h, dh = G.gru_cell_bwd(dhnew, h, gates)
    assert C.LAUNCHES["gru_cell_fwd"] > before[0] and C.LAUNCHES["gru_cell_bwd"] > before[1]
    d = lambda t: None if t is None else t.to(torch.float64).cpu()  # noqa: E731
    rh, rg = ref.gru_cell_fwd(d(ig), d(hg), d(bih), d(bhh), d(h))
    assert_close([h_new, gates], [rh, rg], dtype, ["h_new", "gates"])
    ri, rhh, rdh = ref.gru_cell_bwd(d(dhnew), d(h), d(gates))
    assert_close([d_i, d_h, dh], [ri, rhh, rdh], dtype, ["d_igates", "d_hgates", "dh"])
    assert h_new.dtype == gates.dtype == d_i.dtype == dtype


# ------------------------------------------------------------------------------------------ GPU
GPU = pytest.mark.gpu


@GPU
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=_dtname)
@pytest.mark.parametrize("H", [1, 3, 37, 129])
@pytest.mark.parametrize("reverse,lengths", [(False, None), (True, [5, 2, 6])])
def test_gpu_auto(dtype, H, reverse, lengths):
    _check(T=6, B=3, H=H, dtype=dtype, device=_device(), reverse=reverse, lengths=lengths)


@GPU
@pytest.mark.parametrize("mode", ["persistent", "stepwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtname)
def test_gpu_split(mode, dtype):
    _check(T=6, B=3, H=129, dtype=dtype, device=_device(), reverse=True, lengths=[6, 1, 4], mode=mode,
           block_u=16)


@GPU
def test_gpu_large_persistent():
    # H=768 bf16, B=20 (two batch tiles), the performance shape class: many programs + barrier
    _check(T=8, B=20, H=768, dtype=torch.bfloat16, device=_device(), lengths=[8] * 19 + [3])


@GPU
def test_gpu_issue8_register_budget():
    # issue 8: GRU bf16 H=130 B=1456 compiled to 32 registers with 33 KB of spills before
    _check(T=2, B=1456, H=130, dtype=torch.bfloat16, device=_device())


@GPU
@pytest.mark.parametrize("H,B", [(768, 16), (768, 64), (130, 1456)])
def test_gpu_nosave(H, B):
    # the persistent grid (H=768), programs side by side (B=64), sequential batch chunks (B=1456)
    _check_nosave(T=5, B=B, H=H, dtype=torch.bfloat16, device=_device(), reverse=True,
                  lengths=[5, 0, 3, 1] * (B // 4))


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtname)
def test_gpu_cell(dtype):
    _check_cell(5, 300, dtype, _device(), True)
