"""The CUDA kernels of csrc/cuda executed on CPU under the CUDA emulation (issue 9).

With ``FUSEDRNN_CUDA_EMULATION=1`` the ``cuda`` backend runs CPU tensors through the very kernel
source of csrc/cuda, compiled as host C++ into ``fusedrnn._C`` (``torch.ops.fusedrnn_emu``) and
executed under a CUDA-semantics emulator (README, "CUDA emulation").  This file runs, through it:

* the module grid of test_modules.py (LSTM, GRU and the cells, forward and backward, gradcheck,
  opcheck) with ``backend="cuda"`` on CPU, with torch's native RNN kernels unused;
* the kernel-level checks of test_cpp.py for every engine (bf16, fp16, TF32, fp32 FMA, fp64) and
  hostile shapes (H in 1, 3, 37, 129; B in 1, 5, 12, 17, 33; unsorted lengths with a zero length;
  reverse; bias-less; proj_size; T = 1) on a small emulated H100 (9 SMs) that still gives
  multi-block grids, several batch passes and several m-tiles per block, and checks every
  ``__global__`` kernel instantiation of csrc/cuda was launched;
* the device records (the planners' limits on the emulated H200 equal the ones measured on the
  real H200);
* mutation sanity: a test-only build of deliberately broken kernels (a fragment layout, a grid
  barrier, a double-buffer index, a bounds check, a __syncthreads, a barrier only some blocks
  reach), each caught by the emulation.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

import pytest
import torch

from fusedrnn.backends import cuda, cuda_emulation as emu, rnn_tf32

if emu.unavailable() is not None:
    pytest.skip(f"CUDA emulation: {emu.unavailable()}", allow_module_level=True)

sys.path.insert(0, os.path.dirname(__file__))
import test_api as api  # noqa: E402
import test_cpp as kernels  # noqa: E402
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
    """The emulated device answers the planners' questions as the GPU does.

    Attributes: cudaGetDeviceProperties of H100/H200 (132 SMs, 227 KiB opt-in shared memory per
    block, 228 KiB per SM) and A100 (108 SMs, 163 / 164 KiB).  Planner limits on the emulated
    H200: equal to max_hidden_size measured on the real H200 (BENCHMARKS.md run 1: LSTM bf16
    H = 1664, GRU bf16 H = 2112) - a change of the planners changes both."""
    c = emu.controls()
    for name, sms, optin, per_sm in (("H100", 132, 232448, 233472), ("H200", 132, 232448, 233472),
                                     ("A100", 108, 166912, 167936)):
        with emu.emulated_device(name) as d:
            assert (d["sms"], d["smem_optin"], d["smem_per_sm"], d["regs_per_sm"]) == (sms, optin, per_sm, 65536)
    with emu.emulated_device("H200"):
        assert c.max_hidden_size("LSTM", "bfloat16") == 1664
        assert c.max_hidden_size("GRU", "bfloat16") == 2112
    with emu.emulated_device("H100", 4):  # the limits scale with the SM count
        assert 0 < c.max_hidden_size("LSTM", "bfloat16") < 1664 // 8


def test_small_device_gives_multi_block_grids():
    c = emu.controls()
    c.clear_launch_log()
    with rnn_tf32(False):
        kernels.check_lstm(cuda, "cpu", torch.bfloat16, T=3, B=33, H=129)
    persistent = [r for r in c.launch_log() if r["cooperative"]]
    assert persistent and all(r["grid"] == SMALL_SMS for r in persistent), persistent
    with emu.emulated_device("H100", 3):
        with pytest.raises(ValueError, match="max_hidden_size"):
            import fusedrnn

            fusedrnn.LSTM(4, 129, backend="cuda")(torch.randn(2, 1, 4))


def test_results_do_not_depend_on_the_interleaving():
    """Correct kernels give bitwise the same results under every schedule the emulator tries."""
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16, T=3, B=33, H=129)
    xg, wg, bg, _ = _gru_inputs(torch.bfloat16, T=3, B=33, H=129)
    results = []
    for block_order, thread_order, seed in (("random", "shuffle", 0), ("random", "shuffle", 7),
                                            ("round_robin", "forward", 0), ("round_robin", "reverse", 0)):
        with emu.emulation_options(block_order=block_order, thread_order=thread_order, seed=seed):
            y = torch.ops.fusedrnn_emu.lstm_fwd(x, w, b, h0, c0, None, None, False, False)
            g = torch.ops.fusedrnn_emu.gru_fwd(xg, wg, bg, h0, None, True, False)
            results.append(list(y) + list(g))
    for other in results[1:]:
        assert all(torch.equal(a, o) for a, o in zip(results[0], other))


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


def _global_kernels():
    """Names of the __global__ functions of csrc/cuda/*.cu."""
    names = set()
    for f in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", f.read_text()):
            names.add(m.group(1))
    return names


def test_every_kernel_instantiation_is_executed(monkeypatch):
    """Every __global__ kernel of csrc/cuda, in every engine / dtype instantiation, runs here."""
    c = emu.controls()
    c.reset_kernel_launch_counts()
    monkeypatch.setitem(kernels.TOL, torch.float32, 2e-3)  # TF32 runs among them
    for _, dtype, tf32 in ENGINES:
        with rnn_tf32(tf32):
            for B in (5, 12, 17):  # 1, 2 and 4 n-tiles
                kernels.check_lstm(cuda, "cpu", dtype, T=2, B=B, H=3, lengths="none")
                kernels.check_gru(cuda, "cpu", dtype, T=2, B=B, H=3, lengths="none")
        if not tf32:
            kernels.check_lstm_cell(cuda, "cpu", dtype, B=2, H=3)
            kernels.check_gru_cell(cuda, "cpu", dtype, B=2, H=3)
    launched = set(c.kernel_launch_counts())
    expected = set()
    tensor_core = [f"MmaEngine16<{t}, {nt}>" for t in ("bf16", "f16") for nt in (1, 2, 4)]
    tensor_core += [f"MmaEngineTF32<{nt}>" for nt in (1, 2, 4)]
    for k in ("lstm_fwd_kernel", "lstm_bwd_kernel", "gru_fwd_kernel", "gru_bwd_kernel"):
        for eng in tensor_core:
            t = "bf16" if "bf16" in eng else "f16" if "f16" in eng else "float"
            expected.add(f"{k}<{t}, {eng}>")
        expected.add(f"{k}<float, FmaEngine<float>>")
        expected.add(f"{k}<double, FmaEngine<double>>")
    for k in ("lstm_cell_fwd_kernel", "lstm_cell_bwd_kernel", "gru_cell_fwd_kernel", "gru_cell_bwd_kernel"):
        for t in ("bf16", "f16", "float", "double"):
            expected.add(f"{k}<{t}>")
    assert expected <= launched, sorted(expected - launched)
    # ... and that is every __global__ kernel of the source.
    assert {name.split("<")[0] for name in expected} == _global_kernels()


# ====================================================================== mutation sanity
# Each mutation is one exact text replacement in the kernel source; if the source no longer
# contains the text, the kernels changed and the mutation must be updated (the test fails).
MUTATIONS = {
    # a1 and a2 registers of the m16n8k16 A fragment swapped (the m16n8k8 order)
    "fragment": ("common.cuh", "lstm_fwd.cu",
                 "      v.y = pack(row + 8, k);      // a1: row g+8\n      v.z = pack(row, k + 2);  ",
                 "      v.y = pack(row, k + 2);      // a1: row g+8\n      v.z = pack(row + 8, k);  "),
    # the grid barrier at the end of each step left out
    "barrier": ("lstm_fwd.cu", "lstm_fwd.cu",
                "      prefetch(a.reverse ? t - 1 : t + 1);\n      grid_barrier(a.barrier, target);",
                "      prefetch(a.reverse ? t - 1 : t + 1);"),
    # the double buffer of h collapsed to one buffer (h_t written where h_{t-1} is still read)
    "buffer": ("gru_fwd.cu", "gru_fwd.cu",
               "T* hnxt = a.hbuf + ((s + 1) & 1) * a.hbuf_stride;",
               "T* hnxt = a.hbuf + (s & 1) * a.hbuf_stride;"),
    # the bounds check of the LSTM cell kernel off by one
    "bounds": ("cells.cu", "cells.cu",
               "  if (idx >= B * H) return;\n  const int64_t b = idx / H, u = idx % H, G = 4 * H;\n  A pre[4];",
               "  if (idx > B * H) return;\n  const int64_t b = idx / H, u = idx % H, G = 4 * H;\n  A pre[4];"),
    # no __syncthreads between staging W_hh in shared memory and the first GEMM
    "syncthreads": ("lstm_fwd.cu", "lstm_fwd.cu",
                    "  dev::sync_threads();\n\n  const int rows_hh = a.g_hh.MT * 16, rows_hr = a.g_hr.MT * 16;",
                    "\n  const int rows_hh = a.g_hh.MT * 16, rows_hr = a.g_hr.MT * 16;"),
    # a grid barrier block 0 never reaches
    "deadlock": ("gru_fwd.cu", "gru_fwd.cu",
                 "      prefetch(a.reverse ? t - 1 : t + 1);\n      grid_barrier(a.barrier, target);",
                 "      prefetch(a.reverse ? t - 1 : t + 1);\n      if (dev::block_idx() != 0) grid_barrier(a.barrier, target);"),
}
OP_OF_FILE = {"lstm_fwd.cu": ["lstm_fwd"], "gru_fwd.cu": ["gru_fwd"], "cells.cu": ["lstm_cell_fwd"]}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """The test-only build: each mutation applied to a copy of csrc, its kernel file compiled for
    the emulation into its own namespace, all in one extension with its own emulator runtime."""
    from torch.utils import cpp_extension

    build = tmp_path_factory.mktemp("mutants")
    emu_src = ROOT / "csrc" / "cuda" / "emulation"
    sources = [str(emu_src / "runtime.cpp"), str(emu_src / "bindings.cpp")]
    for name, (target, kernel_file, old, new) in MUTATIONS.items():
        tree = build / name
        shutil.copytree(ROOT / "csrc", tree / "csrc")
        path = tree / "csrc" / "cuda" / target
        text = path.read_text()
        assert text.count(old) == 1, f"mutation {name!r}: its text is not (once) in csrc/cuda/{target}; update it"
        path.write_text(text.replace(old, new))
        ns = f"fusedrnn_mutant_{name}"
        ops = OP_OF_FILE[kernel_file]
        wrapper = tree / "csrc" / "cuda" / "emulation" / f"mutant_{name}.cpp"  # object files are named by basename
        # the whole op set of csrc/cuda (its files reference each other: max_hidden_size_cuda),
        # one file mutated; one translation unit per mutant (parsing ATen dominates its build)
        wrapper.write_text(
            f"#define FUSEDRNN_EMU_NAMESPACE {ns}\n"
            '#include "kernel_tu.h"\n'
            + "".join(f'#include "../{f.name}"\n' for f in sorted((tree / "csrc" / "cuda").glob("*.cu")))
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
    return controls, {name: getattr(torch.ops, f"fusedrnn_mutant_{name}") for name in MUTATIONS}


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


def _mutant_setup(mutants):
    controls, ops = mutants
    controls.set_device("H100", SMALL_SMS)
    controls.set_options(seed=0, race_check=True, block_order="random", thread_order="shuffle")
    return controls, ops


def test_mutation_fragment_layout_gives_wrong_numbers(mutants):
    """A1/a2 swapped in the A fragment: the warp-level fragment exchange computes the GEMM the
    hardware would, so the numbers are wrong (and nothing else is reported)."""
    from fusedrnn.backends import reference

    controls, ops = _mutant_setup(mutants)
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16, B=5, H=37)
    y = ops["fragment"].lstm_fwd(x, w, b, h0, c0, None, None, False, False)[0]
    ref = reference.lstm_fwd(*[t.double() for t in (x, w, b, h0, c0)], None, None, False)[0]
    good = torch.ops.fusedrnn_emu.lstm_fwd(x, w, b, h0, c0, None, None, False, False)[0]
    assert _rel(good, ref) < 2e-2
    assert _rel(y, ref) > 0.1, _rel(y, ref)


def test_mutation_missing_grid_barrier_is_caught(mutants):
    from fusedrnn.backends import reference

    controls, ops = _mutant_setup(mutants)
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"race: a cross-block ld\.global\.cg read .* lstm_fwd_kernel"):
        ops["barrier"].lstm_fwd(x, w, b, h0, c0, None, None, False, False)
    # the interleaving of the blocks alone (checker off) already gives wrong numbers
    controls.set_options(race_check=False)
    y = ops["barrier"].lstm_fwd(x, w, b, h0, c0, None, None, False, False)[0]
    ref = reference.lstm_fwd(*[t.double() for t in (x, w, b, h0, c0)], None, None, False)[0]
    assert _rel(y, ref) > 2e-2, _rel(y, ref)


def test_mutation_single_buffer_is_caught(mutants):
    from fusedrnn.backends import reference

    controls, ops = _mutant_setup(mutants)
    x, w, b, h0 = _gru_inputs(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"race: .*gru_fwd_kernel"):
        ops["buffer"].gru_fwd(x, w, b, h0, None, False, False)
    controls.set_options(race_check=False)
    y = ops["buffer"].gru_fwd(x, w, b, h0, None, False, False)[0]
    ref = reference.gru_fwd(*[t.double() for t in (x, w, b, h0)], None, False)[0]
    assert _rel(y, ref) > 2e-2, _rel(y, ref)


def test_mutation_out_of_bounds_is_reported(mutants):
    controls, ops = _mutant_setup(mutants)
    B, H = 3, 5  # 15 threads of one block: thread 15 reads one element past every (B, 4H) input
    ig, hg, c = torch.randn(B, 4 * H), torch.randn(B, 4 * H), torch.randn(B, H)
    with pytest.raises(RuntimeError) as e:
        ops["bounds"].lstm_cell_fwd(ig, hg, None, None, c)
    msg = str(e.value)
    assert re.search(r"out-of-bounds read in kernel lstm_cell_fwd_kernel<float>.*block 0, thread 15 .* read "
                     r"input 'igates' \(Float\[3, 20\]\) at element 60 \(it has 60\)", msg), msg


def test_mutation_missing_syncthreads_reads_poisoned_shared_memory(mutants):
    controls, ops = _mutant_setup(mutants)
    x, w, b, h0, c0 = _lstm_inputs(torch.bfloat16, B=5, H=37)
    y = ops["syncthreads"].lstm_fwd(x, w, b, h0, c0, None, None, False, False)[0]
    assert torch.isnan(y.float()).any()  # W_hh read before it was staged: NaN-poisoned shared memory


def test_mutation_unreached_barrier_is_a_deadlock_not_a_hang(mutants):
    controls, ops = _mutant_setup(mutants)
    x, w, b, h0 = _gru_inputs(torch.bfloat16, B=5, H=37)
    with pytest.raises(RuntimeError, match="deadlock: every block waits"):
        ops["deadlock"].gru_fwd(x, w, b, h0, None, False, False)
