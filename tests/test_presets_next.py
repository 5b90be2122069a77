"""The LLaVA-NeXT presets (llava-hf/llava-v1.6-vicuna-7b-hf and llava-hf/llava-v1.6-mistral-7b-hf), each rebuilt
from its exact configuration at a reduced width with random weights - the same depths, CLIP-L/336 tower, pinpoints,
feature layer and strategy, anyres image processor, chat template and tokenizer specials - saved with its
processor, loaded back through the loader, and run with every method at the papers' LLaVA-NeXT budgets
(640 / 320 / 160) through the API and through the command line; plus their exact parameter counts and memory.
tests/test_presets.py does the same for the single-grid presets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sparsevlm import cost as C
from sparsevlm import layout as LY
from sparsevlm.cli import main as cli_main
from sparsevlm.config import FIXED_BUDGETS, NEXT_BUDGETS, PruneConfig
from sparsevlm.loading import load_model
from sparsevlm.methods import METHODS, get_method
from sparsevlm.pipeline import Decoding, build_prompt, layout_for, run_shared
from sparsevlm.presets import PRESETS
from sparsevlm.testing import assert_layout_is_packing, preset_llava
from sparsevlm.trace import PruneTrace

ROOT = Path(__file__).resolve().parent.parent
NEXT = [n for n, p in PRESETS.items() if p.anyres and not p.local_path]  # the hub's (the embedded one: test_ship)
QUESTION = "what colour is the shape ?"
UPLOAD = (1008, 672)  # 3:2 -> the 672 x 672 pinpoint's 2 x 2 tiles, unpadded to 32 of 48 rows: 2,144 tokens


def test_the_two_llava_next_presets_are_registered():
    assert NEXT == ["llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf"]
    for name in NEXT:
        p = PRESETS[name]
        assert p.budgets == NEXT_BUDGETS == (640, 320, 160)
        assert p.data["unverified"] and p.data["sources"]  # every field is either sourced or marked
    assert all(p.budgets == FIXED_BUDGETS for p in PRESETS.values() if not p.anyres)


@pytest.fixture(scope="module", params=NEXT)
def saved(request, tmp_path_factory):
    preset = PRESETS[request.param]
    d = tmp_path_factory.mktemp(preset.name.replace("/", "--"))
    torch.set_num_threads(1)
    model, processor = preset_llava(preset.name)
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return preset, load_model(str(d)), d


def picture(size=UPLOAD) -> Image.Image:
    img = Image.new("RGB", size, (235, 238, 242))
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse((w * 0.1, h * 0.1, w * 0.3, h * 0.4), fill=(220, 40, 40))
    d.rectangle((w * 0.6, h * 0.55, w * 0.9, h * 0.9), fill=(40, 80, 220))
    d.text((w * 0.45, h * 0.2), "A7", fill=(20, 20, 20))
    return img


# --- the configuration --------------------------------------------------------------------------------------------
def test_rebuilt_config_is_the_preset_exactly(saved):
    """Everything but the widths is the published configuration."""
    preset, lm, _ = saved
    cfg, pub = lm.model.config, preset.data["config"]
    assert type(lm.model).__name__ == "LlavaNextForConditionalGeneration" and lm.anyres
    assert lm.arch == preset.architecture == f"llava-next-{pub['text_config']['model_type']}"
    assert lm.num_layers == preset.decoder_layers == 32
    assert lm.grid == preset.grid == (24, 24) and lm.has_cls == preset.has_cls is True
    assert lm.visual_tokens == preset.visual_tokens == 2928  # a square picture: 576 + 48 x 48 + 48 newlines
    assert [list(p) for p in cfg.image_grid_pinpoints] == pub["image_grid_pinpoints"]
    assert cfg.vision_feature_layer == pub["vision_feature_layer"] == -2
    assert cfg.vision_feature_select_strategy == pub["vision_feature_select_strategy"] == "default"
    assert cfg.image_token_id == preset.image_token_id == 32000
    v = cfg.vision_config
    assert (v.model_type, v.num_hidden_layers, v.image_size, v.patch_size) == ("clip_vision_model", 24, 336, 14)
    t, pt = cfg.text_config, pub["text_config"]
    assert t.model_type == pt["model_type"]
    assert t.vocab_size == pt["vocab_size"] == 32064
    assert t.max_position_embeddings == pt["max_position_embeddings"]
    assert lm.context_length == pt["max_position_embeddings"]  # no sliding window holds it back
    assert t.rope_parameters["rope_theta"] == pt.get("rope_theta", 10000.0)
    assert not t.tie_word_embeddings
    published = preset._text_config()
    assert (t.num_attention_heads // t.num_key_value_heads ==
            published.num_attention_heads // published.num_key_value_heads)  # MHA stays MHA, GQA 4:1 stays 4:1
    if t.model_type == "mistral":
        assert t.sliding_window is None and published.num_key_value_heads == 8
    # The anyres image processor as published.
    ip, pp = lm.processor.image_processor, preset.data["preprocessor_config"]
    assert type(ip).__name__.startswith("LlavaNextImageProcessor")
    assert dict(ip.size) == pp["size"] and dict(ip.crop_size) == pp["crop_size"]
    assert [list(p) for p in ip.image_grid_pinpoints] == pp["image_grid_pinpoints"] == pub["image_grid_pinpoints"]
    assert bool(ip.do_pad) and bool(ip.do_center_crop)
    assert list(ip.image_mean) == pp["image_mean"] and list(ip.image_std) == pp["image_std"]
    assert int(ip.resample) == pp["resample"]
    # The processor, chat template and tokenizer specials.
    pc = preset.data["processor_config"]
    proc = lm.processor
    assert type(proc).__name__ == "LlavaNextProcessor"
    assert (proc.patch_size, proc.num_additional_image_tokens, proc.vision_feature_select_strategy) == (
        pc["patch_size"], pc["num_additional_image_tokens"], pc["vision_feature_select_strategy"])
    assert proc.chat_template == preset.data["chat_template"]
    tok, spec = proc.tokenizer, preset.data["tokenizer"]
    for token, i in spec["special_tokens"].items():
        assert tok.convert_tokens_to_ids(token) == i, token
    assert tok.pad_token == spec["pad_token"] and tok.bos_token == "<s>" and tok.eos_token == "</s>"
    for k, x in preset.data["generation_config"].items():
        assert getattr(lm.model.generation_config, k) == x, k


@pytest.mark.parametrize("size", [(300, 180), UPLOAD, (1100, 808), (336, 1008), (600, 100), (672, 672)])
def test_the_prompt_and_the_processors_tokens_follow_the_layout(saved, size):
    """The published prompt; the processor's image tokens are the layout's count (base view, tiles and newlines,
    as LLaVA-NeXT packs them) and its tower inputs the base view plus the chosen pinpoint's tiles."""
    preset, lm, _ = saved
    prompt = build_prompt(lm.processor, QUESTION)
    assert prompt == preset.data["prompt_format"].format(question=QUESTION)
    inputs = lm.processor(images=Image.new("RGB", size), text=prompt, return_tensors="pt")
    layout = layout_for(lm, size).check()
    assert int((inputs["input_ids"] == preset.image_token_id).sum()) == layout.total
    assert inputs["input_ids"][0, 0] == 1  # <s>
    tiles = LY.crops(size[1], size[0], preset.pinpoints, 336)
    assert tuple(inputs["pixel_values"].shape[-4:]) == (tiles, 3, 336, 336) == (len(layout.views), 3, 336, 336)
    assert layout.total <= preset.visual_tokens


