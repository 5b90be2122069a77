"""Model v2, trained the way LLaVA is trained, on the v2 world (`world.py`); resumable, seeded, JSONL logs.

    python -m training.train_llava --phase text     --out checkpoints/v2-text     --until N
    python -m training.train_llava --phase vision   --out checkpoints/v2-vision   --init-from ... --until N
    python -m training.train_llava --phase align    --out checkpoints/v2-align    --init-from ... --until N
    python -m training.train_llava --phase instruct --out checkpoints/v2-instruct --init-from ... --until N
    python -m training.train_llava --phase clip     --out checkpoints/v3-clip     --init-from ... --until N
    python -m training.train_llava --out checkpoints/v2-grow32 --export checkpoints/v2-export

`scripts/train_v2.sh` chains the phases with their arguments; rerunning it resumes where it stopped (each phase
runs until its checkpoint reaches `--until` steps; a finished phase exits at once).

Phases:
- `text` (language pretraining): the decoder alone on text - the scene in compact words (size colour shape
  row column per object) followed by question/answer turns and "describe the picture" turns about it. The
  compact words sit at the RoPE positions the object's visual tokens will have (2 + the raster index of its
  first patch), and the question at position 578, exactly where it sits after 576 visual tokens: the decoder
  learns to fetch words from the span where a picture will be. No visual tokens: a step costs a fraction of one
  with a picture.
- `vision`: the vision tower on per-patch heads alone (colour, shape, label character, centre, grid row and
  column; `parts.PatchHeads`) on v2 pictures, from the tower `--vision-from` names (by default the installed
  model's). Frozen afterwards, as LLaVA freezes CLIP.
- `align` (LLaVA stage 1, feature alignment): decoder, embeddings and LM head frozen; only the projector learns
  to make the frozen decoder caption the picture (`world.describe`).
- `instruct` (LLaVA stage 2): decoder and projector trainable, multi-turn question/answer conversations over
  the seven families plus an occasional caption turn; with `--grow` the decoder is first grown to `--layers` by
  block expansion (`parts.grow_decoder`). `--tower-lr-scale` > 0 trains the vision tower as well (at that share
  of the rate), `--patch-weight` keeps the vision phase's per-patch heads on it, `--label-fonts` letters the
  training labels in varied typefaces (`world.vary_label`). `--init-from` takes an exported model folder too.
- `clip` (CLIP pretraining of the tower): the vision tower alone, at `--tower-lr-scale` of `--lr`, on CLIP's
  symmetric contrastive loss between its pooled [CLS] (post-layernorm, projected) and a small text encoder's
  embedding of an alt-text caption of the same picture (`clip_tower.py`), batches of `--clip-batch`; the text
  encoder, projection and temperature learn at `--clip-lr-scale`. No conversation is drawn. The decoder and the
  projector are untouched: an `instruct` phase with the tower frozen then re-aligns them to the new tower, as
  LLaVA's stages sit on a pretrained CLIP.

No loss reads attention weights, the projector-vs-embedding similarity, [CLS] attention or any pruning score.
The auxiliary losses, all on hidden states with targets from the scene's geometry or the question's text: the
per-patch heads on the vision tower (vision phase), the grid heads on the projector output (each visual token's
own row and column; `--grid-weight`), and on decoder layers at answer positions the referent probe (which words the
question named), the where head (the named objects' cells) and the order head (the first named object before /
after / neither the second) - `--referent-weight`, `--where-weight`, `--order-weight`. All are dropped at export.
Early in `align` / `instruct` a share of the pure-background visual tokens is left out of the decoder at their
original positions (`parts.decoder_logits`), chosen by the generator's ground truth, ramping to all of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparsevlm.scenes import world
from sparsevlm.scenes.world import FAMILIES

from . import wide
from .clip_tower import ClipHead, contrastive_batch
from .model import ModelSize, build_model, pixel_values, v2_tokenizer
from .parts import (
    DecoderProbe,
    GridHeads,
    PatchHeads,
    WhereHead,
    background_keep_at,
    decoder_logits,
    grow_decoder,
    grown_positions,
    kept_rows,
)
from .parts import export as train_export
from .parts import initial_state as train_initial_state

N_VISUAL = world.GRID * world.GRID
QUESTION_POS = 2 + N_VISUAL  # "USER", ":" then 576 visual tokens
CAPTION = len(FAMILIES)  # family index of caption tokens in the stats
WHOLE = CAPTION + 1  # family index of whole-picture turns (wide.py)
STAT_NAMES = (*FAMILIES, "caption", "whole")
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "models" / "scenes-llava"


REFERENT_WORDS = (*world.COLOURS, *world.SHAPES, *world.SIZE_CLASSES, "label")
REFERENT_SIZE = len(REFERENT_WORDS) + len(FAMILIES)


def referent_vector(question: str, family: int) -> list[float]:
    """What a question names, read from its text alone: its colour / shape / size words (plurals count as the
    shape; "card" as the label) as a multi-hot vector, then its family one-hot."""
    words = set(question.lower().replace("?", " ").split())
    words |= {s for s in world.SHAPES if world.PLURALS[s] in words}
    if "card" in words:
        words.add("label")
    out = [1.0 if w in words else 0.0 for w in REFERENT_WORDS] + [0.0] * len(FAMILIES)
    if 0 <= family < len(FAMILIES):
        out[len(REFERENT_WORDS) + family] = 1.0
    return out


WHERE_BINS = 6  # the where head's cells per side of the picture (6x6, 56 px each)
WHERE_FAMILIES = (FAMILIES.index("position"), FAMILIES.index("relation"))


def where_vector(scene, question: str, family: int) -> list[int] | None:
    """Targets of the where head (`parts.WhereHead`) and the order head (`OrderHead`) for one turn: the 6x6
    cells (row, column) of the centres of the objects a position or relation question names, in the order it
    names them, then - relation only - the first object's order to the second along x and along y: 0 entirely
    before (left of / above), 1 entirely after, 2 neither (their boxes overlap on that axis). -100 where a
    position question has no second object; None for the other families. From the scene's geometry only."""
    if family not in WHERE_FAMILIES:
        return None
    text = question.lower()
    named = [o for _, o in sorted((text.find(o.name), o) for o in scene.objects if o.name in text)][:2]
    out = [min(WHERE_BINS - 1, int(v * WHERE_BINS // world.IMAGE_SIZE)) for o in named for v in o.centre[::-1]]
    if not out:
        return None
    if len(named) == 2:
        a, b = (o.box for o in named)
        out += [0 if a[2 + k] < b[k] else 1 if b[2 + k] < a[k] else 2 for k in (0, 1)]
    return out + [-100] * (6 - len(out))


class OrderHead(WhereHead):
    """Auxiliary head (training only, dropped at export): at the position that predicts a relation answer, the
    output of decoder layer `layer` must say whether the first named object lies entirely before, after, or
    neither, of the second - along x and along y (`where_vector`'s last two targets).

    Why: with the where head the hidden state after layer 3 names both objects' 6x6 cells (95% each, 147
    held-out single-turn relation questions, step 4200 of v2-instruct-where), yet the relation answer stayed at
    chance (46%, nearly always "yes"): the decoder carried both positions to the answer and never learned to
    compare them. This asks for the comparison itself, from the scene's geometry; the answer still has to
    combine it with the asked word (left of / right of / above / below / under). Reads no attention weights
    and nothing a pruning method scores.
    """

    def __init__(self, model, hidden: int, layer: int):
        super().__init__(model, hidden, layer, slots=3, targets=2)  # x and y, each before / after / neither


class ReferentProbe(DecoderProbe):
    """Auxiliary head (training only, dropped at export): at the position that predicts an answer, the output of
    decoder layer `layer` must say which colour / shape / size words (or the label) the question named and its
    family - from the question's text alone.

    Why: a question's answer position is ":" after "ASSISTANT", several tokens after the words that say what
    to look up. Measured in the text phase without it (step 1695, single-turn, <= 3 objects): reading the label
    0.0 (always "8"), existence below chance - while copying the scene into a caption, where the current token
    itself is the look-up key, was at 0.8. An earlier decoder trained on pictures met the same wall and passed it
    with a probe of this kind. It reads no picture, no evidence patches and no attention weights.
    """

    def __init__(self, model, hidden: int, layer: int):
        super().__init__(model, hidden, layer, REFERENT_SIZE)

    def loss(self, refs: torch.Tensor, mask: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        b, t = mask.nonzero(as_tuple=True)
        return F.binary_cross_entropy_with_logits(self.read(b, t, rows), refs[b, t])


class Conversations:
    """Token sequences of the three phases. Every sequence is (ids, positions, labels, families, weights):
    labels are next-token targets at the same index (-100: none), families index STAT_NAMES (-1: not an
    answer), weights the per-token loss weight."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def context_words(self, scene) -> tuple[list[int], list[int]]:
        """The scene's compact words, one token per word, at the positions its items' visual tokens will have
        (from 2 + the raster index of the item's first patch)."""
        ids, pos = [], []
        nxt = 2
        for i in world.reading_order(scene):
            first = world.covered_patches(scene, [i])[0]
            p = max(nxt, 2 + first)
            words = self.ids(" ".join(world.item_words(scene, i)))
            ids += words
            pos += list(range(p, p + len(words)))
            nxt = p + len(words)
        return ids, pos

    def context_fused(self, scene, spread: int) -> tuple[list[tuple[int, ...]], list[int]]:
        """The scene as pooled words: each item is ONE input vector, the mean of its words' embeddings (size,
        colour, shape, row, column), repeated at up to `spread` of the positions its visual tokens will have
        (evenly over the patches it covers). This is the text-only form closest to a picture - one vector per
        patch carrying everything about the thing there - so the decoder learns to read such vectors before
        the projector has to produce them."""
        out = []
        for i in world.items(scene):
            group = tuple(self.ids(" ".join(world.item_words(scene, i))))
            cells = world.covered_patches(scene, [i])
            picks = sorted({cells[int(round(k))] for k in np.linspace(0, len(cells) - 1, min(spread, len(cells)))})
            out += [(2 + c, group) for c in picks]
        out.sort()
        return [g for _, g in out], [p for p, _ in out]

    def build(self, scene, turns: list[tuple[str, str, int]], visual: bool, lm_weight: float = 0.0,
              fused: int = 0):
        """One conversation: `turns` are (question, answer, family index). The first turn carries the picture
        (576 <image> tokens) or, without `visual`, the scene in words in their place: one token per word, or
        with `fused` > 0 pooled words (`context_fused`). Returns (ids, positions, labels, families, weights,
        groups): groups[k] is the tuple of token ids whose embeddings are averaged at position k."""
        ids, pos, labels, fams, weights, groups = [], [], [], [], [], []
        refs: dict[int, list[float]] = {}  # index of the position that predicts an answer -> referent_vector
        where: dict[int, list[int]] = {}  # the same positions of position / relation turns -> where_vector

        def add(tokens, positions, supervised_family=None, w=0.0):
            # Token k is predicted from token k-1: the label sits on the previous position. A pooled token
            # (a tuple of ids) is never a target.
            for t, p in zip(tokens, positions, strict=True):
                g = t if isinstance(t, tuple) else (t,)
                if ids:
                    target = (supervised_family is not None or w > 0) and len(g) == 1
                    labels[-1] = g[0] if target else -100
                    fams[-1] = supervised_family if supervised_family is not None else -1
                    weights[-1] = (1.0 if supervised_family is not None else w) if target else 0.0
                ids.append(g[0])
                groups.append(g)
                pos.append(p)
                labels.append(-100)
                fams.append(-1)
                weights.append(0.0)

        head = self.ids("USER:")
        add(head, [0, 1])
        if visual:
            add([self.image_id] * N_VISUAL, list(range(2, 2 + N_VISUAL)))
            nxt = QUESTION_POS
        else:
            cids, cpos = self.context_fused(scene, fused) if fused else self.context_words(scene)
            add(cids, cpos, w=lm_weight)
            nxt = max(QUESTION_POS, cpos[-1] + 1 if cpos else 0)
        for t, (q, a, fam) in enumerate(turns):
            text = f"{q} ASSISTANT:" if t == 0 else f"USER: {q} ASSISTANT:"
            qi = self.ids(text)
            add(qi, list(range(nxt, nxt + len(qi))), w=lm_weight)
            nxt += len(qi)
            ai = [*self.ids(a), self.eos]
            refs[len(ids) - 1] = referent_vector(q, fam)
            wv = where_vector(scene, q, fam)
            if wv is not None:
                where[len(ids) - 1] = wv
            add(ai, list(range(nxt, nxt + len(ai))), supervised_family=fam)
            nxt += len(ai)
        self.last_refs = refs  # read by collate (kept out of the tuple the tests unpack)
        self.last_where = where
        return ids, pos, labels, fams, weights, groups

    def running(self, parts: list[tuple[object, list[tuple[str, str, int]]]], lm_weight: float = 1.0):
        """Running text: several scenes in one document at consecutive positions from 0, as a language model
        reads text. Each scene is its description (`world.describe`) followed by its question/answer turns, so a
        question is about the latest scene described, as text mostly refers to what it said last. Every token
        is a next-token target: answers weigh 1 (and count in their family's accuracy), the rest `lm_weight`.
        Returns the tuple `build` does; no referent or where targets."""
        ids, pos, labels, fams, weights, groups = [], [], [], [], [], []

        def add(tokens, family=None):
            for t in tokens:
                if ids:
                    labels[-1] = t
                    fams[-1] = family if family is not None else -1
                    weights[-1] = 1.0 if family is not None else lm_weight
                ids.append(t)
                groups.append((t,))
                pos.append(len(pos))
                labels.append(-100)
                fams.append(-1)
                weights.append(0.0)

        for k, (scene, turns) in enumerate(parts):
            add(self.ids(("" if k == 0 else "USER: ") + world.describe(scene)))
            for q, a, fam in turns:
                add(self.ids(f"USER: {q} ASSISTANT:"))
                add([*self.ids(a), self.eos], family=fam)
        self.last_refs, self.last_where = {}, {}
        return ids, pos, labels, fams, weights, groups

    def collate(self, seqs, refs: list[dict[int, list[float]]] | None = None,
                where: list[dict[int, list[int]]] | None = None):
        """Batch tensors; with `refs` (one `last_refs` per sequence) also the referent targets and their mask,
        and with `where` (one `last_where` each) the where and order targets [batch, length, 6], appended to the
        tuple."""
        length = max(len(s[0]) for s in seqs)
        b = len(seqs)
        ids = torch.full((b, length), self.pad, dtype=torch.long)
        pos = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), -100, dtype=torch.long)
        fams = torch.full((b, length), -1, dtype=torch.long)
        weights = torch.zeros((b, length))
        groups = torch.full((b, length, 5), -1, dtype=torch.long)
        for k, (i, p, lab, f, w, g) in enumerate(seqs):
            n = len(i)
            for t, grp in enumerate(g):
                groups[k, t, : len(grp)] = torch.tensor(grp)
            ids[k, :n] = torch.tensor(i)
            pos[k, :n] = torch.tensor(p)
            pos[k, n:] = p[-1] + 1 + torch.arange(length - n)
            labels[k, :n] = torch.tensor(lab)
            fams[k, :n] = torch.tensor(f)
            weights[k, :n] = torch.tensor(w)
        groups[:, :, 0] = torch.where(groups[:, :, 0] < 0, ids, groups[:, :, 0])
        if refs is None:
            return ids, pos, labels, fams, weights, groups
        ref = torch.zeros((b, length, REFERENT_SIZE))
        ref_mask = torch.zeros((b, length), dtype=torch.bool)
        for k, r in enumerate(refs):
            for t, vec in r.items():
                ref[k, t] = torch.tensor(vec)
                ref_mask[k, t] = True
        if where is None:
            return ids, pos, labels, fams, weights, groups, ref, ref_mask
        wt = torch.full((b, length, 6), -100, dtype=torch.long)
        for k, r in enumerate(where):
            for t, vec in r.items():
                wt[k, t] = torch.tensor(vec)
        return ids, pos, labels, fams, weights, groups, ref, ref_mask, wt


def caption_turn(scene, rng: np.random.Generator) -> tuple[str, str, int]:
    return world.CAPTION_PROMPTS[int(rng.integers(len(world.CAPTION_PROMPTS)))], world.describe(scene), CAPTION


def scene_turns(seed: int, turns: int, max_objects: int, caption_p: float, weights=None, whole_p: float = 0.0):
    """A v2 scene and its turns: questions of the families (and, with probability `caption_p`, one caption
    turn at a random place). With `whole_p` > 0 each of the `turns` slots is, with that probability, a
    whole-picture turn (`wide.py`) instead of a family question, at a random place; with 0 the turns are exactly
    those of a run without it."""
    n_whole = int(np.random.default_rng([seed, 28]).binomial(turns, whole_p)) if whole_p > 0 else 0
    scene, samples = world.training_scene(seed, turns - n_whole, max_objects, weights)
    rng = np.random.default_rng([seed, 25])
    out = [(s.question, s.answer, FAMILIES.index(s.family)) for s in samples]
    if n_whole:
        wrng = np.random.default_rng([seed, 29])
        for q, a, _ in wide.whole_turns(scene, n_whole, wrng):
            out.insert(int(wrng.integers(len(out) + 1)), (q, a, WHOLE))
    if rng.random() < caption_p or not out:
        out.insert(int(rng.integers(len(out) + 1)), caption_turn(scene, rng))
    return scene, out


def running_document(seed: int, scenes: int, turns: int, max_objects: int, weights=None, whole_p: float = 0.0):
    """The (scene, turns) parts of one running-text document (`Conversations.running`): `scenes` scenes drawn
    as training scenes are, each with `turns` questions and no caption turn (its description is the text)."""
    return [scene_turns(seed * 64 + k, turns, max_objects, 0.0, weights, whole_p) for k in range(scenes)]


RUNNING_SEED = 7_700_000  # running-text documents beside the pictures (--text-docs): their own seeds


def weighted_loss(logits, labels, fams, weights):
    """Weighted mean cross-entropy (answers weigh 1, LM tokens `lm_weight`) and per-family (correct, total)
    of the supervised answer tokens (end-of-turn tokens included)."""
    sel = labels != -100
    ce = F.cross_entropy(logits[sel].float(), labels[sel], reduction="none")
    w = weights[sel]
    loss = (ce * w).sum() / w.sum().clamp_min(1e-6)
    stats = {}
    with torch.no_grad():
        pred = logits.argmax(-1)
        for k, name in enumerate(STAT_NAMES):
            m = sel & (fams == k)
            if m.any():
                stats[name] = (int((pred[m] == labels[m]).sum()), int(m.sum()))
    return loss, stats


def text_forward(model, groups, pos):
    """The decoder on text: each position's input is the mean embedding of its group of token ids."""
    lm = model.model.language_model
    present = (groups >= 0).float()
    emb = model.get_input_embeddings()(groups.clamp_min(0)) * present[..., None]
    emb = emb.sum(2) / present.sum(2, keepdim=True)
    hidden = lm(inputs_embeds=emb, position_ids=pos).last_hidden_state
    return model.lm_head(hidden)


def keep_mask(scene, seed: int, share: float) -> torch.Tensor:
    keep = torch.ones(N_VISUAL, dtype=torch.bool)
    if share < 1.0:
        fg = torch.zeros(N_VISUAL, dtype=torch.bool)
        fg[world.covered_patches(scene, world.items(scene))] = True
        keep = fg | (torch.rand(N_VISUAL, generator=torch.Generator().manual_seed(seed)) < share)
    return keep


# ------------------------------------------------------------------------------------------------- train


def trainable(model, phase: str, tower: bool = False) -> None:
    """Which parts learn in each phase (LLaVA-1.5: CLIP frozen throughout; stage 1 the projector only).

    `tower` (instruct only, `--tower-lr-scale` > 0): the vision tower learns too ("everything trainable"), as in
    LLaVA-OneVision, which trains its vision tower at a fifth of the LLM's rate."""
    model.requires_grad_(False)
    lm = model.model.language_model
    if phase == "text":
        lm.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif phase in ("vision", "clip"):
        model.model.vision_tower.requires_grad_(True)
    elif phase == "align":
        model.model.multi_modal_projector.requires_grad_(True)
    elif phase == "instruct":
        lm.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        model.model.multi_modal_projector.requires_grad_(True)
        if tower:
            model.model.vision_tower.requires_grad_(True)
    else:
        raise ValueError(phase)
    if tower and phase not in ("instruct", "clip"):
        raise ValueError("only instruction tuning trains the vision tower with the decoder")
    # The Llama embedding table is inside language_model; it learns in text/instruct, is frozen in align.


def starting_state(args, tokenizer) -> tuple[dict, ModelSize, float]:
    """Weights of a new phase: an earlier phase's checkpoint (grown with --grow), or for the first phase a
    fresh decoder with the shipped model's vision tower (`--vision-from`)."""
    if args.init_from:
        # An exported model folder (the shipped model, say) or an earlier phase's checkpoint.pt; from a folder the
        # auxiliary heads start fresh, as they are dropped at export.
        st = (train_initial_state(Path(args.init_from)) | {"train_seconds": 0.0} if Path(args.init_from).is_dir()
              else torch.load(args.init_from, map_location="cpu", weights_only=False))
        size = ModelSize(**st["size"])
        model_state = st["model"]
        if args.grow and args.layers != size.layers:
            grown = ModelSize(**{**st["size"], "layers": args.layers})
            fresh = build_model(grown, tokenizer, seed=args.seed + 1).state_dict()
            print(f"grown from {size.layers} decoder layers, kept at {grown_positions(size.layers, args.layers)}")
            model_state = grow_decoder(model_state, size.layers, args.layers, fresh)
            size = grown
        return model_state, size, st["train_seconds"] + st.get("prior_seconds", 0.0)
    size = ModelSize(vision_hidden=args.vision_hidden, vision_layers=args.vision_layers, hidden=args.hidden,
                     layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate)
    model = build_model(size, tokenizer, seed=args.seed)
    state = model.state_dict()
    prior = 0.0
    if args.vision_from:
        from safetensors.torch import load_file

        shipped = load_file(str(Path(args.vision_from) / "model.safetensors"))
        tower = {k: v for k, v in shipped.items() if ".vision_tower." in k or k.startswith("vision_tower.")}
        for k, v in tower.items():
            key = k if k in state else f"model.{k}" if f"model.{k}" in state else None
            if key is None or state[key].shape != v.shape:
                raise SystemExit(f"--vision-from: {k} does not fit this model's vision tower")
            state[key] = v
        info = json.loads((Path(args.vision_from) / "training_state.json").read_text())
        prior = 0.0  # the tower's own training time is the shipped model's; reported separately in the card
        print(f"vision tower from {args.vision_from} ({len(tower)} tensors; trained there for "
              f"{(info['train_seconds'] + info.get('prior_seconds', 0.0)) / 60:.0f} CPU-min with the rest)")
    return state, size, prior


def reinit_rows(state: dict, tokenizer, words: list[str], seed: int) -> dict:
    """New random rows (the matrix's own std) for `words` in the input embeddings and the LM head.

    Why: the text phase left some words' rows near-identical - the 12 label characters' LM-head rows at mean
    cosine 0.96, `left`/`middle`/`right` input embeddings at 0.87 (the first model's: 0.28 and 0.02). With equal
    rows no hidden state can pick one of them and the gradient moves them all alike, so instruction tuning stayed
    at chance on reading and on columns. Fresh rows break that symmetry, as a new token's rows start in LLaVA.
    """
    vocab = tokenizer.get_vocab()
    unknown = [w for w in words if w not in vocab]
    if unknown:
        raise SystemExit(f"--reinit-words: not in the vocabulary: {', '.join(unknown)}")
    ids = torch.tensor([vocab[w] for w in words])
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    keys = [k for k in state if k.endswith("embed_tokens.weight")] + ["lm_head.weight"]
    for key in keys:
        w = state[key].clone()
        w[ids] = torch.randn((len(ids), w.shape[1]), generator=gen, dtype=w.dtype) * w.std()
        out[key] = w
    return out


def lr_at(step: int, args) -> float:
    rate = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.decay_from is not None and step >= args.decay_from and args.until > args.decay_from:
        frac = (step - args.decay_from) / (args.until - args.decay_from)
        rate = rate + (args.lr_end - rate) * min(1.0, frac)
    return rate


def family_weights(spec: str) -> dict[str, float]:
    w = {f: 1.0 for f in FAMILIES}
    w.update({"count": 1.5, "relation": 1.5, "position": 1.5})
    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        if name not in w:
            raise SystemExit(f"--family-weights: unknown family {name!r} (families: {', '.join(FAMILIES)})")
        w[name] = float(value)
    return w


def make_batch(args, conv: Conversations, step: int, max_obj: int, weights):
    """The step's batch: a pure function of (seed, step)."""
    if args.phase == "clip":  # the contrastive batch is drawn by prepared_step
        return [], [], None
    seeds = [args.seed * 1_000_000 + step * args.batch + b for b in range(args.batch)]
    seqs, scenes, refs, where = [], [], [], []
    caption_p = {"text": args.caption_p, "align": 1.0, "instruct": args.caption_p}.get(args.phase, 0.0)
    for s in seeds:
        if args.phase == "text" and args.running_scenes:
            parts = running_document(s, args.running_scenes, args.running_turns, max_obj, weights, args.whole_p)
            scenes.append(parts[-1][0])
            seqs.append(conv.running(parts, args.lm_weight))
            refs.append({})
            where.append({})
            continue
        if args.phase == "align":
            scene, _ = world.training_scene(s, 0, max_obj, weights)
            turns = [caption_turn(scene, np.random.default_rng([s, 26]))]
        else:
            scene, turns = scene_turns(s, args.turns, max_obj, caption_p, weights, args.whole_p)
        if args.label_fonts:
            world.vary_label(scene, s, stroke_share=args.stroke_labels)
        if args.tinted_backgrounds:
            world.vary_background(scene, s, args.tinted_backgrounds)
        scenes.append(scene)
        if args.phase != "vision":
            fused = args.fused_spread if np.random.default_rng([s, 27]).random() < args.fused_p else 0
            seqs.append(conv.build(scene, turns, visual=args.phase != "text", lm_weight=args.lm_weight,
                                   fused=fused))
            refs.append(conv.last_refs)
            where.append(conv.last_where)
    return seeds, scenes, (conv.collate(seqs, refs, where) if seqs else None)


def prepared_step(args, conv: Conversations, step: int, weights) -> dict:
    """Everything a step needs from the CPU side (a pure function of seed and step, so a pool of workers can
    draw steps ahead): the collated batch and, with pictures, the pixels and the kept visual tokens."""
    max_obj = min(world.MAX_OBJECTS, args.curriculum_start + step // max(1, args.curriculum_every))
    seeds, scenes, batch = make_batch(args, conv, step, max_obj, weights)
    out = {"max_obj": max_obj, "scenes": scenes, "batch": batch, "keep": None, "pixels": None}
    if args.phase in ("align", "instruct"):
        share = background_keep_at(step, args.background_keep_start, args.background_full_at)
        out["keep"] = torch.stack([keep_mask(sc, s, share) for sc, s in zip(scenes, seeds, strict=True)])
        out["pixels"] = pixel_values([world.render(s) for s in scenes])
        if args.patch_weight > 0:
            out["patch_targets"] = torch.stack([torch.from_numpy(world.patch_targets(s)) for s in scenes])
    if args.phase == "instruct" and args.text_docs:
        docs = [conv.running(running_document(RUNNING_SEED + (args.seed * 1_000_000 + step) * args.text_docs + d,
                                              args.running_scenes or 4, args.running_turns, max_obj, weights,
                                              args.whole_p), args.text_lm_weight)
                for d in range(args.text_docs)]
        out["text_batch"] = conv.collate(docs)
    if args.phase == "clip" or (args.phase == "instruct" and args.clip_weight > 0):
        out["clip_pixels"], out["clip_captions"] = contrastive_batch(
            step, args.clip_batch, args.seed, world.MAX_OBJECTS, args.label_fonts, args.stroke_labels,
            args.tinted_backgrounds)
    return out


_WORKER: dict = {}


def _worker_init(args, weights) -> None:
    torch.set_num_threads(1)
    _WORKER.update(args=args, weights=weights, conv=Conversations(v2_tokenizer()))


def _worker_step(step: int) -> dict:
    return prepared_step(_WORKER["args"], _WORKER["conv"], step, _WORKER["weights"])


def step_feed(args, conv: Conversations, start: int, weights):
    """Iterator over prepared steps from `start` to `--until`: in this process, or with `--workers` N drawn
    ahead by N worker processes (same batches: each is a function of seed and step). The workers are spawned, not
    forked: a fork copies whatever lock another thread of this process holds at that moment (the tokenizer's or
    torch's thread pools), and a worker could then wait on it forever; spawned ones start clean, CUDA or not."""
    steps = range(start, args.until)
    if args.workers <= 0:
        return (prepared_step(args, conv, s, weights) for s in steps), None
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(args.workers, initializer=_worker_init, initargs=(args, weights))
    return pool.imap(_worker_step, steps, chunksize=1), pool


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    tokenizer = v2_tokenizer()
    conv = Conversations(tokenizer)
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    step0 = saved["step"] if saved is not None else 0
    if step0 >= args.until:  # checked first: a device may return the weights without "optim"
        print(f"phase {args.phase} already at step {step0} >= --until {args.until}: nothing to do", flush=True)
        return
    if saved is not None:
        state, size, prior = saved["model"], ModelSize(**saved["size"]), saved.get("prior_seconds", 0.0)
    else:
        state, size, prior = starting_state(args, tokenizer)
        if args.reinit_words:
            state = reinit_rows(state, tokenizer, args.reinit_words.split(","), seed=args.seed)
            print(f"new random rows for {args.reinit_words}", flush=True)
    model = build_model(size, tokenizer, seed=args.seed)
    model.load_state_dict(state)
    model.train()
    train_tower = args.phase in ("instruct", "clip") and args.tower_lr_scale > 0
    if args.phase == "clip" and not train_tower:
        raise SystemExit("--phase clip trains the vision tower: give --tower-lr-scale > 0")
    trainable(model, args.phase, tower=train_tower)
    patch_heads = None
    if args.phase == "vision" or (args.phase == "instruct" and args.patch_weight > 0):
        patch_heads = PatchHeads(model, size.vision_hidden, balanced=True)
        if args.patch_heads_from and saved is None:
            patch_heads.load_state_dict(head_state(Path(args.patch_heads_from), "patch_heads"))
            print(f"per-patch heads from {args.patch_heads_from}", flush=True)
    grid_heads = GridHeads(model, size.hidden) if args.phase in ("align", "instruct") and args.grid_weight > 0 else None
    ref_probe = None
    if args.phase in ("text", "instruct") and args.referent_weight > 0:
        ref_probe = ReferentProbe(model, size.hidden, args.referent_layer)
    where_head = None
    if args.phase == "instruct" and args.where_weight > 0:
        where_head = WhereHead(model, size.hidden, args.where_layer, slots=WHERE_BINS)
    order_head = None
    if args.phase == "instruct" and args.order_weight > 0:
        order_head = OrderHead(model, size.hidden, args.order_layer)
    clip_head = None
    if args.clip_weight > 0 or args.phase == "clip":
        if not train_tower:
            raise SystemExit("--clip-weight trains the vision tower: give --tower-lr-scale > 0 too")
        clip_head = ClipHead(tokenizer, size.vision_hidden, seed=args.seed)
        if args.clip_head_from and saved is None:
            clip_head.load_state_dict(head_state(Path(args.clip_head_from), "clip_head"))
            print(f"contrastive head from {args.clip_head_from}", flush=True)
    weights = family_weights(args.family_weights)
    feed, pool = step_feed(args, conv, step0, weights)
    for part in (model, patch_heads, grid_heads, ref_probe, where_head, order_head, clip_head):
        if part is not None:
            part.to(dev)
    grown = set()
    if args.grown_lr_scale != 1.0 and size.layers > args.grown_from:
        grown = set(range(size.layers)) - set(grown_positions(args.grown_from, size.layers))

    def part(n: str) -> str:
        if "multi_modal_projector" in n:
            return "projector"
        if train_tower and "vision_tower" in n:
            return "tower"
        if ".layers." in n and "language_model" in n and int(n.split(".layers.")[1].split(".")[0]) in grown:
            return "grown"
        return "others"

    named = [(part(n), p) for n, p in model.named_parameters() if p.requires_grad]
    projector = [p for k, p in named if k == "projector"]
    tower = [p for k, p in named if k == "tower"]
    others = [p for k, p in named if k == "others"]
    grown_params = [p for k, p in named if k == "grown"]
    for heads in (patch_heads, grid_heads):
        if heads is not None:
            others += list(heads.parameters())
    param_groups = [g for g in ({"params": others, "lr_scale": 1.0},
                          {"params": projector, "lr_scale": args.projector_lr_scale},
                          {"params": tower, "lr_scale": args.tower_lr_scale},
                          {"params": grown_params, "lr_scale": args.grown_lr_scale}) if g["params"]]
    opt = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    # The referent probe has a group of its own, last, so a run that adds it resumes a checkpoint saved without.
    # The where head's group comes after it, then the order head's: a checkpoint saved without them gets them
    # added after loading.
    extra = [{"params": list(h.parameters()), "lr_scale": 1.0} for h in (ref_probe, where_head, order_head)
             if h is not None]
    if clip_head is not None:  # the contrastive head's group comes last, at its own rate
        extra.append({"params": list(clip_head.parameters()), "lr_scale": args.clip_lr_scale})
    step, train_seconds = 0, 0.0
    have = len(extra) if saved is None else max(0, len(saved["optim"]["param_groups"]) - len(param_groups))
    for g in extra[:have]:
        opt.add_param_group(g)
    if saved is not None:
        opt.load_state_dict(saved["optim"])
        for g in extra[have:]:
            opt.add_param_group(g)
        step, train_seconds = saved["step"], saved["train_seconds"]
        for key, heads in (("patch_heads", patch_heads), ("grid_heads", grid_heads), ("referent_probe", ref_probe),
                           ("where_head", where_head), ("order_head", order_head), ("clip_head", clip_head)):
            if heads is not None and saved.get(key) is not None:
                heads.load_state_dict(saved[key])
        print(f"resumed {args.phase} at step {step} ({train_seconds / 60:.1f} min) from {ckpt_path}", flush=True)
    param_groups = opt.param_groups
    n_train = sum(p.numel() for g in param_groups for p in g["params"])
    print(f"phase {args.phase}: {n_train / 1e6:.2f}M trainable parameters, size {size.to_dict()}, "
          f"vocabulary {len(tokenizer)}", flush=True)
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run

    def save() -> None:
        tmp = out / "checkpoint.pt.tmp"
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step,
                    "train_seconds": train_seconds, "prior_seconds": prior, "size": size.to_dict(),
                    "phase": args.phase, "args": vars(args),
                    "patch_heads": patch_heads.state_dict() if patch_heads is not None else None,
                    "grid_heads": grid_heads.state_dict() if grid_heads is not None else None,
                    "referent_probe": ref_probe.state_dict() if ref_probe is not None else None,
                    "where_head": where_head.state_dict() if where_head is not None else None,
                    "order_head": order_head.state_dict() if order_head is not None else None,
                    "clip_head": clip_head.state_dict() if clip_head is not None else None}, tmp)
        os.replace(tmp, ckpt_path)

    stop: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # finish the step, save, exit
    last_ckpt = time.time()
    run_start = time.time()
    def fresh_window() -> dict:
        return {"loss": 0.0, "aux": 0.0, "ref": 0.0, "where": 0.0, "order": 0.0, "patch": 0.0, "clip": 0.0,
                "n": 0, "t": 0.0, "stats": {}}

    window = fresh_window()
    while step < args.until and not stop:
        if args.minutes and time.time() - run_start > args.minutes * 60:
            print(f"--minutes {args.minutes} reached at step {step}", flush=True)
            break
        t0 = time.time()
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        prep = next(feed)
        max_obj, scenes = prep["max_obj"], prep["scenes"]
        batch = None if prep["batch"] is None else tuple(x.to(dev) for x in prep["batch"])
        zero = torch.zeros((), device=dev)
        aux, ref_loss, where_loss, order_loss, patch_loss, clip_loss = zero, zero, zero, zero, zero, zero
        stats: dict = {}
        if args.phase == "text":
            ids, pos, labels, fams, w, pooled, ref, ref_mask = batch[:8]
            loss, stats = weighted_loss(text_forward(model, pooled, pos), labels, fams, w)
            if ref_probe is not None:
                ref_loss = ref_probe.loss(ref, ref_mask, [torch.arange(ids.shape[1], device=dev)] * ids.shape[0])
        elif args.phase == "clip":
            loss, top1 = clip_head.loss(model.model.vision_tower, prep["clip_pixels"].to(dev), prep["clip_captions"])
            stats = {"clip_top1": (top1, 1), "clip_scale": (float(clip_head.logit_scale.detach().exp()), 1)}
        elif args.phase == "vision":
            model.model.vision_tower(pixel_values=pixel_values([world.render(s) for s in scenes]).to(dev))
            targets = torch.stack([torch.from_numpy(world.patch_targets(s)) for s in scenes]).to(dev)
            # per-head accuracy on object / label patches, logged as train_acc (mean over the window's steps)
            stats = {k: (v, 1) for k, v in patch_heads.foreground_accuracy(targets).items()}
            loss = patch_heads.loss(targets)
        else:
            ids, pos, labels, fams, w, _, ref, ref_mask, where_t = batch
            keep, px = prep["keep"].to(dev), prep["pixels"].to(dev)
            # decoder_logits shortens the sequences to the kept tokens; weights follow the same rows.
            logits, lab, fam = decoder_logits(model, ids, px, keep, labels, fams, conv.pad)
            wl = torch.zeros_like(lab, dtype=torch.float)
            rows = kept_rows(ids, keep, model.config.image_token_id)
            for k, r in enumerate(rows):
                wl[k, : len(r)] = w[k, r]
            loss, stats = weighted_loss(logits, lab, fam, wl)
            if prep.get("text_batch") is not None:
                # LLaVA-1.5's mix has text-only conversations beside the pictures: here running-text documents,
                # averaged with the pictures' loss by their number of sequences.
                _, tpos, tlab, tfam, tw, tgroups = (x.to(dev) for x in prep["text_batch"])
                tloss, tstats = weighted_loss(text_forward(model, tgroups, tpos), tlab, tfam, tw)
                nv, nt = ids.shape[0], tpos.shape[0]
                loss = (nv * loss + nt * tloss) / (nv + nt)
                stats.update({f"text_{k}": v for k, v in tstats.items()})
            if grid_heads is not None:
                aux = grid_heads.loss()
            if ref_probe is not None:
                ref_loss = ref_probe.loss(ref, ref_mask, rows)
            if where_head is not None:
                where_loss = where_head.loss(where_t[..., :4], rows)
            if order_head is not None:
                order_loss = order_head.loss(where_t[..., 4:], rows)
            if patch_heads is not None:  # the tower's own per-patch heads, as in the vision phase
                targets = prep["patch_targets"].to(dev)
                stats.update({f"patch_{k}": (v, 1) for k, v in patch_heads.foreground_accuracy(targets).items()})
                patch_loss = patch_heads.loss(targets)
            if clip_head is not None:  # after the patch heads: they keep the tower's last output
                clip_loss, top1 = clip_head.loss(model.model.vision_tower, prep["clip_pixels"].to(dev),
                                                 prep["clip_captions"])
                stats["clip_top1"] = (top1, 1)
                stats["clip_scale"] = (float(clip_head.logit_scale.detach().exp()), 1)
        total = (loss + args.grid_weight * aux + args.referent_weight * ref_loss + args.where_weight * where_loss
                 + args.order_weight * order_loss + args.patch_weight * patch_loss + args.clip_weight * clip_loss)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], args.clip)
        opt.step()
        step += 1
        dt = time.time() - t0
        train_seconds += dt
        window["loss"] += float(loss.detach())
        window["aux"] += float(aux.detach())
        window["ref"] += float(ref_loss.detach())
        window["where"] += float(where_loss.detach())
        window["order"] += float(order_loss.detach())
        window["patch"] += float(patch_loss.detach())
        window["clip"] += float(clip_loss.detach())
        window["n"] += 1
        window["t"] += dt
        for f, (c, n) in stats.items():
            a, b = window["stats"].get(f, (0, 0))
            window["stats"][f] = (a + c, b + n)
        if step % args.log_every == 0:
            rec = {"phase": args.phase, "step": step, "loss": window["loss"] / window["n"],
                   "aux_loss": window["aux"] / window["n"], "referent_loss": window["ref"] / window["n"],
                   "where_loss": window["where"] / window["n"], "order_loss": window["order"] / window["n"],
                   "patch_loss": window["patch"] / window["n"], "clip_loss": window["clip"] / window["n"],
                   "train_acc": {f: round(c / n, 4) for f, (c, n) in window["stats"].items()},
                   "s_per_step": round(window["t"] / window["n"], 3), "lr": lr, "max_objects": max_obj,
                   "train_minutes": round(train_seconds / 60, 2), "time": time.strftime("%H:%M:%S")}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            window = fresh_window()
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
    save()
    if pool is not None:
        pool.terminate()
    print(f"phase {args.phase}: saved step {step} to {ckpt_path}", flush=True)


