"""What a pruning method is, as the engine's plumbing (hooks.py) sees it.

A method is one small module with a `PruneMethod` subclass registered in `methods/__init__.py`. It never touches
transformers: it declares a `Plan` (where it acts and how many it keeps, from the budget, depth, grid and
accounting: its module's count policy returns `schedule.Counts`, and `Plan.of` makes the stages) and, at each
stage, returns a `Selection` from what the plumbing captured (`StageInput`). The plumbing cuts the sequence,
inserts merged tokens, fixes positions / rotary embeddings / masks / cache and records the trace.

Index conventions: "local" indices address the CURRENT visual tokens in sequence order (0..V_cur-1); the
plumbing maps them back to original patches. Sequence indices (for attention rows) address the current full
sequence: `[prefix | V_cur visual | text]`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import algorithm as A
from ..config import PruneConfig
from ..options import Option
from ..schedule import Counts


@dataclass(frozen=True)
class ModelGeometry:
    """What a plan may depend on: decoder depth, the image grid, the vision tower, the attention heads."""

    depth: int
    grid_tokens: int
    has_cls: bool  # the vision tower has a [CLS] token (CLIP yes, SigLIP no)
    heads: int
    kv_heads: int


@dataclass(frozen=True)
class StageSpec:
    """One place a method acts."""

    after_layer: int  # -1: before the LLM, on the projector output; i >= 0: on the output of decoder layer i
    keep: int | None = None  # tokens kept directly (None: decided at run time, e.g. from rank(P))
    attention: bool = False  # capture layer `after_layer`'s q/k so StageInput.attention_rows / keys work


@dataclass(frozen=True)
class Plan:
    """Where a method acts, how many tokens it keeps there, and how positions are handled."""

    stages: tuple[StageSpec, ...] = ()
    positions: str = "keep"  # keep the original position ids or compact them to 0..n-1
    vision_cls: bool = False  # capture the vision tower's feature layer (q/k, output): StageInput.vision
    counts: Counts | None = None  # the accounting's planned counts and figures (None: adaptive counts)
    note: str = ""  # how the counts were derived, shown in the trace
    # Decoder layers whose attention the method itself decides in prefill (`PruneMethod.attend`, through the
    # attention seam, sparsevlm/attention.py): only the tokens it chooses attend there, and the rest leave that
    # layer's KV cache.
    attention_layers: tuple[int, ...] = ()

    @classmethod
    def of(cls, counts: Counts, positions: str, note: str | None = None) -> Plan:
        """One stage after each of the counts' layers, keeping its directly kept count there; the counts' note
        unless another is given."""
        stages = tuple(StageSpec(layer, keep) for layer, keep in zip(counts.layers, counts.direct))
        return cls(stages, positions, counts=counts, note=counts.note if note is None else note)


@dataclass
class Raters:
    """Text raters chosen once before the decoder (SparseVLM's section 1), for the trace."""

    relevance: torch.Tensor  # (Lt,) R over the text tokens
    indices: torch.Tensor  # text-relative indices of the raters
    ms: float | None = None  # measured time of the one computation when the request shares it (PrefillInput.once)


@dataclass
class PrefillInput:
    """Handed to `PruneMethod.prepare` once per call, before the decoder runs."""

    projector: torch.Tensor  # (Lv, D) projector output (the visual block of the LLM input)
    text_embeds: torch.Tensor  # (Lt, D) LLM input embeddings of the tokens after the image
    memo: dict  # per-call scratch space of the method (reset every call)
    # (key, compute) -> (value, ms): work that depends only on the request's inputs (image, question, model), done
    # once for every run of the request that asks for the same key (e.g. raters by rule) and timed once.
    once: Callable[[tuple, Callable[[], Any]], tuple[Any, float]] | None = None

    def shared(self, key: tuple, compute: Callable[[], Any]) -> tuple[Any, float | None]:
        """(value, ms of its one computation), or (compute(), None) where nothing is shared."""
        if self.once is None:
            return compute(), None
        return self.once(key, compute)


def text_raters(inp: PrefillInput, rule: str) -> Raters:
    """SparseVLM's text raters (algorithm.text_relevance / select_raters): the same for every method and run of a
    request with the same rule, so computed once per request."""
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        relevance = A.text_relevance(inp.projector, inp.text_embeds)
        return relevance, A.select_raters(relevance, rule)

    (relevance, indices), ms = inp.shared(("raters", rule), compute)
    return Raters(relevance, indices, ms)


@dataclass
class VisionInput:
    """The vision tower's selected feature layer (captured when Plan.vision_cls)."""

    q: torch.Tensor  # (1 + Lv, Dv) q_proj output of the layer ([CLS] first), before scaling
    k: torch.Tensor  # (1 + Lv, Dv) k_proj output
    hidden: torch.Tensor | None  # (1 + Lv, Dv) output hidden states of the layer
    heads: int
    head_dim: int
    scale: float
    # (crop=0) -> (Lv,) head-mean post-softmax [CLS] row over the patches of one tower input (LLaVA-NeXT: 0 is
    # the base view, 1 + t tile t; LLaVA-1.5 has only 0)
    cls_attention: Callable[..., torch.Tensor]
    project: Callable[[torch.Tensor], torch.Tensor]  # the multimodal projector: (m, Dv) -> (m, D)
    # (crop) -> q, k and output hidden states of that tower input, as q / k / hidden above (None: not captured)
    crop: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None


@dataclass
class StageInput:
    """What the plumbing captured for one stage."""

    index: int  # stage number in the plan
    spec: StageSpec
    prefix: int  # tokens before the image
    visual: int  # current visual tokens V_cur
    text: int  # tokens after the image
    hidden: torch.Tensor  # (n, D) the current sequence: LLM input (stage -1) or layer `after_layer`'s output
    positions: torch.Tensor  # (n,) current position ids
    patches: list[int]  # original patch index of each current visual token (merged: its center)
    projector: torch.Tensor  # (Lv, D) projector output of all patches
    memo: dict
    seed: int
    # Head-mean post-softmax causal attention rows at layer `after_layer`: (r,) sequence indices -> (r, n).
    attention_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The same rows per head (SparseVLM v2's head selection): (r,) -> (H, r, n).
    head_attention_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Same, at layer after_layer + 1 recomputed from `hidden` (its input): PyramidDrop-style ranking.
    next_attention_rows: Callable[[torch.Tensor], torch.Tensor] | None = None
    keys: Callable[[], torch.Tensor] | None = None  # () -> (Hkv, n, hd) post-RoPE keys of layer after_layer
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None  # the decoder's final norm (DART)
    # The decoder's rotary embedding: (m,) position ids -> (cos, sin), each (m, head_dim) (v2's gravity prior).
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    vision: VisionInput | None = None
    # The request's visual layout (layout.VisualLayout): its views, each cell's token and crop patch, the newline
    # tokens. LLaVA-1.5's is one view; `patches` above index its tokens.
    layout: Any = None

    @property
    def text_start(self) -> int:
        return self.prefix + self.visual


@dataclass
class AttentionInput:
    """What the attention seam hands `PruneMethod.attend` at one decoder layer in prefill (batch 1)."""

    layer: int
    n: int  # sequence length
    prefix: int  # tokens before the image
    visual: int  # visual tokens in the sequence
    text: int  # tokens after the image
    heads: int
    kv_heads: int
    memo: dict  # the method's per-call scratch space (shared with its stages)
    seed: int
    # (rows, per_head) -> column sums of the post-softmax causal attention of query rows `rows` (sequence
    # positions; None = every row), fp32 softmax, summed over the rows and the heads: (1, n) float64; per_head:
    # summed over the query heads of each KV head, (kv_heads, n). Computed from the layer's own RoPE'd q and k.
    column_sums: Callable[[torch.Tensor | None, bool], torch.Tensor]


@dataclass
class AttentionChoice:
    """A method's decision at one layer: which positions attend (among themselves, causally) and stay cached."""

    attended: torch.Tensor  # (G, m) ascending sequence positions: G = 1 (every head) or one row per KV head
    p: int  # the count the rule chose (attended may hold the last position on top)
    formula: str = ""
    extras: dict = field(default_factory=dict)  # method-specific trace data (plain values)


@dataclass
class MergedGroup:
    """A token the method adds after the kept ones: the merge of `members` (local indices)."""

    center: int  # local index whose position id (and patch, for the overlay) the merged token takes; -1: none
    members: list[int]
    embedding: torch.Tensor  # (D,) in the space of StageInput.hidden


@dataclass
class Selection:
    """A method's decision at one stage: what its `select` returns and the plumbing carries out. A method's pure
    selection rule returns one without a formula; its `select` fills in the formula and the trace data."""

    kept: torch.Tensor  # local indices kept directly, ascending (sequence order is preserved)
    scores: torch.Tensor  # (V_cur,) the score of each current visual token (higher = kept first)
    formula: str = ""  # the rule that ran, with its numbers filled in
    merged: list[MergedGroup] = field(default_factory=list)
    rank: int | None = None  # rank(P) where the method has a P
    rows: int = 0  # attention rows used (raters, the last token, ...)
    # Tokens placed BEFORE the kept ones, centre -1 and no members (VisionZip's vision [CLS] token).
    lead: list[MergedGroup] = field(default_factory=list)
    # (target, members) in local indices, as the rule formed them: VisionZip's contextual targets and the tokens
    # merged onto each, DART's image pivots and the tokens each claimed. The plumbing reads `merged`, not these.
    groups: list[tuple[int, list[int]]] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # method-specific trace data (plain values or tensors)

    def as_record(self) -> dict[str, Any]:
        """The kept indices, scores, groups and extras as plain lists and numbers, for a JSON trace."""
        return {"kept": plain(self.kept), "scores": plain(self.scores), "groups": plain(self.groups),
                "extras": plain(self.extras)}


def plain(x: Any) -> Any:
    """Tensors, tuples and dict keys made JSON-plain (lists, numbers, string keys), recursively."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    return x


class PruneMethod:
    """Base class of a registered method. Instances are stateless: per-call state goes in `memo`.

    What the app, the CLI and the docs need to know about a method is declared here, on the class, and read from
    the registry (methods/__init__.py): nothing else lists the methods.
    """

    name: ClassVar[str]  # the registry key (CLI --method, PruneConfig.method, traces)
    label: ClassVar[str]  # for UIs
    ranks_by: ClassVar[str] = ""  # what ranks the visual tokens, in a few words (UIs, the method table)
    default_positions: ClassVar[str] = "keep"
    # What `paper` accounting means for this method (docs and UI).
    paper_counting: ClassVar[str] = ""
    needs_cls: ClassVar[bool] = False  # ranks by the vision tower's [CLS] token (a tower without one cannot run it)
    # What the plumbing captures for `select`: "attention" = the q/k projections of each pruning layer
    # (StageInput.attention_rows, head_attention_rows, keys); "vision" = the vision tower's feature layer
    # (StageInput.vision). Stages before the LLM capture no layer attention.
    captures: ClassVar[frozenset[str]] = frozenset()
    # The method's own settings (sparsevlm/options.py): defaults, ranges and help, read by the CLI and the page.
    options: ClassVar[tuple[Option, ...]] = ()

    # Decides attention itself at `Plan.attention_layers` (`attend`): tokens stay in the residual stream.
    changes_attention: ClassVar[bool] = False
    # False for a method whose own rule sets the counts (ZipVL's tau): the benchmark runs it at
    # `benchmark_options` instead of at every budget.
    budgeted: ClassVar[bool] = True
    benchmark_options: ClassVar[tuple[dict, ...]] = ()

    def plan(self, cfg: PruneConfig, geo: ModelGeometry) -> Plan:
        raise NotImplementedError

    def budget_fit(self, cfg: PruneConfig) -> str | None:
        """The option the pipeline fits per input so that the run meets the budget (bisection over prefill
        passes, pipeline.fit_option), or None: the method meets budgets through its plan, or has none."""
        return None

    def reads_attention_at(self, geo: ModelGeometry) -> tuple[int, ...]:
        """Decoder layers whose text-to-image attention this method ranks by, in its own default setting (the
        layers a trace's attention profile shows). Default: none."""
        return ()

    def attend(self, cfg: PruneConfig, inp: AttentionInput) -> AttentionChoice:
        """The positions that take part in attention at one layer (methods with `changes_attention`)."""
        raise NotImplementedError

    def prepare(self, cfg: PruneConfig, inp: PrefillInput) -> Raters | None:
        """Once per call before the decoder (e.g. SparseVLM's raters). Default: nothing."""
        return None

    def select(self, cfg: PruneConfig, inp: StageInput) -> Selection:
        raise NotImplementedError

    def positions(self, cfg: PruneConfig) -> str:
        return cfg.positions or self.default_positions


def top_k_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores (k clamped to 0..n), in ascending position order: every method keeps
    raster order. The one top-k of the engine."""
    k = max(0, min(int(k), scores.shape[0]))
    return torch.topk(scores, k).indices.sort().values


# --- LLaVA-NeXT's views (layout.VisualLayout) -----------------------------------------------------------------
NEWLINE_SCORE = -1.0  # the score a per-view method gives a newline token (it never keeps one): below any attention


def view_budgets(sizes: list[int], k: int) -> list[int]:
    """k tokens split evenly over views of `sizes` tokens (the first views take the remainder; a view smaller
    than its share keeps all it has and the rest goes to the others)."""
    k = max(0, min(int(k), sum(sizes)))
    out = [0] * len(sizes)
    open_ = [i for i, n in enumerate(sizes) if n > 0]
    left = k
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for rank, i in enumerate(open_):
            out[i] += min(share + (1 if rank < extra else 0), sizes[i] - out[i])
        left = k - sum(out)
        open_ = [i for i in open_ if out[i] < sizes[i]]
    return out


def per_view_cls_scores(inp: StageInput) -> torch.Tensor:
    """(V,) each token's [CLS] attention in its own view's tower input (LLaVA-NeXT: the base view's [CLS] for base
    tokens, a tile's [CLS] for that tile's tokens); newline tokens get NEWLINE_SCORE."""
    vis, layout = inp.vision, inp.layout
    dev = inp.hidden.device
    scores = torch.full((inp.visual,), NEWLINE_SCORE, dtype=torch.float32, device=dev)
    for v in layout.views:
        row = vis.cls_attention(v.crop).float().to(dev)
        scores[torch.tensor(v.tokens, device=dev)] = row[torch.tensor(v.patches, device=dev)]
    return scores


def per_view_top_k(scores: torch.Tensor, layout, k: int) -> tuple[torch.Tensor, list[int]]:
    """The top of `scores` within each view, `view_budgets` of k per view (newlines never kept): ascending token
    indices, and the count each view kept."""
    counts = view_budgets([len(v.tokens) for v in layout.views], k)
    kept = []
    for v, n in zip(layout.views, counts, strict=True):
        idx = torch.tensor(v.tokens, dtype=torch.long, device=scores.device)
        kept.append(idx[top_k_keep(scores[idx], n)])
    return torch.cat(kept).sort().values, counts
