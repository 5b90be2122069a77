"""LLaVA-NeXT (anyres) in the engine: the per-request visual layout, and every method on a tiny random
LlavaNextForConditionalGeneration built offline (sparsevlm.testing.tiny_llava_next)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsevlm import layout as LY
from sparsevlm.config import PruneConfig
from sparsevlm.loading import from_objects
from sparsevlm.methods import METHODS
from sparsevlm.pipeline import Decoding, layout_for, run, run_shared
from sparsevlm.testing import assert_layout_is_packing, tiny_llava, tiny_llava_next, two_shapes
from sparsevlm.trace import PruneTrace

ROOT = Path(__file__).resolve().parent.parent
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SIZES = [(168, 112), (100, 80), (56, 168), (112, 112), (300, 40)]


@pytest.fixture(scope="module")
def next_lm():
    model, processor = tiny_llava_next()
    return from_objects(model, processor, "tiny-next")


picture = two_shapes


# --- the layout ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,tokens", [((1008, 672), 2144), ((500, 400), 2438), ((336, 1008), 2376)])
def test_llava_v16_token_counts(size, tokens):
    """The counts plain transformers gives LLaVA-v1.6 (336-px tiles, its five pinpoints) for these pictures."""
    layout = LY.anyres(size, V16_PINPOINTS, 336, 24)
    assert layout.total == tokens
    layout.check()


@pytest.mark.parametrize("size", SIZES)
def test_layout_matches_the_processors_count_and_the_models_packing(next_lm, size):
    """Views plus newlines cover every visual token once; each view cell's token holds exactly the projector's
    output of that crop's patch, and each newline token the model's image_newline."""
    model, processor = next_lm.model, next_lm.processor
    img = picture(size)
    layout = layout_for(next_lm, size)
    layout.check()
    inputs = processor(images=img, text="<image> what", return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == layout.total
    assert_layout_is_packing(model, inputs, layout)


def test_views_have_boxes_in_the_upload_and_a_lower_half():
    layout = LY.anyres((1008, 672), V16_PINPOINTS, 336, 24)
    names = [v.name for v in layout.views]
    assert names == ["base", "tile 0,0", "tile 0,1", "tile 1,0", "tile 1,1"]
    assert layout.views[0].box == (0.0, 0.0, 1008.0, 672.0)
    x0, y0, x1, y1 = layout.views[4].box
    assert (x0, x1) == pytest.approx((504, 1008)) and y1 == pytest.approx(672, abs=1)
    weights = layout.lower_weights()
    assert [weights[t] for t in layout.views[1].tokens] == [0.0] * len(layout.views[1].tokens)
    assert set(weights[t] for t in layout.views[3].tokens) == {1.0}
    back = LY.VisualLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert back.total == layout.total and back.newlines == layout.newlines
    for a, b in zip(back.token_boxes(), layout.token_boxes(), strict=True):
        assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, abs=1e-3))


def test_llava15_layout_is_its_one_grid_over_the_input_region():
    model, processor = tiny_llava("llama")
    lm = from_objects(model, processor)
    tr = run(lm, picture((200, 150)), "what colour is the circle ?", PruneConfig(budget=16), max_new_tokens=2).trace
    layout = tr.visual_layout()
    assert layout.single and layout.views[0].grid == tuple(tr.grid)
    assert layout.views[0].box == pytest.approx(tr.input_region)
    assert tr.layout["views"][0]["tokens"] == list(range(tr.visual_tokens))


# --- every method on LLaVA-NeXT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("accounting", ["paper", "flops"])
def test_every_method_runs_on_llava_next_and_meets_its_budget(next_lm, accounting):
    img = picture((168, 112))
    cfgs = [PruneConfig(method=m) if m in ("dense", "zipvl") else PruneConfig(method=m, budget=32,
                                                                               accounting=accounting)
            for m in METHODS]
    results = run_shared(next_lm, img, "what colour is the circle ?", cfgs, Decoding(3))
    layout = layout_for(next_lm, img.size)
    for cfg, r in zip(cfgs, results, strict=True):
        assert not isinstance(r, Exception), (cfg.method, r)
        tr = PruneTrace.from_json(r.trace.to_json())
        assert tr.visual_tokens == layout.total
        assert LY.VisualLayout.from_dict(tr.layout).to_dict() == layout.to_dict()
        if cfg.method not in ("dense", "zipvl"):
            assert tr.cost.budget_met, (cfg.method, tr.cost.budget_figure)
        if cfg.method in ("fastervlm", "visionzip"):  # per view, from each view's [CLS]; no newline kept
            first = tr.stages[0]
            newlines = set(layout.newlines)
            assert not newlines & set(first.kept)
            assert "per view" in first.formula
            counts = [sum(1 for t in first.kept if t in set(v.tokens)) for v in layout.views]
            assert all(c > 0 for c in counts)


def test_per_view_selection_follows_each_views_own_cls(next_lm):
    """FasterVLM's kept tokens in each view are that view's top patches by its own crop's [CLS] row."""
    from sparsevlm.hooks import cls_attention
    from sparsevlm.methods.base import view_budgets
    from sparsevlm.pipeline import prepare

    img = picture((168, 112))
    prepared = prepare(next_lm, img, "what colour is the circle ?", 2)
    tr = run(next_lm, img, "what colour is the circle ?", PruneConfig(method="fastervlm", budget=20),
             max_new_tokens=2).trace
    layout = prepared.layout
    counts = view_budgets([len(v.tokens) for v in layout.views], 20)
    kept = set(tr.stages[0].kept)
    for v, n in zip(layout.views, counts, strict=True):
        row = cls_attention(next_lm.model, prepared.work.vision, v.crop)[list(v.patches)]
        want = {v.tokens[i] for i in torch.topk(row, n).indices.tolist()}
        assert want == kept & set(v.tokens)


