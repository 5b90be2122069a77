"""Model-level equivalence tests of the hooks on real tiny LLaVA models of both architectures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.hooks import PruneHooks
from sparsevlm.loading import from_objects
from sparsevlm.methods import Plan, PruneMethod, Selection, StageSpec
from sparsevlm.pipeline import build_prompt, run
from sparsevlm.testing import masked_oracle_generate, tiny_llava

ARCHS = ["llama", "qwen2"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    model, processor = tiny_llava(request.param, layers=8, image_size=112)
    return request.param, model, processor


def _image(seed=0, size=(150, 110)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _inputs(processor, question="what colour is the shape ?", seed=0):
    return processor(images=_image(seed), text=build_prompt(processor, question), return_tensors="pt")


@torch.no_grad()
def test_dense_hooks_leave_logits_identical(tiny):
    _, model, processor = tiny
    inputs = _inputs(processor)
    ref = model(**inputs).logits
    with PruneHooks(model, PruneConfig(method="dense")) as hooks:
        got = model(**inputs).logits
    assert hooks.state.layer_inputs == [64] * 8  # the hooks did run
    assert torch.allclose(ref, got, atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("prune_layers", [(1, 2, 4), (3,)])
def test_rater_rows_equal_eager_attention(tiny, prune_layers):
    arch, _, processor = tiny
    model, _ = tiny_llava(arch, layers=8, image_size=112)
    model.set_attn_implementation("eager")
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads  # GQA
    inputs = _inputs(processor)
    cfg = PruneConfig(method="sparsevlm", budget=40, prune_layers=prune_layers, recycle=False)
    with PruneHooks(model, cfg, keep_debug=True) as hooks:
        out = model(**inputs, output_attentions=True)
    st = hooks.state
    assert set(st.rows_attention) == set(prune_layers)
    for layer in prune_layers:
        stage = next(s for s in st.stages if s.after_layer == layer)
        text_start = st.prefix + stage.visual_in
        rows = st.raters + text_start
        eager = out.attentions[layer][0].float().mean(dim=0)[rows]  # (r, n) head mean
        assert eager.shape == st.rows_attention[layer].shape
        assert torch.allclose(st.rows_attention[layer], eager, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("method", ["sparsevlm", "fastv"])
def test_keep_positions_pruning_equals_masked_full_sequence(tiny, method):
    _, model, processor = tiny
    inputs = _inputs(processor)
    cfg = PruneConfig(method=method, budget=32, positions="keep",
                      **({"recycle": False} if method == "sparsevlm" else {}))
    gen = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with PruneHooks(model, cfg) as hooks:
        pruned = model.generate(**inputs, **gen)
    st = hooks.state
    assert st.stages and all(s.visual_out < s.visual_in for s in st.stages)
    oracle = masked_oracle_generate(model, inputs, st, **gen)
    assert torch.equal(pruned.sequences, oracle.sequences)
    for a, b in zip(pruned.logits, oracle.logits):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("method", ["sparsevlm", "fastv", "fastervlm", "random"])
@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_every_method_generates_greedy_and_sampling(tiny, method, positions):
    arch, model, processor = tiny
    lm = from_objects(model, processor)
    cfg = PruneConfig(method=method, budget=32, positions=positions)
    if method == "fastervlm" and arch == "qwen2":
        with pytest.raises(ConfigError, match=r"\[CLS\]"):
            run(lm, _image(), "what colour is the shape?", cfg, max_new_tokens=3)
        return
    greedy = run(lm, _image(), "what colour is the shape?", cfg, max_new_tokens=4)
    sampled = run(lm, _image(), "what colour is the shape?", cfg, max_new_tokens=4, do_sample=True, seed=1)
    flops = run(lm, _image(), "what colour is the shape?", replace(cfg, accounting="flops"), max_new_tokens=2)
    assert abs(flops.trace.cost.equal_tokens - 32) <= 1.0  # flops accounting: input-counted equal tokens
    assert flops.trace.cost.budget_counting == "input" and flops.trace.cost.budget_met
    paper_counting = {"sparsevlm": "output", "fastv": "kept"}.get(method, "input")
    for r in (greedy, sampled):
        t = r.trace
        assert t.generated_tokens >= 1
        assert t.cost.accounting == "paper" and t.cost.budget_counting == paper_counting
        assert t.cost.budget_met and abs(t.cost.budget_figure - 32) <= 1.0
        assert t.config["positions"] == positions
        assert t.cost.prefill_flops < t.cost.prefill_flops_dense
        assert t.cost.kv_bytes < t.cost.kv_bytes_dense
        assert [rec.visual_in for rec in t.layers][0] == (64 if method in ("sparsevlm", "fastv") else 32)
        assert t.timings_ms.prefill > 0 and t.timings_ms.total >= t.timings_ms.prefill


@torch.no_grad()
def test_recycled_tokens_record_cluster_membership(tiny):
    _, model, processor = tiny
    lm = from_objects(model, processor)
    t = run(lm, _image(), "what colour is the shape?", PruneConfig(budget=32), max_new_tokens=2).trace
    first = t.stages[0]
    assert first.clusters >= 1 and first.merged
    assert first.visual_out == len(first.kept) + len(first.merged) == first.visual_in - first.deleted + first.clusters
    members = [p for m in first.merged for p in m.members]
    assert len(members) == len(set(members)) == first.recycled  # each recycled patch in exactly one cluster
    assert not set(members) & set(first.kept)  # recycled tokens were deleted, not kept
    assert all(m.center in m.members for m in first.merged)
    assert t.raters and any(r.rater for r in t.raters) and len(t.raters) == t.text_tokens


@torch.no_grad()
def test_calls_do_not_leak_state_and_removal_restores_model(tiny):
    arch, model, processor = tiny
    inputs = _inputs(processor)
    vanilla = model(**inputs).logits
    model.generate(**inputs, max_new_tokens=2)  # transformers installs its own output-capturing hooks lazily

    def installed_hooks():
        return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}

    before = installed_hooks()
    lm = from_objects(model, processor)
    cfg = PruneConfig(budget=32)
    a1 = run(lm, _image(1), "what colour is the shape?", cfg, max_new_tokens=4)
    b1 = run(lm, _image(2), "how many circle are there?", cfg, max_new_tokens=4)
    fresh_model, fresh_processor = tiny_llava(arch, layers=8, image_size=112)
    fresh = from_objects(fresh_model, fresh_processor)
    b2 = run(fresh, _image(2), "how many circle are there?", cfg, max_new_tokens=4)
    assert b1.answer == b2.answer
    def decisions(t):  # everything but the measured overhead time
        return [{k: v for k, v in s.__dict__.items() if k != "overhead_ms"} for s in t.stages]

    assert decisions(b1.trace) == decisions(b2.trace)
    assert [r.__dict__ for r in b1.trace.raters] == [r.__dict__ for r in b2.trace.raters]
    assert decisions(a1.trace) != decisions(b1.trace)
    assert installed_hooks() == before
    assert torch.equal(model(**inputs).logits, vanilla)


@torch.no_grad()
def test_batch_larger_than_one_is_a_clear_error(tiny):
    _, model, processor = tiny
    prompt = build_prompt(processor, "what colour is the shape ?")
    inputs = processor(images=[_image(0), _image(1)], text=[prompt, prompt], return_tensors="pt")
    with PruneHooks(model, PruneConfig(budget=32)), pytest.raises(ConfigError, match="batch size 2"):
        model(**inputs)


def test_budget_above_grid_and_unreachable_budgets_are_clear_errors(tiny):
    _, model, _ = tiny
    with pytest.raises(ConfigError, match="larger than the image grid"):
        PruneHooks(model, PruneConfig(budget=65))
    for method in ("fastv", "sparsevlm"):  # flops accounting: a budget the depth cannot reach is an error
        with pytest.raises(ConfigError, match="below what pruning after layer"):
            PruneHooks(model, PruneConfig(method=method, budget=8, accounting="flops"))
    # paper accounting: every budget <= the grid runs (FastV keeps 8; SparseVLM runs its smallest schedule)
    assert PruneHooks(model, PruneConfig(method="fastv", budget=8)).plan.counts.budget_met
    assert not PruneHooks(model, PruneConfig(method="sparsevlm", budget=8)).plan.counts.budget_met


@torch.no_grad()
def test_adaptive_count_modes_follow_their_formulas(tiny):
    _, model, processor = tiny
    lm = from_objects(model, processor)
    paper = run(lm, _image(), "what colour is the shape?",
                PruneConfig(count_mode="paper", lam=0.5, recycle=False), max_new_tokens=2).trace
    assert paper.stages
    for s in paper.stages:  # eq. 8: N = floor(lambda (Lv - rank))
        assert s.deleted == int(0.5 * (s.visual_in - s.rank)) and s.visual_out == s.visual_in - s.deleted
    code = run(lm, _image(), "what colour is the shape?",
               PruneConfig(count_mode="code", scale=3.0, bias=2.0, recycle=True), max_new_tokens=2).trace
    for s in code.stages:  # kept = min(int(rank * scale + bias), Lv - 1), recycled clusters on top
        kept = min(int(s.rank * 3.0 + 2.0), s.visual_in - 1)
        assert s.visual_out == kept + s.clusters and s.deleted == s.visual_in - kept


@torch.no_grad()
def test_fastv_k_counts_layers_as_fastv_does():
    """FastV K = 2 (the default on 32 layers): layers 0-1 see every visual token, the last token's head-mean
    attention row IN LAYER 1 ranks them, and layers 2.. see the top k (reference: `layer_idx == FASTV_k - 1`)."""
    model, processor = tiny_llava("llama", layers=32, image_size=112)
    model.set_attn_implementation("eager")
    inputs = _inputs(processor)
    with PruneHooks(model, PruneConfig(method="fastv", budget=16)) as hooks:
        out = model(**inputs, output_attentions=True)
    rec = hooks.record()
    assert [s.after_layer for s in rec.stages] == [1]
    assert rec.layer_inputs[:3] == [64, 64, 16] and set(rec.layer_inputs[2:]) == {16}  # paper: 16 kept after K-1
    last_row = out.attentions[1][0].float().mean(dim=0)[-1, rec.prefix : rec.prefix + 64]
    assert torch.allclose(torch.tensor(rec.stages[0].scores), last_row, atol=1e-6, rtol=0)
    assert rec.stages[0].kept == sorted(torch.topk(last_row, 16).indices.tolist())
    with PruneHooks(model, PruneConfig(method="fastv", budget=16, fastv_k=5)) as hooks:
        model(**inputs)
    assert [s.after_layer for s in hooks.record().stages] == [4]


def _image_token_happy(model, processor):
    """The same model with an lm_head bias that makes it generate the image token's id at every step."""
    image_id = model.config.image_token_id
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[image_id] = 100.0
    model.lm_head = head
    return model


