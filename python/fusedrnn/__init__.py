"""fusedrnn: fused LSTM / GRU kernels (Triton and CUDA C++) behind drop-in torch.nn modules.

    import fusedrnn
    lstm = fusedrnn.LSTM(512, 512, num_layers=2, backend="auto")   # same API as torch.nn.LSTM
    fusedrnn.convert(model)                                          # swap every nn.LSTM/GRU/cell
    fusedrnn.available_backends()                                    # what runs here, and why not
"""

from .backends import BACKENDS, available_backends
from .modules import GRU, LSTM, GRUCell, LSTMCell, convert

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "GRU",
    "LSTMCell",
    "GRUCell",
    "convert",
    "available_backends",
    "BACKENDS",
    "__version__",
]
