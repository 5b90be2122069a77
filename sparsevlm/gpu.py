"""GPU work on Hugging Face ZeroGPU Spaces: `spaces.GPU` when the `spaces` package is importable, else nothing.

ZeroGPU attaches a GPU only while a function decorated with `spaces.GPU` runs; everywhere else (a CPU Space, a
Docker Space with its own GPU, a laptop) the decorator is a no-op and the function is returned unchanged:

    from sparsevlm.gpu import gpu

    @gpu(duration=120)          # or plain @gpu
    def run_request(...): ...
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any


def _spaces():
    try:
        return importlib.import_module("spaces")
    except ImportError:
        return None


def on_zero_gpu() -> bool:
    """True on a ZeroGPU Space (the platform sets SPACES_ZERO_GPU) with the `spaces` package installed."""
    return _spaces() is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(fn: Callable | None = None, *, duration: int | None = None) -> Any:
    """Decorate a function that needs the GPU: `@gpu` or `@gpu(duration=seconds)`."""
    spaces = _spaces()

    def wrap(f: Callable) -> Callable:
        if spaces is None:
            return f
        return spaces.GPU(f) if duration is None else spaces.GPU(duration=duration)(f)

    return wrap(fn) if fn is not None else wrap
