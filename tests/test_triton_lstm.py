"""Kernel-level tests of the Triton LSTM kernels against ``backends/reference.py``.

On CPU they run under the Triton interpreter (``TRITON_INTERPRET=1``, set here before triton is
imported; the session conftest sets it too).  ``@pytest.mark.gpu`` tests run the compiled kernels
(persistent grid barrier with many programs) on CUDA when present and not interpreting.
Tolerances: relative norms from tests/tolerances.py (fp64 1e-10, fp32 1e-5, fp16 1e-2, bf16 2e-2).
"""

import dataclasses
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

triton = pytest.importorskip("triton")

from fusedrnn.backends import RecurrenceConfig  # noqa: E402
from fusedrnn.backends import reference as R  # noqa: E402
from fusedrnn.backends import triton as TB  # noqa: E402
from fusedrnn.backends.triton import _common as C  # noqa: E402
from fusedrnn.backends.triton import lstm as L  # noqa: E402

INTERPRET = C.interpret_mode()
try:  # the suite's one tolerance table (tests/tolerances.py)
    from tolerances import RTOL as TOL
except ImportError:  # pragma: no cover
    TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}

cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU tests need TRITON_INTERPRET=1 (set before triton is imported)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device and TRITON_INTERPRET unset"
)


def rel(out, ref):
    out, ref = out.double(), ref.double()
    n = ref.norm()
    return ((out - ref).norm() / (n if n > 0 else 1.0)).item()


def make_inputs(T, B, H, P, dtype, device, bias=True, proj=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 4 * H
    rn = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)  # noqa: E731
    P = P if proj else H
    return dict(
        xproj=rn(T, B, G),
        w_hh=rn(G, P, scale=P**-0.5),
        b_hh=rn(G) if bias else None,
        h0=rn(B, P),
        c0=rn(B, H),
        w_hr=rn(P, H, scale=H**-0.5) if proj else None,
        dy=rn(T, B, P),
        dh_n=rn(B, P),
        dc_n=rn(B, H),
    )


