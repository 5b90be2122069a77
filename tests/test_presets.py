"""Every single-grid preset's exact configuration, rebuilt at a reduced width with random weights, saved with its
processor, loaded back through the loader and run end to end with dense and every registered method; and the
overlay's mapping of patches back onto a non-square upload checked against what the preset's processor really does.
The LLaVA-NeXT presets (a base view and tiles per picture) have their own file: tests/test_presets_next.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm.config import PruneConfig
from sparsevlm.errors import ConfigError
from sparsevlm.loading import load_model
from sparsevlm.methods import METHODS, get_method
from sparsevlm.pipeline import build_prompt, run
from sparsevlm.presets import PRESETS
from sparsevlm.testing import preset_llava

HUB_PRESETS = [n for n, p in PRESETS.items() if not p.local_path]
SINGLE_GRID = [n for n, p in PRESETS.items() if not p.anyres]
UPLOAD = (300, 180)  # non-square: the CLIP presets crop its sides, SigLIP squashes it


@pytest.fixture(scope="module", params=SINGLE_GRID)
def loaded(request, tmp_path_factory):
    """The embedded preset is the real model; the hub presets are rebuilt at a reduced width and saved."""
    preset = PRESETS[request.param]
    if preset.local_path:
        return preset, load_model(preset.name)
    d = tmp_path_factory.mktemp(preset.name.replace("/", "--"))
    model, processor = preset_llava(preset.name)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return preset, load_model(str(d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rebuilt_preset_is_built_in_the_dtype_asked_for(dtype):
    """transformers builds a part in its config's own "torch_dtype" (the decoder's float16 in LLaVA-1.5's config)
    whatever the default dtype says; a rebuilt preset must be one dtype, or its first matmul across parts fails."""
    for name in HUB_PRESETS:
        model, _ = preset_llava(name, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}, name


def test_rebuilt_config_is_the_preset_exactly(loaded):
    """Everything but the widths is the published configuration."""
    preset, lm = loaded
    cfg, pub = lm.model.config, preset.data["config"]
    assert lm.num_layers == preset.decoder_layers == pub["text_config"].get("num_hidden_layers", 32)
    assert lm.grid == preset.grid and lm.visual_tokens == preset.visual_tokens
    assert lm.has_cls == preset.has_cls
    assert cfg.vision_feature_layer == pub["vision_feature_layer"]
    assert cfg.vision_feature_select_strategy == pub["vision_feature_select_strategy"]
    assert cfg.image_token_id == preset.image_token_id
    assert cfg.vision_config.num_hidden_layers == pub["vision_config"]["num_hidden_layers"]
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (
        pub["vision_config"]["image_size"], pub["vision_config"]["patch_size"])
    t = cfg.text_config
    assert t.vocab_size == pub["text_config"]["vocab_size"]
    assert t.max_position_embeddings == pub["text_config"].get("max_position_embeddings", 2048)
    if "rope_theta" in pub["text_config"]:
        assert t.rope_parameters["rope_theta"] == pub["text_config"]["rope_theta"]
    assert bool(t.tie_word_embeddings) == bool(pub["text_config"].get("tie_word_embeddings", False))
    # The image processor's geometry, as published.
    ip, pp = lm.processor.image_processor, preset.data["preprocessor_config"]
    assert dict(ip.size) == pp["size"]
    assert bool(ip.do_center_crop) == bool(pp.get("do_center_crop", False))
    if pp.get("do_center_crop"):
        assert dict(ip.crop_size) == pp["crop_size"]
    assert bool(getattr(ip, "do_pad", False)) == bool(pp.get("do_pad", False))
    assert list(ip.image_mean) == pp["image_mean"] and list(ip.image_std) == pp["image_std"]
    assert int(ip.resample) == pp["resample"]
    # The chat template as published (or none), and the image token where the config says it is.
    assert (lm.processor.chat_template or None) == preset.data["chat_template"]
    assert lm.processor.tokenizer.convert_tokens_to_ids(preset.image_token) == preset.image_token_id


def test_prompt_has_one_image_token_per_patch(loaded):
    preset, lm = loaded
    prompt = build_prompt(lm.processor, "what colour is the shape ?")
    if preset.data.get("prompt_format") and preset.data["chat_template"]:
        assert prompt == preset.data["prompt_format"].format(question="what colour is the shape ?")
    inputs = lm.processor(images=Image.new("RGB", UPLOAD), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == preset.image_token_id).sum()) == preset.visual_tokens
    size = preset.data["config"]["vision_config"]["image_size"]
    assert tuple(inputs["pixel_values"].shape[-2:]) == (size, size)


@pytest.fixture(scope="module")
def upload():
    rng = np.random.RandomState(3)
    return Image.fromarray(rng.randint(0, 255, (UPLOAD[1], UPLOAD[0], 3), dtype=np.uint8))


def test_every_method_end_to_end(loaded, upload):
    """Dense and every registered method answer; the ones the preset says do not apply fail with ConfigError."""
    preset, lm = loaded
    dense = run(lm, upload, "what colour is the shape ?", PruneConfig(method="dense"), max_new_tokens=2).trace
    assert dense.visual_tokens == preset.visual_tokens
    assert [r.visual_in for r in dense.layers] == [preset.visual_tokens] * preset.decoder_layers
    assert dense.cost.kv_bytes == dense.cost.kv_bytes_dense
    ran = []
    for method in METHODS:
        if method == "dense":
            continue
        cfg = PruneConfig(method=method, budget=128)
        if method not in preset.methods:
            with pytest.raises(ConfigError, match="CLS"):
                run(lm, upload, "what colour is the shape ?", cfg, max_new_tokens=2)
            continue
        t = run(lm, upload, "what colour is the shape ?", cfg, max_new_tokens=2).trace
        ran.append(method)
        assert len(t.layers) == preset.decoder_layers
        if get_method(method).budgeted:
            # Paper accounting (the default) meets the budget in the method's own published counting.
            assert t.cost.budget_met and t.cost.budget_figure == pytest.approx(128, abs=1.0), method
        else:  # its own rule sets the counts (ZipVL's tau): no budget claim, what it amounts to instead
            assert t.cost.budget_met is None and "no budget" in t.cost.budget_note, method
        assert t.cost.kv_bytes < dense.cost.kv_bytes
        assert t.generated_tokens >= 1
        for s in t.stages:  # every surviving token is a real patch of this grid
            assert all(0 <= p < preset.visual_tokens for p in s.kept)
    assert ran == [m for m in preset.methods if m != "dense"]


def _patch_energy(lm, image: Image.Image, background: torch.Tensor) -> np.ndarray:
    """How much each patch of the model's input changed from the background: where a marker landed."""
    pv = lm.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    rows, cols = lm.grid
    p = lm.model.config.vision_config.patch_size
    diff = (pv - background).abs().sum(0)[: rows * p, : cols * p]  # the patch conv ignores the remainder
    return diff.reshape(rows, p, cols, p).sum(dim=(1, 3)).numpy()


