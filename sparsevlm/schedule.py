"""Counting in one place: where methods prune, how many tokens they keep, and the two equal-token figures.

Equal tokens (docs/engine.md) = the mean over decoder layers of the visual tokens a layer holds, counted two ways:
- *input* counting: a pruning layer counts at its input (it runs on the full set, its output is cut). This is
  what prefill FLOPs follow.
- *output* counting (the reference SparseVLM code's figure): a pruning layer counts at its output.

Two accountings meet a budget:
- `paper` (default): each method's published setting. SparseVLM: the reference v1.5 lists verbatim (32 layers,
  576 tokens) as *directly kept* counts, recycled clusters on top, so that output counting lands on the budget
  (192.0 / 128.6 / 96.9 / 64.8); other depths, grids or budgets scale the nearest list so that output counting
  hits the budget, and a budget below what the schedule can reach runs at the smallest schedule (said in the
  trace). FastV: its own counting - the budget is the number of tokens kept after layer K-1 (FastV's R).
  Methods that prune before the LLM keep the budget in every layer (both countings agree).
- `flops`: every method at the same *input*-counted figure, i.e. the same prefill cost; a budget the model's
  depth cannot reach is a ConfigError.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .algorithm import recycle_sizes
from .config import (
    REFERENCE_DEPTH,
    REFERENCE_FASTV_K,
    REFERENCE_FIXED_COUNTS,
    REFERENCE_GRID_TOKENS,
    REFERENCE_PRUNE_LAYERS_32,
    PruneConfig,
)
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


def sparsevlm_layers(cfg: PruneConfig, depth: int) -> tuple[int, ...]:
    layers = cfg.prune_layers if cfg.prune_layers is not None else scaled_layers(REFERENCE_PRUNE_LAYERS_32, depth)
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= depth - 1:
        raise ConfigError(f"pruning layers {list(layers)} must increase and lie in 0..{depth - 2}")
    return tuple(layers)


def fastv_k(cfg: PruneConfig, depth: int) -> int:
    """FastV's K (layers 0..K-1 run in full; ranked in layer K-1, pruned after it). Default 2 of 32, scaled."""
    k = cfg.fastv_k if cfg.fastv_k is not None else max(1, int(REFERENCE_FASTV_K * depth / REFERENCE_DEPTH + 0.5))
    if not 1 <= k < depth:
        raise ConfigError(f"FastV K = {k} must lie in 1..{depth - 1} (K layers run on the full sequence)")
    return k


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


def totals_with_clusters(visual: int, direct: list[int], recycle: bool, tau: float, theta: float) -> list[int]:
    """Visual tokens after each stage: the directly kept ones plus the clusters recycled from the deleted ones."""
    out, cur = [], visual
    for d in direct:
        d = min(d, cur)
        clusters = recycle_sizes(cur - d, tau, theta)[1] if recycle else 0
        cur = d + clusters
        out.append(cur)
    return out


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


_counts = make_counts


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


def sparsevlm_fixed(cfg: PruneConfig, visual: int, depth: int) -> Counts:
    """SparseVLM's fixed-budget schedule: directly kept counts per pruning layer, recycled clusters on top."""
    layers = sparsevlm_layers(cfg, depth)
    budget = cfg.budget
    recycle = cfg.recycle

    def totals(direct: list[int]) -> list[int]:
        return totals_with_clusters(visual, direct, recycle, cfg.tau, cfg.theta)

    verbatim = (depth == REFERENCE_DEPTH and visual == REFERENCE_GRID_TOKENS and budget in REFERENCE_FIXED_COUNTS
                and layers == REFERENCE_PRUNE_LAYERS_32)
    if cfg.accounting == "paper" and verbatim:
        direct = list(REFERENCE_FIXED_COUNTS[budget])
        return _counts(layers, direct, totals(direct), visual, depth, budget, "output",
                       f"paper accounting: reference v1.5 list for {budget} verbatim, {direct} kept directly after "
                       f"layers {list(layers)}, recycled clusters on top")
    counting = "output" if cfg.accounting == "paper" else "input"
    shape_key = min(REFERENCE_FIXED_COUNTS, key=lambda b: abs(b - budget))
    shape = [c * visual / REFERENCE_GRID_TOKENS for c in REFERENCE_FIXED_COUNTS[shape_key]]
    shape = (shape + [shape[-1]] * len(layers))[: len(layers)]

    def direct_for(alpha: float) -> list[int]:
        # Direct counts strictly decrease, and every stage leaves fewer tokens than it received (recycled
        # clusters included; the reference caps its counts at V_cur - 1).
        out, prev, cur = [], visual, visual
        for s in shape:
            c = max(1, min(prev - 1, cur - 1, round(alpha * s)))
            while c > 1 and totals_with_clusters(cur, [c], recycle, cfg.tau, cfg.theta)[0] >= cur:
                c -= 1
            out.append(c)
            prev, cur = c, totals_with_clusters(cur, [c], recycle, cfg.tau, cfg.theta)[0]
        return out

    def figure(direct: list[int]) -> float:
        fin, fout = figures(visual, layers, totals(direct), depth)
        return fin if counting == "input" else fout

    smallest = [1] * len(layers)
    if figure(smallest) > budget + BUDGET_TOLERANCE:
        if cfg.accounting == "flops":
            raise ConfigError(
                f"budget {budget} is below what pruning after layer {layers[0]} of {depth} can reach "
                f"(the first {layers[0] + 1} layers see all {visual} tokens: at least {figure(smallest):.1f} "
                "equal tokens counted at each layer's input); choose a larger budget or paper accounting"
            )
        return _counts(layers, smallest, totals(smallest), visual, depth, budget, counting,
                       f"paper accounting: budget {budget} is below what pruning after layer {layers[0]} of {depth} "
                       f"can reach; ran the smallest schedule (1 token kept directly per stage, "
                       f"{figure(smallest):.1f} equal tokens counted at each pruning layer's output)")
    best, lo = fit_scale(direct_for, figure, budget, visual / max(min(shape), 1e-9) + 1.0, "closest", iterations=60)
    which = "each pruning layer's output (the reference's counting)" if counting == "output" else \
        "each layer's input (equal prefill cost)"
    return _counts(layers, best, totals(best), visual, depth, budget, counting,
                   f"{cfg.accounting} accounting: reference v1.5 list for {shape_key} scaled by {lo:.3f} so equal "
                   f"tokens counted at {which} hit {budget}; {best} kept directly, recycled clusters on top")


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
        return _counts((-1,), (budget,), (budget,), visual, depth, budget, "input",
                       f"{method}: keep {budget} of {visual} before the LLM (input and output counting agree)")
    if cfg.accounting == "paper":
        return _counts((after_layer,), (budget,), (budget,), visual, depth, budget, "kept",
                       f"paper accounting: {method}'s own counting, the budget is the number of tokens kept after "
                       f"layer {after_layer} (layers 0..{after_layer} see all {visual})")
    k = single_stage_keep(budget, visual, after_layer, depth)
    return _counts((after_layer,), (k,), (k,), visual, depth, budget, "input",
                   f"flops accounting: keep {k} after layer {after_layer} so equal tokens counted at each layer's "
                   f"input hit {budget}")
