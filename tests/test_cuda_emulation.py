"""The CUDA kernels of csrc/cuda executed on CPU under the CUDA emulation (issue 9).

With ``FUSEDRNN_CUDA_EMULATION=1`` the ``cuda`` backend runs CPU tensors through the very kernel
source of csrc/cuda, compiled as host C++ into ``fusedrnn._C`` (``torch.ops.fusedrnn_emu``) and
executed under a CUDA-semantics emulator (README, "CUDA emulation").  This file runs, through it:

* the module grid of test_modules.py (LSTM, GRU and the cells, forward and backward, gradcheck,
  opcheck) with ``backend="cuda"`` on CPU, with torch's native RNN kernels unused;
* the kernel-level checks of test_cpp.py for every engine (bf16, fp16, TF32, fp32 FMA, fp64) and
  hostile shapes (H in 1, 3, 37, 129; B in 1, 5, 12, 17, 33; unsorted lengths with a zero length;
  reverse; bias-less; proj_size; T = 1) on a small emulated H100 (9 SMs) that still gives
  multi-block grids, batch groups, several batch passes and several m-tiles per block;
* every planner variant (FUSEDRNN_CUDA_PLAN: legacy geometry and barrier, split barrier, flag
  exchange, forced batch groups, the stepwise large-batch strategy) and the inference path
  (``save=False``: the same y / h_n / c_n, nothing saved);
* the launches against the planner (fusedrnn/cuda_plan.h): every persistent launch has the grid,
  shared memory, engine and exchange protocol the planner computes from the emulated device record
  (H100, H200, A100, also with a small SM count), and the device records are the real ones;
* every ``__global__`` kernel instantiation compiled into the emulation is launched;
* mutation sanity: a test-only build of deliberately broken kernels (a fragment layout, a grid
  barrier's wait, its acquire, a double-buffer index, a bounds check, a __syncthreads, an arrival
  some blocks skip, a flag tag, an unchecked flag, a plain store in the flag exchange), each caught.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

import pytest
import torch

import fusedrnn
from fusedrnn.backends import cuda, cuda_emulation as emu, rnn_tf32

if emu.unavailable() is not None:
    pytest.skip(f"CUDA emulation: {emu.unavailable()}", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import test_api as api  # noqa: E402
import test_cpp as kernels  # noqa: E402
import test_inference_path  # noqa: E402
import test_modules as grid  # noqa: E402
from tolerances import TF32_RTOL  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# 9 SMs: H = 129 still fits every kernel (LSTM forward needs ceil(129 / 9) = 15 units of 4 gates
# = 4 m-tiles), every H >= 17 gives a multi-block grid.
SMALL_SMS = 9


@pytest.fixture(autouse=True)
def emulation(monkeypatch):
    """FUSEDRNN_CUDA_EMULATION=1 on a small emulated H100, fixed interleaving seed, checker on."""
    monkeypatch.setenv(emu.ENV_VAR, "1")
    for var in ("FUSEDRNN_CUDA_PLAN", "FUSEDRNN_CUDA_GROUPS"):  # the planner's own choice unless a test says
        monkeypatch.delenv(var, raising=False)
    with emu.emulated_device("H100", SMALL_SMS), emu.emulation_options(
        seed=0, race_check=True, block_order="random", thread_order="shuffle"
    ):
        yield


# ============================================================================ module grid
@pytest.mark.parametrize("mode,extra,kind,hx_given", list(grid._cases()))
def test_module_grid_float64(mode, extra, kind, hx_given):
    grid.test_matches_torch_float64("cuda", mode, extra, kind, hx_given, "cpu")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,extra", [("padded", {}), ("packed_unsorted", {"bidirectional": True, "num_layers": 2})])
def test_module_grid_low_precision(mode, dtype, kind, extra):
    with rnn_tf32(False):  # fp32: the IEEE FMA engine (TF32 below)
        grid.test_low_precision_vs_fp64_reference("cuda", mode, dtype, kind, extra, "cpu")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_module_grid_tf32(mode):
    with rnn_tf32(True):
        grid.test_low_precision_vs_fp64_reference("cuda", mode, torch.float32, "padded", {}, "cpu")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_module_single_step_and_batch_of_one(mode):
    grid.test_single_step_and_batch_of_one("cuda", mode)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_module_zero_size_batch(mode):
    grid.test_zero_size_batch("cuda", mode)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("name,batched,hx_given,bias", grid.CELL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_module_cells(mode, name, batched, hx_given, bias, dtype):
    grid.test_cells("cuda", mode, name, batched, hx_given, bias, dtype)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_gradcheck(mode):
    grid.test_gradcheck("cuda", mode)


@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell"])
def test_gradcheck_cells(mode):
    grid.test_gradcheck_cells("cuda", mode)


@pytest.mark.no_poison
def test_opcheck_custom_ops():
    for op, args in api._op_samples("cuda"):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("index", range(11))
def test_opcheck_emulated_ops(index):
    op, args = kernels._opcheck_samples()[index]
    emulated = getattr(torch.ops.fusedrnn_emu, op._qualified_op_name.split("::")[1])
    torch.library.opcheck(emulated.default, args)


def test_native_rnn_kernels_unused(monkeypatch):
    """The cuda backend on CPU runs the emulated kernels, never torch's native RNN kernels."""
    import fusedrnn

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's native RNN kernel was called")

    for name in ("lstm", "gru", "lstm_cell", "gru_cell", "rnn_tanh", "rnn_relu"):
        monkeypatch.setattr(torch._VF, name, forbidden)
        monkeypatch.setattr(torch, name, forbidden, raising=False)
    emu.controls().reset_kernel_launch_counts()
    x = torch.randn(3, 2, 4)
    for cls in (fusedrnn.LSTM, fusedrnn.GRU):
        m = cls(4, 5, num_layers=2, bidirectional=True, backend="cuda")
        out, _ = m(x)
        out.sum().backward()
    for cls in (fusedrnn.LSTMCell, fusedrnn.GRUCell):
        m = cls(4, 5, backend="cuda")
        out = m(x[0])
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    launched = emu.controls().kernel_launch_counts()
    for kernel in ("lstm_fwd_kernel", "lstm_bwd_kernel", "gru_fwd_kernel", "gru_bwd_kernel",
                   "lstm_cell_fwd_kernel", "lstm_cell_bwd_kernel", "gru_cell_fwd_kernel", "gru_cell_bwd_kernel"):
        assert any(k.startswith(kernel + "<") for k in launched), (kernel, launched)


