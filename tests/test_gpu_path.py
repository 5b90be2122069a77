"""The parts of the GPU path that run on a CPU: measured KV-cache bytes from the cache object (equal to the computed
ones), peak GPU memory reported as n/a off CUDA, device / dtype / attention choice, the ZeroGPU wrapper, and the
7B benchmark shapes (LLaVA-1.5 and LLaVA-NeXT). tests/test_cuda.py holds the checks that need a GPU."""

from __future__ import annotations

import io
import multiprocessing
import pickle
import subprocess
import sys
import threading
import types
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevlm import cost as C
from sparsevlm.config import PruneConfig
from sparsevlm.errors import ModelLoadError
from sparsevlm.gpu import gpu
from sparsevlm.loading import from_objects, pick_attention, pick_device_dtype
from sparsevlm.pipeline import run
from sparsevlm.presets import PRESETS
from sparsevlm.testing import tiny_llava
from sparsevlm.trace import PruneTrace

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm(request):
    model, processor = tiny_llava(request.param, layers=8, image_size=112)
    return from_objects(model, processor)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 140, 3), dtype=np.uint8))


@pytest.mark.parametrize("method", ["dense", "sparsevlm", "fastv", "random"])
def test_measured_kv_bytes_equal_computed(lm, image, method):
    n_new = 4
    t = run(lm, image, "what colour is the shape ?", PruneConfig(method=method, budget=24), max_new_tokens=n_new).trace
    m = t.memory
    assert m.kv_bytes_prefill == t.cost.kv_bytes  # measured on the cache object == computed from the layer counts
    # The cache holds, per layer, exactly the tokens that layer processed in the prefill.
    fixed = t.prefix_tokens + t.text_tokens
    assert m.kv_tokens_per_layer == [fixed + r.visual_in for r in t.layers]
    if method != "dense":
        assert m.kv_bytes_prefill < t.cost.kv_bytes_dense
    # generate() then appends one entry per layer for every decoded token but the last (never fed back).
    shape = C.DecoderShape.from_config(lm.model.config)
    per_token = len(t.layers) * 2 * shape.kv_dim * 4  # fp32
    assert m.kv_bytes_final == m.kv_bytes_prefill + (t.generated_tokens - 1) * per_token
    assert m.peak_gpu_bytes is None and m.peak_gpu_note.startswith("n/a")


def test_memory_round_trips_through_json(lm, image):
    t = run(lm, image, "what colour is the shape ?", PruneConfig(method="sparsevlm", budget=24), max_new_tokens=2).trace
    back = PruneTrace.from_json(t.to_json())
    assert back.memory == t.memory
    s = t.summary()["memory_measured"]
    assert s["kv_bytes_prefill"] == t.cost.kv_bytes and s["peak_gpu_bytes"] is None


def test_device_dtype_and_attention_choice(monkeypatch):
    assert pick_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype("cpu", "bf16")[1] == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_device_dtype("cpu", "int3")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            pick_device_dtype("cuda")
    monkeypatch.delenv("SPARSEVLM_ATTENTION", raising=False)
    assert pick_attention(torch.device("cpu"), torch.float32) == "sdpa"
    monkeypatch.setenv("SPARSEVLM_ATTENTION", "eager")
    assert pick_attention(torch.device("cpu"), torch.float32) == "eager"
    monkeypatch.setenv("SPARSEVLM_ATTENTION", "fast")
    with pytest.raises(ModelLoadError, match="SPARSEVLM_ATTENTION"):
        pick_attention(torch.device("cpu"), torch.float32)


