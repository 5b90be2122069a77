"""FasterVLM's attention shift and dispersion (its sections 3.2-3.3), measured on a model's decoder and tower.

FasterVLM explains why the methods that rank visual tokens by the decoder's text-to-image attention (FastV,
SparseVLM, PyramidDrop) lose to [CLS] ranking at high reduction on LLaVA-1.5-7B by two properties of that
attention, absent from the [CLS] token's:

- **shift**: text-to-image attention grows with the visual token's index, so the tokens it keeps lie mostly in
  the picture's lower half. Measured here as `lower_half_share`: the share of the attention over the visual
  tokens that falls on the lower half of the grid's rows (0.5: no shift; a picture with more content in its lower
  half raises it too, which is why plain pictures with objects spread evenly are measured apart);
- **dispersion**: the decoder's attention is spread over more tokens than the [CLS] token's. Measured as
  `top20_share`: the share held by the 20% of visual tokens that receive the most (0.2: uniform; LLaVA-1.5-7B,
  FasterVLM's Figure 4: about 0.8 for [CLS], about 0.6 for the last token).

Both are computed, for the decoder, at every layer where a fixed-layer method reads its attention
(`profile_layers`, from the engine's own functions: FastV's K-1, SparseVLM's pruning layers, the layers whose
input PyramidDrop ranks with), for two queries:

- `last`: the last token of the prompt (the position that predicts the answer; FastV and PyramidDrop rank by it);
- `prompt`: the text tokens after the image except the last (the question and the template's words; FasterVLM's
  "text" attention), each token's row normalized over the visual tokens, then averaged;

and for the vision tower's [CLS] row at the feature layer (`clip_tower.cls_attention_rows`). Head mean,
post-softmax; each statistic is computed per picture, then averaged over pictures (± a 95% half-width). Decoder
rows are recomputed from the layer's q/k (`likeness.AttentionRowTap`): the model keeps SDPA and no L x L matrix is
built.

Two picture sets: the model's own world's held-out questions (`heldout`), and `spread` - plain backgrounds,
light or dark, with 4-12 objects on a jittered lattice that covers the whole picture (as many in the lower half as
in the upper), asked how many objects there are, the colour of one of them or whether one is there (the one asked
about drawn uniformly, so as often in either half). A third set, `blank`, reported apart and never in `all`:
the same backgrounds with nothing on them, so what the attention does there it does by position alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparsevlm.config import PruneConfig
from sparsevlm.methods import pyramiddrop
from sparsevlm.methods.fastv import fastv_k
from sparsevlm.methods.sparsevlm import sparsevlm_layers
from sparsevlm.scenes import world
from sparsevlm.scenes.worlds import DEFAULT_WORLD, heldout_item
from sparsevlm.tokenizer import prompt_for

from .clip_tower import cls_attention_rows, feature_layer_index

TOP_SHARE = 0.2
# FasterVLM (sections 3.2-3.3, Figures 3-4, LLaVA-1.5-7B): the top 20% of visual tokens hold about 80% of the
# [CLS] attention and about 60% of the last token's; the decoder's attention grows with the token index (the
# paper gives no lower-half figure: "most retained visual tokens would be located in the lower half").
FASTERVLM_LLAVA15 = {"cls_top20_share": 0.80, "last_top20_share": 0.60,
                     "shift": "toward the lower half (Figures 3, 7, 8; no share published)"}
SPREAD_SEED = 41_000_000  # spread pictures: no training or held-out stream reaches these seeds
SPREAD_LATTICES = ((2, 2), (2, 3), (3, 2), (3, 3), (3, 4), (4, 3))


def profile_layers(depth: int) -> dict[int, list[str]]:
    """Every decoder layer whose attention a fixed-layer method reads at this depth, with the methods reading it:
    FastV ranks in layer K-1; SparseVLM in each pruning layer; PyramidDrop with the input of each stage's first
    layer (the layer after its 'after' index). From the engine's functions, at their default settings."""
    out: dict[int, list[str]] = {}
    out.setdefault(fastv_k(PruneConfig(method="fastv"), depth) - 1, []).append("fastv")
    for layer in sparsevlm_layers(PruneConfig(method="sparsevlm"), depth):
        out.setdefault(layer, []).append("sparsevlm")
    for after in pyramiddrop.stage_layers(pyramiddrop.BUDGET_LAYERS_32, depth):
        out.setdefault(after + 1, []).append("pyramiddrop")
    return dict(sorted(out.items()))


