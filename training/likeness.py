"""How LLaVA-like a model is where the pruning methods look: raters, attention to evidence, word-aligned patches.

    PYTHONHASHSEED=0 python -m training.likeness --model assets/models/scenes-llava --n 1050 \
        --json out.json --md out.md [--records] [--world v2|independent]
    python -m training.likeness --compare old.json new.json --md side-by-side.md

`--world` picks whose held-out questions (`worlds.py`); the default is the model's own world (training_state.json
"world"; the embedded model's world, `worlds.DEFAULT_WORLD`, for a folder that records none).

SparseVLM assumes what the paper's Figure 3 shows on LLaVA-1.5: the text tokens whose embeddings the projected
patches resemble (the raters; docs/engine.md) are content words (`Tylenol`, `sticker`, `fridge`), and their
attention rows point at the objects those words name. This measures both on a scenes world's held-out
questions, where the evidence patches are known, plus the reason it should hold (visual tokens land in the
word-embedding space):

1. **Raters.** R = mean over visual rows of softmax(Hv Hq^T) (projector output vs text embeddings, text = every
   token after the image, template suffix included); raters R > mean(R) (`algorithm.text_relevance` /
   `select_raters`, the reference code's rule). Share of raters per word class, against each class's share of
   the text (what raters drawn at random would give), and the most frequent rater words.
2. **Evidence recall.** At each SparseVLM pruning layer (2, 6, 15 of 32, scaled to depth), the attention row of
   each text token (head mean, post-softmax, causal, over all keys, then the visual columns): the fraction of the
   question's evidence patches among its top-k (k = 64) visual tokens. Per token type; "raters" is the mean of
   the rater rows (the score SparseVLM ranks by). A uniformly random k-subset recalls k / Lv on average.
   Measured on the dense forward (nothing pruned), so layers 6 and 15 see all 576 tokens here.
3. **Nearest words of object patches.** For colour and shape questions, each evidence patch's projector output is
   compared (cosine) with every input word embedding (special tokens excluded): how often the nearest word is
   the object's colour word or its shape word.
4. **The vision tower** (`clip_tower.tower_figures`): the [CLS] row's attention on object patches relative to
   their area share and its top-64 evidence recall at the feature layer, held-out image-to-caption retrieval
   when the export records the contrastive head its tower was pretrained with, and, reported only, the last
   prompt token's attention over the visual tokens at decoder layers 1 and 2 (shift and concentration).
   `--add-tower FILE` measures these alone into an earlier summary.
5. **Attention shift and dispersion** (`attention_profile.py`, FasterVLM's sections 3.2-3.3): at every decoder
   layer where a fixed-layer method reads attention (FastV's K-1, SparseVLM's pruning layers, PyramidDrop's
   ranking layers, from the engine's functions), for the last token and for the prompt, and for the tower's
   [CLS]: the share of the attention over the visual tokens on the picture's lower half (`lower_half_share`) and
   the share held by the top 20% of visual tokens (`top20_share`), beside FasterVLM's LLaVA-1.5-7B figures, on
   `--profile-n` held-out pictures and as many plain pictures with objects spread evenly.
   `--add-profile FILE` measures it alone into an earlier summary.

Attention rows are recomputed from the layer's own q/k: a pre-hook on `self_attn` takes its input hidden states
and RoPE cos/sin, `q_proj`/`k_proj` and the decoder's own `apply_rotary_pos_emb` give q and k, and
`algorithm.rows_attention` makes the rows (GQA repeat, causal softmax). The model keeps SDPA; the L x L matrix is
never built. tests/test_likeness.py checks the rows against eager attention's `output_attentions`.

"±" in the outputs is a 95% interval half-width (1.96 standard errors) with questions as the sampling unit
(shares pooled over tokens use the ratio estimator's delta-method error, clustered by question).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparsevlm import algorithm as A
from sparsevlm.config import REFERENCE_PRUNE_LAYERS_32
from sparsevlm.errors import SparseVLMError
from sparsevlm.scenes.world import GRID, PATCH
from sparsevlm.scenes.worlds import (
    DEFAULT_SEEDS,
    DEFAULT_WORLD,
    WORLD_LABELS,
    WORLDS,
    EvidenceObject,
    WorldError,
    check_world,
    heldout_item,
    world_of_model,
)
from sparsevlm.schedule import scaled_layers
from sparsevlm.tokenizer import prompt_for

from . import attention_profile
from .clip_tower import tower_figures

TOP_K = 64
CORE_FRACTION = 0.5  # an evidence patch is "core" when the object covers at least half of it

# --- word classes -----------------------------------------------------------------------------------------------
# Content words name something one can see: an attribute value, the attribute itself, an object, a count or a
# place in the picture. Function words carry the question's grammar. The template words are the conversation
# format's (LLaVA-1.5: "USER: <image>\n... ASSISTANT:") plus the question mark: neither content nor grammar.
COLOUR_WORDS = frozenset(
    "red green blue yellow purple orange white black grey gray pink brown cyan magenta violet".split()
)
SHAPE_WORDS = frozenset(
    "circle circles square squares triangle triangles diamond diamonds cross crosses rectangle rectangles "
    "star stars oval ovals ring rings dot dots".split()
)
SIZE_WORDS = frozenset("small medium big large tiny little huge".split())
ATTRIBUTE_NOUNS = frozenset(
    "colour color colours colors shape shapes size sizes object objects thing things item items label card "
    "letter number digit character text picture image".split()
)
COUNT_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve 0 1 2 3 4 5 6 7 8 9".split()
)
# The label card's characters (digits are above) and the yes / no answers: what the picture says.
ANSWER_WORDS = frozenset("e h k x yes no".split())
POSITION_WORDS = frozenset(
    "row rows column columns left right top bottom middle centre center above below under over corner side "
    "upper lower".split()
)
CONTENT_WORDS = (COLOUR_WORDS | SHAPE_WORDS | SIZE_WORDS | ATTRIBUTE_NOUNS | COUNT_WORDS | POSITION_WORDS
                 | ANSWER_WORDS)
# Grammar and the instruction's own verbs ("describe", "count", "tell me"): they name nothing in the picture.
FUNCTION_WORDS = frozenset(
    "what which how many much is are was were be does do did there here a an the of in on at to and or with it "
    "its this that these those any some for from by as can you see have has written say says where kind type "
    "describe count tell me please s".split()
)
# `?` stays a template token (the conversation format ends every question with it), as in the first report.
PUNCTUATION = frozenset([".", ",", "'", "!", "\u2019", ";"])
TEMPLATE_WORDS = frozenset(["user", ":", "assistant", "?"])
WORD_CLASSES = ("content", "function", "punctuation", "template", "other")
TOKEN_TYPES = ("content", "function", "punctuation", "?", "template", "last", "raters", "all text")


def normalize_token(token: str) -> str:
    """The word a tokenizer piece stands for: SentencePiece/BPE space marks dropped, lower case."""
    return token.replace("\u2581", "").replace("\u0120", "").strip().lower()


def classify_word(token: str) -> str:
    """'content', 'function', 'punctuation', 'template' (user, :, assistant, ?) or 'other' (not in any list, e.g.
    <unk>)."""
    w = normalize_token(token)
    if w in TEMPLATE_WORDS:
        return "template"
    if w in PUNCTUATION:
        return "punctuation"
    if w in CONTENT_WORDS:
        return "content"
    if w in FUNCTION_WORDS:
        return "function"
    return "other"


def token_type(token: str, is_last: bool) -> str:
    """The recall table's row for a text token: its word class, with `?` and the last token on their own."""
    if is_last:
        return "last"
    if normalize_token(token) == "?":
        return "?"
    cls = classify_word(token)
    return "function" if cls == "other" else cls  # unlisted words are grammar more often than not


