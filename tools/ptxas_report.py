#!/usr/bin/env python3
"""Resource usage of every CUDA kernel in the built extension (registers, stack, spills, shared memory).

    python tools/ptxas_report.py                 # the fusedrnn._C found on sys.path / python/
    python tools/ptxas_report.py path/to/_C.so   # a given shared object (or cubin)
    python tools/ptxas_report.py --arch sm_90a   # one architecture only

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", help="shared object or cubin (default: the built fusedrnn._C)")
    ap.add_argument("--arch", help="only this architecture, e.g. sm_90a")
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