PROBE_SEED = 9_500_000  # text-probe conversations: no training stream reaches these seeds


@torch.no_grad()
def probe_text(model, conv: Conversations, n: int, max_objects: int, fused: int) -> dict[str, float]:
    """Single-turn accuracy of the answer word on `n` fresh text conversations (the scene as words, or pooled
    with `fused`), teacher-forced, per family: what the decoder can answer from text alone, with no earlier
    turn to copy from."""
    seqs = []
    for s in range(n):
        scene, turns = scene_turns(PROBE_SEED + s, 1, max_objects, 0.0)
        seqs.append(conv.build(scene, turns, visual=False, fused=fused))
    ids, pos, labels, fams, _, groups = conv.collate(seqs)
    pred = text_forward(model, groups, pos).argmax(-1)
    sel = (labels != -100) & (labels != conv.eos)
    out = {}
    for k, name in enumerate(STAT_NAMES):
        m = sel & (fams == k)
        if m.any():
            out[name] = round(float((pred[m] == labels[m]).float().mean()), 3)
    out["overall"] = round(float((pred[sel] == labels[sel]).float().mean()), 3)
    return out


def head_state(path: Path, key: str) -> dict:
    """An auxiliary head saved in a checkpoint: "clip_head" (a `--phase clip` run, or one with `--clip-weight`) or
    "patch_heads" (`--phase vision`, or instruct with `--patch-weight`)."""
    head = torch.load(path, map_location="cpu", weights_only=False).get(key)
    if head is None:
        raise SystemExit(f"{path} holds no {key}: give a checkpoint of a phase that trained them")
    return head


