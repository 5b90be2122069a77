"""FasterVLM's two measurements of where attention over the visual tokens goes (FasterVLM, sections 3.2-3.3):

- **attention shift**: the share of the attention on the lower half of the picture (0.5 = no shift; LLaVA-1.5's
  text-to-image attention grows with the token index, so it leans to the lower half);
- **attention dispersion**: the share held by the top 20% of the visual tokens (LLaVA-1.5-7B: about 0.8 for the
  vision tower's [CLS], about 0.6 for the last token's attention in the decoder).

Pure functions over one attention vector and the patches it covers; the engine records them for every run
(`PruneTrace.attention_profile`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# FasterVLM's published figures for LLaVA-1.5-7B (Figures 3-4 and 7-8), for the page to show beside a run's.
PUBLISHED = {
    "model": "LLaVA-1.5-7B",
    "cls_top20_share": 0.80,
    "last_top20_share": 0.60,  # "over 60%"
    "shift": "text-to-image attention grows with the token index: most of it lies on the lower half",
    "source": "FasterVLM ([CLS] Attention is All You Need for Training-Free Visual Token Pruning, Zhang et al.), "
              "sections 3.2-3.3, Figures 3-4",
}


def _row_weight(r: int, rows: int) -> float:
    if rows % 2 == 1 and r == rows // 2:
        return 0.5
    return 1.0 if 2 * r >= rows else 0.0


def lower_share(attention: Sequence[float], patches: Sequence[int], rows: int = 0, cols: int = 0,
                lower: Sequence[float] | None = None) -> float:
    """Share of the mass on the lower half of the grid (rows >= rows / 2; the middle row of an odd grid half), or
    with `lower`, each token's weight on the picture's lower half (`layout.VisualLayout.lower_weights`)."""
    total = float(sum(attention))
    if total <= 0:
        return 0.0
    if lower is not None:
        return sum(a * lower[p] for a, p in zip(attention, patches, strict=True)) / total
    return sum(a * _row_weight(p // cols, rows) for a, p in zip(attention, patches, strict=True)) / total


def top_share(attention: Sequence[float], fraction: float = 0.2) -> float:
    """Share of the mass held by the top `fraction` of the tokens (ceil(fraction x count) of them)."""
    values = sorted((float(a) for a in attention), reverse=True)
    total = sum(values)
    if not values or total <= 0:
        return 0.0
    return sum(values[: max(1, math.ceil(fraction * len(values)))]) / total


def entry(attention: Sequence[float], patches: Sequence[int], total_patches: int, rows: int = 0, cols: int = 0,
          lower: Sequence[float] | None = None) -> dict:
    """One profile entry: the attention in original patch order (None where a patch has no token at this layer; a
    merged token counts at its centre patch), normalised over the visual tokens present, and its two statistics.
    `unplaced` is the share on tokens that sit at no patch (VisionZip's [CLS] token); the statistics count them
    among the tokens, and the lower half only holds what sits at a patch."""
    mass = float(sum(attention))
    norm = [float(a) / mass if mass > 0 else 0.0 for a in attention]
    full: list[float | None] = [None] * total_patches
    unplaced = 0.0
    for a, p in zip(norm, patches, strict=True):
        if 0 <= p < total_patches:
            full[p] = (full[p] or 0.0) + a
        else:
            unplaced += a
    full = [None if a is None else round(a, 7) for a in full]
    placed = [(a, p) for a, p in zip(norm, patches, strict=True) if 0 <= p < total_patches]
    lower = lower_share([a for a, _ in placed], [p for _, p in placed], rows, cols, lower) * (1.0 - unplaced)
    return {"attention": full, "lower_half_share": lower, "top20_share": top_share(norm), "tokens": len(patches),
            "unplaced": round(unplaced, 7)}
