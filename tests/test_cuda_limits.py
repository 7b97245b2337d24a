"""On-chip limits and launch plans of the CUDA backend, computed without a GPU.

The fit decision (forward AND backward, per mode, H, proj_size, dtype and device) and the launch
geometry come from the planner in ``csrc/include/fusedrnn/cuda_plan.h``, which the kernels launch
with and which ``fusedrnn._C`` exposes in every build (CPU-only too).  Devices are given as records
with the attributes of ``torch.cuda.get_device_properties()``: the H100/H200/A100 records of
``fusedrnn.backends.cuda.KNOWN_DEVICES``.
"""

from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import pytest
import torch

import fusedrnn
from fusedrnn import backends
from fusedrnn.backends import RecurrenceConfig, cpp

if cpp.unavailable() is not None:
    pytest.skip(f"fusedrnn._C: {cpp.unavailable()}", allow_module_level=True)

from fusedrnn.backends import cuda  # noqa: E402

DEVICES = cuda.KNOWN_DEVICES
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
ROOT = Path(__file__).resolve().parent.parent


def _ns(rec):
    return types.SimpleNamespace(**rec)


# --------------------------------------------------------------------------- device records
def test_device_record_from_object_and_mapping():
    rec = cuda.device_record(_ns(DEVICES["H100"]))
    assert rec == cuda.device_record(DEVICES["H100"])
    assert set(rec) == set(cuda.RECORD_FIELDS)


def test_device_record_names_missing_field():
    partial = dict(DEVICES["A100"])
    del partial["regs_per_multiprocessor"]
    with pytest.raises(ValueError, match="regs_per_multiprocessor"):
        cuda.device_record(partial)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_device_record_without_gpu_raises():
    with pytest.raises(RuntimeError, match="device record"):
        cuda.device_record(None)


# ----------------------------------------------------------------------------------- limits
@pytest.mark.parametrize("name", sorted(DEVICES))
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_limit_is_the_largest_fitting_size(name, mode, dtype):
    dev = _ns(DEVICES[name])
    limit = fusedrnn.max_hidden_size(mode, dtype, backend="cuda", device=dev)
    assert limit > 0
    assert cuda.fits(mode, dtype, limit, 0, dev)[0]
    ok, why = cuda.fits(mode, dtype, limit + 1, 0, dev)
    assert not ok and why
    # every size below the limit fits too (sampled), so the limit is a threshold
    for h in range(1, limit, 97):
        assert cuda.fits(mode, dtype, h, 0, dev)[0], h


def test_limits_ordered_by_dtype_and_device():
    for mode in ("LSTM", "GRU"):
        for name in DEVICES:
            dev = DEVICES[name]
            lim = [fusedrnn.max_hidden_size(mode, dt, backend="cuda", device=dev)
                   for dt in (torch.bfloat16, torch.float32, torch.float64)]
            assert lim[0] > lim[1] > lim[2], (mode, name, lim)
            assert fusedrnn.max_hidden_size(mode, torch.float16, backend="cuda", device=dev) == lim[0]
        assert fusedrnn.max_hidden_size(mode, torch.bfloat16, backend="cuda", device=DEVICES["A100"]) < \
            fusedrnn.max_hidden_size(mode, torch.bfloat16, backend="cuda", device=DEVICES["H100"])


def test_bf16_limits_match_round1_measurement():
    # Run 1 (H200, BENCHMARKS.md) measured the largest bf16 sizes through the occupancy API of the
    # round-1 kernels: LSTM 1664, GRU 2112.  The analytic model must reproduce them.
    for name in ("H100", "H200"):
        assert fusedrnn.max_hidden_size("LSTM", torch.bfloat16, backend="cuda", device=DEVICES[name]) == 1664
        assert fusedrnn.max_hidden_size("GRU", torch.bfloat16, backend="cuda", device=DEVICES[name]) == 2112


