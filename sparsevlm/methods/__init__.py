"""The registry of pruning methods: one module per method, registered here by name.

Adding a method = one module with a `PruneMethod` subclass (see base.py) and one line in `_REGISTRY`.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import (
    MergedGroup,
    ModelGeometry,
    Plan,
    PrefillInput,
    PruneMethod,
    Raters,
    Selection,
    StageInput,
    StageSpec,
    VisionInput,
)
from .dart import DART
from .dense import Dense
from .divprune import DivPrune
from .fastervlm import FasterVLM
from .fastv import FastV
from .pyramiddrop import PyramidDrop
from .random_subset import RandomSubset
from .sparsevlm import SparseVLM
from .sparsevlm_v2 import SparseVLMv2
from .visionzip import VisionZip

_REGISTRY: dict[str, PruneMethod] = {m.name: m for m in (
    Dense(), SparseVLM(), FastV(), FasterVLM(), RandomSubset(),
    SparseVLMv2(), VisionZip(), DivPrune(), PyramidDrop(), DART(),
)}

METHODS: tuple[str, ...] = tuple(_REGISTRY)
# Labels for UIs, in one place.
METHOD_LABELS: dict[str, str] = {name: m.label for name, m in _REGISTRY.items()}


def get_method(name: str) -> PruneMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = [
    "METHODS", "METHOD_LABELS", "get_method", "MergedGroup", "ModelGeometry", "Plan", "PrefillInput", "PruneMethod",
    "Raters", "Selection", "StageInput", "StageSpec", "VisionInput",
]