# ======================================================================= backend selection
def test_backend_availability_follows_the_env_var(monkeypatch):
    from fusedrnn.backends import RecurrenceConfig

    cfg = RecurrenceConfig("LSTM", "cpu", -1, torch.float32, 5)
    assert cuda.unavailable() is None and cuda.unsupported(cfg) is None
    big = RecurrenceConfig("LSTM", "cpu", -1, torch.float32, 10_000)
    assert "max_hidden_size" in cuda.unsupported(big) and "emulated H100 with 9 SMs" in cuda.unsupported(big)
    # proj_size counts in the fit (issue 8 item 9), on the emulated device too
    limit = emu.max_hidden_size("LSTM", torch.bfloat16)
    assert limit == cuda.max_hidden_size("LSTM", torch.bfloat16, emu.device_record())
    plimit = emu.max_hidden_size("LSTM", torch.bfloat16, proj_size=16)
    assert plimit == cuda.max_hidden_size("LSTM", torch.bfloat16, emu.device_record(), 16) > 16
    assert cuda.unsupported(RecurrenceConfig("LSTM", "cpu", -1, torch.bfloat16, plimit, 16)) is None
    assert "proj_size=16" in cuda.unsupported(RecurrenceConfig("LSTM", "cpu", -1, torch.bfloat16, plimit + 1, 16))
    with emu.emulated_device("H100", 3):  # an explicit backend raises naming the limit
        with pytest.raises(ValueError, match="max_hidden_size"):
            fusedrnn.LSTM(4, 129, backend="cuda")(torch.randn(2, 1, 4))
    monkeypatch.delenv(emu.ENV_VAR)
    assert "CUDA" in cuda.unsupported(cfg)
    with pytest.raises(RuntimeError, match="FUSEDRNN_CUDA_EMULATION=1"):
        cuda.lstm_cell_fwd(torch.randn(2, 8), torch.randn(2, 8), None, None, torch.randn(2, 2))


def test_emulated_op_rejects_non_cpu_tensors():
    """The device check of the CUDA ops, with the emulation's device (the CPU kernel redispatched
    with meta tensors, as test_cpp does for the CUDA kernels)."""
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=r"fusedrnn CUDA gru_fwd: xproj must be a CPU \(CUDA emulation\) tensor, got meta"):
        torch.ops.fusedrnn_emu.gru_fwd.default.redispatch(
            keys, meta(3, 2, 6), meta(6, 2), None, meta(2, 2), None, False, False
        )


# ============================================================================ device records
def test_device_records_match_the_real_devices():
    """The emulated device answers the planner's questions as the GPU does.

    Its record (the fields of torch.cuda.get_device_properties() the planner reads) equals the
    H100 / H200 / A100 records of fusedrnn.backends.cuda.KNOWN_DEVICES, so the emulated kernels'
    limits equal fusedrnn.max_hidden_size for those devices (with and without proj_size), and a
    small SM count scales them down."""
    c = emu.controls()
    for name, known in cuda.KNOWN_DEVICES.items():
        with emu.emulated_device(name) as d:
            rec = emu.device_record()
            assert rec["name"] == f"emulated {name} with {known['multi_processor_count']} SMs"
            assert {k: v for k, v in rec.items() if k != "name"} == {k: v for k, v in known.items() if k != "name"}
            assert d["smem_optin"] == known["shared_memory_per_block_optin"]
    for name in ("H200", "A100"):
        with emu.emulated_device(name):
            for mode, dtype, proj in (("LSTM", torch.bfloat16, 0), ("GRU", torch.float32, 0),
                                      ("LSTM", torch.bfloat16, 1280), ("LSTM", torch.float64, 0)):
                want = fusedrnn.max_hidden_size(mode, dtype, backend="cuda", proj_size=proj,
                                                device=cuda.KNOWN_DEVICES[name])
                assert emu.max_hidden_size(mode, dtype, proj) == want, (name, mode, dtype, proj)
    with emu.emulated_device("H200"):
        assert c.max_hidden_size("LSTM", "bfloat16") == 1664  # Run 1's measurement on the real H200
    with emu.emulated_device("H100", 4):  # the limits scale with the SM count
        assert 0 < c.max_hidden_size("LSTM", "bfloat16") < 1664 // 8


def _kernel_name(pass_, dtype, tf32, plan):
    """The emulator's name of the persistent kernel instantiation that runs `plan`."""
    t = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "float", torch.float64: "double"}[dtype]
    nt = plan["n_tiles"]
    eng = {"mma16": f"MmaEngine16<{t}, {nt}>", "tf32": f"MmaEngineTF32<{nt}>", "fma32": "FmaEngine<float>",
           "fma64": "FmaEngine<double>"}[plan["engine"]]
    return f"{pass_}_kernel<{t}, {eng}, {1 if plan['sync'] == 'flags' else 0}>"


