"""Random: a seeded uniform subset of k patches before the LLM (docs/engine.md)."""

from __future__ import annotations

import torch

from ..config import PruneConfig
from ..schedule import single_stage
from .base import ModelGeometry, Plan, PruneMethod, Selection, StageInput, top_k_keep


class RandomSubset(PruneMethod):
    name = "random"
    label = "Random"
    ranks_by = "no ranking"
    # Before the LLM the sequence is shortened, so positions are contiguous (like FasterVLM's official code).
    default_positions = "compact"
    paper_counting = "k patches kept before the LLM: every layer sees k (input and output counting agree)"

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        return Plan.of(single_stage(cfg, geo.grid_tokens, -1, geo.depth, "random"), self.positions(cfg))

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        k = inp.spec.keep
        scores = torch.rand(inp.visual, generator=torch.Generator().manual_seed(cfg.seed)).to(inp.hidden.device)
        return Selection(top_k_keep(scores, k), scores,
                         f"keep {k} of {inp.visual} patches uniformly at random (seed {cfg.seed})")