def test_gpu_decorator_is_a_no_op_without_spaces(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError, as on a machine without it

    def f(x):
        return x + 1

    assert gpu(f) is f
    assert gpu(duration=30)(f) is f


def test_gpu_decorator_uses_spaces_gpu_when_importable(monkeypatch):
    calls = []
    spaces = types.ModuleType("spaces")

    def GPU(fn=None, duration=None):  # noqa: N802 - the name spaces exports
        if fn is None:
            return lambda f: (calls.append(("GPU", duration)), f)[1]
        calls.append(("GPU", None))
        return fn

    spaces.GPU = GPU
    monkeypatch.setitem(sys.modules, "spaces", spaces)

    @gpu
    def a():
        return 1

    @gpu(duration=90)
    def b():
        return 2

    assert (a(), b()) == (1, 2)
    assert calls == [("GPU", None), ("GPU", 90)]


def test_bench_7b_is_the_full_published_shape():
    from sparsevlm.bench import build

    lm = build("7b", "meta", torch.float16)  # meta: the shape without memory
    params = sum(p.numel() for p in lm.model.parameters())
    assert params == PRESETS["llava-hf/llava-1.5-7b-hf"].parameters == 7_063_427_072
    assert lm.num_layers == 32 and lm.grid == (24, 24) and lm.has_cls
    assert lm.model.config.text_config.hidden_size == 4096
    assert lm.dtype == torch.float16


def test_bench_7b_next_is_llava_next_7bs_full_published_shape():
    """`bench --width 7b --visual next` builds llava-hf/llava-v1.6-vicuna-7b-hf at its full shape: here on the meta
    device (the config, the classes and the parameter count, no weights), with its real anyres processor, which
    turns the benchmark's 672 x 672 picture into 2,928 image tokens, as the layout counts them."""
    from sparsevlm.bench import NEXT_PICTURE, build
    from sparsevlm.pipeline import layout_for

    name = "llava-hf/llava-v1.6-vicuna-7b-hf"
    lm = build("7b", "meta", torch.float16, anyres=True)
    params = sum(p.numel() for p in lm.model.parameters())
    assert params == PRESETS[name].parameters == 7_063_431_168
    assert lm.name == "random LLaVA-NeXT-7B (full shape, 7,063,431,168 parameters)"
    assert type(lm.model).__name__ == "LlavaNextForConditionalGeneration" and lm.anyres
    assert type(lm.processor).__name__ == "LlavaNextProcessor"
    assert type(lm.processor.image_processor).__name__.startswith("LlavaNextImageProcessor")
    assert {p.device.type for p in lm.model.parameters()} == {"meta"} and lm.dtype == torch.float16
    cfg, pub, text = lm.model.config, PRESETS[name].data["config"], PRESETS[name]._text_config()
    assert (cfg.text_config.hidden_size, cfg.text_config.intermediate_size, cfg.text_config.num_attention_heads) == (
        text.hidden_size, text.intermediate_size, text.num_attention_heads) == (4096, 11008, 32)
    assert cfg.vision_config.hidden_size == pub["vision_config"]["hidden_size"] == 1024
    assert [list(p) for p in cfg.image_grid_pinpoints] == pub["image_grid_pinpoints"]
    assert lm.num_layers == 32 and lm.grid == (24, 24) and lm.has_cls
    assert layout_for(lm, NEXT_PICTURE).total == 2928
    prompt = lm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape ?"}]}],
        add_generation_prompt=True)
    inputs = lm.processor(images=Image.new("RGB", NEXT_PICTURE), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 2928
    assert tuple(inputs["pixel_values"].shape) == (1, 5, 3, 336, 336)  # the base view and 2 x 2 tiles


@pytest.mark.parametrize("visual", ["576", "next"])
def test_bench_7b_refuses_a_cpu(visual):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the 7b benchmark would run (tests/test_cuda.py covers the GPU)")
    out = subprocess.run([sys.executable, "-m", "sparsevlm", "bench", "--width", "7b", "--visual", visual],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr
    assert ("LLaVA-NeXT-7B" if visual == "next" else "LLaVA-1.5-7B") in out.stderr


def test_cost_preset_matches_the_published_config():
    """The cost calculator's presets are the real checkpoints' decoder shapes."""
    from transformers import LlavaConfig

    pairs = [("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf"), ("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf"),
             ("llava-interleave-qwen-0.5b", "llava-hf/llava-interleave-qwen-0.5b-hf")]
    for cost_name, preset in pairs:
        published = C.DecoderShape.from_config(LlavaConfig.from_dict(PRESETS[preset].config))
        assert C.PRESETS[cost_name] == published, cost_name


def _tensors_inside(obj) -> list[str]:
    """Types of every tensor, module or storage a pickle of `obj` would carry."""
    found: list[str] = []

    class Spy(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, (torch.Tensor, torch.nn.Module, torch.UntypedStorage)):
                found.append(type(o).__name__)
            return None

    Spy(io.BytesIO()).dump(obj)
    return found


def _through_queue(obj):
    """`obj` put on a fork-context multiprocessing queue and read back, as the `spaces` package hands a ZeroGPU
    worker its arguments and the caller its result; returns what came back and the bytes that crossed."""
    import torch.multiprocessing  # noqa: F401 - registers torch's reductions on the queue's pickler, as in spaces

    size = len(ForkingPickler.dumps(obj))
    q = multiprocessing.get_context("fork").SimpleQueue()
    writer = threading.Thread(target=q.put, args=(obj,))
    writer.start()
    back = q.get()
    writer.join()
    return back, size


def test_gpu_function_gets_and_returns_plain_data(image, tmp_path, monkeypatch):
    """The spaces.GPU function receives the model's name, the picture, the question and the config, and takes the
    model from the process's cache: what crosses the queue is small and holds no tensor, and the model's
    parameters never move into shared memory."""
    from app.handlers import model_runs, serve_models
    from sparsevlm.loading import ModelCache

    model, processor = tiny_llava("llama", layers=8, image_size=112)
    folder = tmp_path / "models" / "tiny"  # the name a session holds: a local model folder, already loaded
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    monkeypatch.setenv("SPARSEVLM_MODELS_DIR", str(folder.parent))
    cache = ModelCache()
    cache.put(str(folder.resolve()), from_objects(model, processor))
    serve_models(cache)
    config = PruneConfig(method="sparsevlm", budget=24).to_dict()
    args = (str(folder.resolve()), image, "what colour is the shape ?", config, 2, True)
    assert _tensors_inside(args) == []
    sent, size = _through_queue(args)
    assert size < 100_000  # the 140x90 picture and a few names and numbers
    pruned, dense = model_runs(*sent)
    assert _tensors_inside((pruned, dense)) == []
    (pruned_back, dense_back), size = _through_queue((pruned, dense))
    assert size < 1_000_000
    pruned_trace, dense_trace = PruneTrace.from_dict(pruned_back), PruneTrace.from_dict(dense_back)
    assert pruned_trace.method == "sparsevlm" and pruned_trace.stages and dense_trace.method == "dense"
    assert not any(p.is_shared() for p in model.parameters())
