"""SparseVLM v2.0 ("SparseVLM+", reference `USE_VERSION=2_0`) as pure tensor functions (docs/engine.md).

Raters as in v1 (algorithm.text_relevance / select_raters). At each pruning layer: rater->visual attention
probabilities divided by a RoPE-only prior (gravity correction), averaged over the priority heads, top-k kept.
No recycling, original position ids kept. Batch 1, shapes without the batch dimension.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..algorithm import select_raters, text_relevance
from ..config import (
    FIXED_BUDGETS,
    REFERENCE_DEPTH,
    REFERENCE_GRID_TOKENS,
    PruneConfig,
    check_accounting,
    check_budget,
)
from ..schedule import Counts, fit_scale, floor_or_error, make_counts, measure, scaled_layers
from .base import ModelGeometry, Plan, PrefillInput, PruneMethod, Raters, Selection, StageInput, text_raters, top_k_keep

FORMULA = (
    "a_j = mean_{h in top-14 heads} mean_{r in raters} A[h,r,j] / G[r,j],  G = RoPE(1)·RoPE(1)ᵀ/√d; "
    "keep top-k after layers 2/6/15"
)
NAME = "sparsevlm-v2"
PRUNE_LAYERS_32 = (2, 6, 15)  # pruning_loc default, modelling_sparse_llama.py L70: these layers' OUTPUTS are cut
# score.py L9-21, V2.0 lists: visual tokens kept after layers 2, 6, 15 (no recycled tokens on top in v2).
COUNTS_32 = {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}
PRIORITY_HEADS_32 = 14  # score.py L48-55: topk(14) for LLaVA's 32 heads
REFERENCE_HEADS = 32


# --- scoring -------------------------------------------------------------------------------------------------
def raters(hv: torch.Tensor, ht: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text raters from the LLM input embeddings (modelling L198-204, as v1): (offsets T into ht, m over text).

    hv: (V, D) projector outputs; ht: (n_t, D) embeddings of every token after the image. T is fixed for all
    pruning layers; at a layer the rater rows are t0 + T with t0 = the current text start.
    """
    m = text_relevance(hv, ht)
    return select_raters(m, "gt"), m


