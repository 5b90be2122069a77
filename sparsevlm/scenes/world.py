"""The world the embedded model is trained on: scenes of 1-12 objects of ~2x2 to ~8x8 patches anywhere, varied
backgrounds, questions with common paraphrases, and scene descriptions in words; deterministic from a seed.

A scene is a 336x336 picture (a 24x24 grid of 14 px patches, as LLaVA-1.5 sees it); `worlds.py` puts it and the
independent renderer behind one interface. This module also holds what every world shares: the colour and shape
names, the question families, the answer words and the `Sample` record.

- objects: distinct (colour, shape) pairs; sides drawn from three size classes with gaps between them (small
  28-42 px = 2-3 patches, medium 52-70 px, big 82-112 px = 6-8 patches), so a size word is never ambiguous; any
  pixel position, non-overlapping boxes; the largest class allowed shrinks as the object count grows so 12 fit;
- backgrounds: plain, gradient, noisy or textured (stripes / checks), light or dark, slightly tinted (training
  pictures may get a stronger hue: `vary_background`, train_llava --tinted-backgrounds);
- colour jitter of +-15 per channel and a brightness factor of 0.9-1.05; a label card of 42-56 px anywhere with
  one character on it;
- questions in several phrasings ("what color is ...", "what is the colour of the ...", "?" with or without a
  space, a capital first letter) - the tokenizer lower-cases and splits punctuation, so they all reach the model;
- `describe(scene)`: the scene in words (size, colour, shape, position of every object in reading order), the
  caption of the feature-alignment phase and the context of the language-pretraining phase.

Every sample records its evidence patches: the grid cells (row * 24 + col) covered >= `COVER_FRACTION` by the
masks of the objects the answer depends on. Per family:

- colour / shape / position: the object asked about.
- exist, answer yes: the object asked about. Answer no: every object sharing the asked colour or the asked
  shape (the hard negatives a model has to look at to say no); empty when no object shares either.
- count: every object counted (empty for zero).
- relation: both objects.
- read: the label card.

Positions: an object's row / column is the third of the picture its centre lies in; position questions only
ask about objects whose centre is >= 10 px from a third's border, relation questions only about pairs whose
boxes are apart along the asked axis (so the answer is clear to the eye).
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .strokes import draw_strokes

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 patches a side -> 576 visual tokens
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
LABEL_CHARS = "23456789EHKX"
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
FAMILIES = ("colour", "shape", "exist", "count", "position", "relation", "read")
MAX_OBJECTS = 12

SIZE_CLASSES: dict[str, tuple[int, int]] = {"small": (28, 42), "medium": (52, 70), "big": (82, 112)}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
THIRD = IMAGE_SIZE / 3
POSITION_MARGIN = 10  # px between an object's centre and a third's border for a position question
BACKGROUNDS = ("plain", "gradient", "noise", "texture")
HELDOUT_SEED = 30_000_000  # held-out seeds; training seeds stay below 10,000,000
CAPTION_PROMPTS = ("describe the picture .", "describe the image .", "what is in the picture ?",
                   "what do you see in the image ?")

# The words of the plainest questions, first in the vocabulary: their order fixes the embedded model's token ids.
QUESTION_WORDS = (
    "what", "colour", "is", "the", "shape", "object", "objects", "how", "many", "are", "there", "which", "row",
    "column", "in", "left", "of", "above", "is", "there", "a", "written", "on", "label", "?", "small", "big",
)
# Words after the answers: paraphrases users type, size / position words, the caption's function words.
EXTRA_WORDS = (
    "color", "colors", "colour", "colours", "shapes", "thing", "things", "one", "picture", "image", "this", "it",
    "its", "any", "do", "does", "you", "see", "can", "at", "to", "and", "or", "with", "right", "below", "under",
    "top", "bottom", "middle", "center", "centre", "medium", "large", "tiny", "describe", "card", "letter",
    "character", "say", "says", "number", "kind", "type", "tell", "me", "please", "where", "count", "has",
    "have", "be", "here", "an", "there", ".", ",", "'", "s", "!", "\u2019",
)


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
    """Every word a question, an answer or a caption uses, in token-id order (the tokenizer adds specials and the
    chat template's words): the plain question words, the plurals, the answers, then the paraphrase words."""
    return list(dict.fromkeys([*QUESTION_WORDS, *PLURALS.values(), *answer_words(), *EXTRA_WORDS]))


@dataclass
class Object2:
    shape: str
    colour: str
    side: int  # px
    x0: int
    y0: int
    fill: tuple[int, int, int]

    @property
    def size(self) -> str:
        return next(name for name, (lo, hi) in SIZE_CLASSES.items() if lo <= self.side <= hi)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.side - 1, self.y0 + self.side - 1

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + (self.side - 1) / 2, self.y0 + (self.side - 1) / 2

    @property
    def row(self) -> int:
        return min(2, int(self.centre[1] // THIRD))

    @property
    def col(self) -> int:
        return min(2, int(self.centre[0] // THIRD))

    def clear_position(self) -> bool:
        """Centre far enough from a third's border that its row and column are plain to see."""
        return all(min(abs(v - THIRD), abs(v - 2 * THIRD)) >= POSITION_MARGIN for v in self.centre)


@dataclass(frozen=True)
class LabelStyle:
    """The lettering of a label card in a training picture: a font file (None: Pillow's default scalable font),
    the glyph height as a share of the card, an extra stroke width in px (bolder) and the ink and card greys."""

    font: str | None
    scale: float
    stroke: int
    ink: int
    card: int
    strokes: bool = False  # lettered with strokes.draw_strokes (a single-stroke hand of this project's own)
    seed: int = 0  # the stroke hand's slant, stretch and wobble


@dataclass
class Scene2:
    seed: int
    objects: list[Object2]
    background: str  # one of BACKGROUNDS
    dark: bool
    base: tuple[int, int, int]
    label: str | None = None
    label_box: tuple[int, int, int, int] | None = None  # inclusive pixel box
    # How the label is lettered; None: Pillow's own scalable font, as every held-out and studio picture is.
    # Training pictures get other typefaces with `vary_label` (train_llava --label-fonts).
    label_style: LabelStyle | None = None
    _masks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def label_row(self) -> int:
        assert self.label_box is not None
        return min(2, int((self.label_box[1] + self.label_box[3]) / 2 // THIRD))

    @property
    def label_col(self) -> int:
        assert self.label_box is not None
        return min(2, int((self.label_box[0] + self.label_box[2]) / 2 // THIRD))


# ----------------------------------------------------------------------------------------------- scenes


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


def _largest_class(n_objects: int) -> int:
    """Index into SIZE_CLASSES of the largest class used with `n_objects` (so that they fit)."""
    return 2 if n_objects <= 4 else 1


def _overlaps(box, boxes, gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 <= b[2] + gap and b[0] <= x1 + gap and y0 <= b[3] + gap and b[1] <= y1 + gap for b in boxes)


def make_scene(seed: int, n_objects: int, with_label: bool) -> Scene2:
    """A scene: `n_objects` objects with distinct (colour, shape) pairs, anywhere, and maybe a label card."""
    rng = np.random.default_rng([seed, 21])
    n_objects = int(min(max(n_objects, 1), MAX_OBJECTS))
    dark = bool(rng.random() < 0.35)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    grey = int(rng.integers(15, 75)) if dark else int(rng.integers(170, 245))
    base = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-10, 11, size=3))
    boxes: list[tuple[int, int, int, int]] = []
    label_box = None
    if with_label:
        side = int(rng.integers(42, 57))
        for _ in range(200):
            x0, y0 = (int(v) for v in rng.integers(2, IMAGE_SIZE - side - 2, size=2))
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if not _overlaps(box, boxes, 4):
                label_box = box
                boxes.append(box)
                break
    pairs = rng.permutation(len(COLOURS) * len(SHAPES))[:n_objects]
    classes = list(SIZE_CLASSES)
    top = _largest_class(n_objects)
    objects: list[Object2] = []
    for pair in pairs:
        k = int(rng.integers(top + 1))
        placed = False
        while not placed:
            lo, hi = SIZE_CLASSES[classes[k]]
            side = int(rng.integers(lo, hi + 1))
            for _ in range(150):
                x0, y0 = (int(v) for v in rng.integers(2, IMAGE_SIZE - side - 2, size=2))
                box = (x0, y0, x0 + side - 1, y0 + side - 1)
                if not _overlaps(box, boxes, 4):
                    placed = True
                    break
            if not placed:
                if k == 0:
                    break  # no room even for a small one: fewer objects
                k -= 1
        if not placed:
            continue
        boxes.append(box)
        colour = list(COLOURS)[int(pair) // len(SHAPES)]
        base_rgb = np.array(COLOURS[colour], dtype=np.float64)
        # Jitter kept small enough that the darkest yellow stays apart from the brightest orange (green channel
        # >= 169 against <= 157), so every colour word is right to the eye.
        scale = rng.uniform(0.9, 1.05)
        fill = tuple(int(v) for v in np.clip(base_rgb * scale + rng.integers(-15, 16, size=3), 0, 255))
        objects.append(Object2(SHAPES[int(pair) % len(SHAPES)], colour, side, x0, y0, fill))
    scene = Scene2(seed=seed, objects=objects, background=background, dark=dark, base=base)
    if label_box is not None:
        scene.label = LABEL_CHARS[int(rng.integers(len(LABEL_CHARS)))]
        scene.label_box = label_box
    return scene


def _background(scene: Scene2, rng: np.random.Generator) -> np.ndarray:
    base = np.array(scene.base, dtype=np.float32)
    img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE
    if scene.background == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(1e-6, t.max() - t.min())
        span = rng.uniform(25, 55) * (1 if scene.dark else -1)
        img += t[..., None] * span
    elif scene.background == "noise":
        img += rng.normal(0, rng.uniform(5, 14), size=img.shape)
    elif scene.background == "texture":
        period = int(rng.integers(6, 21))
        amp = rng.uniform(8, 18)
        px = np.arange(IMAGE_SIZE)
        if rng.random() < 0.5:  # stripes at a random orientation
            angle = rng.uniform(0, np.pi)
            t = np.cos(angle) * xx * IMAGE_SIZE + np.sin(angle) * yy * IMAGE_SIZE
            pattern = ((t // period) % 2).astype(np.float32)
        else:  # checks
            pattern = (((px[:, None] // period) + (px[None, :] // period)) % 2).astype(np.float32)
        img += (pattern[..., None] - 0.5) * amp
    return img


def render(scene: Scene2) -> Image.Image:
    """The scene as a 336x336 RGB picture."""
    rng = np.random.default_rng([scene.seed, 22])
    img = Image.fromarray(np.clip(_background(scene, rng), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.x0, obj.y0, obj.side, obj.fill)
    if scene.label is not None:
        x0, y0, x1, y1 = scene.label_box
        st = scene.label_style
        if st is None:
            draw.rectangle([x0, y0, x1, y1], fill=(250, 250, 250), outline=(60, 60, 60), width=2)
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2 + 1), scene.label, fill=(0, 0, 0),
                      font=_font(int((x1 - x0) * 0.72)), anchor="mm")
        else:
            draw.rectangle([x0, y0, x1, y1], fill=(st.card,) * 3, outline=(60, 60, 60), width=2)
            ink = (st.ink,) * 3
            if st.strokes:
                draw_strokes(img, scene.label_box, scene.label, st.seed, st.scale, st.ink, st.card)
            else:
                draw.text(((x0 + x1) / 2, (y0 + y1) / 2 + 1), scene.label, fill=ink, anchor="mm",
                          font=_style_font(st.font, max(8, int((x1 - x0) * st.scale))), stroke_width=st.stroke,
                          stroke_fill=ink)
    if rng.random() < 0.5:  # sensor-like noise over everything, objects included
        arr = np.asarray(img).astype(np.int16)
        arr += rng.integers(-6, 7, size=arr.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")


@lru_cache(maxsize=1)
def label_fonts() -> tuple[str | None, ...]:
    """Typefaces for training labels: Pillow's default (None) and every upright or slanted text face found in
    the system font folders (on this project's machines: DejaVu Sans / Serif / Mono, bold, condensed, oblique,
    light). Symbol and maths faces are left out. OpenCV's Hershey faces are never used: the independent renderer
    letters its cards with them, and it must stay a picture source no model was trained on."""
    found = sorted({str(f) for d in FONT_DIRS if Path(d).is_dir() for f in Path(d).rglob("*.[ot]tf")
                    if not any(w in f.name.lower() for w in ("math", "symbol", "emoji"))})
    return (None, *found)


_STYLE_FONTS: dict[tuple[str | None, int], ImageFont.FreeTypeFont] = {}


def _style_font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    if (path, size) not in _STYLE_FONTS:
        _STYLE_FONTS[path, size] = ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)
    return _STYLE_FONTS[path, size]


def vary_label(scene: Scene2, seed: int, default_share: float = 0.4, stroke_share: float = 0.0) -> Scene2:
    """The scene with its label lettered in a random typeface (`label_fonts`), glyph height 50-85% of the card,
    0-3 px of extra stroke, ink grey 0-70 and card grey 225-255 - or, `default_share` of the time, left as every
    held-out picture letters it; a scene without a label is returned unchanged.
    Only the label's look changes (its own random stream), so the questions and answers stay those of the scene.

    Why: every v2 picture letters its card in one face, and the model read 97% of v2 labels but 33% of the
    independent renderer's (an unseen face); typeface variety is what lets a reader generalise to new ones.
    `stroke_share` of the varied labels are lettered as strokes instead (`strokes.draw_strokes`, glyph height
    50-80%): with outline faces alone the model read 47% of the independent renderer's stroke-font labels.
    The default 0 letters every varied label in an outline typeface."""
    if scene.label is None:
        return scene
    rng = np.random.default_rng([seed, 29])
    if rng.random() < default_share:
        return scene
    if stroke_share > 0 and np.random.default_rng([seed, 30]).random() < stroke_share:
        scene.label_style = LabelStyle(font=None, scale=float(rng.uniform(0.5, 0.8)), stroke=0,
                                       ink=int(rng.integers(0, 71)), card=int(rng.integers(225, 256)), strokes=True,
                                       seed=seed)
        return scene
    fonts = label_fonts()
    style = LabelStyle(font=fonts[int(rng.integers(len(fonts)))], scale=float(rng.uniform(0.5, 0.85)),
                       stroke=int(rng.integers(0, 4)), ink=int(rng.integers(0, 71)), card=int(rng.integers(225, 256)))
    scene.label_style = style
    return scene


def vary_background(scene: Scene2, seed: int, share: float) -> Scene2:
    """`share` of the time, the scene's background base colour replaced by a hued one (any hue): pastel on a light
    scene (saturation 0.12-0.35, value 0.78-0.96), deep on a dark one (saturation 0.5-0.8, value 0.16-0.3); the
    gradient / noise / texture drawn on it stay. Objects, card and questions are untouched (own random stream).

    Why: every v2 background is grey within +-10 per channel, and on the independent renderer's pastel and deep
    coloured backgrounds the model over-counted objects of the background's hue (4 of the installed model's 16
    counting misses in 700 independent questions: green objects on light green). A user's picture may have any
    background. Tints stay far from the six object colours (the test checks > 70 apart in RGB).
    Held-out pictures are not varied; share 0 (the default in train_llava) draws what earlier phases trained on."""
    rng = np.random.default_rng([seed, 31])
    if share <= 0 or rng.random() >= share:
        return scene
    hue = float(rng.random())
    if scene.dark:
        sat, val = rng.uniform(0.5, 0.8), rng.uniform(0.16, 0.3)
    else:
        sat, val = rng.uniform(0.12, 0.35), rng.uniform(0.78, 0.96)
    scene.base = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, sat, val))
    return scene


def object_mask(scene: Scene2, index: int) -> np.ndarray:
    """Boolean 336x336 mask of object `index` (-1: the label card)."""
    if index not in scene._masks:
        m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        d = ImageDraw.Draw(m)
        if index == -1:
            d.rectangle(scene.label_box, fill=255)
        else:
            o = scene.objects[index]
            _draw_shape(d, o.shape, o.x0, o.y0, o.side, 255)
        scene._masks[index] = np.asarray(m) > 0
    return scene._masks[index]


def covered_patches(scene: Scene2, indices: list[int]) -> list[int]:
    """Sorted grid-cell indices (row * 24 + col) covered >= COVER_FRACTION by any of the given objects."""
    if not indices:
        return []
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i in indices:
        mask |= object_mask(scene, i)
    frac = mask.reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3))
    return [int(j) for j in np.flatnonzero(frac.reshape(-1) >= COVER_FRACTION)]


def items(scene: Scene2) -> list[int]:
    """Indices of everything drawn: the objects and -1 for the label card."""
    return list(range(len(scene.objects))) + ([-1] if scene.label is not None else [])


def patch_targets(scene: Scene2) -> np.ndarray:
    """Per-patch classes (4 x 576) for the vision tower's auxiliary heads: colour, shape, label character, object
    centre; 0 is background. A patch belongs to the item covering most of it (at least 30%); the centre row marks
    one patch per item (the one under its middle), a clean per-object signal for counting."""
    out = np.zeros((4, GRID * GRID), dtype=np.int64)
    best = np.full(GRID * GRID, 0.3)
    for i in items(scene):
        frac = object_mask(scene, i).reshape(GRID, PATCH, GRID, PATCH).mean(axis=(1, 3)).reshape(-1)
        take = frac > best
        best = np.where(take, frac, best)
        if i == -1:
            out[0, take] = len(COLOURS) + 1
            out[1, take] = len(SHAPES) + 1
            out[2, take] = LABEL_CHARS.index(scene.label) + 1
            x0, y0, x1, y1 = scene.label_box
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        else:
            o = scene.objects[i]
            out[0, take] = list(COLOURS).index(o.colour) + 1
            out[1, take] = SHAPES.index(o.shape) + 1
            out[2, take] = 0
            cx, cy = o.centre
        out[3, int(cy // PATCH) * GRID + int(cx // PATCH)] = 1
    return out


# ---------------------------------------------------------------------------------------- descriptions


def reading_order(scene: Scene2) -> list[int]:
    """Items (objects, -1 for the label) in the order the visual tokens reach them: by the raster index of the
    first patch they cover."""
    return sorted(items(scene), key=lambda i: covered_patches(scene, [i])[0])


def item_words(scene: Scene2, i: int) -> list[str]:
    """The compact words of one item (size colour shape row column; `label CHAR row column`)."""
    if i == -1:
        return ["label", scene.label.lower(), ROWS[scene.label_row], COLUMNS[scene.label_col]]
    o = scene.objects[i]
    return [o.size, o.colour, o.shape, ROWS[o.row], COLUMNS[o.col]]


def describe(scene: Scene2) -> str:
    """The scene in words, items in reading order: "a big red circle at the top left , a label with 5 at ..."."""
    parts = []
    for i in reading_order(scene):
        w = item_words(scene, i)
        if i == -1:
            parts.append(f"a label with {w[1]} at the {w[2]} {w[3]}")
        else:
            parts.append(f"{article(w[0])} {w[0]} {w[1]} {w[2]} at the {w[3]} {w[4]}")
    return " , ".join(parts) + " ."


# -------------------------------------------------------------------------------------------- questions


def article(word: str) -> str:
    """"a" or "an" before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _surface(q: str, rng: np.random.Generator) -> str:
    """Common surface variation: "?" attached or spaced, a capital first letter."""
    if q.endswith(" ?") and rng.random() < 0.5:
        q = q[:-2] + "?"
    if rng.random() < 0.3:
        q = q[0].upper() + q[1:]
    return q


def _colour_ref(scene: Scene2, i: int) -> str | None:
    obj = scene.objects[i]
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return obj.shape
    if sum(o.size == obj.size for o in same_shape) == 1:
        return f"{obj.size} {obj.shape}"
    return None


def _shape_ref(scene: Scene2, i: int, noun: str) -> str | None:
    obj = scene.objects[i]
    same_colour = [o for o in scene.objects if o.colour == obj.colour]
    if len(same_colour) == 1:
        return f"{obj.colour} {noun}"
    if sum(o.size == obj.size for o in same_colour) == 1:
        return f"{obj.size} {obj.colour} {noun}"
    return None


def ask(scene: Scene2, family: str, rng: np.random.Generator) -> Sample | None:
    """One question of `family` about `scene` in one of its phrasings, or None when the scene has none."""
    objs = scene.objects
    n = len(objs)
    if n == 0 and family != "read":
        return None
    if family == "colour":
        cands = [(i, r) for i in range(n) if (r := _colour_ref(scene, i))]
        if not cands:
            return None
        i, ref = _pick(rng, cands)
        word = _pick(rng, ("colour", "color"))
        q = _pick(rng, (f"what {word} is the {ref} ?", f"what is the {word} of the {ref} ?",
                        f"which {word} is the {ref} ?", f"what {word} is the {ref} in the picture ?"))
        return Sample(_surface(q, rng), objs[i].colour, family, covered_patches(scene, [i]))
    if family == "shape":
        noun = _pick(rng, ("object", "thing", "one"))
        cands = [(i, r) for i in range(n) if (r := _shape_ref(scene, i, noun))]
        if not cands:
            return None
        i, ref = _pick(rng, cands)
        q = _pick(rng, (f"what shape is the {ref} ?", f"what is the shape of the {ref} ?",
                        f"which shape is the {ref} ?", f"what shape does the {ref} have ?"))
        return Sample(_surface(q, rng), objs[i].shape, family, covered_patches(scene, [i]))
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
            answer = "no"
            related = [i for i, o in enumerate(objs) if o.colour == c or o.shape == s]
        a = article(c)
        q = _pick(rng, (f"is there {a} {c} {s} ?", f"is there any {c} {s} ?", f"are there any {c} {PLURALS[s]} ?",
                        f"do you see {a} {c} {s} ?", f"is there {a} {c} {s} in the picture ?",
                        f"is there {a} {c} {s} in the image ?", f"can you see {a} {c} {s} ?"))
        return Sample(_surface(q, rng), answer, family, covered_patches(scene, related))
    if family == "count":
        if rng.random() < 0.5:
            key = objs[int(rng.integers(n))].shape if rng.random() < 0.85 else _pick(rng, SHAPES)
            idx = [i for i, o in enumerate(objs) if o.shape == key]
            what = PLURALS[key]
        else:
            key = objs[int(rng.integers(n))].colour if rng.random() < 0.85 else _pick(rng, list(COLOURS))
            idx = [i for i, o in enumerate(objs) if o.colour == key]
            what = f"{key} {_pick(rng, ('objects', 'things', 'shapes'))}"
        if len(idx) >= len(NUMBERS):
            return None
        q = _pick(rng, (f"how many {what} are there ?", f"how many {what} are in the picture ?",
                        f"how many {what} are in the image ?", f"how many {what} can you see ?",
                        f"how many {what} do you see ?"))
        return Sample(_surface(q, rng), NUMBERS[len(idx)], family, covered_patches(scene, idx))
    if family == "position":
        cands = [i for i in range(n) if objs[i].clear_position()]
        if not cands:
            return None
        i = _pick(rng, cands)
        name = objs[i].name
        if rng.random() < 0.5:
            q = _pick(rng, (f"which row is the {name} in ?", f"in which row is the {name} ?",
                            f"is the {name} in the top , middle or bottom row ?"))
            answer = ROWS[objs[i].row]
        else:
            q = _pick(rng, (f"which column is the {name} in ?", f"in which column is the {name} ?",
                            f"is the {name} in the left , middle or right column ?"))
            answer = COLUMNS[objs[i].col]
        return Sample(_surface(q, rng), answer, family, covered_patches(scene, [i]))
    if family == "relation":
        if n < 2:
            return None
        horizontal = rng.random() < 0.5
        # (i, j): i entirely left of / above j along the asked axis.
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j and (
            objs[i].box[2] < objs[j].box[0] if horizontal else objs[i].box[3] < objs[j].box[1])]
        if not pairs:
            return None
        i, j = _pick(rng, pairs)
        want_yes = rng.random() < 0.5
        flipped = rng.random() < 0.5  # ask with the opposite word ("right of" / "below")
        if horizontal:
            rel = _pick(rng, ("to the right of", "right of")) if flipped else _pick(rng, ("to the left of", "left of"))
        else:
            rel = _pick(rng, ("below", "under")) if flipped else "above"
        a, b = (i, j) if want_yes != flipped else (j, i)
        q = f"is the {objs[a].name} {rel} the {objs[b].name} ?"
        return Sample(_surface(q, rng), "yes" if want_yes else "no", family, covered_patches(scene, [a, b]))
    if family == "read":
        if scene.label is None:
            return None
        q = _pick(rng, ("what is written on the label ?", "what does the label say ?", "what is on the card ?",
                        "what letter is on the label ?", "what is written on the card ?",
                        "which character is on the label ?"))
        return Sample(_surface(q, rng), scene.label.lower(), family, covered_patches(scene, [-1]))
    raise ValueError(f"unknown question family {family!r}")


# ---------------------------------------------------------------------------------------------- datasets


def training_scene(
    seed: int, n_turns: int, max_objects: int, family_weights: dict[str, float] | None = None
) -> tuple[Scene2, list[Sample]]:
    """A training scene (1..max_objects objects, a label half of the time) and up to `n_turns` questions."""
    rng = np.random.default_rng([seed, 23])
    scene = make_scene(seed, int(rng.integers(1, max_objects + 1)), with_label=bool(rng.random() < 0.5))
    return scene, _draw_questions(scene, rng, n_turns, family_weights)


def _draw_questions(scene: Scene2, rng: np.random.Generator, n_turns: int,
                    family_weights: dict[str, float] | None) -> list[Sample]:
    """Up to `n_turns` questions on `scene`, families drawn by weight (read only where there is a label, and once
    a picture: repeats teach nothing new), no question asked twice (case aside)."""
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
        if s is not None and all(s.question.lower() != t.question.lower() for t in samples):
            samples.append(s)
    return samples


def heldout_sample(index: int, seed: int = HELDOUT_SEED) -> tuple[Scene2, Sample]:
    """Held-out sample `index`: families round-robin, 1-12 objects, a label when the question reads one (and 30% of
    the time otherwise); a scene the family cannot ask about is passed over for the next seed."""
    family = FAMILIES[index % len(FAMILIES)]
    k = 0
    while True:
        s = seed + index * 101 + k
        rng = np.random.default_rng([s, 24])
        scene = make_scene(s, int(rng.integers(1, MAX_OBJECTS + 1)),
                           with_label=family == "read" or rng.random() < 0.3)
        sample = ask(scene, family, rng)
        if sample is not None:
            return scene, sample
        k += 1