def tower_record(ckpt: dict) -> dict:
    """Where the checkpoint's vision tower got CLIP's contrastive objective, if it did: in this phase (`--phase
    clip`, or `--clip-weight` with the tower trainable; then "before" says where the tower it started from got
    it), or in the `--phase clip` checkpoint this phase continued from with the tower frozen (so the tower is that
    phase's, unchanged). {"contrastive": False} otherwise."""
    args = ckpt.get("args") or {}
    src = Path(str(args.get("init_from") or ""))
    if ckpt.get("phase") == "clip" or (float(args.get("clip_weight") or 0) > 0
                                       and float(args.get("tower_lr_scale") or 0) > 0):
        record = {"contrastive": True, "in": "this phase"}
        if ckpt.get("phase") != "clip":  # instruction tuning with the contrastive term kept on the tower
            record["args"] = {k: args.get(k) for k in ("clip_weight", "tower_lr_scale", "clip_batch",
                                                       "clip_head_from")}
            if src.suffix == ".pt" and src.is_file():
                record["before"] = tower_record(torch.load(src, map_location="cpu", weights_only=False))
        return record
    if float(args.get("tower_lr_scale") or 0) == 0 and src.suffix == ".pt" and src.is_file():
        before = torch.load(src, map_location="cpu", weights_only=False)
        tower = [k for k in ckpt["model"] if "vision_tower." in k]
        same = all(k in before["model"] and torch.equal(ckpt["model"][k], before["model"][k]) for k in tower)
        if before.get("phase") == "clip" and same:
            keep = ("until", "lr", "tower_lr_scale", "clip_batch", "clip_lr_scale", "seed")
            return {"contrastive": True, "in": str(src), "step": before["step"],
                    "train_seconds": round(before["train_seconds"], 1),
                    "args": {k: (before.get("args") or {}).get(k) for k in keep}}
    return {"contrastive": False}