def check_lstm(T, B, H, dtype, device="cpu", P=None, proj=False, reverse=False, lengths=None, bias=True, seed=0):
    a = make_inputs(T, B, H, P or H, dtype, device, bias=bias, proj=proj, seed=seed)
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device)
    args = (a["xproj"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], a["w_hr"], lens, reverse)
    out = L.lstm_fwd(*args)
    ref = R.lstm_fwd(*args)
    tol = TOL[dtype]
    names = ("y", "h_n", "c_n", "gates", "cs")
    for name, o, r in zip(names, out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, (name, o.shape, r.shape, o.dtype, r.dtype)
        assert torch.isfinite(o).all(), name
        assert rel(o, r) <= tol, (name, rel(o, r))
    # backward from the reference's saved tensors (kernel-level: same inputs for both)
    bargs = (a["dy"], a["dh_n"], a["dc_n"], a["w_hh"], a["w_hr"], a["c0"], ref[3], ref[4], lens, reverse)
    bout = L.lstm_bwd(*bargs)
    bref = R.lstm_bwd(*bargs)
    for name, o, r in zip(("dxproj", "dh0", "dc0", "dh_seq"), bout, bref):
        assert o.shape == r.shape and o.dtype == r.dtype, (name, o.shape, r.shape)
        assert torch.isfinite(o).all(), name
        assert rel(o, r) <= tol, (name, rel(o, r))
    if lens is not None:  # padded steps write exact zeros
        pad = torch.arange(T, device=device)[:, None] >= lens[None, :]
        assert (out[0][pad] == 0).all() and (out[3][pad] == 0).all() and (out[4][pad] == 0).all()
        assert (bout[0][pad] == 0).all()


# ------------------------------------------------------------------------------ CPU (interpreter)
@cpu_only
@pytest.mark.parametrize("H", [1, 3, 37, 129])
def test_fp64_hostile_sizes(H):
    check_lstm(T=3, B=2, H=H, dtype=torch.float64)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reverse", [False, True])
def test_unsorted_lengths(dtype, reverse):
    check_lstm(T=5, B=3, H=19, dtype=dtype, reverse=reverse, lengths=[3, 5, 1])


@cpu_only
def test_t1_b1_no_bias():
    check_lstm(T=1, B=1, H=5, dtype=torch.float64, bias=False)


@cpu_only
@pytest.mark.parametrize("reverse", [False, True])
def test_projection(reverse):
    check_lstm(T=4, B=3, H=20, P=12, proj=True, dtype=torch.float64, reverse=reverse, lengths=[4, 2, 3])


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision(dtype):
    check_lstm(T=4, B=3, H=37, dtype=dtype, lengths=[4, 1, 3], reverse=True)


@cpu_only
def test_bf16_projection_split():
    with C.force_variant(mode="stepwise", block_u=16):
        check_lstm(T=3, B=2, H=33, P=20, proj=True, dtype=torch.bfloat16, lengths=[3, 2])


@cpu_only
@pytest.mark.parametrize("proj", [False, True])
def test_split_stepwise_many_programs(proj):
    """Hidden units split over 3 programs (block_u=16, H=37): the multi-program slice logic."""
    with C.force_variant(mode="stepwise", block_u=16):
        v = C.select_variant(4, 37, 37, 3, torch.float64)
        assert v.mode == "stepwise" and v.n_unit_progs == 3
        check_lstm(T=4, B=3, H=37, P=24, proj=proj, dtype=torch.float64, reverse=True, lengths=[2, 4, 3])


@cpu_only
def test_interpreter_selects_stepwise_for_large_h():
    assert C.select_variant(4, 129, 129, 2, torch.float32).mode == "stepwise"
    assert C.select_variant(4, 8, 8, 2, torch.float32).mode == "single"


@cpu_only
@pytest.mark.parametrize("proj", [False, True])
def test_persistent_one_program(proj):
    """The persistent code path (whole sequence in one launch, SYNC barriers) with 1 program."""
    with C.force_variant(mode="persistent", block_u=64):
        v = C.select_variant(4, 37, 37, 2, torch.float64)
        assert v.mode == "persistent" and v.n_unit_progs == 1
        before = C.LAUNCHES["lstm_fwd"]
        check_lstm(T=4, B=2, H=37, P=20, proj=proj, dtype=torch.float64, lengths=[4, 2], reverse=True)
        assert C.LAUNCHES["lstm_fwd"] - before == 1


@cpu_only
def test_persistent_barrier_timeout_raises(monkeypatch):
    """Programs that are not co-resident (the interpreter runs them one after another) must not
    hang: the bounded spin sets the error flag and the launcher raises."""
    monkeypatch.setattr(C, "MAX_SPIN", 8)
    a = make_inputs(2, 1, 37, 37, torch.float32, "cpu")
    with C.force_variant(mode="persistent", block_u=16):
        with pytest.raises(RuntimeError, match="barrier timed out"):
            L.lstm_fwd(a["xproj"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], None, None, False)


if C.triton is not None:

    @C.triton.jit
    def _barrier_probe(sync_ptr, err_ptr, target, N_PROGS, MAX_SPINS: C.tl.constexpr):
        C.grid_barrier(sync_ptr, target, err_ptr, N_PROGS, MAX_SPINS)


@cpu_only
def test_grid_barrier_atomics():
    # happy path: the other participant already arrived (counter at 1 of 2)
    sync = torch.ones(1, dtype=torch.int32)
    err = torch.zeros(1, dtype=torch.int32)
    _barrier_probe[(1,)](sync, err, 2, 2, MAX_SPINS=8)
    assert sync.item() == 2 and err.item() == 0
    # nobody else arrives: bounded spin -> error flag, no hang
    sync.zero_()
    _barrier_probe[(1,)](sync, err, 2, 2, MAX_SPINS=8)
    assert err.item() == C.ERR_BARRIER_TIMEOUT
    with pytest.raises(RuntimeError):
        C.check_error_flag(err, "probe")


_UNIFORM_PROBE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedrnn.backends.triton import _common as C

@triton.jit
def probe(sync_ptr, err_ptr, target, N_PROGS, MAX_SPINS: tl.constexpr):
    C.grid_barrier(sync_ptr, target, err_ptr, N_PROGS, MAX_SPINS)

src = ASTSource(fn=probe, signature={"sync_ptr": "*i32", "err_ptr": "*i32", "target": "i32", "N_PROGS": "i32",
                                     "MAX_SPINS": "constexpr"}, constexprs={"MAX_SPINS": 1 << 20})
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ttir"])
"""


def test_grid_barrier_reads_are_uniform(tmp_path):
    """Every value the barrier's spin loop tests must come from a scalar atomic (one thread, then
    broadcast to the CTA): a per-thread load of the error flag lets warps leave the loop in
    different iterations, and the CTA barriers after it then mismatch, a hang.  Checked on the
    kernel compiled for sm_90 (no GPU needed; a subprocess, since the interpreter is on here):
    the barrier holds no plain load at all."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python")
    script = tmp_path / "probe.py"  # @triton.jit needs its source in a file
    script.write_text(_UNIFORM_PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ttir = out.stdout
    assert "tt.atomic_rmw" in ttir
    assert "tt.load" not in ttir, "grid_barrier reads memory with a per-thread load"


# ------------------------------------------------------------------ plans, models, compiled check
def test_k_pieces_cover_k_without_power_of_two_padding():
    """K is padded to 16 * KS granularity in <= 4 power-of-two pieces per chunk, never to pow2(K)."""
    sp = C.split_for(768, 4, 128)
    assert sp.ks == 4 and sp.kc == (128, 64, 0, 0) and sp.k_padded == 768
    for K in list(range(1, 300, 7)) + [768, 1000, 1536, 3072, 4096, 5120]:
        for ks_max, kc_max in ((4, 128), (8, 128), (4, 64), (16, 32)):
            sp = C.split_for(K, ks_max, kc_max)
            pieces = [c for c in sp.kc if c]
            assert sp.k_padded >= K and all(c >= 16 and c & (c - 1) == 0 for c in pieces)
            assert sp.k_padded - K < max(16 * sp.ks, sp.k_padded // 7), (K, sp)


@pytest.mark.parametrize("version", [(3, 6), (3, 8)])
@pytest.mark.parametrize("cap", [80, 90])
def test_selection_fits_the_device_under_each_triton(cap, version):
    """Issue 8: the rule must never pick what the device cannot hold, under either triton (3.6
    keeps the split-K reduction scratch beside the staged operand).  The first version picked
    LSTM bf16 H=512 B=300 'persistent u=32 b=64 ks=16', 256 KiB on sm_90 (limit 227)."""
    info = C.AOT_TARGETS[cap]
    cases = [(C.LSTM_CELL, 512, 512, 300), (C.LSTM_CELL, 300, 300, 512), (C.LSTM_CELL, 200, 200, 1024),
             (C.LSTM_CELL, 512, 512, 256), (C.GRU_CELL, 130, 130, 1456), (C.LSTM_CELL, 768, 768, 16),
             (C.GRU_CELL, 768, 768, 64), (C.LSTM_CELL, 1024, 512, 64), (C.LSTM_CELL, 37, 37, 3)]
    for cell, H, P, B in cases:
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            proj = P if P != H else 0
            if H > C.max_hidden_size(cell.gates, dtype, info=info, proj_size=proj, version=version):
                continue
            for backward in (False, True):
                cands = C.candidates(cell, backward, H, P, B, dtype, info, interpret=False, version=version)
                assert cands, (cell.name, H, P, B, dtype, backward)
                for v in cands:
                    assert C.smem_bytes(cell, v, H, P, dtype, version) <= info.smem_optin
                    assert v.progs_per_sm * (C.smem_bytes(cell, v, H, P, dtype, version) + C.SMEM_RESERVED) <= info.smem_sm
                    assert C.regs_per_thread(cell, v, H, P, dtype) <= C.REG_BUDGET
                    assert v.grid_size <= info.sms * v.progs_per_sm
                    assert v.n_batch_tiles * v.block_b >= min(B, v.block_b)


def test_smem_model_of_36_keeps_reduction_scratch():
    v = C.select_variant(4, 768, 768, 16, torch.bfloat16, info=C.AOT_TARGETS[90], interpret=False)
    m36 = C.smem_bytes(C.LSTM_CELL, v, 768, 768, torch.bfloat16, (3, 6))
    m38 = C.smem_bytes(C.LSTM_CELL, v, 768, 768, torch.bfloat16, (3, 8))
    assert m36 > m38 >= v.split_a.k_padded * 4 * v.block_u * 2  # W slice [768, 32] bf16 at least


def test_register_budget_stops_tile_growth():
    """Issue 8: GRU bf16 H=130 B=1456 grew to block_b=64 and compiled to 32 registers + 33 KB of
    spills.  Tiles now stop at the modelled register budget; larger batches run side by side
    (programs per SM) or in sequential chunks."""
    info = C.AOT_TARGETS[90]
    for g, H, B in ((3, 130, 1456), (4, 512, 300), (4, 768, 4096)):
        for backward in (False, True):
            v = C.select_variant(g, H, H, B, torch.bfloat16, info=info, interpret=False, backward=backward)
            cell = C.LSTM_CELL if g == 4 else C.GRU_CELL
            assert C.regs_per_thread(cell, v, H, H, torch.bfloat16) <= C.REG_BUDGET
            assert v.block_b <= (16 if backward else 64)


class _FakeCompiled:
    def __init__(self, shared, regs, spills, warps=4):
        self.metadata = type("M", (), {"shared": shared, "num_warps": warps})()
        self.n_regs, self.n_spills = regs, spills


def test_checked_variant_steps_down_and_caches(monkeypatch):
    """Before the first launch the compiled kernel's shared memory, registers x warps and spills are
    checked against the device; a candidate that does not fit is skipped, the decision cached."""
    monkeypatch.setattr(C, "interpret_mode", lambda: False)
    monkeypatch.setattr(C, "_CHECKED", {})
    info = C.AOT_TARGETS[90]
    cands = C.candidates(C.LSTM_CELL, False, 768, 768, 64, torch.bfloat16, info, interpret=False)[:3]
    calls = []

    def compile_fn(v):
        calls.append(v)
        if v is cands[0]:
            return [_FakeCompiled(info.smem_optin + 1, 128, 0)]  # too much shared memory
        if v is cands[1]:
            return [_FakeCompiled(1024, 200, 512)]  # spills
        return [_FakeCompiled(1024, 128, 0)]

    assert C.checked_variant(cands, compile_fn, ("k",), info) is cands[2]
    assert C.checked_variant(cands, compile_fn, ("k",), info) is cands[2]
    assert calls == cands  # each compiled once, then cached
    assert C.resources_reason(dict(shared=1024, regs=255, spill_bytes=0, num_warps=8),
                              dataclasses.replace(cands[2], progs_per_sm=2), info) is not None  # 2 x 256 x 255 regs
    with pytest.raises(ValueError, match="no variant fits"):
        C.checked_variant(cands[:2], compile_fn, ("k2",), info)


def test_cost_model_uses_the_chip_and_sides_batches():
    info = C.AOT_TARGETS[90]
    v = C.select_variant(4, 768, 768, 16, torch.bfloat16, info=info, interpret=False)
    assert v.mode == "persistent" and v.n_unit_progs >= 96  # 8 units per program (was 48 programs)
    v = C.select_variant(4, 1024, 1024, 4, torch.bfloat16, info=info, interpret=False)
    assert v.n_unit_progs * v.n_batch_tiles >= 0.9 * info.sms
    # B = 256 at H = 1024: at most a few sequential launches, never one per 16 rows
    v = C.select_variant(4, 1024, 1024, 256, torch.bfloat16, info=info, interpret=False)
    assert C.cdiv(C.cdiv(256, v.block_b), v.n_batch_tiles) <= 8
    # small H: one program owns every unit (no grid barrier)
    assert C.select_variant(4, 16, 16, 16, torch.bfloat16, info=info, interpret=False).mode == "single"


def test_limits_with_projection_and_other_devices():
    info = C.AOT_TARGETS[90]
    plain = C.max_hidden_size(4, torch.bfloat16, info=info)
    proj = C.max_hidden_size(4, torch.bfloat16, info=info, proj_size=256)
    assert 256 < proj <= plain + 256
    assert C.supports(4, proj, 256, torch.bfloat16, info) and not C.supports(4, proj + 64, 256, torch.bfloat16, info)
    # any object with the attributes of torch.cuda.get_device_properties describes a device
    props = type("Props", (), dict(name="A100-SXM4-40GB", major=8, minor=0, multi_processor_count=108,
                                   shared_memory_per_block_optin=163 * 1024,
                                   shared_memory_per_multiprocessor=164 * 1024, regs_per_multiprocessor=65536,
                                   max_threads_per_multi_processor=2048))()
    assert C.max_hidden_size(4, torch.bfloat16, props) == C.max_hidden_size(4, torch.bfloat16, info=C.AOT_TARGETS[80])


def test_readme_limits_table_is_the_function():
    """README's Triton limits rows are max_hidden_size for H100/H200 (A100) under triton 3.6."""
    import re

    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")).read()
    for gates, name in ((4, "LSTM"), (3, "GRU")):
        row = re.search(rf"\| `triton` {name}, H100/H200 \(A100\) \|([^\n]*)", readme).group(1)
        cells = re.findall(r"(\d+) \((\d+)\)", row)[:3]
        for (h90, h80), dtype in zip(cells, (torch.bfloat16, torch.float32, torch.float64)):
            assert int(h90) == C.max_hidden_size(gates, dtype, info=C.AOT_TARGETS[90], version=(3, 6)), (name, dtype)
            assert int(h80) == C.max_hidden_size(gates, dtype, info=C.AOT_TARGETS[80], version=(3, 6)), (name, dtype)


_COMPILE_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import triton_aot
from fusedrnn.backends.triton import _common as C, lstm as L, gru as G
cap = int(sys.argv[2])
info = C.AOT_TARGETS[cap]
for mod, cell, H, B in ((L, C.LSTM_CELL, 512, 300), (G, C.GRU_CELL, 130, 1456)):
    for backward in (False, True):
        cands = C.candidates(cell, backward, H, H, B, torch.bfloat16, info, interpret=False)
        for v in cands:
            res = [triton_aot._compile_spec(mod.aot_recurrence(v, H, H, torch.bfloat16, "ieee", pa, pb, "t"), cap, True)
                   for pa, pb in C.phases(v, backward)]
            reasons = [C.resources_reason(dict(shared=r["shared"], regs=r["regs"], spill_bytes=r["local"],
                                               num_warps=r["warps"]), v, info) for r in res]
            if all(x is None for x in reasons):
                assert all(r["shared"] <= C.smem_bytes(cell, v, H, H, torch.bfloat16) for r in res)
                print("OK", cell.name, H, B, backward, v.block_b, v.block_u, [(r["shared"], r["regs"], r["local"]) for r in res])
                break
        else:
            raise SystemExit(f"nothing fits: {cell.name} H={H} B={B} backward={backward}")
"""


def test_issue_shapes_compile_within_the_device(tmp_path, cap=90):
    """The shapes issue 8 found over the device's shared memory or spilling, compiled for the real
    target (no GPU needed; a subprocess, since the interpreter is on here), stepped down exactly as
    the launcher does before the first launch: the kernel that runs fits and its shared memory is
    within the model.  (sm_80 and every other variant: tools/triton_aot.py.)"""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    env["PYTHONPATH"] = os.path.join(root, "python")
    script = tmp_path / "check.py"
    script.write_text(_COMPILE_CHECK)
    out = subprocess.run([sys.executable, str(script), os.path.join(root, "tools"), str(cap)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("OK") == 4


@cpu_only
def test_kernels_really_run():
    """No silent fallback: every call launches the Triton kernels (counted by the launchers)."""
    with C.force_variant(mode="persistent", block_u=32):  # one program (the interpreter runs programs in turn)
        before = dict(C.LAUNCHES)
        check_lstm(T=3, B=2, H=32, dtype=torch.float64)
        assert C.LAUNCHES["lstm_fwd"] - before.get("lstm_fwd", 0) == 1
        assert C.LAUNCHES["lstm_bwd"] - before.get("lstm_bwd", 0) == 1
    with C.force_variant(mode="stepwise", block_u=16):
        before = dict(C.LAUNCHES)
        check_lstm(T=3, B=2, H=20, dtype=torch.float64)
        assert C.LAUNCHES["lstm_fwd"] - before.get("lstm_fwd", 0) == 3  # one per step
        assert C.LAUNCHES["lstm_bwd"] - before.get("lstm_bwd", 0) == 6  # two phases per step


@cpu_only
def test_outputs_fully_written(monkeypatch):
    """Outputs start as NaN: every element (padded steps included) must be written."""
    real_empty = torch.empty

    def nan_empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(L.torch, "empty", nan_empty)
    check_lstm(T=4, B=3, H=21, dtype=torch.float64, lengths=[1, 4, 2], reverse=True)
    with C.force_variant(mode="stepwise", block_u=16):
        check_lstm(T=3, B=2, H=21, P=18, proj=True, dtype=torch.float64, lengths=[3, 1])


def check_nosave(T, B, H, dtype, P=None, proj=False, reverse=False, lengths=None, bias=True, seed=0, device="cpu"):
    """Inference path (issue 10 item 1): ``save=False`` returns (0,) gates / cs of the dtypes they
    would have had, and y, h_n, c_n bitwise equal to ``save=True`` (which matches the reference)."""
    a = make_inputs(T, B, H, P or H, dtype, device, bias=bias, proj=proj, seed=seed)
    lens = None if lengths is None else torch.tensor(lengths, dtype=torch.int64, device=device)
    args = (a["xproj"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], a["w_hr"], lens, reverse)
    before = C.LAUNCHES["lstm_fwd"]
    full = TB.lstm_fwd(*args)  # the backend entry point, as ops.py calls it
    mid = C.LAUNCHES["lstm_fwd"]
    infer = TB.lstm_fwd(*args, save=False)
    assert C.LAUNCHES["lstm_fwd"] - mid == mid - before  # the same launches, no fallback
    acc = C.acc_dtype(dtype)
    gates, cs = infer[3], infer[4]
    assert gates.shape == (0,) and gates.dtype == dtype and cs.shape == (0,) and cs.dtype == acc
    assert full[3].shape == (T, B, 4 * H) and full[4].shape == (T, B, H) and full[4].dtype == acc
    for name, o, f in zip(("y", "h_n", "c_n"), infer[:3], full[:3]):
        assert o.shape == f.shape and o.dtype == f.dtype, name
        assert torch.isfinite(o).all() and torch.equal(o, f), name
    ref = R.lstm_fwd(*args)
    for name, o, r in zip(("y", "h_n", "c_n"), infer[:3], ref[:3]):
        assert rel(o, r) <= TOL[dtype], (name, rel(o, r))
    assert gates.device == cs.device == infer[0].device
    return mid - before


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_nosave_single(dtype, reverse):
    """One program owns every unit (h in registers), a zero-length sequence among the lengths."""
    check_nosave(T=5, B=4, H=13, dtype=dtype, reverse=reverse, lengths=[5, 0, 3, 1])


@cpu_only
@pytest.mark.parametrize("proj", [False, True])
def test_nosave_split_stepwise(proj):
    """Units split over 3 programs (stepwise under the interpreter), with and without projection."""
    with C.force_variant(mode="stepwise", block_u=16):
        n = check_nosave(T=4, B=3, H=37, P=24, proj=proj, dtype=torch.float64, reverse=True, lengths=[2, 0, 4])
    assert n == 4 * (2 if proj else 1)  # one launch per step and phase


@cpu_only
@pytest.mark.parametrize("proj", [False, True])
def test_nosave_persistent_no_bias(proj):
    """The persistent kernel (SYNC barriers, one launch), bias-less, bf16."""
    with C.force_variant(mode="persistent", block_u=64):
        n = check_nosave(T=4, B=2, H=37, P=20, proj=proj, dtype=torch.bfloat16, bias=False, lengths=[4, 0])
    assert n == 1


@cpu_only
def test_nosave_multi_chunk_batch(monkeypatch):
    """Batch tiles beyond one co-resident grid run as sequential launches over batch chunks: on a
    (described) 1-SM device, 5 tiles of 16 rows need >= 2 persistent launches."""
    one_sm = C.DeviceInfo(1, 227 * 1024, (9, 0), 228 * 1024)
    monkeypatch.setattr(C, "device_info", lambda device=None: one_sm)
    with C.force_variant(mode="persistent", block_u=64, block_b=16):
        v = C.select_variant(4, 21, 21, 80, torch.float32, info=one_sm)
        assert v.mode == "persistent" and C.cdiv(C.cdiv(80, v.block_b), v.n_batch_tiles) >= 2
        n = check_nosave(T=3, B=80, H=21, dtype=torch.float32, lengths=[(i * 7) % 4 for i in range(80)])
    assert n >= 2


@cpu_only
def test_nosave_falls_back_to_training_kernel(monkeypatch):
    """Where the inference kernel's compiled resources do not fit but the training kernel's do
    (ptxas may allocate them differently at the register limit), the training kernel runs into
    scratch buffers: same results, (0,) gates / cs, a warning; nothing raised."""
    import fusedrnn.backends as backends

    real = C.checked_variant
    seen = []

    def fake(cands, compile_fn, key, info):
        seen.append(dict(key[4])["SAVE"])
        if dict(key[4])["SAVE"] == "False":
            raise C.NoCompiledFit("fusedrnn triton: no variant fits the device after compilation: (test)")
        return real(cands, compile_fn, key, info)

    monkeypatch.setattr(C, "checked_variant", fake)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="training kernel"):
        check_nosave(T=3, B=2, H=9, dtype=torch.float32, lengths=[3, 0])
    assert seen == ["True", "False", "True"]  # save=True; save=False refused, then the training kernel

    def refuse(*_):
        raise C.NoCompiledFit("fusedrnn triton: no variant fits the device after compilation: (test)")

    monkeypatch.setattr(C, "checked_variant", refuse)
    a = make_inputs(2, 2, 9, 9, torch.float32, "cpu")
    with pytest.raises(C.NoCompiledFit):  # save=True has nothing to fall back to
        TB.lstm_fwd(a["xproj"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], None, None, False)


@cpu_only
def test_nosave_empty_shapes():
    for T, B in ((0, 2), (3, 0)):
        a = make_inputs(T, B, 5, 5, torch.float32, "cpu")
        args = (a["xproj"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], None, None, False)
        y, h_n, c_n, gates, cs = TB.lstm_fwd(*args, save=False)
        full = TB.lstm_fwd(*args)
        assert y.shape == (T, B, 5) and gates.shape == (0,) and cs.shape == (0,) and cs.dtype == torch.float32
        assert torch.equal(h_n, full[1]) and torch.equal(c_n, full[2])


@cpu_only
def test_zero_length_sequence():
    a = make_inputs(0, 2, 5, 5, torch.float64, "cpu")
    y, h_n, c_n, gates, cs = L.lstm_fwd(a["xproj"], a["w_hh"], a["b_hh"], a["h0"], a["c0"], None, None, False)
    assert y.shape == (0, 2, 5) and torch.equal(h_n, a["h0"]) and torch.equal(c_n, a["c0"])


@cpu_only
def test_unsupported_hidden_size_raises():
    limit = C.max_hidden_size(4, torch.float64)
    assert limit == C.max_hidden_size(4, torch.float64, info=C.AOT_TARGETS[90]) >= 192  # nominal H100 here
    H = limit + 1
    cfg = RecurrenceConfig("LSTM", "cpu", -1, torch.float64, H)
    reason = TB.unsupported(cfg)
    assert reason is not None and str(limit) in reason
    assert TB.unsupported(RecurrenceConfig("LSTM", "cpu", -1, torch.float64, limit)) is None
    assert str(limit) in TB.unsupported(RecurrenceConfig("LSTM", "cpu", -1, torch.float64, 64, proj_size=300))
    x = torch.zeros(1, 1, 4 * H, dtype=torch.float64)
    with pytest.raises(ValueError, match=str(limit)):
        L.lstm_fwd(x, torch.zeros(4 * H, H, dtype=torch.float64), None, torch.zeros(1, H, dtype=torch.float64),
                   torch.zeros(1, H, dtype=torch.float64), None, None, False)
    with pytest.raises(ValueError, match=str(limit)):
        TB.lstm_bwd(x[..., :H], torch.zeros(1, H, dtype=torch.float64), torch.zeros(1, H, dtype=torch.float64),
                    torch.zeros(4 * H, H, dtype=torch.float64), None, torch.zeros(1, H, dtype=torch.float64),
                    x, x[..., :H], None, False)


@cpu_only
def test_explicit_backend_never_falls_back():
    from fusedrnn import backends

    limit = C.max_hidden_size(4, torch.float32)
    cfg = RecurrenceConfig("LSTM", "cpu", -1, torch.float32, limit + 1)
    with pytest.raises(ValueError, match=f"largest supported hidden size {limit}"):
        backends.resolve("triton", cfg)
    assert backends.resolve("triton", RecurrenceConfig("LSTM", "cpu", -1, torch.float32, limit)) == "triton"


@cpu_only
def test_backend_module_contract():
    assert TB.unavailable() is None
    assert TB.unsupported(RecurrenceConfig("LSTM", "cpu", -1, torch.float32, 512)) is None
    assert TB.unsupported(RecurrenceConfig("LSTMCell", "cpu", -1, torch.bfloat16, 4096)) is None
    for name in ("lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd", "lstm_cell_fwd", "lstm_cell_bwd", "gru_cell_fwd", "gru_cell_bwd"):
        assert callable(getattr(TB, name))


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [1, 37])
def test_lstm_cell(dtype, H):
    g = torch.Generator().manual_seed(1)
    B = 3
    rn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    ig, hg, bih, bhh, c = rn(B, 4 * H), rn(B, 4 * H), rn(4 * H), rn(4 * H), rn(B, H)
    for b1, b2 in ((bih, bhh), (None, bhh), (None, None)):
        before = C.LAUNCHES["lstm_cell_fwd"]
        out = TB.lstm_cell_fwd(ig, hg, b1, b2, c)
        assert C.LAUNCHES["lstm_cell_fwd"] == before + 1
        ref = R.lstm_cell_fwd(ig, hg, b1, b2, c)
        for o, r in zip(out, ref):
            assert o.dtype == r.dtype and rel(o, r) <= TOL[dtype]
    dh, dc = rn(B, H), rn(B, H)
    out = TB.lstm_cell_bwd(dh, dc, c, ref[1], ref[2])
    ref_b = R.lstm_cell_bwd(dh, dc, c, ref[1], ref[2])
    for o, r in zip(out, ref_b):
        assert o.dtype == r.dtype and rel(o, r) <= TOL[dtype]


# ------------------------------------------------------------------------------------------ GPU
@gpu
@needs_cuda
@pytest.mark.parametrize(
    "H,dtype",
    [(37, torch.float64), (129, torch.float32), (256, torch.float64), (512, torch.float32), (768, torch.bfloat16),
     (1024, torch.float16)],
)
def test_gpu_persistent(H, dtype, no_tf32):
    v = C.select_variant(4, H, H, 5, dtype, torch.device("cuda"))
    assert v.mode == ("single" if v.n_unit_progs == 1 else "persistent")
    check_lstm(T=7, B=5, H=H, dtype=dtype, device="cuda", lengths=[7, 3, 5, 1, 6], reverse=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_projection(dtype, no_tf32):
    check_lstm(T=6, B=20, H=200, P=100, proj=True, dtype=dtype, device="cuda", lengths=[(i % 6) + 1 for i in range(20)])


@gpu
@needs_cuda
def test_gpu_large_batch_chunks():
    # more batch tiles than fit one co-resident grid: several launches over batch chunks
    check_lstm(T=3, B=300, H=512, dtype=torch.bfloat16, device="cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("H,B", [(300, 512), (200, 1024)])
def test_gpu_issue8_large_batches(H, B):
    # issue 8: these picked kernels over the device's shared memory (sequential chunks now)
    check_lstm(T=2, B=B, H=H, dtype=torch.bfloat16, device="cuda")


@gpu
@needs_cuda
def test_gpu_programs_side_by_side_checked():
    # B = 64 at H = 768: the cost model runs several programs per SM (one cooperative grid); the
    # compiled kernels were checked against the device before the first launch
    C._CHECKED.clear()
    check_lstm(T=6, B=64, H=768, dtype=torch.bfloat16, device="cuda", lengths=[6, 2, 5, 1] * 16, reverse=True)
    assert C._CHECKED and any(reason is None for reason in C._CHECKED.values())


@gpu
@needs_cuda
@pytest.mark.parametrize("H,P,B", [(768, 768, 16), (768, 768, 64), (512, 512, 300), (200, 100, 20)])
def test_gpu_nosave(H, P, B):
    # the persistent grid, programs side by side (B=64), sequential batch chunks (B=300), projection
    check_nosave(T=5, B=B, H=H, P=P, proj=P != H, dtype=torch.bfloat16, device="cuda", reverse=True,
                 lengths=[5, 0, 3, 1] * (B // 4))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cell(dtype):
    B, H = 7, 300
    ig, hg = torch.randn(B, 4 * H, device="cuda", dtype=dtype), torch.randn(B, 4 * H, device="cuda", dtype=dtype)
    c = torch.randn(B, H, device="cuda", dtype=dtype)
    out = TB.lstm_cell_fwd(ig, hg, None, None, c)
    ref = R.lstm_cell_fwd(ig, hg, None, None, c)
    for o, r in zip(out, ref):
        assert rel(o, r) <= TOL[dtype]