def _plans(mode, dtype, tf32, H, B, P=0, variant="", groups=-1, train=True):
    """{pass: plan} of the forward and backward on the emulated device (the planner of the kernels)."""
    rec = emu.device_record()
    return {f"{mode}_{d}": cuda.plan(f"{mode}_{d}", dtype, H, B, proj_size=P, device=rec, train=train or d == "bwd",
                                     tf32=tf32, variant=variant, groups=groups)
            for d in ("fwd", "bwd")}


# (device, SMs, mode, dtype, TF32, H, B, P, FUSEDRNN_CUDA_PLAN, FUSEDRNN_CUDA_GROUPS)
PLANNED = [
    ("H100", SMALL_SMS, "lstm", torch.bfloat16, False, 37, 17, 0, "", -1),   # flags, 3 batch groups
    ("H100", SMALL_SMS, "gru", torch.float32, False, 37, 17, 0, "", -1),     # FMA, barrier, 3 groups
    ("H100", SMALL_SMS, "lstm", torch.float32, True, 129, 33, 0, "barrier", 2),
    ("H100", SMALL_SMS, "lstm", torch.float16, False, 37, 17, 5, "legacy", -1),
    ("H100", SMALL_SMS, "gru", torch.bfloat16, False, 17, 17, 0, "", -1),    # 2 n-tiles
    ("H200", 0, "gru", torch.bfloat16, False, 64, 24, 0, "", -1),             # the full chip
    ("A100", 0, "lstm", torch.bfloat16, False, 64, 24, 0, "", -1),
    ("A100", 6, "lstm", torch.float64, False, 37, 9, 0, "", -1),
]


