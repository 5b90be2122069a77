"""The embedded scenes-llava model: loads offline, has LLaVA-1.5's shape, fits the size cap, answers its own world.

Every check follows the model's own world (`worlds.world_of_model`) and takes its accuracy floor from the figure
measured for that export and recorded in its folder (`eval_heldout_<n>.json`, read by `model_card.own_eval`), so
installing another model (scripts/ship_v2.sh) needs no edit here.
SPARSEVLM_EMBEDDED_TEST_MODEL=DIR runs the same checks on another folder (e.g. a ship_v2.sh --dest rehearsal).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sparsevlm.scenes.world import FAMILIES
from sparsevlm.scenes.worlds import heldout_item, studio_item, world_of_model
from sparsevlm.tokenizer import prompt_for
from training.evaluate import answer
from training.model_card import BAR_QUESTIONS, accuracy_floor, own_eval

MODELS = Path(__file__).resolve().parents[1] / "assets" / "models"
MAX_BYTES = 40 * 1024 * 1024
N_PER_FAMILY = 3
FIXED_SEED = 0  # the studio's scene 0 of each family (studio_item(0, family, world)): fixed, not picked

_dirs = [MODELS / "scenes-llava"]
if os.environ.get("SPARSEVLM_EMBEDDED_TEST_MODEL"):
    _dirs = [Path(os.environ["SPARSEVLM_EMBEDDED_TEST_MODEL"])]
MODEL_DIRS = [d for d in _dirs if (d / "config.json").is_file()]

pytestmark = pytest.mark.skipif(
    not MODEL_DIRS,
    reason=f"embedded model not exported yet ({_dirs[0]} has no config.json); "
    "train it (scripts/train_v2.sh) and install it (scripts/ship_v2.sh)",
)


@pytest.fixture(scope="module", params=MODEL_DIRS, ids=[d.name for d in MODEL_DIRS])
def model_dir(request) -> Path:
    return request.param


@pytest.fixture(scope="module")
def loaded(model_dir):
    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return model, processor, world_of_model(model_dir)


def test_folder_fits_the_size_cap(model_dir):
    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"{total / 2**20:.1f} MiB"
    assert list(model_dir.glob("*.safetensors")), "weights must be safetensors"
    assert (model_dir / "README.md").is_file()


def test_measured_accuracy_is_recorded_for_its_own_world(model_dir):
    """The floors below come from this file: it must exist, be of the model's own world and be large enough."""
    record = own_eval(model_dir)
    assert record is not None, f"{model_dir} has no eval_*.json of world {world_of_model(model_dir)}"
    assert record["overall"]["total"] >= BAR_QUESTIONS
    assert set(FAMILIES) <= set(record)


def test_llava_15_architecture(loaded):
    model, processor, world = loaded
    cfg = model.config
    assert cfg.vision_config.model_type == "clip_vision_model"  # CLIP keeps a [CLS] token
    assert cfg.vision_feature_layer == -2
    assert cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu"
    assert cfg.text_config.model_type == "llama"
    assert cfg.text_config.num_hidden_layers >= 8
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
    assert (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 == 576

    item = heldout_item(0, world=world)
    enc = processor(images=item.image, text=prompt_for(item.sample.question), return_tensors="pt")
    assert int((enc["input_ids"] == cfg.image_token_id).sum()) == 576
    assert tuple(enc["pixel_values"].shape[-2:]) == (336, 336)
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=enc["pixel_values"])
    feats = getattr(feats, "pooler_output", feats)
    feats = feats[0] if isinstance(feats, (list, tuple)) else feats  # one entry per image
    assert feats.reshape(-1, cfg.text_config.hidden_size).shape[0] == 576


def test_answers_held_out_questions_of_its_world(loaded, model_dir):
    """A few held-out questions of the model's own world, above a floor derived from its recorded accuracy
    (`accuracy_floor`: three binomial standard deviations and one question below it, so this cannot flake)."""
    model, processor, world = loaded
    record = own_eval(model_dir)
    assert record is not None
    items = [heldout_item(i, world=world) for i in range(N_PER_FAMILY * len(FAMILIES))]
    preds = answer(model, processor, [it.image for it in items], [it.sample.question for it in items])
    correct = [p == it.sample.answer for p, it in zip(preds, items, strict=True)]
    floor = accuracy_floor(record["overall"]["accuracy"], len(items))
    report = [(it.sample.question, it.sample.answer, p) for p, it in zip(preds, items, strict=True)]
    assert sum(correct) / len(correct) >= floor, json.dumps(report, indent=1)


# Fixed scenes an installed model is known to get wrong, each with its measured context, listed and not skipped:
# the test fails on any other miss, and fails as well once a listed one is answered right, so no entry can outlive
# its miss. The installed model (count 92.5% on 3000 held-out questions) answers every fixed scene right.
KNOWN_MISSES: dict[tuple[str, str], str] = {}


def test_answers_one_fixed_scene_of_each_family(loaded):
    """The model answers one fixed scene from each family of its world correctly (but the listed
    known misses, which must still be misses)."""
    model, processor, world = loaded
    items = [studio_item(FIXED_SEED, family, world) for family in FAMILIES]
    preds = answer(model, processor, [it.image for it in items], [it.sample.question for it in items])
    wrong = {(world, it.sample.family): f"{it.sample.question} -> {p!r} ({it.sample.answer})"
             for p, it in zip(preds, items, strict=True) if p != it.sample.answer}
    known = {k: v for k, v in KNOWN_MISSES.items() if k[0] == world}
    assert wrong == known, f"world {world}, seed {FIXED_SEED}: wrong {wrong}, known misses {known}"
