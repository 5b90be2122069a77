"""The models the explorer knows by name: the embedded scenes-llava (LLaVA-1.5's shape), the embedded
scenes-llava-next (LLaVA-NeXT's anyres tiles, when its folder is installed) and six public LLaVA checkpoints (four
LLaVA-1.5-style, two LLaVA-NeXT with anyres tiles).

Each preset's exact configuration (config.json, the image processor's resize / crop / pad, processor_config.json,
chat template, image token, tokenizer specials) is data in `sparsevlm/preset_configs/<slug>.json`, written from
the public checkpoints and marked field by field as verified or not (`sources`, `unverified`). Tests rebuild every
preset from that data at a reduced width and run every method on it (tests/test_presets.py).

Parameter counts are exact: the model is instantiated from its config on the meta device (no memory, no weights)
and its parameters counted. Memory figures are the weights alone (fp32: 4 bytes, fp16/bf16: 2 bytes per
parameter); activations and the KV cache come on top (the cost calculator gives the KV cache).

A LLaVA-NeXT preset's visual token count depends on the picture: `visual_tokens` is the most any picture gets
(the base view, the largest pinpoint's tiles and their newline tokens), and its budgets are the papers'
640 / 320 / 160 (`config.NEXT_BUDGETS`).
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import layout as LY
from .config import budgets_for
from .errors import ConfigError
from .methods import METHODS, get_method

PRESET_DIR = Path(__file__).resolve().parent / "preset_configs"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "models" / "scenes-llava"
DEFAULT_PRESET = "scenes-llava"
NEXT_DIR = EMBEDDED_DIR.parent / "scenes-llava-next"
NEXT_PRESET = "scenes-llava-next"  # the embedded high-resolution model (LLaVA-NeXT), offered when installed
LIKENESS_FILE = "likeness_1050.json"  # the model folder's own likeness summary (python -m training.likeness)

# Methods that rank patches by the vision tower's [CLS] attention and cannot run on a tower without one (SigLIP).

# slug of the data file, what the hardware should be, one line about the model.
_PUBLIC = {
    "bczhou/tiny-llava-v1-hf": (
        "tiny-llava-v1-hf",
        "CPU (a free CPU Space: 2 vCPU / 16 GB) or any GPU; fp32 on CPU needs ~5.6 GB of RAM",
        "TinyLLaVA v1: TinyLlama-1.1B decoder (22 layers, GQA 32/4), CLIP ViT-L/14-336 with [CLS], 576 tokens",
    ),
    "llava-hf/llava-interleave-qwen-0.5b-hf": (
        "llava-interleave-qwen-0.5b-hf",
        "CPU (slow: 729 visual tokens) or any GPU (ZeroGPU, T4 and up)",
        "LLaVA-NeXT-Interleave 0.5B: Qwen1.5-0.5B decoder (24 layers), SigLIP-so400m/14-384 without [CLS], "
        "729 tokens (single image, no anyres)",
    ),
    "llava-hf/llava-1.5-7b-hf": (
        "llava-1.5-7b-hf",
        "GPU with >= 16 GB in fp16 (ZeroGPU, A10G 24 GB, L4, A100); the paper's model",
        "LLaVA-1.5-7B: Vicuna-7B decoder (32 layers), CLIP ViT-L/14-336 with [CLS], 576 tokens",
    ),
    "llava-hf/llava-1.5-13b-hf": (
        "llava-1.5-13b-hf",
        "GPU with >= 28 GB in fp16 (ZeroGPU H200 slice, A100 40/80 GB, L40S 48 GB)",
        "LLaVA-1.5-13B: Vicuna-13B decoder (40 layers), CLIP ViT-L/14-336 with [CLS], 576 tokens",
    ),
    "llava-hf/llava-v1.6-vicuna-7b-hf": (
        "llava-v1.6-vicuna-7b-hf",
        "GPU with >= 24 GB in fp16 (ZeroGPU, A10G 24 GB, L4, A100): 13.2 GiB of weights and up to 2,928 visual "
        "tokens a picture",
        "LLaVA-NeXT-7B (v1.6): Vicuna-7B decoder (32 layers), CLIP ViT-L/14-336 with [CLS], anyres: a 576-token "
        "base view, 2 to 4 tiles of 576 and a newline token per tile row, up to 2,928 tokens; the papers' "
        "LLaVA-NeXT model",
    ),
    "llava-hf/llava-v1.6-mistral-7b-hf": (
        "llava-v1.6-mistral-7b-hf",
        "GPU with >= 24 GB in fp16 (ZeroGPU, A10G 24 GB, L4, A100): 14.1 GiB of weights and up to 2,928 visual "
        "tokens a picture",
        "LLaVA-NeXT-7B Mistral (v1.6): Mistral-7B-Instruct-v0.2 decoder (32 layers, GQA 32/8), CLIP ViT-L/14-336 "
        "with [CLS], anyres: a 576-token base view, 2 to 4 tiles of 576 and a newline token per tile row, up to "
        "2,928 tokens",
    ),
}


@dataclass(frozen=True)
class Preset:
    """A model the explorer knows by name. `data` holds the exact checkpoint files (see the module docstring)."""

    name: str  # the hub id, or "scenes-llava" for the embedded model
    summary: str
    hardware: str
    data: dict = field(repr=False, compare=False, hash=False)
    local_path: str | None = None  # the embedded model's folder; None for hub checkpoints

    # --- shape ------------------------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """config.json as published (a deep copy: callers may edit it)."""
        return copy.deepcopy(self.data["config"])

    @property
    def text_type(self) -> str:
        return self.data["config"]["text_config"]["model_type"]

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT: a base view and tiles per picture, so the visual token count depends on its size."""
        return self.data["config"].get("model_type") == "llava_next"

    @property
    def architecture(self) -> str:
        """As `loading._arch` names a loaded model: "llava-llama", "llava-next-mistral", ..."""
        return f"{'llava-next' if self.anyres else 'llava'}-{self.text_type}"

    @property
    def decoder_layers(self) -> int:
        return int(self._text_config().num_hidden_layers)

    @property
    def grid(self) -> tuple[int, int]:
        """One vision-tower input's patch grid: LLaVA-1.5's whole picture, LLaVA-NeXT's base view and each tile."""
        v = self.data["config"]["vision_config"]
        side = v["image_size"] // v["patch_size"]
        return (side, side)

    @property
    def pinpoints(self) -> list[list[int]]:
        """LLaVA-NeXT's tile canvases, (height, width) in pixels; empty for LLaVA-1.5."""
        return [list(p) for p in self.data["config"].get("image_grid_pinpoints") or []] if self.anyres else []

    @property
    def visual_tokens(self) -> int:
        """LLaVA-1.5: the grid. LLaVA-NeXT: the most a picture gets (a picture of each pinpoint's shape, through the
        layout transformers packs: base view, tiles, newline tokens), as `LoadedModel.visual_tokens`."""
        if not self.anyres:
            return self.grid[0] * self.grid[1]
        tile, side = self.data["config"]["vision_config"]["image_size"], self.grid[0]
        return max(LY.anyres((w, h), self.pinpoints, tile, side).total for h, w in self.pinpoints)

    @property
    def tiles(self) -> tuple[int, int]:
        """The fewest and the most tiles a picture gets (LLaVA-NeXT; (0, 0) for LLaVA-1.5)."""
        if not self.anyres:
            return (0, 0)
        tile = self.data["config"]["vision_config"]["image_size"]
        counts = [(h // tile) * (w // tile) for h, w in self.pinpoints]
        return (min(counts), max(counts))

    @property
    def budgets(self) -> tuple[int, ...]:
        """The budgets the papers report for this model: LLaVA-1.5's 192-64, LLaVA-NeXT's 640 / 320 / 160."""
        return budgets_for(self.anyres)

    @property
    def has_cls(self) -> bool:
        """The LLaVA feature strategy 'default' drops the tower's [CLS] (CLIP); 'full' keeps every token (SigLIP)."""
        return self.data["config"].get("vision_feature_select_strategy", "default") == "default"

    @property
    def vision_feature_layer(self) -> int:
        return int(self.data["config"].get("vision_feature_layer", -2))

    @property
    def select_strategy(self) -> str:
        return self.data["config"].get("vision_feature_select_strategy", "default")

    @property
    def image_token(self) -> str:
        return (self.data.get("processor_config") or {}).get("image_token", "<image>")

    @property
    def image_token_id(self) -> int:
        c = self.data["config"]
        return int(c.get("image_token_index", c.get("image_token_id", 32000)))

    @property
    def image_processing(self) -> str:
        """In words: how an upload becomes the square model input (what the overlay maps back through)."""
        p = self.data["preprocessor_config"]
        size = p.get("size", {})
        if self.anyres:
            tile = self.data["config"]["vision_config"]["image_size"]
            shapes = ", ".join(f"{w}x{h}" for h, w in self.pinpoints)
            return (f"anyres: the whole picture resized to {tile}x{tile} (the base view), and the picture resized "
                    f"into the best of {shapes} (aspect kept, padded) and cut into {tile}x{tile} tiles; the "
                    "padding's rows or columns are dropped and a newline token ends each row of the tiles")
        if p.get("do_pad"):
            return f"pad to a square, resize to {size}"
        if p.get("do_center_crop") and "shortest_edge" in size:
            crop = p["crop_size"]
            return (f"resize the shortest edge to {size['shortest_edge']}, center-crop "
                    f"{crop['width']}x{crop['height']} (the long side's ends are cut off)")
        return f"resize to {size.get('width')}x{size.get('height')} (aspect ratio not kept, nothing cut)"

    @property
    def methods(self) -> tuple[str, ...]:
        """Registered methods that apply: the [CLS]-based ones need a tower with a [CLS] token."""
        return tuple(m for m in METHODS if self.has_cls or not get_method(m).needs_cls)

    @property
    def not_applicable(self) -> dict[str, str]:
        if self.has_cls:
            return {}
        return {m: "needs the vision tower's [CLS] attention; this tower has no [CLS]"
                for m in METHODS if get_method(m).needs_cls}

    # --- size -------------------------------------------------------------------------------------------------
    @property
    def parameters(self) -> int:
        return _count_parameters(self.name)

    def weight_bytes(self, bytes_per_parameter: int) -> int:
        return self.parameters * bytes_per_parameter

    def _text_config(self):
        from transformers import AutoConfig

        t = dict(self.data["config"]["text_config"])
        return AutoConfig.for_model(t.pop("model_type"), **t)

    def describe(self) -> dict:
        """The row `python -m sparsevlm models --json` prints."""
        gib = 2**30
        return {
            "name": self.name,
            "summary": self.summary,
            "local_path": self.local_path,
            "architecture": self.architecture,
            "decoder_layers": self.decoder_layers,
            "grid": list(self.grid),
            "visual_tokens": self.visual_tokens,
            "anyres": self.anyres,
            "image_grid_pinpoints": self.pinpoints,
            "tiles": list(self.tiles),
            "budgets": list(self.budgets),
            "vision_cls": self.has_cls,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": self.select_strategy,
            "image_processing": self.image_processing,
            "image_token": self.image_token,
            "image_token_id": self.image_token_id,
            "parameters": self.parameters,
            "weights_gib_fp32": round(self.weight_bytes(4) / gib, 2),
            "weights_gib_fp16": round(self.weight_bytes(2) / gib, 2),
            "memory_note": "weights only (computed from the exact parameter count); activations and the KV "
                           "cache come on top",
            "methods": list(self.methods),
            "not_applicable": self.not_applicable,
            "hardware": self.hardware,
            "unverified": list(self.data.get("unverified", [])),
        }


def _embedded_data(d: Path = EMBEDDED_DIR, name: str = DEFAULT_PRESET) -> dict:
    """An embedded model's preset data, read from its own folder (its files are the exact configuration)."""
    if not (d / "config.json").is_file():
        raise ConfigError(f"the embedded model folder {d} is missing (no config.json)")
    proc = json.loads((d / "processor_config.json").read_text())
    template = (d / "chat_template.jinja").read_text() if (d / "chat_template.jinja").is_file() else None
    return {
        "name": name,
        "config": json.loads((d / "config.json").read_text()),
        "preprocessor_config": proc.pop("image_processor"),
        "processor_config": proc,
        "chat_template": template,
        "prompt_format": "USER: <image>\n{question} ASSISTANT:",
        "tokenizer": {"class": "word-level (sparsevlm/tokenizer.py)"},
        "sources": [f"the files in {d.name}/ (this repository)"],
        "unverified": [],
    }


def _world_of(d: Path) -> str:
    """"world X" for the picture world a scenes model was trained on (training_state.json "world"), or says the
    folder records none. Read here rather than through sparsevlm.scenes.worlds: the engine never imports the
    scenes package."""
    try:
        world = json.loads((d / "training_state.json").read_text()).get("world")
    except (OSError, ValueError, AttributeError):
        world = None
    return f"world {world}" if world else "no world recorded"


def _raters_measured(d: Path) -> str:
    """'; its text raters are N% content words (measured ...)' from the folder's likeness summary, if it has one."""
    try:
        s = json.loads((d / LIKENESS_FILE).read_text())["summary"]
        content = s["raters"]["classes"]["content"]["share_of_raters"][0]
        top = ", ".join(f"`{w['word']}`" for w in s["raters"]["top_words"][:3])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""
    return (f"; its text raters are {100 * content:.0f}% content words, {top} lead (measured on "
            f"{s['questions']} held-out questions, {LIKENESS_FILE})")


def _embedded_preset(d: Path, name: str, lead: str) -> Preset:
    """A preset for a scenes model folder; its shape and size are read from the folder, never typed."""
    data = _embedded_data(d, name)
    text = data["config"]["text_config"]
    size_mib = sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) / 2**20
    depth = text["num_hidden_layers"]
    llava_depth = " - LLaVA-1.5-7B's depth and grid" if depth == 32 else ""
    vision = data["config"]["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    preset = Preset(name, "", "", data, local_path=str(d))
    if preset.anyres:
        lo, hi = preset.tiles
        visual = (f"anyres: a {side * side}-token base view, {lo} to {hi} tiles and a newline token per tile row, up "
                  f"to {preset.visual_tokens:,} tokens")
        llava_depth = " - LLaVA-NeXT-7B's depth and tiles" if depth == 32 else ""
    else:
        visual = f"{side * side} tokens"
    summary = (f"{lead} ({_world_of(d)}); CLIP {vision['image_size']}/{vision['patch_size']} with [CLS] ({visual}), "
               f"{depth}-layer Llama decoder x {text['hidden_size']}{llava_depth}{_raters_measured(d)}")
    hardware = f"any CPU ({size_mib:.0f} MiB{'; the default for a CPU Space' if name == DEFAULT_PRESET else ''})"
    return Preset(name, summary, hardware, data, local_path=str(d))


def _load_presets() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    try:
        presets[DEFAULT_PRESET] = _embedded_preset(EMBEDDED_DIR, DEFAULT_PRESET,
                                                   "the embedded model: trained here on generated scenes")
    except ConfigError:
        pass  # a checkout without the embedded model still lists the hub presets
    if NEXT_DIR.is_dir():
        presets[NEXT_PRESET] = _embedded_preset(
            NEXT_DIR, NEXT_PRESET, "the embedded high-resolution model: scenes-llava extended to LLaVA-NeXT's tiles "
            "and trained here on large generated scenes")
    for name, (slug, hardware, summary) in _PUBLIC.items():
        data = json.loads((PRESET_DIR / f"{slug}.json").read_text())
        presets[name] = Preset(name, summary, hardware, data)
    return presets


# Seven small JSON reads at import: cheap, and PRESETS stays a plain dict.
PRESETS: dict[str, Preset] = _load_presets()


def get_preset(name: str) -> Preset | None:
    """A preset by its name; also by the short name after the slash (e.g. 'llava-1.5-7b-hf')."""
    if name in PRESETS:
        return PRESETS[name]
    for p in PRESETS.values():
        if name == p.name.rsplit("/", 1)[-1]:
            return p
    return None


@functools.cache
def _count_parameters(name: str) -> int:
    """Exact parameter count: the model built from its config on the meta device (no memory is allocated)."""
    import torch
    import transformers

    from .loading import MODEL_CLASSES

    preset = PRESETS[name]
    cls = getattr(transformers, MODEL_CLASSES[preset.data["config"]["model_type"]])
    config = cls.config_class.from_dict(preset.config)
    with torch.device("meta"):
        model = cls(config)
    # Tied embeddings (Qwen1.5-0.5B) are one tensor: count each parameter object once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def models_table() -> list[dict]:
    return [p.describe() for p in PRESETS.values()]


def format_models(rows: list[dict]) -> str:
    """The human-readable listing of `python -m sparsevlm models`."""
    lines = ["| model | decoder | grid | params | weights fp32 / fp16 | methods | hardware |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rows_, cols = r["grid"]
        methods = ", ".join(r["methods"])
        if r["not_applicable"]:
            methods += " (not " + ", ".join(r["not_applicable"]) + ": no [CLS])"
        params = r["parameters"]
        size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
        cls_note = " + [CLS] dropped" if r["vision_cls"] else ", no [CLS]"
        if r.get("anyres"):
            few, most = r["tiles"]
            grid = (f"anyres: {rows_}x{cols} base view + {few}-{most} tiles of {rows_}x{cols} + newlines, up to "
                    f"{r['visual_tokens']:,}{cls_note}")
        else:
            grid = f"{rows_}x{cols} = {r['visual_tokens']}{cls_note}"
        lines.append(
            f"| {r['name']} | {r['architecture']}, {r['decoder_layers']} layers | {grid} | {size} | "
            f"{r['weights_gib_fp32']:.2f} / {r['weights_gib_fp16']:.2f} GiB | {methods} | {r['hardware']} |"
        )
    lines.append("")
    lines.append("weights only, computed from the exact parameter count; activations and the KV cache come on top. "
                 "Any other hub id or local LLaVA folder loads too.")
    return "\n".join(lines)
