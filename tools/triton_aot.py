#!/usr/bin/env python
"""Compile every Triton kernel variant of the ``triton`` backend ahead of time, without a GPU.

For each target (sm_80: A100, sm_90: H100/H200) it collects the variant specs of each kernel
module (``aot_variants(capability)`` of ``fusedrnn.backends.triton.lstm`` and ``.gru``: every
variant the selection rule picks for the sizes of ``_common.aot_shapes``, batches up to the
widest chunk, projections, plus the cells), compiles them with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cap, 32))``
with the 16-byte pointer alignment the JIT specialises on (``tt.divisibility``: without it the
spill report is not the one the GPU sees), and prints registers, local memory (spills), stack
(``cuobjdump --dump-resource-usage`` on the cubin Triton built, with its own ptxas options) and
shared memory per variant, then the worst of each per kernel family.

Exits non-zero when a variant fails to compile, needs more shared memory than the target allows
(sm_80: 163 KiB opt-in, sm_90: 227 KiB) or than the selection rule's model of this triton version
(``_common.smem_bytes``: the rule must never pick a kernel the device cannot hold), does not fit
the SM with its programs per SM (registers x threads), or spills (local memory) more
than ``_common.SPILL_BUDGET_BYTES`` per thread.  Exception: an inference kernel (``*_fwd_nosave``,
``save=False``) none of whose alternatives fits is reported as FALLBACK, not a failure, since the
launcher then runs the training kernel of the same shape (``_common.launch_forward``), itself checked
in its own group.

    PYTHONPATH=python python tools/triton_aot.py [--arch 80 90] [--jobs 2] [--filter bf16] [--no-regs]

Run it under each triton the project supports (3.6 on the GPU machines, 3.8 in CI).  A new
kernel module registers its variants by exposing ``aot_variants(capability)`` and being listed
in ``MODULES`` below.
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

_SPECS: dict = {}


def _collect(cap: int) -> list:
    specs = []
    for name in MODULES:
        mod = importlib.import_module(name)
        fn = getattr(mod, "aot_variants", None)
        if fn is None:
            continue
        takes_cap = len(inspect.signature(fn).parameters) > 0
        specs.extend(fn(cap) if takes_cap else fn())
    return specs


def _cuobjdump() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(bundled):
        return bundled
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "cuobjdump")):
        return os.path.join(cuda_home, "bin", "cuobjdump")
    return shutil.which("cuobjdump") or "cuobjdump"


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills; what the driver reports as ``n_spills * 4``) of
    the cubin Triton built (its own ptxas options included), from ``cuobjdump --dump-resource-usage``."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True)
    text = out.stdout + out.stderr
    get = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    stack, local = get(r"STACK:(\d+)"), get(r"LOCAL:(\d+)")
    # spills live in the stack frame (what the driver counts as local memory per thread)
    return dict(regs=get(r"REG:(\d+)"), stack=stack, local=max(local, stack))


def loop_stats(cubin: bytes) -> dict:
    """Static counts of the kernel's time loop (the largest backward branch of its SASS): SASS
    instructions per iteration of one warp, CTA barriers, MMA, special-function and shared-memory
    instructions.  ``loop x warps`` (warp-instructions per step and program) is the static cost
    figure BENCHMARKS.md's "Triton design round 2" predictions use."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True).stdout
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    where = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, text) in enumerate(ins):
        m = re.search(r"BRA\s+(?:`\()?.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in where:
            lo = where[int(m.group(1), 16)]
            if best is None or i - lo > best[1] - best[0]:
                best = (lo, i)
    if best is None:
        return dict(loop=0)
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in ins[best[0]:best[1] + 1]]
    count = lambda *names: sum(op in names for op in ops)  # noqa: E731
    return dict(loop=len(ops), bar=count("BAR"), mma=count("HMMA", "DMMA", "IMMA"), mufu=count("MUFU"),
                smem=count("LDS", "LDSM", "STS"))


