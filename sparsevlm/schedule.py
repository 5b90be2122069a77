"""Counting shared by every method: the two equal-token figures of a schedule, the `Counts` a plan carries,
the one list-scaling function, and the count of a one-shot method. Each method's own count policy (where it acts
and how many it keeps in each accounting) lives in its module under methods/.

Equal tokens (docs/engine.md) = the mean over decoder layers of the visual tokens a layer holds, counted two ways:
- *input* counting: a pruning layer counts at its input (it runs on the full set, its output is cut). This is
  what prefill FLOPs follow.
- *output* counting (the reference SparseVLM code's figure): a pruning layer counts at its output.

Two accountings meet a budget:
- `paper` (default): each method's published setting, in the method's own counting (e.g. SparseVLM's reference
  lists counted at each pruning layer's output; FastV's budget = the tokens kept after layer K-1). Methods that
  prune before the LLM keep the budget in every layer (both countings agree).
- `flops`: every method at the same *input*-counted figure, i.e. the same prefill cost; a budget the model's
  depth cannot reach is a ConfigError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import REFERENCE_DEPTH, PruneConfig
from .errors import ConfigError

# A budget counts as met when the accounting's figure lies within one token of it (the reference's own
# lists land 0.8 tokens above their 64 budget).
BUDGET_TOLERANCE = 1.0


def scaled_layers(reference: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Reference layer indices (of 32) scaled to `depth`, strictly increasing and below the last layer."""
    out: list[int] = []
    for layer in reference:
        i = int(layer * depth / REFERENCE_DEPTH + 0.5)
        i = max(i, out[-1] + 1 if out else 0)
        if i < depth - 1:
            out.append(i)
    return tuple(out)


def per_layer_inputs(visual: int, layers: tuple[int, ...], counts: list[int], depth: int) -> list[int]:
    """Visual tokens each decoder layer processes, given the total kept after each pruning layer."""
    out, cur, stage = [], visual, 0
    for i in range(depth):
        out.append(cur)
        if stage < len(layers) and layers[stage] == i:
            cur = counts[stage]
            stage += 1
    return out


def equal_tokens(per_layer: list[int]) -> float:
    return sum(per_layer) / len(per_layer)


def equal_tokens_reference(visual: int, layers: tuple[int, ...], counts: list[int], depth: int) -> float:
    """Output counting (the reference code's figure): a pruning layer counts at its output count."""
    out = per_layer_inputs(visual, layers, counts, depth)
    for layer, c in zip(layers, counts):
        out[layer] = c
    return equal_tokens(out)


def _before_llm(visual: int, layers: tuple[int, ...], totals: list[int]) -> tuple[int, tuple[int, ...], list[int]]:
    """A stage at layer -1 (before the LLM) sets what every decoder layer starts from."""
    while layers and layers[0] < 0:
        visual, layers, totals = totals[0], layers[1:], totals[1:]
    return visual, tuple(layers), list(totals)


def layer_counts(visual: int, layers: tuple[int, ...], totals: list[int], depth: int) -> list[int]:
    """Visual tokens each decoder layer processes (input counting); layer -1 = before the LLM."""
    return per_layer_inputs(*_before_llm(visual, tuple(layers), list(totals)), depth)


def figures(visual: int, layers: tuple[int, ...], totals: list[int], depth: int) -> tuple[float, float]:
    """(input-counted, output-counted) equal tokens of a schedule. Layer -1 = before the LLM."""
    visual, layers, totals = _before_llm(visual, tuple(layers), list(totals))
    return (equal_tokens(per_layer_inputs(visual, layers, totals, depth)),
            equal_tokens_reference(visual, layers, totals, depth))


def min_equal_tokens(visual: int, first_layer: int, depth: int) -> float:
    """The smallest input-counted figure a method pruning after `first_layer` can reach (1 token kept after)."""
    return ((first_layer + 1) * visual + (depth - first_layer - 1)) / depth


@dataclass(frozen=True)
class Counts:
    """A method's stage counts under one accounting, with both equal-token figures it is planned to give."""

    layers: tuple[int, ...]  # after which decoder layer each stage acts (-1: before the LLM)
    direct: tuple[int, ...]  # visual tokens kept directly at each stage
    totals: tuple[int, ...]  # visual tokens after each stage (direct + merged tokens added on top)
    equal_tokens_input: float
    equal_tokens_output: float
    # which figure the accounting meets the budget in: input | output | kept (tokens after the last stage) |
    # retained (kept minus `kept_extra`, the tokens a method keeps on top of its budget: DART's image pivots)
    budget_counting: str
    budget_met: bool
    note: str
    kept_extra: int = 0