@pytest.mark.parametrize("name,sms,mode,dtype,tf32,H,B,P,variant,groups", PLANNED)
def test_launches_follow_the_planner(monkeypatch, name, sms, mode, dtype, tf32, H, B, P, variant, groups):
    """Every persistent launch has the grid, shared memory, engine, n-tiles and exchange protocol
    that fusedrnn/cuda_plan.h computes from the emulated device's record."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", variant)
    monkeypatch.setenv("FUSEDRNN_CUDA_GROUPS", str(max(groups, 0)))
    if tf32:
        monkeypatch.setitem(kernels.TOL, torch.float32, 2e-3)
    c = emu.controls()
    with emu.emulated_device(name, sms), rnn_tf32(tf32):
        plans = _plans(mode, dtype, tf32, H, B, P, variant, groups)
        c.clear_launch_log()
        if mode == "lstm":
            kernels.check_lstm(cuda, "cpu", dtype, T=2, B=B, H=H, P=P, lengths="unsorted")
        else:
            kernels.check_gru(cuda, "cpu", dtype, T=2, B=B, H=H, lengths="unsorted")
        launched = [r for r in c.launch_log() if r["cooperative"]]
    assert [r["kernel"] for r in launched] == [_kernel_name(p, dtype, tf32, plans[p]) for p in plans]
    assert [(r["grid"], r["smem"]) for r in launched] == [(plans[p]["grid"], plans[p]["smem"]) for p in plans]
    assert all(r["threads"] == 256 for r in launched)


def test_planned_geometries_cover_the_design():
    """PLANNED (above) runs multi-block grids, several batch groups, both exchange protocols, the
    legacy plan and the FMA engine: the geometry the planner has, not just one point of it."""
    seen = []
    for name, sms, mode, dtype, tf32, H, B, P, variant, groups in PLANNED:
        with emu.emulated_device(name, sms):
            seen += list(_plans(mode, dtype, tf32, H, B, P, variant, groups).values())
    assert any(p["batch_groups"] > 1 for p in seen) and any(p["unit_slices"] > 1 for p in seen)
    assert {p["sync"] for p in seen} == {"flags", "barrier"} and any(p["legacy"] for p in seen)
    assert {p["engine"] for p in seen} == {"mma16", "tf32", "fma32", "fma64"}
    assert {p["n_tiles"] for p in seen} >= {1, 2, 4}


def test_design_point_on_the_emulated_h200(monkeypatch):
    """LSTM bf16 H=768 B=16 (issue 10's design point) forward on the full emulated H200: the grid
    the planner chooses for the real H200 (KNOWN_DEVICES), and the right numbers."""
    from fusedrnn.backends import reference

    c = emu.controls()
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16, T=2, B=16, H=768)
    want = cuda.plan("lstm_fwd", torch.bfloat16, 768, 16, device=cuda.KNOWN_DEVICES["H200"], train=False)
    with emu.emulated_device("H200"), emu.emulation_options(race_check=False):
        c.clear_launch_log()
        y = torch.ops.fusedrnn_emu.lstm_fwd(x, w, b, h0, c0, None, None, False, False, False)
        (r,) = c.launch_log()
    assert (r["kernel"], r["grid"], r["smem"]) == (_kernel_name("lstm_fwd", torch.bfloat16, False, want),
                                                   want["grid"], want["smem"])
    assert want["grid"] >= 48  # the design: 48 or more of the 132 SMs work
    ref = reference.lstm_fwd(*[t.double() for t in (x, w, b, h0, c0)], None, None, False)
    for got, exp in zip(y[:3], ref[:3]):
        assert _rel(got, exp) < 2e-2


def test_results_do_not_depend_on_the_interleaving(monkeypatch):
    """Correct kernels give bitwise the same results under every schedule the emulator tries, for
    both exchange protocols."""
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16, T=3, B=33, H=129)
    xg, wg, bg, _ = _gru_inputs(torch.bfloat16, T=3, B=33, H=129)
    for variant in ("barrier", "flags"):
        monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", variant)
        results = []
        for block_order, thread_order, seed in (("random", "shuffle", 0), ("random", "shuffle", 7),
                                                ("round_robin", "forward", 0), ("round_robin", "reverse", 0)):
            with emu.emulation_options(block_order=block_order, thread_order=thread_order, seed=seed):
                y = torch.ops.fusedrnn_emu.lstm_fwd(x, w, b, h0, c0, None, None, False, False)
                g = torch.ops.fusedrnn_emu.gru_fwd(xg, wg, bg, h0, None, True, False)
                results.append(list(y) + list(g))
        for other in results[1:]:
            assert all(torch.equal(a, o) for a, o in zip(results[0], other)), variant


# ===================================================================== kernel-level checks
def _lengths_with_zero(B, T, kind):
    """Unsorted lengths with a zero-length sequence (when B > 1), a full and a length-1 one."""
    if kind == "none":
        return None
    pattern = [T, 0, 1, max(1, T - 1), max(1, T // 2)]
    lens = [pattern[b % len(pattern)] for b in range(B)]
    if B == 1:
        lens = [T]
    return torch.tensor(lens, dtype=torch.int64)


# (engine, dtype, TF32): every engine of common.cuh
ENGINES = [
    ("bf16", torch.bfloat16, False),
    ("fp16", torch.float16, False),
    ("tf32", torch.float32, True),
    ("fp32", torch.float32, False),
    ("fp64", torch.float64, False),
]
# (H, B, reverse): B = 33 is two batch passes of 32 on the tensor-core engines and five of 8 on
# the FMA engine; B = 12 selects 2 n-tiles; H = 129 is 9 CTAs with 4 m-tiles each (LSTM forward).
SHAPES = [(129, 33, True), (37, 17, False), (37, 12, True), (3, 5, True), (1, 1, False)]


@pytest.mark.parametrize("engine,dtype,tf32", ENGINES, ids=[e[0] for e in ENGINES])
@pytest.mark.parametrize("H,B,reverse", SHAPES, ids=[f"H{h}-B{b}-{'rev' if r else 'fwd'}" for h, b, r in SHAPES])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_kernels(monkeypatch, engine, dtype, tf32, H, B, reverse, mode):
    """Forward and backward against the fp64 reference; lengths unsorted with a zero length; no
    bias at H = 37."""
    monkeypatch.setattr(kernels, "_lengths", _lengths_with_zero)
    if tf32:  # TF32: 10-bit mantissa in the recurrent GEMM (test_cpp's GPU TF32 tolerance)
        monkeypatch.setitem(kernels.TOL, torch.float32, 2e-3)
    check = kernels.check_lstm if mode == "lstm" else kernels.check_gru
    with rnn_tf32(tf32):
        check(cuda, "cpu", dtype, T=4, B=B, H=H, lengths="unsorted", reverse=reverse, bias=H != 37)


@pytest.mark.parametrize("engine,dtype,tf32", ENGINES, ids=[e[0] for e in ENGINES])
@pytest.mark.parametrize("H,P", [(37, 5), (129, 64)])
def test_kernels_projection(monkeypatch, engine, dtype, tf32, H, P):
    monkeypatch.setattr(kernels, "_lengths", _lengths_with_zero)
    if tf32:
        monkeypatch.setitem(kernels.TOL, torch.float32, 2e-3)
    with rnn_tf32(tf32):
        kernels.check_lstm(cuda, "cpu", dtype, T=3, B=17, H=H, P=P, reverse=P == 5)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 5, 37), (6, 1, 37), (0, 3, 5)], ids=["T1B1", "T1", "B1", "T0"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_kernels_edge_shapes(shape, mode):
    T, B, H = shape
    check = kernels.check_lstm if mode == "lstm" else kernels.check_gru
    with rnn_tf32(False):
        check(cuda, "cpu", torch.float32, T=T, B=B, H=H, lengths="unsorted" if T > 0 else "none")


@pytest.mark.parametrize("dtype", kernels.DTYPES, ids=str)
@pytest.mark.parametrize("H", [1, 37, 129])
def test_kernels_cells(dtype, H):
    kernels.check_lstm_cell(cuda, "cpu", dtype, B=5, H=H)
    kernels.check_gru_cell(cuda, "cpu", dtype, B=5, H=H, bias=(False, True))


# ================================================================ planner variants, stepwise
VARIANTS = [("legacy", 0), ("barrier", 0), ("flags", 0), ("barrier", 3), ("flags", 2)]


@pytest.mark.parametrize("variant,groups", VARIANTS, ids=[f"{v}-g{g}" for v, g in VARIANTS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("mode,H,B,P", [("lstm", 37, 20, 0), ("gru", 37, 20, 0), ("lstm", 40, 9, 13)])
def test_plan_variants(monkeypatch, variant, groups, dtype, mode, H, B, P):
    """Every geometry and exchange protocol of the planner computes the same function (test_cpp's
    GPU test_cuda_plan_variants, here through the emulation)."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", variant)
    monkeypatch.setenv("FUSEDRNN_CUDA_GROUPS", str(groups))
    monkeypatch.setattr(kernels, "_lengths", _lengths_with_zero)
    tf32 = dtype == torch.float32 and variant == "flags"  # flags need tensor cores: TF32 for fp32
    if tf32:
        monkeypatch.setitem(kernels.TOL, torch.float32, 2e-3)
    with rnn_tf32(tf32):
        if mode == "lstm":
            kernels.check_lstm(cuda, "cpu", dtype, T=3, B=B, H=H, P=P, lengths="unsorted", reverse=True)
        else:
            kernels.check_gru(cuda, "cpu", dtype, T=3, B=B, H=H, lengths="unsorted", reverse=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_stepwise_strategy(monkeypatch, dtype, mode, reverse):
    """The large-batch strategy (stepwise.cu: per step a GEMM with an fp32 result, then the
    pointwise kernel): forced with FUSEDRNN_CUDA_PLAN=stepwise, lengths unsorted with a zero."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", "stepwise")
    monkeypatch.setattr(kernels, "_lengths", _lengths_with_zero)
    c = emu.controls()
    c.clear_launch_log()
    check = kernels.check_lstm if mode == "lstm" else kernels.check_gru
    check(cuda, "cpu", dtype, T=4, B=9, H=37, lengths="unsorted", reverse=reverse)
    names = {r["kernel"].split("<")[0] for r in c.launch_log()}
    assert names == {f"{mode}_step_fwd_kernel", f"{mode}_step_bwd_kernel"}, names


# ============================================================== inference path (save=False)
SAVE_CASES = [  # (mode, dtype, TF32, H, B, P, FUSEDRNN_CUDA_PLAN)
    ("lstm", torch.bfloat16, False, 37, 17, 0, "flags"),
    ("lstm", torch.bfloat16, False, 37, 17, 0, "barrier"),
    ("lstm", torch.bfloat16, False, 37, 17, 0, "legacy"),
    ("lstm", torch.float16, False, 37, 17, 0, "stepwise"),
    ("lstm", torch.float32, False, 37, 17, 13, ""),
    ("lstm", torch.float32, True, 37, 17, 13, "flags"),
    ("lstm", torch.float64, False, 20, 5, 0, ""),
    ("gru", torch.bfloat16, False, 37, 17, 0, "flags"),
    ("gru", torch.bfloat16, False, 37, 17, 0, "barrier"),
    ("gru", torch.bfloat16, False, 37, 17, 0, "stepwise"),
    ("gru", torch.float32, False, 37, 17, 0, ""),
    ("gru", torch.float64, False, 20, 5, 0, "legacy"),
]


@pytest.mark.parametrize("mode,dtype,tf32,H,B,P,variant", SAVE_CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}{'-tf32' if c[2] else ''}-P{c[5]}-{c[6] or 'auto'}"
                              for c in SAVE_CASES])
def test_save_false_gives_the_same_outputs(monkeypatch, mode, dtype, tf32, H, B, P, variant):
    """save=False (inference) returns y, h_n (and c_n) identical to save=True and the saved
    tensors as empty (0,) tensors of their dtypes; the kernels skip those stores."""
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", variant)
    lens = _lengths_with_zero(B, 4, "unsorted")
    ops = torch.ops.fusedrnn_emu
    with rnn_tf32(tf32):
        if mode == "lstm":
            x, w, b, h0, c0 = _lstm_inputs(dtype, T=4, B=B, H=H)
            wr = None
            if P:
                g = torch.Generator().manual_seed(5)
                w = (torch.randn(4 * H, P, generator=g, dtype=torch.float64) * P ** -0.5).to(dtype)
                wr = (torch.randn(P, H, generator=g, dtype=torch.float64) * H ** -0.5).to(dtype)
                h0 = h0[:, :P].contiguous()
            full = ops.lstm_fwd(x, w, b, h0, c0, wr, lens, True, tf32, True)
            inf = ops.lstm_fwd(x, w, b, h0, c0, wr, lens, True, tf32, False)
            n = 3
        else:
            x, w, b, h0 = _gru_inputs(dtype, T=4, B=B, H=H)
            full = ops.gru_fwd(x, w, b, h0, lens, True, tf32, True)
            inf = ops.gru_fwd(x, w, b, h0, lens, True, tf32, False)
            n = 2
    for a, o in zip(full[:n], inf[:n]):
        assert torch.equal(a, o)
    for saved, f in zip(inf[n:], full[n:]):
        assert saved.shape == (0,) and saved.dtype == f.dtype and f.numel() > 0


@pytest.mark.parametrize("mode,kw", test_inference_path.CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("packed", [False, True])
def test_modules_under_no_grad_save_nothing(monkeypatch, mode, kw, packed):
    """test_inference_path's module check through the emulated kernels: under no_grad /
    inference_mode the modules pass save=False and get bitwise the training forward's outputs."""
    test_inference_path.test_inference_outputs_bitwise_equal_training_forward("cuda", mode, kw, packed, monkeypatch)


def test_unsaved_emulated_ops_return_empty_saved_tensors():
    test_inference_path.test_unsaved_ops_return_empty_saved_tensors("cuda")


# ====================================================================== every kernel runs
def _global_kernels():
    """Names of the __global__ functions of csrc/cuda/*.cu."""
    names = set()
    for f in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", f.read_text()):
            names.add(m.group(1))
    return names


def _compiled_kernel_instantiations():
    """Every instantiation of a __global__ kernel of csrc/cuda compiled into the emulation (read
    from the extension's symbol table: the template instantiations the kernels' dispatch makes)."""
    globals_ = _global_kernels()
    return {n for n in emu.controls().compiled_functions() if n.split("<")[0] in globals_}


# Small configurations the instantiation test draws from, cheapest first: (SMs, FUSEDRNN_CUDA_PLAN,
# H, B).  Which kernel each runs is the planner's choice on that device, asked before running.
_SEARCH = [(sms, variant, H, B) for sms in (SMALL_SMS, 2) for variant in ("barrier", "flags", "legacy")
           for H, B in ((3, 5), (17, 9), (17, 17), (3, 33), (17, 33))]
_ENGINE_RUNS = [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True), (torch.float32, False),
                (torch.float64, False)]


