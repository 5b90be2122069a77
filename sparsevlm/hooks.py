"""SparseVLM and the baselines installed on a transformers `LlavaForConditionalGeneration` through hooks.

The only module that knows transformers internals. Nothing is monkey-patched and the model keeps its
attention implementation (SDPA / FlashAttention): visual significance comes from the rater rows of attention,
recomputed from the layer's own q/k projections (captured by hooks on q_proj/k_proj), never the L x L matrix.

How pruning after decoder layer l works: layer l runs on the full sequence; a forward hook on it cuts its output
hidden states (and appends recycled tokens); forward pre-hooks on the later layers hand them position
embeddings / ids matching the shorter sequence and a None mask (SDPA's causal path; batch 1, no padding).
The KV cache follows by itself: layers <= l cached the full sequence, later layers cache the pruned one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import algorithm as A
from . import schedule
from .config import PruneConfig
from .errors import ConfigError
from .trace import LayerRecord, MergedToken, Stage


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
    layer_inputs: list[int] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    captured: dict = field(default_factory=dict)  # (layer, "q"/"k"/"pe") -> tensor, this prefill only
    rows_attention: dict = field(default_factory=dict)  # layer -> (r, n) attention rows (debug)
    prefilling: bool = False
    compacted: bool = False  # positions were compacted at some stage (compact mode)
    forward_ms: list[float] = field(default_factory=list)
    vision_ms: float = 0.0
    raters_ms: float = 0.0
    t_vision: float = 0.0
    vision_in_forward: bool = False  # plain forward(): vision time is inside the first forward's time


class PruneHooks:
    """Install with `hooks = PruneHooks(model, config).install()`; `hooks.remove()` leaves the model vanilla.

    Usable as a context manager. State is per call: every forward with pixel_values starts a fresh CallState,
    so consecutive calls never see each other's decisions. `hooks.state` holds the last call's record.
    """

    def __init__(self, model, config: PruneConfig, keep_debug: bool = False):
        self.model = model
        self.llava = model.model
        self.lm = self.llava.language_model
        self.layers = self.lm.layers
        self.depth = len(self.layers)
        self.device = next(model.parameters()).device
        self.keep_debug = keep_debug
        vcfg = model.config.vision_config
        self.grid_side = vcfg.image_size // vcfg.patch_size
        self.grid_tokens = self.grid_side**2
        self.config = config.validate(self.grid_tokens)
        self.image_token_id = model.config.image_token_id
        self.has_cls = model.config.vision_feature_select_strategy == "default"
        self._handles: list = []
        self._in_forward = False
        self._vision_before_forward = False
        self._t_forward = 0.0
        self.state = CallState()
        self._plan()

    # --- configuration -----------------------------------------------------------------------------------------
    def _plan(self) -> None:
        c, lv, depth = self.config, self.grid_tokens, self.depth
        self.prune_layers: tuple[int, ...] = ()
        self.fixed_totals: list[int] = []
        self.schedule_note = ""
        self.single_keep = 0
        if c.method == "sparsevlm":
            if c.count_mode == "fixed":
                self.prune_layers, self.fixed_totals, self.schedule_note = schedule.fixed_counts(c, lv, depth)
            else:
                self.prune_layers = schedule.sparsevlm_layers(c, depth)
        elif c.method == "fastv":
            k = schedule.fastv_layer(c, depth)
            self.prune_layers = (k,)
            self.single_keep = schedule.single_stage_keep(c.budget, lv, k, depth)
        elif c.method in ("fastervlm", "random"):
            if c.method == "fastervlm" and not self.has_cls:
                raise ConfigError(
                    "FasterVLM ranks patches by the vision tower's [CLS] attention, and this vision tower "
                    "(no [CLS] token, e.g. SigLIP) has none: choose another method"
                )
            self.single_keep = schedule.single_stage_keep(c.budget, lv, -1, depth)

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
        for i in self.prune_layers:
            attn = self.layers[i].self_attn
            reg(attn.q_proj.register_forward_hook(self._make_capture(i, "q")))
            reg(attn.k_proj.register_forward_hook(self._make_capture(i, "k")))
            reg(self.layers[i].register_forward_hook(self._make_prune(i)))
        if self.config.method == "fastervlm":
            enc_layers = getattr(self.llava.vision_tower, "vision_model", self.llava.vision_tower).encoder.layers
            idx = self.model.config.vision_feature_layer
            idx = idx if idx >= 0 else len(enc_layers) + idx  # hidden_states[-2] is the output of layer L-2
            attn = enc_layers[idx].self_attn
            reg(attn.q_proj.register_forward_hook(self._make_capture("vision", "q")))
            reg(attn.k_proj.register_forward_hook(self._make_capture("vision", "k")))
            self.vision_attn = attn
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

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
        _sync(self.device)
        self.state.vision_ms += (time.perf_counter() - self.state.t_vision) * 1e3

    def _make_capture(self, layer, kind):
        def hook(module, args, output):
            if self.state.prefilling or layer == "vision":
                self.state.captured[(layer, kind)] = output

        return hook

    # --- the LLaVA wrapper: sequence layout, batch and padding checks -----------------------------------------
    def _on_llava_start(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ConfigError("pruning needs input_ids to locate the image tokens")
        if bool((input_ids == self.image_token_id).any()):  # a prefill with an image
            if input_ids.shape[0] != 1:
                raise ConfigError(
                    f"batch size {input_ids.shape[0]} is not supported: the pruned sequence length differs per "
                    "image, so run one image at a time (batch size 1)"
                )
            where = (input_ids[0] == self.image_token_id).nonzero().flatten()
            if len(where) != self.grid_tokens:
                raise ConfigError(f"expected {self.grid_tokens} image tokens in the prompt, found {len(where)}")
            if not self._vision_before_forward:  # a plain forward(): the call starts here
                self.state = CallState(vision_in_forward=True)
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

    # --- before the decoder: text raters, and the methods that prune before the LLM ---------------------------
    def _on_lm_start(self, module, args, kwargs):
        st = self.state
        if not st.prefilling:
            return None
        emb = kwargs["inputs_embeds"]
        n = emb.shape[1]
        pos = kwargs.get("position_ids")
        st.positions = pos if pos is not None else torch.arange(n, device=emb.device)[None]
        method = self.config.method
        if method == "sparsevlm":
            t0 = time.perf_counter()
            vis = emb[0, st.prefix : st.prefix + st.visual_total]
            txt = emb[0, st.prefix + st.visual_total :]
            relevance = A.text_relevance(vis, txt)
            st.raters = A.select_raters(relevance, self.config.rater_rule)
            _sync(self.device)
            st.raters_ms = (time.perf_counter() - t0) * 1e3
            st.relevance = relevance.tolist()
        if method in ("fastervlm", "random"):
            kwargs = self._prune_before_llm(emb, kwargs)
        return args, kwargs

    def _prune_before_llm(self, emb: torch.Tensor, kwargs: dict) -> dict:
        st, k, lv = self.state, self.single_keep, self.state.visual_total
        t0 = time.perf_counter()
        if self.config.method == "fastervlm":
            q = st.captured[("vision", "q")][0]  # (1 + Lv, Dv)
            kk = st.captured[("vision", "k")][0]
            attn = self.vision_attn
            h, hd = attn.num_heads, attn.head_dim
            qh = q[:1].view(1, h, hd).transpose(0, 1)  # the [CLS] row
            kh = kk.view(-1, h, hd).transpose(0, 1)
            cls = A.rows_attention(qh, kh, torch.tensor([kk.shape[0]]), attn.scale)  # no causality in ViT
            scores = cls[0, 1:]
            formula = f"keep top {k} of {lv} patches by [CLS] attention (budget {self.config.budget})"
        else:
            g = torch.Generator().manual_seed(self.config.seed)
            scores = torch.rand(lv, generator=g).to(emb.device)
            formula = f"keep {k} of {lv} patches uniformly at random (seed {self.config.seed})"
        keep = torch.topk(scores, k).indices.sort().values
        src = self._source_index(emb.shape[1], keep, None)
        kwargs["inputs_embeds"] = emb[:, src]
        new_pos = st.positions[:, src] if self.config.positions == "keep" else torch.arange(len(src))[None]
        kwargs["position_ids"] = new_pos.to(emb.device)
        st.positions = kwargs["position_ids"]
        st.compacted = self.config.positions == "compact"
        _sync(self.device)
        self._record_stage(-1, scores, keep, [], None, 0, formula, (time.perf_counter() - t0) * 1e3, lv - k, 0)
        return kwargs

    def _source_index(self, n: int, keep_local: torch.Tensor, centers_local: torch.Tensor | None) -> torch.Tensor:
        """Index into the current sequence of each token of the new one (merged tokens: their center)."""
        st = self.state
        v = len(st.tokens)
        dev = keep_local.device
        parts = [torch.arange(st.prefix, device=dev), st.prefix + keep_local]
        if centers_local is not None and len(centers_local):
            parts.append(st.prefix + centers_local.to(dev))
        parts.append(torch.arange(st.prefix + v, n, device=dev))
        return torch.cat(parts)

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
                if i in self.prune_layers:
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

    def _rows_attention(self, i: int, rows: torch.Tensor) -> torch.Tensor:
        """(r, n) head-mean causal attention of `rows` at layer i, from the captured q/k projections."""
        st = self.state
        attn = self.layers[i].self_attn
        hd = attn.head_dim
        q = st.captured.pop((i, "q"))[0]  # (n, H*hd)
        k = st.captured.pop((i, "k"))[0]  # (n, Hkv*hd)
        cos, sin = st.captured.pop((i, "pe"))
        n = k.shape[0]
        qr = q[rows].view(len(rows), -1, hd).transpose(0, 1)  # (H, r, hd)
        kh = k.view(n, -1, hd).transpose(0, 1)  # (Hkv, n, hd)
        qr = _rope(qr, cos[0, rows], sin[0, rows])
        kh = _rope(kh, cos[0], sin[0])
        out = A.rows_attention(qr, kh, rows, attn.scaling)
        if self.keep_debug:
            st.rows_attention[i] = out
        return out

    def _prune_after_layer(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        st, c = self.state, self.config
        t0 = time.perf_counter()
        n, v = hidden.shape[1], len(st.tokens)
        text_start = st.prefix + v
        if c.method == "fastv":
            rows = torch.tensor([n - 1], device=hidden.device)
        else:
            rows = st.raters.to(hidden.device) + text_start
        p = self._rows_attention(i, rows)[:, st.prefix : text_start]
        scores = A.visual_significance(p)
        rank = A.attention_rank(p)
        stage_no = len(st.stages)

        recycle = c.recycle and c.method == "sparsevlm"
        # `direct`: visual tokens kept as they are; recycled clusters come on top of them.
        if c.method == "fastv":
            direct = min(self.single_keep, v)
            formula = f"FastV: keep top {direct} of {v} by last-token attention after layer {i}"
        elif c.count_mode == "fixed":
            total = min(self.fixed_totals[stage_no], v)
            direct = A.direct_keep_for_total(v, total, recycle, c.tau, c.theta)
            formula = f"fixed budget {c.budget}: keep {total} of {v} (incl. recycled); {self.schedule_note}"
        elif c.count_mode == "paper":
            deleted = A.paper_deleted_count(v, rank, c.lam)
            direct = v - deleted
            formula = f"N = floor(lambda x (Lv - rank(P))) = floor({c.lam:g} x ({v} - {rank})) = {deleted} deleted"
        else:
            direct = A.code_kept_count(v, rank, c.scale, c.bias)
            formula = (
                f"kept = min(int(rank(P) x scale + bias), Lv - 1) = min(int({rank} x {c.scale:g} + {c.bias:g}), "
                f"{v - 1}) = {direct}"
            )
        if direct >= v:  # nothing to delete: the layer is skipped (paper: N = 0)
            _sync(self.device)
            self._record_stage(i, scores, torch.arange(v), [], rank, len(rows), formula + " (skipped)",
                               (time.perf_counter() - t0) * 1e3, 0, 0)
            return None

        order = torch.argsort(scores, descending=True)
        keep = order[:direct].sort().values
        deleted = order[direct:]  # by descending score
        merged_h, centers, groups, n_rec = None, None, [], 0
        if recycle and len(deleted):
            n_rec, n_clu = A.recycle_sizes(len(deleted), c.tau, c.theta)
            rec = deleted[:n_rec]
            x = hidden[0, st.prefix + rec]
            gen = torch.Generator().manual_seed(c.seed + i)
            ctr, labels = A.density_peak_clusters(x, n_clu, c.assign, gen)
            merged_h = A.merge_clusters(x, labels, len(ctr), c.merge)
            centers = rec[ctr]
            groups = [rec[labels == j].tolist() for j in range(len(ctr))]

        src = self._source_index(n, keep, centers)
        new_hidden = hidden[:, src]
        if merged_h is not None:
            at = st.prefix + len(keep)
            new_hidden = new_hidden.clone()
            new_hidden[0, at : at + len(merged_h)] = merged_h
        self._advance(src, hidden)
        _sync(self.device)
        overhead = (time.perf_counter() - t0) * 1e3
        self._record_stage(i, scores, keep, list(zip(centers.tolist(), groups)) if centers is not None else [],
                           rank, len(rows), formula, overhead, len(deleted), n_rec)
        return new_hidden

    def _advance(self, src: torch.Tensor, hidden: torch.Tensor) -> None:
        """Positions and rotary embeddings of the cut sequence, for the layers that follow."""
        st = self.state
        if self.config.positions == "keep":
            st.positions = st.positions[:, src]
        else:
            st.positions = torch.arange(len(src), device=hidden.device)[None]
            st.compacted = True
        st.pos_emb = self.lm.rotary_emb(hidden, st.positions)

    # --- trace records -----------------------------------------------------------------------------------------
    def _record_stage(self, after, scores, keep, new_groups, rank, raters, formula, overhead_ms, deleted, recycled):
        """Record a stage and update the current visual tokens: kept ones, then new merged ones."""
        st = self.state
        before = st.tokens
        new_tokens = [before[j] for j in keep.tolist()]
        for center_local, members_local in new_groups:
            members: list[int] = []
            for j in members_local:
                t = before[j]
                members.extend(t.members if t.members is not None else [t.center])
            new_tokens.append(_Token(before[center_local].center, sorted(members)))
        st.tokens = new_tokens
        st.stages.append(
            Stage(
                after_layer=after,
                visual_in=len(before),
                visual_out=len(new_tokens),
                deleted=deleted,
                recycled=recycled,
                clusters=len(new_groups),
                rank=rank,
                raters=raters,
                kept=[t.center for t in new_tokens if t.members is None],
                merged=[MergedToken(t.center, t.members) for t in new_tokens if t.members is not None],
                input_patches=[t.center for t in before],
                scores=scores.float().cpu().tolist(),
                formula=formula,
                overhead_ms=overhead_ms,
            )
        )

    def layer_records(self) -> list[LayerRecord]:
        st = self.state
        by_layer = {s.after_layer: k for k, s in enumerate(st.stages)}
        out = []
        for i, vin in enumerate(st.layer_inputs):
            k = by_layer.get(i)
            out.append(LayerRecord(i, vin, st.stages[k].visual_out if k is not None else vin, k))
        return out
