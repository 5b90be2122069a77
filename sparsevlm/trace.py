"""The record of one call: everything the engine decided and measured, and everything the UI shows.

A trace is plain data (dataclasses of ints, floats, strings and lists) so it round-trips through JSON.
Patch indices are always ORIGINAL indices of the visual tokens in the sequence the model was given. Where they
come from is the trace's `layout` (sparsevlm/layout.py): LLaVA-1.5 has one view, where patch j is cell
(j // cols, j % cols) of the grid; LLaVA-NeXT has a base view and tiles, each with its cells' tokens, and the
row-end newline tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass


@dataclass
class Rater:
    """One text token after the image (docs/engine.md)."""

    index: int  # position relative to the text start
    token: str
    score: float  # R_i = mean over visual rows of softmax_over_text(Hv Hq^T)
    rater: bool  # selected as a text rater


@dataclass
class MergedToken:
    """A recycled token: the merge of a cluster of deleted tokens (docs/engine.md)."""

    center: int  # original patch index of the cluster center (its position id is the center's); -1: no patch
    # (VisionZip's vision [CLS] token, members empty)
    members: list[int]  # original patch indices it represents (merged tokens re-merged are flattened)


@dataclass
class Stage:
    """One pruning step. after_layer = -1 means before the LLM (FasterVLM, random)."""

    after_layer: int
    visual_in: int
    visual_out: int  # kept + clusters
    deleted: int  # tokens removed from the visual set (before recycling brings some back as merged tokens)
    recycled: int  # deleted tokens that went into clustering
    clusters: int  # merged tokens added
    rank: int | None  # rank(P) of the rater-visual attention matrix; None where the method has no P
    raters: int  # rows of P
    kept: list[int]  # original patch indices of the surviving unmerged tokens, in sequence order
    merged: list[MergedToken]  # surviving merged tokens (new ones and earlier ones that survived)
    input_patches: list[int]  # for each visual token entering the stage: its patch (center for merged)
    scores: list[float]  # significance of each entering token (aligned with input_patches)
    formula: str  # the count rule that ran, with its numbers filled in
    overhead_ms: float = 0.0  # measured time spent deciding and gathering (scores, rank, clustering)
    # Method-specific plain data for the overlay: pivots and their claims (DART), selection order (DivPrune),
    # uncorrected scores and priority heads (SparseVLM v2), [CLS] slot and member cosines (VisionZip), ...
    extras: dict = field(default_factory=dict)

    def represented(self) -> set[int]:
        """Patches still represented after this stage: kept directly or inside a merged token."""
        out = set(self.kept)
        for m in self.merged:
            out.update(m.members)
        return out


@dataclass
class AttentionLayer:
    """One decoder layer where the method decided which tokens take part in attention (ZipVL; docs/engine.md).
    Positions are 0-based indices into the prefill sequence [prefix | visual | text]; nothing left the residual
    stream, so visual position prefix + j is patch j."""

    layer: int
    n: int  # sequence length at this layer
    p: int  # the count the rule chose
    attended: list[int]  # positions that attended (among themselves) and stay in this layer's KV cache
    prefix: int  # how many of them lie before the image (per-head selection: of the first KV head's set)
    visual: int  # ... are visual tokens
    text: int  # ... lie after the image
    per_head: list[list[int]] | None = None  # per-KV-head selection: each head's positions (attended = head 0's)
    formula: str = ""
    overhead_ms: float = 0.0  # measured: probe rows, the count and the selection at this layer
    # tau, probe positions ("all" for every row), forced_last, the sorted cumulative mass curve (curve_ranks,
    # curve_mass) and, with probes "both", the full-attention set's p and its overlap with the probes' set.
    extras: dict = field(default_factory=dict)


@dataclass
class LayerRecord:
    layer: int
    visual_in: int  # visual tokens this decoder layer processes
    visual_out: int  # visual tokens leaving it (differs at pruning layers)
    stage: int | None  # index into PruneTrace.stages when the layer prunes


@dataclass
class Timings:
    """Measured wall-clock milliseconds (CUDA-synchronized on GPU)."""

    vision: float = 0.0  # vision tower + projector
    raters: float = 0.0
    prune_overhead: float = 0.0  # sum over stages, part of prefill
    prefill: float = 0.0  # vision + LLM prefill + pruning: time to first token
    llm_prefill: float = 0.0  # the decoder's prefill alone (pruning overhead included, vision excluded)
    decode_per_token: float = 0.0
    decode_tokens: int = 0
    total: float = 0.0  # vision + generate(): at least prefill + decode_per_token x decode_tokens
    # Parts measured once for the whole request and shared by all its runs (the pruned and the dense run, every
    # method of a comparison): "vision", "raters". Their figure is that one measurement, the same in each trace.
    shared: list[str] = field(default_factory=list)


@dataclass
class Cost:
    """Computed (analytic) costs; see sparsevlm/cost.py for the formulas."""

    equal_tokens: float = 0.0  # mean over decoder layers of visual tokens each layer processes (input count)
    equal_tokens_reference: float = 0.0  # same, counting a pruning layer at its output count (reference code)
    accounting: str = "paper"  # how the budget was met: paper (published settings) | flops (equal input count)
    budget: int | None = None  # the configured budget (None: dense or adaptive counts)
    budget_counting: str = ""  # the figure the accounting met the budget in: input | output | kept
    budget_figure: float | None = None  # that figure, measured from the run's layer counts
    budget_met: bool | None = None  # budget_figure within one token of the budget
    prefill_flops_dense: float = 0.0
    prefill_flops: float = 0.0  # includes the pruning overhead
    prune_overhead_flops: float = 0.0
    kv_bytes_dense: int = 0
    kv_bytes: int = 0
    visual_kv_bytes_dense: int = 0
    visual_kv_bytes: int = 0
    bytes_per_value: int = 2
    attention_counting: str = "full"  # scores+values counted as 4 n^2 d (no causal halving)
    # Methods that decide attention (ZipVL): the mean over layers of the share of all tokens that attended, of the
    # visual tokens that attended (a count), and what the budget column says for a method without a budget.
    attended_share: float | None = None
    attended_visual: float | None = None
    budget_note: str = ""


@dataclass
class Memory:
    """MEASURED memory, next to Cost's computed figures: read from the KV cache object and the CUDA allocator."""

    kv_bytes_prefill: int | None = None  # the cache's K/V tensors right after the prefill (compare Cost.kv_bytes)
    kv_bytes_final: int | None = None  # after generate: the prefill's entries plus those of the decoded tokens
    kv_tokens_per_layer: list[int] = field(default_factory=list)  # cached positions per layer after the prefill
    peak_gpu_bytes: int | None = None  # torch.cuda.max_memory_allocated over the call; None when not on CUDA
    peak_gpu_note: str = ""  # says why peak_gpu_bytes is missing (CPU: n/a)