def test_every_kernel_instantiation_is_executed(monkeypatch):
    """Every __global__ kernel of csrc/cuda, in every template instantiation compiled into the
    emulation (engine, n-tiles, exchange protocol; storage type of the cells and the stepwise
    kernels), is launched and checked against the fp64 reference here."""
    c = emu.controls()
    compiled = _compiled_kernel_instantiations()
    # every kernel of the source is compiled in (a kernel no dispatch instantiates would be dead)
    assert {n.split("<")[0] for n in compiled} == _global_kernels()
    monkeypatch.setitem(kernels.TOL, torch.float32, 2e-3)  # TF32 runs among them
    c.reset_kernel_launch_counts()
    for dtype in kernels.DTYPES:
        kernels.check_lstm_cell(cuda, "cpu", dtype, B=2, H=3)
        kernels.check_gru_cell(cuda, "cpu", dtype, B=2, H=3)
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", "stepwise")
    for dtype in (torch.bfloat16, torch.float16):
        kernels.check_lstm(cuda, "cpu", dtype, T=2, B=5, H=3, lengths="unsorted")
        kernels.check_gru(cuda, "cpu", dtype, T=2, B=5, H=3, lengths="unsorted")
    missing = compiled - set(c.kernel_launch_counts())
    for sms, variant, H, B in _SEARCH:
        monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", variant)
        with emu.emulated_device("H100", sms):
            for dtype, tf32 in _ENGINE_RUNS:
                for mode in ("lstm", "gru"):
                    plans = _plans(mode, dtype, tf32, H, B, variant=variant)
                    if not {_kernel_name(p, dtype, tf32, plans[p]) for p in plans} & missing:
                        continue
                    with rnn_tf32(tf32):
                        check = kernels.check_lstm if mode == "lstm" else kernels.check_gru
                        check(cuda, "cpu", dtype, T=2, B=B, H=H, lengths="unsorted")
                    missing -= set(c.kernel_launch_counts())
    assert not missing, sorted(missing)
    assert set(c.kernel_launch_counts()) == compiled