def budget_figure(counting: str, fin: float, fout: float, kept: float, kept_extra: int = 0) -> float:
    """The figure a counting names: input- or output-counted equal tokens, the kept or the retained count."""
    return {"input": fin, "output": fout, "kept": kept, "retained": kept - kept_extra}[counting]


def make_counts(layers, direct, totals, visual: int, depth: int, budget: int, counting: str, note: str,
                kept_extra: int = 0) -> Counts:
    """A schedule's Counts with both equal-token figures computed here (the one place counting lives)."""
    fin, fout = figures(visual, tuple(layers), list(totals), depth)
    figure = budget_figure(counting, fin, fout, float(totals[-1]) if totals else float(visual), kept_extra)
    return Counts(tuple(layers), tuple(direct), tuple(totals), fin, fout, counting,
                  abs(figure - budget) <= BUDGET_TOLERANCE, note, kept_extra)


def measure(counting: str, visual: int, layers: tuple[int, ...], depth: int) -> Callable[[list[int]], float]:
    """The equal-token figure of a list of totals after `layers`, in the given counting (input | output)."""

    def f(totals: list[int]) -> float:
        fin, fout = figures(visual, tuple(layers), list(totals), depth)
        return fout if counting == "output" else fin

    return f


def floor_or_error(method: str, budget: int, reachable: float, what: str) -> None:
    """flops accounting: a budget the method cannot reach at this depth is a clear error."""
    if budget < reachable - 1e-9:
        raise ConfigError(
            f"{method}: budget {budget} is below what it can reach here ({what}: at least {reachable:.1f} "
            f"equal tokens by input counting); use a larger budget or accounting 'paper'"
        )


def fit_scale(family: Callable[[float], list[int]], figure: Callable[[list[int]], float], budget: float, hi: float,
              rule: str, iterations: int = 80) -> tuple[list[int], float]:
    """Counts from a one-parameter family (non-decreasing in alpha) whose figure hits the budget, and the alpha
    below it: bisection of alpha in [0, hi]. The one list-scaling function of the engine.

    rule "closest": the counts whose figure is nearest the budget (the smaller figure on a tie); "floor": the
    largest figure <= budget.
    """
    lo_a, hi_a = 0.0, hi
    for _ in range(iterations):
        mid = (lo_a + hi_a) / 2
        if figure(family(mid)) > budget:
            hi_a = mid
        else:
            lo_a = mid
    below, above = family(lo_a), family(hi_a)
    if rule == "floor":
        return (below if figure(below) <= budget else above), lo_a
    return min((below, above), key=lambda c: (abs(figure(c) - budget), figure(c))), lo_a


def single_stage_keep(budget: int, visual: int, after_layer: int, depth: int) -> int:
    """Tokens to keep for a one-shot method pruning after `after_layer` (-1 = before the LLM), input counting."""
    before = after_layer + 1
    k = round((budget * depth - before * visual) / (depth - before))
    if k < 1:
        raise ConfigError(
            f"budget {budget} is below what pruning after layer {after_layer} of {depth} can reach "
            f"(at least {min_equal_tokens(visual, after_layer, depth):.1f} equal tokens counted at each layer's "
            "input); choose a larger budget or paper accounting"
        )
    return min(k, visual)


def single_stage(cfg: PruneConfig, visual: int, after_layer: int, depth: int, method: str) -> Counts:
    """A one-shot method (FastV after layer K-1; FasterVLM, random before the LLM) under either accounting."""
    budget = min(cfg.budget, visual)
    if after_layer < 0:  # every decoder layer sees the kept set: both countings equal the budget
        return make_counts((-1,), (budget,), (budget,), visual, depth, budget, "input",
                           f"{method}: keep {budget} of {visual} before the LLM (input and output counting agree)")
    if cfg.accounting == "paper":
        return make_counts((after_layer,), (budget,), (budget,), visual, depth, budget, "kept",
                           f"paper accounting: {method}'s own counting, the budget is the number of tokens kept after "
                           f"layer {after_layer} (layers 0..{after_layer} see all {visual})")
    k = single_stage_keep(budget, visual, after_layer, depth)
    return make_counts((after_layer,), (k,), (k,), visual, depth, budget, "input",
                       f"flops accounting: keep {k} after layer {after_layer} so equal tokens counted at each layer's "
                       f"input hit {budget}")
