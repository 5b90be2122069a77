"""What the new methods share: a stage plan (where a method acts, how many it keeps, both equal-token countings)
and a selection record (kept indices, scores, merged groups) that a trace can store as plain data.

Layer convention: a stage acts *after* decoder layer `l` (its output is cut, layers > l see the kept tokens);
`l = -1` means before the LLM (the projector output or the vision tower is cut, every layer sees the kept tokens).
A method that acts "before layer K" (PyramidDrop, DART) acts after layer K - 1.

Counting (docs/engine.md): *input* counting = mean over decoder layers of the visual tokens each layer processes
(a pruning layer counts at its input; what FLOPs follow); *output* counting = the same with each pruning layer
counted at its output. For a stage before the LLM both are the same. The figures are computed by schedule.py
(`figures`, `layer_counts`, `make_counts`, `fit_scale`), the one place counting lives; `to_counts` hands a
plan to the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from ..schedule import Counts, figures, layer_counts, make_counts

ACCOUNTINGS = ("paper", "flops")


@dataclass(frozen=True)
class StagePlan:
    """Where a method acts and how many visual tokens it keeps; both equal-token figures."""

    method: str
    visual: int  # visual tokens entering (grid size)
    depth: int  # decoder layers
    after_layers: tuple[int, ...]  # -1 = before the LLM
    counts: tuple[int, ...]  # visual tokens the LLM carries after each stage
    per_layer: tuple[int, ...]  # visual tokens each decoder layer processes (input counting)
    equal_tokens_input: float
    equal_tokens_output: float
    budget: int
    accounting: str  # paper | flops
    counting: str  # which figure met the budget: input | output | retained (DART's paper figure)
    note: str
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    """One pruning/merging event as plain data. Indices are local to the tokens the stage received (0..n-1)."""

    kept: torch.Tensor  # (k,) sorted ascending
    scores: torch.Tensor  # (n,) the method's per-token score (higher = kept first); NaN where it has none
    groups: list[tuple[int, list[int]]] = field(default_factory=list)  # (target index, member indices)
    extras: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        """Plain lists/numbers (tensors converted) for a JSON trace."""
        return {"kept": plain(self.kept), "scores": plain(self.scores), "groups": plain(self.groups),
                "extras": plain(self.extras)}


def plain(x: Any) -> Any:
    """Tensors, tuples and dict keys made JSON-plain (lists, numbers, string keys), recursively."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    return x


def check_accounting(accounting: str) -> None:
    if accounting not in ACCOUNTINGS:
        raise ConfigError(f"accounting must be one of {', '.join(ACCOUNTINGS)} (got {accounting!r})")


def check_budget(budget: int, visual: int) -> None:
    if not 1 <= budget <= visual:
        raise ConfigError(f"budget {budget} must lie in 1..{visual} (the visual tokens of the image)")


def to_counts(plan: StagePlan, direct: tuple[int, ...] | None = None, kept_extra: int = 0) -> Counts:
    """The engine's Counts of a stage plan (figures recomputed by schedule.make_counts, the one place counting
    lives). direct: tokens kept directly per stage when merged tokens come on top (VisionZip's contextual);
    kept_extra: tokens kept on top of the budget by the method's rule (DART's image pivots, "retained" counting)."""
    return make_counts(plan.after_layers, direct if direct is not None else plan.counts, plan.counts, plan.visual,
                       plan.depth, plan.budget, plan.counting, plan.note, kept_extra)


def make_plan(
    method: str,
    visual: int,
    depth: int,
    after_layers: tuple[int, ...],
    counts: tuple[int, ...],
    budget: int,
    accounting: str,
    counting: str,
    note: str,
    extras: dict[str, Any] | None = None,
) -> StagePlan:
    per_layer = layer_counts(visual, tuple(after_layers), list(counts), depth)  # schedule's counting
    fin, fout = figures(visual, tuple(after_layers), list(counts), depth)
    return StagePlan(
        method=method,
        visual=visual,
        depth=depth,
        after_layers=tuple(after_layers),
        counts=tuple(counts),
        per_layer=tuple(per_layer),
        equal_tokens_input=fin,
        equal_tokens_output=fout,
        budget=budget,
        accounting=accounting,
        counting=counting,
        note=note,
        extras=dict(extras or {}),
    )


def measure(counting: str, visual: int, after_layers: tuple[int, ...], depth: int) -> Callable[[list[int]], float]:
    """The equal-token figure of a list of counts in the given counting (input | output), as schedule.figures."""

    def f(counts: list[int]) -> float:
        fin, fout = figures(visual, tuple(after_layers), list(counts), depth)
        return fout if counting == "output" else fin

    return f


def floor_or_error(method: str, budget: int, reachable: float, what: str) -> None:
    """flops accounting: a budget the method cannot reach at this depth is a clear error."""
    if budget < reachable - 1e-9:
        raise ConfigError(
            f"{method}: budget {budget} is below what it can reach here ({what}: at least {reachable:.1f} "
            f"equal tokens by input counting); use a larger budget or accounting 'paper'"
        )
