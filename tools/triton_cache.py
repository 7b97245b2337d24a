#!/usr/bin/env python
"""A warm Triton cache for the GPU machine, compiled here without a GPU (issue 8, "the GPU window").

Triton looks a compiled kernel up under ``TRITON_CACHE_DIR/<sha256 of key>`` where the key is
(triton 3.6 ``compiler/compiler.py`` ``compile`` and ``runtime/cache.py`` ``get_cache_key``):
``triton_key()`` (a hash of the installed triton's frontend, compiler, backends, language files and
``libtriton.so``), ``ASTSource.hash()`` (the kernel's and its callees' source and line numbers,
global constexprs, the JIT's specialisation: signature, ``tt.divisibility`` attributes,
constexprs), ``backend.hash()`` (``ptxas --version`` of the bundled ptxas and the target arch),
``options.hash()`` (num_warps, num_stages, launch_cooperative_grid, debug, ...) and the set
cache-invalidating environment variables.  None of that needs the GPU itself: only the JIT's
idea of the current target and of the arguments' dtypes and 16-byte alignment.

So ``build`` runs the real launch path of the ``triton`` backend (modules -> ops -> launchers ->
``JITFunction.run``) on CPU tensors of the same shapes and dtypes, with triton's active driver
replaced by one that answers "CUDA sm_90" (``GPUTarget("cuda", 90, 32)``) and launches nothing;
the JIT then computes its own keys and compiles into ``OUTDIR`` exactly as it would on an
H100/H200 with the same triton.  The compiled-kernel resource check before the first launch
(``_common.checked_variant``) reads registers and spills that the fake driver takes from the
cubin (``cuobjdump --dump-resource-usage``, as ``tools/triton_aot.py``), so the variant the rule
settles on is the one the GPU settles on.  Kernel outputs are left unwritten (nothing runs).

    python tools/triton_cache.py build OUTDIR [--only standard|tests] [--filter TEXT] [--config NAME]
    python tools/triton_cache.py verify OUTDIR [--full-length]   # a fresh process repeats the launches: 0 misses?
    python tools/triton_cache.py check OUTDIR [--capability 90]   # manifest matches here?

``build`` writes ``OUTDIR/manifest.json``: triton version, a hash of ``triton_key()``, the
bundled ptxas version, the target, the cache-invalidating variables and the hash of the kernel
sources (``python/fusedrnn/backends/triton/*.py``).  ``check`` compares it with this machine
and, when it matches, rewrites the absolute paths triton stores in each entry's
``__grp__*.json`` (``FileCacheManager.put_group``; ``get_group`` drops paths that do not exist,
which would make every entry a miss once the folder moved) to the folder's current place.
Exit status of ``check``: 0 usable, 1 no cache, 2 stale (mismatch printed).

Entries are content-addressed, so a stale entry is never used wrongly; it is only never hit.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_SOURCES = "python/fusedrnn/backends/triton/*.py"
CAPABILITY = 90  # H100 / H200: the GPU machines the project is measured on
# what the triton driver of an H100/H200 reports (CU_DEVICE_ATTRIBUTE_*): 227 KiB opt-in shared
# memory per block, 132 SMs; the selection rule reads the same numbers (_common.AOT_TARGETS[90])
SM90_PROPERTIES = dict(max_shared_mem=227 * 1024, max_num_regs=65536, multiprocessor_count=132,
                       warpSize=32, sm_clock_rate=1980000, mem_clock_rate=3201000, mem_bus_width=5120)


# ----------------------------------------------------------------------------------- manifest
def kernel_source_hash(root: str = ROOT) -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, KERNEL_SOURCES))):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def environment(capability: int = CAPABILITY) -> dict:
    """Everything outside the kernel sources that enters triton's cache key, on this machine."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    return dict(
        triton=triton.__version__,
        triton_key=hashlib.sha256(triton_key().encode()).hexdigest(),
        ptxas=get_ptxas_version(capability).strip().splitlines()[-1],
        target=f"cuda:{capability}:32",
        env=dict(sorted(get_cache_invalidating_env_vars().items())),
        kernel_sources=kernel_source_hash(),
    )


def mismatches(manifest: dict, here: dict) -> list:
    return [f"{k}: cache {manifest.get(k)!r} != here {here[k]!r}" for k in here if manifest.get(k) != here[k]]


