"""Tiny random-weight LLaVA models of the two supported architectures, built offline.

Tests, the benchmark and the app's tests use these: real `LlavaForConditionalGeneration` objects with real
processors, small enough to run on a CPU in milliseconds.

- "llama":  CLIP vision tower (with [CLS]) + Llama decoder: the LLaVA-1.5 architecture.
- "qwen2":  SigLIP vision tower (no [CLS]) + Qwen2 decoder: the llava-interleave-qwen architecture.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
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
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA and its processor. Grid = (image_size // patch_size)^2 visual tokens."""
    tokenizer = build_tokenizer(TEST_WORDS)
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
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        vision = CLIPVisionConfig(**vision_kw, projection_dim=vision_hidden)
        text = LlamaConfig(**text_kw)
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
        raise ValueError(f"unknown tiny architecture {arch!r} (llama or qwen2)")

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
