"""The CUDA emulation: the ``cuda`` backend's kernels (csrc/cuda) run on CPU tensors.

With ``FUSEDRNN_CUDA_EMULATION=1`` the ``cuda`` backend accepts CPU tensors and runs them through
``torch.ops.fusedrnn_emu.*``: the very CUDA kernel source, compiled as host C++ into the normal
build of ``fusedrnn._C`` and executed under a CUDA-semantics emulator (every thread a fiber,
``__syncthreads``, warp shuffles and ``mma.sync`` fragment exchange, blocks of a cooperative grid
interleaved, out-of-bounds and race checks).  It exists so that every kernel change is tested on
every commit without a GPU; it says nothing about speed (README, "CUDA emulation").

Environment:
    FUSEDRNN_CUDA_EMULATION=1         enable the cuda backend on CPU tensors
    FUSEDRNN_CUDA_EMULATION_DEVICE    emulated device record: H100 (default), H200, A100
    FUSEDRNN_CUDA_EMULATION_SMS       its SM count (default: the real one); a small count keeps
                                      runs fast and still gives multi-block grids
    FUSEDRNN_CUDA_EMULATION_SEED      seed of the block/thread interleaving (default 0)
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from . import cpp as _cpp

ENV_VAR = "FUSEDRNN_CUDA_EMULATION"
_LIMIT_MODE = {"LSTM": "LSTM", "LSTMCell": "LSTM", "GRU": "GRU", "GRUCell": "GRU"}


def requested() -> bool:
    """Whether FUSEDRNN_CUDA_EMULATION=1 asks for the cuda backend on CPU tensors."""
    return os.environ.get(ENV_VAR, "").strip() == "1"


def unavailable() -> Optional[str]:
    """None when the emulated kernels can run here, else why not."""
    reason = _cpp.extension_error()
    if reason is not None:
        return reason
    if not hasattr(_cpp.extension(), "emulation"):
        return "fusedrnn._C was built without the CUDA emulation (rebuild the extension)"
    return None


def controls():
    """``fusedrnn._C.emulation``: device record, scheduler options, launch statistics."""
    reason = unavailable()
    if reason is not None:
        raise NotImplementedError(f"fusedrnn: the CUDA emulation is not available: {reason}")
    return _cpp.extension().emulation


def ops():
    """The emulated op namespace (same schemas as torch.ops.fusedrnn_ext)."""
    if not requested():
        raise RuntimeError(
            f"fusedrnn: the cuda backend runs on CPU tensors only under the CUDA emulation "
            f"({ENV_VAR}=1); got CPU tensors without it"
        )
    controls()
    return torch.ops.fusedrnn_emu


def device_record() -> dict:
    """The emulated device as the planner sees it: a record with the keys of
    ``fusedrnn.backends.cuda.RECORD_FIELDS`` (name "emulated H100 with 9 SMs", ...)."""
    return dict(controls().device()["record"])


def max_hidden_size(mode: str, dtype: torch.dtype, proj_size: int = 0) -> int:
    """Largest hidden size the emulated kernels keep on chip on the emulated device (the same
    planner, fusedrnn/cuda_plan.h, as on a GPU)."""
    return int(controls().max_hidden_size(_LIMIT_MODE.get(mode, mode), str(dtype).replace("torch.", ""),
                                          int(proj_size)))


@contextlib.contextmanager
def emulated_device(name: str = "H100", sms: int = 0):
    """Emulate device ``name`` with ``sms`` SMs (0: its real count) inside the block."""
    c = controls()
    old = c.device()
    c.set_device(name, sms)
    try:
        yield c.device()
    finally:
        c.set_device(old["name"], old["sms"])


@contextlib.contextmanager
def emulation_options(**kwargs):
    """Scheduler/checker options (block_order, thread_order, seed, race_check, stack_kb) inside the block."""
    c = controls()
    old = c.options()
    c.set_options(**kwargs)
    try:
        yield c.options()
    finally:
        c.set_options(**old)
