"""Fast CPU tests of the benchmark harness and CLI (timings are never asserted, only their shape)."""

import json
import math

import pytest
import torch

from fusedrnn.bench import configs as C
from fusedrnn.bench import harness, report
from fusedrnn.bench.__main__ import main

FAST = ["--min-time", "0.005", "--max-reps", "2", "--warmup", "0", "--threads", "1", "--device", "cpu"]
REQUIRED = (
    "config", "backend", "device", "dtype", "fwd_ms", "fwdbwd_ms", "ratio_vs_torch",
    "fwd_ratio_vs_torch", "max_rel_err", "peak_mem_mb", "tokens_per_s", "floor_ms", "fwd_over_floor",
    "error",
)
TOP = ("torch_version", "triton_version", "cuda_version", "device", "date", "git_commit", "rows")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    files = dict(json=d / "b.json", markdown=d / "b.md", plot=d / "b.png")
    rc = main(["--suite", "tiny", "--backends", "torch", "reference", *FAST,
               "--json", str(files["json"]), "--markdown", str(files["markdown"]), "--plot", str(files["plot"])])
    return rc, files


def test_tiny_suite_cli(tiny_run):
    rc, files = tiny_run
    assert rc == 0
    data = json.loads(files["json"].read_text())
    for k in TOP:
        assert k in data, k
    rows = data["rows"]
    assert len(rows) == 2 * len(C.TINY)
    assert {r["config"] for r in rows} == {c.name for c in C.TINY}
    by = {(r["config"], r["backend"]): r for r in rows}
    for r in rows:
        for k in REQUIRED:
            assert k in r, k
        assert r["error"] is None, r["error"]
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["tokens_per_s"] > 0
        assert math.isfinite(r["max_rel_err"]) and r["max_rel_err"] < 1e-5, (r["config"], r["rel_errs"])
        assert r["ok"] is True
        # CPU: the compute floor over the GEMM rate measured in the run (test_cpu_bench.py)
        assert r["floor_ms"] > 0 and r["cpu_gemm_gflops"] > 0 and r["fwd_over_floor"] > 0
        t = by[(r["config"], "torch")]
        assert r["ratio_vs_torch"] == pytest.approx(t["fwdbwd_ms"] / r["fwdbwd_ms"])
        assert r["fwd_ratio_vs_torch"] == pytest.approx(t["fwd_ms"] / r["fwd_ms"])
    # every output and every gradient is compared
    lstm = by[("lstm-h16-b2-t4-fp32", "reference")]["rel_errs"]
    for k in ("output", "h_n", "c_n", "grad_input", "grad_h0", "grad_c0", "grad_weight_ih_l0",
              "grad_weight_hh_l0", "grad_bias_ih_l0", "grad_bias_hh_l0", "output_eval"):
        assert k in lstm, k
    packed = [c.name for c in C.TINY if c.lengths][0]
    assert "grad_weight_hh_l1_reverse" in by[(packed, "reference")]["rel_errs"]
    assert by[(packed, "torch")]["tokens"] < C.by_name(packed).T * C.by_name(packed).B + 1


