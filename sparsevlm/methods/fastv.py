"""FastV (ECCV 2024): layers 0..K-1 run in full; the last token's head-mean attention row in layer K-1 ranks the
visual tokens; layers K.. see only the top k (docs/engine.md; reference `if layer_idx == FASTV_k - 1`)."""

from __future__ import annotations

import torch

from .. import algorithm as A
from ..config import REFERENCE_DEPTH, REFERENCE_FASTV_K, PruneConfig
from ..errors import ConfigError
from ..options import Option
from ..schedule import single_stage
from .base import ModelGeometry, Plan, PruneMethod, Selection, StageInput, top_k_keep


def fastv_k(cfg: PruneConfig, depth: int) -> int:
    """FastV's K (layers 0..K-1 run in full; ranked in layer K-1, pruned after it). Default 2 of 32, scaled."""
    k = cfg.fastv_k if cfg.fastv_k is not None else max(1, int(REFERENCE_FASTV_K * depth / REFERENCE_DEPTH + 0.5))
    if not 1 <= k < depth:
        raise ConfigError(f"FastV K = {k} must lie in 1..{depth - 1} (K layers run on the full sequence)")
    return k


class FastV(PruneMethod):
    name = "fastv"
    label = "FastV"
    ranks_by = "last-token attention"
    captures = frozenset({"attention"})
    default_positions = "keep"  # FastV keeps the original position ids
    paper_counting = "FastV's own: the budget is the number of visual tokens kept after layer K-1"
    options = (Option("fastv_k", None, "FastV's K: layers 0..K-1 run on the full sequence, ranked in layer K-1 "
                      "(default 2 of 32, scaled to depth)", kind="int", low=1, optional=True, ui=False),)

    def reads_attention_at(self, geo: ModelGeometry) -> tuple[int, ...]:
        return (fastv_k(PruneConfig(method=self.name), geo.depth) - 1,)

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        after = fastv_k(cfg, geo.depth) - 1
        counts = single_stage(cfg, geo.grid_tokens, after, geo.depth, "FastV")
        return Plan.of(counts, self.positions(cfg))

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        n = inp.hidden.shape[0]
        last = torch.tensor([n - 1], device=inp.hidden.device)
        p = inp.attention_rows(last)[:, inp.prefix : inp.text_start]
        scores = A.visual_significance(p)
        k = min(inp.spec.keep, inp.visual)
        layer = inp.spec.after_layer
        return Selection(top_k_keep(scores, k), scores,
                         f"FastV K = {layer + 1}: keep top {k} of {inp.visual} by the last token's attention in "
                         f"layer {layer}", rank=A.attention_rank(p), rows=1)
