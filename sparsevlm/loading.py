"""Load a LLaVA model and its processor from a local folder or a Hugging Face hub id."""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ModelLoadError

if TYPE_CHECKING:
    from .presets import Preset

log = logging.getLogger(__name__)
# progress(fraction in [0, 1], message): gradio's gr.Progress() is such a callable.
Progress = Callable[[float, str], None]

SUPPORTED_DECODERS = ("llama", "qwen2", "mistral")
MODELS_ROOT = Path(__file__).resolve().parent.parent / "assets" / "models"
DEFAULT_MODEL = str(MODELS_ROOT / "scenes-llava")
# Longest model name accepted (a hub id is at most 96 + 1 + 96 characters; a folder path rarely passes 300), and the
# longest single path component most file systems allow: longer names get a clear message, never an OSError.
MAX_NAME_CHARS = 1024
MAX_PART_BYTES = 255
PUBLIC_ENV = "SPARSEVLM_PUBLIC"


@dataclass
class LoadedModel:
    model: object  # LlavaForConditionalGeneration
    processor: object  # LlavaProcessor
    name: str
    device: torch.device
    dtype: torch.dtype
    arch: str  # "llava-llama", "llava-qwen2", "llava-next-mistral", ... (`_arch`)
    grid: tuple[int, int]
    has_cls: bool

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT: a base view and tiles per picture, so the visual token count depends on its size."""
        return getattr(self.model.config, "model_type", None) == "llava_next"

    @property
    def visual_tokens(self) -> int:
        """Visual tokens of a picture: LLaVA-1.5's one grid; for LLaVA-NeXT the most any picture can get (base view
        + the largest pinpoint's tiles + newlines; a request's own count is its layout's)."""
        if not self.anyres:
            return self.grid[0] * self.grid[1]
        from .layout import for_model

        return max(for_model(self.model.config, (w, h)).total for h, w in self.model.config.image_grid_pinpoints)

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    @property
    def context_length(self) -> int:
        """The longest sequence a request may make. A decoder with a sliding attention window (a Mistral whose
        config sets `sliding_window`) is held to the window: pruning cuts the sequence and edits the KV cache
        assuming every token sees every earlier one, which holds only while the sequence fits the window."""
        t = self.model.config.text_config
        n = int(getattr(t, "max_position_embeddings", 2048))
        window = getattr(t, "sliding_window", None)
        return min(n, int(window)) if window else n

    def describe(self) -> dict:
        t = self.model.config.text_config
        return {
            "name": self.name,
            "architecture": self.arch,
            "decoder_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "grid": list(self.grid),
            "visual_tokens": self.visual_tokens,
            "anyres": self.anyres,
            "vision_cls": self.has_cls,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention": self.model.config.text_config._attn_implementation,
        }


def pick_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA when present with bf16 (fp16 where bf16 is unsupported); CPU in fp32."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but CUDA is not available on this machine")
    if dtype:
        dt = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype)
        if dt is None:
            raise ModelLoadError(f"unknown dtype {dtype!r} (float32, float16 or bfloat16)")
        return dev, dt
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch.float32


