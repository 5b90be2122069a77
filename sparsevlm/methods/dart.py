"""DART as pure tensor functions (docs/engine.md; ZichenWen1/DART modeling_llama_self.py L331-449 at
5a19452).

In the LLM, before layer K = 2 (after layer 1): pivots are the 4 image and 4 text tokens whose post-RoPE keys of
layer K-1 have the largest L1 norm; each pivot in turn claims the image tokens LEAST cosine-similar to it
(duplicates of a pivot are what gets dropped), on the final-norm'd hidden states entering layer K. Kept = image
pivots + claimed tokens; original position ids. Batch 1.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import REFERENCE_DEPTH, REFERENCE_GRID_TOKENS, PruneConfig, check_accounting, check_budget
from ..schedule import Counts, floor_or_error, make_counts, measure, scaled_layers, single_stage_keep
from .base import ModelGeometry, Plan, PruneMethod, Selection, StageInput

FORMULA = (
    "pivots = top-4 image + top-4 text by ‖k_j‖₁ (layer K-1); each pivot p keeps the image tokens with the "
    "lowest cos(h_p, h_j), h = norm(h_in,K); kept = image pivots ∪ picks"
)
NAME = "dart"
PRUNED_LAYER_32 = 2  # --pruned_layer 2: acts before layer 2, i.e. after layer 1
PIVOT_IMAGE = 4
PIVOT_TEXT = 4


def key_norms(keys: torch.Tensor) -> torch.Tensor:
    """||k_j||_1 over the heads-concatenated post-RoPE keys of layer K-1 (L419, L424-425).

    keys: (H_kv, n, hd). Returns (n,) float32.
    """
    return keys.float().abs().sum(dim=(0, 2))


def token_topk(max_num_trunction: int, n_pivots: int = PIVOT_IMAGE + PIVOT_TEXT) -> int:
    """TOKEN_TOPK = ceil(MAX_NUM_TRUNCTION // n_pivots) (L409): the ceil of a floor division is the floor."""
    return max_num_trunction // n_pivots


def select(norms: torch.Tensor, hidden: torch.Tensor, visual_start: int, v_cur: int, picks: int,
           pivot_image: int = PIVOT_IMAGE, pivot_text: int = PIVOT_TEXT) -> Selection:
    """Pivots and duplicate-aware selection.

    norms: (n,) key L1 norms of the whole sequence; hidden: (n, D) the final-RMSNorm'd hidden states entering
    layer K; the image occupies [visual_start, visual_start + v_cur) and text pivots come from every token after
    it. picks: tokens claimed by all pivots together (published: 8 * TOKEN_TOPK), spread evenly over the pivots
    in iteration order (the official code has each pivot take exactly TOKEN_TOPK; equal when 8 divides picks).
    Returns kept (local, sorted), scores = key norms over the image, groups = (pivot, claimed tokens) for image
    pivots, extras: image_pivots, text_pivots (absolute), order (pivot iteration order), claims (every pivot,
    absolute -> local claimed tokens), claim_cosines.
    """
    s, end = visual_start, visual_start + v_cur
    n_img = max(0, min(pivot_image, v_cur))
    n_txt = max(0, min(pivot_text, norms.shape[0] - end))
    image_pivots = (torch.topk(norms[s:end].float(), n_img).indices + s).tolist()
    text_pivots = (torch.topk(norms[end:].float(), n_txt).indices + end).tolist()
    # CPython set order of the absolute indices decides which pivot claims first (L429, L434); kept as the code.
    order = list(set(image_pivots + text_pivots))
    valid = set(range(s, end)) - set(image_pivots)
    valid_list = list(valid)
    base, extra = divmod(max(0, picks), max(1, len(order)))
    claims: dict[int, list[int]] = {}
    cosines: dict[int, list[float]] = {}
    kept = set(image_pivots)
    for i, p in enumerate(order):
        want = min(base + (1 if i < extra else 0), len(valid_list))
        if want <= 0 or not valid_list:
            claims[p], cosines[p] = [], []
            continue
        cos = torch.nn.functional.cosine_similarity(hidden[p].float()[None], hidden[valid_list].float(), dim=-1)
        top = torch.topk(-cos, want).indices.tolist()  # L435-439: the LEAST similar tokens are kept
        real = [valid_list[t] for t in top]
        claims[p] = [r - s for r in real]
        cosines[p] = [float(cos[t]) for t in top]
        kept.update(real)
        valid.difference_update(real)
        valid_list = list(valid)
    local = torch.tensor(sorted(k - s for k in kept), dtype=torch.long)
    return Selection(
        kept=local,
        scores=norms[s:end].float(),
        groups=[(p - s, claims[p]) for p in order if p in image_pivots],
        extras={"image_pivots": image_pivots, "text_pivots": text_pivots, "order": order, "claims": claims,
                "claim_cosines": cosines},
    )


def prune_after(depth: int) -> int:
    """The layer whose output is cut: K - 1 with K = 2 of 32 scaled to depth (K >= 1)."""
    k = scaled_layers((PRUNED_LAYER_32,), depth)
    return max(1, k[0]) - 1 if k else 0


def plan(budget: int, visual: int = REFERENCE_GRID_TOKENS, depth: int = REFERENCE_DEPTH,
         accounting: str = "paper") -> Counts:
    """DART's count policy: one stage before layer K (2 of 32, scaled).

    paper: MAX_NUM_TRUNCTION = budget as the scripts pass it: kept = 4 image pivots + 8 * (budget // 8), i.e.
    budget + 4 for budgets divisible by 8; the budget counts the tokens kept for layers >= K without the pivots
    ("retained" counting), any depth or grid. flops: kept so the input-counted equal tokens hit the budget
    (pivots included), an error if the depth cannot reach it.
    """
    check_accounting(accounting)
    check_budget(budget, visual)
    after = prune_after(depth)
    n_img = min(PIVOT_IMAGE, visual)
    if accounting == "paper":
        picks = (PIVOT_IMAGE + PIVOT_TEXT) * token_topk(budget)
        kept = min(visual, n_img + picks)
        note = f"4 image pivots + 8 x {token_topk(budget)} picks = {kept} (MAX_NUM_TRUNCTION {budget})"
        # the budget counts the claimed tokens: the image pivots are kept on top of it
        return make_counts((after,), (kept,), (kept,), visual, depth, budget, "retained", note, kept_extra=n_img)
    reachable = measure("input", visual, (after,), depth)([1])
    floor_or_error(NAME, budget, reachable, f"pruning before layer {after + 1}")
    kept = single_stage_keep(budget, visual, after, depth)
    picks = max(0, kept - n_img)
    note = f"{kept} kept ({n_img} image pivots + {picks} picks) for {budget} input-counted equal tokens"
    return make_counts((after,), (kept,), (kept,), visual, depth, budget, "input", note)


# --- the registered method --------------------------------------------------------------------------------------
class DART(PruneMethod):
    """DART in the engine: after layer K - 1 (K = 2 of 32, scaled), layer K-1's post-RoPE keys (recomputed from its
    captured k_proj output and rotary, exactly what its attention used) pick the pivots by L1 norm; the hidden
    states entering layer K through the decoder's final norm give the cosines; original position ids kept.

    Faithful: pivot counts, TOKEN_TOPK = MAX_NUM_TRUNCTION // 8 per pivot, greedy claims in CPython set order of the
    absolute indices (the same order only with the same prompt layout, s = 35 in the official vicuna prompt).
    Deviations: with GQA the keys are the kv heads' (the reference model has no GQA); in flops accounting the
    picks are spread evenly over the pivots (the reference gives each exactly TOKEN_TOPK).
    """

    name = NAME
    label = "DART"
    ranks_by = "duplication"
    captures = frozenset({"attention"})
    default_positions = "keep"  # position_ids = keep_indexs (L359)
    paper_counting = ("MAX_NUM_TRUNCTION = budget: 4 image pivots + 8 x (budget // 8) claimed tokens kept after "
                      "layer K - 1; the budget counts the claimed tokens (retained = kept - 4 pivots)")

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        return Plan.of(plan(cfg.budget, geo.grid_tokens, geo.depth, cfg.accounting), self.positions(cfg))

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        norms = key_norms(inp.keys())
        hidden = inp.final_norm(inp.hidden[None])[0]
        n_img = min(PIVOT_IMAGE, inp.visual)
        picks = max(0, inp.spec.keep - n_img)
        sel = select(norms, hidden, inp.prefix, inp.visual, picks)
        ex, s, end = sel.extras, inp.prefix, inp.text_start
        patches = inp.patches
        pivots = []
        for p in ex["order"]:  # the iteration order decides which pivot claims first
            image = p < end
            pivots.append({"kind": "image" if image else "text", "position": p,
                           "patch": patches[p - s] if image else None, "text_index": None if image else p - end,
                           "claimed": [patches[j] for j in ex["claims"][p]], "cosines": ex["claim_cosines"][p]})
        k_layer = inp.spec.after_layer + 1
        formula = (f"{FORMULA} | before layer {k_layer}: {n_img} image + {len(ex['text_pivots'])} text pivots claim "
                   f"{picks} tokens; keep {len(sel.kept)} of {inp.visual}")
        extras = {"pivots": pivots, "image_pivots": [patches[p - s] for p in ex["image_pivots"]],
                  "text_pivots": [p - end for p in ex["text_pivots"]], "formula": FORMULA}
        return replace(sel, formula=formula, rows=0, extras=extras)
