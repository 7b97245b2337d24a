"""fusedrnn: fused LSTM / GRU kernels (Triton and CUDA C++) behind drop-in torch.nn modules.

    import fusedrnn
    lstm = fusedrnn.LSTM(512, 512, num_layers=2, backend="auto")   # same API as torch.nn.LSTM
    fusedrnn.convert(model)                                          # swap every nn.LSTM/GRU/cell
    fusedrnn.available_backends()                                    # what runs here, and why not
"""

import os as _os

from .backends import BACKENDS, available_backends
from .modules import GRU, LSTM, GRUCell, LSTMCell, convert, quantize_dynamic


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
    "BACKENDS",
    "__version__",
]
