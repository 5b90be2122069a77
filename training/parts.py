"""Train scenes-llava from scratch on generated scenes; resumable, seeded, logs curves to JSONL.

    python -m training.parts --out DIR [options]      # train (resumes from DIR/checkpoint.pt)
    python -m training.parts --out DIR --export assets/models/scenes-llava

The shipped model's recipe, phase by phase (each phase starts from the last one's checkpoint.pt with --init-from;
exact commands in the model card, assets/models/scenes-llava/README.md):

1. vision tower on per-patch heads alone (--vision-only);
2. an 8-layer decoder on the frozen tower (--reinit-decoder --layers 8 --freeze-vision --referent-weight 1
   --mastery 0.9), pure-background visual tokens dropped early (--background-keep-start / --background-full-at);
3. the same decoder continued with the where and grid heads (--where-weight 1 --grid-weight 0.5), weighted
   toward position and relation questions;
4. grown to 32 layers by block expansion and fine-tuned on full pictures (--grow --layers 32).

Each sequence holds one picture and many question/answer turns (the LLaVA multi-turn chat format); the loss is
on answer tokens (and the end-of-turn token) only, so each picture's 576 visual tokens pay for many answers.
The data stream is a pure function of (seed, step), so a resumed run sees the same data an uninterrupted run
would (the mastery curriculum's level is saved in the checkpoint).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsevlm.config import REFERENCE_PRUNE_LAYERS_32
from sparsevlm.scenes.generator import (
    COLOURS,
    FAMILIES,
    GRID,
    LABEL_CHARS,
    MAX_OBJECTS,
    PLURALS,
    SHAPES,
    covered_patches,
    heldout_set,
    patch_targets,
    render,
    training_scene,
)
from sparsevlm.schedule import scaled_layers

from .model import (
    ModelSize,
    build_model,
    build_processor,
    pixel_values,
    scenes_tokenizer,
)

N_VISUAL = GRID * GRID


def max_objects_at(step: int, start: int, every: int) -> int:
    """Curriculum: the largest object count of a training scene at `step`."""
    return min(MAX_OBJECTS, start + step // every)


class Batcher:
    """Builds multi-turn training batches: input ids, labels (answers only) and the family of each label."""

    def __init__(self, tokenizer, n_turns: int):
        self.tok = tokenizer
        self.n_turns = n_turns
        self.image_id = tokenizer.convert_tokens_to_ids("<image>")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id

    @functools.lru_cache(maxsize=100_000)  # noqa: B019 - one Batcher per process
    def _ids(self, text: str) -> tuple[int, ...]:
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def sequence(self, samples) -> tuple[list[int], list[int], list[int]]:
        ids, labels, fams, _ = self.sequence_with_refs(samples)
        return ids, labels, fams

    def sequence_with_refs(self, samples):
        """(ids, labels, families, refs): refs[i] is the question's referent words (see `referent_vector`) at
        the position that predicts an answer word, None elsewhere."""
        ids: list[int] = []
        labels: list[int] = []
        fams: list[int] = []
        refs: list = []
        for t, s in enumerate(samples):
            if t == 0:
                head = self._ids("USER:") + (self.image_id,) * N_VISUAL + self._ids(f"{s.question} ASSISTANT:")
            else:
                head = self._ids(f"USER: {s.question} ASSISTANT:")
            ans = self._ids(s.answer) + (self.eos,)
            ids += [*head, *ans]
            labels += [-100] * len(head) + list(ans)
            fams += [-1] * len(head) + [FAMILIES.index(s.family)] * len(ans)
            refs += [None] * (len(head) - 1) + [referent_vector(s.question)] + [None] * len(ans)
        return ids, labels, fams, refs

    def batch(self, seeds: list[int], max_objects: int, weights: dict[str, float], background_keep: float = 1.0):
        """Tensors for one step. `keep` marks the visual tokens the decoder sees: every token an object or the
        label touches, and a random `background_keep` share of the pure-background ones (see `decoder_logits`)."""
        images, seqs, targets, keeps, wheres = [], [], [], [], []
        for seed in seeds:
            scene, samples = training_scene(seed, self.n_turns, max_objects, weights)
            while not samples:  # no question of the asked families fits this scene: another one (below held-out)
                seed = (seed * 31 + 17) % 9_000_000
                scene, samples = training_scene(seed, self.n_turns, max_objects, weights)
            images.append(render(scene))
            seqs.append(self.sequence_with_refs(samples))
            wheres.append([where_targets(scene, smp) for smp in samples])
            targets.append(torch.from_numpy(patch_targets(scene)))
            keep = torch.ones(N_VISUAL, dtype=torch.bool)
            if background_keep < 1.0:
                items = list(range(len(scene.objects))) + ([-1] if scene.label is not None else [])
                fg = torch.zeros(N_VISUAL, dtype=torch.bool)
                fg[covered_patches(scene, items)] = True
                rng = torch.Generator().manual_seed(seed)
                keep = fg | (torch.rand(N_VISUAL, generator=rng) < background_keep)
            keeps.append(keep)
        length = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad, dtype=torch.long)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        fams = torch.full((len(seqs), length), -1, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        refs = torch.zeros((len(seqs), length, len(REFERENT_WORDS)))
        ref_mask = torch.zeros((len(seqs), length), dtype=torch.bool)
        where = torch.full((len(seqs), length, 4), -100, dtype=torch.long)
        for b, (i, lab, f, r) in enumerate(seqs):
            ids[b, : len(i)] = torch.tensor(i)
            labels[b, : len(i)] = torch.tensor(lab)
            fams[b, : len(i)] = torch.tensor(f)
            mask[b, : len(i)] = 1
            answer_at = [t for t, vec in enumerate(r) if vec is not None]  # one per turn, in turn order
            for t, w in zip(answer_at, wheres[b], strict=True):
                refs[b, t] = torch.tensor(r[t])
                ref_mask[b, t] = True
                where[b, t] = torch.tensor(w)
        self.last_refs = (refs, ref_mask)  # read by train(); kept out of the return value the tests unpack
        self.last_where = where
        return ids, mask, pixel_values(images), labels, fams, torch.stack(targets), torch.stack(keeps)


REFERENT_WORDS = (*COLOURS, *SHAPES, *PLURALS.values(), "small", "big")


def referent_vector(question: str) -> list[float]:
    """Which colour / shape / size words the question names (multi-hot over REFERENT_WORDS); read from the
    question's text alone."""
    words = set(question.split())
    return [1.0 if w in words else 0.0 for w in REFERENT_WORDS]


