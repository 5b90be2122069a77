"""The five newer methods (SparseVLM v2, VisionZip, DivPrune, PyramidDrop, DART) installed on real tiny LLaVA models
of both architectures: end to end through `pipeline.run` with generate, counts equal to the plan, JSON round trip,
the decisions recomputed independently from the model's own modules, and the masking oracle for every method that
prunes inside the decoder with original positions kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.hooks import PruneHooks
from sparsevlm.loading import from_objects
from sparsevlm.methods import METHODS, dart, divprune, get_method, sparsevlm_v2, visionzip
from sparsevlm.pipeline import build_prompt, run
from sparsevlm.testing import masked_oracle_generate, tiny_llava
from sparsevlm.trace import PruneTrace

ARCHS = ["llama", "qwen2"]
NEW = ["sparsevlm-v2", "visionzip", "divprune", "pyramiddrop", "dart"]
QUESTION = "what colour is the shape ?"


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    model, processor = tiny_llava(request.param, layers=8, image_size=112)
    return request.param, model, processor


def _image(seed=0, size=(150, 110)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _inputs(processor, question=QUESTION, seed=0):
    return processor(images=_image(seed), text=build_prompt(processor, question), return_tensors="pt")


def test_the_five_are_registered_with_their_default_positions():
    assert set(NEW) <= set(METHODS)
    defaults = {m: get_method(m).default_positions for m in NEW}
    # v2 and DART keep the original ids; the others hand the LLM (or later layers) a renumbered sequence.
    assert defaults == {"sparsevlm-v2": "keep", "visionzip": "compact", "divprune": "compact",
                        "pyramiddrop": "compact", "dart": "keep"}


@torch.no_grad()
@pytest.mark.parametrize("accounting", ["paper", "flops"])
@pytest.mark.parametrize("method", NEW)
def test_runs_end_to_end_with_the_planned_counts_and_round_trips(tiny, method, accounting):
    arch, model, processor = tiny
    lm = from_objects(model, processor)
    cfg = PruneConfig(method=method, budget=32, accounting=accounting)
    if method == "visionzip" and arch == "qwen2":  # SigLIP has no [CLS] to rank by: a clear error, not a run
        with pytest.raises(ConfigError, match=r"\[CLS\]"):
            run(lm, _image(), QUESTION, cfg, max_new_tokens=4)
        return
    plan = PruneHooks(model, cfg).plan  # what the method planned (not installed)
    counts = plan.counts
    res = run(lm, _image(), QUESTION, cfg, max_new_tokens=4)
    tr = res.trace
    assert tr.generated_tokens == 4 and isinstance(res.answer, str)
    assert tr.config["positions"] == get_method(method).default_positions
    # Every planned stage ran, with the planned direct and total counts.
    assert [s.after_layer for s in tr.stages] == list(counts.layers)
    assert [len(s.kept) for s in tr.stages] == list(counts.direct)
    assert [s.visual_out for s in tr.stages] == list(counts.totals)
    for s in tr.stages:
        assert len(s.scores) == s.visual_in == len(s.input_patches)
        assert s.formula and s.extras["formula"]
        assert len(set(s.kept)) == len(s.kept) and set(s.kept) <= set(s.input_patches)
    # Both equal-token figures, measured from the layer counts, equal the planned ones; the budget's counting says
    # which figure met it.
    assert tr.cost.equal_tokens == pytest.approx(counts.equal_tokens_input)
    assert tr.cost.equal_tokens_reference == pytest.approx(counts.equal_tokens_output)
    assert tr.cost.budget_counting == counts.budget_counting
    assert tr.cost.budget_met == counts.budget_met
    j = tr.to_json()
    assert PruneTrace.from_json(j).to_json() == j


def test_cls_based_selection_on_siglip_is_a_clear_error():
    model, processor = tiny_llava("qwen2", layers=4, image_size=56)
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        PruneHooks(model, PruneConfig(method="visionzip", budget=8))
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        run(from_objects(model, processor), _image(), QUESTION, PruneConfig(method="visionzip", budget=8))


# --- the decisions, recomputed from the model's own modules ----------------------------------------------------------
def _rope_qk(layer, rotary, x: torch.Tensor, positions: torch.Tensor):
    """(H, n, hd) queries and (Hkv, n, hd) keys a decoder layer computes on its input x (1, n, D)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    n, hd = x.shape[1], attn.head_dim
    q = attn.q_proj(h).view(1, n, -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(1, n, -1, hd).transpose(1, 2)
    cos, sin = rotary(x, positions[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q[0], k[0]


@torch.no_grad()
def test_sparsevlm_v2_per_head_rows_equal_eager_attention_and_decide_the_kept_set(tiny):
    arch, _, processor = tiny
    model, _ = tiny_llava(arch, layers=8, image_size=112)
    model.set_attn_implementation("eager")
    inputs = _inputs(processor)
    with PruneHooks(model, PruneConfig(method="sparsevlm-v2", budget=32), keep_debug=True) as hooks:
        out = model(**inputs, output_attentions=True)
    st = hooks.state
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert len(st.stages) == 3
    for stage in st.stages:
        layer = stage.after_layer
        rows = st.raters + st.prefix + stage.visual_in
        eager = out.attentions[layer][0].float()[:, rows]  # (H, r, n) per head
        # The recorded decision is v2's rule applied to the eager attention at the survivors' original positions,
        # with the gravity prior in closed form (the engine builds it from the model's rotary, as the reference).
        positions = torch.tensor([*range(st.prefix), *(st.prefix + p for p in stage.input_patches),
                                  *range(st.prefix + st.visual_total, st.prefix + st.visual_total + st.text)])
        sel = sparsevlm_v2.select(eager, positions[rows], positions, st.prefix, stage.visual_in,
                                  hooks.plan.stages[stage_index(st, stage)].keep, 2 * len(inv_freq),
                                  inv_freq=inv_freq)
        assert [stage.input_patches[j] for j in sel.kept.tolist()] == stage.kept
        assert stage.extras["heads"] == sel.extras["heads"].tolist()
        n_heads = model.config.text_config.num_attention_heads
        assert len(stage.extras["heads"]) == sparsevlm_v2.priority_head_count(n_heads)
        assert stage.merged == [] and stage.recycled == 0  # no recycling in v2


def test_gravity_prior_from_the_models_rotary_equals_the_closed_form(tiny):
    _, model, _ = tiny
    rotary = model.model.language_model.rotary_emb
    rows, keys = torch.tensor([70, 75, 90]), torch.arange(3, 70)
    x = torch.zeros(1, 1, model.config.text_config.hidden_size)
    cos_r, sin_r = (t[0] for t in rotary(x, rows[None]))
    cos_k, sin_k = (t[0] for t in rotary(x, keys[None]))
    got = sparsevlm_v2.gravity_prior_rotated(cos_r, sin_r, cos_k, sin_k)
    want = sparsevlm_v2.gravity_prior(rows, keys, cos_r.shape[-1], inv_freq=rotary.inv_freq)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def stage_index(st, stage) -> int:
    return next(k for k, s in enumerate(st.stages) if s is stage)


@torch.no_grad()
def test_visionzip_dominant_contextual_and_cls_from_the_vision_tower():
    model, processor = tiny_llava("llama", layers=4, image_size=112)
    inputs = _inputs(processor)
    llava = model.model
    vision = getattr(llava.vision_tower, "vision_model", llava.vision_tower)
    idx = len(vision.encoder.layers) + model.config.vision_feature_layer  # the layer whose output is selected
    hs = llava.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    enc = vision.encoder.layers[idx]
    z = enc.layer_norm1(hs[idx])[0]
    heads, hd = enc.self_attn.num_heads, enc.self_attn.head_dim
    q = (enc.self_attn.q_proj(z) * enc.self_attn.scale).view(-1, heads, hd).transpose(0, 1)
    k = enc.self_attn.k_proj(z).view(-1, heads, hd).transpose(0, 1)
    cls_sum = torch.softmax(q[:, :1] @ k.transpose(1, 2), dim=-1)[:, 0, 1:].sum(0)  # (N,) summed over heads
    x = hs[idx + 1][0]  # the selected features, [CLS] first
    d, c = visionzip.split(32)

    seen = {}
    with PruneHooks(model, PruneConfig(method="visionzip", budget=32)) as hooks:
        def grab(module, args, kwargs):
            seen["emb"] = kwargs["inputs_embeds"]

        h = llava.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            h.remove()
    st = hooks.state
    (stage,) = st.stages
    assert stage.kept == torch.topk(cls_sum, d - 1).indices.sort().values.tolist()
    assert stage.scores == pytest.approx(cls_sum.tolist(), abs=1e-5)
    cls, *ctx = stage.merged
    assert cls.center == -1 and cls.members == [] and len(ctx) == c == stage.clusters
    # Every patch is represented exactly once: directly (dominant) or inside one contextual token.
    members = [p for m in ctx for p in m.members]
    assert sorted(stage.kept + members) == list(range(st.visual_total))
    # The LLM receives [CLS], the dominant patches, then target + mean(members), all through the projector.
    emb, s = seen["emb"][0], st.prefix
    proj = llava.multi_modal_projector
    assert emb.shape[0] == st.prefix + d + c + st.text
    assert torch.allclose(emb[s], proj(x[:1])[0], atol=1e-5)
    assert torch.allclose(emb[s + 1 : s + d], proj(x[[p + 1 for p in stage.kept]]), atol=1e-5)
    for i, m in enumerate(ctx):
        target = m.center  # the contextual token sits at its target; members = the target and what merged into it
        rest = [p for p in m.members if p != target]
        assert target in m.members
        want = x[target + 1] + (x[[p + 1 for p in rest]].mean(0) if rest else 0)
        assert torch.allclose(emb[s + d + i], proj(want[None])[0], atol=1e-5)


@torch.no_grad()
def test_divprune_keeps_the_farthest_first_set_of_the_projector_outputs(tiny):
    _, model, processor = tiny
    inputs = _inputs(processor)
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = (feats.pooler_output if hasattr(feats, "pooler_output") else feats)
    feats = torch.cat(list(feats)) if isinstance(feats, list | tuple) else feats.reshape(-1, feats.shape[-1])
    with PruneHooks(model, PruneConfig(method="divprune", budget=20)) as hooks:
        model(**inputs)
    (stage,) = hooks.state.stages
    want = divprune.select(feats, 20)
    assert stage.kept == want.kept.tolist() and len(stage.kept) == 20
    assert stage.extras["order"] == want.extras["order"]


@torch.no_grad()
def test_pyramiddrop_ranks_with_the_next_layers_own_attention_and_compacts(tiny):
    _, model, processor = tiny
    inputs = _inputs(processor)
    dense = model(**inputs, output_hidden_states=True).hidden_states  # dense[i] enters decoder layer i
    lm = model.model.language_model
    with PruneHooks(model, PruneConfig(method="pyramiddrop", budget=32)) as hooks:
        model(**inputs)
    st = hooks.state
    first = st.stages[0]
    k_layer = first.after_layer + 1  # ranked with layer K's own projections on the hidden states entering K
    n = dense[k_layer].shape[1]
    q, k = _rope_qk(lm.layers[k_layer], lm.rotary_emb, dense[k_layer], torch.arange(n))
    rep = q.shape[0] // k.shape[0]
    logits = (q[:, -1:] @ k.repeat_interleave(rep, 0).transpose(1, 2))[:, 0] * lm.layers[k_layer].self_attn.scaling
    a = torch.softmax(logits.float(), -1).mean(0)[st.prefix : st.prefix + st.visual_total]
    assert first.scores == pytest.approx(a.tolist(), abs=1e-5)
    assert first.kept == torch.topk(a, len(first.kept)).indices.sort().values.tolist()
    assert hooks.plan.positions == "compact" and st.compacted
    assert st.positions[0].tolist() == list(range(st.prefix + st.stages[-1].visual_out + st.text))


@torch.no_grad()
def test_dart_pivots_by_key_norm_and_claims_on_final_normed_states(tiny):
    _, model, processor = tiny
    inputs = _inputs(processor)
    dense = model(**inputs, output_hidden_states=True).hidden_states
    lm = model.model.language_model
    with PruneHooks(model, PruneConfig(method="dart", budget=24)) as hooks:
        model(**inputs)
    st = hooks.state
    (stage,) = st.stages
    prev = stage.after_layer  # layer K - 1: its post-RoPE keys pick the pivots
    n = dense[prev].shape[1]
    _, keys = _rope_qk(lm.layers[prev], lm.rotary_emb, dense[prev], torch.arange(n))
    norms = dart.key_norms(keys)
    want = dart.select(norms, lm.norm(dense[prev + 1])[0], st.prefix, st.visual_total, 24)
    assert stage.kept == want.kept.tolist()
    assert len(stage.kept) == 4 + 24  # 4 image pivots + 8 x (24 // 8) claimed
    assert stage.extras["image_pivots"] == [p - st.prefix for p in want.extras["image_pivots"]]
    assert set(stage.extras["image_pivots"]) <= set(stage.kept)
    claimed = [p for pv in stage.extras["pivots"] for p in pv["claimed"]]
    assert len(claimed) == len(set(claimed)) == 24  # greedy: a later pivot cannot re-claim a token
    assert hooks.record().counts.budget_counting == "retained"


# --- the masking oracle: keep-positions pruning == the full sequence with the pruned tokens masked later ------------
@torch.no_grad()
@pytest.mark.parametrize("method", ["sparsevlm-v2", "dart", "pyramiddrop"])
def test_keep_positions_pruning_equals_masked_full_sequence(tiny, method):
    _, model, processor = tiny
    inputs = _inputs(processor)
    # v2 and DART keep original positions by default; PyramidDrop compacts them, so it is checked in keep mode.
    cfg = PruneConfig(method=method, budget=24, positions="keep")
    gen = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with PruneHooks(model, cfg) as hooks:
        pruned = model.generate(**inputs, **gen)
    st = hooks.state
    assert st.stages and all(s.visual_out < s.visual_in for s in st.stages)
    oracle = masked_oracle_generate(model, inputs, st, **gen)
    assert torch.equal(pruned.sequences, oracle.sequences)
    for a, b in zip(pruned.logits, oracle.logits):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)
