"""The CPU parts of the benchmark harness: the cpu suite, per-config threads, repeated interleaved
timings, the thread clock, the ratio table and the callgrind plumbing (timings are never asserted)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from fusedrnn.bench import configs as C
from fusedrnn.bench import harness, report
from fusedrnn.bench.__main__ import main

FAST = ["--min-time", "0.002", "--max-reps", "2", "--warmup", "0", "--device", "cpu"]


def test_cpu_suite_grid():
    cfgs = C.suite("cpu")
    names = [c.name for c in cfgs]
    assert len(names) == len(set(names))
    assert {c.threads for c in cfgs} == set(C.CPU_THREADS) == {1, 2}
    assert {c.mode for c in cfgs} == {"LSTM", "GRU"}
    fp32 = [c for c in cfgs if c.dtype == "fp32" and c.T == C.CPU_T]
    assert {c.H for c in fp32} == set(C.CPU_H) and {c.B for c in fp32} == set(C.CPU_B)
    assert {c.T for c in cfgs} == {1, 2, 4, 16, 64, 256}
    short = [c for c in cfgs if c.T <= 4]
    assert {(c.T, c.B) for c in short if c.dtype == "fp32"} == set(C.CPU_SHORT_TB)
    assert {c.H for c in short} == set(C.CPU_SHORT_H)
    assert {c.dtype for c in cfgs} == {"fp32", "bf16", "fp16", "fp64"}
    assert C.by_name("gru-h1024-b64-t64-fp32-thr2").threads == 2
    assert all(re.search(r"-thr[12]$", n) for n in names)
    with pytest.raises(ValueError, match="threads"):
        C.make("LSTM", 8, 1, 1, threads=0)


def test_config_threads_apply_to_rows_and_are_restored(tmp_path):
    before = torch.get_num_threads()
    cfgs = [C.make("GRU", 8, 2, 3, threads=1), C.make("GRU", 8, 2, 3, threads=2)]
    opts = harness.TimingOptions(min_time_s=0.001, min_reps=1, max_reps=2, warmup=0, n_sets=1, repeat=2)
    rows = harness.run_suite(cfgs, ["torch", "reference"], "cpu", opts=opts, progress=False)
    assert torch.get_num_threads() == before
    by = {(r["config"], r["backend"]): r for r in rows}
    for c in cfgs:
        for b in ("torch", "reference"):
            r = by[(c.name, b)]
            assert r["error"] is None and r["threads"] == c.threads
            assert len(r["fwd_ms_runs"]) == 2 and r["fwd_ms"] == min(r["fwd_ms_runs"])
            assert len(r["fwdbwd_ms_runs"]) == 2 and r["fwdbwd_ms"] == min(r["fwdbwd_ms_runs"])
            assert r["clock"] == ("thread" if c.threads == 1 else "wall")


def test_clock_choice():
    opts = harness.TimingOptions()
    cpu = torch.device("cpu")
    with harness.cpu_threads(1):
        assert harness.clock_name(cpu, opts) == "thread"
        opts.clock = "wall"
        assert harness.clock_name(cpu, opts) == "wall"
    with harness.cpu_threads(2):
        opts.clock = "thread"  # one thread's CPU time is not the call's time on two
        assert harness.clock_name(cpu, opts) == "wall"
    opts.clock = "bogus"
    with pytest.raises(ValueError, match="clock"):
        harness.clock_name(cpu, opts)


def test_ratio_table_cli(tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["--suite", "tiny", "--filter", "gru-*", "--backends", "torch", "reference", *FAST,
               "--repeat", "2", "--json", str(out), "--ratios", str(md)])
    assert rc == 0
    text = md.read_text()
    assert "| config | backend | threads |" in text and "timing spread" in text
    rows = json.loads(out.read_text())["rows"]
    ref = [r for r in rows if r["backend"] == "reference"][0]
    assert f"**{ref['ratio_vs_torch']:.2f}**" in text


def test_callgrind_command_and_counter(tmp_path, monkeypatch):
    cmd = harness.callgrind_command(tmp_path, ["--quick", "--filter", "gru-*"])
    assert cmd[:2] == ["valgrind", "--tool=callgrind"] and "--instr-atstart=no" in cmd
    toggles = [a for a in cmd if a.startswith("--toggle-collect=")]
    assert len(toggles) == len(harness.CALLGRIND_FUNCTIONS) == 8
    assert "--toggle-collect=fusedrnn::gru_bwd_cpu(*" in toggles
    assert cmd[-5:] == ["-m", "fusedrnn.bench", "--quick", "--filter", "gru-*"]

    # the counter: zero, run, dump, read the totals of the new dump (callgrind_control faked)
    calls = []
    pid = os.getpid()

    def fake_ctl(self, *args):
        calls.append(args)
        if args[0].startswith("--dump"):
            n = len(list(tmp_path.glob(f"callgrind.out.{pid}.*"))) + 1
            (tmp_path / f"callgrind.out.{pid}.{n}").write_text("events: Ir\nsummary: 3000\ntotals: 3000\n")

    monkeypatch.setattr(harness.Callgrind, "_ctl", fake_ctl)
    counter = harness.Callgrind(tmp_path)
    seen = []
    assert counter.count(seen.append, reps=3, n_sets=2) == 1000.0
    assert seen == [0, 0, 1, 0]  # one untimed call, then 3 rotating over 2 input sets
    assert [c[0] for c in calls] == ["--instr=on", "--zero", "--dump=fusedrnn-bench"]


def test_callgrind_rows_report_instructions():
    """A --callgrind run's rows (instruction counts, no times) render with their own columns."""
    rows = [dict(harness.empty_row(C.TINY[0], "cpp", "CPU x"), fwd_ir=1.5e6, fwdbwd_ir=3e6, max_rel_err=1e-7, ok=True),
            dict(harness.empty_row(C.TINY[0], "torch", "CPU x"),
                 error="skipped: callgrind counts only fusedrnn's C++ CPU ops")]
    text = report.format_table(rows, color=False)
    assert "fwd Minstr" in text and "1.500" in text and "3.000" in text


