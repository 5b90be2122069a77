"""VisionZip as pure tensor functions (docs/engine.md; dvlab-research/VisionZip clip_encoder.py L42-85).

In the vision tower, before the projector: D dominant tokens ([CLS] + the D-1 patches the [CLS] row attends to
most, summed over heads) and C contextual tokens (the remaining tokens merged onto C evenly spaced targets by
cosine similarity of the layer's head-mean keys). The LLM sees D + C tokens ([CLS] included) at every layer.
Inputs, all from the vision layer whose output is the selected feature layer (CLIP layer 22 of 24 for LLaVA):
its [CLS] attention row, its head-mean keys, its output hidden states. Batch 1; token 0 is [CLS].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import REFERENCE_DEPTH, REFERENCE_GRID_TOKENS, PruneConfig, check_accounting, check_budget
from ..errors import ConfigError
from ..schedule import Counts, make_counts
from .base import (
    NEWLINE_SCORE,
    MergedGroup,
    ModelGeometry,
    Plan,
    PruneMethod,
    Selection,
    StageInput,
    top_k_keep,
    view_budgets,
)

FORMULA = (
    "dominant: [CLS] + top-(D-1) of c_j = Σ_h A_h[CLS, j]; contextual: rest merged onto C evenly spaced targets "
    "by cos(k̄_i, k̄_t), token = x_t + mean(members)"
)
NAME = "visionzip"
# Official README L127-128 / L141 gives 54+10 for 64; 108+20 and 162+30 are from LightCompress (UNCONFIRMED
# officially); all three are the 27:5 split used here for every budget.
SPLITS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}
DOMINANT_SHARE = 27 / 32


@dataclass
class VisionZipResult:
    """The D + C features handed to the projector, and the selection for the trace."""

    features: torch.Tensor  # (D + C, C_hidden): [CLS], dominant patches ascending, contextual in target order
    selection: Selection  # indices are PATCH indices 0..N-1 ([CLS] excluded); groups = (target, members)


def require_cls(has_cls: bool, encoder: str = "this vision tower") -> None:
    """VisionZip's dominant rule reads the [CLS] attention row; SigLIP-like towers have no [CLS]."""
    if not has_cls:
        raise ConfigError(
            f"VisionZip ranks patches by the [CLS] token's attention, and {encoder} has no [CLS] token "
            "(the official code supports CLIP only)"
        )


def split(budget: int) -> tuple[int, int]:
    """(dominant D including [CLS], contextual C) with D + C = budget, in the published 27:5 ratio."""
    if budget in SPLITS:
        return SPLITS[budget]
    d = max(1, min(budget, round(budget * DOMINANT_SHARE)))
    return d, budget - d


def cls_attention(cls_row: torch.Tensor) -> torch.Tensor:
    """c_j = sum over heads of the post-softmax [CLS] row at patch j (clip_encoder.py L51-52: SUM, not mean).

    cls_row: (H, 1 + N) attention of the [CLS] query over all tokens. Returns (N,) float32.
    """
    return cls_row[:, 1:].float().sum(dim=0)


