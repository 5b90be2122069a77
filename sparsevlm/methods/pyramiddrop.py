"""PyramidDrop as pure tensor functions (docs/engine.md; Cooperx521/PyramidDrop modeling_llama_pdrop.py
L1106-1465).

In the LLM, before each stage layer K (after layer K - 1): the visual tokens are ranked by the attention the
LAST prompt token pays them, computed with layer K's own input_layernorm / q_proj / k_proj / RoPE on the hidden
states entering layer K (head mean, post-softmax in fp32); the top int(V * lambda^i) are kept, positions
compacted. Batch 1.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import FIXED_BUDGETS, REFERENCE_DEPTH, REFERENCE_GRID_TOKENS, PruneConfig, check_accounting, check_budget
from ..schedule import Counts, fit_scale, floor_or_error, make_counts, measure, scaled_layers
from .base import ModelGeometry, Plan, PruneMethod, Selection, StageInput, top_k_keep

FORMULA = "a_j = mean_h softmax(q_last·Kᵀ/√d)[h, j] at layer K;  keep top ⌊V·λ^i⌋ before layers K_i"
NAME = "pyramiddrop"
# The only shipped setting (README L75-76, scripts/v1_5/pdrop_eval): before layers 8/16/24, ratios 0.5/0.25/0.125.
OFFICIAL_LAYERS_32 = (8, 16, 24)
OFFICIAL_RATIOS = (0.5, 0.25, 0.125)
# For budgets 192/128/96/64 nothing is shipped; the author's advice (PyramidDrop#29): stages before 2/8/16, ratios
# lambda, lambda^2, lambda^3, lambda chosen for the average (PyramidDrop#22: mean over layers of processed tokens).
BUDGET_LAYERS_32 = (2, 8, 16)


def last_token_scores(q_last: torch.Tensor, keys: torch.Tensor, visual_start: int, v_cur: int,
                      scaling: float) -> torch.Tensor:
    """a_j = mean over heads of softmax(q_last · Kᵀ * scaling) at visual key j (L1389-1401).

    q_last: (H, hd) RoPE'd query of the last sequence token; keys: (Hkv, n, hd) RoPE'd keys of the whole sequence
    (the last token sees every key, so no mask). Returns (v_cur,) float32.
    """
    h, hd = q_last.shape
    hkv = keys.shape[0]
    q = q_last.float().reshape(hkv, h // hkv, hd)
    logits = torch.einsum("gjd,gnd->gjn", q, keys.float()) * scaling
    attn = torch.softmax(logits, dim=-1).reshape(h, -1)  # fp32 softmax as the reference (L1395-1397)
    return attn[:, visual_start:visual_start + v_cur].mean(dim=0)


def select(scores: torch.Tensor, keep: int) -> Selection:
    """Keep the top `keep` visual tokens in position order (L1405-1407)."""
    return Selection(kept=top_k_keep(scores, keep), scores=scores.float(), extras={"keep": int(keep)})


def stage_counts(visual: int, ratios: tuple[float, ...]) -> list[int]:
    """Visual tokens after each stage: int(V * r_i) (floor, L1306-1307); at least 1, never more than before."""
    out, prev = [], visual
    for r in ratios:
        c = max(1, min(prev, int(visual * r)))
        out.append(c)
        prev = c
    return out


def stage_layers(before_32: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Stage layers as 'after layer' indices: the reference's 'before layer K' of 32 scaled to depth, minus 1."""
    return tuple(k - 1 for k in scaled_layers(before_32, depth) if k >= 1)


def official_plan(visual: int = REFERENCE_GRID_TOKENS, depth: int = REFERENCE_DEPTH) -> Counts:
    """The shipped setting: before layers 8/16/24 keep 1/2, 1/4, 1/8 (mean 270 of 576 at 32 layers)."""
    layers = stage_layers(OFFICIAL_LAYERS_32, depth)
    counts = stage_counts(visual, OFFICIAL_RATIOS[: len(layers)])
    return make_counts(layers, counts, counts, visual, depth, 0, "input",
                       "official setting: layer_list [8,16,24], ratios [0.5,0.25,0.125]")