@torch.no_grad()
@pytest.mark.parametrize("method", ["sparsevlm", "fastv", "random"])
def test_generating_the_image_token_is_a_decode_step_not_a_new_prefill(method):
    model, processor = tiny_llava("llama", layers=8, image_size=112)
    model = _image_token_happy(model, processor)
    inputs = _inputs(processor)
    with PruneHooks(model, PruneConfig(method=method, budget=32)) as hooks:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert new.tolist() == [model.config.image_token_id] * 3  # the case the bug needs
    rec = hooks.record()
    assert len(rec.forward_ms) == 3 and rec.stages  # one prefill that pruned, two decode steps


class _Probe(PruneMethod):
    """A method that records what the plumbing hands it and keeps every token (a skipped stage)."""

    name = "probe"
    label = "probe"

    def plan(self, cfg, geo):
        return Plan((StageSpec(2, None, attention=True),), "keep")

    def select(self, cfg, inp):
        last = torch.tensor([inp.hidden.shape[0] - 1])
        inp.memo.update(rows=inp.attention_rows(last), heads=inp.head_attention_rows(last),
                        next=inp.next_attention_rows(last), keys=inp.keys(), rotary=inp.rotary(inp.positions),
                        norm=inp.final_norm(inp.hidden), projector=inp.projector, patches=inp.patches)
        return Selection(torch.arange(inp.visual), torch.zeros(inp.visual), "probe")