def test_tiny_suite_reports(tiny_run):
    _, files = tiny_run
    md = files["markdown"].read_text()
    assert "| config | backend |" in md and "commit:" in md and "lstm-h16-b2-t4-fp32" in md
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_suite_filtered(tmp_path):
    out = tmp_path / "q.json"
    rc = main(["--quick", "--backends", "torch", "reference", "--filter", "lstm-h64-*", "gru-h64-*",
               *FAST, "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["error"] is None for r in rows)


def test_unavailable_backend_is_a_row_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSEDRNN_CUDA_EMULATION", raising=False)  # (it would run cuda on CPU)
    out = tmp_path / "u.json"
    rc = main(["--suite", "tiny", "--filter", "gru-*", "--backends", "torch", "cuda", *FAST, "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    cuda_rows = [r for r in rows if r["backend"] == "cuda"]
    assert cuda_rows and all(r["error"] for r in cuda_rows)
    assert all(r["error"].startswith(harness.NOT_FAILURES) for r in cuda_rows)
    assert rc == 0


def test_exception_in_a_row_is_recorded(monkeypatch):
    real = harness.build_module

    def broken(cfg, backend, device, reference):
        if backend == "reference":
            raise ValueError("fusedrnn: backend='reference' does not support this LSTM: test")
        if backend == "cpp":
            raise RuntimeError("boom")
        return real(cfg, backend, device, reference)

    monkeypatch.setattr(harness, "build_module", broken)
    monkeypatch.setattr(harness, "skip_reason", lambda *a: None)
    opts = harness.TimingOptions(min_time_s=0.001, min_reps=1, max_reps=1, warmup=0, n_sets=2)
    rows = harness.run_suite(C.TINY[:1], ["torch", "reference", "cpp"], "cpu", opts=opts, progress=False)
    by = {r["backend"]: r for r in rows}
    assert by["torch"]["error"] is None
    assert by["reference"]["error"].startswith("unsupported: ValueError")
    assert by["cpp"]["error"] == "RuntimeError: boom"


def test_wrong_results_are_flagged(monkeypatch, tmp_path):
    real = harness.Case.results

    def wrong(self):
        res = real(self)
        if self.backend != "torch":
            res["grad_weight_hh_l0"] = res["grad_weight_hh_l0"] * 1.01
        return res

    monkeypatch.setattr(harness.Case, "results", wrong)
    out = tmp_path / "w.json"
    rc = main(["--suite", "tiny", "--filter", "lstm-h16-b2-t4-fp32", "--backends", "torch", "reference",
               *FAST, "--json", str(out)])
    assert rc == 1
    bad = [r for r in json.loads(out.read_text())["rows"] if r["backend"] == "reference"][0]
    assert bad["ok"] is False and bad["worst_tensor"] == "grad_weight_hh_l0"
    assert bad["max_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert "NO" in report.format_table([bad], color=False)


def test_time_budget_skips_rows():
    rows = harness.run_suite(C.TINY[:2], ["torch"], "cpu", time_budget_s=0.0, progress=False)
    assert len(rows) == 2 and all(r["error"].startswith("skipped") for r in rows)


def test_standard_suite_names():
    assert [c.name for c in C.suite("standard", "cuda")] == [
        "fastrnns-lstm-fp32", "lstm-h768-b16-t1024-bf16", "lstm-h768-b16-t1024-fp16",
        "gru-h768-b16-t1024-bf16", "lstm-h1024-b4-t512-bf16", "lstm-h1024-b256-t128-bf16",
        "lstm3-bidir-h512-b32-packed-bf16", "lstm-h2048-b32-t256-bf16",
    ]
    packed = C.by_name("lstm3-bidir-h512-b32-packed-bf16")
    assert (packed.layers, packed.bidirectional, packed.I, packed.B, packed.lengths) == (3, True, 80, 32, (200, 400))
    full = C.suite("full", "cuda")
    assert {"B", "H", "T"} <= {c.sweep for c in full}
    assert {"LSTMCell", "GRUCell"} <= {c.mode for c in full}


def test_floor_model():
    assert harness.device_rates("CPU x") is None
    assert harness.device_rates("NVIDIA H100 80GB HBM3").name == "H100 SXM5"
    assert harness.device_rates("NVIDIA H200").hbm_Bps == 4.8e12
    assert "assumed" in harness.device_rates("NVIDIA L4").note
    h100 = harness.device_rates("NVIDIA H100 80GB HBM3")
    for cfg in C.suite("full", "cuda"):
        f = harness.floor_estimate(cfg, h100)
        assert 0 < f["fwd_s"] < f["fwdbwd_s"], cfg.name
        if not cfg.is_cell:  # at least one barrier per step when W_hh spans several SMs
            assert f["fwd_s"] >= cfg.T * cfg.layers * (h100.barrier_s if cfg.H >= 256 else 0)
    c = C.by_name("lstm-h768-b16-t1024-bf16")
    assert harness.floor_estimate(c, None)["fwd_s"] is None
    # fp32 without TF32 has a lower peak than with it: the floor cannot drop
    f32 = C.by_name("fastrnns-lstm-fp32")
    assert harness.floor_estimate(f32, h100, tf32=False)["fwd_s"] >= harness.floor_estimate(f32, h100, tf32=True)["fwd_s"]


def test_rel_err():
    b = torch.tensor([3.0, 4.0])
    assert harness.rel_err(b, b) == 0.0
    assert harness.rel_err(b + torch.tensor([0.0, 0.5]), b) == pytest.approx(0.1)
    assert harness.rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
    assert harness.rel_err(None, b) == math.inf
    assert math.isnan(harness.rel_err(torch.tensor([math.nan, 0.0]), b))


@pytest.mark.gpu
def test_tiny_suite_on_cuda(tmp_path):
    """The CUDA-only paths of the harness: events, peak memory, floor, every usable kernel backend."""
    out = tmp_path / "g.json"
    backends = harness.default_backends(torch.device("cuda"))
    rc = main(["--suite", "tiny", "--device", "cuda", "--backends", *backends, "--min-time", "0.01",
               "--max-reps", "3", "--json", str(out), "--plot", str(tmp_path / "g.png")])
    data = json.loads(out.read_text())
    assert data["device_type"] == "cuda" and data["floor_rates"] is not None
    torch_rows = [r for r in data["rows"] if r["backend"] == "torch"]
    assert torch_rows and all(r["error"] is None for r in torch_rows)
    for r in data["rows"]:
        if r["error"] is None:
            assert r["peak_mem_mb"] is not None and r["floor_ms"] > 0 and r["fwd_over_floor"] > 0
            assert r["ok"] is True, (r["config"], r["backend"], r["worst_tensor"], r["max_rel_err"])
    assert rc == 0, [(r["config"], r["backend"], r["error"]) for r in data["rows"] if r["error"]]


# ------------------------------------------------------------------------- CUDA cost model
def test_cost_model_predicts_from_a_device_record():
    from fusedrnn.backends import cpp
    from fusedrnn.bench import costmodel

    if cpp.unavailable() is not None:
        pytest.skip(cpp.unavailable())
    from fusedrnn.backends.cuda import KNOWN_DEVICES

    h200 = KNOWN_DEVICES["H200"]
    cfg = C.by_name("lstm-h768-b16-t1024-bf16")
    p = costmodel.predict(cfg, h200)
    for k in ("fwd_step_us", "bwd_step_us", "fwd_train_step_us") + costmodel.TERMS:
        assert p[k] >= 0, k
    assert p["fwd_step_us"] > 0 and p["plan"].startswith("U")
    # the step is at least its slowest parallel term plus the serial ones
    assert p["fwd_step_us"] >= max(p["mma_us"], p["smem_us"], p["l2_us"]) + p["sync_us"] - 1e-9
    legacy = costmodel.predict(cfg, h200, variant="legacy")
    assert "(legacy)" in legacy["plan"] and legacy["fwd_step_us"] > p["fwd_step_us"]
    bidir = C.by_name("lstm3-bidir-h512-b32-packed-bf16")
    one = costmodel.predict(C.make("LSTM", 512, 32, 400, "bf16"), h200)
    assert costmodel.predict(bidir, h200)["fwd_step_us"] == pytest.approx(2 * one["fwd_step_us"])
    cell = [c for c in C.TINY if c.is_cell][0]
    assert costmodel.predict(cell, h200) is None  # cells have no recurrence kernel
    # rows only get predictions on CUDA devices with the cuda backend
    assert costmodel.row_prediction(cfg, "cuda", torch.device("cpu"), False) == {}
    assert costmodel.row_prediction(cfg, "triton", torch.device("cpu"), False) == {}


def test_cost_model_tables_render():
    from fusedrnn.bench import costmodel

    rows = [dict(config="c", pred_plan="U16x48 nt2 flags", per_step_us=2.0, pred_fwd_step_us=1.7, pred_lat_us=0.3,
                 pred_mma_us=0.3, pred_smem_us=0.6, pred_l2_us=0.9, pred_cell_us=0.2, pred_sync_us=0.3,
                 pred_bwd_step_us=2.5, error=None)]
    prof = [dict(config="c", variant="auto", plan="U16x48", inf_step_us=1.5, pred_fwd_step_us=1.7, error=None),
            dict(config="c", variant="flags", error="RuntimeError: x")]
    text = costmodel.format_rows(rows, costmodel.COST_COLUMNS)
    assert "U16x48 nt2 flags" in text and "1.70" in text
    md = costmodel.markdown(rows, prof)
    assert "CUDA cost model" in md and "Step profile" in md and "error: RuntimeError: x" in md
    assert costmodel.markdown([], None) == ""


def test_profile_steps_flag_on_cpu_is_harmless(tmp_path, capsys):
    rc = main(["--suite", "tiny", "--filter", "gru-*", "--backends", "torch", *FAST, "--profile-steps"])
    assert rc == 0
    assert "--profile-steps needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
def test_profile_steps_on_cuda():
    from fusedrnn.bench import costmodel

    rows = costmodel.profile_steps([C.make("LSTM", 64, 4, 8, "bf16"), C.make("GRU", 64, 4, 8, "bf16")],
                                   torch.device("cuda"), steps=20, reps=2, progress=None)
    assert len(rows) == 2 * len(costmodel.VARIANTS)
    for r in rows:
        assert r["error"] is None, r
        assert r["inf_tN_ms"] > 0 and r["bwd_tN_ms"] > 0