@torch.no_grad()
def test_the_layout_is_the_models_own_packing(saved):
    """At the published geometry: each view cell's token holds the projector's output of its crop's patch, each
    newline token the model's image_newline."""
    _, lm, _ = saved
    model = lm.model
    inputs = lm.processor(images=picture(), text=build_prompt(lm.processor, QUESTION), return_tensors="pt")
    layout = layout_for(lm, UPLOAD)
    assert layout.total == 2144  # what plain transformers gives LLaVA-v1.6 for 1008 x 672
    assert_layout_is_packing(model, inputs, layout)


# --- every method, through the API --------------------------------------------------------------------------------
def _check(preset, layout, cfg, result, budget):
    assert not isinstance(result, Exception), (cfg.method, result)
    tr = PruneTrace.from_json(result.trace.to_json())  # what a saved trace says
    assert tr.visual_tokens == layout.total
    back = LY.VisualLayout.from_dict(tr.layout).check()  # views + newlines cover every visual token once
    assert back.to_dict() == layout.to_dict()
    assert [v["name"] for v in tr.layout["views"]][0] == "base" and len(tr.layout["newlines"]) > 0
    assert len(tr.layers) == preset.decoder_layers
    assert tr.generated_tokens >= 1
    if cfg.method == "dense":
        assert [r.visual_in for r in tr.layers] == [layout.total] * preset.decoder_layers
        return
    assert tr.cost.kv_bytes < tr.cost.kv_bytes_dense, cfg.method
    if get_method(cfg.method).budgeted:
        assert tr.cost.budget_met, (cfg.method, budget, tr.cost.budget_figure)
        assert tr.cost.budget_figure == pytest.approx(budget, abs=1.0), (cfg.method, budget)
    else:  # ZipVL: its tau sets the counts, no budget claim
        assert tr.cost.budget_met is None and "no budget" in tr.cost.budget_note
    for s in tr.stages:  # every surviving token is a real visual token of this picture
        assert all(0 <= p < layout.total for p in s.kept), cfg.method
    if cfg.method in ("fastervlm", "visionzip"):  # per view, from each view's [CLS]
        assert "per view" in tr.stages[0].formula


