"""How the renderers name things: a method's label, an option as the trace records it, a token, a unit, and text
made safe for HTML.

A method's label and what ranks its tokens are declared on the method's class in the engine's registry
(`sparsevlm.methods`). The registry lives with the methods' code, which imports torch, so it is read the first
time a method is named, not when a renderer is imported.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from sparsevlm.trace import PruneTrace


def _registry():
    """The engine's method registry (`sparsevlm.methods`), imported on first use."""
    from sparsevlm import methods

    return methods


class _RanksBy(Mapping[str, str]):
    """What ranks the visual tokens, per method: declared on each method class (`ranks_by`), read live from the
    engine's registry, so a newly registered method appears here with nothing else to edit."""

    def __getitem__(self, name: str) -> str:
        registry = _registry()
        if name not in registry.METHODS:
            raise KeyError(name)
        return registry.get_method(name).ranks_by

    def __len__(self) -> int:
        return len(_registry().METHODS)

    def __iter__(self) -> Iterator[str]:
        return iter(_registry().METHODS)


RANKS_BY: Mapping[str, str] = _RanksBy()


def method_label(method: str, long: bool = False) -> str:
    """Short label ("FastV"), or with what ranks the tokens ("FastV (last-token attention)")."""
    registry = _registry()
    if method not in registry.METHODS:
        return method
    m = registry.get_method(method)
    return f"{m.label} ({m.ranks_by})" if long and m.ranks_by else m.label


def method_name(trace: PruneTrace) -> str:
    """The label of the method a trace recorded."""
    return method_label(trace.method)


def config_option(trace: PruneTrace, name: str, default=None):
    """One of the method's options as the trace's config records it: under "options" (traces written since each
    method declares its own options), or as a flat key (traces and /run records written before)."""
    cfg = trace.config or {}
    options = cfg.get("options")
    if isinstance(options, dict) and name in options:
        return options[name]
    return cfg.get(name, default)


def display_token(tok: str) -> str:
    """A tokenizer's token as text: word-start marks as spaces, a newline as ↵, an empty token visible."""
    tok = tok.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\u21b5")
    return tok if tok.strip() else repr(tok)[1:-1] or "\u2423"


def esc(s: str) -> str:
    """Text made safe inside HTML."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def normalise(s: str) -> str:
    """An answer as two answers are compared: lower case, single spaces, no final full stop."""
    return " ".join(s.lower().strip().rstrip(".").split())


def flops_unit(v: float) -> tuple[float, str]:
    """(value, unit) with the largest FLOPs unit the value reaches."""
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if abs(v) >= scale:
            return v / scale, unit
    return v, "FLOPs"


def bytes_unit(v: float) -> tuple[float, str]:
    """(value, unit) with the largest binary byte unit the value reaches."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= scale:
            return v / scale, unit
    return v, "B"


def format_bytes(v: float) -> str:
    n, unit = bytes_unit(v)
    return f"{n:.3g} {unit}"
