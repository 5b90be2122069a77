"""SparseVLM v1.5 as the reference runs it (docs/engine.md): text raters, rater-row significance after
layers 2 / 6 / 15 (of 32, scaled), directly kept counts from the reference lists, recycled clusters on top,
compact positions."""

from __future__ import annotations

import torch

from .. import algorithm as A
from ..config import (
    REFERENCE_DEPTH,
    REFERENCE_FIXED_COUNTS,
    REFERENCE_GRID_TOKENS,
    REFERENCE_PRUNE_LAYERS_32,
    PruneConfig,
)
from ..errors import ConfigError
from ..options import Option
from ..schedule import BUDGET_TOLERANCE, Counts, figures, fit_scale, make_counts, scaled_layers
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


# --- the count policy: where SparseVLM prunes and how many it keeps -----------------------------------------
def sparsevlm_layers(cfg: PruneConfig, depth: int) -> tuple[int, ...]:
    """The layers whose outputs SparseVLM prunes: `cfg.prune_layers`, else 2 / 6 / 15 of 32 scaled to depth."""
    layers = cfg.prune_layers if cfg.prune_layers is not None else scaled_layers(REFERENCE_PRUNE_LAYERS_32, depth)
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= depth - 1:
        raise ConfigError(f"pruning layers {list(layers)} must increase and lie in 0..{depth - 2}")
    return tuple(layers)


def totals_with_clusters(visual: int, direct: list[int], recycle: bool, tau: float, theta: float) -> list[int]:
    """Visual tokens after each stage: the directly kept ones plus the clusters recycled from the deleted ones."""
    out, cur = [], visual
    for d in direct:
        d = min(d, cur)
        clusters = A.recycle_sizes(cur - d, tau, theta)[1] if recycle else 0
        cur = d + clusters
        out.append(cur)
    return out


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
        return make_counts(layers, direct, totals(direct), visual, depth, budget, "output",
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
        return make_counts(layers, smallest, totals(smallest), visual, depth, budget, counting,
                           f"paper accounting: budget {budget} is below what pruning after layer {layers[0]} of "
                           f"{depth} can reach; ran the smallest schedule (1 token kept directly per stage, "
                           f"{figure(smallest):.1f} equal tokens counted at each pruning layer's output)")
    best, lo = fit_scale(direct_for, figure, budget, visual / max(min(shape), 1e-9) + 1.0, "closest", iterations=60)
    which = "each pruning layer's output (the reference's counting)" if counting == "output" else \
        "each layer's input (equal prefill cost)"
    return make_counts(layers, best, totals(best), visual, depth, budget, counting,
                       f"{cfg.accounting} accounting: reference v1.5 list for {shape_key} scaled by {lo:.3f} so equal "
                       f"tokens counted at {which} hit {budget}; {best} kept directly, recycled clusters on top")


# --- the registered method --------------------------------------------------------------------------------------
class SparseVLM(PruneMethod):
    name = "sparsevlm"
    label = "SparseVLM"
    ranks_by = "text-guided"
    captures = frozenset({"attention"})
    default_positions = "compact"  # v1 / v1.5 renumber the survivors 0..N-1
    paper_counting = ("reference v1.5 lists as directly kept counts, recycled clusters on top; each pruning layer "
                      "counted at its output")
    options = (
        Option("count_mode", "fixed", "how many tokens each pruning layer drops: fixed (the reference lists for the "
               "budget), paper (eq. 8, lambda), code (the reference's rank(P) x scale + bias)", kind="choice",
               choices=("fixed", "paper", "code"), label="How many tokens to drop", param="count_mode",
               aliases=("--mode",),
               choice_labels=("Fixed budget (equal tokens)", "Adaptive - paper eq. 8 (λ)",
                              "Adaptive - reference code (scale, bias)")),
        Option("lam", 1.0, "lambda of paper eq. 8: deleted = floor(lambda x (tokens - rank(P))) (count_mode paper)",
               low=0.0, label="λ (paper eq. 8)", param="lam"),
        Option("scale", 13.5, "kept = rank(P) x scale + bias (count_mode code; 13.5 is the reference's MME setting)",
               label="scale (reference code)", param="scale"),
        Option("bias", 0.0, "the bias of kept = rank(P) x scale + bias (count_mode code)", label="bias",
               param="bias"),
        Option("recycle", True, "recycle deleted tokens: cluster the top tau of them and merge each cluster",
               kind="bool", label="Recycle deleted tokens (cluster + merge)", param="recycle"),
        Option("prune_layers", None, "decoder layers whose outputs are pruned (default: 2, 6, 15 of 32, scaled)",
               kind="layers", optional=True, ui=False),
        Option("tau", 0.3, "share of the deleted tokens recycled into clusters", low=0.0, high=1.0, low_open=True,
               ui=False),
        Option("theta", 0.1, "clusters per recycled token", low=0.0, high=1.0, low_open=True, ui=False),
        Option("merge", "mean", "how a cluster merges: mean (reference code) or sum (paper eq. 11)", kind="choice",
               choices=("mean", "sum"), ui=False),
        Option("assign", "euclidean", "cluster assignment: euclidean (reference code) or cosine (paper)",
               kind="choice", choices=("euclidean", "cosine"), ui=False),
        Option("rater_rule", "gt", "raters: R > mean(R) (gt, reference code) or R >= mean(R) (ge, paper)",
               kind="choice", choices=("gt", "ge"), ui=False),
    )

    def reads_attention_at(self, geo: ModelGeometry) -> tuple[int, ...]:
        return sparsevlm_layers(PruneConfig(method=self.name), geo.depth)

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        if cfg.count_mode == "fixed":
            return Plan.of(sparsevlm_fixed(cfg, geo.grid_tokens, geo.depth), self.positions(cfg))
        layers = sparsevlm_layers(cfg, geo.depth)
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
