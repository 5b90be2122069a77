"""Tiny random-weight LLaVA models of the supported architectures, built offline.

Tests, the benchmark and the app's tests use these: real `LlavaForConditionalGeneration` objects with real
processors, small enough to run on a CPU in milliseconds.

- "llama":  CLIP vision tower (with [CLS]) + Llama decoder: the LLaVA-1.5 architecture.
- "qwen2":  SigLIP vision tower (no [CLS]) + Qwen2 decoder: the llava-interleave-qwen architecture.
- "mistral": CLIP vision tower (with [CLS]) + Mistral decoder (no sliding window, as Mistral-7B-Instruct-v0.2):
  LLaVA-v1.6-Mistral's decoder family.

`tiny_llava_next` builds the LLaVA-NeXT counterpart (anyres: a base view, tiles, newline tokens).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from .tokenizer import build_tokenizer

TEST_WORDS = (
    "what colour is the shape ? red green blue yellow circle square triangle how many are there "
    "a an of in on at left right top bottom above below yes no is there any one two three four five"
).split()


def tiny_llava(
    arch: str = "llama",
    *,
    image_size: int = 112,
    patch_size: int = 14,
    hidden: int = 64,
    layers: int = 8,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    context: int = 2048,
    sliding_window: int | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA and its processor. Grid = (image_size // patch_size)^2 visual tokens.
    `sliding_window` applies to the Mistral decoder only (None: full causal attention)."""
    tokenizer = build_tokenizer(TEST_WORDS)
    tokenizer.model_max_length = context
    vocab = len(tokenizer)
    vision_kw = dict(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text_kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if arch in ("llama", "mistral"):
        vision = CLIPVisionConfig(**vision_kw, projection_dim=vision_hidden)
        text = LlamaConfig(**text_kw) if arch == "llama" else MistralConfig(**text_kw, sliding_window=sliding_window)
        select, feature_layer, extra = "default", -2, 1
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    elif arch == "qwen2":
        vision = SiglipVisionConfig(**vision_kw)
        text = Qwen2Config(**text_kw)
        select, feature_layer, extra = "full", -1, 0
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (llama, qwen2 or mistral)")

    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=select,
        vision_feature_layer=feature_layer,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=select,
        num_additional_image_tokens=extra,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def tiny_llava_next(
    arch: str = "llama",
    *,
    image_size: int = 56,
    patch_size: int = 14,
    pinpoints: tuple[tuple[int, int], ...] | None = None,
    hidden: int = 64,
    layers: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    context: int = 2048,
    sliding_window: int | None = None,
    **kw,
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A random-weight LLaVA-NeXT and its processor: the tiny LLaVA's tower and decoder (`kw`: its other shape
    arguments), anyres with tiles of `image_size` pixels at `pinpoints` (default: LLaVA-v1.6's five shapes, scaled
    from 336 to `image_size`)."""
    model15, p15 = tiny_llava(arch, image_size=image_size, patch_size=patch_size, hidden=hidden, layers=layers,
                              seed=seed, dtype=dtype, context=context, sliding_window=sliding_window, **kw)
    c15 = model15.config
    k = image_size
    pins = [list(p) for p in (pinpoints or ((k, 2 * k), (2 * k, k), (2 * k, 2 * k), (3 * k, k), (k, 3 * k)))]
    config = LlavaNextConfig(
        vision_config=c15.vision_config,
        text_config=c15.text_config,
        image_token_id=c15.image_token_id,
        vision_feature_select_strategy=c15.vision_feature_select_strategy,
        vision_feature_layer=c15.vision_feature_layer,
        projector_hidden_act="gelu",
        image_grid_pinpoints=pins,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = p15.tokenizer.pad_token_id
    model.generation_config.eos_token_id = p15.tokenizer.eos_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pins,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=p15.tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=c15.vision_feature_select_strategy,
        num_additional_image_tokens=p15.num_additional_image_tokens,
        chat_template=p15.tokenizer.chat_template,
    )
    return model, processor


# --- presets at a reduced width --------------------------------------------------------------------------------
PRESET_WORDS = ("user", "system", "assistant", "answer", "with", "word", "the", "picture", "this", "colour")


def preset_tokenizer(spec: dict, words=(*TEST_WORDS, *PRESET_WORDS), chat_template: str | None = None):
    """A word-level tokenizer with a preset's vocabulary size and its special tokens at their real ids.

    The real BPE/SentencePiece vocabularies are not available offline; what the engine depends on is the image
    token's id, the specials the chat template emits, and the vocabulary size the model's embedding has. Free ids
    are filled with placeholder tokens so any id the random model generates decodes.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials: dict[str, int] = spec["special_tokens"]
    taken = set(specials.values())
    vocab = dict(specials)
    free = (i for i in range(spec["vocab_size"]) if i not in taken)
    # Qwen's byte-level BPE has no unknown token; a word-level one needs one, inside the model's vocabulary.
    unk = spec.get("unk_token") or "<w_unk>"
    for w in dict.fromkeys((unk, *(w.lower() for w in (*words, ":", "?", ".", ",")))):
        if w not in vocab:
            vocab[w] = next(free)
    for i in free:
        vocab[f"<w{i}>"] = i
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(specials))
    bos = spec.get("bos_token")
    if spec.get("add_bos_token") and bos:
        # Llama's tokenizer starts every sequence with <s>: the prompt's prefix tokens depend on it.
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, specials[bos])])
    kw = {k: spec[k] for k in ("bos_token", "eos_token", "pad_token") if spec.get(k)}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=4096, padding_side=spec.get("padding_side", "left"), **kw)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def preset_image_processor(preprocessor_config: dict):
    """The preset's image processor, built from its preprocessor_config.json fields (PIL backend: no torchvision)."""
    fields = {k: v for k, v in preprocessor_config.items()
              if k not in ("image_processor_type", "processor_class") and v is not None}
    kind = preprocessor_config["image_processor_type"]
    classes = {"CLIPImageProcessor": CLIPImageProcessorPil, "SiglipImageProcessor": SiglipImageProcessorPil,
               "LlavaNextImageProcessor": LlavaNextImageProcessorPil}
    if kind not in classes:
        raise ValueError(f"no offline image processor for {kind!r}")
    return classes[kind](**fields)


