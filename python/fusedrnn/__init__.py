"""fusedrnn: fused LSTM / GRU kernels (Triton and CUDA C++) behind drop-in torch.nn modules.

    import fusedrnn
    lstm = fusedrnn.LSTM(512, 512, num_layers=2, backend="auto")   # same API as torch.nn.LSTM
    fusedrnn.convert(model)                                          # swap every nn.LSTM/GRU/cell
    fusedrnn.available_backends()                                    # what runs here, and why not
"""

import os as _os

from .backends import BACKENDS, available_backends
from .modules import GRU, LSTM, GRUCell, LSTMCell, convert, quantize_dynamic


def max_hidden_size(mode: str, dtype, *, backend: str, proj_size: int = 0, device=None) -> int:
    """Largest ``hidden_size`` whose recurrence (forward and backward) ``backend`` keeps on chip.

    mode       "LSTM" or "GRU" (``proj_size`` is an LSTM option)
    dtype      torch.float32, float64, bfloat16 or float16 (fp32 limits hold with and without TF32)
    backend    "cuda" or "triton": the kernel backends with an on-chip limit (the others have none)
    proj_size  LSTM projection size (0: none); the limit is for hidden sizes above it
    device     None (the current CUDA device), a ``torch.device`` / index, or any object with the
               attributes of ``torch.cuda.get_device_properties()`` (``name, major, minor,
               multi_processor_count, shared_memory_per_block_optin,
               shared_memory_per_multiprocessor, regs_per_multiprocessor,
               max_threads_per_multi_processor, total_memory, L2_cache_size, warp_size``), so the
               limits of an H100/H200/A100 are computed on a machine without a GPU
               (``fusedrnn.backends.cuda.KNOWN_DEVICES`` holds those records).

    Returns the limit in hidden units; 0 when no hidden size fits (e.g. proj_size too large) or
    the device is older than compute capability 8.0 (both kernel backends need sm_80's bf16/fp16
    tensor-core instructions).
    Beyond it an explicit ``backend=`` raises ValueError naming this limit and ``backend="auto"``
    falls back with a one-time warning.  Raises TypeError when ``proj_size`` is not an int,
    ValueError for an unknown mode, dtype or backend,
    RuntimeError when ``device`` is None or a torch device and CUDA is not available, or when the
    compiled extension (which holds the CUDA planner) is missing for ``backend="cuda"``.
    """
    import torch as _torch

    if mode not in ("LSTM", "GRU"):
        raise ValueError(f"fusedrnn.max_hidden_size: mode must be 'LSTM' or 'GRU', got {mode!r}")
    if not isinstance(proj_size, int) or isinstance(proj_size, bool):
        raise TypeError(f"fusedrnn.max_hidden_size: proj_size must be an int, got {type(proj_size).__name__}")
    if proj_size < 0 or (proj_size and mode != "LSTM"):
        raise ValueError(f"fusedrnn.max_hidden_size: proj_size must be >= 0 and only for LSTM, got {proj_size}")
    if dtype not in (_torch.float32, _torch.float64, _torch.bfloat16, _torch.float16):
        raise ValueError(f"fusedrnn.max_hidden_size: unsupported dtype {dtype}")
    if backend not in ("cuda", "triton"):
        raise ValueError(f"fusedrnn.max_hidden_size: backend must be 'cuda' or 'triton' (the kernel backends "
                         f"with an on-chip limit), got {backend!r}")
    from .backends import cuda as _cuda

    rec = _cuda.device_record(device)
    if (rec["major"], rec["minor"]) < (8, 0):
        return 0
    if backend == "cuda":
        return _cuda.max_hidden_size(mode, dtype, rec, proj_size)
    if backend == "triton":
        from .backends.triton import _common as _tc

        import types as _types

        info = _tc.info_from_properties(_types.SimpleNamespace(**rec))
        return int(_tc.max_hidden_size(4 if mode == "LSTM" else 3, dtype, proj_size=proj_size, info=info))


def _enable_dynamo_rnn() -> None:
    """Let torch.compile trace fusedrnn modules.

    Dynamo refuses to trace any instance of nn.LSTM/GRU/RNN unless
    ``torch._dynamo.config.allow_rnn`` is set, and fusedrnn's modules must be such instances to be
    drop-ins.  Importing fusedrnn therefore sets the flag (our forward is plain Python around
    custom ops, fully traceable).  Side effect: torch.nn's own RNN modules, if compiled in the same
    process, are traced too instead of graph-breaking; set FUSEDRNN_KEEP_DYNAMO_RNN_FLAG=1 to
    leave the flag alone (then compile fusedrnn modules with the flag set yourself).
    """
    if _os.environ.get("FUSEDRNN_KEEP_DYNAMO_RNN_FLAG", "") == "1":
        return
    try:
        import torch._dynamo

        torch._dynamo.config.allow_rnn = True
    except Exception:  # pragma: no cover - very old or stripped torch builds
        pass


_enable_dynamo_rnn()

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "GRU",
    "LSTMCell",
    "GRUCell",
    "convert",
    "quantize_dynamic",
    "available_backends",
    "max_hidden_size",
    "BACKENDS",
    "__version__",
]
