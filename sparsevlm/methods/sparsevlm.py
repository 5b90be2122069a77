"""SparseVLM v1.5 as the reference runs it (docs/engine.md): text raters, rater-row significance after
layers 2 / 6 / 15 (of 32, scaled), directly kept counts from the reference lists, recycled clusters on top,
compact positions."""

from __future__ import annotations

import torch

from .. import algorithm as A
from .. import schedule
from ..config import PruneConfig
from .base import (
    MergedGroup,
    ModelGeometry,
    Plan,
    PrefillInput,
    PruneMethod,
    Raters,
    Selection,
    StageInput,
    StageSpec,
    text_raters,
)


class SparseVLM(PruneMethod):
    name = "sparsevlm"
    label = "SparseVLM"
    ranks_by = "text-guided"
    captures = frozenset({"attention"})
    default_positions = "compact"  # v1 / v1.5 renumber the survivors 0..N-1
    paper_counting = ("reference v1.5 lists as directly kept counts, recycled clusters on top; each pruning layer "
                      "counted at its output")

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        if cfg.count_mode == "fixed":
            counts = schedule.sparsevlm_fixed(cfg, geo.grid_tokens, geo.depth)
            stages = tuple(StageSpec(layer, d) for layer, d in zip(counts.layers, counts.direct))
            return Plan(stages, self.positions(cfg), counts=counts, note=counts.note)
        layers = schedule.sparsevlm_layers(cfg, geo.depth)
        return Plan(tuple(StageSpec(layer, None) for layer in layers), self.positions(cfg),
                    note=f"adaptive count ({cfg.count_mode}): the kept count follows rank(P); no budget")

    def prepare(self, cfg: PruneConfig, inp: PrefillInput) -> Raters:
        raters = text_raters(inp, cfg.rater_rule)
        inp.memo["raters"] = raters.indices
        return raters

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        v, layer = inp.visual, inp.spec.after_layer
        rows = inp.memo["raters"].to(inp.hidden.device) + inp.text_start
        p = inp.attention_rows(rows)[:, inp.prefix : inp.text_start]
        scores = A.visual_significance(p)
        rank = A.attention_rank(p)
        # each rater's own attention row over the entering visual tokens (4 decimals): the app's per-word view
        rows_seen = {"rater_tokens": (rows - inp.text_start).tolist(),
                     "rater_attention": (p.float() * 1e4).round() / 1e4}
        if cfg.count_mode == "fixed":
            direct = min(inp.spec.keep, v)
            formula = f"fixed budget {cfg.budget}: keep {direct} of {v} directly"
            if cfg.recycle:
                formula += f" + {A.recycle_sizes(v - direct, cfg.tau, cfg.theta)[1]} recycled clusters"
        elif cfg.count_mode == "paper":
            deleted = A.paper_deleted_count(v, rank, cfg.lam)
            direct = v - deleted
            formula = f"N = floor(lambda x (Lv - rank(P))) = floor({cfg.lam:g} x ({v} - {rank})) = {deleted} deleted"
        else:
            direct = A.code_kept_count(v, rank, cfg.scale, cfg.bias)
            formula = (f"kept = min(int(rank(P) x scale + bias), Lv - 1) = min(int({rank} x {cfg.scale:g} + "
                       f"{cfg.bias:g}), {v - 1}) = {direct}")
        if direct >= v:  # nothing to delete: the layer is skipped (paper: N = 0)
            return Selection(torch.arange(v), scores, formula + " (skipped)", rank=rank, rows=len(rows),
                             extras=rows_seen)
        order = torch.argsort(scores, descending=True)
        keep = order[:direct].sort().values
        deleted = order[direct:]  # by descending score
        merged: list[MergedGroup] = []
        if cfg.recycle and len(deleted):
            n_rec, n_clu = A.recycle_sizes(len(deleted), cfg.tau, cfg.theta)
            rec = deleted[:n_rec]
            x = inp.hidden[inp.prefix + rec]
            gen = torch.Generator().manual_seed(cfg.seed + layer)
            ctr, labels = A.density_peak_clusters(x, n_clu, cfg.assign, gen)
            emb = A.merge_clusters(x, labels, len(ctr), cfg.merge)
            merged = [MergedGroup(int(rec[c]), rec[labels == j].tolist(), emb[j]) for j, c in enumerate(ctr.tolist())]
        return Selection(keep, scores, formula, merged, rank=rank, rows=len(rows), extras=rows_seen)
