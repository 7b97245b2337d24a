"""The ``cuda`` backend: the persistent CUDA kernels of the compiled extension (csrc/cuda).

Same op contract as ``fusedrnn.backends.reference``.  fp32 recurrences may use TF32 exactly when
``torch.backends.cudnn.rnn.fp32_precision`` allows it (the flag that governs torch.nn.LSTM/GRU;
the legacy ``cudnn.allow_tf32`` on torch < 2.9): see :func:`fusedrnn.backends.rnn_tf32_enabled`.

Whether a shape fits on chip is decided before any work, for the forward and the backward pass,
by the planner of ``csrc/include/fusedrnn/cuda_plan.h`` (the same code the kernels launch with),
from a *device record*: the fields of ``torch.cuda.get_device_properties()`` listed in
:data:`RECORD_FIELDS`.  The planner is plain C++ in ``fusedrnn._C`` (present in CPU-only builds
too), so limits for any GPU are computed without one: pass a record such as
:data:`KNOWN_DEVICES` ``["H100"]``.

With ``FUSEDRNN_CUDA_EMULATION=1`` the same kernels also run on CPU tensors, under the CUDA
emulation (:mod:`fusedrnn.backends.cuda_emulation`), whose device record comes from the emulated
device (:func:`fusedrnn.backends.cuda_emulation.device_record`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Tuple

import torch

from . import cpp as _cpp  # loads fusedrnn._C and registers the fusedrnn_ext fakes
from . import cuda_emulation as _emu
from . import rnn_tf32_enabled

_MODE_LIMIT = {"LSTM": "LSTM", "LSTMCell": "LSTM", "GRU": "GRU", "GRUCell": "GRU"}

# The properties the planner reads (names and meaning of torch.cuda.get_device_properties()).
RECORD_FIELDS = (
    "name",
    "major",
    "minor",
    "multi_processor_count",
    "shared_memory_per_block_optin",
    "shared_memory_per_multiprocessor",
    "regs_per_multiprocessor",
    "max_threads_per_multi_processor",
    "total_memory",
    "L2_cache_size",
    "warp_size",
)

# torch.cuda.get_device_properties() of the GPUs the project is measured on (for limits on a
# machine without them: tests, README's table).  The fields the fit depends on (SMs, shared
# memory, registers, threads) are the CUDA runtime's values for these chips; total_memory and
# L2_cache_size (rounded) only inform the cost model.
KNOWN_DEVICES = {
    "H100": dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                 shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
                 regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                 total_memory=85_045_166_080, L2_cache_size=52_428_800, warp_size=32),
    "H200": dict(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132,
                 shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
                 regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                 total_memory=150_110_011_392, L2_cache_size=52_428_800, warp_size=32),
    "A100": dict(name="NVIDIA A100-SXM4-80GB", major=8, minor=0, multi_processor_count=108,
                 shared_memory_per_block_optin=166912, shared_memory_per_multiprocessor=167936,
                 regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                 total_memory=85_097_971_712, L2_cache_size=41_943_040, warp_size=32),
}


def _tf32() -> bool:
    return rnn_tf32_enabled()


# ------------------------------------------------------------------------------ availability
def unavailable() -> Optional[str]:
    if _emu.requested():  # CPU tensors through the CUDA emulation (CUDA tensors: see unsupported)
        return _emu.unavailable()
    return _gpu_unavailable()


def _gpu_unavailable() -> Optional[str]:
    reason = _cpp.extension_error()
    if reason is not None:
        return reason
    if not _cpp.extension().build_info().get("with_cuda", False):
        return "fusedrnn._C was built without CUDA (torch without CUDA or no nvcc at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _planner():
    reason = _cpp.extension_error()
    if reason is not None:
        raise RuntimeError(f"fusedrnn: the CUDA planner lives in the compiled extension: {reason}")
    return _cpp.extension()


def device_record(device=None) -> dict:
    """The planner's record of a device (a dict with the keys of :data:`RECORD_FIELDS`).

    ``device``: None (the current CUDA device), a ``torch.device`` / device string / index (read
    with ``torch.cuda.get_device_properties``), or any object with those attributes (a mapping
    with those keys works too), e.g. ``KNOWN_DEVICES["H100"]`` on a machine without a GPU.
    Raises ValueError naming a missing field, RuntimeError when a real device is asked for and
    CUDA is not available.
    """
    if device is None or isinstance(device, (torch.device, str, int)):
        if not torch.cuda.is_available():
            raise RuntimeError("fusedrnn: no CUDA device is available; pass a device record "
                               "(e.g. fusedrnn.backends.cuda.KNOWN_DEVICES['H100'])")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"fusedrnn: {dev} is not a CUDA device")
        props = torch.cuda.get_device_properties(dev)
    else:
        props = device
    get = props.get if isinstance(props, Mapping) else (lambda k, d=None: getattr(props, k, d))
    rec = {}
    for field in RECORD_FIELDS:
        value = get(field, None)
        if value is None:
            raise ValueError(f"fusedrnn: device record {props!r} lacks {field!r} "
                             f"(it needs the attributes of torch.cuda.get_device_properties(): {RECORD_FIELDS})")
        rec[field] = str(value) if field == "name" else int(value)
    return rec


def max_hidden_size(mode: str, dtype: torch.dtype, device=None, proj_size: int = 0) -> int:
    """Largest hidden size the CUDA kernels run (forward and backward) for ``mode`` ("LSTM"/"GRU"),
    ``dtype``, ``proj_size`` (0: none) on ``device`` (see :func:`device_record`; an int is a
    device index).  0 when none fits.  fp32 limits hold with and without TF32."""
    return int(_planner().cuda_max_hidden(_MODE_LIMIT.get(mode, mode), _dtype_name(dtype), int(proj_size),
                                          device_record(device)))


def max_proj_size(mode: str, dtype: torch.dtype, hidden_size: int, device=None) -> int:
    """Largest proj_size < hidden_size the CUDA LSTM kernels run for ``hidden_size`` (0: none)."""
    return int(_planner().cuda_max_proj(_MODE_LIMIT.get(mode, mode), _dtype_name(dtype), int(hidden_size),
                                        device_record(device)))


def fits(mode: str, dtype: torch.dtype, hidden_size: int, proj_size: int = 0, device=None) -> Tuple[bool, str]:
    """(fits, why not): whether forward and backward of this shape fit on chip on ``device``."""
    ok, why = _planner().cuda_fits(_MODE_LIMIT.get(mode, mode), _dtype_name(dtype), int(hidden_size),
                                   int(proj_size), device_record(device))
    return bool(ok), str(why)


def plan(pass_: str, dtype: torch.dtype, hidden_size: int, batch: int, proj_size: int = 0, device=None,
         train: bool = True, tf32: Optional[bool] = None, variant: str = "", groups: int = -1) -> dict:
    """The launch plan the kernel of ``pass_`` ("lstm_fwd", "lstm_bwd", "gru_fwd", "gru_bwd") would
    use: geometry, exchange protocol and the cost model's predicted microseconds per step
    (``plan["cost"]``).  ``variant`` ("auto", "persistent", "legacy", "barrier", "flags",
    "stepwise") / ``groups`` override ``FUSEDRNN_CUDA_PLAN`` / ``FUSEDRNN_CUDA_GROUPS`` ("" / -1:
    follow them)."""
    P = proj_size if proj_size else hidden_size
    tf32 = _tf32() if tf32 is None else tf32
    return dict(_planner().cuda_plan(pass_, _dtype_name(dtype), bool(tf32), int(hidden_size), int(P), int(batch),
                                     bool(proj_size), bool(train), device_record(device), variant, int(groups)))


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"fusedrnn: dtype {dtype} is not supported by the CUDA kernels "
                         "(float32, float64, bfloat16, float16)")
    return str(dtype).replace("torch.", "")


def unsupported(cfg) -> Optional[str]:
    # CPU tensors under the CUDA emulation: the same limits, on the emulated device's record.
    emulated = _emu.requested() and cfg.device_type == "cpu"
    if emulated:
        reason = _emu.unavailable()
        if reason is not None:
            return reason
    elif _emu.requested() and _gpu_unavailable() is not None:
        return _gpu_unavailable()
    elif cfg.device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors only (got device {cfg.device_type!r})"
    if cfg.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {cfg.dtype} is not supported (float32, float64, bfloat16, float16)"
    if cfg.mode in ("LSTMCell", "GRUCell"):
        return None  # the cells are elementwise: no on-chip weight limit
    if emulated:
        rec = _emu.device_record()
    else:
        index = cfg.device_index if cfg.device_index is not None and cfg.device_index >= 0 \
            else torch.cuda.current_device()
        rec = device_record(index)
        if (rec["major"], rec["minor"]) < (8, 0):
            return (f"{rec['name']} has compute capability {rec['major']}.{rec['minor']}; the CUDA kernels need "
                    "8.0 or newer (sm_80 bf16/fp16 tensor-core mma.sync)")
    proj = int(cfg.proj_size or 0)
    ok, why = fits(cfg.mode, cfg.dtype, cfg.hidden_size, proj, rec)
    if ok:
        return None
    limit = max_hidden_size(cfg.mode, cfg.dtype, rec, proj)
    if proj:
        plimit = max_proj_size(cfg.mode, cfg.dtype, cfg.hidden_size, rec)
        return (
            f"hidden_size={cfg.hidden_size} with proj_size={proj} does not fit on chip for {cfg.mode} in "
            f"{cfg.dtype} on {rec['name']} ({why}): with proj_size={proj} the largest hidden_size is {limit} "
            f"(max_hidden_size), and with hidden_size={cfg.hidden_size} the largest proj_size is {plimit}"
        )
    return (
        f"hidden_size={cfg.hidden_size} exceeds the largest hidden size the persistent CUDA kernels keep "
        f"on chip for {cfg.mode} in {cfg.dtype} on {rec['name']} (max_hidden_size={limit}; {why})"
    )


# ------------------------------------------------------------------------------ op contract
# The dispatcher ops of the compiled extension with the TF32 flag: torch.ops.fusedrnn_ext on CUDA
# tensors, torch.ops.fusedrnn_emu (the same kernels under the CUDA emulation) on CPU tensors.
def _ops(t):
    return _emu.ops() if t.device.type == "cpu" else torch.ops.fusedrnn_ext


def lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, save=True):
    return _ops(xproj).lstm_fwd(xproj, w_hh, b_hh, h0, c0, w_hr, lengths, reverse, _tf32(), save)


def lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse):
    return _ops(dy).lstm_bwd(dy, dh_n, dc_n, w_hh, w_hr, c0, gates, cs, lengths, reverse, _tf32())


def gru_fwd(xproj, w_hh, b_hh, h0, lengths, reverse, save=True):
    return _ops(xproj).gru_fwd(xproj, w_hh, b_hh, h0, lengths, reverse, _tf32(), save)


def gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, reverse):
    return _ops(dy).gru_bwd(dy, dh_n, w_hh, h0, y, gates, lengths, reverse, _tf32())


def lstm_cell_fwd(igates, hgates, b_ih, b_hh, c):
    return _ops(igates).lstm_cell_fwd(igates, hgates, b_ih, b_hh, c)


def lstm_cell_bwd(dh_new, dc_new, c, c_new, gates):
    return _ops(gates).lstm_cell_bwd(dh_new, dc_new, c, c_new, gates)


def gru_cell_fwd(igates, hgates, b_ih, b_hh, h):
    return _ops(igates).gru_cell_fwd(igates, hgates, b_ih, b_hh, h)


def gru_cell_bwd(dh_new, h, gates):
    return _ops(gates).gru_cell_bwd(dh_new, h, gates)
