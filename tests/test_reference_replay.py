"""Replays the reference SparseVLM v1.5 prefill step by step, independently of the engine, and compares.

The replay below is written from the reference's description (docs/engine.md, SparseVLM), not from the
engine's code: raters from the LLM input embeddings, explicit full attention (as the reference computes it) at
layers 2 / 6 / 15 of 32, scores = mean over rater rows of the head-mean attention to the visual columns, the
verbatim v1.5 list as the directly kept count, the top 30% (+1) of the deleted tokens clustered by DPC-kNN into
int(0.1 n) + 1 clusters, merged by mean, inserted after the kept tokens, compact positions. The engine (default
config: paper accounting, budget 64) must keep the same patches, form the same clusters and give the same
counts and logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm.config import PruneConfig
from sparsevlm.hooks import PruneHooks
from sparsevlm.pipeline import build_prompt
from sparsevlm.testing import tiny_llava

V15_LISTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _full_attention(layer, h, cos, sin):
    """(n, n) head-mean post-softmax causal attention of a Llama layer, computed explicitly."""
    attn = layer.self_attn
    n, hd = h.shape[0], attn.head_dim
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(n, -1, hd).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, hd).transpose(0, 1)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = q @ k.transpose(1, 2) / math.sqrt(hd)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1).mean(0)


def _dpc_knn(x, c, layer):
    """Density-peak clustering with kNN density, Euclidean assignment (the reference's cluster_dpc_knn).

    The reference adds uniform noise x 1e-6 to the density to break ties; the engine draws it from a generator
    seeded with (config seed 0) + layer, and so does the replay (random-weight hidden states do tie that closely).
    """
    dist = torch.cdist(x, x) / math.sqrt(x.shape[1])
    rho = torch.exp(-(dist.topk(c, dim=-1, largest=False).values ** 2).mean(-1))
    rho = rho + torch.rand(len(x), generator=torch.Generator().manual_seed(layer)) * 1e-6
    delta = torch.empty(len(x))
    for i in range(len(x)):
        higher = rho > rho[i]
        delta[i] = dist[i, higher].min() if higher.any() else dist.max()
    centers = (rho * delta).topk(c).indices
    labels = dist[:, centers].argmin(-1)
    labels[centers] = torch.arange(c)
    return centers, labels


@torch.no_grad()
def replay_v15(model, inputs_embeds, prefix, visual, budget):
    """The reference v1.5 prefill on a 32-layer LLaVA. Returns (stages, last-token logits)."""
    lm = model.model.language_model
    h = inputs_embeds[0].float()
    hv, hq = h[prefix : prefix + visual], h[prefix + visual :]
    r = torch.softmax(hv @ hq.T, dim=-1).mean(0)
    raters = (r > r.mean()).nonzero().flatten()
    # Current visual tokens in sequence order: (patch or cluster-center patch, merged members or None).
    tokens: list[tuple[int, list[int] | None]] = [(j, None) for j in range(visual)]
    lists = dict(zip((2, 6, 15), V15_LISTS[budget]))
    stages = []
    for i, layer in enumerate(lm.layers):
        n = h.shape[0]
        pos = torch.arange(n)[None]  # compact positions: survivors renumbered 0..n-1
        cos, sin = lm.rotary_emb(h[None], pos)
        p_full = _full_attention(layer, h, cos[0], sin[0]) if i in lists else None
        h = layer(h[None], attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        h = (h[0] if isinstance(h, tuple) else h)[0]
        if i not in lists:
            continue
        v = len(tokens)
        text_start = prefix + v
        p = p_full[raters + text_start][:, prefix:text_start]
        scores = p.mean(0)
        d = min(lists[i], v - 1)
        order = scores.argsort(descending=True)
        keep, deleted = order[:d].sort().values, order[d:]
        n_rec = int(len(deleted) * 0.3) + 1
        rec = deleted[:n_rec]
        c = int(n_rec * 0.1) + 1
        x = h[prefix + rec]
        ctr, labels = _dpc_knn(x, c, i)
        merged = torch.stack([x[labels == j].mean(0) for j in range(c)])

        patches = [t[1] if t[1] is not None else [t[0]] for t in tokens]  # merged tokens re-merged: flattened
        new = [(tokens[int(rec[ctr[j]])][0], sorted(q for m in rec[labels == j].tolist() for q in patches[m]))
               for j in range(c)]
        tokens = [tokens[m] for m in keep.tolist()] + new
        h = torch.cat([h[:prefix], h[prefix + keep], merged, h[text_start:]])
        stages.append({"after_layer": i, "visual_in": v, "visual_out": len(tokens),
                       "kept": [t[0] for t in tokens if t[1] is None],
                       "merged": sorted(t[1] for t in tokens if t[1] is not None)})
    logits = model.lm_head(lm.norm(h[-1:]))[0]
    return stages, logits


@pytest.mark.parametrize("budget", [64, 192])
@torch.no_grad()
def test_engine_matches_a_replay_of_the_reference_v15_step(budget):
    model, processor = tiny_llava("llama", layers=32, image_size=336, hidden=64, heads=4, kv_heads=2,
                                  intermediate=128, seed=3)
    image = Image.fromarray(np.random.RandomState(5).randint(0, 255, (300, 400, 3), dtype=np.uint8))
    inputs = processor(images=image, text=build_prompt(processor, "what colour is the circle left of the square ?"),
                       return_tensors="pt")
    captured = {}

    def grab(module, args, kwargs):
        captured["emb"] = kwargs["inputs_embeds"].clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)  # dense: the LLM input embeddings the reference starts from
    finally:
        handle.remove()
    prefix = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    ref_stages, ref_logits = replay_v15(model, captured["emb"], prefix, 576, budget)

    with PruneHooks(model, PruneConfig(method="sparsevlm", budget=budget)) as hooks:
        out = model(**inputs)
    rec = hooks.record()
    assert rec.positions == "compact" and rec.counts.direct == V15_LISTS[budget]  # the verbatim list, kept directly
    assert [s.after_layer for s in rec.stages] == [2, 6, 15]
    for got, ref in zip(rec.stages, ref_stages, strict=True):
        assert (got.visual_in, got.visual_out) == (ref["visual_in"], ref["visual_out"])
        assert got.kept == ref["kept"]
        assert sorted(m.members for m in got.merged) == ref["merged"]
    assert torch.allclose(out.logits[0, -1], ref_logits, atol=1e-4, rtol=0)