def pick_attention(device: torch.device, dtype: torch.dtype) -> str:
    """FlashAttention-2 on CUDA in half precision when the flash_attn package is installed, else SDPA.

    SPARSEVLM_ATTENTION=sdpa|flash_attention_2|eager overrides (the hooks never need the attention matrix: they
    recompute the rows they read from q/k, so any implementation works).
    """
    forced = os.environ.get("SPARSEVLM_ATTENTION")
    if forced:
        if forced not in ("sdpa", "flash_attention_2", "eager"):
            raise ModelLoadError(f"SPARSEVLM_ATTENTION={forced!r}: use sdpa, flash_attention_2 or eager")
        return forced
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them once, at its import)."""
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
              for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def _is_llava_folder(p: Path) -> bool:
    try:
        return json.loads((p / "config.json").read_text()).get("model_type") in MODEL_CLASSES
    except (OSError, ValueError):
        return False


def model_roots() -> list[Path]:
    """The folders whose model subfolders a server may load: assets/models and $SPARSEVLM_MODELS_DIR (if set)."""
    roots = [MODELS_ROOT]
    if os.environ.get("SPARSEVLM_MODELS_DIR", "").strip():
        roots.append(_lexical(os.environ["SPARSEVLM_MODELS_DIR"].strip()))
    return roots


def available_local_models() -> list[str]:
    """Models that load without a network: the presets with a local folder, LLaVA folders under assets/models
    and $SPARSEVLM_MODELS_DIR, and LLaVA checkpoints already in the Hugging Face cache."""
    from .presets import PRESETS

    found: list[str] = [p.name for p in PRESETS.values() if p.local_path and Path(p.local_path).is_dir()]
    for root in model_roots():
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.is_dir() and _is_llava_folder(d) and d.name not in found and str(d) not in found:
                    found.append(str(d))
    try:
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir().repos, key=lambda r: r.repo_id):
            if repo.repo_type == "model" and any(_is_llava_folder(Path(rev.snapshot_path)) for rev in repo.revisions):
                found.append(repo.repo_id)
    except Exception:  # noqa: BLE001 - no cache folder (or an unreadable one) simply means nothing cached
        pass
    return found


def _unavailable(what: str, reason: str) -> ModelLoadError:
    local = available_local_models()
    return ModelLoadError(
        f"{what}: {reason}. Models available locally: {', '.join(local) if local else 'none'}"
        " (a preset name, a local folder or a hub id already in the cache)"
    )


@dataclass(frozen=True)
class ModelAccess:
    """Which models a server may load, whatever a visitor types into the picker or sends to the API.

    Local folders load only from the model roots (assets/models, $SPARSEVLM_MODELS_DIR) and the folders named at
    start; any other path gets one message that does not say whether it exists. `public` also refuses hub ids
    outside the presets and the local Hugging Face cache, so visitors cannot make the server download a model.
    Code that loads a model itself (no access given) may load any folder.
    """

    roots: tuple[Path, ...] = ()
    started: tuple[str, ...] = ()  # names given at start (--model): folders (normalized) or hub ids, always allowed
    public: bool = False

    @classmethod
    def for_server(cls, *started: str, public: bool | None = None) -> ModelAccess:
        """The server's rules: the model roots as set now, what it was started with, and `public` (default:
        $SPARSEVLM_PUBLIC is 1/true/yes/on)."""
        if public is None:
            public = public_from_env()
        given = [n.strip() for n in started if n and n.strip()]
        # Both readings of each name: 'models/x' may be a folder here or a hub id; resolve() tells which.
        names = tuple(dict.fromkeys([*given, *(str(_lexical(n)) for n in given)]))
        return cls(roots=tuple(model_roots()), started=names, public=public)

    def allows_folder(self, folder: Path) -> bool:
        """`folder` (absolute, normalized) is a start folder or lies under a root."""
        if str(folder) in self.started:
            return True
        return any(folder != root and folder.is_relative_to(root) for root in self.roots)


def public_from_env() -> bool:
    """$SPARSEVLM_PUBLIC as a switch (1/true/yes/on)."""
    return os.environ.get(PUBLIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _lexical(name: str) -> Path:
    """The absolute, normalized form of a path, computed without touching the disk (no stat, no symlink lookup),
    so deciding whether a name is allowed reveals nothing about what exists."""
    return Path(os.path.normpath(os.path.abspath(os.path.expanduser(name))))


def _looks_like_path(name: str) -> bool:
    name = name.strip()
    return name.startswith((".", "/", "~", os.sep)) or name.count("/") != 1 or " " in name


def _shown(name: str) -> str:
    """A name as messages echo it: at most 80 characters."""
    return repr(name if len(name) <= 80 else name[:60] + "..." + name[-17:])


def check_model_name(name: object) -> str:
    """The stripped name, or a clear ModelLoadError for an empty, overlong or malformed one (control characters,
    a path part the file system cannot hold). Runs before any look at the disk or the hub."""
    if not isinstance(name, str) or not name.strip():
        raise _unavailable("no model was given", "pass a preset name, a hub id or a local folder")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise ModelLoadError(f"the model name is {len(name):,} characters long; at most {MAX_NAME_CHARS:,} are "
                             "accepted (a preset name, a hub id such as owner/model, or a folder path)")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ModelLoadError(f"the model name {_shown(name)} contains control characters (a line break, a tab, a "
                             "NUL ...): type a preset name, a hub id or a folder path")
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in name.replace(os.sep, "/").split("/"))
    if longest > MAX_PART_BYTES:
        raise ModelLoadError(f"the model name {_shown(name)} has a part of {longest} bytes between slashes; "
                             f"folder names hold at most {MAX_PART_BYTES}")
    return name


def _check_hub_id(name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise _unavailable(f"{_shown(name)} is neither a preset, a local model folder nor a hub id",
                           "a hub id is owner/name in letters, digits, '-', '_' and '.', at most 96 characters "
                           "each side") from None


def _in_hub_cache(hub_id: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(hub_id, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - not cached (or an unreadable cache): not a local model
        return False


def _local_folder(p: Path) -> Preset | Path:
    """An existing folder the caller may load: its preset (the embedded model's folder) or the folder itself."""
    from .presets import PRESETS

    try:
        exists, has_config = p.exists(), (p / "config.json").is_file()
    except OSError as e:  # unreadable or otherwise unusable path: one line, not a traceback
        raise ModelLoadError(f"cannot read the model folder {_shown(str(p))}: {e.strerror or type(e).__name__}") \
            from None
    if not exists:
        raise _unavailable(f"model folder {p} does not exist", "check the path")
    if not has_config:
        raise ModelLoadError(f"{p} has no config.json: not a saved transformers model folder")
    for preset in PRESETS.values():  # the embedded model's folder is its preset
        if preset.local_path and Path(preset.local_path).resolve() == p.resolve():
            return preset
    return p.resolve()


def resolve(name_or_path: str, access: ModelAccess | None = None) -> Preset | Path | str:
    """What a name means: a Preset (by name, or short name such as 'llava-1.5-7b-hf'), an existing local model
    folder (Path), or another hub id (str, 'owner/name'). Raises ModelLoadError for anything else.

    With `access` (a server's rules), folders outside its roots and start folders are refused with one message
    whether or not they exist, and a public server refuses hub ids that are neither presets nor cached."""
    from .presets import get_preset

    name = check_model_name(name_or_path)
    preset = get_preset(name)
    if preset is not None:
        return preset
    if access is None:
        p = Path(name).expanduser()
        try:
            on_disk = p.exists()
        except OSError:
            on_disk = False
        if on_disk:
            return _local_folder(p)
        if _looks_like_path(name):
            raise _unavailable(f"model folder {name} does not exist", "check the path")
        _check_hub_id(name)
        return name
    candidate = _lexical(name)
    if access.allows_folder(candidate) and (_looks_like_path(name) or candidate.is_dir()):
        return _local_folder(candidate)  # inside the server's own folders: saying what is missing there is fine
    if _looks_like_path(name):  # one message whether the path exists or not
        raise _unavailable(f"{_shown(name)} is not a model this server offers",
                           "local models load only from the server's model folders")
    _check_hub_id(name)
    if access.public and name not in access.started and not _in_hub_cache(name):
        raise _unavailable(f"{_shown(name)} is not a model this server offers",
                           "this public server loads its presets and local models only, it downloads no other hub "
                           "model")
    return name


def _download(hub_id: str, progress: Progress | None) -> str:
    """A hub id's files from the cache, else from the hub; never a hang: offline fails at once, and the hub
    calls carry a timeout."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: try the network below
        pass
    if hub_offline():
        raise _unavailable(f"cannot load {hub_id!r}", "it is not in the local Hugging Face cache and the hub is "
                           "offline (HF_HUB_OFFLINE=1)")
    if progress:
        progress(0.1, f"downloading {hub_id} from the Hugging Face hub")
    try:
        return snapshot_download(hub_id, etag_timeout=10,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear message
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise _unavailable(f"cannot download {hub_id!r} from the Hugging Face hub",
                           f"{type(e).__name__}: {reason}") from None


def _folder_for(target: Preset | Path | str, progress: Progress | None) -> str:
    from .presets import Preset

    if isinstance(target, Preset):
        return target.local_path if target.local_path else _download(target.name, progress)
    if isinstance(target, Path):
        return str(target)
    return _download(target, progress)


def complete_processor(processor, config) -> None:
    """Older checkpoints (e.g. bczhou/tiny-llava-v1-hf) ship no processor_config.json, so the processor lacks the
    patch size and feature strategy it needs to expand <image> into one token per patch; take them from the
    model's config (CLIP's [CLS] is one extra token the 'default' strategy drops)."""
    v = config.vision_config
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = v.patch_size
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
        processor.num_additional_image_tokens = 1 if v.model_type == "clip_vision_model" else 0


RUNS = ("LLaVA-1.5-style models (LlavaForConditionalGeneration, model_type 'llava') and LLaVA-NeXT models "
        "(LlavaNextForConditionalGeneration, model_type 'llava_next')")
MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


def check_architecture(folder: str, name: str) -> None:
    """A folder whose config names another architecture (Qwen2-VL, LLaVA-OneVision, ...) gets one
    message saying what the engine runs, before transformers would load it into the wrong class."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return  # from_pretrained reports an unreadable config in its own words
    model_type = config.get("model_type")
    if model_type in MODEL_CLASSES:
        return
    arch = ", ".join(config.get("architectures") or []) or "an unnamed architecture"
    raise ModelLoadError(
        f"{name} is a {model_type or 'model of unknown type'} model ({arch}); the engine runs {RUNS} with a "
        f"{', '.join(SUPPORTED_DECODERS)} decoder only")


