"""The transformers plumbing: any registered pruning method installed on a `LlavaForConditionalGeneration`.

The only module that knows transformers internals. Nothing is monkey-patched and the model keeps its
attention implementation (SDPA / FlashAttention): where a method needs attention, the rows it asks for are
recomputed from the layer's own q/k projections (captured by hooks on q_proj/k_proj), never the L x L matrix.

A method (methods/) declares where it acts; this module captures what it asks for, hands it a `StageInput`,
and carries out its `Selection`:
- before the LLM (stage -1): a pre-hook on the language model rewrites `inputs_embeds` and the position ids;
- after decoder layer l: layer l runs on the full sequence; a forward hook on it cuts its output hidden states
  (and appends merged tokens); pre-hooks on the later layers hand them position embeddings / ids matching the
  shorter sequence and a None mask (SDPA's causal path; batch 1, no padding). The KV cache follows by itself:
  layers <= l cached the full sequence, later layers cache the pruned one.
Positions are kept (original ids; decoding continues at original length + n) or compacted (0..N-1; each layer
decodes from its own cache length). A call is a forward that carries an image (pixel values or pre-encoded
image features); decode steps never prune, even when the model generates the image token's id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from . import algorithm as A
from . import layout as LY
from . import profile as P
from .attention import LayerSeam, column_sums
from .config import PruneConfig
from .errors import ConfigError
from .methods import (
    AttentionInput,
    MergedGroup,
    ModelGeometry,
    PrefillInput,
    PruneMethod,
    Selection,
    StageInput,
    StageSpec,
    VisionInput,
    attention_read_layers,
    get_method,
)
from .methods.base import plain
from .schedule import Counts
from .trace import AttentionLayer, LayerRecord, MergedToken, Stage

# The model types the hooks install on: LLaVA-1.5's one grid and LLaVA-NeXT's anyres views.
MODEL_TYPES = ("llava", "llava_next")


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama/Qwen2 apply it (rotate-half convention); cos/sin broadcast over heads."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Token:
    """A visual token of the current sequence: the patch it sits at and, if merged, all it represents."""

    center: int
    members: list[int] | None = None  # None: an original, unmerged patch token


def _vision_feature_layer(model) -> torch.nn.Module:
    """The vision encoder layer whose output is LLaVA's selected feature layer (hidden_states[-2] for CLIP)."""
    tower = model.model.vision_tower
    enc_layers = getattr(tower, "vision_model", tower).encoder.layers
    idx = model.config.vision_feature_layer
    idx = idx if idx >= 0 else len(enc_layers) + idx  # hidden_states[-2] is the output of layer L-2
    return enc_layers[idx]


def cls_attention(model, captured: dict, crop: int = 0) -> torch.Tensor | None:
    """The vision tower's [CLS] attention row over the patches at the feature layer (head mean, post-softmax),
    from captured q/k ("vision", "q"/"k"), for one tower input (`crop`: LLaVA-NeXT's base view is 0, its tiles
    1, 2, ...); None for a tower without [CLS] or without captures."""
    if model.config.vision_feature_select_strategy != "default" or ("vision", "q") not in captured:
        return None
    attn = _vision_feature_layer(model).self_attn
    q, k = captured[("vision", "q")][crop], captured[("vision", "k")][crop]
    h, hd = attn.num_heads, attn.head_dim
    qh = q[:1].view(1, h, hd).transpose(0, 1)
    kh = k.view(-1, h, hd).transpose(0, 1)
    every_key = torch.tensor([k.shape[0]], device=k.device)  # no causality in a ViT: the row sees every key
    return A.rows_attention(qh, kh, every_key, attn.scale)[0, 1:]


@dataclass
class SharedWork:
    """What every run of one request (one image, one question, one model) computes once and shares.

    `image` is the vision tower + projector's output as generate() takes it (`mm_encoder_outputs["image"]`), with
    the feature layer's q/k/output captured for the methods that rank by [CLS] attention; `vision_ms` its one
    measurement. `store` keeps what methods compute before the decoder from the same inputs (text raters), with
    the milliseconds it took, so a second method asking for it reuses it; `uses` counts the runs that read each.
    """

    image: Any
    vision: dict
    vision_ms: float
    store: dict = field(default_factory=dict)  # key -> (value, ms)
    uses: dict = field(default_factory=dict)  # key -> runs that read it

    def once(self, key: tuple, compute, device: torch.device) -> tuple[Any, float]:
        """(value, ms): compute() timed the first time `key` is asked for, the stored result afterwards."""
        if key not in self.store:
            self.store[key] = _timed(compute, device)
        self.uses[key] = self.uses.get(key, 0) + 1
        return self.store[key]


