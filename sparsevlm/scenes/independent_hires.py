"""High-resolution pictures drawn by the independent renderer (`independent.py`): a held-out set for models of the
high-resolution world (`hires.py`) that no model trains on.

It keeps everything that makes `independent.py` a separate source - its palette, its OpenCV drawing and shape
proportions (equilateral triangles, narrow diamonds, crosses of varied arm width, squares turned a few degrees),
placement by rejection sampling on circles, pastel or dark backgrounds of one colour, smooth blobs or vertical
bands, and a card lettered in an OpenCV Hershey face - and its question phrasings, at the anyres sizes of
`hires.SIZES`. Objects have continuous radii of 21-34 px (42-68 px across: 3-5 patches of a full-resolution tile,
not the training world's 42-56 px squares of side), 3 to 10 of them, and a card of 42-56 px. Position questions
ask for the third of the whole picture (rows of its height, columns of its width), 20 px clear of the borders.
Answers come from this module's own geometry; evidence cells are on the full-resolution 14-px grid, as `hires.py`
gives them.

    from sparsevlm.scenes import independent_hires
    scene, samples = independent_hires.heldout_picture(0)      # one question of each family it allows
    image = independent.render_independent(scene)              # the renderer's own drawing, at any size
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .independent import CARD_CHARS, PALETTE, PLURAL, SHAPE_NAMES, IndependentScene, Thing, _draw
from .world import COVER_FRACTION, FAMILIES, NUMBERS, PATCH, Sample

try:
    import cv2
except ImportError:  # pragma: no cover - exercised only where OpenCV is absent
    cv2 = None

SIZES: tuple[tuple[int, int], ...] = ((672, 672), (1008, 336), (336, 1008), (672, 336), (336, 672))  # (w, h)
RADIUS = (21.0, 34.0)
MARGIN = 20  # px between an object's centre and a third's border for a position question
INDEPENDENT_HIRES_SEED = 60_000_000


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """`independent._background`'s three kinds at any size."""
    kind = int(rng.integers(3))
    dark = rng.random() < 0.3
    lo, hi = (10, 70) if dark else (175, 250)
    if kind == 0:
        img = np.ones((height, width, 3)) * rng.uniform(lo, hi, size=3)
    elif kind == 1:
        small = rng.uniform(lo, hi, size=(3, 3, 3)).astype(np.float32)
        if cv2 is not None:
            img = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        else:
            img = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((width, height), Image.BILINEAR), float)
    else:
        a, b = rng.uniform(lo, hi, size=3), rng.uniform(lo, hi, size=3)
        b = a + np.clip(b - a, -20, 20)
        band_w = int(rng.integers(20, 60))
        band = ((np.arange(width) // band_w) % 2)[None, :, None]
        img = np.where(band == 1, b, a) * np.ones((height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_scene(seed: int, size: tuple[int, int], n: int, with_card: bool) -> IndependentScene:
    """An independent scene of `size` (width, height); its background array is height x width."""
    width, height = size
    rng = np.random.default_rng([seed, 61])
    combos = [(c, s) for c in PALETTE for s in SHAPE_NAMES]
    order = rng.permutation(len(combos))
    things: list[Thing] = []
    discs: list[tuple[float, float, float]] = []
    card, char = None, None
    if with_card:
        side = int(rng.integers(42, 57))
        x0, y0 = int(rng.integers(3, width - side - 3)), int(rng.integers(3, height - side - 3))
        card, char = (x0, y0, x0 + side, y0 + side), CARD_CHARS[int(rng.integers(len(CARD_CHARS)))]
        discs.append((x0 + side / 2, y0 + side / 2, side * 0.72))
    for k in order[:n]:
        colour, shape = combos[int(k)]
        for _ in range(300):
            r = float(rng.uniform(*RADIUS))
            cx, cy = float(rng.uniform(r + 3, width - r - 3)), float(rng.uniform(r + 3, height - r - 3))
            if all(math.hypot(cx - x, cy - y) > r + rr + 8 for x, y, rr in discs):
                break
        else:
            continue
        discs.append((cx, cy, r * 1.42))
        rgb = tuple(int(v) for v in np.clip(np.array(PALETTE[colour]) + rng.integers(-18, 19, size=3), 0, 255))
        things.append(Thing(shape, colour, cx, cy, r, float(rng.uniform(-10, 10)), float(rng.uniform(0.22, 0.36)),
                            rgb))
    return IndependentScene(seed, things, card, char, _background(rng, width, height))


def _size(scene: IndependentScene) -> tuple[int, int]:
    h, w = scene.background.shape[:2]
    return w, h


def mask(scene: IndependentScene, i: int) -> np.ndarray:
    """Boolean height x width mask of thing `i` (-1: the card), drawn by the renderer's own code."""
    w, h = _size(scene)
    m = np.zeros((h, w, 3), np.uint8)
    if i == -1:
        x0, y0, x1, y1 = scene.card
        m[y0 : y1 + 1, x0 : x1 + 1] = 255
    else:
        _draw(m, scene.things[i], (255, 255, 255))
    return m[..., 0] > 127


def evidence(scene: IndependentScene, idx: list[int]) -> list[int]:
    """Cells of the full-resolution 14-px grid covered >= 5% by the given things."""
    if not idx:
        return []
    w, h = _size(scene)
    m = np.zeros((h, w), bool)
    for i in idx:
        m |= mask(scene, i)
    rows, cols = h // PATCH, w // PATCH
    frac = m[: rows * PATCH, : cols * PATCH].reshape(rows, PATCH, cols, PATCH).mean(axis=(1, 3)).reshape(-1)
    return [int(j) for j in np.flatnonzero(frac >= COVER_FRACTION)]


def _third(v: float, side: int) -> int | None:
    if min(abs(v - side / 3), abs(v - 2 * side / 3)) < MARGIN:
        return None
    return min(2, int(3 * v // side))


def ask(scene: IndependentScene, family: str, rng: np.random.Generator) -> Sample | None:
    """`independent.ask_independent`'s questions and phrasings; positions in thirds of the whole picture."""
    th = scene.things
    n = len(th)
    w, h = _size(scene)
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
            c, s = one([(c, s) for c in PALETTE for s in SHAPE_NAMES if (c, s) not in present])
            ans, rel = "no", [i for i, t in enumerate(th) if t.colour == c or t.shape == s]
        art = "an" if c[0] in "aeiou" else "a"
        q = one([f"Is there {art} {c} {s}?", f"is there {art} {c} {s} in the image?"])
        return Sample(q, ans, family, evidence(scene, rel))
    if family == "count":
        if n == 0:
            return None
        u = rng.random()
        if u < 0.2:
            idx, q = list(range(n)), "How many objects are there?"
        elif u < 0.6:
            s = one([t.shape for t in th])
            idx, q = [i for i, t in enumerate(th) if t.shape == s], f"How many {PLURAL[s]} are there?"
        else:
            c = one([t.colour for t in th])
            idx, q = [i for i, t in enumerate(th) if t.colour == c], f"How many {c} objects are there?"
        return Sample(q, NUMBERS[len(idx)], family, evidence(scene, idx)) if len(idx) < len(NUMBERS) else None
    if family == "position":
        horizontal = rng.random() < 0.5
        cands = [i for i in range(n) if _third(th[i].cx if horizontal else th[i].cy, w if horizontal else h)
                 is not None]
        if not cands:
            return None
        i = one(cands)
        if horizontal:
            return Sample(f"Which column is the {th[i].name} in?", ("left", "middle", "right")[_third(th[i].cx, w)],
                          family, evidence(scene, [i]))
        return Sample(f"Which row is the {th[i].name} in?", ("top", "middle", "bottom")[_third(th[i].cy, h)],
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


def heldout_picture(index: int, seed: int = INDEPENDENT_HIRES_SEED) -> tuple[IndependentScene, list[Sample]]:
    """Held-out picture `index` (a size of SIZES, each as often; 3 to 3 per tile of area, at most 10, things; a
    card 40% of the time) and one question of each family it allows, in FAMILIES order."""
    rng = np.random.default_rng([seed + index, 62])
    size = SIZES[int(rng.integers(len(SIZES)))]
    most = min(10, 3 * size[0] * size[1] // (336 * 336))
    scene = make_scene(seed + index, size, int(rng.integers(3, most + 1)), with_card=bool(rng.random() < 0.4))
    return scene, [s for f in FAMILIES if (s := ask(scene, f, rng)) is not None]
