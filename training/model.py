"""The scenes-llava architecture: a real LLaVA-1.5-shaped model (CLIP with [CLS] + GELU projector + Llama/GQA).

336x336 input, 14 px patches -> 24x24 = 576 visual tokens, penultimate vision layer, [CLS] dropped, exactly
like LLaVA-1.5, only much smaller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from sparsevlm.scenes import world
from sparsevlm.scenes.world import IMAGE_SIZE, PATCH
from sparsevlm.tokenizer import build_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ModelSize:
    vision_hidden: int = 128
    vision_layers: int = 4  # the last one is not used: LLaVA reads the penultimate layer
    vision_heads: int = 4
    # 32 layers, as LLaVA-1.5-7B: the paper's schedule (prune after layers 2, 6, 15) and budgets 192..64 equal
    # tokens only exist at this depth (on 8 layers, layers 0-1 alone cost 2 * 576 / 8 = 144 equal tokens).
    hidden: int = 128
    layers: int = 32
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(size: ModelSize, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised scenes-llava model."""
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * 4,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    scale_residual_init(model, text.initializer_range)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


@torch.no_grad()
def scale_residual_init(model: LlavaForConditionalGeneration, std: float) -> None:
    """GPT-2-style init: the decoder's residual-branch outputs (o_proj, down_proj) start at std / sqrt(2 * layers).

    With the default init every one of 32 narrow layers adds a random vector about ten times the size of a token
    embedding to the residual stream, burying the question words and the visual evidence under the layers' own
    output; in our runs that left the decoder on the answer prior. Scaled, the stream starts close to the
    embeddings and the signal passes through the depth.
    """
    layers = model.model.language_model.layers
    scaled = std / (2 * len(layers)) ** 0.5
    for layer in layers:
        layer.self_attn.o_proj.weight.normal_(0.0, scaled)
        layer.mlp.down_proj.weight.normal_(0.0, scaled)


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """What the processor computes for pictures already 336x336 (no resize, no crop), without its overhead."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def v2_tokenizer():
    """The embedded model's word-level tokenizer: the v2 world's vocabulary."""
    return build_tokenizer(world.vocabulary())
