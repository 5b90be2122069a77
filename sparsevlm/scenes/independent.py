"""A second held-out set drawn by a renderer written independently of the training world (`world.py`).

Nothing here is shared with it except the words (colour / shape names, question families, the answer words a
model knows): its own palette, its own drawing code (OpenCV, anti-aliased; PIL drawn differently if `cv2` is
missing), its own shape proportions (equilateral triangles, narrow diamonds, thick or thin crosses, squares
turned a few degrees), continuous object sizes of 30-100 px (not the training size classes), its own
placement (rejection sampling on circles, not boxes), its own backgrounds (pastel or dark colours, smooth
colour blobs, vertical bands) and a label card lettered with an OpenCV Hershey font. Questions are phrased
in the common ways users ask (the model's vocabulary) and answered from this module's own geometry; evidence
patches come from its own masks (grid cells covered >= 5%).

    from sparsevlm.scenes.independent import independent_sample
    image, sample = independent_sample(0)   # PIL image, world.Sample (question, answer, family, evidence)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import FAMILIES, NUMBERS, Sample

try:
    import cv2
except ImportError:  # pragma: no cover - exercised only where OpenCV is absent
    cv2 = None

SIZE = 336
CELL = 14
CELLS = SIZE // CELL
INDEPENDENT_SEED = 40_000_000
# Its own palette (RGB): the same colour names, independently chosen values.
PALETTE = {
    "red": (205, 30, 50),
    "green": (35, 145, 75),
    "blue": (30, 95, 205),
    "yellow": (240, 210, 60),
    "purple": (125, 45, 165),
    "orange": (250, 145, 35),
}
SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
          "cross": "crosses"}
CARD_CHARS = "23456789EHKX"


@dataclass
class Thing:
    shape: str
    colour: str
    cx: float
    cy: float
    r: float  # half the object's extent
    turn: float  # degrees (squares only, a few)
    arm: float  # cross arm half-width / r
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def polygon(self) -> list[np.ndarray]:
        """The outline(s) as float polygons; circles are None (drawn as circles)."""
        c, r = np.array([self.cx, self.cy]), self.r
        if self.shape == "square":
            a = math.radians(self.turn)
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * r * 0.82
            return [pts @ rot.T + c]
        if self.shape == "triangle":  # equilateral, height 2r (wider than tall, unlike world.py's)
            half = r / math.sqrt(3) * 2
            return [np.array([[0, -r], [half, r], [-half, r]]) + c]
        if self.shape == "diamond":  # narrower than tall
            return [np.array([[0, -r], [0.72 * r, 0], [0, r], [-0.72 * r, 0]]) + c]
        if self.shape == "cross":
            t = self.arm * r
            return [np.array([[-r, -t], [r, -t], [r, t], [-r, t]]) + c,
                    np.array([[-t, -r], [t, -r], [t, r], [-t, r]]) + c]
        return []


@dataclass
class IndependentScene:
    seed: int
    things: list[Thing]
    card: tuple[int, int, int, int] | None  # x0, y0, x1, y1
    char: str | None
    background: np.ndarray  # 336x336x3 uint8


def _background(rng: np.random.Generator) -> np.ndarray:
    kind = int(rng.integers(3))
    dark = rng.random() < 0.3
    lo, hi = (10, 70) if dark else (175, 250)
    if kind == 0:  # one pastel / dark colour
        img = np.ones((SIZE, SIZE, 3)) * rng.uniform(lo, hi, size=3)
    elif kind == 1:  # smooth colour blobs: a 3x3 random field upsampled bilinearly
        small = rng.uniform(lo, hi, size=(3, 3, 3)).astype(np.float32)
        if cv2 is not None:
            img = cv2.resize(small, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
        else:
            img = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR), float)
    else:  # vertical bands of two close tones
        a, b = rng.uniform(lo, hi, size=3), rng.uniform(lo, hi, size=3)
        b = a + np.clip(b - a, -20, 20)
        width = int(rng.integers(20, 60))
        band = ((np.arange(SIZE) // width) % 2)[None, :, None]
        img = np.where(band == 1, b, a) * np.ones((SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_independent_scene(seed: int, n: int, with_card: bool) -> IndependentScene:
    rng = np.random.default_rng([seed, 41])
    combos = [(c, s) for c in PALETTE for s in SHAPE_NAMES]
    order = rng.permutation(len(combos))
    things: list[Thing] = []
    discs: list[tuple[float, float, float]] = []
    card, char = None, None
    if with_card:
        side = int(rng.integers(40, 60))
        x0, y0 = (int(v) for v in rng.integers(3, SIZE - side - 3, size=2))
        card, char = (x0, y0, x0 + side, y0 + side), CARD_CHARS[int(rng.integers(len(CARD_CHARS)))]
        discs.append((x0 + side / 2, y0 + side / 2, side * 0.72))
    r_max = 50.0 if n <= 3 else 38.0 if n <= 6 else 28.0
    for k in order[:n]:
        colour, shape = combos[int(k)]
        for _ in range(300):
            r = float(rng.uniform(15, r_max))
            cx, cy = (float(v) for v in rng.uniform(r + 3, SIZE - r - 3, size=2))
            if all(math.hypot(cx - x, cy - y) > r + rr + 6 for x, y, rr in discs):
                break
        else:
            continue
        discs.append((cx, cy, r * 1.42))  # squares turned by a few degrees reach past r
        rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + rng.integers(-18, 19, size=3), 0, 255))
        things.append(Thing(shape, colour, cx, cy, r, float(rng.uniform(-10, 10)), float(rng.uniform(0.22, 0.36)),
                            rgb))
    return IndependentScene(seed, things, card, char, _background(rng))


def _draw(canvas: np.ndarray, t: Thing, colour) -> None:
    if cv2 is not None:
        if t.shape == "circle":
            cv2.circle(canvas, (round(t.cx), round(t.cy)), round(t.r), colour, -1, lineType=cv2.LINE_AA)
        else:
            for poly in t.polygon():
                cv2.fillPoly(canvas, [np.round(poly * 16).astype(np.int32)], colour, lineType=cv2.LINE_AA, shift=4)
        return
    img = Image.fromarray(canvas)  # fallback: PIL, supersampled circles and polygons
    d = ImageDraw.Draw(img)
    if t.shape == "circle":
        d.ellipse([t.cx - t.r, t.cy - t.r, t.cx + t.r, t.cy + t.r], fill=colour)
    else:
        for poly in t.polygon():
            d.polygon([tuple(p) for p in poly], fill=colour)
    canvas[:] = np.asarray(img)


def render_independent(scene: IndependentScene) -> Image.Image:
    canvas = scene.background.copy()
    for t in scene.things:
        _draw(canvas, t, t.rgb)
    if scene.card is not None:
        x0, y0, x1, y1 = scene.card
        if cv2 is not None:
            cv2.rectangle(canvas, (x0, y0), (x1, y1), (255, 255, 255), -1)
            cv2.rectangle(canvas, (x0, y0), (x1, y1), (40, 40, 40), 1, lineType=cv2.LINE_AA)
            scale = (x1 - x0) / 36
            (w, h), _ = cv2.getTextSize(scene.char, cv2.FONT_HERSHEY_DUPLEX, scale, 2)
            org = (round((x0 + x1 - w) / 2), round((y0 + y1 + h) / 2))
            cv2.putText(canvas, scene.char, org, cv2.FONT_HERSHEY_DUPLEX, scale, (0, 0, 0), 2, cv2.LINE_AA)
        else:
            img = Image.fromarray(canvas)
            d = ImageDraw.Draw(img)
            d.rectangle([x0, y0, x1, y1], fill=(255, 255, 255), outline=(40, 40, 40))
            d.text(((x0 + x1) / 2, (y0 + y1) / 2), scene.char, fill=(0, 0, 0), anchor="mm")
            canvas = np.asarray(img).copy()
    return Image.fromarray(canvas)


def _mask(scene: IndependentScene, i: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE, 3), np.uint8)
    if i == -1:
        x0, y0, x1, y1 = scene.card
        m[y0 : y1 + 1, x0 : x1 + 1] = 255
    else:
        _draw(m, scene.things[i], (255, 255, 255))
    return m[..., 0] > 127


def evidence(scene: IndependentScene, idx: list[int]) -> list[int]:
    if not idx:
        return []
    m = np.zeros((SIZE, SIZE), bool)
    for i in idx:
        m |= _mask(scene, i)
    frac = m.reshape(CELLS, CELL, CELLS, CELL).mean(axis=(1, 3)).reshape(-1)
    return [int(j) for j in np.flatnonzero(frac >= 0.05)]


def _third(v: float) -> int | None:
    """Which third of the picture `v` lies in, None within 12 px of a border between thirds."""
    if min(abs(v - SIZE / 3), abs(v - 2 * SIZE / 3)) < 12:
        return None
    return min(2, int(v // (SIZE / 3)))


def ask_independent(scene: IndependentScene, family: str, rng: np.random.Generator) -> Sample | None:
    th = scene.things
    n = len(th)
    one = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if family == "colour":
        cands = [i for i in range(n) if sum(t.shape == th[i].shape for t in th) == 1]
        if not cands:
            return None
        i = one(cands)
        q = one([f"What color is the {th[i].shape}?", f"what colour is the {th[i].shape}?",
                 f"What is the color of the {th[i].shape}?"])
        return Sample(q, th[i].colour, family, evidence(scene, [i]))
    if family == "shape":
        cands = [i for i in range(n) if sum(t.colour == th[i].colour for t in th) == 1]
        if not cands:
            return None
        i = one(cands)
        q = one([f"What shape is the {th[i].colour} object?", f"what is the shape of the {th[i].colour} thing?"])
        return Sample(q, th[i].shape, family, evidence(scene, [i]))
    if family == "exist":
        if n == 0:
            return None
        if rng.random() < 0.5:
            i = int(rng.integers(n))
            c, s, ans, rel = th[i].colour, th[i].shape, "yes", [i]
        else:
            present = {(t.colour, t.shape) for t in th}
            absent = [(c, s) for c in PALETTE for s in SHAPE_NAMES if (c, s) not in present]
            c, s = one(absent)
            ans, rel = "no", [i for i, t in enumerate(th) if t.colour == c or t.shape == s]
        art = "an" if c[0] in "aeiou" else "a"
        q = one([f"Is there {art} {c} {s}?", f"is there {art} {c} {s} in the image?"])
        return Sample(q, ans, family, evidence(scene, rel))
    if family == "count":
        if n == 0:
            return None
        if rng.random() < 0.5:
            s = one([t.shape for t in th])
            idx = [i for i, t in enumerate(th) if t.shape == s]
            q = f"How many {PLURAL[s]} are there?"
        else:
            c = one([t.colour for t in th])
            idx = [i for i, t in enumerate(th) if t.colour == c]
            q = f"How many {c} objects are there?"
        return Sample(q, NUMBERS[len(idx)], family, evidence(scene, idx)) if len(idx) < len(NUMBERS) else None
    if family == "position":
        horizontal = rng.random() < 0.5
        cands = [i for i in range(n) if _third(th[i].cx if horizontal else th[i].cy) is not None]
        if not cands:
            return None
        i = one(cands)
        if horizontal:
            return Sample(f"Which column is the {th[i].name} in?", ("left", "middle", "right")[_third(th[i].cx)],
                          family, evidence(scene, [i]))
        return Sample(f"Which row is the {th[i].name} in?", ("top", "middle", "bottom")[_third(th[i].cy)],
                      family, evidence(scene, [i]))
    if family == "relation":
        horizontal = rng.random() < 0.5
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j and (
            th[i].cx + th[i].r < th[j].cx - th[j].r if horizontal else th[i].cy + th[i].r < th[j].cy - th[j].r)]
        if not pairs:
            return None
        i, j = one(pairs)
        yes = rng.random() < 0.5
        a, b = (i, j) if yes else (j, i)
        rel = "left of" if horizontal else "above"
        return Sample(f"Is the {th[a].name} {rel} the {th[b].name}?", "yes" if yes else "no", family,
                      evidence(scene, [a, b]))
    if family == "read":
        if scene.card is None:
            return None
        return Sample(one(["What is written on the label?", "what does the label say?"]), scene.char.lower(),
                      family, evidence(scene, [-1]))
    raise ValueError(family)


def independent_scene_sample(index: int, seed: int = INDEPENDENT_SEED) -> tuple[IndependentScene, Sample]:
    """Scene and sample `index` of the independent held-out set: families round-robin, 1-10 objects."""
    family = FAMILIES[index % len(FAMILIES)]
    k = 0
    while True:
        s = seed + index * 97 + k
        rng = np.random.default_rng([s, 42])
        scene = make_independent_scene(s, int(rng.integers(1, 11)), with_card=family == "read" or rng.random() < 0.3)
        sample = ask_independent(scene, family, rng)
        if sample is not None:
            return scene, sample
        k += 1


def independent_sample(index: int, seed: int = INDEPENDENT_SEED) -> tuple[Image.Image, Sample]:
    """Picture and sample `index` of the independent held-out set."""
    scene, sample = independent_scene_sample(index, seed)
    return render_independent(scene), sample


def independent_set(n: int, seed: int = INDEPENDENT_SEED) -> list[tuple[Image.Image, Sample]]:
    return [independent_sample(i, seed) for i in range(n)]