def load_model(path_or_id: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               progress: Progress | None = None) -> LoadedModel:
    """Model + processor, on CUDA when present (bf16, else fp16), with SDPA or FlashAttention-2 attention."""
    import transformers
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    from .presets import Preset

    hf_logging.disable_progress_bar()  # keeps stderr to our own one-line messages
    target = resolve(path_or_id)
    dev, dt = pick_device_dtype(device, dtype)
    if progress:
        progress(0.05, f"finding the files of {path_or_id}")
    folder = _folder_for(target, progress)
    check_architecture(folder, path_or_id)
    attention = pick_attention(dev, dt)
    if progress:
        progress(0.4, f"reading the weights of {path_or_id} ({str(dt).replace('torch.', '')}, {attention})")
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type", "llava")
        cls = getattr(transformers, MODEL_CLASSES.get(model_type, MODEL_CLASSES["llava"]))
        model = cls.from_pretrained(folder, dtype=dt, attn_implementation=attention)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load a LLaVA model from {path_or_id}: {str(e).splitlines()[0][:200]}") from None
    text_type = model.config.text_config.model_type
    if text_type not in SUPPORTED_DECODERS:
        raise ModelLoadError(f"decoder {text_type!r} is not supported (supported: {', '.join(SUPPORTED_DECODERS)})")
    complete_processor(processor, model.config)
    if progress:
        progress(0.8, f"moving {path_or_id} to {dev}")
    model = model.to(dev).eval()
    v = model.config.vision_config
    side = v.image_size // v.patch_size
    if isinstance(target, Preset):
        name = target.name
    elif isinstance(target, Path):
        name = target.name
    else:
        name = target
    if progress:
        progress(1.0, f"{name} is ready on {dev}")
    return LoadedModel(
        model=model,
        processor=processor,
        name=name,
        device=dev,
        dtype=dt,
        arch=_arch(model.config),
        grid=(side, side),
        has_cls=model.config.vision_feature_select_strategy == "default",
    )


