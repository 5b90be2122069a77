"""DivPrune as pure tensor functions (docs/engine.md; vbdi/divprune llava_arch.py L146-171, L365-386).

Before the LLM, on the projector outputs of the image block: keep the n tokens chosen greedily by max-min
cosine distance (farthest-point selection), starting from the token whose nearest neighbour is farthest.
Batch 1.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import REFERENCE_DEPTH, REFERENCE_GRID_TOKENS, PruneConfig, check_accounting, check_budget
from ..schedule import Counts, make_counts
from .base import ModelGeometry, Plan, PruneMethod, Selection, StageInput

FORMULA = "S₀ = argmax_j min_{u≠j} d(u,j);  S_i = argmax_j min_{u∈S} d(u,j),  d = 1 − cos(x_u, x_j)"
NAME = "divprune"
DEFAULT_RATIO = 0.098  # run_Divprune.sh L11: SUBSET_RATIO, 56 of 576 tokens


def count_for_ratio(ratio: float, visual: int = REFERENCE_GRID_TOKENS) -> int:
    """n = int(round(SUBSET_RATIO * V)) (L153); the official 0.098 keeps 56 of 576."""
    return max(1, int(round(ratio * visual)))


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """D = 1 - X̂ X̂ᵀ (L147-150, L155). x: (n, d). Returns (n, n) float32."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    return 1.0 - xn @ xn.T


def select(x: torch.Tensor, n: int) -> Selection:
    """Greedy max-min selection of n of the rows of x (n, d) (projector outputs).

    Returns kept (sorted), scores = each token's initial nearest-neighbour distance d_j, extras: order (the
    selection order), gap (the max-min distance at each pick; decreasing after the first).
    """
    count = x.shape[0]
    n = max(1, min(n, count))
    dist = cosine_distance(x)
    # L165: 2nd-smallest value of each column (the smallest is the token's distance to itself)
    nearest = torch.topk(dist, min(2, count), dim=0, largest=False).values[-1]
    order = [int(torch.argmax(nearest))]  # ties -> first index, as torch.argmax
    gaps = [float(nearest[order[0]])]
    min_dist = dist[order[0]].clone()
    taken = torch.zeros(count, dtype=torch.bool, device=min_dist.device)
    taken[order[0]] = True
    for _ in range(1, n):
        # The reference relies on a picked token's distance to itself being ~0; masking only differs when more
        # tokens are asked for than there are distinct ones (the reference would pick an index twice).
        j = int(torch.argmax(min_dist.masked_fill(taken, float("-inf"))))
        order.append(j)
        gaps.append(float(min_dist[j]))
        taken[j] = True
        min_dist = torch.minimum(min_dist, dist[j])
    return Selection(
        kept=torch.tensor(sorted(order), dtype=torch.long),  # L379: re-sorted into raster order
        scores=nearest,
        extras={"order": order, "gap": gaps},
    )


def plan(budget: int, visual: int = REFERENCE_GRID_TOKENS, depth: int = REFERENCE_DEPTH,
         accounting: str = "paper") -> Counts:
    """DivPrune's count policy. Before the LLM: n = round(SUBSET_RATIO * V) with SUBSET_RATIO = budget / V, i.e.
    n = budget; both countings equal n (every decoder layer sees n tokens)."""
    check_accounting(accounting)
    check_budget(budget, visual)
    n = count_for_ratio(budget / visual, visual)
    return make_counts((-1,), (n,), (n,), visual, depth, budget, "input",
                       f"SUBSET_RATIO = {budget}/{visual} -> {n} tokens")


# --- the registered method --------------------------------------------------------------------------------------
class DivPrune(PruneMethod):
    """DivPrune in the engine, before the LLM (LAYER_INDEX=0): greedy max-min cosine selection on the projector
    outputs of the image block, kept in raster order, contiguous positions (the official sequence is shortened
    and position_ids stay None). Exact up to the reference's fp16 (here the model's dtype, distances in fp32)."""

    name = NAME
    label = "DivPrune"
    ranks_by = "diversity"
    default_positions = "compact"
    paper_counting = "n = round(SUBSET_RATIO x 576) tokens kept before the LLM: every layer sees n"

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        return Plan.of(plan(cfg.budget, geo.grid_tokens, geo.depth, cfg.accounting), self.positions(cfg))

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        x = inp.hidden[inp.prefix : inp.text_start]  # the projector outputs of the image block
        sel = select(x, inp.spec.keep)
        patches = inp.patches
        order = [patches[j] for j in sel.extras["order"]]
        formula = (f"{FORMULA} | keep {len(sel.kept)} of {inp.visual} (SUBSET_RATIO {inp.spec.keep}/{inp.visual}); "
                   f"score = nearest-neighbour distance d_j")
        extras = {"order": order, "gap": sel.extras["gap"], "formula": FORMULA}
        return replace(sel, formula=formula, extras=extras)
