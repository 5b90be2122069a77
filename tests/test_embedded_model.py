"""The shipped scenes-llava model: loads offline, LLaVA-1.5 shape, fits the size cap, answers held-out questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sparsevlm.scenes.evaluate import answer
from sparsevlm.scenes.generator import FAMILIES, heldout_sample, render
from sparsevlm.tokenizer import prompt_for

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "models" / "scenes-llava"
MAX_BYTES = 40 * 1024 * 1024
# Floor on a few held-out questions, set from the dense accuracy measured for the shipped export (model card):
# raise it with each better export. It sits below the measurement so a handful of questions cannot flake.
MIN_ACCURACY = 0.9  # measured: 99.2% on 3000 held-out questions (model card)
N_PER_FAMILY = 3

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "config.json").is_file(),
    reason=f"embedded model not exported yet ({MODEL_DIR} has no config.json); "
    "run python -m sparsevlm.scenes.train --export assets/models/scenes-llava",
)


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(str(MODEL_DIR), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(MODEL_DIR), local_files_only=True)
    return model, processor


def test_folder_fits_the_size_cap():
    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MiB"
    assert list(MODEL_DIR.glob("*.safetensors")), "weights must be safetensors"
    assert (MODEL_DIR / "README.md").is_file()


def test_llava_15_architecture(loaded):
    model, processor = loaded
    cfg = model.config
    assert cfg.vision_config.model_type == "clip_vision_model"  # CLIP keeps a [CLS] token
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu"
    assert cfg.text_config.model_type == "llama"
    assert cfg.text_config.num_hidden_layers >= 8
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == 576

    scene, sample = heldout_sample(0)
    enc = processor(images=render(scene), text=prompt_for(sample.question), return_tensors="pt")
    assert int((enc["input_ids"] == cfg.image_token_id).sum()) == 576
    assert tuple(enc["pixel_values"].shape[-2:]) == (336, 336)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=enc["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    feats = feats[0] if isinstance(feats, (list, tuple)) else feats  # one entry per image
    assert feats.reshape(-1, cfg.text_config.hidden_size).shape[0] == 576


def test_answers_held_out_questions(loaded):
    model, processor = loaded
    items = [heldout_sample(i) for i in range(N_PER_FAMILY * len(FAMILIES))]
    preds = answer(model, processor, [render(sc) for sc, _ in items], [s.question for _, s in items])
    correct = [p == s.answer for p, (_, s) in zip(preds, items, strict=True)]
    report = [(s.question, s.answer, p) for p, (_, s) in zip(preds, items, strict=True)]
    assert sum(correct) / len(correct) >= MIN_ACCURACY, json.dumps(report, indent=1)