# ====================================================================== mutation sanity
# Each mutation is one exact text replacement in the kernel source; if the source no longer
# contains the text, the kernels changed and the mutation must be updated (the test fails).
# name: (test-only build it goes into, file mutated, old text, new text).  A build compiles the
# kernel files of its ops once (parsing ATen and instantiating the kernels dominate CI's time), so
# mutations share a build where they cannot meet: different files of different ops, or parts of
# common.cuh no test of the other mutation runs (noted per test).
MUTATIONS = {
    # a1 and a2 registers of the m16n8k16 A fragment swapped (the m16n8k8 order)
    "fragment": ("common_a", "common.cuh",
                 "      v.y = pack(row + 8, k);      // a1: row g+8\n      v.z = pack(row, k + 2);  ",
                 "      v.y = pack(row, k + 2);      // a1: row g+8\n      v.z = pack(row + 8, k);  "),
    # flag exchange of fp32 (TF32 engine): a plain (weak) store instead of st.relaxed
    "flag_weak": ("common_a", "common.cuh",
                  "    dev::st_relaxed_gpu(p, (static_cast<unsigned long long>(tag) << 32) | float_bits(v));",
                  "    *p = (static_cast<unsigned long long>(tag) << 32) | float_bits(v);"),
    # the acquire after the split barrier's relaxed spin left out
    "acquire": ("common_b", "common.cuh",
                "        (void)dev::ld_acquire_gpu(counter);  // synchronises with every arrival (release sequence)\n",
                ""),
    # flag exchange of 16-bit words: readers take them without checking their tags
    "flag_check": ("common_b", "common.cuh",
                   "    for (int e = 0; e < 8; ++e) ok &= (e >= nvalid) | ((w[e] >> 16) == tag);",
                   "    for (int e = 0; e < 8; ++e) ok &= (e >= nvalid) | true;"),
    # the split barrier's wait left out (arrive stays): the next step reads unpublished h
    "barrier": ("files_a", "lstm_fwd.cu",
                "      prefetch(a.reverse ? t - 1 : t + 1);\n      sync.wait();",
                "      prefetch(a.reverse ? t - 1 : t + 1);"),
    # the double buffer of h collapsed to one buffer (h_t written where h_{t-1} is still read)
    "buffer": ("files_a", "gru_fwd.cu",
               "W* hnxt = hbuf + ((s + 1) & 1) * a.hbuf_stride;",
               "W* hnxt = hbuf + (s & 1) * a.hbuf_stride;"),
    # the bounds check of the LSTM cell kernel off by one
    "bounds": ("files_a", "cells.cu",
               "  if (idx >= B * H) return;\n  const int64_t b = idx / H, u = idx % H, G = 4 * H;\n  A pre[4];",
               "  if (idx > B * H) return;\n  const int64_t b = idx / H, u = idx % H, G = 4 * H;\n  A pre[4];"),
    # no __syncthreads between staging W_hh in shared memory and the first GEMM
    "syncthreads": ("files_b", "lstm_fwd.cu",
                    "  dev::sync_threads();\n\n  const int rows_hh = g.a.MT * 16, rows_hr = g.b.MT * 16;",
                    "\n  const int rows_hh = g.a.MT * 16, rows_hr = g.b.MT * 16;"),
    # block 0 never arrives at the grid barrier the others wait in (barrier protocol only)
    "deadlock": ("files_b", "gru_fwd.cu",
                 "    if (s + 1 < a.T_) sync.arrive();",
                 "    if (s + 1 < a.T_ && dev::block_idx() != 0) sync.arrive();"),
    # flag exchange: h_t published with the tag of step t-1 (readers wait for a tag never written;
    # the tags mean nothing to the barrier protocol)
    "flag_tag": ("files_b", "gru_fwd.cu",
                 "const uint32_t tag_h = X::tag(s), tag_n = X::tag(s + 1);",
                 "const uint32_t tag_h = X::tag(s), tag_n = X::tag(s);"),
}
# the ops each test-only build exposes; each op's translation unit needs its kernel file and the
# stepwise strategy it may call
MUTANT_OPS = {"common_a": ["lstm_fwd", "gru_fwd"], "common_b": ["gru_fwd"],
              "files_a": ["lstm_fwd", "gru_fwd", "lstm_cell_fwd"], "files_b": ["lstm_fwd", "gru_fwd"]}
