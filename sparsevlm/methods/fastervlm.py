"""FasterVLM (Zhang et al., 2024): rank patches by the vision tower's [CLS] attention, keep the top k before the LLM."""

from __future__ import annotations

from ..config import PruneConfig
from ..errors import ConfigError
from ..schedule import single_stage
from .base import ModelGeometry, Plan, PruneMethod, Selection, StageInput, top_k_keep


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
        scores = inp.vision.cls_attention()
        return Selection(top_k_keep(scores, k), scores,
                         f"keep top {k} of {inp.visual} patches by [CLS] attention (budget {cfg.budget})")