def model_bytes(model) -> int:
    """Bytes the model's parameters and buffers occupy (tied tensors counted once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())


def estimate_bytes(target: Preset | Path | str, dtype: torch.dtype) -> int | None:
    """Weights a model will occupy once loaded, known before loading it: from the preset's exact count, or
    from the safetensors files of a folder (rescaled to the load dtype). None when unknown (not downloaded)."""
    from .presets import Preset

    per = torch.empty((), dtype=dtype).element_size()
    if isinstance(target, Preset):
        return target.weight_bytes(per)
    if isinstance(target, Path):
        folder = target
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(target, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: the size is unknown until downloaded
            return None
    total = 0
    for f in folder.glob("*.safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    total += n * per
        except Exception:  # noqa: BLE001 - an unreadable file: fall back to its size on disk
            total += f.stat().st_size
    return total or None


def default_budget_bytes(device: torch.device) -> int:
    """How much the cache may hold: SPARSEVLM_MODEL_MEMORY_GIB when set (a Space variable); else 90% of the GPU's
    memory on CUDA, half the machine's available RAM on CPU."""
    if os.environ.get("SPARSEVLM_MODEL_MEMORY_GIB"):
        try:
            return int(float(os.environ["SPARSEVLM_MODEL_MEMORY_GIB"]) * 2**30)
        except ValueError:
            raise ModelLoadError("SPARSEVLM_MODEL_MEMORY_GIB must be a number of GiB, e.g. 40") from None
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pages = 8 * 2**30
    return int(0.5 * pages)


