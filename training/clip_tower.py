"""Contrastive (CLIP) training of the embedded model's vision tower, and how CLIP-like the tower is.

LLaVA's vision tower is CLIP: pretrained with a symmetric contrastive loss between the image embedding (the [CLS]
output after the post-layernorm and a linear projection, as `CLIPVisionModelWithProjection` computes it) and a
text encoder's embedding of the picture's caption. Nothing else ever asks a tower's [CLS] to summarize the
picture; that objective is what makes CLIP's [CLS] attention follow the salient content, which FasterVLM and
VisionZip rank patches by. This module gives the embedded model's tower the same objective:

- `alt_text(scene, rng)`: a caption of a scene naming every object (size, colour, shape, place) and the label,
  varied the way alt-text is (order, phrasing, synonyms);
- `ClipHead`: the training-only parts - a small CLIP text encoder (`CLIPTextModelWithProjection`, EOS pooling),
  the image projection and the learned temperature - and `info_nce`, CLIP's symmetric loss;
- measurements of the tower that read no training signal: the [CLS] row's attention on object patches relative
  to their area share and its top-k evidence recall at the feature layer, and image-to-caption retrieval.

The loss reads the pooled [CLS] output embedding only, as CLIP's does; no loss here reads attention weights.
`python -m training.train_llava --phase clip` trains the tower alone on it (CLIP pretraining); `--clip-weight W`
adds it to instruction tuning with the tower trainable. `tower_figures` is what `training.likeness` reports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sparsevlm import algorithm as A
from sparsevlm.scenes import world

from .model import ModelSize, pixel_values, v2_tokenizer

CLIP_SEED = 70_000_000  # contrastive batches: a stream of their own, apart from the conversations' scenes
MAX_CAPTION = 160  # tokens: 12 objects and a label in the longest phrasing fit
SIZE_WORDS = {"small": ("small", "tiny"), "medium": ("medium",), "big": ("big", "large")}
COLOUR_WORD = {"colour": ("colour", "color")}


def _place(row: int, col: int, rng: np.random.Generator) -> str:
    """Where an item is, in one of the phrasings people write ("at the top left", "in the top left")."""
    r, c = world.ROWS[row], world.COLUMNS[col]
    spot = "center" if (r, c) == ("middle", "middle") and rng.random() < 0.5 else f"{r} {c}"
    return f"{'at' if rng.random() < 0.6 else 'in'} the {spot}"


def _object_phrase(obj, rng: np.random.Generator) -> str:
    size = SIZE_WORDS[obj.size][int(rng.integers(len(SIZE_WORDS[obj.size])))]
    return f"{world.article(size)} {size} {obj.colour} {obj.shape} {_place(obj.row, obj.col, rng)}"


def _label_phrase(scene, rng: np.random.Generator) -> str:
    char = scene.label.lower()
    kind = "number" if char.isdigit() else "letter"
    noun = "label" if rng.random() < 0.6 else "card"
    what = char if rng.random() < 0.5 else f"the {kind} {char}"
    return f"a {noun} with {what} {_place(scene.label_row, scene.label_col, rng)}"


def alt_text(scene, rng: np.random.Generator) -> str:
    """A caption naming every object of `scene` (size, colour, shape, place) and its label, varied as alt-text
    is: items in reading order or shuffled, an optional lead-in, synonyms for sizes and the centre, "at" or "in"."""
    order = world.reading_order(scene)
    if rng.random() < 0.5:
        order = [order[i] for i in rng.permutation(len(order))]
    parts = [_label_phrase(scene, rng) if i == -1 else _object_phrase(scene.objects[i], rng) for i in order]
    if len(parts) > 1 and rng.random() < 0.5:
        body = " , ".join(parts[:-1]) + " and " + parts[-1]
    else:
        body = " , ".join(parts)
    lead = ("", "a picture of ", "an image of ", "this picture has ", "here is ", "there is ")
    return lead[int(rng.integers(len(lead)))] + body + " ."


def text_config(vocab: int, eos: int, pad: int, bos: int) -> CLIPTextConfig:
    """The text encoder: 2 layers x 128, CLIP's causal transformer pooled at the EOS token."""
    return CLIPTextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_CAPTION, projection_dim=128,
                          eos_token_id=eos, pad_token_id=pad, bos_token_id=bos)