def relocate(outdir: str) -> int:
    """Point every ``__grp__*.json`` of the cache at the folder's current absolute place."""
    outdir = os.path.abspath(outdir)
    n = 0
    for grp in glob.glob(os.path.join(outdir, "*", "__grp__*.json")):
        with open(grp) as f:
            data = json.load(f)
        here = os.path.dirname(grp)
        data["child_paths"] = {c: os.path.join(here, os.path.basename(p)) for c, p in data["child_paths"].items()}
        with open(grp, "w") as f:
            json.dump(data, f)
        n += 1
    return n


def drop_sources(outdir: str) -> None:
    """Remove the ``.source`` copies (TRITON_STORE_BINARY_ONLY still stores them; loading a
    kernel needs only its ``.json`` metadata and ``.cubin``) and their group references."""
    for grp in glob.glob(os.path.join(outdir, "*", "__grp__*.json")):
        with open(grp) as f:
            data = json.load(f)
        keep = {}
        for c, p in data["child_paths"].items():
            if c.endswith(".source"):
                if os.path.exists(p):
                    os.remove(p)
            else:
                keep[c] = p
        with open(grp, "w") as f:
            json.dump(dict(data, child_paths=keep), f)


def count_entries(outdir: str) -> int:
    return len(glob.glob(os.path.join(outdir, "*", "__grp__*.json")))


