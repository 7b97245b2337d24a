"""The GPU-machine scripts cannot rot on CPU-only CI: a dry run of scripts/gpu_check.sh (every
device-only step replaced by a listing or a test collection) must pass every step."""

import os
import re
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
