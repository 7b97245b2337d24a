"""The ``triton`` backend (placeholder until the Triton kernels land)."""
from typing import Optional


def unavailable() -> Optional[str]:
    return "the Triton kernels are not implemented yet"


def unsupported(cfg) -> Optional[str]:
    return "the Triton kernels are not implemented yet"
