"""The Mistral decoder (LLaVA-v1.6-Mistral's family) under the engine's hooks.

Mistral-7B-Instruct-v0.2's decoder layer is Llama's (q/k/v/o projections, RoPE, RMSNorm, SwiGLU, GQA) plus an
optional sliding attention window, which v0.2 does not use (`sliding_window: null`). So a Mistral decoder given a
Llama decoder's weights must make every decision, and give every answer, exactly as the Llama one does: that is
what these tests check, method by method, on both model classes, with the keep-positions oracle and the rater rows
against eager attention. A Mistral that does set a window is held to it (`LoadedModel.context_length`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm import layout as LY
from sparsevlm.config import PruneConfig
from sparsevlm.errors import InputError
from sparsevlm.hooks import PruneHooks
from sparsevlm.loading import from_objects, load_model
from sparsevlm.methods import METHODS
from sparsevlm.pipeline import Decoding, build_prompt, run, run_shared
from sparsevlm.testing import masked_oracle_generate, tiny_llava, tiny_llava_next, two_shapes

QUESTION = "what colour is the circle ?"


picture = two_shapes


def pair(family: str, **kw):
    """The same tiny model twice: a Llama decoder and a Mistral decoder holding the Llama one's weights."""
    build = tiny_llava_next if family == "llava-next" else tiny_llava
    llama, processor = build("llama", **kw)
    mistral, _ = build("mistral", **kw)
    mistral.load_state_dict(llama.state_dict(), strict=True)
    return llama, mistral, processor


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def models(request):
    kw = {"image_size": 112} if request.param == "llava" else {}
    return (request.param, *pair(request.param, **kw))


def test_the_mistral_decoder_is_what_it_says(models):
    family, llama, mistral, _ = models
    layer = mistral.model.language_model.layers[0]
    assert type(layer).__name__ == "MistralDecoderLayer"
    assert mistral.config.text_config.sliding_window is None
    t = mistral.config.text_config
    assert t.num_key_value_heads < t.num_attention_heads  # GQA, as Mistral-7B's 32/8
    lm = from_objects(mistral, _processor(models))
    assert lm.arch == ("llava-next-mistral" if family == "llava-next" else "llava-mistral")
    assert lm.context_length == t.max_position_embeddings  # no window: the whole context


def _processor(models):
    return models[3]


@pytest.mark.parametrize("accounting", ["paper", "flops"])
def test_every_method_decides_exactly_as_on_the_llama_decoder(models, accounting):
    """Every registered method on the Mistral decoder: the same kept tokens at every stage, the same per-layer
    counts, the same answer and the same cost figures as on the Llama decoder with the same weights."""
    family, llama, mistral, processor = models
    img = picture()
    cfgs = [PruneConfig(method=m) if m in ("dense", "zipvl") else
            PruneConfig(method=m, budget=32, accounting=accounting) for m in METHODS]
    got = {}
    for name, model in (("llama", llama), ("mistral", mistral)):
        got[name] = run_shared(from_objects(model, processor, name), img, QUESTION, cfgs, Decoding(3))
    for cfg, a, b in zip(cfgs, got["llama"], got["mistral"], strict=True):
        assert not isinstance(a, Exception) and not isinstance(b, Exception), (cfg.method, a, b)
        ta, tb = a.trace, b.trace
        assert b.answer == a.answer, cfg.method
        assert [list(s.kept) for s in tb.stages] == [list(s.kept) for s in ta.stages], cfg.method
        assert [r.visual_in for r in tb.layers] == [r.visual_in for r in ta.layers], cfg.method
        assert tb.cost.budget_met == ta.cost.budget_met and tb.cost.kv_bytes == ta.cost.kv_bytes, cfg.method
        assert tb.cost.prefill_flops == ta.cost.prefill_flops, cfg.method
        if cfg.method not in ("dense", "zipvl"):
            assert tb.cost.budget_met, (cfg.method, tb.cost.budget_figure)
        if family == "llava-next":
            layout = LY.VisualLayout.from_dict(tb.layout).check()
            assert layout.total == tb.visual_tokens and not layout.single


