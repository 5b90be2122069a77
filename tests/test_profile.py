"""The attention profile every trace records: FasterVLM's shift and dispersion statistics on hand-built attention,
and the recorded rows against eager attention's own weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm import profile as P
from sparsevlm.config import PruneConfig
from sparsevlm.loading import from_objects
from sparsevlm.methods import METHODS, ModelGeometry, attention_read_layers, get_method
from sparsevlm.pipeline import build_prompt, run
from sparsevlm.testing import tiny_llava


def test_lower_half_share_on_hand_built_attention():
    # 4 x 4 grid: rows 2 and 3 are the lower half
    att = [0.0] * 16
    att[1], att[9], att[14] = 0.5, 0.25, 0.25
    assert P.lower_share(att, list(range(16)), 4, 4) == pytest.approx(0.5)
    # 3 x 3 grid: the middle row counts half
    att = [0.0] * 9
    att[4], att[7] = 0.4, 0.6
    assert P.lower_share(att, list(range(9)), 3, 3) == pytest.approx(0.2 + 0.6)
    assert P.lower_share([0.0] * 4, list(range(4)), 2, 2) == 0.0


def test_top20_share_on_hand_built_attention():
    att = [10.0] + [1.0] * 9  # top 20% of 10 tokens = 2 tokens
    assert P.top_share(att) == pytest.approx(11 / 19)
    assert P.top_share([1.0] * 100) == pytest.approx(0.2)
    assert P.top_share([5.0, 0.0, 0.0]) == pytest.approx(1.0)  # ceil(0.6) = 1 token


def test_entry_maps_tokens_back_to_their_patches():
    e = P.entry([2.0, 2.0], [5, 0], 9, 3, 3)
    assert e["attention"][5] == 0.5 and e["attention"][0] == 0.5 and e["attention"][1] is None
    assert e["tokens"] == 2 and e["top20_share"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_llava("llama", layers=8, image_size=112)
    image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (100, 120, 3), dtype=np.uint8))
    return model, processor, image


@torch.no_grad()
def test_profile_rows_equal_eager_attention(tiny):
    model, processor, image = tiny
    lm = from_objects(model, processor, "tiny")
    q = "what colour is the shape ?"
    tr = run(lm, image, q, PruneConfig(method="dense"), max_new_tokens=1).trace
    geo = ModelGeometry(depth=8, grid_tokens=64, has_cls=True, heads=4, kv_heads=2)
    assert [d["layer"] for d in tr.attention_profile["decoder"]] == list(attention_read_layers(geo))
    inputs = processor(images=image, text=build_prompt(processor, q), return_tensors="pt")
    model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True)
        vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    s, v = tr.prefix_tokens, tr.visual_tokens
    for d in tr.attention_profile["decoder"]:
        a = out.attentions[d["layer"]][0].mean(dim=0)  # (n, n) head mean
        last = a[-1, s:s + v]
        prompt = a[s + v:, s:s + v].mean(dim=0)
        for got, want in ((d["last"], last), (d["prompt"], prompt)):
            assert torch.allclose(torch.tensor(got["attention"]), want / want.sum(), atol=1e-6)
            assert got["top20_share"] == pytest.approx(P.top_share((want / want.sum()).tolist()), abs=1e-6)
            assert got["lower_half_share"] == pytest.approx(
                float((want[v // 2:]).sum() / want.sum()), abs=1e-6)  # 8 x 8 grid: rows 4-7 = tokens 32-63
    layer = model.config.vision_feature_layer  # -2: the output of the second-to-last layer, its attention [-2]
    cls = vision.attentions[layer][0].mean(dim=0)[0, 1:]
    got = tr.attention_profile["cls"]
    assert torch.allclose(torch.tensor(got["attention"]), cls / cls.sum(), atol=1e-6)


@torch.no_grad()
def test_every_method_records_the_profile(tiny):
    model, processor, image = tiny
    lm = from_objects(model, processor, "tiny")
    read = attention_read_layers(ModelGeometry(depth=8, grid_tokens=64, has_cls=True, heads=4, kv_heads=2))
    for method in METHODS:
        tr = run(lm, image, "what colour is the shape ?", PruneConfig(method=method, budget=16),
                 max_new_tokens=1).trace
        prof = tr.attention_profile
        assert prof["cls"] is not None and len(prof["cls"]["attention"]) == 64
        compact = tr.summary()["attention_profile"]  # the statistics without the per-patch rows
        assert "attention" not in compact["cls"] and compact["cls"]["top20_share"] == prof["cls"]["top20_share"]
        if get_method(method).changes_attention:
            assert prof["decoder"] == []  # it shows its own view (trace.attention)
            continue
        assert [d["layer"] for d in prof["decoder"]] == list(read)
        for d in prof["decoder"]:
            present = [a for a in d["last"]["attention"] if a is not None]
            assert len(present) <= d["last"]["tokens"]
            assert sum(present) + d["last"]["unplaced"] == pytest.approx(1.0, abs=1e-4)
            assert d["last"]["unplaced"] == 0.0 or method == "visionzip"  # its [CLS] token sits at no patch
            assert 0.0 <= d["last"]["lower_half_share"] <= 1.0 and 0.2 <= d["last"]["top20_share"] <= 1.0
