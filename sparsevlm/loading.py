"""Load a LLaVA model and its processor from a local folder or a Hugging Face hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

SUPPORTED_DECODERS = ("llama", "qwen2")
DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "assets" / "models" / "scenes-llava")


@dataclass
class LoadedModel:
    model: object  # LlavaForConditionalGeneration
    processor: object  # LlavaProcessor
    name: str
    device: torch.device
    dtype: torch.dtype
    arch: str  # "llava-llama" | "llava-qwen2"
    grid: tuple[int, int]
    has_cls: bool

    @property
    def visual_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 2048))

    def describe(self) -> dict:
        t = self.model.config.text_config
        return {
            "name": self.name,
            "architecture": self.arch,
            "decoder_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "grid": list(self.grid),
            "visual_tokens": self.visual_tokens,
            "vision_cls": self.has_cls,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.model.config.text_config._attn_implementation,
        }


def pick_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA when present with bf16 (fp16 where bf16 is unsupported); CPU in fp32."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype:
        dt = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype)
        if dt is None:
            raise ModelLoadError(f"unknown dtype {dtype!r} (float32, float16 or bfloat16)")
        return dev, dt
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


def _resolve(path_or_id: str) -> str:
    """A local folder as is; a hub id downloaded (or taken from the cache), failing fast when offline."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json: not a saved transformers model folder")
        return str(p)
    looks_local = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model folder {path_or_id} does not exist")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: try the network below
        pass
    try:
        return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot download {path_or_id!r} from the Hugging Face hub ({type(e).__name__}: {reason}). "
            "Without internet, pass a local model folder, e.g. assets/models/scenes-llava"
        ) from None


def load_model(path_or_id: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Model + processor, on CUDA when present, with SDPA attention."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keeps stderr to our own one-line messages
    folder = _resolve(path_or_id)
    dev, dt = pick_device_dtype(device, dtype)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dt, attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot load a LLaVA model from {path_or_id}: {str(e).splitlines()[0][:200]}") from None
    text_type = model.config.text_config.model_type
    if text_type not in SUPPORTED_DECODERS:
        raise ModelLoadError(f"decoder {text_type!r} is not supported (supported: {', '.join(SUPPORTED_DECODERS)})")
    model = model.to(dev).eval()
    v = model.config.vision_config
    side = v.image_size // v.patch_size
    return LoadedModel(
        model=model,
        processor=processor,
        name=Path(path_or_id).name if Path(path_or_id).exists() else path_or_id,
        device=dev,
        dtype=dt,
        arch=f"llava-{text_type}",
        grid=(side, side),
        has_cls=model.config.vision_feature_select_strategy == "default",
    )


def from_objects(model, processor, name: str = "in-memory") -> LoadedModel:
    """Wrap a model and processor built in code (tests, benchmarks)."""
    v = model.config.vision_config
    side = v.image_size // v.patch_size
    p = next(model.parameters())
    return LoadedModel(model, processor, name, p.device, p.dtype, f"llava-{model.config.text_config.model_type}",
                       (side, side), model.config.vision_feature_select_strategy == "default")