def head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """k̄ = keys averaged over heads (utils.py L89: raw k_proj output, bias included, before scaling).

    keys: (1 + N, H * hd). Returns (1 + N, hd).
    """
    n, width = keys.shape
    return keys.reshape(n, num_heads, width // num_heads).mean(dim=1)


def select(scores: torch.Tensor, metric: torch.Tensor, hidden: torch.Tensor, dominant: int,
           contextual: int) -> VisionZipResult:
    """Dominant + contextual tokens.

    scores: (N,) c_j over patches; metric: (1 + N, dk) head-mean keys; hidden: (1 + N, C) the layer's output,
    token 0 = [CLS]. dominant counts [CLS] (D - 1 patches are chosen).
    """
    n = scores.shape[0]
    dominant = max(1, min(dominant, n + 1))
    dom_patches = top_k_keep(scores, dominant - 1)  # main.py L7 passes dominant - 1; masked_select => ascending
    dev = scores.device
    dom_tokens = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), dom_patches.to(dev) + 1])
    is_dom = torch.zeros(n + 1, dtype=torch.bool, device=dev)
    is_dom[dom_tokens] = True
    rest = (~is_dom).nonzero().flatten()  # Rm, ascending token indices (L60-62)
    features = [hidden[dom_tokens]]
    groups: list[tuple[int, list[int]]] = []
    cosines: list[list[float]] = []
    n_rest = rest.shape[0]
    if contextual > 0 and n_rest > 0:
        k_hat = torch.nn.functional.normalize(metric[rest].float(), dim=-1)  # L64
        step = max(1, n_rest // contextual)  # L67-68: evenly spaced positions in the remaining list
        tgt = torch.arange(0, n_rest, step, device=dev)[:contextual]
        is_tgt = torch.zeros(n_rest, dtype=torch.bool, device=dev)
        is_tgt[tgt] = True
        others = (~is_tgt).nonzero().flatten()
        sim = k_hat[others] @ k_hat[tgt].T  # L71-72
        # hard one-hot L73-74
        assign = sim.argmax(dim=1) if others.numel() else torch.zeros(0, dtype=torch.long, device=dev)
        ctx = []
        for i, t in enumerate(tgt.tolist()):
            members = others[assign == i]
            merged = hidden[rest[t]].float()
            if members.numel():
                # L75-80: target PLUS the mean of its members (not an average that includes the target)
                merged = merged + hidden[rest[members]].float().mean(dim=0)
            ctx.append(merged.to(hidden.dtype))
            groups.append((int(rest[t]) - 1, [int(rest[u]) - 1 for u in members]))
            cosines.append([float(sim[j, i]) for j in (assign == i).nonzero().flatten().tolist()])
        features.append(torch.stack(ctx))
    out = torch.cat(features)
    slot_patches = [[-1]] + [[int(p)] for p in dom_patches] + [[t, *m] for t, m in groups]  # -1 = [CLS]
    return VisionZipResult(
        features=out,
        selection=Selection(
            kept=dom_patches,
            scores=scores.float(),
            groups=groups,
            extras={"cls_slot": 0, "slot_patches": slot_patches, "member_cosines": cosines,
                    "dominant": dominant, "contextual": len(groups)},
        ),
    )


def plan(budget: int, visual: int = REFERENCE_GRID_TOKENS, depth: int = REFERENCE_DEPTH,
         accounting: str = "paper") -> Counts:
    """VisionZip's count policy. Before the LLM: every decoder layer sees D + C = budget tokens, so both countings
    equal the budget; D - 1 patches are kept directly, [CLS] and the C contextual tokens come on top."""
    check_accounting(accounting)
    check_budget(budget, visual)
    d, c = split(budget)
    note = f"{d} dominant ([CLS] + {d - 1} patches) + {c} contextual"
    if budget not in SPLITS:
        note += " (27:5 split derived from the published 54+10)"
    elif budget != 64:
        note += " (LightCompress's split; the official repo shows only 54+10)"
    return make_counts((-1,), (d - 1,), (budget,), visual, depth, budget, "input", note)


# --- the registered method --------------------------------------------------------------------------------------
class VisionZip(PruneMethod):
    """VisionZip in the engine, before the LLM: the vision feature layer's [CLS] row (recomputed from its captured
    q/k, summed over heads), its raw k_proj output (head mean) and its output hidden states give D dominant +
    C contextual features, projected by the model's own projector; the LLM receives [CLS], the dominant patches
    in raster order, then the contextual tokens, with contiguous positions (as llava_arch.py L213-241).

    Dominant patch tokens are the projector outputs of their features (identical to projecting
    hidden_states[-2][p+1]); [CLS] and the contextual tokens are projected here. Closest-faithful deviation:
    the reference softmaxes the [CLS] row in fp16, this in fp32. [CLS] is required: SigLIP towers are refused.
    """

    name = NAME
    label = "VisionZip"
    ranks_by = "[CLS] attention + merging"
    captures = frozenset({"vision"})
    default_positions = "compact"  # the image block becomes D + C contiguous tokens
    paper_counting = "D dominant ([CLS] included) + C contextual tokens before the LLM: every layer sees D + C"
    needs_cls = True

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        require_cls(geo.has_cls)
        return Plan.of(plan(cfg.budget, geo.grid_tokens, geo.depth, cfg.accounting), self.positions(cfg))

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        if inp.layout is not None and not inp.layout.single:
            return self._select_per_view(cfg, inp)
        vis = inp.vision
        d, c = split(cfg.budget)
        scores = vis.cls_attention() * vis.heads  # head mean x heads = the reference's sum over heads
        res = select(scores, head_mean_keys(vis.k, vis.heads), vis.hidden, d, c)
        sel = res.selection
        n_dom = len(sel.kept)
        proj = vis.project(res.features[None].to(inp.hidden.dtype))[0].to(inp.hidden.dtype)
        cls = [MergedGroup(-1, [], proj[0])]
        contextual = [MergedGroup(t, [t, *m], proj[1 + n_dom + i]) for i, (t, m) in enumerate(sel.groups)]
        formula = (f"{FORMULA} | D = {d} ([CLS] + {n_dom} patches), C = {len(contextual)}: the LLM sees "
                   f"{1 + n_dom + len(contextual)} tokens; [CLS] softmax in fp32 (reference: fp16)")
        extras = {**sel.extras, "targets": [t for t, _ in sel.groups], "formula": FORMULA}
        return replace(sel, scores=scores, formula=formula, merged=contextual, lead=cls, extras=extras)

    def _select_per_view(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        """LLaVA-NeXT, as the official code runs it per crop: each view (base, tiles) gets its share of the budget
        (split evenly over the views the picture has: a reading, the official code fixes the count per crop), split
        27:5 into dominant ([CLS] included) and contextual tokens chosen from that view's own [CLS] row, keys and
        features; the candidates are the view's tokens (a tile's patches that unpadding removed are not among
        them); newline tokens are dropped (the official code never feeds them)."""
        vis, layout = inp.vision, inp.layout
        shares = view_budgets([len(v.tokens) + 1 for v in layout.views], cfg.budget)  # + 1: each view's [CLS]
        dev = inp.hidden.device
        scores_all = torch.full((inp.visual,), NEWLINE_SCORE, dtype=torch.float32, device=dev)
        kept: list[torch.Tensor] = []
        leads: list[MergedGroup] = []
        contextual: list[MergedGroup] = []
        per_view = []
        for v, share in zip(layout.views, shares, strict=True):
            if share <= 0:
                per_view.append({"view": v.name, "dominant": 0, "contextual": 0})
                continue
            d, c = split(share)
            q, k, hidden = vis.crop(v.crop)
            patches = torch.tensor(v.patches, dtype=torch.long, device=k.device)
            rows = torch.cat([torch.zeros(1, dtype=torch.long, device=k.device), patches + 1])  # [CLS] + the view's
            scores = (vis.cls_attention(v.crop) * vis.heads)[patches].float()
            res = select(scores, head_mean_keys(k, vis.heads)[rows], hidden[rows], d, c)
            tokens = torch.tensor(v.tokens, dtype=torch.long, device=dev)
            scores_all[tokens] = scores.to(dev)
            sel = res.selection
            n_dom = len(sel.kept)
            proj = vis.project(res.features[None].to(inp.hidden.dtype))[0].to(inp.hidden.dtype)
            kept.append(tokens[sel.kept.to(dev)])
            leads.append(MergedGroup(-1, [], proj[0]))
            for i, (t, m) in enumerate(sel.groups):
                contextual.append(MergedGroup(int(tokens[t]), [int(tokens[t]), *(int(tokens[u]) for u in m)],
                                              proj[1 + n_dom + i]))
            per_view.append({"view": v.name, "dominant": d, "contextual": len(sel.groups)})
        kept_all = torch.cat(kept).sort().values if kept else torch.zeros(0, dtype=torch.long, device=dev)
        order = sorted(range(len(contextual)), key=lambda i: contextual[i].center)  # sequence order of targets
        contextual = [contextual[i] for i in order]
        per = ", ".join(f"{p['view']} {p['dominant']}+{p['contextual']}" for p in per_view)
        formula = (f"{FORMULA} | per view, each from its own [CLS] (dominant incl. [CLS] + contextual: {per}); the "
                   f"LLM sees {len(leads) + len(kept_all) + len(contextual)} tokens: the views' [CLS] first, then the "
                   "dominant tokens in sequence order, then the contextual ones; newline tokens dropped; [CLS] softmax "
                   "in fp32 (reference: fp16)")
        return Selection(kept_all, scores_all, formula, merged=contextual, lead=leads,
                         extras={"per_view": per_view, "targets": [g.center for g in contextual],
                                 "formula": FORMULA})