@pytest.mark.parametrize("name,dtype,H,P", [("H100", torch.bfloat16, 1536, 1280), ("H200", torch.bfloat16, 1536, 1280),
                                            ("A100", torch.float32, 600, 512)])
def test_projection_counts_in_the_fit(name, dtype, H, P):
    # issue 8 item 9: these ran their forward and then failed in backward; the fit now counts P
    dev = DEVICES[name]
    ok, why = cuda.fits("LSTM", dtype, H, P, dev)
    assert not ok and ("lstm_bwd" in why or "lstm_fwd" in why)
    limit = fusedrnn.max_hidden_size("LSTM", dtype, backend="cuda", proj_size=P, device=dev)
    assert limit < H
    if limit:  # 0: no hidden size above P fits with this projection (A100 fp32, P=512)
        assert limit > P
        assert cuda.fits("LSTM", dtype, limit, P, dev)[0]
        assert not cuda.fits("LSTM", dtype, limit + 1, P, dev)[0]
    else:
        assert not cuda.fits("LSTM", dtype, P + 1, P, dev)[0]
    plimit = cuda.max_proj_size("LSTM", dtype, H, dev)
    assert 0 < plimit < P
    assert cuda.fits("LSTM", dtype, H, plimit, dev)[0]
    assert not cuda.fits("LSTM", dtype, H, plimit + 1, dev)[0]


def test_small_projection_allows_larger_hidden():
    dev = DEVICES["H100"]
    full = fusedrnn.max_hidden_size("LSTM", torch.bfloat16, backend="cuda", device=dev)
    assert fusedrnn.max_hidden_size("LSTM", torch.bfloat16, backend="cuda", proj_size=256, device=dev) > full


def test_max_hidden_size_arguments():
    dev = DEVICES["H100"]
    with pytest.raises(ValueError, match="mode"):
        fusedrnn.max_hidden_size("RNN", torch.float32, backend="cuda", device=dev)
    with pytest.raises(ValueError, match="dtype"):
        fusedrnn.max_hidden_size("LSTM", torch.int32, backend="cuda", device=dev)
    with pytest.raises(ValueError, match="backend"):
        fusedrnn.max_hidden_size("LSTM", torch.float32, backend="cpp", device=dev)
    with pytest.raises(ValueError, match="proj_size"):
        fusedrnn.max_hidden_size("GRU", torch.float32, backend="cuda", proj_size=4, device=dev)
    with pytest.raises(TypeError):
        fusedrnn.max_hidden_size("LSTM", torch.float32, "cuda")  # backend is keyword-only
    with pytest.raises(TypeError, match="proj_size must be an int"):
        fusedrnn.max_hidden_size("LSTM", torch.float32, backend="cuda", proj_size=256.7, device=dev)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_devices_before_sm80_have_no_limit_to_offer(backend):
    """Both kernel backends need sm_80 (bf16/fp16 mma): a V100 / T4 record gets 0, not a number
    computed from its shared memory."""
    old = dict(DEVICES["A100"], name="Tesla T4", major=7, minor=5)
    assert fusedrnn.max_hidden_size("LSTM", torch.bfloat16, backend=backend, device=old) == 0


def test_unsupported_on_a_device_before_sm80(monkeypatch):
    monkeypatch.setattr(cuda, "unavailable", lambda: None)
    monkeypatch.setattr(cuda, "device_record", lambda device=None: dict(DEVICES["A100"], name="Tesla V100", major=7,
                                                                        minor=0))
    assert "compute capability 7.0" in cuda.unsupported(_cfg(256))


def test_triton_limit_through_public_function():
    from fusedrnn.backends.triton import _common

    if _common.unavailable_reason() is not None and "triton" in (_common.unavailable_reason() or ""):
        pytest.skip("triton not importable")
    for name in ("H100", "A100"):
        got = fusedrnn.max_hidden_size("LSTM", torch.bfloat16, backend="triton", device=DEVICES[name])
        assert got > 0