# --- the two statistics --------------------------------------------------------------------------------------------
def lower_half_share(row: torch.Tensor, grid_side: int) -> float:
    """Share of a row over the visual tokens (raster order, `grid_side` a row) on the lower half of the rows."""
    row = row.double().flatten()
    if row.numel() != grid_side * grid_side:
        raise ValueError(f"a row of {row.numel()} visual tokens is not a {grid_side}x{grid_side} grid")
    total = float(row.sum())
    if total <= 0:
        raise ValueError("a row with no attention mass has no share")
    return float(row[(grid_side // 2) * grid_side:].sum()) / total


def top_share(row: torch.Tensor, share: float = TOP_SHARE) -> float:
    """Share of a row's mass held by its top `share` of tokens (round(share * n) of them, at least one)."""
    row = row.double().flatten()
    k = max(1, round(share * row.numel()))
    total = float(row.sum())
    if total <= 0:
        raise ValueError("a row with no attention mass has no share")
    return float(torch.topk(row, k).values.sum()) / total


def row_stats(row: torch.Tensor, grid_side: int) -> dict[str, float]:
    return {"lower_half_share": lower_half_share(row, grid_side), "top20_share": top_share(row)}


def normalized_mean(rows: torch.Tensor) -> torch.Tensor:
    """Rows (r, V), each normalized to sum 1 over the visual tokens, averaged: (V,)."""
    rows = rows.double()
    return (rows / rows.sum(-1, keepdim=True).clamp_min(1e-30)).mean(0)


# --- pictures ------------------------------------------------------------------------------------------------------
def plain_background(rng: np.random.Generator) -> tuple[bool, tuple[int, int, int]]:
    """(dark, base colour) of a spread or blank picture's plain background, light or dark, slightly tinted."""
    dark = bool(rng.random() < 0.35)
    grey = int(rng.integers(15, 75)) if dark else int(rng.integers(170, 245))
    return dark, tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-10, 11, size=3))


def spread_item(index: int):
    """Spread picture `index`: (PIL image, question, scene). A plain background, light or dark; objects of one size
    class on a jittered lattice over the whole picture (distinct colour-shape pairs); a count, colour or
    existence question about them."""
    rng = np.random.default_rng([SPREAD_SEED, index])
    rows, cols = SPREAD_LATTICES[int(rng.integers(len(SPREAD_LATTICES)))]
    dark, base = plain_background(rng)
    cell_w, cell_h = world.IMAGE_SIZE / cols, world.IMAGE_SIZE / rows
    lo, hi = world.SIZE_CLASSES["big" if max(rows, cols) == 2 else "medium"]
    side = int(rng.integers(lo, min(hi, int(min(cell_w, cell_h)) - 12) + 1))
    pairs = rng.permutation(len(world.COLOURS) * len(world.SHAPES))[: rows * cols]
    objects = []
    for k, pair in enumerate(pairs):
        r, c = divmod(k, cols)
        room_x, room_y = cell_w - side - 6, cell_h - side - 6
        x0 = int(c * cell_w + 3 + rng.uniform(0, room_x))
        y0 = int(r * cell_h + 3 + rng.uniform(0, room_y))
        colour = list(world.COLOURS)[int(pair) // len(world.SHAPES)]
        fill = tuple(int(v) for v in np.clip(np.array(world.COLOURS[colour]) * rng.uniform(0.9, 1.05), 0, 255))
        objects.append(world.Object2(world.SHAPES[int(pair) % len(world.SHAPES)], colour, side, x0, y0, fill))
    scene = world.Scene2(seed=SPREAD_SEED + index, objects=objects, background="plain", dark=dark, base=base)
    kind = int(rng.integers(3))
    target = objects[int(rng.integers(len(objects)))]
    if kind == 0 and len(objects) < len(world.NUMBERS):
        question = "how many objects are there ?"
    elif kind == 1 and sum(o.shape == target.shape for o in objects) == 1:
        question = f"what colour is the {target.shape} ?"
    else:
        question = f"is there {world.article(target.colour)} {target.colour} {target.shape} ?"
    return world.render(scene), question, scene


BLANK_SEED = 42_000_000  # blank pictures: no training or held-out stream reaches these seeds


def blank_item(index: int):
    """Blank picture `index`: (PIL image, question). A plain background, light or dark, as the spread pictures
    have, with nothing on it, and a question about the whole picture. With nothing to see, what is left of the
    decoder's attention over the visual tokens is where it goes by position alone."""
    rng = np.random.default_rng([BLANK_SEED, index])
    dark, base = plain_background(rng)
    scene = world.Scene2(seed=BLANK_SEED + index, objects=[], background="plain", dark=dark, base=base)
    colour = list(world.COLOURS)[int(rng.integers(len(world.COLOURS)))]
    shape = world.SHAPES[int(rng.integers(len(world.SHAPES)))]
    question = ("how many objects are there ?", "describe the picture .",
                f"is there {world.article(colour)} {colour} {shape} ?")[index % 3]
    return world.render(scene), question


def heldout_picture(index: int, world_name: str):
    item = heldout_item(index, None, world_name)
    return item.image, item.sample.question


# --- measuring -----------------------------------------------------------------------------------------------------
class ProfileMeter:
    """The attention profile of one picture and question: the decoder's last-token and prompt rows over the visual
    tokens at every profile layer (recomputed from q/k) and the [CLS] row at the feature layer."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.depth = model.config.text_config.num_hidden_layers
        self.layers = profile_layers(self.depth)
        vcfg = model.config.vision_config
        self.grid_side = vcfg.image_size // vcfg.patch_size

    @torch.no_grad()
    def rows(self, image, question: str) -> dict:
        """{"cls": (V,), "decoder": {layer: {"last": (V,), "prompt": (V,)}}}: raw head-mean rows over the visual
        tokens (the prompt's the mean of its tokens' normalized rows)."""
        from .likeness import AttentionRowTap

        enc = self.processor(images=image, text=prompt_for(question), return_tensors="pt")
        ids = enc["input_ids"][0]
        where = (ids == self.model.config.image_token_id).nonzero().flatten()
        prefix, n = int(where[0]), len(ids)
        text_start = prefix + len(where)
        with AttentionRowTap(self.model, tuple(self.layers)) as tap:
            self.model(**enc, use_cache=False)
            wanted = torch.arange(text_start, n)
            out = {}
            for layer in self.layers:
                r = tap.rows(layer, wanted)[:, prefix:text_start]
                out[layer] = {"last": r[-1], "prompt": normalized_mean(r[:-1]) if len(r) > 1 else r[-1]}
        cls = cls_attention_rows(self.model, enc["pixel_values"])[0]
        return {"cls": cls, "decoder": out}

    def stats(self, image, question: str) -> dict:
        r = self.rows(image, question)
        return {"cls": row_stats(r["cls"], self.grid_side),
                "decoder": {la: {q: row_stats(v, self.grid_side) for q, v in d.items()}
                            for la, d in r["decoder"].items()}}


def _mean_err(values: list[float]) -> list[float]:
    v = np.asarray(values, float)
    err = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return [round(float(v.mean()), 4), round(float(err), 4)]


def aggregate(per_picture: list[dict], layers: dict[int, list[str]]) -> dict:
    """Mean (and 95% half-width) of each statistic over pictures."""
    stats = ("lower_half_share", "top20_share")
    out = {"n": len(per_picture),
           "cls": {s: _mean_err([p["cls"][s] for p in per_picture]) for s in stats},
           "decoder": []}
    for layer, readers in layers.items():
        out["decoder"].append({"layer": layer, "read_by": readers, **{
            q: {s: _mean_err([p["decoder"][layer][q][s] for p in per_picture]) for s in stats}
            for q in ("last", "prompt")}})
    return out


def measure(model, processor, n_heldout: int = 120, n_spread: int = 120, world_name: str = DEFAULT_WORLD,
            log=None, n_blank: int = 0) -> dict:
    """The profile averaged over `n_heldout` held-out pictures of `world_name` and `n_spread` spread pictures,
    each set on its own and both together; and over `n_blank` blank pictures (`blank_item`), on their own only."""
    meter = ProfileMeter(model, processor)
    sets: dict[str, list[dict]] = {"heldout": [], "spread": [], "blank": []}
    for i in range(n_blank):
        sets["blank"].append(meter.stats(*blank_item(i)))
    for i in range(n_heldout):
        sets["heldout"].append(meter.stats(*heldout_picture(i, world_name)))
    for i in range(n_spread):
        image, question, _ = spread_item(i)
        sets["spread"].append(meter.stats(image, question))
        if log and (i + 1) % 50 == 0:
            log(f"  profile: {n_heldout} held-out + {i + 1}/{n_spread} spread pictures")
    both = sets["heldout"] + sets["spread"]  # the blank pictures have no content: reported apart
    return {"definition": "head-mean post-softmax attention over the visual tokens; lower_half_share: share on the "
                          "lower half of the grid's rows; top20_share: share held by the top 20% of visual tokens; "
                          "last: the prompt's last token; prompt: the text tokens after the image but the last, "
                          "rows normalized then averaged; cls: the tower's [CLS] row at the feature layer; per "
                          "picture, then mean [value, 95% half-width] over pictures",
            "grid_side": meter.grid_side, "feature_layer": feature_layer_index(model), "depth": meter.depth,
            "layers": {str(k): v for k, v in meter.layers.items()}, "world": world_name,
            "all": aggregate(both, meter.layers) if both else None,
            **{name: aggregate(v, meter.layers) for name, v in sets.items() if v},
            "fastervlm_llava15_7b": FASTERVLM_LLAVA15}


# --- reporting -----------------------------------------------------------------------------------------------------
def _f(x) -> str:
    if x is None:
        return "n/a"
    v, e = x
    return f"{v:.2f}" if e is None or (isinstance(e, float) and math.isnan(e)) else f"{v:.2f} ± {e:.2f}"


def profile_rows(p: dict | None, part: str = "all") -> list[tuple[str, str]]:
    """(measure, value) rows of a profile summary (`measure`'s output) for one picture set."""
    if not p or not p.get(part):
        return []
    a = p[part]
    rows = [("[CLS], feature layer: lower-half share / top-20% share",
             f"{_f(a['cls']['lower_half_share'])} / {_f(a['cls']['top20_share'])}")]
    for d in a["decoder"]:
        for q in ("last", "prompt"):
            rows.append((f"decoder layer {d['layer']} ({', '.join(d['read_by'])}), {q}: lower-half share / "
                         "top-20% share",
                         f"{_f(d[q]['lower_half_share'])} / {_f(d[q]['top20_share'])}"))
    return rows


def markdown(p: dict | None, heading: str = "## 5. Attention shift and dispersion (FasterVLM, sections 3.2-3.3)"
             ) -> list[str]:
    """The profile section of the likeness report (and the model card): every layer and query, per picture set,
    beside FasterVLM's published figures."""
    if not p:
        return []
    sets = [s for s in ("all", "heldout", "spread", "blank") if p.get(s)]
    head = " | ".join(f"{s} ({p[s]['n']} pictures)" for s in sets)
    lines = [
        heading,
        "",
        "For each layer where a fixed-layer method reads the decoder's attention, and for the tower's [CLS]: the "
        "share of the head-mean attention over the visual tokens on the lower half of the picture "
        "(`lower_half_share`, 0.5 = no shift) and the share held by the top 20% of visual tokens "
        "(`top20_share`, 0.2 = uniform). `last` is the prompt's last token, `prompt` the mean of the other text "
        "tokens after the image (rows normalized first). Per picture, then the mean ± a 95% half-width over "
        f"pictures: `heldout` is {p.get('world', 'its own world')}'s held-out questions, `spread` plain "
        "pictures with objects spread evenly over a lattice (so the lower-half share is not where the objects "
        "happen to be)" + (", and `blank` the same backgrounds with nothing on them (not in `all`: where "
                           "the attention goes by position alone)" if p.get("blank") else "") + ". FasterVLM's "
        "published LLaVA-1.5-7B figures: [CLS] top-20% about 0.80, last token about 0.60, decoder attention "
        "shifted toward the lower half.",
        "",
        f"| query | {head} | LLaVA-1.5-7B (FasterVLM) |",
        "|---|" + "---|" * (len(sets) + 1),
    ]
    ref = {"cls": "top-20% ~0.80", "last": "shifted; top-20% ~0.60", "prompt": "shifted"}
    lines.append("| [CLS], feature layer: lower-half / top-20% | "
                 + " | ".join(f"{_f(p[s]['cls']['lower_half_share'])} / {_f(p[s]['cls']['top20_share'])}"
                              for s in sets) + f" | {ref['cls']} |")
    for i, d in enumerate(p[sets[0]]["decoder"]):
        for q in ("last", "prompt"):
            cells = [p[s]["decoder"][i][q] for s in sets]
            lines.append(f"| layer {d['layer']} ({', '.join(d['read_by'])}), {q}: lower-half / top-20% | "
                         + " | ".join(f"{_f(c['lower_half_share'])} / {_f(c['top20_share'])}" for c in cells)
                         + f" | {ref[q]} |")
    return [*lines, ""]
