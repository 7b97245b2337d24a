#!/usr/bin/env python
"""Compile every Triton kernel variant of the ``triton`` backend ahead of time, without a GPU.

For each target (sm_80: A100, sm_90: H100) it collects the variant specs of each kernel module
(``aot_variants(capability)`` or ``aot_variants()`` of ``fusedrnn.backends.triton.lstm`` and, when present, ``.gru``:
a list of ``_common.aot_spec`` dicts), compiles them with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cap, 32), ...)``,
and prints registers, spills (``ptxas -v`` on the generated PTX), stack and shared memory per
variant.  Exits non-zero when a variant fails to compile or needs more shared memory than the
target allows (sm_80: 163 KiB opt-in, sm_90: 227 KiB).

    PYTHONPATH=python python tools/triton_aot.py [--arch 80 90] [--jobs 2] [--filter bf16] [--no-ptxas]

A new kernel module registers its variants by exposing ``aot_variants(capability)`` and being
listed in ``MODULES`` below.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

MODULES = ("fusedrnn.backends.triton.lstm", "fusedrnn.backends.triton.gru")
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_SPECS: dict = {}


def _collect(cap: int) -> list:
    specs = []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # module not written yet
            raise
        fn = getattr(mod, "aot_variants", None)
        if fn is None:
            continue
        # aot_variants(capability) (may depend on the target's SM count) or aot_variants()
        takes_cap = len(inspect.signature(fn).parameters) > 0
        specs.extend(fn(cap) if takes_cap else fn())
    return specs


def _ptxas() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.exists(bundled):
        return bundled
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "ptxas")):
        return os.path.join(cuda_home, "bin", "ptxas")
    return shutil.which("ptxas") or "ptxas"


def _ptxas_usage(ptx: str) -> dict:
    """Registers / spills / stack from ``ptxas -v`` on the PTX Triton generated."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True,
        )
    text = out.stdout + out.stderr
    get = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return dict(
        regs=get(r"Used (\d+) registers"),
        spill_st=get(r"(\d+) bytes spill stores"),
        spill_ld=get(r"(\d+) bytes spill loads"),
        stack=get(r"(\d+) bytes stack frame"),
    )


def _compile_one(args):
    cap, index, use_ptxas = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _SPECS[cap][index]
    t0 = time.time()
    try:
        src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"])
        k = triton.compile(
            src, target=GPUTarget("cuda", cap, 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
    except Exception as e:  # report, do not stop the others
        return dict(name=spec["name"], error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    res = dict(name=spec["name"], warps=spec["num_warps"], shared=int(k.metadata.shared), secs=time.time() - t0)
    if use_ptxas:
        res.update(_ptxas_usage(k.asm["ptx"]))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--filter", default="", help="only variants whose name contains this")
    ap.add_argument("--no-ptxas", action="store_true", help="skip ptxas -v (no register/spill columns)")
    args = ap.parse_args(argv)

    failures = 0
    for cap in args.arch:
        _SPECS[cap] = [s for s in _collect(cap) if args.filter in s["name"]]
    # fork: workers inherit _SPECS (JIT functions are not picklable)
    ctx = mp.get_context("fork")
    for cap in args.arch:
        limit = SMEM_LIMIT[cap]
        jobs = [(cap, i, not args.no_ptxas) for i in range(len(_SPECS[cap]))]
        print(f"\n== sm_{cap}: {len(jobs)} variants, shared-memory limit {limit // 1024} KiB ==")
        print(f"{'variant':<72} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'stack':>6} {'smem KiB':>9}  status")
        t0 = time.time()
        with ctx.Pool(max(1, args.jobs)) as pool:
            for r in pool.imap(_compile_one, jobs):
                if "error" in r:
                    failures += 1
                    print(f"{r['name']:<72} FAILED to compile: {r['error']}")
                    continue
                over = r["shared"] > limit
                failures += over
                spill = f"{r.get('spill_st', '-')}/{r.get('spill_ld', '-')}"
                status = "SMEM OVER LIMIT" if over else ("ok (spills)" if r.get("spill_st") else "ok")
                print(
                    f"{r['name']:<72} {r['warps']:>5} {r.get('regs', '-'):>5} {spill:>12} "
                    f"{r.get('stack', '-'):>6} {r['shared'] / 1024:>9.1f}  {status}"
                )
        print(f"-- sm_{cap}: {time.time() - t0:.0f} s")
    print(f"\n{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