def _compile_spec(spec: dict, cap: int, use_cuobjdump: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    try:
        src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs"))
        k = triton.compile(
            src, target=GPUTarget("cuda", cap, 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
        )
    except Exception as e:  # report, do not stop the others
        return dict(name=spec["name"], error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    res = dict(name=spec["name"], warps=spec["num_warps"], shared=int(k.metadata.shared), secs=time.time() - t0)
    if use_cuobjdump:
        res.update(_resource_usage(k.asm["cubin"]))
        res.update(loop_stats(k.asm["cubin"]))
    return res


def _compile_one(args):
    """One plain spec, or a group of ranked alternatives: compile them in order and keep the first
    whose kernels fit the target (``_common.resources_reason``), as the runtime does."""
    from fusedrnn.backends.triton import _common as C

    cap, index, use_cuobjdump = args
    item = _SPECS[cap][index]
    if "alternatives" not in item:
        return index, None, [_compile_spec(item, cap, use_cuobjdump)], 0
    out = []
    for a, alt in enumerate(item["alternatives"]):
        out = [_compile_spec(spec, cap, use_cuobjdump) for spec in alt]
        if not use_cuobjdump or any("error" in r for r in out):
            return index, a, out, a
        reasons = [C.resources_reason(dict(shared=r["shared"], regs=r["regs"], spill_bytes=r["local"],
                                           num_warps=r["warps"]), spec["variant"], spec["info"])
                   for spec, r in zip(alt, out)]
        if all(x is None for x in reasons):
            return index, a, out, a
    return index, len(item["alternatives"]) - 1, out, len(item["alternatives"])  # none fits: fails below


def _family(name: str) -> str:
    return name.split()[0] + " " + name.split()[1]  # kernel + dtype


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--filter", default="", help="only variants whose name contains this")
    ap.add_argument("--no-regs", action="store_true", help="skip cuobjdump (no register/spill columns)")
    args = ap.parse_args(argv)

    import triton

    from fusedrnn.backends.triton import _common as C

    print(f"triton {triton.__version__}; shared-memory model of triton {'.'.join(map(str, C.TRITON_VERSION))}")
    failures = 0
    for cap in args.arch:
        _SPECS[cap] = [s for s in _collect(cap) if args.filter in s["name"]]
    ctx = mp.get_context("fork")  # workers inherit _SPECS (JIT functions are not picklable)
    for cap in args.arch:
        info = C.AOT_TARGETS[cap]
        jobs = [(cap, i, not args.no_regs) for i in range(len(_SPECS[cap]))]
        print(f"\n== sm_{cap}: {len(jobs)} kernels / selections, shared-memory limit {info.smem_optin // 1024} KiB ==")
        print(f"{'variant':<84} {'warps':>5} {'regs':>5} {'model':>5} {'local B':>8} {'stack':>6} "
              f"{'smem KiB':>9} {'model':>7} {'loop x warps':>12} {'BAR':>4}  status")
        worst: dict = {}
        fallbacks = 0
        t0 = time.time()
        with ctx.Pool(max(1, args.jobs)) as pool:
            for index, alt, results, rejected in pool.imap(_compile_one, jobs):
                item = _SPECS[cap][index]
                specs = [item] if alt is None else item["alternatives"][alt]
                # an inference kernel (save=False) that fits nowhere is not run: the launcher runs
                # the training kernel of the same shape instead (_common.launch_forward), which
                # its own group checks
                none_fits = alt is not None and rejected == len(item["alternatives"])
                fallback = none_fits and "_fwd_nosave " in item["name"]
                for spec, r in zip(specs, results):
                    if "error" in r:
                        failures += 1
                        print(f"{r['name']:<84} FAILED to compile: {r['error']}")
                        continue
                    problems = []
                    if r["shared"] > info.smem_optin:
                        problems.append("SMEM OVER LIMIT")
                    model_smem = spec.get("model_shared")
                    if model_smem is not None and r["shared"] > model_smem:
                        problems.append("SMEM OVER MODEL")
                    pps = spec.get("variant").progs_per_sm if spec.get("variant") else 1
                    if pps * (r["shared"] + C.SMEM_RESERVED) > info.smem_sm:
                        problems.append(f"SMEM x{pps} OVER SM")
                    if r.get("regs") and pps * r["regs"] * 32 * r["warps"] > info.regs_per_sm:
                        problems.append(f"REGS x{pps} OVER SM")
                    if r.get("local", 0) > C.SPILL_BUDGET_BYTES:
                        problems.append("SPILLS")
                    status = ", ".join(problems) or ("ok (small stack)" if r.get("local") else "ok")
                    if fallback and problems:
                        fallbacks += 1
                        status = f"FALLBACK to the training kernel ({status})"
                    else:
                        failures += bool(problems)
                    if rejected:
                        status += f" [{rejected} higher-ranked candidate(s) stepped down]"
                    print(
                        f"{r['name']:<84} {r['warps']:>5} {r.get('regs', '-'):>5} {spec.get('model_regs', '-'):>5} "
                        f"{r.get('local', '-'):>8} {r.get('stack', '-'):>6} {r['shared'] / 1024:>9.1f} "
                        f"{(model_smem or 0) / 1024:>7.1f} {r.get('loop', 0) * r['warps']:>12} {r.get('bar', 0):>4}  {status}"
                    )
                    fam = _family(r["name"])
                    w = worst.setdefault(fam, dict(regs=0, spill=0, stack=0, shared=0, n=0, stepped=0))
                    w["n"] += 1
                    w["stepped"] += bool(rejected)
                    w["regs"] = max(w["regs"], r.get("regs", 0))
                    w["spill"] = max(w["spill"], r.get("local", 0))
                    w["stack"] = max(w["stack"], r.get("stack", 0))
                    w["shared"] = max(w["shared"], r["shared"])
        print(f"-- sm_{cap}: {time.time() - t0:.0f} s; {fallbacks} inference selection(s) run the training kernel")
        print(f"\nworst per kernel family, sm_{cap}, triton {triton.__version__}:")
        print(f"{'family':<20} {'variants':>8} {'regs':>5} {'local B':>8} {'stack B':>8} {'smem KiB':>9} {'stepped down':>12}")
        for fam in sorted(worst):
            w = worst[fam]
            print(f"{fam:<20} {w['n']:>8} {w['regs']:>5} {w['spill']:>8} {w['stack']:>8} {w['shared'] / 1024:>9.1f} "
                  f"{w['stepped']:>12}")
    print(f"\n{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