def attention_rows_per_head(
    q_rows: torch.Tensor, keys: torch.Tensor, row_index: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Post-softmax causal attention of a few query rows, per head (v2 selects heads, so no head mean).

    q_rows: (H, r, hd) RoPE'd queries; keys: (Hkv, n, hd) RoPE'd keys; row_index: (r,) sequence index of each row.
    Returns (H, r, n) float32. The reference softmaxes in fp16; float32 here (differences are rounding only).
    """
    h, r, hd = q_rows.shape
    hkv, n = keys.shape[0], keys.shape[1]
    q = q_rows.float().reshape(hkv, h // hkv, r, hd)
    scores = torch.einsum("gjrd,gnd->gjrn", q, keys.float()) * scaling
    future = torch.arange(n, device=keys.device)[None, :] > row_index.to(keys.device)[:, None]
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(h, r, n)


def gravity_prior(
    row_positions: torch.Tensor,
    col_positions: torch.Tensor,
    head_dim: int,
    rope_theta: float = 10000.0,
    inv_freq: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
) -> torch.Tensor:
    """G[m, n] = RoPE(1)_m · RoPE(1)_n / sqrt(hd) = (2 s²/sqrt(hd)) sum_i cos((p_m - p_n) theta_i) (SparseVLM+ 4.2).

    The reference builds it by rotating all-ones q/k with the layer's rotary embedding (modelling L241-251);
    this is its closed form. theta_i = rope_theta^(-2i/hd) unless the model's rotary `inv_freq` (and its
    `attention_scaling` s, which multiplies cos and sin) are given, as for scaled RoPE variants. Returns (r, n).
    """
    if inv_freq is None:
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=row_positions.device) / head_dim
        inv_freq = rope_theta ** (-exponents)  # (hd/2,)
    delta = row_positions.double()[:, None] - col_positions.double()[None, :]
    inv_freq = inv_freq.double().to(delta.device)
    g = torch.cos(delta[..., None] * inv_freq).sum(-1) * (2.0 * attention_scaling**2 / math.sqrt(head_dim))
    return g.float()


def gravity_prior_rotated(cos_rows: torch.Tensor, sin_rows: torch.Tensor, cos_keys: torch.Tensor,
                          sin_keys: torch.Tensor) -> torch.Tensor:
    """G as the reference builds it (modelling L241-251): all-ones q/k rotated by the model's own rotary embedding
    (cos/sin of the rows' and keys' position ids, (m, hd) each), G = q1 · k1ᵀ / sqrt(hd). Returns (r, n).

    Equals `gravity_prior` for plain RoPE; taken from the model's rotary it also covers scaled variants."""
    hd = cos_rows.shape[-1]
    sign = torch.cat([-torch.ones(hd // 2), torch.ones(hd - hd // 2)]).to(cos_rows.device, torch.float64)
    rows = cos_rows.double() + sign * sin_rows.double()  # ones * cos + rotate_half(ones) * sin
    keys = cos_keys.double() + sign * sin_keys.double()
    return (rows @ keys.T / math.sqrt(hd)).float()


def priority_head_count(num_heads: int) -> int:
    """Heads kept by priority-head selection: 14 of 32 scaled to the head count (the reference hard-codes 14)."""
    return max(1, min(num_heads, round(PRIORITY_HEADS_32 * num_heads / REFERENCE_HEADS)))


def priority_heads(corrected_visual: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S_h = sum over rater rows and visual columns of the corrected attention; the top n_heads heads.

    corrected_visual: (H, r, V). Returns (S_h (H,), chosen head ids (n_heads,) in topk order).
    """
    head_mass = corrected_visual.sum(dim=(1, 2))
    return head_mass, torch.topk(head_mass, n_heads).indices


def kept_count(listed: int, v_cur: int) -> int:
    """k = min(list_B[stage], V_cur - 1) (score.py L39-42): every stage drops at least one token."""
    return max(1, min(listed, v_cur - 1))


def select(
    attn_rows: torch.Tensor,
    row_positions: torch.Tensor,
    key_positions: torch.Tensor,
    visual_start: int,
    v_cur: int,
    keep: int,
    head_dim: int,
    rope_theta: float = 10000.0,
    n_heads: int | None = None,
    inv_freq: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
) -> Selection:
    """One SparseVLM v2 pruning step at a pruning layer.

    attn_rows: (H, r, n) post-softmax attention of the rater rows over all n keys (attention_rows_per_head);
    row_positions (r,), key_positions (n,): the position ids in use (v2 keeps the original ids);
    visual tokens occupy keys [visual_start, visual_start + v_cur); keep: the listed count (clamped to V_cur - 1).
    Returns kept (local 0..v_cur-1), scores = corrected a_j, extras: raw (uncorrected) scores, head_mass, heads,
    prior_mean (rater-mean of G over the visual columns), keep.
    """
    cols = slice(visual_start, visual_start + v_cur)
    if prior is None:  # (r, V) closed form; the engine passes the one built from the model's rotary
        prior = gravity_prior(row_positions, key_positions[cols], head_dim, rope_theta, inv_freq)
    raw = attn_rows[:, :, cols].float()
    # The reference divides by G as is; G > 0 for |delta| < 1707 with hd=128, base 1e4 (METHODS 1(b)3).
    corrected = raw / prior[None]
    n_heads = n_heads if n_heads is not None else priority_head_count(attn_rows.shape[0])
    head_mass, heads = priority_heads(corrected, n_heads)
    scores = corrected[heads].mean(dim=(0, 1))
    k = kept_count(keep, v_cur)
    return Selection(
        kept=top_k_keep(scores, k),
        scores=scores,
        extras={
            "raw_scores": raw[heads].mean(dim=(0, 1)),
            "head_mass": head_mass,
            "heads": heads,
            "prior_mean": prior.mean(dim=0),
            "keep": k,
        },
    )


# --- the count policy -----------------------------------------------------------------------------------------
def plan(budget: int, visual: int = REFERENCE_GRID_TOKENS, depth: int = REFERENCE_DEPTH,
         accounting: str = "paper") -> Counts:
    """SparseVLM v2's count policy: pruning layers (2/6/15 of 32 scaled to depth) and kept counts.

    Output counting is what the code logs as "Equal Tokens" (num_token.append(v_token_num) after every layer,
    modelling L359-371): (2*576 + 4*k1 + 9*k2 + 17*k3)/32 = 192.4 / 128.0 / 96.8 / 64.4 for the v2 lists. The
    score.py comment "2*576 4*300 10*200 16*110" (and the 195.0 / 129.5 / 97.6 / 64.9 derived from it) is off by one
    layer at layer 15; the code wins.

    paper: the v2 lists verbatim at 32 layers x 576 tokens for 192/128/96/64; otherwise the nearest list, scaled
    by grid and by one factor so the reference's *output*-counted equal tokens hit the budget (clamped at 1 token
    per stage, never an error). flops: scaled so the *input*-counted figure hits the budget; unreachable = error.
    """
    check_accounting(accounting)
    check_budget(budget, visual)
    layers = scaled_layers(PRUNE_LAYERS_32, depth)
    if not layers:
        floor_or_error(NAME, budget, float(visual), f"{depth} layers leave no pruning layer")
    if accounting == "paper" and depth == REFERENCE_DEPTH and visual == REFERENCE_GRID_TOKENS and budget in COUNTS_32:
        counts = list(COUNTS_32[budget])
        return make_counts(layers, counts, counts, visual, depth, budget, "output",
                           f"reference v2 list for {budget}: {counts} (score.py)")
    shape_key = min(FIXED_BUDGETS, key=lambda b: (abs(b - budget), b))
    shape = [c * visual / REFERENCE_GRID_TOKENS for c in COUNTS_32[shape_key]]
    shape = (shape + [shape[-1]] * len(layers))[: len(layers)]

    def family(alpha: float) -> list[int]:
        out, prev = [], visual
        for s in shape:
            c = kept_count(round(alpha * s), prev)
            out.append(c)
            prev = c
        return out

    counting = "output" if accounting == "paper" else "input"
    figure = measure(counting, visual, layers, depth)
    if accounting == "flops":
        floor_or_error(NAME, budget, figure([1] * len(layers)), f"pruning after layer {layers[0]} of {depth}")
    counts, _ = fit_scale(family, figure, budget, visual / max(min(shape), 1e-9) + 1.0, "closest")
    return make_counts(layers, counts, counts, visual, depth, budget, counting,
                       f"v2 list for {shape_key} scaled so {counting}-counted equal tokens hit {budget}")


# --- the registered method --------------------------------------------------------------------------------------
class SparseVLMv2(PruneMethod):
    """SparseVLM v2.0 in the engine: raters before the decoder; after layers 2/6/15 (scaled) the rater rows'
    per-head attention at that layer (recomputed from its captured q/k, original position ids), divided by the
    gravity prior, averaged over the priority heads; the top k of the v2 list kept; no recycling.

    Closest-faithful deviations (said in the trace formula too): the reference softmaxes in fp16, this in fp32;
    the priority-head count is 14 of 32 scaled to the model's heads (the reference hard-codes 14); the pruning
    layers are the reference's 2/6/15 scaled to depth (cfg.prune_layers is a v1 option and is not used).
    """

    name = NAME
    label = "SparseVLM v2 (SparseVLM+)"
    ranks_by = "text-guided, gravity-corrected"
    captures = frozenset({"attention"})
    default_positions = "keep"  # v2 keeps the survivors' original position ids (modelling L311-312)
    paper_counting = ("reference v2 lists as kept counts after layers 2/6/15, no recycling; each pruning layer "
                      "counted at its output (the code's logged Equal Tokens)")

    def reads_attention_at(self, geo: ModelGeometry) -> tuple[int, ...]:
        return scaled_layers(PRUNE_LAYERS_32, geo.depth)

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        return Plan.of(plan(cfg.budget, geo.grid_tokens, geo.depth, cfg.accounting), self.positions(cfg))

    def prepare(self, cfg: PruneConfig, inp: PrefillInput) -> Raters:
        shared = text_raters(inp, "gt")  # what `raters` computes, shared with SparseVLM's (same rule) in a request
        inp.memo["raters"] = shared.indices
        return shared

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        rows = inp.memo["raters"].to(inp.hidden.device) + inp.text_start
        attn = inp.head_attention_rows(rows)  # (H, r, n) post-softmax, per head
        pos = inp.positions
        cos_r, sin_r = inp.rotary(pos[rows])
        cos_k, sin_k = inp.rotary(pos[inp.prefix : inp.text_start])
        prior = gravity_prior_rotated(cos_r, sin_r, cos_k, sin_k)  # (r, V) at the original position ids
        sel = select(attn, pos[rows], pos, inp.prefix, inp.visual, inp.spec.keep, cos_r.shape[-1], prior=prior)
        k, heads = sel.extras["keep"], sel.extras["heads"].tolist()
        formula = (f"{FORMULA} | after layer {inp.spec.after_layer}: {len(rows)} raters, priority heads "
                   f"{sorted(heads)} ({len(heads)} of {attn.shape[0]}), keep {k} of {inp.visual} "
                   f"(list {inp.spec.keep}), no recycling; softmax in fp32 (reference: fp16)")
        # G > 0 for |delta| < 1707 at head_dim 128 (LLaVA-1.5), but with few rotary frequencies (small head_dim) it
        # crosses zero inside the prompt: dividing by it then flips or blows up the scores. Run as the reference
        # does, and say so.
        bad = int((prior <= 0.1).sum())
        if bad:
            formula += (f" | WARNING: gravity prior G <= 0.1 at {bad} of {prior.numel()} rater-visual pairs "
                        f"(head_dim {cos_r.shape[-1]}): the correction is ill-conditioned on this model")
        extras = {**sel.extras, "rater_positions": pos[rows], "prior_min": float(prior.min()),
                  "prior_ill_conditioned": bad, "formula": FORMULA}
        return replace(sel, formula=formula, rows=len(rows), extras=extras)
