"""High-resolution scenes: pictures at LLaVA-NeXT's anyres sizes with several small objects and a small label card,
whose questions need the detail; deterministic from a seed.

The v2 world (`world.py`) draws 336x336 pictures, one view of LLaVA-1.5. Here a picture is one of the anyres
pinpoint sizes (width x height), each as often: 672x672, 1008x336, 336x1008, 672x336 or 336x672. At those
sizes LLaVA-NeXT's processor cuts the picture into 336-px tiles at full resolution (no resize) and adds a base
view of the whole picture squeezed to 336x336.

- objects: 3 to 12 (fewer on the smaller sizes), distinct (colour, shape) pairs, sides 42-56 px: 3-4 patches a
  side in a tile (at this model's scale smaller objects were learned far more slowly), but only 1.5-2 patches in
  the base view of a 672x672 picture and 14-19 px wide in that of a 1008x336 one, so the base view alone blurs
  them;
- a label card of 42-52 px with one character (`world.LABEL_CHARS`) in half of the pictures;
- the v2 world's colours, shapes, drawing (`world._draw_shape`), backgrounds (plain, gradient, noise, texture;
  light or dark) and label lettering, drawn at the picture's own size;
- questions of the seven families in the v2 world's phrasings and vocabulary (colour, shape, exist, count,
  position, relation, read); counts are over the whole picture (by shape, by colour, or every object), position
  is the third of the whole picture (rows of its height, columns of its width) an object's centre lies in. No
  question uses a size word: every object is small.

Evidence: the cells of a 14-px grid over the whole picture (row * (width // 14) + col) covered >= 5% by the
objects the answer depends on; at these sizes that is the grid the tiles see at full resolution.

    from sparsevlm.scenes import hires
    scene, sample = hires.heldout_sample(0)      # Sample(question, answer, family, evidence)
    image = hires.render(scene)                  # PIL image, scene.width x scene.height
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from . import world
from .strokes import draw_strokes
from .world import COLOURS, COVER_FRACTION, FAMILIES, LABEL_CHARS, NUMBERS, PATCH, PLURALS, SHAPES, Sample

# (width, height): LLaVA-NeXT's default pinpoints, each a grid of 336-px tiles, drawn equally often.
SIZES: tuple[tuple[int, int], ...] = ((672, 672), (1008, 336), (336, 1008), (672, 336), (336, 672))
SIZE_WEIGHTS = (0.2, 0.2, 0.2, 0.2, 0.2)
OBJECT_SIDE = (42, 56)  # px, inclusive
CARD_SIDE = (42, 52)
MIN_OBJECTS = 3
POSITION_MARGIN = 16  # px between an object's centre and a third's border for a position question
HIRES_HELDOUT_SEED = 50_000_000  # held-out pictures; training seeds stay below 10,000,000
HIRES_TRAIN_SEED = 7_000_000  # training pictures start here (apart from the v2 world's training seeds)


def max_objects(width: int, height: int) -> int:
    """The most objects a picture of this size gets: 3 per 336x336 tile of area, at most 12."""
    return min(12, 3 * (width * height) // (336 * 336))


@dataclass
class HiresObject:
    shape: str
    colour: str
    side: int
    x0: int
    y0: int
    fill: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.side - 1, self.y0 + self.side - 1

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + (self.side - 1) / 2, self.y0 + (self.side - 1) / 2


@dataclass
class HiresScene:
    seed: int
    width: int
    height: int
    objects: list[HiresObject]
    background: str  # one of world.BACKGROUNDS
    dark: bool
    base: tuple[int, int, int]
    label: str | None = None
    label_box: tuple[int, int, int, int] | None = None  # inclusive pixel box
    label_style: world.LabelStyle | None = None  # None: Pillow's default font, as every held-out picture
    _masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def third(self, x: float, y: float) -> tuple[int, int]:
        """(row, column) of thirds of the whole picture that the point lies in."""
        return min(2, int(3 * y // self.height)), min(2, int(3 * x // self.width))

    def clear_position(self, x: float, y: float) -> bool:
        """Whether the point is >= POSITION_MARGIN px from every border between thirds."""
        return all(min(abs(v - side / 3), abs(v - 2 * side / 3)) >= POSITION_MARGIN
                   for v, side in ((x, self.width), (y, self.height)))


def _overlaps(box, boxes, gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 <= b[2] + gap and b[0] <= x1 + gap and y0 <= b[3] + gap and b[1] <= y1 + gap for b in boxes)


def make_scene(seed: int, size: tuple[int, int], n_objects: int, with_label: bool) -> HiresScene:
    """A scene of `size` (width, height) with `n_objects` objects (distinct colour-shape pairs, anywhere, apart)
    and maybe a label card."""
    width, height = size
    rng = np.random.default_rng([seed, 51])
    n_objects = int(min(max(n_objects, 1), max_objects(width, height)))
    dark = bool(rng.random() < 0.35)
    background = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
    grey = int(rng.integers(15, 75)) if dark else int(rng.integers(170, 245))
    base = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-10, 11, size=3))
    boxes: list[tuple[int, int, int, int]] = []

    def place(side: int):
        for _ in range(300):
            x0 = int(rng.integers(2, width - side - 2))
            y0 = int(rng.integers(2, height - side - 2))
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if not _overlaps(box, boxes, 6):
                boxes.append(box)
                return box
        return None

    label, label_box = None, None
    if with_label:
        label_box = place(int(rng.integers(CARD_SIDE[0], CARD_SIDE[1] + 1)))
    objects: list[HiresObject] = []
    for pair in rng.permutation(len(COLOURS) * len(SHAPES))[:n_objects]:
        side = int(rng.integers(OBJECT_SIDE[0], OBJECT_SIDE[1] + 1))
        box = place(side)
        if box is None:
            continue
        colour = list(COLOURS)[int(pair) // len(SHAPES)]
        scale = rng.uniform(0.9, 1.05)  # the v2 world's jitter (keeps yellow and orange apart)
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour], float) * scale + rng.integers(-15, 16, 3),
                                             0, 255))
        objects.append(HiresObject(SHAPES[int(pair) % len(SHAPES)], colour, side, box[0], box[1], fill))
    if label_box is not None:
        label = LABEL_CHARS[int(rng.integers(len(LABEL_CHARS)))]
    return HiresScene(seed, width, height, objects, background, dark, base, label, label_box)


def _background(scene: HiresScene, rng: np.random.Generator) -> np.ndarray:
    """The v2 world's backgrounds (`world._background`) at the picture's own size; patterns keep their pixel
    scale, gradients span the whole picture."""
    h, w = scene.height, scene.width
    img = np.broadcast_to(np.array(scene.base, dtype=np.float32), (h, w, 3)).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if scene.background == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx / w + np.sin(angle) * yy / h
        t = (t - t.min()) / max(1e-6, t.max() - t.min())
        img += t[..., None] * rng.uniform(25, 55) * (1 if scene.dark else -1)
    elif scene.background == "noise":
        img += rng.normal(0, rng.uniform(5, 14), size=img.shape)
    elif scene.background == "texture":
        period = int(rng.integers(6, 21))
        amp = rng.uniform(8, 18)
        if rng.random() < 0.5:
            angle = rng.uniform(0, np.pi)
            pattern = (((np.cos(angle) * xx + np.sin(angle) * yy) // period) % 2).astype(np.float32)
        else:
            pattern = (((xx // period) + (yy // period)) % 2).astype(np.float32)
        img += (pattern[..., None] - 0.5) * amp
    return img


def render(scene: HiresScene) -> Image.Image:
    """The scene as a width x height RGB picture."""
    rng = np.random.default_rng([scene.seed, 52])
    img = Image.fromarray(np.clip(_background(scene, rng), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        world._draw_shape(draw, o.shape, o.x0, o.y0, o.side, o.fill)  # noqa: SLF001 - the v2 world's own drawing
    if scene.label is not None:
        x0, y0, x1, y1 = scene.label_box
        st = scene.label_style
        if st is None:
            draw.rectangle([x0, y0, x1, y1], fill=(250, 250, 250), outline=(60, 60, 60), width=2)
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2 + 1), scene.label, fill=(0, 0, 0),
                      font=world._font(int((x1 - x0) * 0.72)), anchor="mm")  # noqa: SLF001
        else:
            draw.rectangle([x0, y0, x1, y1], fill=(st.card,) * 3, outline=(60, 60, 60), width=2)
            if st.strokes:
                draw_strokes(img, scene.label_box, scene.label, st.seed, st.scale, st.ink, st.card)
            else:
                ink = (st.ink,) * 3
                draw.text(((x0 + x1) / 2, (y0 + y1) / 2 + 1), scene.label, fill=ink, anchor="mm",
                          font=world._style_font(st.font, max(8, int((x1 - x0) * st.scale))),  # noqa: SLF001
                          stroke_width=st.stroke, stroke_fill=ink)
    if rng.random() < 0.5:
        arr = np.asarray(img).astype(np.int16)
        arr += rng.integers(-6, 7, size=arr.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def object_mask(scene: HiresScene, index: int) -> np.ndarray:
    """Boolean height x width mask of object `index` (-1: the label card)."""
    if index not in scene._masks:
        m = Image.new("L", scene.size, 0)
        d = ImageDraw.Draw(m)
        if index == -1:
            d.rectangle(scene.label_box, fill=255)
        else:
            o = scene.objects[index]
            world._draw_shape(d, o.shape, o.x0, o.y0, o.side, 255)  # noqa: SLF001
        scene._masks[index] = np.asarray(m) > 0
    return scene._masks[index]


def covered_cells(scene: HiresScene, indices: list[int]) -> list[int]:
    """Cells of the full-resolution 14-px grid (row * (width // 14) + col) covered >= 5% by the given items."""
    if not indices:
        return []
    mask = np.zeros((scene.height, scene.width), dtype=bool)
    for i in indices:
        mask |= object_mask(scene, i)
    rows, cols = scene.height // PATCH, scene.width // PATCH
    frac = mask[: rows * PATCH, : cols * PATCH].reshape(rows, PATCH, cols, PATCH).mean(axis=(1, 3))
    return [int(j) for j in np.flatnonzero(frac.reshape(-1) >= COVER_FRACTION)]


def describe(scene: HiresScene) -> str:
    """The scene in words, items in reading order (top to bottom, then left to right, by their top-left
    corner): "a red circle at the top left , a label with 5 at the bottom middle ."."""
    items = [(o.y0, o.x0, i) for i, o in enumerate(scene.objects)]
    if scene.label is not None:
        items.append((scene.label_box[1], scene.label_box[0], -1))
    parts = []
    for _, _, i in sorted(items):
        if i == -1:
            b = scene.label_box
            r, c = scene.third((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
            parts.append(f"a label with {scene.label.lower()} at the {world.ROWS[r]} {world.COLUMNS[c]}")
        else:
            o = scene.objects[i]
            r, c = scene.third(*o.centre)
            parts.append(f"{world.article(o.colour)} {o.colour} {o.shape} at the {world.ROWS[r]} {world.COLUMNS[c]}")
    return " , ".join(parts) + " ."


_pick = world._pick  # noqa: SLF001 - the v2 world's helpers, so phrasings are drawn the same way
_surface = world._surface  # noqa: SLF001


def ask(scene: HiresScene, family: str, rng: np.random.Generator) -> Sample | None:
    """One question of `family` about `scene` in the v2 world's phrasings, or None when the scene has none."""
    objs = scene.objects
    n = len(objs)
    if n == 0 and family != "read":
        return None
    if family == "colour":
        cands = [i for i in range(n) if sum(o.shape == objs[i].shape for o in objs) == 1]
        if not cands:
            return None
        i = _pick(rng, cands)
        word, ref = _pick(rng, ("colour", "color")), objs[i].shape
        q = _pick(rng, (f"what {word} is the {ref} ?", f"what is the {word} of the {ref} ?",
                        f"which {word} is the {ref} ?", f"what {word} is the {ref} in the picture ?"))
        return Sample(_surface(q, rng), objs[i].colour, family, covered_cells(scene, [i]))
    if family == "shape":
        cands = [i for i in range(n) if sum(o.colour == objs[i].colour for o in objs) == 1]
        if not cands:
            return None
        i = _pick(rng, cands)
        ref = f"{objs[i].colour} {_pick(rng, ('object', 'thing', 'one'))}"
        q = _pick(rng, (f"what shape is the {ref} ?", f"what is the shape of the {ref} ?",
                        f"which shape is the {ref} ?", f"what shape does the {ref} have ?"))
        return Sample(_surface(q, rng), objs[i].shape, family, covered_cells(scene, [i]))
    if family == "exist":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            i = int(rng.integers(n))
            c, s, answer, related = objs[i].colour, objs[i].shape, "yes", [i]
        else:
            colours, shapes = {o.colour for o in objs}, {o.shape for o in objs}
            hard = [(c, s) for c in colours for s in shapes if (c, s) not in present]
            if hard and rng.random() < 0.8:
                c, s = _pick(rng, sorted(hard))
            else:
                c, s = _pick(rng, [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
            answer, related = "no", [i for i, o in enumerate(objs) if o.colour == c or o.shape == s]
        a = world.article(c)
        q = _pick(rng, (f"is there {a} {c} {s} ?", f"is there any {c} {s} ?", f"are there any {c} {PLURALS[s]} ?",
                        f"do you see {a} {c} {s} ?", f"is there {a} {c} {s} in the picture ?",
                        f"is there {a} {c} {s} in the image ?", f"can you see {a} {c} {s} ?"))
        return Sample(_surface(q, rng), answer, family, covered_cells(scene, related))
    if family == "count":
        u = rng.random()
        if u < 0.2:  # every object in the picture
            idx, what = list(range(n)), _pick(rng, ("objects", "things", "shapes"))
        elif u < 0.6:
            key = objs[int(rng.integers(n))].shape if rng.random() < 0.85 else _pick(rng, SHAPES)
            idx, what = [i for i, o in enumerate(objs) if o.shape == key], PLURALS[key]
        else:
            key = objs[int(rng.integers(n))].colour if rng.random() < 0.85 else _pick(rng, list(COLOURS))
            idx = [i for i, o in enumerate(objs) if o.colour == key]
            what = f"{key} {_pick(rng, ('objects', 'things', 'shapes'))}"
        if len(idx) >= len(NUMBERS):
            return None
        q = _pick(rng, (f"how many {what} are there ?", f"how many {what} are in the picture ?",
                        f"how many {what} are in the image ?", f"how many {what} can you see ?",
                        f"how many {what} do you see ?"))
        return Sample(_surface(q, rng), NUMBERS[len(idx)], family, covered_cells(scene, idx))
    if family == "position":
        cands = [i for i in range(n) if scene.clear_position(*objs[i].centre)]
        if not cands:
            return None
        i = _pick(rng, cands)
        name = objs[i].name
        row, col = scene.third(*objs[i].centre)
        if rng.random() < 0.5:
            q = _pick(rng, (f"which row is the {name} in ?", f"in which row is the {name} ?",
                            f"is the {name} in the top , middle or bottom row ?"))
            answer = world.ROWS[row]
        else:
            q = _pick(rng, (f"which column is the {name} in ?", f"in which column is the {name} ?",
                            f"is the {name} in the left , middle or right column ?"))
            answer = world.COLUMNS[col]
        return Sample(_surface(q, rng), answer, family, covered_cells(scene, [i]))
    if family == "relation":
        if n < 2:
            return None
        horizontal = rng.random() < 0.5
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j and (
            objs[i].box[2] < objs[j].box[0] if horizontal else objs[i].box[3] < objs[j].box[1])]
        if not pairs:
            return None
        i, j = _pick(rng, pairs)
        want_yes, flipped = rng.random() < 0.5, rng.random() < 0.5
        if horizontal:
            rel = _pick(rng, ("to the right of", "right of")) if flipped else _pick(rng, ("to the left of", "left of"))
        else:
            rel = _pick(rng, ("below", "under")) if flipped else "above"
        a, b = (i, j) if want_yes != flipped else (j, i)
        q = f"is the {objs[a].name} {rel} the {objs[b].name} ?"
        return Sample(_surface(q, rng), "yes" if want_yes else "no", family, covered_cells(scene, [a, b]))
    if family == "read":
        if scene.label is None:
            return None
        q = _pick(rng, ("what is written on the label ?", "what does the label say ?", "what is on the card ?",
                        "what letter is on the label ?", "what is written on the card ?",
                        "which character is on the label ?"))
        return Sample(_surface(q, rng), scene.label.lower(), family, covered_cells(scene, [-1]))
    raise ValueError(f"unknown question family {family!r}")


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    return SIZES[int(rng.choice(len(SIZES), p=SIZE_WEIGHTS))]


def questions(scene: HiresScene, rng: np.random.Generator, n: int, weights: dict[str, float] | None = None,
              ) -> list[Sample]:
    """Up to `n` distinct questions about `scene`, families drawn by weight (read once at most)."""
    weights = weights or {f: 1.0 for f in FAMILIES}
    fams = [f for f in FAMILIES if weights.get(f, 0) > 0 and (f != "read" or scene.label is not None)]
    p = np.array([weights[f] for f in fams], dtype=float)
    p /= p.sum()
    out: list[Sample] = []
    for _ in range(n * 10):
        if len(out) >= n:
            break
        fam = fams[int(rng.choice(len(fams), p=p))]
        if fam == "read" and any(s.family == "read" for s in out):
            continue
        s = ask(scene, fam, rng)
        if s is not None and all(s.question.lower() != t.question.lower() for t in out):
            out.append(s)
    return out


def training_scene(seed: int, n_turns: int, weights: dict[str, float] | None = None,
                   ) -> tuple[HiresScene, list[Sample]]:
    """A training picture (a size drawn by SIZE_WEIGHTS, MIN_OBJECTS..max objects, a label half of the time)
    and up to `n_turns` questions about it."""
    rng = np.random.default_rng([seed, 53])
    size = draw_size(rng)
    n = int(rng.integers(MIN_OBJECTS, max_objects(*size) + 1))
    scene = make_scene(seed, size, n, with_label=bool(rng.random() < 0.5))
    return scene, questions(scene, rng, n_turns, weights)


def heldout_picture(index: int, seed: int = HIRES_HELDOUT_SEED) -> tuple[HiresScene, list[Sample]]:
    """Held-out picture `index` and one question of each family it allows (in FAMILIES order; read only when it
    has a label, which 40% of held-out pictures do)."""
    rng = np.random.default_rng([seed + index, 54])
    size = draw_size(rng)
    n = int(rng.integers(MIN_OBJECTS, max_objects(*size) + 1))
    scene = make_scene(seed + index, size, n, with_label=bool(rng.random() < 0.4))
    samples = [s for f in FAMILIES if (s := ask(scene, f, rng)) is not None]
    return scene, samples