class ClipHead(torch.nn.Module):
    """The training-only half of CLIP around an existing vision tower: text encoder, image projection (no bias,
    as CLIP's `visual_projection`) and the learned temperature (log scale, initialised to 1/0.07 as CLIP)."""

    def __init__(self, tokenizer, vision_hidden: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.tok = tokenizer
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        cfg = text_config(len(tokenizer), self.eos, self.pad, tokenizer.bos_token_id)
        self.text = CLIPTextModelWithProjection(cfg)
        self.visual_projection = torch.nn.Linear(vision_hidden, cfg.projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = [self.tok(c, add_special_tokens=False)["input_ids"][: MAX_CAPTION - 1] + [self.eos] for c in captions]
        n = max(len(x) for x in ids)
        dev = self.logit_scale.device
        t = torch.full((len(ids), n), self.pad, dtype=torch.long, device=dev)
        mask = torch.zeros((len(ids), n), dtype=torch.long, device=dev)
        for i, x in enumerate(ids):
            t[i, : len(x)] = torch.tensor(x, device=dev)
            mask[i, : len(x)] = 1
        return self.text(input_ids=t, attention_mask=mask).text_embeds

    def encode_image(self, tower, pixels: torch.Tensor) -> torch.Tensor:
        """CLIPVisionModelWithProjection's image embedding: post-layernorm [CLS] output, then the projection."""
        return self.visual_projection(tower(pixel_values=pixels).pooler_output)

    def loss(self, tower, pixels: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, float]:
        img, txt = self.encode_image(tower, pixels), self.encode_text(captions)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP clips the temperature at 100
        loss = info_nce(img, txt, scale)
        with torch.no_grad():
            top1 = image_to_text_top1(img, txt)
        return loss, top1


def info_nce(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric contrastive loss: cross-entropy over image->text and text->image cosine logits."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def contrastive_batch(step: int, n: int, seed: int, max_objects: int, label_fonts: bool, stroke_labels: float,
                      tinted: float) -> tuple[torch.Tensor, list[str]]:
    """The step's contrastive batch, a pure function of (seed, step): scenes drawn as the conversations' are
    (1..max_objects objects, a label half of the time, the same label and background variation): their pixels
    and one alt-text caption each."""
    scenes, captions = [], []
    for b in range(n):
        s = CLIP_SEED + seed * 1_000_000 + step * n + b
        scene, _ = world.training_scene(s, 0, max_objects)
        if label_fonts:
            world.vary_label(scene, s, stroke_share=stroke_labels)
        if tinted:
            world.vary_background(scene, s, tinted)
        scenes.append(scene)
        captions.append(alt_text(scene, np.random.default_rng([s, 31])))
    return pixel_values([world.render(s) for s in scenes]), captions


# ------------------------------------------------------------------------------------------------ measuring


def feature_layer_index(model) -> int:
    """The encoder layer whose output LLaVA reads (hidden_states[-2] is the output of layer L-2)."""
    n = len(_encoder_layers(model))
    idx = model.config.vision_feature_layer
    return idx if idx >= 0 else n + idx


def _encoder_layers(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers


@torch.no_grad()
def cls_attention_rows(model, pixels: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """The [CLS] query's head-mean attention over the patches at an encoder layer (default: the feature layer),
    recomputed from the layer's own q and k as the engine does: (B, N patches), each row summing to < 1 (the
    rest is on [CLS] itself)."""
    layers = _encoder_layers(model)
    attn = layers[feature_layer_index(model) if layer is None else layer].self_attn
    got: dict[str, torch.Tensor] = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))]
    try:
        model.model.vision_tower(pixel_values=pixels.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    q, k = got["q"], got["k"]
    b, t, _ = k.shape
    h, hd = attn.num_heads, attn.head_dim
    every_key = torch.tensor([t - 1], device=k.device)  # no causality in a ViT: the [CLS] row sees every key
    rows = [A.rows_attention(q[i, :1].view(1, h, hd).transpose(0, 1), k[i].view(t, h, hd).transpose(0, 1),
                             every_key, attn.scale)[0, 1:] for i in range(b)]
    return torch.stack(rows).cpu()


def object_attention_ratio(rows: torch.Tensor, object_masks: list[torch.Tensor]) -> float:
    """Share of the [CLS] row's patch mass on object patches divided by their share of the area (1.0: no
    preference; above 1: it looks at the objects), pooled over pictures (ratio of means)."""
    mass, area = 0.0, 0.0
    for r, m in zip(rows, object_masks, strict=True):
        r = r / r.sum()
        mass += float(r[m].sum())
        area += float(m.float().mean())
    return mass / area


def topk_recall(rows: torch.Tensor, evidence: list[list[int]], k: int = 64) -> float:
    """Mean share of each picture's evidence patches among the row's top-k patches."""
    out = []
    for r, ev in zip(rows, evidence, strict=True):
        if ev:
            top = set(r.topk(k).indices.tolist())
            out.append(len(top & set(ev)) / len(ev))
    return float(np.mean(out)) if out else float("nan")


def image_to_text_top1(img: torch.Tensor, txt: torch.Tensor) -> float:
    """Share of pictures whose own caption (same row) has the highest cosine among all the captions."""
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    return float(sim.argmax(1).eq(torch.arange(len(img), device=img.device)).float().mean())


@torch.no_grad()
def retrieval_top1(head: ClipHead, tower, pixels: torch.Tensor, captions: list[str]) -> float:
    """Image-to-caption retrieval: share of pictures whose own caption scores highest among the batch's."""
    return image_to_text_top1(head.encode_image(tower, pixels), head.encode_text(captions))


@torch.no_grad()
def tower_likeness(model, n: int = 120, seed: int = world.HELDOUT_SEED, k: int = 64) -> dict:
    """How CLIP-like the tower's [CLS] is on `n` held-out v2 pictures, at the feature layer: its attention on
    object patches (objects and label card) relative to their area share, and its top-`k` recall of each
    question's evidence patches beside a random top-`k`'s (k / 576 on average)."""
    samples = [world.heldout_sample(i, seed) for i in range(n)]
    rows = []
    for lo in range(0, n, 16):
        chunk = samples[lo:lo + 16]
        rows.append(cls_attention_rows(model, pixel_values([world.render(sc) for sc, _ in chunk])))
    rows_t = torch.cat(rows)
    masks = []
    for sc, _ in samples:
        m = torch.zeros(rows_t.shape[1], dtype=torch.bool)
        m[world.covered_patches(sc, world.items(sc))] = True
        masks.append(m)
    evidence = [s.evidence for _, s in samples]
    return {"n": n, "layer": feature_layer_index(model),
            "cls_object_attention_vs_area": round(object_attention_ratio(rows_t, masks), 3),
            f"cls_top{k}_evidence_recall": round(topk_recall(rows_t, evidence, k), 3),
            f"random_top{k}_evidence_recall": round(k / rows_t.shape[1], 3)}


@torch.no_grad()
def heldout_retrieval(head: ClipHead, tower, n: int = 256, batch: int = 64, seed: int = world.HELDOUT_SEED) -> dict:
    """Image-to-caption retrieval top-1 among `batch` candidates on held-out pictures (one alt-text each)."""
    scores = []
    for lo in range(0, n, batch):
        scenes = [world.heldout_sample(i, seed)[0] for i in range(lo, min(n, lo + batch))]
        caps = [alt_text(sc, np.random.default_rng([seed, i, 31])) for i, sc in enumerate(scenes, lo)]
        scores.append(retrieval_top1(head, tower, pixel_values([world.render(sc) for sc in scenes]), caps))
    return {"n": n, "candidates": batch, "image_to_caption_top1": round(float(np.mean(scores)), 3)}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@torch.no_grad()
def last_token_attention(model, processor, n: int = 60, layers: tuple[int, ...] = (1, 2),
                         seed: int = world.HELDOUT_SEED) -> dict:
    """Reported, never trained for: the last prompt token's head-mean attention over the visual tokens at decoder
    `layers`, on `n` held-out questions - its positional shift (Spearman correlation with the visual token's
    index; LLaVA-1.5's leans to the last tokens) and its concentration (share of the visual mass held by the top
    1% of visual tokens). Eager attention weights, read from the model's own forward."""
    from sparsevlm.pipeline import build_prompt

    impl = model.config.text_config._attn_implementation
    model.config.text_config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    image_id = model.config.image_token_id
    out: dict[int, dict[str, list[float]]] = {la: {"shift": [], "top1pct": []} for la in layers}
    try:
        for i in range(n):
            scene, sample = world.heldout_sample(i, seed)
            inputs = processor(images=world.render(scene), text=build_prompt(processor, sample.question),
                               return_tensors="pt")
            res = model(**inputs, output_attentions=True)
            vis = (inputs["input_ids"][0] == image_id).nonzero()[:, 0]
            for la in layers:
                row = res.attentions[la][0, :, -1, vis].float().mean(0).numpy()
                row = row / row.sum()
                top = max(1, round(0.01 * len(row)))
                out[la]["shift"].append(_spearman(row, np.arange(len(row))))
                out[la]["top1pct"].append(float(np.sort(row)[-top:].sum()))
    finally:
        model.config.text_config._attn_implementation = impl
        model.model.language_model.config._attn_implementation = impl
    return {"n": n, **{f"layer{la}": {"positional_shift_spearman": round(float(np.mean(v["shift"])), 3),
                                      "top1pct_share": round(float(np.mean(v["top1pct"])), 3)}
                       for la, v in out.items()}}


def head_for(model_dir: str | Path, tower) -> tuple[ClipHead | None, str]:
    """The contrastive head this exported model's tower was pretrained with, if the export records it: when the
    last phase (training_state.json) trained the tower contrastively (`--phase clip`, or `--clip-weight` with the
    tower trainable), that phase's own checkpoint (`--out`); when it froze the tower, its `--init-from`, a
    checkpoint with a contrastive head. Either way the checkpoint's vision tower must be tensor-for-tensor this
    model's. Returns (head, where it came from) or (None, why not): retrieval is only reported for the very tower
    it was measured on."""
    try:
        state = json.loads((Path(model_dir) / "training_state.json").read_text())
    except (OSError, ValueError):
        return None, "no training_state.json"
    args = state.get("args") or {}
    tower_trained = state.get("phase") == "clip" or float(args.get("tower_lr_scale") or 0) > 0
    if tower_trained and state.get("phase") != "clip" and not float(args.get("clip_weight") or 0):
        return None, "its last phase trained the tower without a contrastive head"
    # A phase that trained the tower contrastively saved the head beside it, in its own checkpoint (--out);
    # a phase that froze the tower kept the one of the checkpoint it continued from.
    src = str(Path(args.get("out") or "") / "checkpoint.pt") if tower_trained else args.get("init_from") or ""
    path = Path(src)
    if not path.is_absolute():
        path = Path(__file__).resolve().parents[1] / path
    if path.suffix != ".pt" or not path.is_file():
        return None, f"no contrastive head found ({src or 'no earlier phase'} is not a checkpoint on this machine)"
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not ck.get("clip_head"):
        return None, f"{src} has no contrastive head"
    mine = tower.state_dict()
    theirs = {k.split("vision_tower.", 1)[1]: v for k, v in ck["model"].items() if "vision_tower." in k}
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        return None, f"the tower changed after {src} (not frozen since)"
    head = ClipHead(v2_tokenizer(), ModelSize(**ck["size"]).vision_hidden)
    head.load_state_dict(ck["clip_head"])
    return head.eval(), src


def tower_figures(model, processor, model_dir: str | Path | None, n: int = 120, n_decoder: int | None = None) -> dict:
    """Everything `likeness` reports about the tower and the decoder's view of it: the [CLS] figures on `n`
    pictures, the last token's attention shift and concentration on `n_decoder` questions (default: half of `n`),
    and (when the export records its contrastive head) held-out image-to-caption retrieval."""
    n_decoder = max(1, n // 2) if n_decoder is None else n_decoder
    out: dict = {"cls": tower_likeness(model, n), "decoder": last_token_attention(model, processor, n_decoder)}
    head, where = head_for(model_dir, model.model.vision_tower) if model_dir is not None else (None, "no folder")
    out["retrieval"] = (heldout_retrieval(head, model.model.vision_tower) | {"head_from": where} if head is not None
                        else {"unavailable": where})
    return out


def main() -> None:
    import argparse

    from transformers import LlavaForConditionalGeneration

    p = argparse.ArgumentParser(description="How CLIP-like a model's vision tower is (and, from a training "
                                "checkpoint with a contrastive head, its caption retrieval)")
    p.add_argument("model", help="an exported model folder, or a checkpoint.pt of train_llava")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--n-decoder", type=int, default=60, help="questions for the decoder's attention figures")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out: dict = {}
    if Path(a.model).is_dir():
        from transformers import AutoProcessor

        model = LlavaForConditionalGeneration.from_pretrained(a.model).eval()
        out["decoder"] = last_token_attention(model, AutoProcessor.from_pretrained(a.model), a.n_decoder)
    else:
        from .model import build_model

        ck = torch.load(a.model, map_location="cpu", weights_only=False)
        tok = v2_tokenizer()
        model = build_model(ModelSize(**ck["size"]), tok)
        model.load_state_dict(ck["model"])
        model.eval()
        if ck.get("clip_head"):
            head = ClipHead(tok, ModelSize(**ck["size"]).vision_hidden)
            head.load_state_dict(ck["clip_head"])
            out["retrieval"] = heldout_retrieval(head.eval(), model.model.vision_tower)
    out["tower"] = tower_likeness(model, a.n)
    out["model"] = a.model
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