# --------------------------------------------------------------------- backend selection
def _cfg(H, P=0, dtype=torch.bfloat16, mode="LSTM"):
    return RecurrenceConfig(mode, "cuda", 0, dtype, H, P)


@pytest.fixture
def fake_h100(monkeypatch):
    """The cuda backend as if running on an H100: available, device record of an H100."""
    monkeypatch.setattr(cuda, "unavailable", lambda: None)
    real = cuda.device_record
    monkeypatch.setattr(cuda, "device_record", lambda device=None: real(DEVICES["H100"]))
    backends._warned.clear()
    yield
    backends._warned.clear()


def test_unsupported_names_the_limit_for_that_projection(fake_h100):
    assert cuda.unsupported(_cfg(1024)) is None
    assert cuda.unsupported(_cfg(1024, 512)) is None
    reason = cuda.unsupported(_cfg(1536, 1280))
    limit = fusedrnn.max_hidden_size("LSTM", torch.bfloat16, backend="cuda", proj_size=1280, device=DEVICES["H100"])
    assert f"proj_size=1280 the largest hidden_size is {limit}" in reason
    assert "max_hidden_size" in reason
    reason = cuda.unsupported(_cfg(2048))
    assert "max_hidden_size=1664" in reason
    assert cuda.unsupported(RecurrenceConfig("LSTMCell", "cuda", 0, torch.bfloat16, 100000)) is None


def test_explicit_backend_raises_before_any_work(fake_h100):
    with pytest.raises(ValueError, match=r"backend='cuda' does not support this LSTM: .*proj_size=1280"):
        backends.resolve("cuda", _cfg(1536, 1280))