@pytest.mark.parametrize("budget", NEXT_BUDGETS)
def test_every_method_meets_the_papers_budgets(saved, budget):
    """Every registered method at 640, 320 and 160 (paper accounting) on a 2,144-token picture."""
    preset, lm, _ = saved
    img = picture()
    cfgs = [PruneConfig(method=m) if m in ("dense", "zipvl") else PruneConfig(method=m, budget=budget)
            for m in METHODS]
    assert [c.method for c in cfgs if c.method in preset.methods] == [c.method for c in cfgs]  # all apply
    results = run_shared(lm, img, QUESTION, cfgs, Decoding(2))
    layout = layout_for(lm, img.size)
    for cfg, r in zip(cfgs, results, strict=True):
        _check(preset, layout, cfg, r, budget)


def test_every_method_at_equal_prefill_cost(saved):
    """The flops accounting at 320: every budgeted method at the same input-counted equal tokens."""
    preset, lm, _ = saved
    img = picture()
    cfgs = [PruneConfig(method=m, budget=320, accounting="flops") for m in METHODS
            if m != "dense" and get_method(m).budgeted]
    results = run_shared(lm, img, QUESTION, cfgs, Decoding(2))
    layout = layout_for(lm, img.size)
    for cfg, r in zip(cfgs, results, strict=True):
        _check(preset, layout, cfg, r, 320)
        assert r.trace.cost.budget_counting == "input"


# --- through the command line -------------------------------------------------------------------------------------
CLI_METHODS = {"llava-hf/llava-v1.6-vicuna-7b-hf": ("sparsevlm", "visionzip"),
               "llava-hf/llava-v1.6-mistral-7b-hf": ("fastv", "fastervlm")}


