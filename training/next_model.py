"""scenes-llava-next: the embedded model extended to LLaVA-NeXT (anyres tiles), built from scenes-llava.

    from training.next_model import build_from, build_processor
    model = build_from("assets/models/scenes-llava")   # LlavaNextForConditionalGeneration
    processor = build_processor(tokenizer)

What carries over unchanged: the CLIP tower (336 px, 14 px patches, features from layer -2, [CLS] dropped:
"default" strategy), the two-layer GELU projector, the 32-layer Llama decoder and LM head, the word-level tokenizer
and chat template, the processor's normalisation. What is new:

- `image_newline`, LLaVA-NeXT's learned row-end vector (`spatial_unpad`: one after every row of the tile grid once
  the padding is cut off), drawn as transformers initialises it (normal, std 1 / sqrt(hidden));
- `image_grid_pinpoints` = PINPOINTS, LLaVA-NeXT's own defaults up to 672x672 / 1008x336 / 336x1008: a base view
  plus at most 4 tiles of 336 px, at most 576 + 2,304 + 48 = 2,928 visual tokens (a 672x672 picture);
- `max_position_embeddings` 4096 (scenes-llava had 2048): the visual tokens alone reach 2,928 positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from sparsevlm.scenes.world import IMAGE_SIZE, PATCH

from .model import CLIP_MEAN, CLIP_STD

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # [height, width], as transformers
MAX_POSITIONS = 4096
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "models" / "scenes-llava"


def next_config(llava_config) -> LlavaNextConfig:
    """The LLaVA-NeXT config of a scenes-llava config: same tower, projector and decoder, anyres pinpoints."""
    text = llava_config.text_config
    text.max_position_embeddings = max(MAX_POSITIONS, text.max_position_embeddings)
    config = LlavaNextConfig(
        vision_config=llava_config.vision_config.to_dict(),
        text_config=text.to_dict(),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=llava_config.image_token_id,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        vision_feature_layer=llava_config.vision_feature_layer,
        projector_hidden_act=llava_config.projector_hidden_act,
        multimodal_projector_bias=getattr(llava_config, "multimodal_projector_bias", True),
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


def build_from(src: str | Path = SHIPPED, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """A LlavaNextForConditionalGeneration with every weight of the scenes-llava model in `src` and a fresh
    `image_newline`. Raises if any weight other than the newline is left unset."""
    old = LlavaForConditionalGeneration.from_pretrained(str(src), local_files_only=True)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(next_config(old.config))
    missing, unexpected = model.load_state_dict(old.state_dict(), strict=False)
    if unexpected or set(missing) != {"model.image_newline"}:
        raise RuntimeError(f"scenes-llava -> LLaVA-NeXT: missing {missing}, unexpected {unexpected}")
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(old.generation_config, key))
    return model.eval()


def build_processor(tokenizer) -> LlavaNextProcessor:
    """LLaVA-NeXT's processor with the PIL ("slow") image processor (no torchvision): scenes-llava's 336 px and
    CLIP normalisation, PINPOINTS, the word-level tokenizer and its chat template."""
    tokenizer.model_max_length = MAX_POSITIONS
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        image_grid_pinpoints=PINPOINTS,
        resample=3,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