FILES_OF_OP = {"lstm_fwd": ["lstm_fwd.cu", "stepwise.cu"], "gru_fwd": ["gru_fwd.cu", "stepwise.cu"],
               "lstm_cell_fwd": ["cells.cu"]}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """The test-only builds: the mutations applied to copies of csrc, each build's kernel files
    compiled for the emulation into its own namespace (one translation unit each), all in one
    extension with its own emulator runtime.  Returns (its controls, {mutation: torch.ops namespace})."""
    from torch.utils import cpp_extension

    build = tmp_path_factory.mktemp("mutants")
    emu_src = ROOT / "csrc" / "cuda" / "emulation"
    sources = [str(emu_src / "runtime.cpp"), str(emu_src / "bindings.cpp")]
    for name, ops in MUTANT_OPS.items():
        tree = build / name
        shutil.copytree(ROOT / "csrc", tree / "csrc")
        for mutation, (where, target, old, new) in MUTATIONS.items():
            if where != name:
                continue
            path = tree / "csrc" / "cuda" / target
            text = path.read_text()
            assert text.count(old) == 1, f"mutation {mutation!r}: its text is not (once) in csrc/cuda/{target}; update it"
            path.write_text(text.replace(old, new))
        ns = f"fusedrnn_mutant_{name}"
        files = list(dict.fromkeys(f for op in ops for f in FILES_OF_OP[op]))
        wrapper = tree / "csrc" / "cuda" / "emulation" / f"mutant_{name}.cpp"  # object files are named by basename
        wrapper.write_text(
            f"#define FUSEDRNN_EMU_NAMESPACE {ns}\n"
            '#include "kernel_tu.h"\n'
            + "".join(f'#include "../{f}"\n' for f in files)
            + "#undef fusedrnn\n"
            "#include <torch/library.h>\n"
            '#include "ops_emu.h"\n'
            f"TORCH_LIBRARY({ns}, m) {{\n"
            + "".join(f'  m.def("{op}", fusedrnn_emu::emulated<&{ns}::{op}_cuda>("{op}"));\n' for op in ops)
            + "}\n"
        )
        sources.append(str(wrapper))
    module = build / "module.cpp"  # the emulator's controls of this build (its own runtime)
    module.write_text(
        "#include <pybind11/pybind11.h>\n"
        '#include "bindings.h"\n'
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { fusedrnn_emu::add_bindings(m); }\n"
    )
    sources.append(str(module))
    with pytest.MonkeyPatch.context() as mp:
        if shutil.which("ninja") is None:  # pip's ninja sits next to the venv's interpreter
            mp.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        controls = _load_mutants(cpp_extension, sources, emu_src, build)
    return controls, {m: getattr(torch.ops, f"fusedrnn_mutant_{where}") for m, (where, *_) in MUTATIONS.items()}


def _load_mutants(cpp_extension, sources, emu_src, build):
    return cpp_extension.load(
        name="fusedrnn_emulation_mutants",
        sources=sources,
        extra_include_paths=[str(ROOT / "csrc" / "include"), str(emu_src)],
        # -O0: the build is dominated by parsing ATen; the mutants run small shapes
        extra_cflags=["-O0", "-Wno-unknown-pragmas", "-Wno-unused-function"],
        build_directory=str(build),
        verbose=False,
    )


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _lstm_inputs(dtype, T=4, B=33, H=129, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = H ** -0.5
    x = torch.randn(T, B, 4 * H, generator=g, dtype=torch.float64)
    w = torch.randn(4 * H, H, generator=g, dtype=torch.float64) * k
    b = torch.randn(4 * H, generator=g, dtype=torch.float64) * k
    h0, c0 = torch.randn(B, H, generator=g, dtype=torch.float64), torch.randn(B, H, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w, b, h0, c0)]


def _gru_inputs(dtype, T=4, B=33, H=129, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = H ** -0.5
    x = torch.randn(T, B, 3 * H, generator=g, dtype=torch.float64)
    w = torch.randn(3 * H, H, generator=g, dtype=torch.float64) * k
    b = torch.randn(3 * H, generator=g, dtype=torch.float64) * k
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w, b, h0)]


def _mutant_setup(mutants, monkeypatch, plan):
    """The mutants' emulator on the small H100, fixed seed, checker on; FUSEDRNN_CUDA_PLAN=plan."""
    controls, ops = mutants
    controls.set_device("H100", SMALL_SMS)
    controls.set_options(seed=0, race_check=True, block_order="random", thread_order="shuffle")
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", plan)
    return controls, ops


def _lstm_ref(x, w, b, h0, c0):
    from fusedrnn.backends import reference

    return reference.lstm_fwd(*[t.double() for t in (x, w, b, h0, c0)], None, None, False)[0]


def _gru_ref(x, w, b, h0):
    from fusedrnn.backends import reference

    return reference.gru_fwd(*[t.double() for t in (x, w, b, h0)], None, False)[0]


@pytest.mark.parametrize("plan", ["barrier", "flags"])
def test_mutation_fragment_layout_gives_wrong_numbers(mutants, monkeypatch, plan):
    """A1/a2 swapped in the A fragment: the warp-level fragment exchange computes the GEMM the
    hardware would, so the numbers are wrong (and nothing else is reported)."""
    controls, ops = _mutant_setup(mutants, monkeypatch, plan)
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16, B=5, H=37)
    y = ops["fragment"].lstm_fwd(x, w, b, h0, c0, None, None, False, False, True)[0]
    good = torch.ops.fusedrnn_emu.lstm_fwd(x, w, b, h0, c0, None, None, False, False)[0]
    ref = _lstm_ref(x, w, b, h0, c0)
    assert _rel(good, ref) < 2e-2
    assert _rel(y, ref) > 0.1, _rel(y, ref)