def _timed(compute, device: torch.device) -> tuple[Any, float]:
    """(compute(), its wall-clock ms, the device synchronised)."""
    t0 = time.perf_counter()
    value = compute()
    _sync(device)
    return value, (time.perf_counter() - t0) * 1e3


def encode_image(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> SharedWork:
    """Run the vision tower + projector once, as generate() would, timing it and capturing the feature layer's
    q/k/output. Hand the result to every run of the request (`PruneHooks.share`)."""
    layer = _vision_feature_layer(model)
    captured: dict = {}

    def capture(kind):
        def hook(module, args, output):
            captured[("vision", kind)] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layer.self_attn.q_proj.register_forward_hook(capture("q")),
               layer.self_attn.k_proj.register_forward_hook(capture("k")), layer.register_forward_hook(capture("out"))]
    device = pixel_values.device
    try:
        _sync(device)
        t0 = time.perf_counter()
        extra = {} if image_sizes is None else {"image_sizes": image_sizes}  # LLaVA-NeXT: the tiles' layout
        image = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra)
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        for h in handles:
            h.remove()
    return SharedWork(image=image, vision=captured, vision_ms=ms)


@dataclass
class CallRecord:
    """The plain record of one call (ints, floats, strings, lists): what `pipeline.build_trace` reads."""

    method: str
    positions: str  # keep | compact
    prefix: int  # tokens before the image
    visual_total: int  # Lv
    text: int  # tokens after the image
    layer_inputs: list[int]  # visual tokens each decoder layer processed (prefill)
    stages: list[Stage]
    relevance: list[float] | None  # R over the text tokens (methods with raters)
    raters: list[int] | None  # text-relative rater indices
    forward_ms: list[float]  # measured, per forward (prefill first, then one per decode step)
    vision_ms: float
    raters_ms: float
    vision_in_forward: bool  # plain forward(): the vision time is inside the first forward's time
    counts: Counts | None  # the accounting's planned counts (None: adaptive or dense)
    note: str
    shared_keys: list = field(default_factory=list)  # SharedWork keys this call read (raters, ...)
    attention: list[AttentionLayer] = field(default_factory=list)  # per layer, where the method decided attention
    profile: list[dict] = field(default_factory=list)  # the decoder part of the attention profile (profile.py)

    def layer_records(self) -> list[LayerRecord]:
        by_layer = {s.after_layer: k for k, s in enumerate(self.stages)}
        out = []
        for i, vin in enumerate(self.layer_inputs):
            k = by_layer.get(i)
            out.append(LayerRecord(i, vin, self.stages[k].visual_out if k is not None else vin, k))
        return out


@dataclass
class CallState:
    """Everything one generate()/forward call accumulates; replaced at every prefill (no leaks across calls)."""

    prefix: int = 0
    visual_total: int = 0
    text: int = 0
    tokens: list[_Token] = field(default_factory=list)  # current visual tokens, in sequence order
    positions: torch.Tensor | None = None  # (1, n) position ids of the current sequence
    pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin for the current sequence when cut
    raters: torch.Tensor | None = None  # text-relative rater indices
    relevance: list[float] | None = None  # R over the text tokens
    projector: torch.Tensor | None = None  # (Lv, D) projector output
    memo: dict = field(default_factory=dict)  # the method's per-call scratch space
    layer_inputs: list[int] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    captured: dict = field(default_factory=dict)  # (layer, "q"/"k"/"pe"/"out") -> tensor, this prefill only
    rows_attention: dict = field(default_factory=dict)  # layer -> (r, n) attention rows (debug)
    prefilling: bool = False
    compacted: bool = False  # positions were compacted at some stage (compact mode)
    forward_ms: list[float] = field(default_factory=list)
    vision_ms: float = 0.0
    raters_ms: float = 0.0
    t_vision: float | None = None  # set while the vision tower + projector runs (None: not timing)
    vision_in_forward: bool = False  # plain forward(): vision time is inside the first forward's time
    shared_keys: list = field(default_factory=list)  # SharedWork keys read by this call
    attention: list[AttentionLayer] = field(default_factory=list)  # the method's attention decisions (prefill)
    profile: list[dict] = field(default_factory=list)  # attention profile entries at the profile layers