def test_overlay_maps_patches_back_onto_a_non_square_upload(loaded):
    """A small marker at many places of a non-square upload: the trace's input_region (what the overlay draws
    through) must name the patch the processor really put it in, and 'outside' exactly where it was cropped."""
    preset, lm = loaded
    gray = Image.new("RGB", UPLOAD, (128, 128, 128))
    background = lm.processor.image_processor(images=gray, return_tensors="pt")["pixel_values"][0]
    trace = run(lm, gray, "what colour is the shape ?", PruneConfig(method="dense"), max_new_tokens=1).trace
    x0, y0, x1, y1 = trace.input_region
    rows, cols = trace.grid
    w, h = UPLOAD
    m = 2  # marker side in upload pixels (about a quarter of a patch)
    # The scan along one axis sits mid-patch on the other (the middle row / column, as the overlay places it).
    mid_x = round(x0 + (cols // 2 + 0.5) * (x1 - x0) / cols) - 1
    mid_y = round(y0 + (rows // 2 + 0.5) * (y1 - y0) / rows) - 1
    checked = outside = 0
    for axis in ("x", "y"):
        for pos in range(0, (w if axis == "x" else h) - m + 1, 2):  # every other pixel: 240 processor calls
            box = (pos, mid_y, pos + m, mid_y + m) if axis == "x" else (mid_x, pos, mid_x + m, pos + m)
            # Where the overlay says the marker's two ends are, in patch units.
            fx = [(box[0] - x0) / (x1 - x0) * cols, (box[2] - x0) / (x1 - x0) * cols]
            fy = [(box[1] - y0) / (y1 - y0) * rows, (box[3] - y0) / (y1 - y0) * rows]
            img = gray.copy()
            img.paste((255, 255, 255), box)
            energy = _patch_energy(lm, img, background)
            if fx[1] <= 0 or fx[0] >= cols or fy[1] <= 0 or fy[0] >= rows:
                # Bicubic resampling bleeds ~2 source pixels: only markers clear of the edge must vanish.
                gap = max(x0 - box[2], box[0] - x1, y0 - box[3], box[1] - y1)
                if gap >= 2:
                    assert energy.max() < 1e-3, f"{axis}={pos}: the overlay says cropped, but it is in the input"
                    outside += 1
                continue
            col_a, col_b, row_a, row_b = int(np.floor(fx[0])), int(np.floor(fx[1] - 1e-9)), \
                int(np.floor(fy[0])), int(np.floor(fy[1] - 1e-9))
            if col_a != col_b or row_a != row_b:
                continue  # the marker straddles a patch border: either patch is right
            r, c = np.unravel_index(int(energy.argmax()), energy.shape)
            assert (r, c) == (row_a, col_a), f"{axis}={pos}: overlay says patch {(row_a, col_a)}, processor {(r, c)}"
            checked += 1
    assert checked > 80
    # Cropped sides (CLIP presets) and the strip SigLIP-384's 27 x 14 = 378-pixel grid leaves uncovered are outside.
    v = preset.data["config"]["vision_config"]
    partial = v["image_size"] % v["patch_size"] != 0
    assert (outside > 0) == bool(preset.data["preprocessor_config"].get("do_center_crop") or partial)
