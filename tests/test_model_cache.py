"""The model cache the app's picker uses: load once, evict least recently used within a byte budget (and say
what was unloaded), clear messages for offline or unknown ids. Real models saved to real folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsevlm.cli import main
from sparsevlm.errors import ModelLoadError
from sparsevlm.loading import ModelCache, available_local_models, estimate_bytes, from_objects, model_bytes, resolve
from sparsevlm.presets import PRESETS, Preset
from sparsevlm.testing import tiny_llava

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    out = []
    for arch in ("llama", "qwen2"):
        d = tmp_path_factory.mktemp(f"cache-{arch}")
        model, processor = tiny_llava(arch, layers=4, image_size=56)
        model.save_pretrained(d)
        processor.save_pretrained(d)
        out.append(d)
    return out


def test_loads_once_and_evicts_least_recently_used(two_models):
    a, b = two_models
    size_a = estimate_bytes(resolve(str(a)), ModelCache(1).dtype)
    size_b = estimate_bytes(resolve(str(b)), ModelCache(1).dtype)
    cache = ModelCache(max_bytes=max(size_a, size_b) * 3 // 2)  # room for one model, not two
    lm_a, unloaded = cache.get(str(a))
    assert unloaded == [] and cache.loaded() == [str(a)]
    again, unloaded = cache.get(str(a))
    assert again is lm_a and unloaded == []  # loaded once
    lm_b, unloaded = cache.get(str(b))
    assert unloaded == [a.name] and cache.loaded() == [str(b)]
    assert lm_b.arch == "llava-qwen2"
    lm_a2, unloaded = cache.get(str(a))  # switching back reloads it and unloads b
    assert lm_a2 is not lm_a and unloaded == [b.name]
    assert cache.used_bytes() == model_bytes(lm_a2.model)


def test_both_kept_when_they_fit(two_models):
    a, b = two_models
    cache = ModelCache(max_bytes=2**30)
    cache.get(str(a))
    _, unloaded = cache.get(str(b))
    assert unloaded == [] and cache.loaded() == [str(a), str(b)]
    cache.get(str(a))
    assert cache.loaded() == [str(b), str(a)]  # least recently used first


def test_a_model_put_in_is_found_by_its_key():
    """A model built in code (a benchmark's random 7B shape) is served under the name it was put in with, a
    name no folder or hub id has."""
    model, processor = tiny_llava("llama", layers=2, image_size=56)
    lm = from_objects(model, processor, name="random LLaVA in memory")
    cache = ModelCache(max_bytes=2**30)
    assert cache.put("random LLaVA in memory", lm) == []
    assert cache.get("random LLaVA in memory") == (lm, [])
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelCache(max_bytes=2**30).get("random LLaVA in memory")  # in another cache it is just a name


def test_estimate_matches_loaded_size(two_models):
    for d in two_models:
        cache = ModelCache(max_bytes=2**30)
        lm, _ = cache.get(str(d))
        # The estimate reads the safetensors headers; buffers (not saved) are the only difference.
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in lm.model.parameters()}.values())
        assert estimate_bytes(resolve(str(d)), cache.dtype) == params


def test_progress_reports_until_ready(two_models):
    seen = []
    ModelCache(max_bytes=2**30).get(str(two_models[0]), progress=lambda f, msg: seen.append((f, msg)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "ready" in seen[-1][1]


def test_model_larger_than_budget_is_refused_before_loading():
    cache = ModelCache(max_bytes=2**30)
    with pytest.raises(ModelLoadError, match=r"llava-hf/llava-1.5-7b-hf needs about 26.31 GiB .* budget of 1.00 GiB"):
        cache.get("llava-1.5-7b-hf")
    assert cache.loaded() == []


def test_offline_hub_id_names_local_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = ModelCache(max_bytes=2**40)
    with pytest.raises(ModelLoadError) as e:
        cache.get("someone/not-a-cached-llava")
    msg = str(e.value)
    assert "not in the local Hugging Face cache and the hub is offline" in msg
    assert "Models available locally: scenes-llava" in msg


def test_unknown_folder_and_empty_name():
    with pytest.raises(ModelLoadError, match="does not exist.*Models available locally: scenes-llava"):
        resolve("./no/such/model")
    with pytest.raises(ModelLoadError, match="no model was given"):
        resolve("  ")


def test_resolve_names():
    assert isinstance(resolve("scenes-llava"), Preset)
    assert resolve("llava-1.5-7b-hf") is PRESETS["llava-hf/llava-1.5-7b-hf"]  # short name
    assert resolve(str(ROOT / "assets" / "models" / "scenes-llava")) is PRESETS["scenes-llava"]
    assert resolve("owner/other-model") == "owner/other-model"


def test_available_local_models_lists_extra_folders(two_models, monkeypatch):
    monkeypatch.setenv("SPARSEVLM_MODELS_DIR", str(two_models[0].parent))
    found = available_local_models()
    assert found[0] == "scenes-llava"
    assert str(two_models[0]) in found


def test_models_command_json(capsys):
    assert main(["models", "--json"]) == 0  # `python -m sparsevlm models --json`, in this process
    d = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in d["presets"]}
    embedded = ["scenes-llava", "scenes-llava-next"]
    assert list(rows) == [*embedded, "bczhou/tiny-llava-v1-hf", "llava-hf/llava-interleave-qwen-0.5b-hf",
                          "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf",
                          "llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf"]
    for name in embedded:  # their shape is their folder's config.json
        config = json.loads((ROOT / "assets/models" / name / "config.json").read_text())
        assert rows[name]["decoder_layers"] == config["text_config"]["num_hidden_layers"]
    assert [rows[n]["decoder_layers"] for n in list(rows)[len(embedded):]] == [22, 24, 32, 40, 32, 32]
    # LLaVA-NeXT: the most a picture gets (a square one: 576 + 48 x 48 tile tokens + 48 newlines)
    assert [rows[n]["visual_tokens"] for n in rows] == [576, 2928] + [576, 729, 576, 576, 2928, 2928]
    assert [rows[n]["anyres"] for n in rows] == [False, True] + [False] * (len(rows) - 4) + [True, True]
    qwen = rows["llava-hf/llava-interleave-qwen-0.5b-hf"]
    assert not qwen["vision_cls"] and "fastervlm" not in qwen["methods"] and "fastervlm" in qwen["not_applicable"]
    # Published sizes: LLaVA-1.5-7B 7.06B and 13B 13.35B parameters.
    assert round(rows["llava-hf/llava-1.5-7b-hf"]["parameters"] / 1e9, 2) == 7.06
    assert round(rows["llava-hf/llava-1.5-13b-hf"]["parameters"] / 1e9, 2) == 13.35
    assert rows["llava-hf/llava-1.5-7b-hf"]["weights_gib_fp16"] * 2 == pytest.approx(
        rows["llava-hf/llava-1.5-7b-hf"]["weights_gib_fp32"], abs=0.02)
    assert d["available_locally"][0] == "scenes-llava"
    assert main(["models"]) == 0
    assert "| llava-hf/llava-1.5-13b-hf | llava-llama, 40 layers |" in capsys.readouterr().out


def test_memory_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPARSEVLM_MODEL_MEMORY_GIB", "1.5")
    assert ModelCache().max_bytes == int(1.5 * 2**30)
    monkeypatch.setenv("SPARSEVLM_MODEL_MEMORY_GIB", "lots")
    with pytest.raises(ModelLoadError, match="SPARSEVLM_MODEL_MEMORY_GIB"):
        ModelCache()
