"""The high-resolution one-click examples: what `training.examples --world hires` writes, offered only where the
embedded high-resolution model can be loaded, and the model switch an example click makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from app.handlers import NEXT_EXAMPLES_DIR, Handlers, next_examples
from sparsevlm.loading import ModelCache
from sparsevlm.presets import DEFAULT_PRESET, NEXT_PRESET, PRESETS
from sparsevlm.scenes import hires
from training.examples import write_examples

pytestmark = pytest.mark.skipif(NEXT_PRESET not in PRESETS, reason="assets/models/scenes-llava-next not installed")


def test_shipped_high_resolution_examples_are_what_examples_py_writes(tmp_path):
    items = write_examples(tmp_path, world="hires")
    shipped = sorted(p.name for p in NEXT_EXAMPLES_DIR.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (NEXT_EXAMPLES_DIR / name).read_bytes(), name
    # one per family, at every pinpoint size, on the model they are made for, evidence on the full-size grid
    assert [it["family"] for it in items] == list(hires.FAMILIES)
    assert {tuple(it["size"]) for it in items} == set(hires.SIZES)
    for it in items:
        w, h = it["size"]
        assert Image.open(NEXT_EXAMPLES_DIR / it["image"]).size == (w, h)
        assert it["model"] == NEXT_PRESET and it["world"] == "hires" and "evidence" not in it
        assert all(0 <= c < (w // 14) * (h // 14) for c in it["evidence_cells"])


def test_high_resolution_examples_are_offered_only_where_the_model_fits():
    items = next_examples(ModelCache(None, device="cpu"))
    assert len(items) == len(json.loads((NEXT_EXAMPLES_DIR / "examples.json").read_text()))
    assert all(Path(it["image"]).is_file() for it in items)
    assert next_examples(ModelCache(1_000_000, device="cpu")) == []  # 1 MB cannot hold its 22 MiB of weights


def test_an_example_click_switches_to_the_model_its_pictures_are_made_for():
    h = Handlers(ModelCache(None, device="cpu"), DEFAULT_PRESET, [])
    key, line, budgets, picker = h.next_example_model(DEFAULT_PRESET)
    assert key == NEXT_PRESET and NEXT_PRESET in line and "anyres" in line
    assert [c[1] for c in budgets.choices] == [640, 320, 160] and budgets.value == 320
    assert picker.value == NEXT_PRESET
    # already on it: nothing changes (the visitor's budget stays)
    key, _, budgets, _ = h.next_example_model(NEXT_PRESET)
    assert key == NEXT_PRESET and budgets.value is None
    # the server's own examples bring the server's model back from the high-resolution one ...
    key, line, budgets, picker = h.plain_example_model(NEXT_PRESET)
    assert key == DEFAULT_PRESET and budgets.value == 64 and picker.value == DEFAULT_PRESET
    # ... and run on any other model the visitor chose
    key, _, budgets, _ = h.plain_example_model("llava-hf/llava-1.5-7b-hf")
    assert key == "llava-hf/llava-1.5-7b-hf" and budgets.value is None


def test_the_studio_draws_the_high_resolution_world_and_its_evidence_is_read_as_tokens():
    from app.handlers import evidence_on, image_key, scene_truth, studio_scene, world_choices
    from sparsevlm import PruneConfig
    from sparsevlm.pipeline import run

    assert [w for _, w in world_choices("hires")][:2] == ["hires", "independent-hires"]
    assert "this model's world" in world_choices("hires")[0][0]
    image, truth = studio_scene(3, "colour", "hires")
    assert tuple(image.size) in hires.SIZES and truth["size"] == list(image.size)
    assert truth["grid"] == [image.size[1] // 14, image.size[0] // 14] and truth["evidence"]

    h = Handlers(ModelCache(None, device="cpu"), NEXT_PRESET, [])
    _, lm = h.use_model(NEXT_PRESET)
    trace = run(lm, image, truth["question"], PruneConfig(method="sparsevlm", budget=320)).trace
    layout = trace.visual_layout()
    scene = {**truth, "key": image_key(image)}
    got = scene_truth(scene, image, truth["question"], trace)
    tokens = set(got["evidence"])
    # the evidence is tokens of the base view and of the tiles, never a newline, and each such token's box
    # lies on the evidence cells
    views = layout.token_views()
    assert tokens and all(views[t] is not None for t in tokens)
    assert {views[t] for t in tokens} >= {0} and len({views[t] for t in tokens}) >= 2
    cols = image.size[0] // 14
    for t in tokens:
        x0, y0, x1, y1 = layout.token_boxes()[t]
        touched = {int(r) * cols + int(c) for r in range(int(y0 // 14), int(-(-y1 // 14)))
                   for c in range(int(x0 // 14), int(-(-x1 // 14)))}
        assert touched & set(truth["evidence"]), t
    assert evidence_on(trace, truth["evidence"], tuple(truth["grid"]), tuple(truth["size"])) == got["evidence"]
    assert scene_truth({**scene, "question": "what else ?"}, image, truth["question"], trace) is None  # edited


def test_a_high_resolution_example_run_on_the_page_outlines_its_evidence():
    """The page's handlers know the high-resolution examples' evidence too (build_app hands them both lists), and
    a run of one reads it as tokens of the base view and the tiles."""
    from app.layout import build_app

    models = ModelCache(None, device="cpu")
    high_res = next_examples(models)
    demo = build_app(models, DEFAULT_PRESET, examples=[], high_res=high_res)
    h = next(fn.fn.__self__ for fn in demo.fns.values()
             if getattr(getattr(fn, "fn", None), "__name__", "") == "next_example_model")
    from sparsevlm import PruneConfig

    e = high_res[0]
    out = h.execute(NEXT_PRESET, e["image"], e["question"], PruneConfig(method="sparsevlm", budget=320), 2, False)
    views = out.pruned.visual_layout().token_views()
    assert out.evidence and all(views[t] is not None for t in out.evidence)
    assert len({views[t] for t in out.evidence}) >= 2  # base view and a tile
