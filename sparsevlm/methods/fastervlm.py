"""FasterVLM (Zhang et al., 2024): rank patches by the vision tower's [CLS] attention, keep the top k before the LLM.

On LLaVA-NeXT the official code selects per crop: each view (the base view and every tile) ranks its own patches
by its own [CLS], and keeps its share of k (here k split evenly over the views the picture has: a reading, since
the official code fixes the count per crop); its newline tokens are not kept (the official code runs LLaVA-NeXT
without them).
"""

from __future__ import annotations

from ..config import PruneConfig
from ..errors import ConfigError
from ..schedule import single_stage
from .base import (
    ModelGeometry,
    Plan,
    PruneMethod,
    Selection,
    StageInput,
    per_view_cls_scores,
    per_view_top_k,
    top_k_keep,
)


class FasterVLM(PruneMethod):
    name = "fastervlm"
    label = "FasterVLM"
    ranks_by = "[CLS] attention"
    captures = frozenset({"vision"})
    # The official code hands the LLM a shorter image block: contiguous positions.
    default_positions = "compact"
    paper_counting = "k patches kept before the LLM: every layer sees k (input and output counting agree)"
    needs_cls = True

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        if not geo.has_cls:
            raise ConfigError(
                "FasterVLM ranks patches by the vision tower's [CLS] attention, and this vision tower "
                "(no [CLS] token, e.g. SigLIP) has none: choose another method"
            )
        return Plan.of(single_stage(cfg, geo.grid_tokens, -1, geo.depth, "FasterVLM"), self.positions(cfg))

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        k = inp.spec.keep
        if inp.layout is not None and not inp.layout.single:
            scores = per_view_cls_scores(inp)
            kept, counts = per_view_top_k(scores, inp.layout, k)
            per = ", ".join(f"{v.name} {n}" for v, n in zip(inp.layout.views, counts, strict=True))
            return Selection(kept, scores, f"keep top {k} of {inp.visual} tokens, per view by that view's [CLS] "
                             f"attention ({per}); newline tokens dropped (budget {cfg.budget})",
                             extras={"per_view": counts})
        scores = inp.vision.cls_attention()
        return Selection(top_k_keep(scores, k), scores,
                         f"keep top {k} of {inp.visual} patches by [CLS] attention (budget {cfg.budget})")
