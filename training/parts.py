"""Pieces of the trainer (`train_llava.py`) that are not tied to one phase: the auxiliary heads, the shortened
decoder forward, block expansion of the decoder, and the export to a plain LLaVA folder.

- `PatchHeads`: per-patch targets on the vision tower's feature layer (the tower phase and, optionally, later);
- `GridHeads`: each visual token's own row and column, read from the projector's output;
- `DecoderProbe` / `WhereHead`: linear heads on a decoder layer's output at the positions that predict answers;
- `decoder_logits`: LLaVA's forward with some pure-background visual tokens left out of the decoder (at their
  original positions), so early training sees the objects among fewer distractors;
- `grow_decoder`: block expansion (a deeper decoder that computes exactly what the shallow one did);
- `export` / `initial_state`: a checkpoint to a `from_pretrained` folder and back.

Every head reads hidden states and has targets from the scene's geometry or the question's text; none reads
attention weights or anything a pruning method scores. All are dropped at export.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsevlm.config import REFERENCE_PRUNE_LAYERS_32
from sparsevlm.scenes.world import COLOURS, GRID, LABEL_CHARS, SHAPES
from sparsevlm.schedule import scaled_layers

from .model import ModelSize, build_model, build_processor

N_VISUAL = GRID * GRID


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
    relation question, the hidden state after decoder layer `layer` must say the cell (row and column of a
    `slots` x `slots` grid over the picture) of the object(s) the question names.

    Why: both families need the decoder to fetch where a named object is and carry it to the answer position;
    the answer alone (three words, or yes/no) is a weak signal for that. Measured on an 8-layer decoder trained
    without it: position 61% and relation 52% (chance) held-out, while the look-up of colour and shape, which
    needs the same attention, was at 99%; with it (and `GridHeads`) both reached 100% on 700 held-out questions.
    It reads nothing about patches or attention weights: its targets are the named objects' cells. Dropped at
    export.
    """

    def __init__(self, model, hidden: int, layer: int, slots: int = 6, targets: int = 4):
        super().__init__(model, hidden, layer, targets * slots)
        self.slots, self.targets = slots, targets

    def loss(self, where: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
        """`where` [batch, full length, targets] indexes the full sequences (`train_llava.where_vector`); -100
        where there is no target."""
        b, t = (where[..., 0] != -100).nonzero(as_tuple=True)
        logits = self.read(b, t, rows).reshape(-1, self.targets, self.slots)
        if not len(b):
            return logits.sum() * 0.0
        return F.cross_entropy(logits.flatten(0, 1), where[b, t].flatten(), ignore_index=-100)


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
        patches separately (half each). Plain per-patch cross-entropy (balanced=False) lets the ~500
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


def export(ckpt_dir: Path, dest: Path, tokenizer, state_keys: tuple[str, ...] = (),
           extra: dict | None = None) -> None:
    """Write the checkpoint as a from_pretrained-loadable model + processor (safetensors) at `dest`.

    `tokenizer`: the vocabulary the checkpoint was trained with;
    `state_keys`: checkpoint entries recorded in training_state.json beside step, time, arguments and size;
    `extra`: further entries for training_state.json (the trainer records the model's "world")."""
    state = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
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


def reader_positions(layers: int, new_layers: int) -> list[int]:
    """Where the trained layers go so that EVERY layer a fixed-layer method reads the decoder's attention at is a
    trained one (`attention_profile.profile_layers`: FastV's K-1, SparseVLM's pruning layers, PyramidDrop's ranking
    layers), plus layer 0; the rest spread out as `grown_positions` spreads them. `grown_positions` (what the
    installed model was grown with) covers SparseVLM's layers and layer 2, which FastV does not read: its K-1 is 1."""
    from .attention_profile import profile_layers

    must = sorted(set(profile_layers(new_layers)) - {0})
    if layers < len(must) + 1:
        raise ValueError(f"{layers} trained layers cannot cover the layers the methods read {must} and layer 0")
    spread = [round(i * (new_layers - 1) / (layers - 1)) for i in range(layers)]
    for m in must:
        if m in spread:
            continue
        free = [i for i, p in enumerate(spread) if p != 0 and p not in must]
        spread[min(free, key=lambda i: abs(spread[i] - m))] = m
    return sorted(spread)


def move_trained_layers(state: dict, old: list[int], new: list[int], depth: int) -> dict:
    """A decoder whose trained layers (at `old`, in order) move to `new`, the grown layers (every other index,
    their residual outputs about a tenth of a trained layer's) filling the remaining indices in their own order.
    The trained layers still run in the same order, so the model computes nearly what it did; an instruction
    tuning phase afterwards re-aligns it."""
    if len(old) != len(new) or sorted(old) != old or sorted(new) != new:
        raise ValueError("old and new trained positions must be increasing lists of one length")
    grown_old = [i for i in range(depth) if i not in old]
    grown_new = [i for i in range(depth) if i not in new]
    source = dict(zip(new, old, strict=True)) | dict(zip(grown_new, grown_old, strict=True))
    out = dict(state)
    moved = 0
    for key in state:
        # a training state ("model.language_model.layers.N.") or a saved model's ("language_model.model.layers.N.")
        m = re.match(r"^(.*language_model\.(?:model\.)?layers\.)(\d+)\.(.*)$", key)
        if m is None:
            continue
        out[key] = state[f"{m.group(1)}{source[int(m.group(2))]}.{m.group(3)}"].clone()
        moved += 1
    if not moved:
        raise ValueError("no decoder layer found in the state")
    return out


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


def background_keep_at(step: int, start: float, full_at: int) -> float:
    """Share of pure-background visual tokens the decoder sees at `step`: grows linearly to 1 at `full_at`."""
    if full_at <= 0 or start >= 1.0:
        return 1.0
    return min(1.0, start + (1.0 - start) * step / full_at)

