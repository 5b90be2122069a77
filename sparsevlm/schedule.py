"""Where to prune and how many tokens to keep, for any decoder depth and grid size (SPEC sections 2, 3, 7).

Equal tokens (our definition, SPEC section 7): the mean over decoder layers of the visual tokens each layer
processes as INPUT. A layer that prunes processes its full input and its output is cut, so it counts at its
input count. The reference code counts a pruning layer at its output count; both figures are reported.
"""

from __future__ import annotations

from .config import (
    REFERENCE_DEPTH,
    REFERENCE_FIXED_COUNTS,
    REFERENCE_GRID_TOKENS,
    REFERENCE_PRUNE_LAYERS_32,
    PruneConfig,
)
from .errors import ConfigError


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


def fastv_layer(cfg: PruneConfig, depth: int) -> int:
    k = cfg.fastv_layer if cfg.fastv_layer is not None else scaled_layers((2,), depth)[0]
    if not 0 <= k < depth - 1:
        raise ConfigError(f"FastV layer {k} must lie in 0..{depth - 2}")
    return k


def per_layer_inputs(visual: int, layers: tuple[int, ...], counts: list[int], depth: int) -> list[int]:
    """Visual tokens each decoder layer processes, given counts kept after each pruning layer."""
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
    """The reference code's figure: a pruning layer counts at its output count."""
    out = per_layer_inputs(visual, layers, counts, depth)
    for layer, c in zip(layers, counts):
        out[layer] = c
    return equal_tokens(out)


def min_equal_tokens(visual: int, first_layer: int, depth: int) -> float:
    """The smallest equal-token figure a method pruning after `first_layer` can reach (1 token kept after)."""
    return ((first_layer + 1) * visual + (depth - first_layer - 1)) / depth


def fixed_counts(cfg: PruneConfig, visual: int, depth: int) -> tuple[tuple[int, ...], list[int], str]:
    """(pruning layers, total kept after each, description) for the fixed-budget mode.

    "equal": the reference v1.5 list for the budget gives the shape; it is scaled so the equal-token figure
    (input counts) hits the budget. "reference": the lists verbatim (32 layers x 576 tokens only).
    """
    layers = sparsevlm_layers(cfg, depth)
    budget = cfg.budget
    shape_key = min(REFERENCE_FIXED_COUNTS, key=lambda b: abs(b - budget))
    shape = [c * visual / REFERENCE_GRID_TOKENS for c in REFERENCE_FIXED_COUNTS[shape_key]]
    shape = (shape + [shape[-1]] * len(layers))[: len(layers)]
    if cfg.fixed_schedule == "reference":
        if depth != REFERENCE_DEPTH or visual != REFERENCE_GRID_TOKENS or budget not in REFERENCE_FIXED_COUNTS:
            raise ConfigError("the verbatim reference counts exist only for 32 layers, 576 tokens, 192/128/96/64")
        counts = list(REFERENCE_FIXED_COUNTS[budget])
        return layers, counts, f"reference v1.5 counts for budget {budget}: {counts}"
    floor = min_equal_tokens(visual, layers[0], depth)
    if budget < floor:
        raise ConfigError(
            f"budget {budget} is below what pruning after layer {layers[0]} of {depth} can reach "
            f"(the first {layers[0] + 1} layers see all {visual} tokens: at least {floor:.1f} equal tokens)"
        )

    def counts_for(alpha: float) -> list[int]:
        out, prev = [], visual
        for s in shape:
            c = max(1, min(prev, round(alpha * s)))
            out.append(c)
            prev = c
        return out

    lo, hi = 0.0, visual / max(min(shape), 1e-9) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if equal_tokens(per_layer_inputs(visual, layers, counts_for(mid), depth)) > budget:
            hi = mid
        else:
            lo = mid
    best = min(
        (counts_for(lo), counts_for(hi)),
        key=lambda c: abs(equal_tokens(per_layer_inputs(visual, layers, c, depth)) - budget),
    )
    return layers, best, f"reference v1.5 list for {shape_key} scaled by {lo:.3f} to hit {budget} equal tokens"


def single_stage_keep(budget: int, visual: int, after_layer: int, depth: int) -> int:
    """Tokens to keep for a one-shot method pruning after `after_layer` (-1 = before the LLM)."""
    before = after_layer + 1
    k = round((budget * depth - before * visual) / (depth - before))
    if k < 1:
        raise ConfigError(
            f"budget {budget} is below what pruning after layer {after_layer} of {depth} can reach "
            f"(at least {min_equal_tokens(visual, after_layer, depth):.1f} equal tokens)"
        )
    return min(k, visual)
