"""The registry of pruning methods: one module per method, registered here by name.

Adding a method = one module with a `PruneMethod` subclass (see base.py) declaring its name, label, what it ranks
by, whether it needs [CLS] and what it captures, and one line in `_BUILT_IN`. Everything else (the CLI's choices,
the app's labels and tables, the benchmark) reads the registry. `register` adds a method at run time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from ..errors import ConfigError
from .base import (
    AttentionChoice,
    AttentionInput,
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
from .zipvl import ZipVL

_BUILT_IN: tuple[PruneMethod, ...] = (
    Dense(), SparseVLM(), FastV(), FasterVLM(), RandomSubset(),
    SparseVLMv2(), VisionZip(), DivPrune(), PyramidDrop(), DART(), ZipVL(),
)
_REGISTRY: dict[str, PruneMethod] = {}


def register(method: PruneMethod) -> PruneMethod:
    """Add a method under its `name` (a name already taken is a ConfigError); returns it."""
    name = getattr(method, "name", None)
    if not isinstance(method, PruneMethod) or not isinstance(name, str) or not name:
        raise ConfigError("a method is a PruneMethod instance with a non-empty `name`")
    if name in _REGISTRY:
        raise ConfigError(f"a method named {name!r} is registered already")
    _REGISTRY[name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with `register` (built-in methods stay)."""
    if any(m.name == name for m in _BUILT_IN):
        raise ConfigError(f"{name!r} is a built-in method")
    _REGISTRY.pop(name, None)


for _m in _BUILT_IN:
    register(_m)


class _Names(Sequence[str]):
    """The registered method names, in registration order; always current (methods registered later appear)."""

    def __getitem__(self, i):  # type: ignore[override]
        return tuple(_REGISTRY)[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


class _Labels(Mapping[str, str]):
    """name -> label of every registered method; always current."""

    def __getitem__(self, name: str) -> str:
        return _REGISTRY[name].label

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))


METHODS: Sequence[str] = _Names()
# Labels for UIs, in one place.
METHOD_LABELS: Mapping[str, str] = _Labels()


def attention_read_layers(geo: ModelGeometry) -> dict[int, list[str]]:
    """Decoder layer -> the registered methods that rank visual tokens by its text-to-image attention (each in its
    own default setting): the layers an attention profile shows."""
    out: dict[int, list[str]] = {}
    for m in _REGISTRY.values():
        try:
            layers = m.reads_attention_at(geo)
        except ConfigError:  # a depth the method's schedule cannot use
            continue
        for layer in layers:
            if 0 <= layer < geo.depth:
                out.setdefault(layer, []).append(m.name)
    return dict(sorted(out.items()))


def registered(name: str) -> PruneMethod | None:
    """The method registered under `name`, or None."""
    return _REGISTRY.get(name)


def get_method(name: str) -> PruneMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = [
    "AttentionChoice", "AttentionInput", "METHODS", "METHOD_LABELS", "get_method", "registered", "register",
    "attention_read_layers", "unregister", "MergedGroup", "ModelGeometry", "Plan",
    "PrefillInput", "PruneMethod", "Raters", "Selection", "StageInput", "StageSpec", "VisionInput",
]