def test_the_cli_runs_the_saved_preset(saved, tmp_path):
    """`python -m sparsevlm run --model <folder>` as a user would, two methods per preset (one process each)."""
    preset, lm, folder = saved
    img = tmp_path / "p.png"
    picture().save(img)
    total = layout_for(lm, UPLOAD).total
    for method in CLI_METHODS[preset.name]:
        out = subprocess.run([sys.executable, "-m", "sparsevlm", "run", "--model", str(folder), "--image", str(img),
                              "--question", QUESTION, "--method", method, "--budget", "320", "--max-new-tokens", "2",
                              "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        d = json.loads(out.stdout)
        assert d["budget_met"] is True, (method, d["budget_figure"])
        assert d["visual_tokens"] == total
        layout = LY.VisualLayout.from_dict(d["layout"]).check()
        assert layout.total == total and [v.name for v in layout.views][0] == "base" and layout.newlines


# --- size and memory ----------------------------------------------------------------------------------------------
def test_parameter_counts_and_memory_are_exact():
    """Counted on the meta device from the published configs. LLaVA-NeXT-Vicuna-7B is LLaVA-1.5-7B plus the
    4,096-wide image_newline; the hub's fp16 shards (14.13 GB and 15.14 GB) are 2 bytes a parameter."""
    vicuna, mistral = (PRESETS[n] for n in NEXT)
    assert vicuna.parameters == PRESETS["llava-hf/llava-1.5-7b-hf"].parameters + 4096 == 7_063_431_168
    assert mistral.parameters == 7_566_747_648
    for p, shards_gb in ((vicuna, 4.99 + 4.96 + 4.18), (mistral, 4.92 * 3 + 0.380)):
        assert p.weight_bytes(2) / 1e9 == pytest.approx(shards_gb, abs=0.01)
        row = p.describe()
        assert row["weights_gib_fp16"] == round(p.weight_bytes(2) / 2**30, 2)
        assert f"{p.weight_bytes(2) / 2**30:.1f} GiB of weights" in p.hardware
        assert f"up to {p.visual_tokens:,}" in p.summary and f"up to {p.visual_tokens:,}" in p.hardware
        assert row["anyres"] and row["budgets"] == [640, 320, 160] and row["tiles"] == [2, 4]


def test_the_cost_presets_are_the_published_decoders():
    from transformers import LlavaNextConfig

    for cost_name, preset in (("llava-v1.6-vicuna-7b", NEXT[0]), ("llava-v1.6-mistral-7b", NEXT[1])):
        published = C.DecoderShape.from_config(LlavaNextConfig.from_dict(PRESETS[preset].config))
        assert C.PRESETS[cost_name] == published, cost_name


def test_the_presets_command_lists_them(capsys):
    assert cli_main(["presets"]) == 0
    out = capsys.readouterr().out
    assert cli_main(["models"]) == 0 and capsys.readouterr().out == out  # one command, two names
    for name, arch, size in ((NEXT[0], "llava-next-llama", "7.06B"), (NEXT[1], "llava-next-mistral", "7.57B")):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} "))
        assert f"{arch}, 32 layers" in row and "anyres: 24x24 base view + 2-4 tiles" in row
        assert "up to 2,928" in row and size in row
    assert cli_main(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["presets"]}
    assert rows[NEXT[1]]["parameters"] == 7_566_747_648 and rows[NEXT[1]]["architecture"] == "llava-next-mistral"


def test_the_docs_say_the_presets_own_figures():
    """docs/engine.md and docs/space.md name both presets with the parameters, weights and token count computed
    here (the figures are written out there, so they are checked here)."""
    engine = (ROOT / "docs" / "engine.md").read_text().replace("\n", " ")
    space = (ROOT / "docs" / "space.md").read_text()
    for name in NEXT:
        p = PRESETS[name]
        gib = f"{p.weight_bytes(2) / 2**30:.2f} GiB"
        assert f"`{name}`" in engine and f"`{name}`" in space
        assert f"{p.parameters / 1e9:.2f}B parameters, {gib}" in engine.replace(" in fp16", "")
        assert gib in space
        assert f"up to {p.visual_tokens:,} visual tokens" in engine and f"up to {p.visual_tokens:,} visual" in space
    assert "640 / 320 / 160" in engine
