"""The GPU-machine scripts cannot rot on CPU-only CI: a dry run of scripts/gpu_check.sh (every
device-only step replaced by a listing or a test collection) must pass every step, and the
pre-compiled Triton cache it carries (tools/triton_cache.py) must be hit by the JIT's own keys."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.mark.no_poison
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", GPU_CHECK_BUDGET_S="400")
    env.pop("TRITON_INTERPRET", None)  # as on the GPU machine; the dry run starts no kernel
    out = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "gc")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "gc" / "summary.txt").read_text()
    steps = dict(re.findall(r"^(\w+)\s+(PASS|FAIL|TIMEOUT|SKIP)", summary, re.M))
    assert set(steps) == {"info", "build", "import", "extra", "pytest", "smoke", "memcheck", "racecheck", "bench"}, summary
    bad = {k: v for k, v in steps.items() if v != "PASS"}
    assert not bad, f"{bad}\n{summary}\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}"
    assert out.returncode == 0
    # the collection found the GPU tests (they are only skipped, not missing)
    assert re.search(r"\d+ tests? collected|collected \d+", (tmp_path / "gc" / "pytest.log").read_text())
    # the Triton cache it chose (carried .triton_cache/ or a fresh one), and how many compiles
    assert re.search(r"^triton cache: (carried|fresh) \(\d+ kernels carried\), 0 compiled", summary, re.M), summary


def _triton_cache(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    env.pop("TRITON_INTERPRET", None)  # compiled kernels, as on the GPU machine
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "triton_cache.py"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_triton_cache_prebuilt_keys_hit(tmp_path):
    """The JIT, believing it runs on sm_90, computes its cache keys for a real launch path
    (module -> op -> launcher -> JITFunction.run) and compiles into the folder; a fresh process
    repeating the launches from a moved copy finds every kernel under the key it computes
    (triton's compilation listener: all hits, no compile) once ``check`` has pointed the entries
    at the new place, and none before (triton stores absolute paths in each entry)."""
    pytest.importorskip("triton")
    built = tmp_path / "built"
    r = _triton_cache("build", str(built), "--config", "gru-h16-b2-t4-fp32")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"3 kernels compiled, 0 already cached, 3 entries", r.stdout), r.stdout
    moved, unrelocated = tmp_path / "moved", tmp_path / "unrelocated"
    shutil.copytree(built, moved)
    shutil.copytree(built, unrelocated)
    shutil.rmtree(built)
    r = _triton_cache("verify", str(unrelocated))
    assert r.returncode == 1 and "0 hits, 3 misses" in r.stdout, r.stdout + r.stderr
    r = _triton_cache("check", str(moved))
    assert r.returncode == 0 and "3 pre-compiled kernels match" in r.stdout, r.stdout + r.stderr
    r = _triton_cache("verify", str(moved))
    assert r.returncode == 0 and "3 hits, 0 misses" in r.stdout, r.stdout + r.stderr


def test_triton_cache_check_refuses_other_sources(tmp_path):
    """A manifest from other kernel sources or another triton is stale: ``check`` says which."""
    pytest.importorskip("triton")
    d = tmp_path / "c"
    d.mkdir()
    assert _triton_cache("check", str(d)).returncode == 1  # no manifest: none carried
    (d / "manifest.json").write_text('{"triton": "0.0", "kernel_sources": "x"}')
    r = _triton_cache("check", str(d))
    assert r.returncode == 2 and "stale" in r.stdout and "kernel_sources" in r.stdout, r.stdout + r.stderr
