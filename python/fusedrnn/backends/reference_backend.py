"""The ``reference`` backend: the spec in ``reference.py``, runnable on any device and dtype."""

from typing import Optional

from .reference import (  # noqa: F401  (the op contract)
    gru_bwd,
    gru_cell_bwd,
    gru_cell_fwd,
    gru_fwd,
    lstm_bwd,
    lstm_cell_bwd,
    lstm_cell_fwd,
    lstm_fwd,
)


def unavailable() -> Optional[str]:
    return None


def unsupported(cfg) -> Optional[str]:
    return None