@torch.no_grad()
def test_stage_input_matches_the_eager_model(tiny):
    """What a method gets (attention rows, per head and at the next layer, post-RoPE keys, rotary, final norm)
    equals what the eager model computes."""
    arch, _, processor = tiny
    model, _ = tiny_llava(arch, layers=8, image_size=112)
    model.set_attn_implementation("eager")
    inputs = _inputs(processor)
    probe = _Probe()
    with PruneHooks(model, PruneConfig(method="fastv", budget=32), method=probe) as hooks:
        out = model(**inputs, output_attentions=True, output_hidden_states=True, use_cache=True)
    memo = hooks.state.memo
    eager2, eager3 = out.attentions[2][0].float(), out.attentions[3][0].float()
    assert torch.allclose(memo["heads"][:, 0], eager2[:, -1], atol=1e-5, rtol=0)
    assert torch.allclose(memo["rows"][0], eager2.mean(0)[-1], atol=1e-5, rtol=0)
    assert torch.allclose(memo["next"][0], eager3.mean(0)[-1], atol=1e-5, rtol=0)
    assert torch.allclose(memo["keys"], out.past_key_values.layers[2].keys[0].float(), atol=1e-5, rtol=0)
    lm = model.model.language_model
    assert torch.allclose(memo["norm"], lm.norm(out.hidden_states[3][0]), atol=1e-5, rtol=0)
    n = out.hidden_states[0].shape[1]
    cos, _ = lm.rotary_emb(out.hidden_states[0], torch.arange(n)[None])
    assert torch.allclose(memo["rotary"][0], cos[0], atol=1e-6)
    assert memo["patches"] == list(range(64)) and memo["projector"].shape[0] == 64
    assert [s.formula for s in hooks.record().stages] == ["probe"]