def test_auto_falls_back_once_with_the_reason(fake_h100, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert backends.resolve("auto", _cfg(1536, 1280)) == "torch"
        assert backends.resolve("auto", _cfg(1536, 1280)) == "torch"
    msgs = [str(x.message) for x in w if "falls back" in str(x.message)]
    assert len(msgs) == 1 and "cuda:" in msgs[0] and "proj_size=1280" in msgs[0]
    assert backends.resolve("auto", _cfg(1024)) == "cuda"


# --------------------------------------------------------------------------------- plans
def _plan(pass_, H, B, dtype=torch.bfloat16, dev="H200", **kw):
    return cuda.plan(pass_, dtype, H, B, device=DEVICES[dev], **kw)


@pytest.mark.parametrize("pass_", ["lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd"])
@pytest.mark.parametrize("B", [1, 16, 256])
@pytest.mark.parametrize("variant", ["auto", "persistent", "legacy", "barrier", "flags"])
def test_plans_fit_the_device(pass_, B, variant):
    dev = DEVICES["H200"]
    p = _plan(pass_, 768, B, variant=variant)
    assert p["ok"], p["why"]
    if p["stepwise"]:  # no persistent grid: per-step GEMM + pointwise kernel
        assert variant == "auto" and B == 256
        return
    assert p["grid"] == p["unit_slices"] * p["batch_groups"] <= dev["multi_processor_count"]
    assert p["smem"] <= dev["shared_memory_per_block_optin"]
    assert p["ctas_per_sm"] >= 1
    assert p["group_rows"] * p["batch_groups"] >= B > p["group_rows"] * (p["batch_groups"] - 1)
    assert p["cost"]["step_us"] > 0
    assert p["legacy"] == (variant == "legacy")
    if variant in ("legacy", "barrier"):
        assert p["sync"] == "barrier"
    if variant == "flags":
        assert p["sync"] == "flags"


def test_legacy_plan_is_round1_geometry():
    f = _plan("lstm_fwd", 768, 16, variant="legacy")
    assert (f["U"], f["grid"], f["n_tiles"], f["batch_groups"]) == (8, 96, 2, 1)
    b = _plan("lstm_bwd", 768, 16, variant="legacy")
    assert (b["U"], b["grid"]) == (16, 48)
    g = _plan("gru_fwd", 768, 16, variant="legacy")
    assert (g["U"], g["grid"]) == (10, 77)


def test_cost_model_prefers_new_design_at_design_point():
    # the predictions of BENCHMARKS.md ("CUDA design round 2"): the model must rank them so
    for pass_ in ("lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd"):
        legacy = _plan(pass_, 768, 16, variant="legacy")["cost"]["step_us"]
        auto = _plan(pass_, 768, 16, variant="auto")["cost"]["step_us"]
        assert auto < 0.75 * legacy, (pass_, auto, legacy)


def test_stepwise_only_where_it_wins_and_applies():
    # large batch: the per-step GEMM beats the persistent exchange traffic (BENCHMARKS.md, item 7)
    for pass_ in ("lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd"):
        assert _plan(pass_, 1024, 256)["stepwise"]
        assert not _plan(pass_, 768, 16)["stepwise"]
        assert not _plan(pass_, 1024, 256, variant="persistent")["stepwise"]
        assert _plan(pass_, 768, 16, variant="stepwise")["stepwise"]
    # bf16/fp16 without projection only
    assert not _plan("lstm_fwd", 1024, 256, dtype=torch.float32, tf32=True)["stepwise"]
    assert not _plan("lstm_fwd", 1024, 256, proj_size=512)["stepwise"]
    assert not _plan("lstm_bwd", 1024, 256, proj_size=512, variant="stepwise")["stepwise"]


def test_fp32_fma_engine_never_uses_flags():
    p = _plan("lstm_fwd", 256, 16, dtype=torch.float32, tf32=False, variant="flags")
    assert p["ok"] and p["engine"] == "fma32" and p["sync"] == "barrier"
    p = _plan("gru_bwd", 128, 4, dtype=torch.float64, variant="flags")
    assert p["ok"] and p["engine"] == "fma64" and p["sync"] == "barrier"


def test_forced_batch_groups():
    p = _plan("lstm_fwd", 512, 64, groups=4)
    assert p["batch_groups"] == 4 and p["group_rows"] == 16
    # an impossible request falls back to the planner's choice instead of failing
    assert _plan("lstm_fwd", 1600, 64, groups=64)["ok"]


# -------------------------------------------------------------------------- README table
def _readme_limits_table() -> str:
    rows = []
    for name in ("H100", "H200", "A100"):
        for mode in ("LSTM", "GRU"):
            vals = [fusedrnn.max_hidden_size(mode, dt, backend="cuda", device=DEVICES[name])
                    for dt in (torch.bfloat16, torch.float32, torch.float64)]
            rows.append(f"| `cuda` {mode} ({name}) | {vals[0]} | {vals[1]} | {vals[2]} |")
    return "\n".join(rows)


def test_readme_limits_table_comes_from_max_hidden_size():
    text = (ROOT / "README.md").read_text()
    expected = _readme_limits_table()
    # each row's limits cells (README's table has a "how it is computed" column after them)
    missing = [row for row in expected.split("\n") if not re.search(r"(?m)^" + re.escape(row), text)]
    assert not missing, "README's CUDA limits table differs from fusedrnn.max_hidden_size:\n" + expected
    # and the projection example quoted there
    limit = fusedrnn.max_hidden_size("LSTM", torch.bfloat16, backend="cuda", proj_size=1280, device=DEVICES["H100"])
    assert re.search(rf"proj_size=1280[^.]*?\b{limit}\b", text, re.S)


def test_mistyped_plan_variant_raises(monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", "flag")  # not "flags": never silently another variant
    with pytest.raises((ValueError, RuntimeError), match="FUSEDRNN_CUDA_PLAN must be"):
        _plan("lstm_fwd", 768, 16, variant="")
    monkeypatch.setenv("FUSEDRNN_CUDA_PLAN", "auto")
    monkeypatch.setenv("FUSEDRNN_CUDA_GROUPS", "two")
    with pytest.raises((ValueError, RuntimeError), match="FUSEDRNN_CUDA_GROUPS must be"):
        _plan("lstm_fwd", 768, 16, variant="")
