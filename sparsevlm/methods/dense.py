"""Dense: no pruning (the reference every method is compared with)."""

from __future__ import annotations

from ..config import PruneConfig
from .base import ModelGeometry, Plan, PruneMethod, Selection, StageInput


class Dense(PruneMethod):
    name = "dense"
    label = "Dense (no pruning)"
    paper_counting = "every layer sees every visual token"

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        return Plan(positions=self.positions(cfg))

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        raise AssertionError("dense has no stages")