# --------------------------------------------------------------------------- the sm_90 stand-in
class _NoLaunch:
    """Launcher of the fake driver: a launch does nothing (there is no GPU)."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        return None


class _Sm90Utils:
    def get_device_properties(self, device):
        return dict(SM90_PROPERTIES)

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads) as the CUDA driver reports them;
        # spills: local memory per thread / 4 (what _common.compiled_resources multiplies back)
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        from triton_aot import _resource_usage  # noqa: PLC0415

        r = _resource_usage(kernel)
        return None, None, r["regs"], r["local"] // 4, 1024


class Sm90Driver:
    """Triton's active driver as the JIT sees it on device 0 of an H100/H200, launching nothing."""

    def __init__(self):
        self.utils = _Sm90Utils()
        self.launcher_cls = _NoLaunch

    def is_active(self):
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", CAPABILITY, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def act_as_sm90():
    """Make triton compile for sm_90 and fusedrnn take the GPU code path on CPU tensors."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("triton_cache: TRITON_INTERPRET=1 is set; the cache needs compiled kernels")
    from triton.runtime.driver import driver

    driver.set_active(Sm90Driver())
    from fusedrnn.backends.triton import _common as C

    # CPU tensors stand for CUDA ones: only the device check changes; everything that enters a
    # kernel (interpret_mode() False, TRAP_ON_TIMEOUT, MAX_SPINS, the sm_90 DeviceInfo for CPU
    # devices) is what it is on the GPU
    C.unavailable_reason = lambda: None
    C.device_unsupported_reason = lambda device_type: None


# ------------------------------------------------------------------------------------ launches
def configs(only=None, name_filter=None, names=(), full_length=False) -> list:
    """(name, BenchConfig) of the launches to compile: the standard benchmark suite, and a
    representative subset of the shapes of the ``@gpu`` tests (hostile H, reverse, packed,
    projection, every dtype).  T is cut to a few steps: the kernels are not specialised on T
    (``do_not_specialize``), while B, H, P, dtype and the structure select the variant."""
    from fusedrnn.bench import configs as BC

    out = [("config/" + n, BC.by_name(n)) for n in names]
    if names:
        only = "none"
    if only in (None, "standard"):
        for c in BC.suite("standard", "cuda"):
            out.append(("standard/" + c.name, c))
    if only in (None, "tests"):
        for mode in ("LSTM", "GRU"):
            for dtype in ("fp32", "bf16", "fp16", "fp64"):
                for H in (3, 37, 129):
                    out.append((f"tests/{mode}-h{H}-{dtype}",
                                BC.make(mode, H, 3, 6, dtype, I=5, lengths=(2, 6), bidirectional=True)))
        out.append(("tests/gru-h768-b20-bf16", BC.make("GRU", 768, 20, 8, "bf16", lengths=(3, 8))))
    out = [(n, c if full_length else _short(c)) for n, c in out if not name_filter or name_filter in n]
    return out


def _short(c):
    if c.lengths is not None:
        lo, hi = c.lengths
        return dataclasses.replace(c, T=min(hi, 4), lengths=(min(lo, 2), min(hi, 4)))
    return dataclasses.replace(c, T=min(c.T, 4))


def run_launches(items, log=print) -> None:
    """Forward (inference: save=False kernels), forward + backward (training) of each config
    through the ``triton`` backend, as the benchmark rows and tests call it."""
    from fusedrnn.bench import harness as BH

    for name, cfg in items:
        t0 = time.time()
        try:
            case = BH.Case(cfg, "triton", "cpu", n_sets=1)
            case.forward()
            case.forward_backward()
        except ValueError as e:  # beyond the backend's limits on sm_90: the GPU row is skipped too
            if "does not support" not in str(e):
                raise
            log(f"  {name}: not supported by the triton backend ({e})")
            continue
        log(f"  {name}: {time.time() - t0:.1f}s")
        del case


class _Listener:
    def __init__(self):
        self.hits, self.misses = 0, []

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit):
        if cache_hit:
            self.hits += 1
        else:
            self.misses.append(metadata.get("name", "?"))


def _start(outdir: str):
    os.environ["TRITON_CACHE_DIR"] = os.path.abspath(outdir)
    os.environ.pop("TRITON_INTERPRET", None)
    # cubin + metadata only (no IR, PTX, source): a seventh of the size to carry; not part of the key
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from triton import knobs

    act_as_sm90()
    listener = _Listener()
    knobs.compilation.listener = listener
    return listener


def cmd_build(args) -> int:
    os.makedirs(args.outdir, exist_ok=True)
    listener = _start(args.outdir)
    items = configs(args.only, args.filter, args.config or ())
    t0 = time.time()
    print(f"triton_cache: compiling the launches of {len(items)} configs for sm_{CAPABILITY} into {args.outdir}")
    run_launches(items)
    drop_sources(args.outdir)
    manifest = dict(environment(), entries=count_entries(args.outdir), configs=[n for n, _ in items],
                    built_in_s=round(time.time() - t0, 1))
    with open(os.path.join(args.outdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"triton_cache: {len(listener.misses)} kernels compiled, {listener.hits} already cached, "
          f"{manifest['entries']} entries, {manifest['built_in_s']}s")
    return 0


def cmd_verify(args) -> int:
    """Repeat the build's launches in this (fresh) process: every kernel must be a cache hit."""
    listener = _start(args.outdir)
    with open(os.path.join(args.outdir, "manifest.json")) as f:
        names = set(json.load(f)["configs"])
    extra = [n.split("/", 1)[1] for n in names if n.startswith("config/")]
    items = [(n, c) for n, c in configs(names=extra, full_length=args.full_length) + configs(full_length=args.full_length)
             if n in names]
    run_launches(items, log=lambda *a: None)
    print(f"triton_cache verify: {listener.hits} hits, {len(listener.misses)} misses {listener.misses[:8]}")
    return 0 if listener.hits and not listener.misses else 1


def cmd_check(args) -> int:
    path = os.path.join(args.outdir, "manifest.json")
    if not os.path.exists(path):
        print(f"triton cache: none carried ({path} missing)")
        return 1
    with open(path) as f:
        manifest = json.load(f)
    bad = mismatches(manifest, environment(args.capability))
    if bad:
        print("triton cache: stale, not used: " + "; ".join(bad))
        return 2
    n = relocate(args.outdir)
    print(f"triton cache: {n} pre-compiled kernels match this triton, ptxas and kernel sources")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("outdir")
    b.add_argument("--only", choices=("standard", "tests"))
    b.add_argument("--filter", help="only configs whose name contains this text")
    b.add_argument("--config", action="append", help="a fusedrnn.bench config by name instead (repeatable)")
    v = sub.add_parser("verify")
    v.add_argument("outdir")
    v.add_argument("--full-length", action="store_true",
                   help="the configs' real sequence lengths (build cuts T: the kernels do not specialise on it)")
    c = sub.add_parser("check")
    c.add_argument("outdir")
    c.add_argument("--capability", type=int, default=CAPABILITY)
    args = p.parse_args(argv)
    return dict(build=cmd_build, verify=cmd_verify, check=cmd_check)[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