class PruneHooks:
    """Install with `hooks = PruneHooks(model, config).install()`; `hooks.remove()` leaves the model vanilla.

    Usable as a context manager. State is per call: every forward with an image starts a fresh CallState,
    so consecutive calls never see each other's decisions. `hooks.record()` is the last call's plain record.
    """

    def __init__(self, model, config: PruneConfig, keep_debug: bool = False, method: PruneMethod | None = None,
                 layout: LY.VisualLayout | None = None):
        """`method` overrides the registry's `config.method` (an unregistered method: tests, experiments).
        `layout` is the request's visual layout (`pipeline.layout_for`); the plan is made for its token count.
        Without one, LLaVA-1.5 takes its one grid and LLaVA-NeXT the layout of the call's `image_sizes`."""
        if getattr(model.config, "model_type", None) not in MODEL_TYPES:
            raise ConfigError(f"the engine runs LLaVA-1.5 and LLaVA-NeXT models (LlavaForConditionalGeneration, "
                              f"LlavaNextForConditionalGeneration) only, not {type(model).__name__} "
                              f"({getattr(model.config, 'model_type', None)!r})")
        self.anyres = model.config.model_type == "llava_next"
        self.layout = layout  # the request's visual layout (None: LLaVA-1.5's one grid, or from image_sizes)
        self.model = model
        self.llava = model.model
        self.lm = self.llava.language_model
        self.layers = self.lm.layers
        self.depth = len(self.layers)
        self.device = next(model.parameters()).device
        self.keep_debug = keep_debug
        vcfg = model.config.vision_config
        tcfg = model.config.text_config
        self.grid_side = vcfg.image_size // vcfg.patch_size
        if layout is None and not self.anyres:
            layout = LY.single((self.grid_side, self.grid_side), (0.0, 0.0, 1.0, 1.0))
        self.layout = layout
        # The visual tokens the plan is made for: the request's (LLaVA-NeXT's count depends on the picture's size;
        # without a layout, the base view's until a call brings its image_sizes).
        self.grid_tokens = layout.total if layout is not None else self.grid_side**2
        self.call_layout = layout
        self.config = config.validate(self.grid_tokens if layout is not None else None)
        self.image_token_id = model.config.image_token_id
        self.has_cls = model.config.vision_feature_select_strategy == "default"
        self.method = method if method is not None else get_method(self.config.method)
        self._handles: list = []
        self.plan = None
        self._heads_kv = (tcfg.num_attention_heads, tcfg.num_key_value_heads or tcfg.num_attention_heads)
        self._set_plan(self.grid_tokens)
        # Where the fixed-layer methods read the decoder's attention: every run records the last token's and the
        # prompt's attention over the visual tokens there (FasterVLM's shift and dispersion; profile.py). A method
        # that decides attention itself shows its own view instead.
        self.profile_layers: dict[int, list[str]] = {} if self.method.changes_attention else \
            attention_read_layers(self.geometry)
        self._seams: list[LayerSeam] = []
        self._in_forward = False
        self._vision_before_forward = False
        self._t_forward = 0.0
        self._shared: SharedWork | None = None
        self.state = CallState()

    def _set_plan(self, visual: int) -> None:
        """The method's plan for `visual` tokens (the request's layout). Where the hooks are already installed, a
        plan for another count must act at the same layers (every method's layers follow the depth only)."""
        self.geometry = ModelGeometry(depth=self.depth, grid_tokens=visual, has_cls=self.has_cls,
                                      heads=self._heads_kv[0], kv_heads=self._heads_kv[1])
        plan = self.method.plan(self.config, self.geometry)
        if getattr(self, "plan", None) is not None and self._handles and (
                [s.after_layer for s in plan.stages] != [s.after_layer for s in self.plan.stages]
                or tuple(plan.attention_layers) != self.attention_layers):
            raise ConfigError(f"{self.config.method} acts at other layers for {visual} visual tokens than the "
                              "hooks were installed for: install the hooks with the request's layout")
        self.plan = plan
        self.stage_specs: dict[int, tuple[int, StageSpec]] = {s.after_layer: (k, s) for k, s in
                                                               enumerate(plan.stages)}
        self.prune_layers: tuple[int, ...] = tuple(s.after_layer for s in plan.stages if s.after_layer >= 0)
        self.schedule_note = plan.note
        self.attention_layers: tuple[int, ...] = tuple(plan.attention_layers)

    def share(self, work: SharedWork | None) -> PruneHooks:
        """Calls whose image arrives pre-encoded (generate's `mm_encoder_outputs`) take the vision captures and
        the vision time from `work`, and reuse what it stores (raters) instead of computing it again."""
        self._shared = work
        return self

    # --- install / remove --------------------------------------------------------------------------------------
    def install(self) -> PruneHooks:
        if self._handles:
            return self
        reg = self._handles.append
        reg(self.model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True))
        reg(self.model.register_forward_hook(self._on_forward_end))
        reg(self.llava.register_forward_pre_hook(self._on_llava_start, with_kwargs=True))
        reg(self.llava.vision_tower.register_forward_pre_hook(self._on_vision_start))
        reg(self.llava.multi_modal_projector.register_forward_hook(self._on_vision_end))
        reg(self.lm.register_forward_pre_hook(self._on_lm_start, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            reg(layer.register_forward_pre_hook(self._make_layer_pre(i), with_kwargs=True))
        for i in self.profile_layers:  # registered before the stages' hooks: it reads the layer's input layout
            attn = self.layers[i].self_attn
            reg(attn.q_proj.register_forward_hook(self._make_capture(i, "q")))
            reg(attn.k_proj.register_forward_hook(self._make_capture(i, "k")))
            reg(self.layers[i].register_forward_hook(self._make_profile(i)))
        for spec in self.plan.stages:
            i = spec.after_layer
            if i < 0:
                continue
            if self._captures_attention(spec):
                attn = self.layers[i].self_attn
                reg(attn.q_proj.register_forward_hook(self._make_capture(i, "q")))
                reg(attn.k_proj.register_forward_hook(self._make_capture(i, "k")))
            reg(self.layers[i].register_forward_hook(self._make_prune(i)))
        if self._captures_vision():
            layer = _vision_feature_layer(self.model)
            attn = layer.self_attn
            reg(attn.q_proj.register_forward_hook(self._make_capture("vision", "q")))
            reg(attn.k_proj.register_forward_hook(self._make_capture("vision", "k")))
            reg(layer.register_forward_hook(self._make_capture("vision", "out")))
            self.vision_attn = attn
        for i in self.attention_layers:
            seam = LayerSeam(self.layers[i].self_attn, self._make_decide(i), lambda: self.state.prefilling)
            self._seams.append(seam.install())
        return self

    def _captures_attention(self, spec: StageSpec) -> bool:
        return spec.attention or "attention" in self.method.captures

    def _captures_vision(self) -> bool:
        return self.plan.vision_cls or "vision" in self.method.captures

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for seam in self._seams:
            seam.remove()
        self._seams.clear()

    def __enter__(self) -> PruneHooks:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- timing and call boundaries ----------------------------------------------------------------------------
    # A call starts with the image: generate() encodes it before its first forward (the vision hook starts the
    # CallState), a plain forward() encodes it inside (the LLaVA pre-hook starts it).
    def _on_forward_start(self, module, args, kwargs):
        _sync(self.device)
        self._in_forward = True
        self._t_forward = time.perf_counter()

    def _on_forward_end(self, module, args, output):
        _sync(self.device)
        self.state.forward_ms.append((time.perf_counter() - self._t_forward) * 1e3)
        self._in_forward = False
        self.state.prefilling = False
        self.state.captured.clear()

    def _on_vision_start(self, module, args):
        if not self._in_forward:  # generate() encodes the image before its first forward: a new call
            self.state = CallState()
            self._vision_before_forward = True
        _sync(self.device)
        self.state.t_vision = time.perf_counter()

    def _on_vision_end(self, module, args, output):
        # Only the projector call that ends a vision tower pass counts: a method may call the projector again
        # on its own tokens (VisionZip's merged ones), which is pruning work, not image encoding.
        if self.state.t_vision is None:
            return
        _sync(self.device)
        self.state.vision_ms += (time.perf_counter() - self.state.t_vision) * 1e3
        self.state.t_vision = None

    def _make_capture(self, layer, kind):
        def hook(module, args, output):
            if self.state.prefilling or layer == "vision":
                self.state.captured[(layer, kind)] = output[0] if isinstance(output, tuple) else output

        return hook

    # --- the LLaVA wrapper: sequence layout, batch and padding checks -----------------------------------------
    def _on_llava_start(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ConfigError("pruning needs input_ids to locate the image tokens")
        # A prefill carries the image (pixel values, or features generate() encoded first). A decode step never
        # does, even when the model has just generated the image token's id.
        encoded = kwargs.get("mm_encoder_outputs") or {}
        if kwargs.get("pixel_values") is not None or encoded.get("image") is not None:
            if input_ids.shape[0] != 1:
                raise ConfigError(
                    f"batch size {input_ids.shape[0]} is not supported: the pruned sequence length differs per "
                    "image, so run one image at a time (batch size 1)"
                )
            where = (input_ids[0] == self.image_token_id).nonzero().flatten()
            self._call_layout(len(where), kwargs.get("image_sizes"))
            if not self._vision_before_forward:  # a plain forward(), or an image encoded before: the call starts here
                if kwargs.get("pixel_values") is not None:
                    self.state = CallState(vision_in_forward=True)
                elif self._shared is not None:
                    self.state = CallState(vision_ms=self._shared.vision_ms, captured=dict(self._shared.vision))
                else:
                    self.state = CallState()
            self._vision_before_forward = False
            st = self.state
            st.prefix, st.visual_total = int(where[0]), len(where)
            st.text = input_ids.shape[1] - st.prefix - st.visual_total
            st.tokens = [_Token(j) for j in range(st.visual_total)]
            st.prefilling = True
        mask = kwargs.get("attention_mask")
        if self.config.method != "dense" and mask is not None:
            if not bool(mask.all()):
                raise ConfigError("padded batches are not supported with pruning: use batch size 1, no padding")
            kwargs["attention_mask"] = None  # every layer then takes SDPA's causal path at its own length
        return args, kwargs

    def _call_layout(self, found: int, image_sizes) -> None:
        """The call's visual layout and the plan for its token count; a prompt whose image tokens do not match it
        is an error."""
        layout = self.layout
        if layout is None or (self.anyres and image_sizes is not None and layout.total != found):
            if image_sizes is None:
                raise ConfigError("LLaVA-NeXT needs the picture's layout: install the hooks with "
                                  "layout=pipeline.layout_for(lm, image.size) (generate() encodes the picture before "
                                  "its first forward and hands that forward no image_sizes)")
            h, w = (int(x) for x in image_sizes[0].tolist())
            layout = LY.for_model(self.model.config, (w, h))
        if found != layout.total:
            raise ConfigError(f"expected {layout.total} image tokens in the prompt, found {found}")
        if layout.total != self.grid_tokens:
            self.config.validate(layout.total)
            self._set_plan(layout.total)
            self.grid_tokens = layout.total
        self.call_layout = layout

    # --- before the decoder: the method's preparation, and stages before the LLM ------------------------------
    def _on_lm_start(self, module, args, kwargs):
        st = self.state
        if not st.prefilling:
            return None
        emb = kwargs["inputs_embeds"]
        n = emb.shape[1]
        pos = kwargs.get("position_ids")
        st.positions = pos if pos is not None else torch.arange(n, device=emb.device)[None]
        st.projector = emb[0, st.prefix : st.prefix + st.visual_total]
        t0 = time.perf_counter()
        inp = PrefillInput(st.projector, emb[0, st.prefix + st.visual_total :], st.memo, self._once)
        raters = self.method.prepare(self.config, inp)
        if raters is not None:
            _sync(self.device)
            st.raters_ms = (time.perf_counter() - t0) * 1e3
            if raters.ms is not None:  # computed once for the request: its one measurement
                st.raters_ms = raters.ms
            st.raters = raters.indices
            st.relevance = raters.relevance.tolist()
        if -1 in self.stage_specs:
            kwargs = self._prune_before_llm(emb, kwargs)
        return args, kwargs

    def _once(self, key: tuple, compute):
        """(value, ms) of work every run of the request shares (SharedWork.once); computed here without one."""
        self.state.shared_keys.append(key)
        if self._shared is None:
            return _timed(compute, self.device)
        return self._shared.once(key, compute, self.device)

    def _vision_input(self) -> VisionInput:
        st, attn = self.state, self.vision_attn
        if ("vision", "q") not in st.captured:
            raise ConfigError(f"{self.config.method} reads the vision tower's attention: pass pixel values, or an "
                              "image encoded by hooks.encode_image and handed over with PruneHooks.share")
        q = st.captured[("vision", "q")][0]  # (1 + Lv, Dv)
        k = st.captured[("vision", "k")][0]
        out = st.captured.get(("vision", "out"))
        h, hd = attn.num_heads, attn.head_dim

        def cls_row(crop: int = 0) -> torch.Tensor:
            return cls_attention(self.model, st.captured, crop)

        def crop(c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            o = st.captured.get(("vision", "out"))
            return (st.captured[("vision", "q")][c], st.captured[("vision", "k")][c],
                    o[c] if o is not None else None)

        return VisionInput(q, k, out[0] if out is not None else None, h, hd, attn.scale, cls_row,
                           self.llava.multi_modal_projector, crop=crop)

    def _stage_input(self, index: int, spec: StageSpec, hidden: torch.Tensor) -> StageInput:
        st = self.state
        inp = StageInput(
            index=index, spec=spec, prefix=st.prefix, visual=len(st.tokens), text=st.text, hidden=hidden,
            positions=st.positions[0], patches=[t.center for t in st.tokens], projector=st.projector, memo=st.memo,
            seed=self.config.seed, final_norm=self.lm.norm, rotary=lambda pos: self._rotary(hidden, pos),
            layout=self.call_layout,
        )
        i = spec.after_layer
        if i >= 0:
            if self._captures_attention(spec):
                inp.attention_rows = lambda rows: self._rows_attention(i, rows)
                inp.head_attention_rows = lambda rows: self._rows_attention(i, rows, per_head=True)
                inp.keys = lambda: self._keys(i)
            if i + 1 < self.depth:
                inp.next_attention_rows = lambda rows: self._next_rows_attention(i, hidden, rows)
        if self._captures_vision():
            inp.vision = self._vision_input()
        return inp

    def _prune_before_llm(self, emb: torch.Tensor, kwargs: dict) -> dict:
        st = self.state
        t0 = time.perf_counter()
        index, spec = self.stage_specs[-1]
        sel = self.method.select(self.config, self._stage_input(index, spec, emb[0]))
        new, src = self._cut(emb, sel)
        kwargs["inputs_embeds"] = new
        if self.plan.positions == "keep":
            new_pos = st.positions[:, src]
        else:
            new_pos = torch.arange(len(src), device=emb.device)[None]
            st.compacted = True
        kwargs["position_ids"] = new_pos.to(emb.device)
        st.positions = kwargs["position_ids"]
        _sync(self.device)
        self._record_stage(-1, sel, (time.perf_counter() - t0) * 1e3)
        return kwargs

    def _cut(self, hidden: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """The new sequence [prefix | lead | kept visual | merged | text] and, for each token, its source index
        (a lead token without a patch takes the first image slot's: its position id when positions are kept)."""
        st = self.state
        n, v = hidden.shape[1], len(st.tokens)
        dev = hidden.device
        keep = sel.kept.to(dev)

        def slots(groups: list[MergedGroup]) -> torch.Tensor:
            return st.prefix + torch.tensor([max(g.center, 0) for g in groups], dtype=torch.long, device=dev)

        src = torch.cat([torch.arange(st.prefix, device=dev), slots(sel.lead), st.prefix + keep, slots(sel.merged),
                         torch.arange(st.prefix + v, n, device=dev)])
        new = hidden[:, src]  # advanced indexing: a copy, so merged embeddings can be written into it
        for at, groups in ((st.prefix, sel.lead), (st.prefix + len(sel.lead) + len(keep), sel.merged)):
            if groups:
                new[0, at : at + len(groups)] = torch.stack([g.embedding for g in groups]).to(new.dtype)
        return new, src

    # --- decoder layers ----------------------------------------------------------------------------------------
    def _make_layer_pre(self, i: int):
        def hook(module, args, kwargs):
            st = self.state
            if st.prefilling:
                st.layer_inputs.append(len(st.tokens))
                if st.pos_emb is not None:
                    kwargs["position_embeddings"] = st.pos_emb
                    kwargs["position_ids"] = st.positions
                    kwargs["attention_mask"] = self._causal_mask(st.positions.shape[1], module)
                if i in self.stage_specs or i in self.profile_layers:
                    st.captured[(i, "pe")] = kwargs["position_embeddings"]
                return args, kwargs
            if self.prune_layers and i > self.prune_layers[0]:
                # One new token attends to every cached key; this layer's cache is shorter than layer 0's,
                # so the model-wide mask (sized for layer 0) must not be used here.
                kwargs["attention_mask"] = None
            if st.compacted:
                # Decoding after compaction: each layer continues its own compact positions.
                cache = kwargs.get("past_key_values")
                hs = args[0] if args else kwargs["hidden_states"]
                past = cache.get_seq_length(i) if cache is not None else 0
                pos = torch.arange(past, past + hs.shape[1], device=hs.device)[None]
                kwargs["position_embeddings"] = self.lm.rotary_emb(hs, pos)
                kwargs["position_ids"] = pos
                return args, kwargs
            return args, kwargs

        return hook

    def _causal_mask(self, n: int, layer) -> torch.Tensor | None:
        """None lets SDPA / FlashAttention take their causal path; eager attention needs the mask spelled out."""
        if layer.self_attn.config._attn_implementation != "eager":
            return None
        dtype = next(layer.parameters()).dtype
        mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=self.device).triu(1)
        return mask[None, None]

    def _make_prune(self, i: int):
        def hook(module, args, output):
            if not self.state.prefilling:
                return None
            return self._prune_after_layer(i, output)

        return hook

    def _heads(self, i: int, q: torch.Tensor | None, k: torch.Tensor, rows: torch.Tensor | None):
        """(H, r, hd) RoPE'd queries of `rows` and (Hkv, n, hd) RoPE'd keys of layer i's projections."""
        hd = self.layers[i].self_attn.head_dim
        cos, sin = self.state.captured[(i, "pe")]  # layer i's positions (also layer i + 1's: same sequence)
        n = k.shape[0]
        kh = _rope(k.view(n, -1, hd).transpose(0, 1), cos[0], sin[0])
        if q is None:
            return None, kh
        qr = _rope(q[rows].view(len(rows), -1, hd).transpose(0, 1), cos[0, rows], sin[0, rows])
        return qr, kh

    def _rows_attention(self, i: int, rows: torch.Tensor, per_head: bool = False, debug: bool = True) -> torch.Tensor:
        """(r, n) head-mean causal attention of `rows` at layer i (per head: (H, r, n)), from the captured q/k."""
        st = self.state
        qr, kh = self._heads(i, st.captured[(i, "q")][0], st.captured[(i, "k")][0], rows)
        heads = A.rows_attention_heads(qr, kh, rows, self.layers[i].self_attn.scaling)
        if per_head:
            return heads
        out = heads.mean(dim=0)
        if self.keep_debug and debug:
            st.rows_attention[i] = out
        return out

    def _rotary(self, hidden: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.lm.rotary_emb(hidden[None], pos.to(hidden.device)[None])
        return cos[0], sin[0]

    def _keys(self, i: int) -> torch.Tensor:
        return self._heads(i, None, self.state.captured[(i, "k")][0], None)[1]

    def _next_rows_attention(self, i: int, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the attention layer i + 1 will compute on `hidden` (its input), from its own projections."""
        layer = self.layers[i + 1]
        x = layer.input_layernorm(hidden[None])[0]
        qr, kh = self._heads(i, layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), rows)
        return A.rows_attention(qr, kh, rows, layer.self_attn.scaling)

    def _prune_after_layer(self, i: int, hidden: torch.Tensor) -> torch.Tensor | None:
        t0 = time.perf_counter()
        index, spec = self.stage_specs[i]
        sel = self.method.select(self.config, self._stage_input(index, spec, hidden[0]))
        # Nothing deleted: the layer is skipped.
        if len(sel.kept) == len(self.state.tokens) and not sel.merged and not sel.lead:
            _sync(self.device)
            self._record_stage(i, sel, (time.perf_counter() - t0) * 1e3)
            return None
        new_hidden, src = self._cut(hidden, sel)
        self._advance(src, hidden)
        _sync(self.device)
        self._record_stage(i, sel, (time.perf_counter() - t0) * 1e3)
        return new_hidden

    def _advance(self, src: torch.Tensor, hidden: torch.Tensor) -> None:
        """Positions and rotary embeddings of the cut sequence, for the layers that follow."""
        st = self.state
        if self.plan.positions == "keep":
            st.positions = st.positions[:, src]
        else:
            st.positions = torch.arange(len(src), device=hidden.device)[None]
            st.compacted = True
        st.pos_emb = self.lm.rotary_emb(hidden, st.positions)

    # --- the attention profile (FasterVLM's shift and dispersion) ----------------------------------------------
    def _make_profile(self, i: int):
        def hook(module, args, output):
            st = self.state
            if not st.prefilling or (i, "q") not in st.captured:
                return None
            n = st.captured[(i, "k")].shape[1]
            start, v = st.prefix, len(st.tokens)
            text = torch.arange(start + v, n, device=self.device)
            rows = self._rows_attention(i, text, debug=False)[:, start:start + v].float()  # (text, v) head mean
            patches = [t.center for t in st.tokens]
            lower = self.call_layout.lower_weights()
            st.profile.append({
                "layer": i, "methods": list(self.profile_layers[i]),
                "last": P.entry(rows[-1].tolist(), patches, st.visual_total, lower=lower),
                "prompt": P.entry(rows.mean(dim=0).tolist(), patches, st.visual_total, lower=lower),
                "merged_tokens": sum(t.members is not None for t in st.tokens),
            })
            return None

        return hook

    # --- attention decided by the method (the attention seam) -------------------------------------------------
    def _make_decide(self, i: int):
        def decide(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
            st = self.state
            _sync(self.device)
            t0 = time.perf_counter()
            n = query.shape[2]
            inp = AttentionInput(
                layer=i, n=n, prefix=st.prefix, visual=len(st.tokens), text=n - st.prefix - len(st.tokens),
                heads=query.shape[1], kv_heads=key.shape[1], memo=st.memo, seed=self.config.seed,
                column_sums=lambda rows, per_head: column_sums(query, key, scaling, rows, per_head),
            )
            choice = self.method.attend(self.config, inp)
            attended = choice.attended.long()
            _sync(self.device)
            ms = (time.perf_counter() - t0) * 1e3
            st.attention.append(self._attention_record(inp, choice.p, attended, choice.formula, choice.extras, ms))
            return attended

        return decide

    @staticmethod
    def _attention_record(inp: AttentionInput, p: int, attended: torch.Tensor, formula: str, extras: dict,
                          ms: float) -> AttentionLayer:
        first = attended[0]
        vis_end = inp.prefix + inp.visual
        return AttentionLayer(
            layer=inp.layer, n=inp.n, p=int(p), attended=first.tolist(),
            per_head=[row.tolist() for row in attended] if attended.shape[0] > 1 else None,
            prefix=int((first < inp.prefix).sum()), visual=int(((first >= inp.prefix) & (first < vis_end)).sum()),
            text=int((first >= vis_end).sum()), formula=formula, overhead_ms=ms, extras=plain(extras),
        )

    # --- records -----------------------------------------------------------------------------------------------
    def _record_stage(self, after: int, sel: Selection, overhead_ms: float) -> None:
        """Record a stage and update the current visual tokens: kept ones, then new merged ones."""
        st = self.state
        before = st.tokens
        new_tokens = [_Token(-1, []) for _ in sel.lead] + [before[j] for j in sel.kept.tolist()]
        for g in sel.merged:
            members: list[int] = []
            for j in g.members:
                t = before[j]
                members.extend(t.members if t.members is not None else [t.center])
            new_tokens.append(_Token(before[g.center].center, sorted(members)))
        st.tokens = new_tokens
        st.stages.append(
            Stage(
                after_layer=after,
                visual_in=len(before),
                visual_out=len(new_tokens),
                deleted=len(before) - len(sel.kept),
                recycled=sum(len(g.members) for g in sel.merged),
                clusters=len(sel.merged),
                rank=sel.rank,
                raters=sel.rows,
                kept=[t.center for t in new_tokens if t.members is None],
                merged=[MergedToken(t.center, t.members) for t in new_tokens if t.members is not None],
                input_patches=[t.center for t in before],
                scores=sel.scores.float().cpu().tolist(),
                formula=sel.formula,
                overhead_ms=overhead_ms,
                extras=plain(sel.extras),
            )
        )

    def record(self) -> CallRecord:
        """The last call as plain data."""
        st = self.state
        return CallRecord(
            method=self.config.method,
            positions=self.plan.positions,
            prefix=st.prefix,
            visual_total=st.visual_total,
            text=st.text,
            layer_inputs=list(st.layer_inputs),
            stages=list(st.stages),
            relevance=st.relevance,
            raters=st.raters.tolist() if st.raters is not None else None,
            forward_ms=list(st.forward_ms),
            vision_ms=st.vision_ms,
            raters_ms=st.raters_ms,
            vision_in_forward=st.vision_in_forward,
            counts=self.plan.counts,
            note=self.plan.note,
            shared_keys=list(st.shared_keys),
            attention=list(st.attention),
            profile=list(st.profile),
        )

    def layer_records(self) -> list[LayerRecord]:
        return self.record().layer_records()