def test_callgrind_call_scope_collects_everything(tmp_path):
    """Scope "call": no per-function toggles (Python path, dispatch and GEMMs are counted)."""
    cmd = harness.callgrind_command(tmp_path, ["--quick"], scope="call")
    assert "--collect-atstart=yes" in cmd and not [a for a in cmd if a.startswith("--toggle-collect=")]
    assert "--instr-atstart=no" in cmd
    with pytest.raises(ValueError, match="scope"):
        harness.callgrind_command(tmp_path, ["--quick"], scope="bogus")


def test_cpu_floor_counts_the_gemm_flop():
    """The CPU floor: FLOP of the input projections and recurrent GEMMs over the rate; fwd+bwd 3x."""
    rate = 1e11
    lstm = C.make("LSTM", 128, 4, 16, threads=1)  # H = I = 128, B = 4, T = 16
    f = harness.cpu_floor_estimate(lstm, rate)
    G = 4 * 128
    assert f["fwd_s"] == pytest.approx(2 * 16 * 4 * G * (128 + 128) / rate)
    assert f["fwdbwd_s"] == pytest.approx(3 * f["fwd_s"])
    # packed input: the tokens that exist, not T x B
    assert harness.cpu_floor_estimate(lstm, rate, tokens=32)["fwd_s"] == pytest.approx(f["fwd_s"] / 2)
    # GRU: 3 gates; a second bidirectional layer reads both directions' outputs (I = 2H)
    bi = C.by_name("lstm2-bidir-h64-i32-b4-t16-packed-fp32")
    tokens = 40
    want = sum(2 * 2 * tokens * 4 * 64 * (i + 64) for i in (32, 128)) / rate
    assert harness.cpu_floor_estimate(bi, rate, tokens=tokens)["fwd_s"] == pytest.approx(want)
    gru = C.make("GRU", 64, 2, 8, threads=1)
    assert harness.cpu_floor_estimate(gru, rate)["fwd_s"] == pytest.approx(2 * 8 * 2 * 3 * 64 * 128 / rate)
    cell = C.by_name("lstmcell-h128-b4-t8-fp32")
    assert harness.cpu_floor_estimate(cell, rate)["fwd_s"] == pytest.approx(8 * 2 * 4 * G * (cell.I + 128) / rate)


