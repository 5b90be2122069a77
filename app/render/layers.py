"""What each decoder layer sees, read from a trace: every patch's state at a layer (kept, pruned, merged into a
cluster, left out of attention), the counts, the scores that decided a step, one question token's attention,
and one patch's fate through the steps. The pictures, figures and tables are drawn from these."""

from __future__ import annotations

import numpy as np

from sparsevlm.trace import AttentionLayer, PruneTrace, Stage

from .geometry import n_tokens
from .words import config_option

# Patch states in a label grid. SKIPPED: still in the residual stream, but left out of attention at this layer (a
# method that decides attention per layer, ZipVL).
PRUNED, KEPT, SKIPPED = -1, -2, -4


def attention_at(trace: PruneTrace, layer: int) -> AttentionLayer | None:
    """The attention decision recorded for a decoder layer (None where the method decided none)."""
    return next((a for a in trace.attention if a.layer == layer), None)


def attended_patches(trace: PruneTrace, layer: int) -> list[int] | None:
    """The patches whose visual tokens took part in attention at `layer` (visual token j sits at position
    prefix_tokens + j of the prefill sequence); None where the method decided no attention there."""
    a = attention_at(trace, layer)
    if a is None:
        return None
    lo, n = trace.prefix_tokens, n_tokens(trace)
    return sorted(p - lo for p in a.attended if 0 <= p - lo < min(n, trace.visual_tokens or n))


def patch_states(trace: PruneTrace, layer: int) -> np.ndarray:
    """Per patch: KEPT, PRUNED, SKIPPED (left out of attention at this layer), or the index (>= 0) of the recycled
    cluster that represents it."""
    n = n_tokens(trace)
    attended = attended_patches(trace, layer)
    if attended is not None and trace.stage_for_layer(layer) is None:
        states = np.full(n, SKIPPED, dtype=np.int64)
        states[attended] = KEPT
        return states
    stage = trace.stage_for_layer(layer)
    if stage is None:
        return np.full(n, KEPT, dtype=np.int64)
    states = np.full(n, PRUNED, dtype=np.int64)
    for k, m in enumerate(stage.merged):
        states[[p for p in m.members if 0 <= p < n]] = k
    states[[p for p in stage.kept if 0 <= p < n]] = KEPT
    return states


def layer_counts(trace: PruneTrace, layer: int) -> dict:
    stage = trace.stage_for_layer(layer)
    attended = attended_patches(trace, layer)
    if stage is None and attended is not None:  # every token stays; `tokens` counts those that attended
        return {"tokens": len(attended), "kept": len(attended), "clusters": 0, "covered": 0}
    if stage is None:
        return {"tokens": trace.visual_tokens, "kept": trace.visual_tokens, "clusters": 0, "covered": 0}
    covered = sum(len(m.members) for m in stage.merged)
    return {"tokens": len(stage.kept) + len(stage.merged), "kept": len(stage.kept),
            "clusters": len(stage.merged), "covered": covered}


def num_layers(trace: PruneTrace) -> int:
    return len(trace.layers) or int(trace.model.get("decoder_layers", trace.model.get("num_layers", 1)))


def final_layer(trace: PruneTrace) -> int:
    return max(0, num_layers(trace) - 1)


def default_layer(trace: PruneTrace) -> int:
    """The first layer after the last pruning step: where the full effect of pruning is visible. A method that
    decides attention per layer (ZipVL): the layer where the fewest visual tokens attended."""
    if not trace.stages and trace.attention:
        return min(trace.attention, key=lambda a: (a.visual, a.layer)).layer
    if not trace.stages:
        return 0
    return min(final_layer(trace), max(0, trace.stages[-1].after_layer + 1))


def heatmap_stage(trace: PruneTrace, layer: int) -> Stage | None:
    """The scores that decided what `layer` sees; before the first cut, the scores of the first cut."""
    return trace.stage_for_layer(layer) or (trace.stages[0] if trace.stages else None)


def patch_scores(trace: PruneTrace, stage: Stage) -> np.ndarray:
    """Per patch significance at a stage (NaN where the patch was not a token entering it)."""
    n = n_tokens(trace)
    vals = np.full(n, np.nan, dtype=np.float64)
    for p, s in zip(stage.input_patches, stage.scores, strict=False):
        if 0 <= p < n:
            vals[p] = s
    return vals


def attendance_share(trace: PruneTrace) -> np.ndarray:
    """Per patch, the share of the layers with an attention decision at which its visual token took part."""
    n = n_tokens(trace)
    hits = np.zeros(n, dtype=np.float64)
    for a in trace.attention:
        hits[attended_patches(trace, a.layer) or []] += 1
    return hits / max(1, len(trace.attention))


def token_attention(trace: PruneTrace, token: int) -> list[tuple[Stage, np.ndarray | None]]:
    """Per pruning stage that recorded its raters' rows (SparseVLM): the attention text token `token` (its index
    after the image, Rater.index) pays each patch, NaN where the patch was not a token entering the stage; None
    at a stage where the token was not a rater (its row played no part)."""
    n = n_tokens(trace)
    out = []
    for st in trace.stages:
        tokens, rows = st.extras.get("rater_tokens"), st.extras.get("rater_attention")
        if tokens is None or rows is None:
            continue
        if token not in tokens:
            out.append((st, None))
            continue
        vals = np.full(n, np.nan, dtype=np.float64)
        for p, a in zip(st.input_patches, rows[tokens.index(token)], strict=False):
            if 0 <= p < n:
                vals[p] = a
        out.append((st, vals))
    return out


def patch_fate(trace: PruneTrace, patch: int) -> list[dict]:
    """What happened to one patch at every pruning stage, from the trace alone: its score and rank among the
    tokens entering the stage (rank 1 = highest score; None when it no longer entered as a token of its own),
    and its fate after the stage: kept, merged into cluster k (with which other patches, around which center),
    deleted, or gone already."""
    out = []
    for st in trace.stages:
        row: dict = {"after_layer": st.after_layer, "entering": len(st.input_patches), "score": None, "rank": None}
        if patch in st.input_patches and st.scores:
            i = st.input_patches.index(patch)
            if i < len(st.scores):
                row["score"] = float(st.scores[i])
                row["rank"] = 1 + sum(s > st.scores[i] for s in st.scores)
        cluster = next((k for k, m in enumerate(st.merged) if patch in m.members), None)
        if patch in st.kept:
            row["fate"] = "kept"
        elif cluster is not None:
            m = st.merged[cluster]
            row.update(fate="merged", cluster=cluster, center=m.center,
                       with_patches=[q for q in m.members if q != patch])
        else:
            row["fate"] = "deleted" if row["score"] is not None or patch in st.input_patches else "gone"
        out.append(row)
    return out


def count_kind(trace: PruneTrace) -> str:
    """Whether a run's per-layer count adapts to the input or follows a fixed schedule, in words."""
    if trace.attention:
        tau = trace.attention[0].extras.get("tau")
        return "adaptive: τ" + (f" = {tau:g}" if tau is not None else "")
    if trace.method == "sparsevlm" and config_option(trace, "count_mode", "fixed") in ("paper", "code"):
        return "adaptive: rank(P)"
    if trace.method == "dense":
        return "no pruning"
    return "fixed schedule"