class ModelCache:
    """Models loaded once and kept while they fit in `max_bytes` (least recently used evicted first).

    `get(name)` returns (model, unloaded) where `unloaded` names what was evicted to make room, so the UI can say
    so. One lock serializes loading: two requests for the same model load it once.
    """

    def __init__(self, max_bytes: int | None = None, device: str | None = None, dtype: str | None = None,
                 access: ModelAccess | None = None):
        self.device, self.dtype = pick_device_dtype(device, dtype)
        self.access = access  # a server's rules for what may be loaded (None: anything)
        self._device_arg, self._dtype_arg = device, dtype
        self.max_bytes = int(max_bytes) if max_bytes is not None else default_budget_bytes(self.device)
        self._models: OrderedDict[str, tuple[LoadedModel, int]] = OrderedDict()
        self._lock = threading.RLock()

    @staticmethod
    def key(target: Preset | Path | str) -> str:
        from .presets import Preset

        if isinstance(target, Preset):
            return target.name
        return str(target)

    def loaded(self) -> list[str]:
        """Keys of the models in memory, least recently used first."""
        with self._lock:
            return list(self._models)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(b for _, b in self._models.values())

    def put(self, key: str, lm: LoadedModel) -> list[str]:
        """Add a model built elsewhere (tests, an app handed a model); evicts as `get` does."""
        with self._lock:
            size = model_bytes(lm.model)
            unloaded = self._make_room(size, keep=key)
            self._models[key] = (lm, size)
            self._models.move_to_end(key)
            return unloaded

    def _held(self, key: object, progress: Progress | None) -> LoadedModel | None:
        """The model kept under `key`, now the most recently used; None when none is."""
        if not isinstance(key, str) or key.strip() not in self._models:
            return None
        key = key.strip()
        self._models.move_to_end(key)
        if progress:
            progress(1.0, f"{self._models[key][0].name} is already loaded")
        return self._models[key][0]

    def get(self, name_or_path: str, progress: Progress | None = None) -> tuple[LoadedModel, list[str]]:
        with self._lock:  # a model already held is found by its key, even one that `put` added under any name
            held = self._held(name_or_path, progress)
        if held is not None:
            return held, []
        target = resolve(name_or_path, self.access)
        key = self.key(target)
        with self._lock:
            held = self._held(key, progress)
            if held is not None:
                return held, []
            need = estimate_bytes(target, self.dtype)
            if need is not None and need > self.max_bytes:
                raise ModelLoadError(
                    f"{key} needs about {need / 2**30:.2f} GiB for its weights "
                    f"({str(self.dtype).replace('torch.', '')}), more than this server's model memory budget of "
                    f"{self.max_bytes / 2**30:.2f} GiB: pick a smaller model or run on a bigger machine"
                )
            unloaded = self._make_room(need or 0, keep=key)
            # The key names what `resolve` allowed (a preset, the folder as resolved, a hub id): load exactly that.
            lm = load_model(key, device=self._device_arg, dtype=self._dtype_arg, progress=progress)
            size = model_bytes(lm.model)
            # The estimate may be missing (a hub id not yet downloaded): check again with the real size.
            unloaded += self._make_room(size, keep=key)
            if size > self.max_bytes:
                del lm
                self._free()
                raise ModelLoadError(f"{key} takes {size / 2**30:.2f} GiB, more than the model memory budget of "
                                     f"{self.max_bytes / 2**30:.2f} GiB; it was not kept")
            self._models[key] = (lm, size)
            return lm, unloaded

    def unload(self, key: str) -> bool:
        with self._lock:
            if self._models.pop(key, None) is None:
                return False
            self._free()
            return True

    def _make_room(self, need: int, keep: str) -> list[str]:
        unloaded = []
        while self._models and self.used_bytes() + need > self.max_bytes:
            oldest = next(iter(self._models))
            if oldest == keep:
                break
            lm, size = self._models.pop(oldest)
            unloaded.append(lm.name)
            log.info("unloaded %s (%.2f GiB) to make room", lm.name, size / 2**30)
            del lm
        if unloaded:
            self._free()
        return unloaded

    @staticmethod
    def _free() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def from_objects(model, processor, name: str = "in-memory") -> LoadedModel:
    """Wrap a model and processor built in code (tests, benchmarks)."""
    v = model.config.vision_config
    side = v.image_size // v.patch_size
    p = next(model.parameters())
    return LoadedModel(model, processor, name, p.device, p.dtype, _arch(model.config), (side, side),
                       model.config.vision_feature_select_strategy == "default")


def _arch(config) -> str:
    """"llava-llama", "llava-qwen2", "llava-next-llama", ...: the model family and its decoder."""
    family = "llava-next" if getattr(config, "model_type", None) == "llava_next" else "llava"
    return f"{family}-{config.text_config.model_type}"
