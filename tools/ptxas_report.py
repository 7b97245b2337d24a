#!/usr/bin/env python3
"""Resource usage of every CUDA kernel in the built extension (registers, stack, spills, shared memory).

    python tools/ptxas_report.py                 # the fusedrnn._C found on sys.path / python/
    python tools/ptxas_report.py path/to/_C.so   # a given shared object (or cubin)
    python tools/ptxas_report.py --arch sm_90a   # one architecture only
    python tools/ptxas_report.py NEW.so --against OLD.so   # per kernel: resource and SASS changes

``--against`` compares two builds kernel by kernel (registers, stack, local and static shared
memory, and the SASS instruction stream from ``cuobjdump -sass`` with addresses stripped), prints
the opcode-count deltas of every kernel whose SASS differs, and exits 1 when anything differs: the
check that a source refactoring (e.g. csrc/cuda/device_ops.cuh) left the GPU code unchanged.

Reads the embedded cubins with ``cuobjdump --dump-resource-usage`` (CUDA_HOME/bin, else PATH,
else the copy bundled with triton).
LOCAL > 0 means local memory: register spills or local arrays (``ptxas -v`` at build time splits
the two).  Exits 0 with a message when the extension was built without CUDA.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_extension() -> str | None:
    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        spec = importlib.util.find_spec("fusedrnn._C")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        return spec.origin
    hits = glob.glob(os.path.join(ROOT, "python", "fusedrnn", "_C*.so")) + glob.glob(
        os.path.join(ROOT, "build", "**", "_C*.so"), recursive=True)
    return hits[0] if hits else None


def find_tool(name: str) -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    if os.path.isfile(os.path.join("/usr/local/cuda/bin", name)):
        return os.path.join("/usr/local/cuda/bin", name)
    found = shutil.which(name)
    if found:
        return found
    # triton ships the CUDA binary utilities (cuobjdump, nvdisasm, ptxas) with its NVIDIA backend
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        cand = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name)
        if os.path.isfile(cand):
            return cand
    return None


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse(text: str):
    """[(arch, mangled name, {REG: .., STACK: .., SHARED: .., LOCAL: .., ...})]."""
    rows, arch = [], "?"
    func = None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"arch\s*=\s*(\S+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"Function\s+(\S+?):?$", line)
        if m:
            func = m.group(1)
            continue
        if func and line.startswith("REG:"):
            fields = dict((k, int(v)) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            rows.append((arch, func, fields))
            func = None
    return rows


_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")


def sass_by_kernel(cuobjdump: str, path: str) -> dict:
    """{(arch, mangled name): [instruction text, ...]} from ``cuobjdump -sass``."""
    out = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    kernels, arch, current = {}, "?", None
    for line in out.splitlines():
        m = re.match(r"\s*code for (\S+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            current = kernels.setdefault((arch, m.group(1)), [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            current.append(re.sub(r"\s+", " ", m.group(1)))
    return kernels


def opcode_counts(instrs: list[str]) -> dict:
    counts: dict = {}
    for ins in instrs:
        op = ins.split()[0] if not ins.startswith("@") else ins.split()[1]
        counts[op] = counts.get(op, 0) + 1
    return counts


def compare(cuobjdump: str, new: str, old: str, arch: str | None) -> int:
    """Kernel-by-kernel comparison of two builds; 0 when resources and SASS are identical."""
    def resources(path):
        proc = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
        return {(a, n): f for a, n, f in parse(proc.stdout)}

    tables = [resources(new), resources(old), sass_by_kernel(cuobjdump, new), sass_by_kernel(cuobjdump, old)]
    # key by demangled name: the mangled name of an anonymous namespace hashes the source path
    names = demangle(sorted({k[1] for t in tables for k in t}))
    res_new, res_old, sass_new, sass_old = ({(a, names[n]): v for (a, n), v in t.items()} for t in tables)
    keys = sorted(set(res_new) | set(res_old) | set(sass_new) | set(sass_old))
    if arch:
        keys = [k for k in keys if k[0] == arch]
    fields = ("REG", "STACK", "LOCAL", "SHARED")
    same = differ = 0
    for key in keys:
        label = f"{key[0]:7} {key[1][:150]}"
        if key not in sass_new or key not in sass_old:
            print(f"ONLY IN {'NEW' if key in sass_new else 'OLD'}  {label}")
            differ += 1
            continue
        rn, ro = res_new.get(key, {}), res_old.get(key, {})
        res_delta = [f"{f} {ro.get(f, 0)}->{rn.get(f, 0)}" for f in fields if rn.get(f, 0) != ro.get(f, 0)]
        a, b = sass_new[key], sass_old[key]
        if a == b and not res_delta:
            same += 1
            continue
        differ += 1
        cn, co = opcode_counts(a), opcode_counts(b)
        ops = [f"{op} {co.get(op, 0)}->{cn.get(op, 0)}" for op in sorted(set(cn) | set(co))
               if cn.get(op, 0) != co.get(op, 0)]
        print(f"DIFFERS  {label}\n         {len(b)} -> {len(a)} instructions; "
              f"{', '.join(res_delta) or 'same resources'}; opcodes: {', '.join(ops) or 'same mix, other order'}")
    print(f"\n{same} kernel images identical (resources and SASS), {differ} differ")
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", help="shared object or cubin (default: the built fusedrnn._C)")
    ap.add_argument("--arch", help="only this architecture, e.g. sm_90a")
    ap.add_argument("--against", metavar="OLD", help="compare with another build (shared object or cubin)")
    args = ap.parse_args()

    path = args.path or find_extension()
    if path is None or not os.path.exists(path):
        print("ptxas_report: fusedrnn._C is not built (nothing to report); build it with "
              "`pip install --no-build-isolation .`")
        return 0
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        print(f"ptxas_report: cuobjdump not found (set CUDA_HOME); cannot inspect {path}")
        return 1
    if args.against:
        return compare(cuobjdump, path, args.against, args.arch)
    proc = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    rows = parse(proc.stdout)
    if not rows:
        if "does not contain device code" in text or proc.returncode == 0 or "no device code" in text.lower():
            print(f"ptxas_report: {os.path.basename(path)} contains no CUDA kernels (built without CUDA); nothing to report")
            return 0
        print(f"ptxas_report: cuobjdump failed on {path}:\n{text}")
        return 1
    if args.arch:
        rows = [r for r in rows if r[0] == args.arch]
    names = demangle(sorted({r[1] for r in rows}))
    print(f"{path}\n")
    print(f"{'arch':8} {'REG':>4} {'STACK':>6} {'LOCAL':>6} {'SHARED':>7} {'CONST0':>7}  kernel")
    spilling = 0
    for arch, name, f in sorted(rows, key=lambda r: (r[0], names[r[1]])):
        local = f.get("LOCAL", 0)
        spilling += local > 0
        flag = "  <- local memory (spills?)" if local else ""
        print(f"{arch:8} {f.get('REG', 0):4d} {f.get('STACK', 0):6d} {local:6d} {f.get('SHARED', 0):7d} "
              f"{f.get('CONSTANT[0]', 0):7d}  {names[name]}{flag}")
    print(f"\n{len(rows)} kernel images; {spilling} with local memory (LOCAL > 0: spills or local arrays)."
          " SHARED is static shared memory; dynamic shared memory is set at launch.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
