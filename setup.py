"""Build of fusedrnn: the Python package (python/fusedrnn) and the compiled extension fusedrnn._C.

    pip install --no-build-isolation .          # needs torch installed first (not a build requirement)
    pip install --no-build-isolation -e .       # development install
    python setup.py build_ext --inplace         # _C next to the sources (python/fusedrnn/_C*.so)

What gets built:
    torch with CUDA + nvcc found  -> CUDAExtension: csrc/ops.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cu,
                                     csrc/cuda/emulation/*.cpp
    torch without CUDA / no nvcc  -> CppExtension:  csrc/ops.cpp, csrc/cpu/*.cpp,
                                     csrc/cuda/emulation/*.cpp (no real CUDA kernels)
    Both builds hold the CUDA emulation (issue 9): the csrc/cuda kernels compiled as host C++ in
    their own namespace, run on CPU tensors by the `cuda` backend when FUSEDRNN_CUDA_EMULATION=1.
    FUSEDRNN_SKIP_BUILD=1         -> nothing compiled (pure Python + Triton install)

Environment:
    FUSEDRNN_SKIP_BUILD=1     skip the extension
    FUSEDRNN_FORCE_CPU=1      build the CPU-only extension even when CUDA is available
    FUSEDRNN_CUDA_ARCHS       ";"-separated compute capabilities, default "80;90a"; SASS for each,
                              plus PTX for the newest (without its a/f suffix, so newer GPUs can JIT)
    CUDA_HOME / CUDA_PATH     CUDA toolkit; else /usr/local/cuda, else found from the nvcc on PATH
    MAX_JOBS                  parallel compile jobs; default from free memory and CPU count
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;90a"


def _log(msg: str) -> None:
    print(f"fusedrnn setup: {msg}", file=sys.stderr)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------- CUDA toolkit
def _nvcc_home_from_path():
    """CUDA home of the nvcc on PATH, following symlinks and wrapper scripts.

    A wrapper script (like /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc) defeats
    realpath, so ask nvcc itself: its --dryrun output names the directory it runs from (_HERE_).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
        return home
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    return os.path.dirname(os.path.normpath(m.group(1))) if m else None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            return value
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return _nvcc_home_from_path()