def preset_llava(
    name: str,
    *,
    hidden: int = 64,
    heads: int = 8,
    intermediate: int = 128,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    reduce: bool = True,
    device: str | torch.device | None = None,
) -> tuple[LlavaForConditionalGeneration | LlavaNextForConditionalGeneration, LlavaProcessor | LlavaNextProcessor]:
    """A preset's exact configuration - depth, grid, vision feature layer and select strategy, image processor,
    chat template, image token, vocabulary, RoPE, tied embeddings, and for LLaVA-NeXT the pinpoints and the anyres
    processor - at a reduced width, with random weights, in the preset's own model and processor classes.

    Only widths change: hidden sizes, FFN sizes and head counts, keeping the decoder's query-to-KV-head ratio
    (MHA stays MHA, TinyLlama's 8:1 GQA stays 8:1). Depths (decoder and vision tower) are the real ones.
    reduce=False keeps the published widths too (the 7B benchmark); the weights are then created directly in
    `dtype` on `device`, so a 7B model never passes through 28 GB of fp32 host memory.
    """
    from .presets import PRESETS

    preset = PRESETS[name]
    if preset.local_path:
        raise ValueError(f"{name} is a local model: load its folder ({preset.local_path}) instead of rebuilding it")
    data = preset.data
    cfg = preset.config
    t, v = cfg["text_config"], cfg["vision_config"]
    # The published dtypes (the decoder's own "torch_dtype", e.g. Mistral's bfloat16) would make transformers build
    # that part in it whatever `dtype` asks: every part is built in `dtype`.
    for part in (cfg, t, v):
        part.pop("torch_dtype", None)
        part.pop("dtype", None)
    if reduce:
        text = AutoConfig.for_model(t["model_type"], **{k: x for k, x in t.items() if k != "model_type"})
        ratio = text.num_attention_heads // (text.num_key_value_heads or text.num_attention_heads)
        t.update(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                 num_key_value_heads=max(1, heads // ratio))
        t.pop("head_dim", None)  # derived from the new width
        v.update(hidden_size=vision_hidden, intermediate_size=vision_intermediate, num_attention_heads=vision_heads)
        if "projection_dim" in v:
            v["projection_dim"] = vision_hidden
    anyres = cfg.get("model_type") == "llava_next"
    model_cls = LlavaNextForConditionalGeneration if anyres else LlavaForConditionalGeneration
    config = (LlavaNextConfig if anyres else LlavaConfig).from_dict(cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device or "cpu"):
            model = model_cls(config).eval()
    finally:
        torch.set_default_dtype(previous)
    gen = data.get("generation_config") or {}
    for k, x in gen.items():
        setattr(model.generation_config, k, x)
    tokenizer = preset_tokenizer(data["tokenizer"], chat_template=data.get("chat_template"))
    pc = data.get("processor_config") or {}
    processor = (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=preset_image_processor(data["preprocessor_config"]),
        tokenizer=tokenizer,
        patch_size=pc.get("patch_size"),
        vision_feature_select_strategy=pc.get("vision_feature_select_strategy"),
        num_additional_image_tokens=pc.get("num_additional_image_tokens", 0),
        chat_template=data.get("chat_template"),
    )
    return model, processor


def masked_oracle_hooks(model, hidden_from: dict[int, list[int]]) -> list:
    """The masking oracle: the FULL sequence, with the pruned tokens hidden as keys from every layer after their
    pruning layer (`hidden_from`: layer -> absolute positions it must not see). Returns the hook handles."""
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        hidden = hidden_from.get(i)
        if hidden is None:
            continue

        def pre(module, args, kwargs, hidden=hidden, i=i):
            hs = args[0] if args else kwargs["hidden_states"]
            q, dev = hs.shape[1], hs.device
            cache = kwargs.get("past_key_values")
            past = cache.get_seq_length(i) if cache is not None else 0
            kv = past + q
            allowed = torch.arange(kv, device=dev)[None, :] <= (past + torch.arange(q, device=dev))[:, None]
            allowed[:, hidden] = False
            allowed[torch.arange(q, device=dev), past + torch.arange(q, device=dev)] = True  # a token sees itself
            kwargs["attention_mask"] = allowed[None, None]
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def masked_oracle_generate(model, inputs: dict, state, **gen):
    """generate() on the full sequence with the tokens a keep-positions pruned call removed (its `CallState`:
    prefix, visual_total, stages) masked from every later layer; equal to the pruned call when pruning is right."""
    hidden_from, removed = {}, set()
    for i in range(len(model.model.language_model.layers)):
        if removed:
            hidden_from[i] = sorted(removed)
        stage = next((s for s in state.stages if s.after_layer == i), None)
        if stage is not None:
            removed |= ({state.prefix + j for j in range(state.visual_total)}
                        - {state.prefix + j for j in stage.kept})
    handles = masked_oracle_hooks(model, hidden_from)
    try:
        return model.generate(**inputs, **gen)
    finally:
        for h in handles:
            h.remove()


# --- LLaVA-NeXT checks shared by the tests ---------------------------------------------------------------------------
def two_shapes(size: tuple[int, int] = (168, 112)):
    """A plain picture of `size` (width, height): a red circle top left, a blue square bottom right."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (235, 238, 242))
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse((w * 0.1, h * 0.1, w * 0.4, h * 0.5), fill=(220, 40, 40))
    d.rectangle((w * 0.6, h * 0.5, w * 0.9, h * 0.9), fill=(40, 80, 220))
    return img


@torch.no_grad()
def assert_layout_is_packing(model, inputs: dict, layout) -> None:
    """The layout against the LLaVA-NeXT model's own packing of `inputs` (the processor's output): each view
    cell's token holds the projector's output of its crop's patch, each newline token the model's image_newline."""
    packed = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                            return_dict=True).pooler_output[0]
    tower = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True)
    crops = model.model.multi_modal_projector(tower.hidden_states[model.config.vision_feature_layer][:, 1:])
    assert packed.shape[0] == layout.total
    for v in layout.views:
        torch.testing.assert_close(packed[list(v.tokens)], crops[v.crop][list(v.patches)])
    for t in layout.newlines:
        torch.testing.assert_close(packed[t], model.model.image_newline.to(packed.dtype))
