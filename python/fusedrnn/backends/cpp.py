"""The ``cpp``  backend (placeholder until the compiled extension lands)."""
from typing import Optional


def unavailable() -> Optional[str]:
    return "the compiled extension fusedrnn._C is not implemented yet"


def unsupported(cfg) -> Optional[str]:
    return "the compiled extension fusedrnn._C is not implemented yet"