def nvcc_version(cuda_home: str):
    """(major, minor) of nvcc in cuda_home, or None."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_arch_flags(archs: str):
    """-gencode flags: SASS for every arch, PTX for the newest one (suffix a/f stripped)."""
    items = [a.strip().lower().replace("sm_", "").replace(".", "") for a in re.split(r"[;, ]+", archs) if a.strip()]
    if not items:
        raise RuntimeError("fusedrnn: FUSEDRNN_CUDA_ARCHS is empty")
    for a in items:
        if not re.fullmatch(r"\d+[af]?", a):
            raise RuntimeError(f"fusedrnn: bad entry {a!r} in FUSEDRNN_CUDA_ARCHS={archs!r} (expected e.g. 80;90a)")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in items]
    newest = max(items, key=lambda a: int(re.match(r"\d+", a).group()))
    ptx = re.match(r"\d+", newest).group()
    flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return items, flags


def default_max_jobs() -> int:
    """Compile jobs that fit: nvcc on these kernels peaks around 2 GB per job."""
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            meminfo = dict(line.split(":", 1) for line in f)
        avail_gb = int(meminfo["MemAvailable"].split()[0]) / 2**20
        by_mem = max(1, int(avail_gb // 2))
    except (OSError, KeyError, ValueError):
        by_mem = cpus
    return max(1, min(cpus, by_mem))


# --------------------------------------------------------------------------------- extension
def _sources(pattern: str):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def build_extension():
    """(ext_modules, cmdclass) for the configuration described in the module docstring."""
    if _env_flag("FUSEDRNN_SKIP_BUILD"):
        _log("FUSEDRNN_SKIP_BUILD=1: no compiled extension (pure Python/Triton install)")
        return [], {}

    # torch.utils.cpp_extension fixes its CUDA_HOME at import: set ours first (its own guess is
    # the parent of the nvcc on PATH, wrong when that nvcc is a wrapper script).
    cuda_home = None if _env_flag("FUSEDRNN_FORCE_CPU") else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise RuntimeError(
            "fusedrnn: building the extension needs torch installed first; use "
            "`pip install --no-build-isolation .` (torch is not a build-isolation requirement), "
            "or FUSEDRNN_SKIP_BUILD=1 for a pure Python install"
        ) from e

    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(default_max_jobs())
    _log(f"MAX_JOBS={os.environ['MAX_JOBS']}")

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # The CUDA emulation (csrc/cuda/emulation/kernels_*.cpp compile csrc/cuda/*.cu as host C++)
    # is part of every build: CI runs the CUDA kernels through it on CPU.
    cpp_sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp") + _sources("csrc/cuda/emulation/*.cpp")
    cu_sources = _sources("csrc/cuda/*.cu")
    # -fno-trapping-math lets the compiler if-convert lane loops into vector selects (results are
    # unchanged: it only drops FP-exception side effects).  -fopenmp: the CPU recurrences run one
    # OpenMP team per call (csrc/cpu/parallel.cpp); at run time libgomp resolves to the copy torch
    # already loaded, so torch.set_num_threads and torch's thread pool are shared.
    # -Wno-unknown-pragmas: ATen's vector headers carry clang/nvcc loop pragmas GCC ignores, and the
    # emulation compiles the CUDA source's `#pragma unroll` as host C++.
    cxx_flags = ["-O3", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas", "-fno-trapping-math", "-fopenmp"]
    link_flags = ["-fopenmp"]

    with_cuda = (
        torch.version.cuda is not None
        and cuda_home is not None
        and cpp_extension.CUDA_HOME is not None
        and not _env_flag("FUSEDRNN_FORCE_CPU")
    )
    if torch.version.cuda is not None and not with_cuda and not _env_flag("FUSEDRNN_FORCE_CPU"):
        _log("torch has CUDA but no CUDA toolkit (nvcc) was found: building the CPU-only extension")
    if with_cuda and not cu_sources:
        _log("no csrc/cuda/*.cu sources: building the CPU-only extension")
        with_cuda = False

    if not with_cuda:
        ext = cpp_extension.CppExtension(
            "fusedrnn._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
        _log(f"CPU-only extension from {len(cpp_sources)} sources")
        return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

    version = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if version is None:
        raise RuntimeError(f"fusedrnn: cannot run {cuda_home}/bin/nvcc --version (CUDA_HOME={cuda_home})")
    if version[0] != torch_major:
        raise RuntimeError(
            f"fusedrnn: nvcc in {cuda_home} is CUDA {version[0]}.{version[1]} but torch {torch.__version__} "
            f"was built with CUDA {torch.version.cuda}; the major versions must match. Point CUDA_HOME at a "
            f"CUDA {torch_major}.x toolkit, install a torch built for CUDA {version[0]}, "
            "or set FUSEDRNN_FORCE_CPU=1 / FUSEDRNN_SKIP_BUILD=1."
        )
    archs = os.environ.get("FUSEDRNN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    arch_items, arch_flags = cuda_arch_flags(archs)
    archs_macro = ";".join(arch_items)
    # The arch list reaches build_info() as a bare token (80_90a): no quotes or ';' to survive
    # the shell lines of the ninja file.
    defines = ["-DFUSEDRNN_WITH_CUDA", "-DFUSEDRNN_CUDA_ARCHS=" + "_".join(arch_items)]
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT162_OPERATORS__",
        "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    ] + arch_flags + defines
    ext = cpp_extension.CUDAExtension(
        "fusedrnn._C",
        cpp_sources + cu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
    _log(
        f"CUDA extension: CUDA_HOME={cuda_home}, nvcc {version[0]}.{version[1]}, archs {archs_macro} "
        f"(+PTX), {len(cu_sources)} .cu files"
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = build_extension()

setup(
    packages=find_packages(where="python"),
    package_dir={"": "python"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