@dataclass
class PruneTrace:
    method: str
    config: dict
    model: dict  # name, architecture, decoder layers, hidden size, grid, device, dtype
    question: str
    prompt: str
    answer: str = ""
    image_size: tuple[int, int] = (0, 0)  # original upload (width, height)
    # Region of the original image (x0, y0, x1, y1 in its pixels) that the processor turns into the model's
    # square input; may extend beyond the image when the processor pads. Patch boxes map through it.
    input_region: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    grid: tuple[int, int] = (0, 0)  # (rows, cols) of the patch grid
    prefix_tokens: int = 0  # tokens before the image
    visual_tokens: int = 0  # Lv
    text_tokens: int = 0  # tokens after the image (question + template suffix)
    generated_tokens: int = 0
    raters: list[Rater] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)
    timings_ms: Timings = field(default_factory=Timings)
    cost: Cost = field(default_factory=Cost)
    notes: list[str] = field(default_factory=list)
    memory: Memory = field(default_factory=Memory)
    attention: list[AttentionLayer] = field(default_factory=list)  # per layer, where the method decided attention
    # FasterVLM's view of this picture (sparsevlm/profile.py): {"cls": {"attention", "lower_half_share",
    # "top20_share", "tokens"} or None (no [CLS]), "decoder": [{"layer", "methods", "last": {...}, "prompt": {...},
    # "merged_tokens"}, ...]}: the vision tower's [CLS] attention at the feature layer, and the last token's and the
    # prompt's (mean over the tokens after the image) head-mean attention over the visual tokens, in original patch
    # order (None where a patch has no token at that layer), at each layer a fixed-layer method reads.
    attention_profile: dict = field(default_factory=dict)
    # Where each visual token comes from (layout.VisualLayout.to_dict): {"views": [{"name", "box" [x0, y0, x1, y1]
    # in the upload's pixels, "grid" [rows, cols], "tokens", "crop", "patches"}, ...], "newlines": [...],
    # "newline_rows", "image_size"}. None in traces written before layouts: their one grid is `grid` over
    # `input_region`.
    layout: dict | None = None

    def visual_layout(self):
        """The trace's layout.VisualLayout (for an older trace: its one grid over `input_region`)."""
        from .layout import VisualLayout, single

        cached = self.__dict__.get("_visual_layout")  # (the dict it was read from, the layout): renderers ask often
        if cached is not None and cached[0] is self.layout:
            return cached[1]
        layout = VisualLayout.from_dict(self.layout) if self.layout else \
            single(tuple(self.grid), tuple(self.input_region), tuple(self.image_size))
        self.__dict__["_visual_layout"] = (self.layout, layout)
        return layout

    # --- derived views -------------------------------------------------------------------------------------
    def stage_for_layer(self, layer: int) -> Stage | None:
        """The last stage whose result a decoder layer sees (None before any pruning)."""
        last = None
        for s in self.stages:
            if s.after_layer < layer:
                last = s
        return last

    def layer_table(self) -> list[dict]:
        """Per decoder layer, the counts the CLI prints (null where the layer does not prune)."""
        rows = []
        for rec in self.layers:
            st = self.stages[rec.stage] if rec.stage is not None else None
            rows.append(
                {
                    "layer": rec.layer,
                    "visual_in": rec.visual_in,
                    "visual_out": rec.visual_out,
                    "rank": st.rank if st else None,
                    "deleted": st.deleted if st else None,
                    "recycled": st.recycled if st else None,
                    "clusters": st.clusters if st else None,
                }
            )
        return rows

    # --- serialization -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The trace as plain data, equal to `dataclasses.asdict(self)` (every container copied), without asdict's
        deep copy of each number: a LLaVA-NeXT trace holds lists of thousands of patch indices and scores per
        stage, which asdict copied one by one."""
        return _plain(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> PruneTrace:
        d = dict(d)
        d["raters"] = [Rater(**r) for r in d.get("raters", [])]
        stages = []
        for s in d.get("stages", []):
            s = dict(s)
            s["merged"] = [MergedToken(**m) for m in s.get("merged", [])]
            stages.append(Stage(**s))
        d["stages"] = stages
        d["layers"] = [LayerRecord(**r) for r in d.get("layers", [])]
        d["timings_ms"] = Timings(**d.get("timings_ms", {}))
        d["cost"] = Cost(**d.get("cost", {}))
        d["memory"] = Memory(**d.get("memory", {}))
        d["attention"] = [AttentionLayer(**a) for a in d.get("attention", [])]
        for k in ("image_size", "input_region", "grid"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> PruneTrace:
        return cls.from_dict(json.loads(s))

    def summary(self) -> dict:
        """The CLI's --json object."""
        t = self.timings_ms
        c = self.cost
        return {
            "answer": self.answer,
            "method": self.method,
            "config": self.config,
            "model": self.model,
            "equal_tokens": c.equal_tokens,
            "equal_tokens_reference": c.equal_tokens_reference,
            "equal_tokens_input": c.equal_tokens,
            "equal_tokens_output": c.equal_tokens_reference,
            "accounting": c.accounting,
            "budget": c.budget,
            "budget_counting": c.budget_counting,
            "budget_figure": c.budget_figure,
            "budget_met": c.budget_met,
            "visual_tokens": self.visual_tokens,
            "text_tokens": self.text_tokens,
            "layers": self.layer_table(),
            "raters": [{"token": r.token, "score": r.score, "rater": r.rater} for r in self.raters],
            "timings_ms": {
                "vision": t.vision,
                "raters": t.raters,
                "prefill": t.prefill,
                "llm_prefill": t.llm_prefill,
                "prune_overhead": t.prune_overhead,
                "decode_per_token": t.decode_per_token,
                "decode_tokens": t.decode_tokens,
                "total": t.total,
                "shared": list(t.shared),
            },
            "cost": {
                "prefill_flops_dense": c.prefill_flops_dense,
                "prefill_flops": c.prefill_flops,
                "prune_overhead_flops": c.prune_overhead_flops,
                "kv_bytes_dense": c.kv_bytes_dense,
                "kv_bytes": c.kv_bytes,
                "visual_kv_bytes_dense": c.visual_kv_bytes_dense,
                "visual_kv_bytes": c.visual_kv_bytes,
                "attention_counting": c.attention_counting,
            },
            "memory_measured": {
                "kv_bytes_prefill": self.memory.kv_bytes_prefill,
                "kv_bytes_final": self.memory.kv_bytes_final,
                "peak_gpu_bytes": self.memory.peak_gpu_bytes,
                "peak_gpu_note": self.memory.peak_gpu_note,
            },
            "notes": self.notes,
            **({"attention": self.attention_summary()} if self.attention else {}),
            "attention_profile": self.profile_summary(),
        }

    def profile_summary(self) -> dict:
        """The attention profile's statistics without the per-patch attention (the full profile is in the trace:
        `attention_profile`, --trace-out, /run)."""
        def stats(e: dict | None) -> dict | None:
            return None if e is None else {k: v for k, v in e.items() if k != "attention"}

        p = self.attention_profile or {}
        return {"cls": stats(p.get("cls")),
                "decoder": [{**{k: v for k, v in d.items() if k not in ("last", "prompt")},
                             "last": stats(d.get("last")), "prompt": stats(d.get("prompt"))}
                            for d in p.get("decoder", [])]}

    def attention_summary(self) -> dict:
        """Where the method decided attention: per layer p and the attended counts; the means; the KV cache."""
        c, m = self.cost, self.memory
        rows = [{"layer": a.layer, "p": a.p, "attended": len(a.attended), "visual": a.visual, "text": a.text,
                 "prefix": a.prefix, "forced_last": a.extras.get("forced_last"),
                 **({"full": a.extras["full"]} if "full" in a.extras else {})} for a in self.attention]
        return {"attended_share": c.attended_share, "attended_visual": c.attended_visual,
                "attended_visual_share": (c.attended_visual / self.visual_tokens
                                          if c.attended_visual is not None and self.visual_tokens else None),
                "kv_bytes_prefill_measured": m.kv_bytes_prefill, "kv_tokens_per_layer": list(m.kv_tokens_per_layer),
                "layers": rows}


_ATOMS = frozenset({int, float, str, bool, type(None)})


def _plain(x):
    """`dataclasses.asdict`'s conversion: dataclasses to dicts, lists, tuples and dicts copied recursively; a list
    or tuple of plain numbers and strings is copied in one step."""
    if is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in fields(x)}
    if isinstance(x, (list, tuple)):
        if set(map(type, x)) <= _ATOMS:
            return type(x)(x)
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    return x