def plan(budget: int, visual: int = REFERENCE_GRID_TOKENS, depth: int = REFERENCE_DEPTH,
         accounting: str = "paper") -> Counts:
    """PyramidDrop's count policy: stages before layers 2/8/16 of 32 (scaled), ratios lambda^i with lambda solved
    for the budget.

    PyramidDrop's own average (PyramidDrop#22) is the input-counted mean, so both accountings meet the budget in input
    counting. paper: the largest lambda whose mean does not exceed the budget (this reproduces the
    derived 64/128/192 table); never an error (clamped at 1 token per stage). flops: the mean nearest the budget;
    a budget the depth cannot reach is an error.
    """
    check_accounting(accounting)
    check_budget(budget, visual)
    layers = stage_layers(BUDGET_LAYERS_32, depth)
    if not layers:
        floor_or_error(NAME, budget, float(visual), f"{depth} layers leave no stage layer")
    figure = measure("input", visual, layers, depth)
    if accounting == "flops":
        floor_or_error(NAME, budget, figure([1] * len(layers)), f"first stage before layer {layers[0] + 1} of {depth}")

    def family(lam: float) -> list[int]:
        return stage_counts(visual, tuple(lam ** (i + 1) for i in range(len(layers))))

    counts, _ = fit_scale(family, figure, budget, 1.0, "floor" if accounting == "paper" else "closest")
    lam_lo = max((counts[0] / visual), 0.0)
    note = f"before layers {[x + 1 for x in layers]}, ratios lambda^i (lambda ~ {lam_lo:.3f}), counts {counts}"
    if not (depth == REFERENCE_DEPTH and visual == REFERENCE_GRID_TOKENS and budget in FIXED_BUDGETS):
        note += " (scaled)"
    return make_counts(layers, counts, counts, visual, depth, budget, "input", note)


# --- the registered method --------------------------------------------------------------------------------------
class PyramidDrop(PruneMethod):
    """PyramidDrop in the engine: at each stage (after layer K - 1) the last token's attention row of layer K,
    recomputed from layer K's own input_layernorm / q_proj / k_proj / rotary on the hidden states entering K
    (head mean, fp32 softmax as the reference), ranks the visual tokens; the top int(V x lambda^i) are kept and
    positions compacted to 0..N-1; each layer decodes from its own cache length, which equals the reference's
    per-stage shift L + t - dropped (modelling L1259-1268).

    Deviation: the stage layers / ratios for a budget are the author's advice (PyramidDrop#29: before layers 2/8/16 of
    32, ratios lambda^i, lambda solved for the mean), not a shipped setting; the only shipped one is
    [8,16,24] x [0.5,0.25,0.125] (mean 270), which no budget of 192 or below can use.
    """

    name = NAME
    label = "PyramidDrop"
    ranks_by = "last-instruction attention"
    default_positions = "compact"  # pdrop_rank_drop renumbers position ids at every drop
    paper_counting = "PyramidDrop's average tokens: the mean over layers of the visual tokens each layer processes"

    def reads_attention_at(self, geo: ModelGeometry) -> tuple[int, ...]:
        return tuple(layer + 1 for layer in stage_layers(BUDGET_LAYERS_32, geo.depth))  # each stage ranks in layer K

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        counts = plan(cfg.budget, geo.grid_tokens, geo.depth, cfg.accounting)
        note = (f"{counts.note}; stage layers and lambda^i ratios follow the author's advice for small budgets "
                "(PyramidDrop#29), not a shipped setting (shipped: before 8/16/24 keep 1/2, 1/4, 1/8 = mean 270)")
        return Plan.of(counts, self.positions(cfg), note)

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        n = inp.hidden.shape[0]
        last = torch.tensor([n - 1], device=inp.hidden.device)
        scores = inp.next_attention_rows(last)[0, inp.prefix : inp.text_start]
        k = min(inp.spec.keep, inp.visual)
        sel = select(scores, k)
        rank_layer = inp.spec.after_layer + 1
        formula = (f"{FORMULA} | before layer {rank_layer}: keep {k} of {inp.visual} by the last token's "
                   f"(index {n - 1}) attention in layer {rank_layer}")
        extras = {"rank_layer": rank_layer, "query_index": n - 1, "v_cur": inp.visual, "keep": k,
                  "formula": FORMULA}
        return replace(sel, formula=formula, rows=1, extras=extras)