def export(ckpt_dir: Path, dest: Path) -> None:
    """Write a checkpoint as a from_pretrained-loadable model + processor (`parts.export`, the v2 vocabulary),
    recording `"world": "v2"` and the tower's contrastive pretraining (`tower_record`) in training_state.json."""
    # "world" tells the app and the likeness script which pictures the model knows (worlds.world_of_model).
    ckpt = torch.load(Path(ckpt_dir) / "checkpoint.pt", map_location="cpu", weights_only=False)
    train_export(ckpt_dir, dest, tokenizer=v2_tokenizer(), state_keys=("phase",),
                 extra={"world": "v2", "tower": tower_record(ckpt)})


def parser() -> argparse.ArgumentParser:
    """The command line; tests build their arguments through it, so a new flag has its default everywhere."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("text", "vision", "align", "instruct", "clip"), default="text")
    p.add_argument("--out", required=True, help="checkpoint + log folder (resumed from)")
    p.add_argument("--export", default=None, help="export the checkpoint in --out to this folder and exit")
    p.add_argument("--init-from", default=None,
                   help="an earlier phase's checkpoint.pt, or an exported model folder (when --out has none)")
    p.add_argument("--vision-from", default=str(SHIPPED),
                   help="first phase only: take the vision tower from this exported model ('' for a fresh one)")
    p.add_argument("--grow", action="store_true", help="with --init-from: grow the decoder to --layers")
    p.add_argument("--until", type=int, required=False, default=1000, help="train until this step (resumable)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--turns", type=int, default=8, help="question/answer turns per conversation")
    p.add_argument("--caption-p", type=float, default=0.3, help="share of conversations with a caption turn")
    p.add_argument("--whole-p", type=float, default=0.0,
                   help="instruct: share of the question turns that are whole-picture turns (wide.py: how many "
                        "objects, what / whether anything is in a part of the picture)")
    p.add_argument("--fused-p", type=float, default=0.5,
                   help="text phase: share of conversations whose scene is given as pooled words (context_fused)")
    p.add_argument("--fused-spread", type=int, default=4,
                   help="text phase: positions each pooled item is repeated at (over the patches it covers)")
    p.add_argument("--lm-weight", type=float, default=0.1,
                   help="loss weight of the non-answer text tokens (language modelling); answers weigh 1")
    p.add_argument("--running-scenes", type=int, default=0,
                   help="text phase: every sequence a running-text document of this many scenes at consecutive "
                        "positions (0: the scene's words at its patches' positions); with --text-docs, the scenes "
                        "per document (0: 4)")
    p.add_argument("--running-turns", type=int, default=3, help="questions per scene in a running-text document")
    p.add_argument("--text-docs", type=int, default=0,
                   help="instruct: running-text documents per step beside the pictures (LLaVA-1.5's mix has "
                        "text-only conversations)")
    p.add_argument("--text-lm-weight", type=float, default=1.0,
                   help="weight of the non-answer tokens of --text-docs documents")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-end", type=float, default=3e-5)
    p.add_argument("--decay-from", type=int, default=None, help="decay lr linearly from this step to --until")
    p.add_argument("--projector-lr-scale", type=float, default=1.0)
    p.add_argument("--tower-lr-scale", type=float, default=0.0,
                   help="instruct: train the vision tower too, at this share of --lr (0: frozen, as LLaVA-1.5)")
    p.add_argument("--patch-weight", type=float, default=0.0,
                   help="instruct: the vision phase's per-patch heads on the tower as an auxiliary loss (0: off)")
    p.add_argument("--patch-heads-from", default=None,
                   help="with --patch-weight: start the per-patch heads from this checkpoint's instead of fresh ones")
    p.add_argument("--label-fonts", action="store_true",
                   help="letter training labels in varied typefaces (world.vary_label); held-out pictures are not")
    p.add_argument("--stroke-labels", type=float, default=0.0,
                   help="with --label-fonts: this share of the varied labels lettered in the project's own stroke "
                        "hand (strokes.py) instead of an outline font")
    p.add_argument("--tinted-backgrounds", type=float, default=0.0,
                   help="this share of the training scenes on a hued background (world.vary_background): pastel "
                        "when light, deep when dark; held-out pictures are not")
    p.add_argument("--clip-weight", type=float, default=0.0,
                   help="CLIP's contrastive loss on the tower's pooled [CLS] vs a text encoder (clip_tower.py)")
    p.add_argument("--clip-batch", type=int, default=48, help="pictures per contrastive batch")
    p.add_argument("--clip-lr-scale", type=float, default=1.0, help="the contrastive head's rate / --lr")
    p.add_argument("--clip-head-from", default=None,
                   help="with --clip-weight: start the contrastive head (text encoder, projection, temperature) from "
                        "this checkpoint's, e.g. the --phase clip run the tower came from, instead of a fresh one")
    p.add_argument("--grown-lr-scale", type=float, default=1.0,
                   help="instruct: the decoder layers block expansion added (all but "
                        "parts.grown_positions(--grown-from, depth)) learn at this share of --lr; LLaMA Pro trains "
                        "only its added blocks")
    p.add_argument("--grown-from", type=int, default=8, help="decoder layers before block expansion")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--grid-weight", type=float, default=0.5, help="grid heads on the projector output (0: off)")
    p.add_argument("--referent-weight", type=float, default=0.0,
                   help="text / instruct: weight of the referent probe (what the question names, at the answer "
                   "position; 0: off)")
    p.add_argument("--where-weight", type=float, default=0.0,
                   help="instruct: where head (the named objects' cells at position / relation answers; 0: off)")
    p.add_argument("--where-layer", type=int, default=3, help="decoder layer the where head reads")
    p.add_argument("--order-weight", type=float, default=0.0,
                   help="instruct: order head (first named object before / after / neither the second, along x "
                        "and y, at relation answers; 0: off)")
    p.add_argument("--order-layer", type=int, default=5, help="decoder layer the order head reads")
    p.add_argument("--referent-layer", type=int, default=1, help="decoder layer the referent probe reads")
    p.add_argument("--family-weights", default="", help="e.g. count=2,relation=2")
    p.add_argument("--reinit-words", default="",
                   help="comma-separated words whose embedding and LM-head rows start anew (a new phase only)")
    p.add_argument("--curriculum-start", type=int, default=12, help="most objects in a scene at step 0")
    p.add_argument("--curriculum-every", type=int, default=100, help="steps per extra object")
    p.add_argument("--background-keep-start", type=float, default=1.0,
                   help="share of pure-background visual tokens the decoder sees at step 0 (ramps to 1)")
    p.add_argument("--background-full-at", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is lent")
    p.add_argument("--workers", type=int, default=0, help="processes drawing batches ahead (0: none)")
    p.add_argument("--minutes", type=float, default=0.0, help="stop (and save) after this many minutes (0: no limit)")
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--probe-text", type=int, default=0,
                   help="print probe_text of the checkpoint in --out on this many conversations per setting and exit")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.probe_text:
        torch.set_num_threads(args.threads)
        st = torch.load(Path(args.out) / "checkpoint.pt", map_location="cpu", weights_only=False)
        tokenizer = v2_tokenizer()
        model = build_model(ModelSize(**st["size"]), tokenizer)
        model.load_state_dict(st["model"])
        model.eval()
        conv = Conversations(tokenizer)
        for fused, objects in ((0, 2), (0, 12), (args.fused_spread, 2), (args.fused_spread, 12)):
            res = probe_text(model, conv, args.probe_text, objects, fused)
            print(json.dumps({"step": st["step"], "context": "pooled" if fused else "words",
                              "max_objects": objects, "n": args.probe_text, **res}), flush=True)
    elif args.export:
        export(Path(args.out), Path(args.export))
    elif math.isfinite(args.until):
        train(args)


if __name__ == "__main__":
    main()