@torch.no_grad()
@pytest.mark.parametrize("method", ["sparsevlm", "fastv"])
def test_keep_positions_pruning_equals_masked_full_sequence(models, method):
    """The pruned Mistral call equals the full sequence with the removed tokens masked from every later layer."""
    family, _, model, processor = models
    img = picture()
    inputs = processor(images=img, text=build_prompt(processor, QUESTION), return_tensors="pt")
    options = {"recycle": False} if method == "sparsevlm" else {}
    cfg = PruneConfig(method=method, budget=32, positions="keep", **options)
    gen = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    # The request's layout, as the pipeline gives it (generate() encodes the image before the model's forward, so
    # the call itself carries no image_sizes).
    layout = LY.for_model(model.config, img.size) if family == "llava-next" else None
    with PruneHooks(model, cfg, layout=layout) as hooks:
        pruned = model.generate(**inputs, **gen)
    st = hooks.state
    assert st.stages and all(s.visual_out < s.visual_in for s in st.stages)
    oracle = masked_oracle_generate(model, inputs, st, **gen)
    assert torch.equal(pruned.sequences, oracle.sequences)
    for a, b in zip(pruned.logits, oracle.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_rater_rows_equal_the_mistral_layers_eager_attention():
    """The rows the hooks recompute from the captured q/k are the Mistral layer's own attention (GQA, RoPE)."""
    model, processor = tiny_llava("mistral", image_size=112)
    model.set_attn_implementation("eager")
    inputs = processor(images=picture(), text=build_prompt(processor, QUESTION), return_tensors="pt")
    cfg = PruneConfig(method="sparsevlm", budget=40, prune_layers=(1, 3), recycle=False)
    with PruneHooks(model, cfg, keep_debug=True) as hooks:
        out = model(**inputs, output_attentions=True)
    st = hooks.state
    for layer in (1, 3):
        stage = next(s for s in st.stages if s.after_layer == layer)
        rows = st.raters + st.prefix + stage.visual_in
        eager = out.attentions[layer][0].float().mean(dim=0)[rows]
        assert torch.allclose(st.rows_attention[layer], eager, atol=1e-5, rtol=0)


def test_a_saved_llava_next_mistral_folder_loads_and_runs(tmp_path):
    model, processor = tiny_llava_next("mistral")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.arch == "llava-next-mistral" and lm.anyres
    r = run(lm, picture(), QUESTION, PruneConfig(method="visionzip", budget=24), max_new_tokens=2)
    assert r.trace.cost.budget_met and r.trace.layout["newlines"]


def test_a_sliding_window_holds_the_context_to_the_window():
    """A Mistral with a sliding window: requests that fit the window run exactly as on the Llama decoder (the window
    never binds), a longer one gets the context message instead of silently wrong pruning."""
    llama, mistral, processor = pair("llava-next", sliding_window=90)
    lm = from_objects(mistral, processor, "windowed")
    assert lm.context_length == 90
    small = picture((168, 112))  # the base view, 2 tiles, newlines and the question: 80 tokens
    cfgs = [PruneConfig(method=m, budget=32) for m in ("sparsevlm", "fastv", "pyramiddrop")] + [
        PruneConfig(method="zipvl")]
    a = run_shared(from_objects(llama, processor), small, QUESTION, cfgs, Decoding(3), raise_errors=True)
    b = run_shared(lm, small, QUESTION, cfgs, Decoding(3), raise_errors=True)
    for x, y in zip(a, b, strict=True):
        assert y.answer == x.answer and [list(s.kept) for s in y.trace.stages] == [list(s.kept) for s in x.trace.stages]
    big = Image.fromarray(np.full((168, 168, 3), 200, dtype=np.uint8))  # 2 x 2 tiles: 98 tokens with the question
    assert LY.for_model(mistral.config, big.size).total > LY.for_model(mistral.config, small.size).total
    with pytest.raises(InputError, match="context of 90"):
        run(lm, big, QUESTION, PruneConfig(method="fastv", budget=32), max_new_tokens=2)