def test_cpu_gemm_rate_is_measured_per_dtype_and_threads(monkeypatch):
    monkeypatch.setattr(harness, "_cpu_gemm_rates", {})
    monkeypatch.setattr(harness, "CPU_GEMM_SHAPES", ((64, 32, 48),))
    with harness.cpu_threads(1):
        r32 = harness.cpu_gemm_rate(torch.float32)
        assert r32 > 0 and harness.cpu_gemm_rate(torch.float32) == r32  # cached
        assert harness.cpu_gemm_rate(torch.bfloat16) > 0
        assert harness.cpu_gemm_rate(torch.float64) > 0
    assert set(harness._cpu_gemm_rates) == {(torch.float32, 1), (torch.bfloat16, 1), (torch.float64, 1)}


def test_cpu_rows_report_the_floor_and_the_ceiling_over_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "_cpu_gemm_rates", {})
    monkeypatch.setattr(harness, "CPU_GEMM_SHAPES", ((64, 32, 48),))
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["--suite", "tiny", "--filter", "gru-*", "--backends", "torch", "reference", *FAST,
               "--threads", "1", "--json", str(out), "--ratios", str(md)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    tr = [r for r in rows if r["backend"] == "torch"][0]
    ref = [r for r in rows if r["backend"] == "reference"][0]
    rate = ref["cpu_gemm_gflops"] * 1e9
    cfg = C.by_name(ref["config"])
    assert ref["floor_ms"] == pytest.approx(harness.cpu_floor_estimate(cfg, rate, ref["tokens"])["fwd_s"] * 1e3)
    assert ref["fwd_over_floor"] == pytest.approx(ref["fwd_ms"] / ref["floor_ms"])
    assert ref["fwd_ceiling_vs_torch"] == pytest.approx(tr["fwd_ms"] / ref["floor_ms"])
    assert ref["ceiling_vs_torch"] == pytest.approx(tr["fwdbwd_ms"] / ref["floor_fwdbwd_ms"])
    text = md.read_text()
    assert "max x fwd | max x fwd+bwd |" in text and "GEMM rate of torch.mm measured before each config" in text
    assert f"| {ref['fwd_ceiling_vs_torch']:.2f} | {ref['ceiling_vs_torch']:.2f} |" in text


def test_ceiling_columns_only_for_cpu_rows():
    """GPU rows have their own floor model: no "max x" columns or CPU legend for them."""
    cfg = C.make("GRU", 64, 4, 16, threads=1)

    def rows(cpu: bool):
        out = []
        for backend, fwd in (("torch", 2.0), ("cuda", 1.0)):
            r = harness.empty_row(cfg, backend, "dev")
            r.update(fwd_ms=fwd, fwdbwd_ms=2 * fwd, fwd_ms_runs=[fwd], fwdbwd_ms_runs=[2 * fwd], max_rel_err=1e-7,
                     tol=1e-5, threads=1, floor_ms=0.5, floor_fwdbwd_ms=1.5, cpu_gemm_gflops=90.0 if cpu else None)
            out.append(r)
        harness.finish_ratios(out)
        return out

    gpu = rows(cpu=False)
    assert gpu[1]["fwd_ceiling_vs_torch"] is None and gpu[1]["ceiling_vs_torch"] is None
    text = report.ratio_markdown({"device": "dev"}, gpu)
    assert "max x" not in text and "GEMM rate" not in text
    assert text.splitlines()[-1].count("|") == 12  # 11 columns
    cpu = rows(cpu=True)
    assert cpu[1]["fwd_ceiling_vs_torch"] == pytest.approx(4.0) and cpu[1]["ceiling_vs_torch"] == pytest.approx(4 / 1.5)
    text = report.ratio_markdown({"device": "dev"}, cpu)
    assert "fp32 90 on 1 thread" in text and text.splitlines()[-1].count("|") == 14  # 13 columns
    cpu[1]["error"] = "RuntimeError: boom"
    err_line = report.ratio_markdown({"device": "dev"}, cpu).splitlines()[-1]
    assert err_line.count("|") == 14 and "boom" in err_line