def test_mutation_missing_barrier_wait_is_caught(mutants, monkeypatch):
    controls, ops = _mutant_setup(mutants, monkeypatch, "barrier")
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"race: a cross-block ld\.global\.cg read .* lstm_fwd_kernel"):
        ops["barrier"].lstm_fwd(x, w, b, h0, c0, None, None, False, False, True)
    # the interleaving of the blocks alone (checker off) already gives wrong numbers
    controls.set_options(race_check=False)
    y = ops["barrier"].lstm_fwd(x, w, b, h0, c0, None, None, False, False, True)[0]
    assert _rel(y, _lstm_ref(x, w, b, h0, c0)) > 2e-2


def test_mutation_missing_acquire_is_caught(mutants, monkeypatch):
    """The relaxed spin sees every arrival but, without the acquire after it, synchronises with
    none: the emulator's memory is sequentially consistent (the numbers come out right), the
    checker's vector clocks are not, so the next step's reads are reported."""
    controls, ops = _mutant_setup(mutants, monkeypatch, "barrier")
    x, w, b, h0 = _gru_inputs(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"race: a cross-block ld\.global\.cg read .* gru_fwd_kernel"):
        ops["acquire"].gru_fwd(x, w, b, h0, None, False, False, True)


def test_mutation_single_buffer_is_caught(mutants, monkeypatch):
    controls, ops = _mutant_setup(mutants, monkeypatch, "barrier")
    x, w, b, h0 = _gru_inputs(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"race: .*gru_fwd_kernel"):
        ops["buffer"].gru_fwd(x, w, b, h0, None, False, False, True)
    controls.set_options(race_check=False)
    y = ops["buffer"].gru_fwd(x, w, b, h0, None, False, False, True)[0]
    assert _rel(y, _gru_ref(x, w, b, h0)) > 2e-2


def test_mutation_out_of_bounds_is_reported(mutants, monkeypatch):
    controls, ops = _mutant_setup(mutants, monkeypatch, "")
    B, H = 3, 5  # 15 threads of one block: thread 15 reads one element past every (B, 4H) input
    ig, hg, c = torch.randn(B, 4 * H), torch.randn(B, 4 * H), torch.randn(B, H)
    with pytest.raises(RuntimeError) as e:
        ops["bounds"].lstm_cell_fwd(ig, hg, None, None, c)
    msg = str(e.value)
    assert re.search(r"out-of-bounds read in kernel lstm_cell_fwd_kernel<float>.*block 0, thread 15 .* read "
                     r"input 'igates' \(Float\[3, 20\]\) at element 60 \(it has 60\)", msg), msg


def test_mutation_missing_syncthreads_reads_poisoned_shared_memory(mutants, monkeypatch):
    # barrier protocol: a lane's first suspension is its first mma.sync, after it read its W
    # fragments (the flag protocol's __syncwarp before it lets the whole block stage first)
    controls, ops = _mutant_setup(mutants, monkeypatch, "barrier")
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16, B=5, H=37)
    y = ops["syncthreads"].lstm_fwd(x, w, b, h0, c0, None, None, False, False, True)[0]
    assert torch.isnan(y.float()).any()  # W_hh read before it was staged: NaN-poisoned shared memory


def test_mutation_unreached_barrier_is_a_deadlock_not_a_hang(mutants, monkeypatch):
    controls, ops = _mutant_setup(mutants, monkeypatch, "barrier")
    x, w, b, h0 = _gru_inputs(torch.bfloat16, B=5, H=37)
    with pytest.raises(RuntimeError, match="deadlock: every block waits"):
        ops["deadlock"].gru_fwd(x, w, b, h0, None, False, False, True)


def test_mutation_wrong_flag_tag_is_a_deadlock_not_a_hang(mutants, monkeypatch):
    """Flag exchange: readers poll for a tag no writer stores; every block ends up polling."""
    controls, ops = _mutant_setup(mutants, monkeypatch, "flags")
    x, w, b, h0 = _gru_inputs(torch.bfloat16, B=5, H=37)
    with pytest.raises(RuntimeError, match=r"deadlock: every block waits.*polling"):
        ops["flag_tag"].gru_fwd(x, w, b, h0, None, False, False, True)


def test_mutation_unchecked_flags_give_wrong_numbers(mutants, monkeypatch):
    """Flag exchange without the tag check: blocks interleaved by the emulator read words of a
    step their writers have not reached (the zeroed buffer, or two steps old)."""
    controls, ops = _mutant_setup(mutants, monkeypatch, "flags")
    x, w, b, h0 = _gru_inputs(torch.bfloat16)
    y = ops["flag_check"].gru_fwd(x, w, b, h0, None, False, False, True)[0]
    assert _rel(y, _gru_ref(x, w, b, h0)) > 2e-2, _rel(y, _gru_ref(x, w, b, h0))


def test_mutation_weak_store_in_flag_exchange_is_caught(mutants, monkeypatch):
    """A plain store where the flag protocol needs st.relaxed: on the GPU a data race with the
    readers' ld.relaxed (no single-copy atomicity, may be torn or stale); the numbers come out
    right here, the checker reports it."""
    controls, ops = _mutant_setup(mutants, monkeypatch, "flags")
    x, w, b, h0 = _gru_inputs(torch.float32, B=12, H=37)  # TF32: 64-bit flag words
    plan = cuda.plan("gru_fwd", torch.float32, 37, 12, device=emu.device_record(), tf32=True, variant="flags")
    assert plan["sync"] == "flags" and plan["grid"] > 1
    with pytest.raises(RuntimeError, match=r"race: a cross-block ld\.relaxed read of data another block wrote with "
                                           r"a plain \(weak\) store.*gru_fwd_kernel<float, MmaEngineTF32"):
        ops["flag_weak"].gru_fwd(x, w, b, h0, None, False, True, True)