def where_targets(scene, sample) -> list[int]:
    """Slot (row, column) of the objects a position or relation question names, in the order it names them:
    [row_a, col_a, row_b, col_b], -100 where there is none (other families; b for position questions).
    Objects are found by name ("red circle"): a scene's (colour, shape) pairs are distinct."""
    out = [-100] * 4
    if sample.family not in ("position", "relation"):
        return out
    named = sorted(
        (sample.question.index(f" {o.name} "), o) for o in scene.objects if f" {o.name} " in sample.question
    )
    for k, (_, o) in enumerate(named[:2]):
        out[2 * k : 2 * k + 2] = [o.slot_row, o.slot_col]
    return out


class DecoderProbe(torch.nn.Module):
    """A linear head on the output of decoder layer `layer`, read at chosen positions of the full sequences
    (training only; dropped at export)."""

    def __init__(self, model, hidden: int, layer: int, outputs: int):
        super().__init__()
        self.head = torch.nn.Linear(hidden, outputs)
        self.hidden = None
        model.model.language_model.layers[layer].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.hidden = output[0] if isinstance(output, tuple) else output

    def read(self, b: torch.Tensor, t: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        """Head outputs at full-sequence positions (b, t); `rows` (from `kept_rows`) says where each full position
        sits in the shortened sequences the decoder saw."""
        hidden, self.hidden = self.hidden, None
        short = torch.stack([torch.searchsorted(rows[i], j) for i, j in zip(b.tolist(), t)]) if len(b) else t
        return self.head(hidden[b, short])


class WhereHead(DecoderProbe):
    """Auxiliary training head on the decoder: at the position that predicts the answer to a position or
    relation question, the hidden state after decoder layer `layer` must say the slot row and column (of the
    6x6 layout) of the object(s) the question names.

    Why: both families need the decoder to fetch where a named object is and carry it to the answer position;
    the answer alone (three words, or yes/no) is a weak signal for that. Measured: after 3335 steps of the
    recipe without it, position stood at 61% and relation at 52% (chance) held-out, while the look-up of colour
    and shape, which needs the same attention, was at 99%. With it (and `GridHeads`), both reached 100% on 700
    held-out questions at 8 layers. Like the referent head it reads nothing about patches or attention weights:
    its targets are the named objects' slots. Dropped at export.
    """

    def __init__(self, model, hidden: int, layer: int, slots: int = 6, targets: int = 4):
        super().__init__(model, hidden, layer, targets * slots)
        self.slots, self.targets = slots, targets

    def loss(self, where: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        """`where` [batch, full length, targets] indexes the full sequences (see `where_targets`); -100 where
        there is no target."""
        b, t = (where[..., 0] != -100).nonzero(as_tuple=True)
        logits = self.read(b, t, rows).reshape(-1, self.targets, self.slots)
        if not len(b):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.flatten(0, 1), where[b, t].flatten(), ignore_index=-100)


class ReferentHead(DecoderProbe):
    """Auxiliary training head on the decoder: at the position that predicts an answer, the hidden state after
    decoder layer `layer` must say which colour, shape and size words the question named.

    Why: answering "what colour is the circle?" needs two steps the decoder must discover together - carry
    "circle" to the answer position, then attend from there to the circle's patches. Neither helps the loss
    before the other exists, and the decoder sat on the answer prior for hundreds of steps (measured: colour
    with two objects stuck at 0.75 = right on one-object scenes, a coin flip on two-object ones). This head
    teaches the first step from the question text alone. It never sees the picture, the evidence patches or
    any attention weights, so it favours no pruning method. Dropped at export.
    """

    def __init__(self, model, hidden: int, layer: int):
        super().__init__(model, hidden, layer, len(REFERENT_WORDS))

    def loss(self, refs: torch.Tensor, ref_mask: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        """`refs`/`ref_mask` index the full sequences."""
        b, t = ref_mask.nonzero(as_tuple=True)
        return F.binary_cross_entropy_with_logits(self.read(b, t, rows), refs[b, t])


class PatchHeads(torch.nn.Module):
    """Auxiliary training heads on the vision features LLaVA reads (penultimate CLIP layer, [CLS] dropped).

    They classify each patch's colour, shape, label character, whether it is an object's centre, and its grid row
    and column (position and relation questions need where a patch is, and nothing else asks the tower to keep
    its position embedding legible). The labels
    are free (the generator knows every pixel) and give the vision tower 576 targets per picture instead of a
    few answers, so it finds the visual signal early. They are dropped at export: the shipped model is a plain
    LlavaForConditionalGeneration.
    """

    sizes = (len(COLOURS) + 2, len(SHAPES) + 2, len(LABEL_CHARS) + 1, 2, GRID, GRID)
    named = ("colour", "shape", "char")  # the heads whose class 0 is background

    def __init__(self, model, vision_hidden: int, balanced: bool = False):
        """`balanced`: the colour, shape and character heads average their background and their foreground
        patches separately (half each). Plain per-patch cross-entropy (v1, balanced=False) lets the ~500
        background patches drown the few object and label patches: on v2's small objects and small card a tower
        trained that way knew every patch's colour but its shape only 32% and the label character 8% of the time."""
        super().__init__()
        self.balanced = balanced
        self.heads = torch.nn.ModuleList(torch.nn.Linear(vision_hidden, n) for n in self.sizes)
        self.features = None
        layer = model.model.vision_tower.encoder.layers[model.config.vision_feature_layer]
        layer.register_forward_hook(self._keep)
        self.register_buffer("centre_weight", torch.tensor([1.0, 5.0]))

    def _keep(self, module, inputs, output):
        self.features = output[0] if isinstance(output, tuple) else output

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        feats = self.features[:, 1:]  # drop [CLS], as the "default" strategy does
        cell = torch.arange(feats.shape[1], device=feats.device)
        where = torch.stack([cell // GRID, cell % GRID]).expand(feats.shape[0], 2, -1)
        targets = torch.cat([targets, where], dim=1)
        losses = []
        for k, head in enumerate(self.heads):
            w = self.centre_weight if k == 3 else None
            logits, target = head(feats).flatten(0, 1), targets[:, k].flatten()
            if self.balanced and k < len(self.named):
                each = F.cross_entropy(logits, target, reduction="none")
                fg = target > 0
                parts = [each[m].mean() for m in (fg, ~fg) if m.any()]
                losses.append(torch.stack(parts).mean())
            else:
                losses.append(F.cross_entropy(logits, target, weight=w))
        self.features = None
        return torch.stack(losses).mean()

    @torch.no_grad()
    def foreground_accuracy(self, targets: torch.Tensor) -> dict[str, float]:
        """Per head, the share of object / label patches given their true class (what the decoder will need;
        background patches are excluded, they are most of the picture and easy)."""
        feats = self.features[:, 1:]
        out = {}
        for k, name in enumerate(self.named):
            fg = targets[:, k] > 0
            if fg.any():
                out[name] = round(float((self.heads[k](feats).argmax(-1)[fg] == targets[:, k][fg]).float().mean()), 4)
        return out


class GridHeads(torch.nn.Module):
    """Auxiliary training heads on the projector's output (the visual tokens the decoder reads): each token's
    grid row and column.

    Why: the vision tower's features say where a patch is (its row/column heads read 99.5% on object patches),
    but the projector, trained on questions that for thousands of steps needed only colour and shape, lost it
    (a linear probe on its output read row and column on object patches at 51% / 50%, measured on the
    85.8% model). The decoder could still recover the row from RoPE (the row is the coarse part of a visual
    token's position) but not the column: row questions were right 94% of the time, column questions 28%
    (it answered "right" for every column). These heads keep the grid position legible in what the decoder
    reads. Their targets are the tokens' own grid cells. Dropped at export.
    """

    def __init__(self, model, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, GRID) for _ in range(2))
        self.features = None
        model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.features = output

    def loss(self) -> torch.Tensor:
        feats, self.features = self.features, None
        cell = torch.arange(feats.shape[1], device=feats.device)
        losses = [
            F.cross_entropy(head(feats).flatten(0, 1), target.repeat(feats.shape[0]))
            for head, target in zip(self.heads, (cell // GRID, cell % GRID), strict=True)
        ]
        return torch.stack(losses).mean()


def kept_rows(ids: torch.Tensor, keep: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per sequence, the positions the decoder sees: every text token and the visual tokens `keep` marks."""
    image = ids == image_token_id
    take = ~image
    take[image] = keep.reshape(-1)
    return [torch.nonzero(t).squeeze(1) for t in take]


def decoder_logits(model, ids, pixels, keep, labels, fams, pad: int):
    """LLaVA's forward with only the visual tokens marked in `keep` [batch, 576] fed to the decoder.

    The vision tower and projector see the whole picture, exactly as in `LlavaForConditionalGeneration`; the
    decoder gets the text tokens and the kept visual tokens at their ORIGINAL positions (RoPE position ids), so
    a model trained this way runs unchanged on full sequences. With `keep` all true it is the plain forward
    (tested). Training drops pure-background tokens early on: the decoder then finds the objects among far
    fewer distractors, and a step costs a fraction of a full one; the share kept grows to all of them.
    Returns logits and the labels/families of the shortened sequences.
    """
    cfg = model.config
    image = ids == cfg.image_token_id
    embeds = model.get_input_embeddings()(ids)
    feats = model.model.get_image_features(
        pixel_values=pixels,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    ).pooler_output
    embeds = embeds.masked_scatter(image[..., None], torch.stack(list(feats)).to(embeds.dtype))
    rows = kept_rows(ids, keep, cfg.image_token_id)
    length = max(len(r) for r in rows)
    batch = len(rows)
    e = embeds.new_zeros((batch, length, embeds.shape[-1]))
    e[:] = model.get_input_embeddings().weight[pad]
    pos = torch.arange(length, device=ids.device).repeat(batch, 1)
    lab = torch.full((batch, length), -100, dtype=labels.dtype, device=ids.device)
    fam = torch.full((batch, length), -1, dtype=fams.dtype, device=ids.device)
    for b, r in enumerate(rows):
        n = len(r)
        e[b, :n] = embeds[b, r]
        pos[b, :n] = r
        pos[b, n:] = r[-1] + 1 + torch.arange(length - n, device=ids.device)
        lab[b, :n] = labels[b, r]
        fam[b, :n] = fams[b, r]
    hidden = model.model.language_model(inputs_embeds=e, position_ids=pos).last_hidden_state
    return model.lm_head(hidden), lab, fam


def answer_loss(model, ids, mask, pixels, labels, fams, eos: int, keep=None, pad: int = 0):
    """Mean cross-entropy over answer tokens, plus per-family (correct, total) of the answer words."""
    # Right padding + causal attention: real tokens never see the pads, so no mask is needed, and without one
    # SDPA takes its fused causal kernel (about twice as fast here as the masked path).
    del mask
    if keep is None:
        keep = torch.ones((ids.shape[0], N_VISUAL), dtype=torch.bool)
    logits, labels, fams = decoder_logits(model, ids, pixels, keep, labels, fams, pad)
    logits, labels, fams = logits[:, :-1], labels[:, 1:], fams[:, 1:]
    sel = labels != -100
    loss = F.cross_entropy(logits[sel].float(), labels[sel])
    pred = logits.argmax(-1)
    stats = {}
    with torch.no_grad():
        for k, fam in enumerate(FAMILIES):
            m = sel & (fams == k) & (labels != eos)
            if m.any():
                stats[fam] = (int((pred[m] == labels[m]).sum()), int(m.sum()))
    return loss, stats


@torch.no_grad()
def heldout_accuracy(model, batcher: Batcher, data, batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced exact match of the whole answer (word + end token) on single-turn held-out questions."""
    model.eval()
    correct = {f: 0 for f in FAMILIES}
    total = {f: 0 for f in FAMILIES}
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        seqs = [batcher.sequence([s]) for _, s in chunk]
        length = max(len(s[0]) for s in seqs)
        ids = torch.full((len(seqs), length), batcher.pad, dtype=torch.long)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for b, (i, lab, _) in enumerate(seqs):
            ids[b, : len(i)] = torch.tensor(i)
            labels[b, : len(i)] = torch.tensor(lab)
            mask[b, : len(i)] = 1
        logits = model(input_ids=ids, pixel_values=pixel_values([im for im, _ in chunk])).logits  # right-padded
        pred = logits[:, :-1].argmax(-1)
        lab = labels[:, 1:]
        ok = ((pred == lab) | (lab == -100)).all(dim=1)
        for b, (_, s) in enumerate(chunk):
            correct[s.family] += int(ok[b])
            total[s.family] += 1
    model.train()
    acc = {f: correct[f] / total[f] for f in FAMILIES if total[f]}
    acc["overall"] = sum(correct.values()) / max(1, sum(total.values()))
    return acc


def export(ckpt_dir: Path, dest: Path, tokenizer=None, state_keys: tuple[str, ...] = (),
           extra: dict | None = None) -> None:
    """Write the checkpoint as a from_pretrained-loadable model + processor (safetensors) at `dest`.

    `tokenizer`: the vocabulary the checkpoint was trained with (default: the v1 scenes tokenizer);
    `state_keys`: checkpoint entries recorded in training_state.json beside step, time, arguments and size;
    `extra`: further entries for training_state.json (v2 records its "world"; v1 writes none, absent means v1)."""
    state = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    tokenizer = tokenizer or scenes_tokenizer()
    model = build_model(ModelSize(**state["size"]), tokenizer)
    model.load_state_dict(state["model"])
    model.eval()
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    build_processor(tokenizer).save_pretrained(dest)
    if (ckpt_dir / "log.jsonl").exists():
        shutil.copy(ckpt_dir / "log.jsonl", dest / "training_log.jsonl")
    info = {k: state[k] for k in ("step", "train_seconds", "args", "size", *state_keys)}
    info["prior_seconds"] = state.get("prior_seconds", 0.0)
    info.update(extra or {})
    (dest / "training_state.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"exported step {state['step']} to {dest}")


def initial_state(path: Path) -> dict:
    """Weights a new run starts from: an exported model folder or an earlier run's checkpoint.pt.

    The new run's step counter, curriculum and optimizer start afresh (a checkpoint's aux heads are kept); the
    earlier training time is carried in `prior_seconds` so the model card can state the total.
    """
    if path.is_file():
        st = torch.load(path, map_location="cpu", weights_only=False)
        return {"model": st["model"], "aux": st.get("aux"), "size": st["size"],
                "heads": {k: st.get(k) for k in ("referent_head", "where_head", "grid_heads")},
                "prior_seconds": st["train_seconds"] + st.get("prior_seconds", 0.0)}
    from transformers import LlavaForConditionalGeneration

    info = json.loads((path / "training_state.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(str(path), local_files_only=True)
    return {"model": model.state_dict(), "aux": None, "size": info["size"],
            "prior_seconds": info["train_seconds"] + info.get("prior_seconds", 0.0)}


def grown_positions(layers: int, new_layers: int) -> list[int]:
    """Where the trained layers go in the deeper decoder: spread out, and on the layers the pruning methods read
    (the scaled SparseVLM layers and FastV's), so their attention is trained attention."""
    must = sorted(set(scaled_layers(REFERENCE_PRUNE_LAYERS_32, new_layers)) | set(scaled_layers((2,), new_layers)))
    if layers < len(set(must) | {0}):
        raise ValueError(f"{layers} trained layers cannot cover the pruning layers {must} and layer 0")
    spread = [round(i * (new_layers - 1) / (layers - 1)) for i in range(layers)]
    for m in must:  # move the nearest evenly spread position (never layer 0) onto each pruning layer
        if m in spread:
            continue
        free = [i for i, p in enumerate(spread) if p != 0 and p not in must]
        spread[min(free, key=lambda i: abs(spread[i] - m))] = m
    return sorted(spread)


def grow_decoder(state: dict, layers: int, new_layers: int, fresh: dict) -> dict:
    """Block expansion (as in LLaMA Pro, Wu et al. 2024): a `new_layers`-deep decoder from a `layers`-deep one.

    The trained layers keep their weights at `grown_positions`; every other layer comes from `fresh` (a newly
    initialised model's state) with its residual-branch outputs (o_proj, down_proj) set to zero, so it adds
    nothing: the grown model computes exactly what the shallow one did (tested), and fine-tuning then puts the
    new layers to work. Stacking copies instead (each layer repeated, outputs scaled down) was tried and
    measured at 22% held-out right after growing, against 58% for the 8-layer model it came from.
    """
    if new_layers < layers:
        raise ValueError(f"cannot grow {layers} decoder layers to {new_layers}")
    positions = grown_positions(layers, new_layers)
    prefix = "model.language_model.layers."
    out = {key: v for key, v in state.items() if not key.startswith(prefix)}
    source = {p: i for i, p in enumerate(positions)}
    for key, v in fresh.items():
        if not key.startswith(prefix):
            continue
        j, rest = key[len(prefix):].split(".", 1)
        j = int(j)
        if j >= new_layers:
            continue
        if j in source:
            out[key] = state[f"{prefix}{source[j]}.{rest}"].clone()
        elif rest in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            out[key] = torch.zeros_like(v)
        else:
            out[key] = v.clone()
    return out


def learning_rate(step: int, lr: float, warmup: int, start: int = 0, steps: int = 0, end: float | None = None):
    """Linear warm-up over the first `warmup` steps; with `end`, then a linear decay to `end` over the `steps`
    steps this invocation runs from `start` (a resumed invocation decays over its own steps)."""
    rate = lr * min(1.0, (step + 1) / warmup)
    if end is not None:
        rate += (end - rate) * (step - start) / max(1, steps - 1)
    return rate


def background_keep_at(step: int, start: float, full_at: int) -> float:
    """Share of pure-background visual tokens the decoder sees at `step`: grows linearly to 1 at `full_at`."""
    if full_at <= 0 or start >= 1.0:
        return 1.0
    return min(1.0, start + (1.0 - start) * step / full_at)


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    tokenizer = scenes_tokenizer()
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path.exists() else None
    init = None
    if state is None and args.init_from:
        init = initial_state(Path(args.init_from))
    given = state or init
    if init and args.reinit_decoder:  # a fresh decoder may have another depth than the weights it starts from
        init["size"] = {**init["size"], "layers": args.layers}
        init["model"] = {k: v for k, v in init["model"].items() if "language_model.layers." not in k}
    elif init and args.grow:
        grown_size = ModelSize(**{**init["size"], "layers": args.layers})
        fresh = build_model(grown_size, tokenizer, seed=args.seed + 1).state_dict()
        init["model"] = grow_decoder(init["model"], init["size"]["layers"], args.layers, fresh)
        print(f"grown from {init['size']['layers']} decoder layers, kept at "
              f"{grown_positions(init['size']['layers'], args.layers)}")
        init["size"] = grown_size.to_dict()
    size = ModelSize(**given["size"]) if given else ModelSize(
        vision_hidden=args.vision_hidden,
        vision_layers=args.vision_layers,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
    )
    model = build_model(size, tokenizer, seed=args.seed)
    model.train()
    if args.freeze_vision:
        # As LLaVA-1.5 does (its CLIP stays frozen in both stages): the tower keeps what it learned (here with
        # the per-patch heads) and a step skips its backward pass, which at 576 patches is most of a step's cost
        # once background tokens are dropped from the decoder.
        model.model.vision_tower.requires_grad_(False)
    aux = PatchHeads(model, size.vision_hidden)
    ref_head = ReferentHead(model, size.hidden, args.referent_layer) if args.referent_weight > 0 else None
    where_head = WhereHead(model, size.hidden, args.where_layer) if args.where_weight > 0 else None
    grid_heads = GridHeads(model, size.hidden) if args.grid_weight > 0 else None
    projector = [p for n, p in model.named_parameters() if "multi_modal_projector" in n]
    others = [p for n, p in model.named_parameters() if "multi_modal_projector" not in n]
    others += list(aux.parameters())
    if ref_head is not None:
        others += list(ref_head.parameters())
    if where_head is not None:
        others += list(where_head.parameters())
    if grid_heads is not None:
        others += list(grid_heads.parameters())
    opt = torch.optim.AdamW(
        [{"params": others, "lr_scale": 1.0}, {"params": projector, "lr_scale": args.projector_lr_scale}],
        lr=args.lr,
        betas=(0.9, 0.98),
        weight_decay=0.01,
    )
    step, train_seconds, prior_seconds = 0, 0.0, 0.0
    max_obj, level_start = args.curriculum_start, 0  # the mastery curriculum's level and when it began
    if state:
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"], strict=False)
        if ref_head is not None and state.get("referent_head") is not None:
            ref_head.load_state_dict(state["referent_head"])
        if where_head is not None and state.get("where_head") is not None:
            where_head.load_state_dict(state["where_head"])
        if grid_heads is not None and state.get("grid_heads") is not None:
            grid_heads.load_state_dict(state["grid_heads"])
        opt.load_state_dict(state["optim"])
        step, train_seconds = state["step"], state["train_seconds"]
        prior_seconds = state.get("prior_seconds", 0.0)
        max_obj, level_start = state.get("curriculum", (max_obj, level_start))
        print(f"resumed from step {step} ({train_seconds / 60:.1f} min trained) from {ckpt_path}")
    elif init:
        # With --reinit-decoder the decoder layers keep build_model's fresh init (vision tower, projector,
        # embeddings and head come from the given weights).
        model.load_state_dict(init["model"], strict=not args.reinit_decoder)
        if init["aux"] is not None:
            aux.load_state_dict(init["aux"], strict=False)  # heads added since start fresh
        # The decoder heads carry over too (with --grow, point --referent-layer / --where-layer at the layers
        # their old ones went to: grown_positions).
        for head, key in ((ref_head, "referent_head"), (where_head, "where_head"), (grid_heads, "grid_heads")):
            if head is not None and init.get("heads", {}).get(key) is not None:
                head.load_state_dict(init["heads"][key])
        prior_seconds = init["prior_seconds"]
        if args.reinit_decoder:
            print(f"decoder: {size.layers} fresh layers")
        print(f"starting from the weights in {args.init_from} ({prior_seconds / 60:.1f} min trained before)")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, size {size.to_dict()}")
    batcher = Batcher(tokenizer, args.turns)
    all_weights = {f: 1.0 for f in FAMILIES}
    all_weights.update({"count": 1.5, "relation": 1.5, "read": 2.0})
    for item in filter(None, args.family_weights.split(",")):
        name, value = item.split("=")
        if name not in all_weights:
            raise SystemExit(f"--family-weights: unknown family {name!r} (families: {', '.join(FAMILIES)})")
        all_weights[name] = float(value)
    # The first --early-steps ask only the families that are a plain look-up (find the object, read one
    # attribute): with every family from the start the decoder settles on each family's answer prior and the
    # look-up is slow to appear (measured: colour stayed at chance for 400 steps); alone it forms in ~60 steps.
    early = set(args.early_families.split(",")) if args.early_families else set(FAMILIES)
    early_weights = {f: w for f, w in all_weights.items() if f in early}
    heldout = heldout_set(args.heldout_n) if args.heldout_every else []
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 - open for the whole run
    last_ckpt = time.time()
    window = {"loss": 0.0, "aux": 0.0, "ref": 0.0, "where": 0.0, "grid": 0.0, "n": 0, "stats": {}, "t": 0.0}

    def save() -> None:
        tmp = out / "checkpoint.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "aux": aux.state_dict(),
                "referent_head": ref_head.state_dict() if ref_head is not None else None,
                "where_head": where_head.state_dict() if where_head is not None else None,
                "grid_heads": grid_heads.state_dict() if grid_heads is not None else None,
                "optim": opt.state_dict(),
                "step": step,
                "train_seconds": train_seconds,
                "prior_seconds": prior_seconds,
                "curriculum": (max_obj, level_start),
                "size": size.to_dict(),
                "args": vars(args),
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # finish the step, save, exit

    start_step = step
    end_step = step + args.steps if args.steps else math.inf
    if args.lr_end is not None and not args.steps:
        raise SystemExit("--lr-end needs --steps (the decay runs over this invocation's steps)")
    while step < end_step and not stop:
        t0 = time.time()
        lr = learning_rate(step, args.lr, args.warmup, start_step, args.steps, args.lr_end)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        if args.mastery is None:
            max_obj = max_objects_at(step, args.curriculum_start, args.curriculum_every)
        seeds = [args.seed * 1_000_000 + step * args.batch + b for b in range(args.batch)]
        weights = early_weights if step < args.early_steps else all_weights
        bg_keep = background_keep_at(step, args.background_keep_start, args.background_full_at)
        ids, mask, pixels, labels, fams, targets, keep = batcher.batch(seeds, max_obj, weights, bg_keep)
        if args.vision_only:  # pretrain the tower on the per-patch heads alone: no decoder, a fraction of a step
            model.model.vision_tower(pixel_values=pixels)
            loss, stats = torch.zeros(()), {}
        else:
            loss, stats = answer_loss(model, ids, mask, pixels, labels, fams, batcher.eos, keep, batcher.pad)
        aux_loss = aux.loss(targets) if not args.freeze_vision else torch.zeros(())
        ref_loss, where_loss, grid_loss = torch.zeros(()), torch.zeros(()), torch.zeros(())
        if grid_heads is not None and not args.vision_only:
            grid_loss = grid_heads.loss()
        rows = kept_rows(ids, keep, model.config.image_token_id)
        if ref_head is not None and not args.vision_only:
            ref_loss = ref_head.loss(*batcher.last_refs, rows)
        if where_head is not None and not args.vision_only:
            where_loss = where_head.loss(batcher.last_where, rows)
        opt.zero_grad(set_to_none=True)
        total = loss + args.aux_weight * aux_loss + args.referent_weight * ref_loss + args.where_weight * where_loss
        total = total + args.grid_weight * grid_loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        dt = time.time() - t0
        train_seconds += dt
        window["loss"] += float(loss.detach())
        window["aux"] += float(aux_loss.detach())
        window["ref"] += float(ref_loss.detach())
        window["where"] += float(where_loss.detach())
        window["grid"] += float(grid_loss.detach())
        window["n"] += 1
        window["t"] += dt
        for f, (c, n) in stats.items():
            a, b = window["stats"].get(f, (0, 0))
            window["stats"][f] = (a + c, b + n)
        if step % args.log_every == 0:
            rec = {
                "step": step,
                "loss": window["loss"] / window["n"],
                "aux_loss": window["aux"] / window["n"],
                "referent_loss": window["ref"] / window["n"],
                "where_loss": window["where"] / window["n"],
                "grid_loss": window["grid"] / window["n"],
                "train_acc": {f: round(c / n, 4) for f, (c, n) in window["stats"].items()},
                "s_per_step": window["t"] / window["n"],
                "lr": lr,
                "max_objects": max_obj,
                "background_keep": round(bg_keep, 3),
                "train_minutes": train_seconds / 60,
                "time": time.strftime("%H:%M:%S"),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
            if args.mastery is not None and max_obj < MAX_OBJECTS:
                # Mastery curriculum: one more object once the look-up families are answered well at this
                # level (or after --curriculum-every steps at most, so a hard level cannot stall the run).
                looked_up = [rec["train_acc"][f] for f in ("colour", "shape") if f in rec["train_acc"]]
                mastered = looked_up and min(looked_up) >= args.mastery
                if mastered or step - level_start >= args.curriculum_every:
                    max_obj, level_start = max_obj + 1, step
            window = {"loss": 0.0, "aux": 0.0, "ref": 0.0, "where": 0.0, "grid": 0.0, "n": 0, "stats": {}, "t": 0.0}
        if args.heldout_every and step % args.heldout_every == 0:
            t1 = time.time()
            acc = heldout_accuracy(model, batcher, heldout)
            rec = {"step": step, "heldout_tf": {k: round(v, 4) for k, v in acc.items()}, "n": len(heldout),
                   "eval_seconds": round(time.time() - t1, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save()
            last_ckpt = time.time()
    save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/scenes-llava", help="checkpoint + log folder (resumed from)")
    p.add_argument("--export", default=None, help="export the checkpoint in --out to this folder and exit")
    p.add_argument("--init-from", default=None,
                   help="with no checkpoint in --out, start from these weights: an exported model folder or an earlier "
                   "run's checkpoint.pt (step, curriculum and optimizer restart)")
    p.add_argument("--reinit-decoder", action="store_true",
                   help="with --init-from: keep the vision tower, projector, embeddings and head, start --layers "
                   "fresh decoder layers")
    p.add_argument("--grow", action="store_true",
                   help="with --init-from a shallower model: grow it to --layers by block expansion (see grow_decoder)")
    p.add_argument("--vision-only", action="store_true",
                   help="train only the vision tower, on the per-patch heads (a pretraining phase)")
    p.add_argument("--referent-weight", type=float, default=0.0,
                   help="weight of the decoder's referent head (which words the question names; 0: off)")
    p.add_argument("--referent-layer", type=int, default=1, help="decoder layer whose output the referent head reads")
    p.add_argument("--where-weight", type=float, default=0.0,
                   help="weight of the decoder's where head (slots of the objects a position/relation question "
                   "names; 0: off)")
    p.add_argument("--where-layer", type=int, default=3, help="decoder layer whose output the where head reads")
    p.add_argument("--grid-weight", type=float, default=0.0,
                   help="weight of the grid heads on the projector's output (each visual token's row and column; "
                   "0: off)")
    p.add_argument("--freeze-vision", action="store_true",
                   help="keep the vision tower fixed (LLaVA-1.5 freezes CLIP); the per-patch heads are then unused")
    p.add_argument("--steps", type=int, default=0, help="steps to run in this invocation (0: until stopped)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--turns", type=int, default=20, help="question/answer turns per picture")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-end", type=float, default=None,
                   help="decay the learning rate linearly to this over the --steps of this invocation")
    p.add_argument("--projector-lr-scale", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--curriculum-start", type=int, default=1)
    p.add_argument("--curriculum-every", type=int, default=40,
                   help="steps per extra object (with --mastery: the most steps spent at one object count)")
    p.add_argument("--mastery", type=float, default=None,
                   help="add an object once colour and shape training accuracy (over --log-every steps) reach this")
    p.add_argument("--family-weights", default="",
                   help="relative question frequencies, e.g. position=2.5,relation=2 (defaults: count 1.5, "
                   "relation 1.5, read 2, others 1)")
    p.add_argument("--early-families", default="colour,shape,read",
                   help="families asked during the first --early-steps (comma-separated)")
    p.add_argument("--early-steps", type=int, default=300)
    p.add_argument("--background-keep-start", type=float, default=0.05,
                   help="share of pure-background visual tokens fed to the decoder at step 0 (1: all, always)")
    p.add_argument("--background-full-at", type=int, default=1200,
                   help="step from which the decoder sees every visual token (the share grows linearly until then)")
    p.add_argument("--ckpt-minutes", type=float, default=10.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--heldout-every", type=int, default=50)
    p.add_argument("--heldout-n", type=int, default=105)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=256)
    args = p.parse_args()
    if args.export:
        export(Path(args.out), Path(args.export))
    else:
        train(args)


if __name__ == "__main__":
    main()