def test_a_budget_above_the_pictures_tokens_is_a_clear_error(next_lm):
    from sparsevlm.errors import ConfigError

    with pytest.raises(ConfigError, match="larger than the image grid"):
        run(next_lm, picture((168, 112)), "what colour ?", PruneConfig(budget=500), max_new_tokens=2)


def test_the_cli_runs_a_llava_next_folder(tmp_path, next_lm):
    folder = tmp_path / "next"
    next_lm.model.save_pretrained(folder)
    next_lm.processor.save_pretrained(folder)
    img = tmp_path / "p.png"
    picture((168, 112)).save(img)
    for method in ("sparsevlm", "visionzip"):
        out = subprocess.run([sys.executable, "-m", "sparsevlm", "run", "--model", str(folder), "--image", str(img),
                              "--question", "what colour is the circle ?", "--method", method, "--budget", "24",
                              "--max-new-tokens", "2", "--json"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        d = json.loads(out.stdout)
        tr = d.get("trace", d)
        assert tr["layout"]["views"][0]["name"] == "base" and tr["layout"]["newlines"]


def test_bench_at_llava_nexts_shape_times_every_method_at_320():
    """`bench --visual next` (here at tiny width, two methods): a 672 x 672 picture on a LLaVA-NeXT with 336 px
    tiles is 2,928 visual tokens, the methods run at 320, and the goal against random's floor is reported."""
    from sparsevlm.bench import bench

    result = bench(width="tiny", runs=1, warmup=1, methods=("random", "fastv"), visual="next")
    assert result["visual_tokens"] == 2928
    rows = {r["setting"]: r for r in result["rows"]}
    assert {"dense-2928-paper", "random-320-paper", "fastv-320-flops"} <= set(rows)
    assert rows["random-320-paper"]["equal_tokens"] == 320
    assert "fastv-320-paper_time_over_flops_within_1.10x_random" in result["targets"]


def test_the_page_offers_the_papers_budgets_for_each_family(next_lm):
    from app.handlers import budget_choice, model_line

    radio = budget_choice(next_lm)
    assert [c[1] for c in radio.choices] == [640, 320, 160] and radio.value == 320
    assert "anyres" in model_line(next_lm) and "base view" in model_line(next_lm)
    model, processor = tiny_llava("llama")
    one = budget_choice(from_objects(model, processor))
    assert [c[1] for c in one.choices] == [192, 128, 96, 64] and one.value == 64


def test_the_lower_half_weights_are_computed_once_per_layout():
    """Every profile layer of every run of a request reads them: one computation per layout, copies handed out."""
    layout = LY.anyres((1008, 672), V16_PINPOINTS, 336, 24)
    a, b = layout.lower_weights(), layout.lower_weights()
    assert a == b and a is not b
    assert layout._lower_weights is layout._lower_weights
    assert len(a) == layout.total and set(a) <= {0.0, 0.5, 1.0}
