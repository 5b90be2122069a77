"""Procedural scenes and one-word questions about them, deterministic from a seed.

A scene is a 336x336 picture (24x24 grid of 14 px patches, as LLaVA-1.5 sees it) divided into a 6x6 layout of
slots, each slot 4x4 patches. Each object sits in its own slot and covers 3x3 (small) or 4x4 (big) patches,
a size a small model learns quickly. Some scenes also hold a white label card with
one black character on it.

Every sample records its evidence patches: the indices (row * 24 + col) of the grid cells covered by the
objects the answer depends on. A cell counts as covered when at least `COVER_FRACTION` of its pixels belong to
the object. Per family:

- colour / shape / position: the object asked about.
- exist, answer yes: the object asked about. Answer no: every object sharing the asked colour or the asked
  shape (the hard negatives a model has to look at to say no); empty when no object shares either.
- count: every object counted (empty for zero).
- relation: both objects.
- read: the label card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 patches a side -> 576 visual tokens
SLOTS = 6  # 6x6 layout of object slots
SLOT_PX = IMAGE_SIZE // SLOTS  # 56 px = 4x4 patches
COVER_FRACTION = 0.05

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
SIZES = {"small": 42, "big": 54}
LABEL_CHARS = "23456789EHKX"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")

FAMILIES = ("colour", "shape", "exist", "count", "position", "relation", "read")
MAX_OBJECTS = 12


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    slot_row: int
    slot_col: int
    x0: int  # top-left pixel of the object's box
    y0: int

    @property
    def px(self) -> int:
        return SIZES[self.size]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    seed: int
    objects: list[SceneObject]
    background: tuple[int, int, int]
    textured: bool
    label: str | None = None  # the character on the label card
    label_slot: tuple[int, int] | None = None
    _masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)


@dataclass
class Sample:
    question: str
    answer: str
    family: str
    evidence: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def answer_words() -> list[str]:
    """Every one-word answer a question can have."""
    words = [*COLOURS, *SHAPES, "yes", "no", *NUMBERS, *ROWS, *COLUMNS]
    words += [c.lower() for c in LABEL_CHARS]
    return list(dict.fromkeys(words))


def vocabulary() -> list[str]:
    """Every word a question or an answer uses (the tokenizer adds specials and the chat template's words)."""
    question_words = [
        "what", "colour", "is", "the", "shape", "object", "objects", "how", "many", "are", "there", "which", "row",
        "column", "in", "left", "of", "above", "is", "there", "a", "written", "on", "label", "?", "small", "big",
    ]  # fmt: skip - the order fixes the token ids of the embedded model (v2's vocabulary starts with these)
    return list(dict.fromkeys([*question_words, *PLURALS.values(), *answer_words()]))


# ----------------------------------------------------------------------------------------------- scenes


def make_scene(seed: int, n_objects: int, with_label: bool) -> Scene:
    """A scene of `n_objects` objects with distinct (colour, shape) pairs, each in its own slot."""
    rng = np.random.default_rng([seed, 1])
    n_objects = int(min(max(n_objects, 1), MAX_OBJECTS))
    cells = rng.permutation(SLOTS * SLOTS)[: n_objects + 1]
    pairs = rng.permutation(len(COLOURS) * len(SHAPES))[:n_objects]
    colour_names = list(COLOURS)
    objects = []
    for cell, pair in zip(cells[:n_objects], pairs, strict=True):
        r, c = divmod(int(cell), SLOTS)
        size = "small" if rng.random() < 0.5 else "big"
        px = SIZES[size]
        if size == "small":  # patch-aligned inside the slot, one patch of play either way
            dx, dy = (int(v) * PATCH for v in rng.integers(0, 2, size=2))
        else:
            dx = dy = (SLOT_PX - px) // 2
        objects.append(
            SceneObject(
                shape=SHAPES[int(pair) % len(SHAPES)],
                colour=colour_names[int(pair) // len(SHAPES)],
                size=size,
                slot_row=r,
                slot_col=c,
                x0=c * SLOT_PX + dx,
                y0=r * SLOT_PX + dy,
            )
        )
    grey = int(rng.integers(205, 240))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    scene = Scene(seed=seed, objects=objects, background=background, textured=bool(rng.random() < 0.5))
    if with_label:
        scene.label = LABEL_CHARS[int(rng.integers(len(LABEL_CHARS)))]
        scene.label_slot = divmod(int(cells[n_objects]), SLOTS)
    return scene


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, px: int, fill) -> None:
    x1, y1 = x0 + px - 1, y0 + px - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        m = px // 10
        draw.rectangle([x0 + m, y0 + m, x1 - m, y1 - m], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        t = px // 6
        draw.rectangle([x0, cy - t, x1, cy + t], fill=fill)
        draw.rectangle([cx - t, y0, cx + t, y1], fill=fill)
    else:
        raise ValueError(shape)


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont:
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def label_box(scene: Scene) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of the label card, inclusive."""
    assert scene.label_slot is not None
    r, c = scene.label_slot
    return c * SLOT_PX + 1, r * SLOT_PX + 1, c * SLOT_PX + SLOT_PX - 2, r * SLOT_PX + SLOT_PX - 2


def render(scene: Scene) -> Image.Image:
    """The scene as a 336x336 RGB picture."""
    rng = np.random.default_rng([scene.seed, 2])
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        jitter = rng.integers(-10, 11, size=3)
        fill = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[obj.colour], jitter, strict=True))
        _draw_shape(draw, obj.shape, obj.x0, obj.y0, obj.px, fill)
    if scene.label is not None:
        x0, y0, x1, y1 = label_box(scene)
        draw.rectangle([x0, y0, x1, y1], fill=(252, 252, 252), outline=(60, 60, 60), width=2)
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2 + 1), scene.label, fill=(0, 0, 0), font=_font(40), anchor="mm")
    if scene.textured:
        arr = np.asarray(img).astype(np.int16)
        arr += rng.integers(-6, 7, size=arr.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def object_mask(scene: Scene, index: int) -> np.ndarray:
    """Boolean 336x336 mask of object `index` (-1: the label card)."""
    if index not in scene._masks:
        m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        d = ImageDraw.Draw(m)
        if index == -1:
            d.rectangle(label_box(scene), fill=255)
        else:
            obj = scene.objects[index]
            _draw_shape(d, obj.shape, obj.x0, obj.y0, obj.px, 255)
        scene._masks[index] = np.asarray(m) > 0
    return scene._masks[index]


def covered_patches(scene: Scene, indices: list[int]) -> list[int]:
    """Sorted grid-cell indices (row * 24 + col) covered by any of the given objects."""
    if not indices:
        return []
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i in indices:
        mask |= object_mask(scene, i)
    frac = mask.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3))
    return [int(j) for j in np.flatnonzero(frac.reshape(-1) >= COVER_FRACTION)]


# -------------------------------------------------------------------------------------------- questions


def _colour_ref(scene: Scene, i: int) -> str | None:
    """A description of object i that does not name its colour, or None if none is unique."""
    obj = scene.objects[i]
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return obj.shape
    if sum(o.size == obj.size for o in same_shape) == 1:
        return f"{obj.size} {obj.shape}"
    return None


def _shape_ref(scene: Scene, i: int) -> str | None:
    """A description of object i that does not name its shape, or None if none is unique."""
    obj = scene.objects[i]
    same_colour = [o for o in scene.objects if o.colour == obj.colour]
    if len(same_colour) == 1:
        return f"{obj.colour} object"
    if sum(o.size == obj.size for o in same_colour) == 1:
        return f"{obj.size} {obj.colour} object"
    return None


def ask(scene: Scene, family: str, rng: np.random.Generator) -> Sample | None:
    """One question of `family` about `scene`, or None when the scene cannot support one."""
    objs = scene.objects
    n = len(objs)
    if family == "colour":
        cands = [(i, r) for i in range(n) if (r := _colour_ref(scene, i))]
        if not cands:
            return None
        i, ref = cands[int(rng.integers(len(cands)))]
        return Sample(f"what colour is the {ref} ?", objs[i].colour, family, covered_patches(scene, [i]))
    if family == "shape":
        cands = [(i, r) for i in range(n) if (r := _shape_ref(scene, i))]
        if not cands:
            return None
        i, ref = cands[int(rng.integers(len(cands)))]
        return Sample(f"what shape is the {ref} ?", objs[i].shape, family, covered_patches(scene, [i]))
    if family == "exist":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            i = int(rng.integers(n))
            return Sample(f"is there a {objs[i].name} ?", "yes", family, covered_patches(scene, [i]))
        colours = sorted({o.colour for o in objs})  # sorted: set order follows the per-process str hash
        shapes = sorted({o.shape for o in objs})
        hard = [(c, s) for c in colours for s in shapes if (c, s) not in present]
        if hard and rng.random() < 0.8:
            c, s = hard[int(rng.integers(len(hard)))]
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
            c, s = absent[int(rng.integers(len(absent)))]
        related = [i for i, o in enumerate(objs) if o.colour == c or o.shape == s]
        return Sample(f"is there a {c} {s} ?", "no", family, covered_patches(scene, related))
    if family == "count":
        # Ask about an attribute present in the scene most of the time, so answers are not mostly zero.
        if rng.random() < 0.5:
            attr = "shape"
            key = objs[int(rng.integers(n))].shape if rng.random() < 0.85 else SHAPES[int(rng.integers(len(SHAPES)))]
            idx = [i for i, o in enumerate(objs) if o.shape == key]
            q = f"how many {PLURALS[key]} are there ?"
        else:
            attr = "colour"
            names = list(COLOURS)
            key = objs[int(rng.integers(n))].colour if rng.random() < 0.85 else names[int(rng.integers(len(names)))]
            idx = [i for i, o in enumerate(objs) if o.colour == key]
            q = f"how many {key} objects are there ?"
        del attr
        if len(idx) >= len(NUMBERS):
            return None
        return Sample(q, NUMBERS[len(idx)], family, covered_patches(scene, idx))
    if family == "position":
        i = int(rng.integers(n))
        o = objs[i]
        if rng.random() < 0.5:
            return Sample(f"which row is the {o.name} in ?", ROWS[o.slot_row // 2], family, covered_patches(scene, [i]))
        return Sample(
            f"which column is the {o.name} in ?", COLUMNS[o.slot_col // 2], family, covered_patches(scene, [i])
        )
    if family == "relation":
        if n < 2:
            return None
        horizontal = rng.random() < 0.5
        want_yes = rng.random() < 0.5
        pairs = [
            (i, j)
            for i in range(n)
            for j in range(n)
            if i != j
            and (
                (objs[i].slot_col < objs[j].slot_col)
                if horizontal
                else (objs[i].slot_row < objs[j].slot_row)
            )
        ]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]  # i is left of / above j
        a, b = (i, j) if want_yes else (j, i)
        rel = "left of" if horizontal else "above"
        return Sample(
            f"is the {objs[a].name} {rel} the {objs[b].name} ?",
            "yes" if want_yes else "no",
            family,
            covered_patches(scene, [a, b]),
        )
    if family == "read":
        if scene.label is None:
            return None
        return Sample("what is written on the label ?", scene.label.lower(), family, covered_patches(scene, [-1]))
    raise ValueError(f"unknown question family {family!r}")


# ---------------------------------------------------------------------------------------------- datasets


def training_example(
    seed: int, n_turns: int, max_objects: int, family_weights: dict[str, float] | None = None
) -> tuple[Image.Image, list[Sample]]:
    """One picture and `n_turns` questions about it (for multi-turn training), from `seed`."""
    scene, samples = training_scene(seed, n_turns, max_objects, family_weights)
    return render(scene), samples


def patch_targets(scene: Scene) -> np.ndarray:
    """Per-patch classes (4 x 576) for the auxiliary training heads: colour, shape, label character, centre.

    0 means background in each row. A patch belongs to the object covering most of it (at least 30%).
    Centre marks one patch per object (its middle), which gives counting a clean per-object signal.
    """
    out = np.zeros((4, GRID * GRID), dtype=np.int64)
    best = np.full(GRID * GRID, 0.3)
    items = list(range(len(scene.objects))) + ([-1] if scene.label is not None else [])
    for i in items:
        frac = object_mask(scene, i).reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)).reshape(-1)
        take = frac > best
        best = np.where(take, frac, best)
        if i == -1:
            out[0, take] = len(COLOURS) + 1
            out[1, take] = len(SHAPES) + 1
            out[2, take] = LABEL_CHARS.index(scene.label) + 1
            x0, y0 = label_box(scene)[:2]
            cr, cc = (y0 + SLOT_PX // 2) // PATCH - 1, (x0 + SLOT_PX // 2) // PATCH - 1
        else:
            o = scene.objects[i]
            out[0, take] = list(COLOURS).index(o.colour) + 1
            out[1, take] = SHAPES.index(o.shape) + 1
            out[2, take] = 0
            cr, cc = (o.y0 + o.px // 2) // PATCH, (o.x0 + o.px // 2) // PATCH
            if o.size == "big":
                cr, cc = cr - 1, cc - 1
        out[3, cr * GRID + cc] = 1
    return out


def training_scene(
    seed: int, n_turns: int, max_objects: int, family_weights: dict[str, float] | None = None
) -> tuple[Scene, list[Sample]]:
    """The scene and questions behind `training_example`."""
    rng = np.random.default_rng([seed, 3])
    n_objects = int(rng.integers(1, max_objects + 1))
    scene = make_scene(seed, n_objects, with_label=bool(rng.random() < 0.5))
    return scene, draw_questions(scene, rng, n_turns, family_weights, ask)


def draw_questions(scene, rng: np.random.Generator, n_turns: int, family_weights: dict[str, float] | None,
                   ask, same=lambda a, b: a == b) -> list[Sample]:
    """Up to `n_turns` questions on `scene` by `ask(scene, family, rng)` (either world's), families drawn by
    weight (read only where there is a label, and once a picture: repeats teach nothing new), no question asked
    twice (as `same` compares them)."""
    weights = family_weights or {f: 1.0 for f in FAMILIES}
    fams = [f for f in FAMILIES if weights.get(f, 0) > 0 and (f != "read" or scene.label is not None)]
    p = np.array([weights[f] for f in fams], dtype=float)
    p /= p.sum()
    samples: list[Sample] = []
    tries = 0
    while len(samples) < n_turns and tries < n_turns * 10:
        tries += 1
        fam = fams[int(rng.choice(len(fams), p=p))]
        if fam == "read" and any(s.family == "read" for s in samples):
            continue
        s = ask(scene, fam, rng)
        if s is not None and all(not same(s.question, t.question) for t in samples):
            samples.append(s)
    return samples


HELDOUT_SEED = 10_000_000  # training seeds stay far below this


def heldout_sample(index: int, seed: int = HELDOUT_SEED) -> tuple[Scene, Sample]:
    """Held-out sample `index`: families round-robin, 3-12 objects, a label when the question reads one."""
    return draw_heldout(index, seed, 4, 3, make_scene, ask)


def draw_heldout(index: int, seed: int, stream: int, min_objects: int, make_scene, ask):
    """Held-out (scene, sample) `index` of a world given by its `make_scene` and `ask`: families round-robin,
    min_objects..MAX_OBJECTS objects, a label when the question reads one (and 30% of the time otherwise); a
    scene the family cannot ask about is passed over for the next seed."""
    family = FAMILIES[index % len(FAMILIES)]
    k = 0
    while True:
        s = seed + index * 101 + k
        rng = np.random.default_rng([s, stream])
        scene = make_scene(s, int(rng.integers(min_objects, MAX_OBJECTS + 1)),
                           with_label=family == "read" or rng.random() < 0.3)
        sample = ask(scene, family, rng)
        if sample is not None:
            return scene, sample
        k += 1


def render_set(draw, render, n: int, seed: int) -> list[tuple[Image.Image, Sample]]:
    """The first `n` samples `draw(i, seed)` with their pictures `render(scene)`."""
    return [(render(scene), sample) for scene, sample in (draw(i, seed) for i in range(n))]


def heldout_set(n: int, seed: int = HELDOUT_SEED) -> list[tuple[Image.Image, Sample]]:
    """The first `n` held-out samples with their pictures."""
    return render_set(heldout_sample, render, n, seed)