# --- the metric ---------------------------------------------------------------------------------------------------
def topk_recall(scores: torch.Tensor, evidence: list[int] | torch.Tensor, k: int = TOP_K) -> float:
    """Fraction of the evidence patches among the k highest-scoring visual tokens (ties: lowest index first)."""
    ev = torch.as_tensor(evidence, dtype=torch.long)
    if ev.numel() == 0:
        raise ValueError("evidence recall needs at least one evidence patch")
    k = min(k, scores.numel())
    # A stable sort makes ties deterministic (uniform rows: the first k patches).
    top = torch.argsort(scores.float(), descending=True, stable=True)[:k]
    return float(torch.isin(ev, top).float().mean())


def random_recall(k: int, visual: int) -> float:
    """Expected recall of a uniformly random k-subset of `visual` tokens, whatever the evidence: k / Lv."""
    return min(k, visual) / visual


# --- attention rows from q/k ---------------------------------------------------------------------------------------
class AttentionRowTap:
    """Captures the input of `self_attn` at some decoder layers, to recompute chosen attention rows afterwards.

    Only the layers' inputs are kept (n x D each); rows are computed on demand from q_proj/k_proj, so the model
    runs with its own attention implementation and no L x L matrix exists.
    """

    def __init__(self, model, layers: tuple[int, ...]):
        self.decoder_layers = model.model.language_model.layers
        self.layers = layers
        self.inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles: list = []

    def __enter__(self) -> AttentionRowTap:
        for i in self.layers:
            attn = self.decoder_layers[i].self_attn
            self._handles.append(attn.register_forward_pre_hook(self._make_hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i] = (hidden.detach(), kwargs["position_embeddings"])

        return hook

    def rows(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """(r, n) head-mean post-softmax causal attention of sequence positions `rows` at `layer` (batch item 0)."""
        attn = self.decoder_layers[layer].self_attn
        hidden, (cos, sin) = self.inputs[layer]
        hd = attn.head_dim
        x = hidden[:1]
        n = x.shape[1]
        q = attn.q_proj(x[:, rows]).view(1, len(rows), -1, hd).transpose(1, 2)  # (1, H, r, hd)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)  # (1, Hkv, n, hd)
        # The decoder's own RoPE (Llama and Qwen2 share the rotate-half form): rows get their own positions.
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, _ = rope(q, q, cos[:1, rows], sin[:1, rows])
        k, _ = rope(k, k, cos[:1], sin[:1])
        return A.rows_attention(q[0], k[0], rows, attn.scaling)


# --- one question -------------------------------------------------------------------------------------------------
@dataclass
class QuestionRecord:
    """Everything measured on one held-out question (plain data)."""

    index: int
    family: str
    question: str
    answer: str
    predicted: str
    tokens: list[str]  # text tokens (after the image)
    classes: list[str]
    relevance: list[float]
    raters: list[int]  # indices into tokens
    evidence: int  # number of evidence patches
    recall: dict[int, dict[str, float]] = field(default_factory=dict)  # layer -> token type -> mean recall
    patch_words: list[dict] = field(default_factory=list)  # object patches: nearest word and the object's words


def _word_ids(tokenizer, word: str) -> list[int]:
    """Token ids that spell `word` as one token (with or without a leading space), for any tokenizer."""
    ids = set()
    for text in (word, " " + word):
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and enc[0] != tokenizer.unk_token_id:
            ids.add(int(enc[0]))
    return sorted(ids)


class Measurer:
    """Runs the model on questions and records raters, attention recall and nearest words. Batch size 1."""

    def __init__(self, model, processor, k: int = TOP_K):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.k = k
        depth = model.config.text_config.num_hidden_layers
        self.layers = scaled_layers(REFERENCE_PRUNE_LAYERS_32, depth)
        vcfg = model.config.vision_config
        self.grid_side = vcfg.image_size // vcfg.patch_size
        self.visual = self.grid_side**2
        if self.grid_side != GRID:
            raise SparseVLMError(
                f"the model sees a {self.grid_side}x{self.grid_side} grid but the scenes' evidence patches are on a "
                f"{GRID}x{GRID} grid: the measurement needs a {GRID * PATCH} px / {PATCH} px-patch vision tower"
            )
        emb = model.get_input_embeddings().weight.detach().float()
        specials = set(self.tokenizer.all_special_ids) | {model.config.image_token_id}
        self.word_ids = torch.tensor([i for i in range(emb.shape[0]) if i not in specials])
        self.word_emb = torch.nn.functional.normalize(emb[self.word_ids], dim=-1)
        self._ids_cache: dict[str, list[int]] = {}

    def ids_of(self, word: str) -> list[int]:
        if word not in self._ids_cache:
            self._ids_cache[word] = _word_ids(self.tokenizer, word)
        return self._ids_cache[word]

    @torch.no_grad()
    def measure(self, index: int, seed: int | None = None, world: str = DEFAULT_WORLD) -> QuestionRecord:
        """Question `index` of `world`'s held-out set (seed: the world's own)."""
        item = heldout_item(index, seed, world)
        sample = item.sample
        enc = self.processor(images=item.image, text=prompt_for(sample.question), return_tensors="pt")
        ids = enc["input_ids"][0]
        where = (ids == self.model.config.image_token_id).nonzero().flatten()
        prefix, n = int(where[0]), len(ids)
        text_start = prefix + len(where)
        projected: list[torch.Tensor] = []
        proj = self.model.model.multi_modal_projector
        handle = proj.register_forward_hook(lambda m, a, out: projected.append(out.detach()))
        try:
            with AttentionRowTap(self.model, self.layers) as tap:
                out = self.model(**enc, use_cache=False)
                text_rows = torch.arange(text_start, n)
                rows = {layer: tap.rows(layer, text_rows)[:, prefix:text_start] for layer in self.layers}
        finally:
            handle.remove()
        hv = projected[0].reshape(-1, projected[0].shape[-1])  # (Lv, D)
        hq = self.model.get_input_embeddings()(ids[text_start:])
        relevance = A.text_relevance(hv, hq)
        raters = A.select_raters(relevance)  # the reference code's rule, R > mean(R)
        tokens = self.tokenizer.convert_ids_to_tokens(ids[text_start:].tolist())
        predicted = self.tokenizer.decode([int(out.logits[0, -1].argmax())], skip_special_tokens=True).strip()
        rec = QuestionRecord(
            index=index,
            family=sample.family,
            question=sample.question,
            answer=sample.answer,
            predicted=predicted,
            tokens=tokens,
            classes=[classify_word(t) for t in tokens],
            relevance=[round(float(r), 6) for r in relevance],
            raters=raters.tolist(),
            evidence=len(sample.evidence),
        )
        if sample.evidence:
            types = [token_type(t, i == len(tokens) - 1) for i, t in enumerate(tokens)]
            for layer, p in rows.items():
                per_type: dict[str, list[float]] = {}
                for i, t in enumerate(types):
                    per_type.setdefault(t, []).append(topk_recall(p[i], sample.evidence, self.k))
                per_type["raters"] = [topk_recall(A.visual_significance(p[raters]), sample.evidence, self.k)]
                per_type["all text"] = [topk_recall(p.mean(dim=0), sample.evidence, self.k)]
                rec.recall[layer] = {t: float(np.mean(v)) for t, v in per_type.items()}
        # Colour and shape questions ask about one object: the one whose covered patches are the evidence.
        if sample.family in ("colour", "shape") and (obj := item.target()) is not None:
            rec.patch_words = self._patch_words(hv, obj, sample.evidence)
        return rec

    def _patch_words(self, hv: torch.Tensor, o: EvidenceObject, evidence: list[int]) -> list[dict]:
        cover = o.cover()
        sims = torch.nn.functional.normalize(hv[evidence].float(), dim=-1) @ self.word_emb.T  # (E, V')
        order = torch.argsort(sims, dim=-1, descending=True)
        nearest = self.word_ids[order[:, 0]]
        rank_of = {}
        for word in (o.colour, o.shape):
            targets = torch.tensor(self.ids_of(word))
            # rank (1 = nearest) of the best-ranked spelling of the word among all words
            hit = torch.isin(self.word_ids[order], targets) if len(targets) else torch.zeros_like(order, dtype=bool)
            rank_of[word] = [int(h.nonzero()[0]) + 1 if h.any() else None for h in hit]
        out = []
        for e, j in enumerate(evidence):
            out.append(
                {
                    "patch": int(j),
                    "core": bool(cover[j] >= CORE_FRACTION),
                    "nearest": normalize_token(self.tokenizer.convert_ids_to_tokens(int(nearest[e]))),
                    "colour": o.colour,
                    "shape": o.shape,
                    "colour_rank": rank_of[o.colour][e],
                    "shape_rank": rank_of[o.shape][e],
                }
            )
        return out


# --- aggregation ----------------------------------------------------------------------------------------------------
def ratio_with_error(num: np.ndarray, den: np.ndarray) -> tuple[float, float]:
    """Pooled share sum(num) / sum(den) and its 95% half-width, questions as clusters (delta method)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    n = len(num)
    if n == 0 or den.sum() == 0:
        return float("nan"), float("nan")
    r = num.sum() / den.sum()
    if n < 2:
        return float(r), float("nan")
    resid = num - r * den
    se = math.sqrt((resid**2).sum() / (n * (n - 1))) / den.mean()
    return float(r), float(1.96 * se)


def mean_with_error(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (1.96 standard errors)."""
    v = np.asarray(values, float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))


def summarize(records: list[QuestionRecord], layers: tuple[int, ...], depth: int, k: int, visual: int) -> dict:
    """The figures of the report, from per-question records (plain data in, plain data out)."""
    out: dict = {"questions": len(records), "layers": list(layers), "depth": depth, "top_k": k}
    out["dense_first_token_accuracy"] = mean_with_error([float(r.predicted == r.answer) for r in records])

    # 1. raters
    raters_cls = {c: np.array([sum(r.classes[i] == c for i in r.raters) for r in records]) for c in WORD_CLASSES}
    text_cls = {c: np.array([sum(x == c for x in r.classes) for r in records]) for c in WORD_CLASSES}
    n_raters = np.array([len(r.raters) for r in records])
    n_text = np.array([len(r.tokens) for r in records])
    classes = {}
    for c in WORD_CLASSES:
        classes[c] = {
            "share_of_raters": ratio_with_error(raters_cls[c], n_raters),
            "share_of_text": ratio_with_error(text_cls[c], n_text),
            "rater_rate": ratio_with_error(raters_cls[c], text_cls[c]),  # P(rater | word of this class)
        }
    word_seen: Counter = Counter()
    word_rater: Counter = Counter()
    for r in records:
        for i, t in enumerate(r.tokens):
            w = normalize_token(t)
            word_seen[w] += 1
            word_rater[w] += int(i in r.raters)
    total_raters = int(n_raters.sum())
    top = sorted(word_rater, key=lambda w: (-word_rater[w], w))
    question_raters = n_raters - raters_cls["template"]
    out["raters"] = {
        # Figure 3 of the paper shades only the question's words: the same share without the template's tokens.
        "content_share_of_question_word_raters": ratio_with_error(raters_cls["content"], question_raters),
        "content_share_of_question_words": ratio_with_error(text_cls["content"], n_text - text_cls["template"]),
        "per_question_mean": float(n_raters.mean()) if len(records) else float("nan"),
        "text_tokens_per_question_mean": float(n_text.mean()) if len(records) else float("nan"),
        "classes": classes,
        "content_share_by_family": {
            f: ratio_with_error(
                np.array([sum(r.classes[i] == "content" for i in r.raters) for r in records if r.family == f]),
                np.array([len(r.raters) for r in records if r.family == f]),
            )
            for f in dict.fromkeys(r.family for r in records)
        },
        "top_words": [
            {
                "word": w,
                "class": classify_word(w),
                "times_rater": word_rater[w],
                "share_of_raters": word_rater[w] / max(1, total_raters),
                "times_in_text": word_seen[w],
                "rater_rate": word_rater[w] / word_seen[w],
            }
            for w in top
            if word_rater[w] > 0
        ],
        "never_rater": sorted(w for w in word_seen if word_rater[w] == 0),
    }

    # 2. evidence recall
    with_evidence = [r for r in records if r.recall]
    recall: dict = {}
    for layer in layers:
        recall[str(layer)] = {
            t: {
                "recall": mean_with_error([r.recall[layer][t] for r in with_evidence if t in r.recall[layer]]),
                "questions": sum(t in r.recall[layer] for r in with_evidence),
            }
            for t in TOKEN_TYPES
        }
    out["evidence_recall"] = {
        "questions_with_evidence": len(with_evidence),
        "random": random_recall(k, visual),
        "ceiling": mean_with_error([min(1.0, k / r.evidence) for r in with_evidence]),
        "by_layer": recall,
    }

    # 3. nearest words of object patches
    patches = [(r.index, p) for r in records for p in r.patch_words]
    nearest: dict = {}
    for name, sel in (("all evidence patches", lambda p: True), ("core patches", lambda p: p["core"])):
        ps = [(i, p) for i, p in patches if sel(p)]
        qs = sorted({i for i, _ in ps})
        by_q = {q: [p for i, p in ps if i == q] for q in qs}

        def share(pred, by_q=by_q, qs=qs) -> tuple[float, float]:
            return ratio_with_error(
                np.array([sum(pred(p) for p in by_q[q]) for q in qs]), np.array([len(by_q[q]) for q in qs])
            )

        colour_ranks = [p["colour_rank"] for _, p in ps if p["colour_rank"] is not None]
        shape_ranks = [p["shape_rank"] for _, p in ps if p["shape_rank"] is not None]
        nearest[name] = {
            "patches": len(ps),
            "questions": len(qs),
            "nearest_is_colour_word": share(lambda p: p["nearest"] == p["colour"]),
            "nearest_is_shape_word": share(lambda p: p["nearest"] == p["shape"]),
            "nearest_is_either": share(lambda p: p["nearest"] in (p["colour"], p["shape"])),
            "nearest_is_any_colour_word": share(lambda p: p["nearest"] in COLOUR_WORDS),
            "nearest_is_any_shape_word": share(lambda p: p["nearest"] in SHAPE_WORDS),
            "median_rank_colour_word": float(np.median(colour_ranks)) if colour_ranks else float("nan"),
            "median_rank_shape_word": float(np.median(shape_ranks)) if shape_ranks else float("nan"),
            "top_nearest": Counter(p["nearest"] for _, p in ps).most_common(10),
        }
    out["nearest_word"] = nearest
    out["nearest_word"]["vocabulary_words"] = None  # filled by the caller, who knows the model
    return out


# --- output ---------------------------------------------------------------------------------------------------------
def _pm(x: tuple[float, float], pct: bool = True) -> str:
    v, e = x
    if math.isnan(v):
        return "n/a"
    if pct:
        return f"{100 * v:.1f}%" + ("" if math.isnan(e) else f" ± {100 * e:.1f}")
    return f"{v:.3f}" + ("" if math.isnan(e) else f" ± {e:.3f}")


def markdown(summary: dict, model: str, command: str) -> str:
    s = summary
    r = s["raters"]
    ev = s["evidence_recall"]
    lines = [
        f"# LLaVA-likeness of `{model}`",
        "",
        f"Measured by `{command}` ({s['questions']} held-out questions of world {s.get('world', '?')} "
        f"({WORLD_LABELS.get(s.get('world'), 'not recorded')}), seed {s['seed']}, families round-robin; "
        f"{s['seconds']:.0f} s wall, {s['threads']} torch thread(s), PYTHONHASHSEED {s['python_hash_seed']}: the "
        "generator's exist-no questions depend on it). "
        "± is a 95% interval half-width with questions as the sampling unit. Dense first-token accuracy on these "
        f"questions: {_pm(s['dense_first_token_accuracy'])}.",
        "",
        "## 1. Text raters (R = mean_rows softmax(Hv Hq^T), raters R > mean(R))",
        "",
        f"Text = every token after the image (question + `ASSISTANT:`): {r['text_tokens_per_question_mean']:.1f} "
        f"tokens per question, {r['per_question_mean']:.1f} raters. The share of text is what raters drawn at random "
        "would give; rater rate = how often a word of that class is a rater.",
        "",
        "| word class | share of raters | share of text | rater rate |",
        "|---|---|---|---|",
    ]
    for c, v in r["classes"].items():
        lines.append(f"| {c} | {_pm(v['share_of_raters'])} | {_pm(v['share_of_text'])} | {_pm(v['rater_rate'])} |")
    lines += [
        "",
        "Without the template's tokens (`?`, `assistant`, `:`; the paper's Figure 3 shades only the question's "
        f"words): content words are {_pm(r['content_share_of_question_word_raters'])} of the raters, against "
        f"{_pm(r['content_share_of_question_words'])} of the question's words.",
    ]
    lines += ["", "Content share of raters by question family: " + ", ".join(
        f"{f} {_pm(v)}" for f, v in r["content_share_by_family"].items()) + ".", ""]
    lines += ["| rater word | class | share of raters | rater when present |", "|---|---|---|---|"]
    for w in r["top_words"][:15]:
        lines.append(
            f"| `{w['word']}` | {w['class']} | {100 * w['share_of_raters']:.1f}% | "
            f"{100 * w['rater_rate']:.0f}% ({w['times_rater']}/{w['times_in_text']}) |"
        )
    lines += ["", "Never a rater: " + (", ".join(f"`{w}`" for w in r["never_rater"]) or "none") + ".", ""]
    lines += [
        f"## 2. Top-{s['top_k']} evidence recall of attention rows at the pruning layers",
        "",
        f"Head-mean post-softmax causal attention row of each text token over the {s['visual']} visual tokens, dense "
        f"forward, at layers {', '.join(map(str, s['layers']))} of {s['depth']} (SparseVLM's 2, 6, 15 of 32 scaled). "
        f"{ev['questions_with_evidence']} questions with evidence patches; per question the mean over its tokens of "
        "the type; \"template\" = `user`/`assistant`/`:` tokens other than the last (after the image: `assistant`), "
        "\"last\" = the answer position (`:`). "
        f"\"raters\" = mean of the rater rows (the score SparseVLM ranks by); \"all text\" = mean of all "
        f"text rows. Random {s['top_k']}-subset: {ev['random']:.3f}; ceiling (evidence larger than k): "
        f"{_pm(ev['ceiling'], pct=False)}.",
        "",
        "| token type | " + " | ".join(f"layer {layer}" for layer in s["layers"]) + " |",
        "|---|" + "---|" * len(s["layers"]),
    ]
    for t in TOKEN_TYPES:
        cells = [_pm(ev["by_layer"][str(layer)][t]["recall"], pct=False) for layer in s["layers"]]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| random | " + " | ".join(f"{ev['random']:.3f}" for _ in s["layers"]) + " |")
    nw = s["nearest_word"]
    lines += [
        "",
        "## 3. Nearest word embedding of object patches (colour and shape questions)",
        "",
        f"Cosine between the projector output of each evidence patch and every input word embedding "
        f"({nw['vocabulary_words']} words; special tokens excluded). Core patches: the object covers >= "
        f"{int(CORE_FRACTION * 100)}% of the patch. Chance (patches pointing at words uniformly): "
        f"{100 / nw['vocabulary_words']:.1f}% for one given word, median rank {(nw['vocabulary_words'] + 1) / 2:g}.",
        "",
        "| patches | n (questions) | nearest = object's colour word | nearest = object's shape word | either | "
        "any colour word | any shape word | median rank of colour / shape word |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("all evidence patches", "core patches"):
        v = nw[name]
        lines.append(
            f"| {name} | {v['patches']} ({v['questions']}) | {_pm(v['nearest_is_colour_word'])} | "
            f"{_pm(v['nearest_is_shape_word'])} | {_pm(v['nearest_is_either'])} | "
            f"{_pm(v['nearest_is_any_colour_word'])} | {_pm(v['nearest_is_any_shape_word'])} | "
            f"{v['median_rank_colour_word']:g} / {v['median_rank_shape_word']:g} |"
        )
    top = nw["all evidence patches"]["top_nearest"]
    lines += ["", "Most frequent nearest words: " + ", ".join(f"`{w}` {c}" for w, c in top) + ".", ""]
    lines += [
        "## 4. The vision tower, and the decoder's view of it",
        "",
        "The [CLS] row of the tower's head-mean attention at the feature layer on held-out pictures "
        "(`training/clip_tower.py`): its mass on object and label patches relative to their share of the area "
        "(CLIP's [CLS] follows salient content: above 1), and its top-64 recall of each question's evidence; "
        "image-to-caption retrieval when the export records the contrastive head it was pretrained with; and, "
        "reported only, the last prompt token's attention over the visual tokens at decoder layers 1 and 2 "
        "(Spearman correlation with the token index, and the share held by the top 1% of tokens), the "
        "\"attention shift\" and \"dispersion\" FasterVLM describes on LLaVA-1.5 (eager attention).",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {m} | {v} |" for m, v in tower_rows(s)),
        "",
        *attention_profile.markdown(s.get("attention_profile")),
    ]
    lines += [
        "## Method",
        "",
        "Attention rows are recomputed from each pruning layer's q/k projections (input captured by a pre-hook on "
        "`self_attn`, RoPE by the decoder's own `apply_rotary_pos_emb`, `algorithm.rows_attention`), the model "
        "running SDPA; tests/test_likeness.py checks them against eager attention's `output_attentions`. Word "
        "classes are the explicit lists in `training/likeness.py` (template = `user`, `:`, `assistant`, `?`).",
        "",
    ]
    return "\n".join(lines)


def _read(x) -> tuple[float, float]:
    """A (value, error) pair as a JSON file gives it back (null for NaN)."""
    if x is None:
        return float("nan"), float("nan")
    v, e = x
    return (float("nan") if v is None else float(v)), (float("nan") if e is None else float(e))


def compare_markdown(a: dict, b: dict) -> str:
    """Two models' summaries side by side, `a` as "before" and `b` as "after" (for the model card: the model it
    replaced, then the installed one; both may have been measured in the same staging folder)."""
    name = lambda s: f"`{s.get('model', '?')}` on {s.get('world', 'a world not recorded')}"  # noqa: E731
    rows: list[tuple[str, str, str]] = [
        ("questions (seed)", f"{a['questions']} ({a['seed']})", f"{b['questions']} ({b['seed']})"),
        ("decoder layers", str(a["depth"]), str(b["depth"])),
        ("dense first-token accuracy", _pm(_read(a["dense_first_token_accuracy"])),
         _pm(_read(b["dense_first_token_accuracy"]))),
    ]
    for c in WORD_CLASSES:
        ca, cb = a["raters"]["classes"].get(c), b["raters"]["classes"].get(c)
        if ca is None and cb is None:
            continue
        rows.append((f"raters that are {c} words (share of text)",
                     *(f"{_pm(_read(x['share_of_raters']))} ({_pm(_read(x['share_of_text']))})" if x else "n/a"
                       for x in (ca, cb))))
    rows.append(("content share of question-word raters (of question words)",
                 *(f"{_pm(_read(s['raters']['content_share_of_question_word_raters']))} "
                   f"({_pm(_read(s['raters']['content_share_of_question_words']))})" for s in (a, b))))
    rows.append(("most frequent raters", *(", ".join(f"`{w['word']}`" for w in s["raters"]["top_words"][:6])
                                           for s in (a, b))))
    for step in range(max(len(a["layers"]), len(b["layers"]))):
        for t in ("raters", "last", "content", "function", "?", "all text"):
            cells = []
            for s in (a, b):
                if step >= len(s["layers"]):
                    cells.append("n/a")
                    continue
                layer = s["layers"][step]
                v = s["evidence_recall"]["by_layer"][str(layer)].get(t)
                cells.append(f"{_pm(_read(v['recall'] if v else None), pct=False)} (layer {layer})")
            rows.append((f"top-k evidence recall, pruning step {step + 1}: {t} rows", *cells))
    rows.append(("random k-subset recall", *(f"{s['evidence_recall']['random']:.3f}" for s in (a, b))))
    rows += [(m, x, y) for (m, x), (_, y) in zip(tower_rows(a), tower_rows(b), strict=True)]
    rows += profile_compare_rows(a, b)
    for part in ("all evidence patches", "core patches"):
        for key, label in (("nearest_is_colour_word", "colour"), ("nearest_is_shape_word", "shape")):
            rows.append((f"{part}: nearest word is the object's {label} word",
                         *(_pm(_read(s["nearest_word"][part][key])) for s in (a, b))))
    lines = [
        "# LLaVA-likeness, two models side by side",
        "",
        "Both columns computed by `python -m training.likeness` (each model's own command: "
        f"before `{a.get('command', '?')}`; after `{b.get('command', '?')}`); ± is a 95% interval half-width, "
        "questions as the sampling unit. Recall is of the top-k visual tokens of the attention rows on the dense "
        "forward.",
        "",
        f"| measure | before: {name(a)} | after: {name(b)} |",
        "|---|---|---|",
        *(f"| {m} | {x} | {y} |" for m, x, y in rows),
        "",
    ]
    return "\n".join(lines)


def _json_safe(x):
    """NaN (a share with nothing to count) becomes null, so the file is strict JSON."""
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def to_json(summary: dict, records: list[QuestionRecord] | None = None) -> str:
    """The summary indented, then (if given) one line per question, patch words as [patch, core, nearest,
    colour rank, shape rank]."""
    if records is None:
        return json.dumps({"summary": _json_safe(summary)}, indent=1, allow_nan=False) + "\n"
    rows = []
    for r in records:
        d = dict(r.__dict__)
        if r.patch_words:
            d["object"] = [r.patch_words[0]["colour"], r.patch_words[0]["shape"]]
        d["patch_words"] = [[p["patch"], p["core"], p["nearest"], p["colour_rank"], p["shape_rank"]]
                            for p in r.patch_words]
        rows.append(json.dumps(_json_safe(d), allow_nan=False, separators=(",", ":")))
    head = json.dumps(_json_safe(summary), indent=1, allow_nan=False)
    return '{"summary": ' + head + ',\n"records": [\n' + ",\n".join(rows) + "\n]}\n"


def run(model_path: str, n: int, seed: int | None = None, k: int = TOP_K, log_every: int = 0,
        world: str | None = None, tower_n: int = 120, profile_n: int | None = None) -> tuple[dict, list]:
    """Load the model, measure `n` held-out questions of `world` (default: the model's own, `world_of_model`), and
    summarize, with the tower figures on `tower_n` pictures and the attention profile on `profile_n` held-out and
    `profile_n` spread pictures (default: `tower_n`). Returns (summary, per-question records)."""
    from sparsevlm.loading import load_model

    world = world or world_of_model(model_path) or DEFAULT_WORLD
    try:
        check_world(world)
    except WorldError as e:  # the CLI turns SparseVLMError into its message
        raise SparseVLMError(str(e)) from None
    if world not in WORLDS:  # these measurements read one 24x24 grid of a 336 px picture
        raise SparseVLMError(f"the likeness measurements read the 336 px worlds ({', '.join(WORLDS)}), not {world}")
    seed = DEFAULT_SEEDS[world] if seed is None else seed
    loaded = load_model(model_path, device="cpu", dtype="float32")
    m = Measurer(loaded.model, loaded.processor, k)
    t0 = time.time()
    records = []
    for i in range(n):
        records.append(m.measure(i, seed, world))
        if log_every and (i + 1) % log_every == 0:
            print(f"  {i + 1}/{n}  {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    depth = loaded.model.config.text_config.num_hidden_layers
    summary = summarize(records, m.layers, depth, k, m.visual)
    summary["nearest_word"]["vocabulary_words"] = len(m.word_ids)
    # The generator builds some "is there ...? no" questions from Python sets of words, whose order follows the
    # string hash seed: the held-out set is reproducible only with PYTHONHASHSEED fixed.
    summary["python_hash_seed"] = os.environ.get("PYTHONHASHSEED", "random")
    summary.update(model=model_path, world=world, seed=seed, visual=m.visual, seconds=round(time.time() - t0, 1),
                   threads=torch.get_num_threads(), attention_rows="recomputed from q/k (SDPA model), not eager")
    if tower_n > 0:  # the tower's figures on their own pictures (`--tower-n`; the decoder's on half as many)
        summary["tower"] = tower_figures(loaded.model, loaded.processor, model_path, tower_n)
    profile_n = tower_n if profile_n is None else profile_n
    if profile_n > 0:
        summary["attention_profile"] = attention_profile.measure(loaded.model, loaded.processor, profile_n, profile_n,
                                                                 world, log=_log if log_every else None,
                                                                 n_blank=profile_n // 2)
    return summary, records


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_profile(model_path: str, summary_file: str, command: str = "", profile_n: int = 120) -> dict:
    """Measure `model_path`'s attention profile (`attention_profile.measure`, `profile_n` held-out and `profile_n`
    spread pictures, and half as many blank ones) into an existing `--json` file's summary; the file's other
    contents are kept."""
    from sparsevlm.loading import load_model

    doc = json.loads(Path(summary_file).read_text())
    loaded = load_model(model_path, device="cpu", dtype="float32")
    world = doc["summary"].get("world") or world_of_model(model_path) or DEFAULT_WORLD
    t0 = time.time()
    doc["summary"]["attention_profile"] = attention_profile.measure(
        loaded.model, loaded.processor, profile_n, profile_n, world, log=_log, n_blank=profile_n // 2) | {
        "command": command, "seconds": round(time.time() - t0, 1)}
    Path(summary_file).write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n")
    return doc["summary"]["attention_profile"]


def add_tower(model_path: str, summary_file: str, command: str = "", tower_n: int = 120) -> dict:
    """Measure `model_path`'s tower figures (`clip_tower.tower_figures`) into an existing `--json` file's summary
    (a model measured before they were part of the report); the file's other contents are kept."""
    from sparsevlm.loading import load_model

    doc = json.loads(Path(summary_file).read_text())
    loaded = load_model(model_path, device="cpu", dtype="float32")
    doc["summary"]["tower"] = tower_figures(loaded.model, loaded.processor, model_path, tower_n) | {"command": command}
    Path(summary_file).write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False) + "\n")
    return doc["summary"]["tower"]


def profile_compare_rows(a: dict, b: dict) -> list[tuple[str, str, str]]:
    """The attention profile of two summaries side by side (all pictures; "n/a" where one has none), with
    FasterVLM's LLaVA-1.5-7B figure in the measure's name."""
    pa, pb = (dict(attention_profile.profile_rows(s.get("attention_profile"))) for s in (a, b))
    names = list(dict.fromkeys([*pa, *pb]))
    ref = {"[CLS]": "LLaVA-1.5-7B: top-20% ~0.80", "last": "LLaVA-1.5-7B: shifted, top-20% ~0.60",
           "prompt": "LLaVA-1.5-7B: shifted"}
    out = []
    for m in names:
        key = "[CLS]" if m.startswith("[CLS]") else "last" if ", last:" in m else "prompt"
        out.append((f"attention profile, {m} ({ref[key]})", pa.get(m, "n/a"), pb.get(m, "n/a")))
    return out


def tower_rows(s: dict) -> list[tuple[str, str]]:
    """The tower figures of a summary as (measure, value) rows; "n/a" where the summary predates them."""
    t = s.get("tower")
    if not t:
        return [(name, "n/a") for name in TOWER_ROWS]
    cls, dec, ret = t["cls"], t["decoder"], t["retrieval"]
    k = next(key for key in cls if key.startswith("cls_top"))
    rnd = k.replace("cls_", "random_")
    vals = [
        f"{cls['cls_object_attention_vs_area']:.2f} (1.00 = uniform)",
        f"{cls[k]:.3f} (random {cls[rnd]:.3f})",
        (f"{ret['image_to_caption_top1']:.2f} of {ret['candidates']} candidates" if "image_to_caption_top1" in ret
         else f"n/a ({ret['unavailable']})"),
        *(f"{dec[f'layer{la}']['positional_shift_spearman']:+.2f} / {dec[f'layer{la}']['top1pct_share']:.3f}"
          for la in (1, 2)),
    ]
    return list(zip(TOWER_ROWS, vals, strict=True))


TOWER_ROWS = ("tower: [CLS] attention on objects / their area share (feature layer)",
              "tower: [CLS] top-64 evidence recall",
              "tower: held-out image-to-caption retrieval top-1",
              "decoder layer 1, last token over visual tokens: positional shift / top-1% share (reported only)",
              "decoder layer 2, last token over visual tokens: positional shift / top-1% share (reported only)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.likeness", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="assets/models/scenes-llava", help="a local LLaVA model folder")
    p.add_argument("--n", type=int, default=210, help="held-out questions (families round-robin)")
    p.add_argument("--seed", type=int, default=None, help="held-out seed (default: the world's own)")
    p.add_argument("--world", default=None, choices=WORLDS,
                   help="whose held-out questions (default: the model's own world, training_state.json 'world')")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="no measuring: put two earlier --json summaries side by side (markdown; --md writes it)")
    p.add_argument("--top-k", type=int, default=TOP_K, help="visual tokens counted for evidence recall")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", default=None, help="write the summary (and with --records, per question) here")
    p.add_argument("--records", action="store_true", help="add every question's measurements to the JSON (~1 kB each)")
    p.add_argument("--md", default=None, help="write the markdown report here")
    p.add_argument("--tower-n", type=int, default=120,
                   help="pictures for the tower's [CLS] figures (the decoder's attention figures use half as many "
                        "questions; 0: leave the tower out)")
    p.add_argument("--profile-n", type=int, default=None,
                   help="attention profile: this many held-out pictures and as many spread ones (default: --tower-n; "
                        "0: leave it out)")
    p.add_argument("--add-profile", metavar="SUMMARY.json", default=None,
                   help="no questions: measure --model's attention profile into this earlier --json file")
    p.add_argument("--add-tower", metavar="SUMMARY.json", default=None,
                   help="no questions: measure --model's tower figures into this earlier --json file")
    args = p.parse_args(argv)
    if args.add_profile:
        torch.set_num_threads(max(1, args.threads))
        try:
            prof = add_profile(args.model, args.add_profile,
                               " ".join(["python -m training.likeness", *(sys.argv[1:] if argv is None else argv)]),
                               profile_n=max(1, args.profile_n if args.profile_n is not None else args.tower_n))
            print("\n".join(attention_profile.markdown(prof)))
        except (OSError, ValueError, KeyError, SparseVLMError) as e:
            print(f"error: --add-profile: {e}", file=sys.stderr)
            return 2
        return 0
    if args.add_tower:
        torch.set_num_threads(max(1, args.threads))
        try:
            tower = add_tower(args.model, args.add_tower,
                              " ".join(["python -m training.likeness", *(sys.argv[1:] if argv is None else argv)]),
                              tower_n=max(1, args.tower_n))
            print(json.dumps(tower, indent=1))
        except (OSError, ValueError, KeyError, SparseVLMError) as e:
            print(f"error: --add-tower: {e}", file=sys.stderr)
            return 2
        return 0
    if args.compare:
        try:
            a, b = (json.loads(Path(f).read_text())["summary"] for f in args.compare)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --compare needs two JSON files written by --json ({e})", file=sys.stderr)
            return 2
        md = compare_markdown(a, b)
        print(md)
        if args.md:
            Path(args.md).write_text(md)
        return 0
    if args.n < 1:
        p.error("--n must be at least 1")
    if args.top_k < 1:
        p.error("--top-k must be at least 1")
    torch.set_num_threads(max(1, args.threads))
    command = " ".join(["python -m training.likeness", *(sys.argv[1:] if argv is None else argv)])
    try:
        summary, records = run(args.model, args.n, args.seed, args.top_k, log_every=25, world=args.world,
                               tower_n=args.tower_n, profile_n=args.profile_n)
    except SparseVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary["command"] = command
    md = markdown(summary, args.model, command)
    print(md)
    if args.json:
        Path(args.json).write_text(to_json(summary, records if args.records else None))
    if args.md:
        Path(args.md).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
