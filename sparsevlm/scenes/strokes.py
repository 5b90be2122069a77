"""A hand-written single-stroke lettering of the label characters, for training pictures.

Why: the model read 97% of the labels in the faces it was trained on (the system's outline fonts) but 47% of the
independent renderer's, which letters its cards in a stroke font it never saw. Outline fonts all draw a glyph as a
filled shape of varying width; a stroke font draws it as centre lines of one width. Lettering some training labels
as strokes - each glyph written here from scratch as polylines and arcs, then slanted, stretched, wobbled and drawn
at 1-7 px - gives the reader that kind of glyph too, the way handwriting varies. These glyphs are this module's own
geometry (not Hershey's, whose data and drawing code this project never uses for training), so the independent
renderer stays a picture source the model was not trained on.

Coordinates: x 0 (left) .. 1 (right), y 0 (top) .. 1 (bottom), a glyph a list of strokes, a stroke a list of points.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 14) -> list[tuple[float, float]]:
    """Points of an elliptic arc from angle a0 to a1 (degrees, counter-clockwise as on paper, y pointing down)."""
    return [(cx + rx * math.cos(math.radians(a)), cy - ry * math.sin(math.radians(a))) for a in np.linspace(a0, a1, n)]


def _six() -> list[list[tuple[float, float]]]:
    return [[(0.85, 0.08), *_arc(0.55, 0.55, 0.45, 0.5, 75, 190)[1:]], _arc(0.5, 0.72, 0.4, 0.28, 0, 360, 20)]


GLYPHS: dict[str, list[list[tuple[float, float]]]] = {
    "2": [[*_arc(0.5, 0.27, 0.42, 0.25, 160, -30), (0.0, 1.0), (1.0, 1.0)]],
    "3": [_arc(0.5, 0.25, 0.4, 0.25, 150, -90), _arc(0.5, 0.74, 0.45, 0.26, 90, -150)],
    "4": [[(0.75, 1.0), (0.75, 0.0), (0.0, 0.7), (1.0, 0.7)]],
    "5": [[(0.9, 0.0), (0.15, 0.0), (0.1, 0.45), *_arc(0.48, 0.68, 0.42, 0.32, 140, -140)[1:]]],
    "6": _six(),
    "7": [[(0.0, 0.0), (1.0, 0.0), (0.35, 1.0)]],
    "8": [_arc(0.5, 0.25, 0.33, 0.25, -90, 270, 20), _arc(0.5, 0.72, 0.42, 0.28, 90, 450, 20)],
    "9": [[(1 - x, 1 - y) for x, y in s] for s in _six()],  # a six turned half round
    "E": [[(1.0, 0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 1.0)], [(0.0, 0.5), (0.8, 0.5)]],
    "H": [[(0.0, 0.0), (0.0, 1.0)], [(1.0, 0.0), (1.0, 1.0)], [(0.0, 0.5), (1.0, 0.5)]],
    "K": [[(0.0, 0.0), (0.0, 1.0)], [(1.0, 0.0), (0.0, 0.62)], [(0.3, 0.42), (1.0, 1.0)]],
    "X": [[(0.0, 0.0), (1.0, 1.0)], [(1.0, 0.0), (0.0, 1.0)]],
}

SUPERSAMPLE = 4


def draw_strokes(
    img: Image.Image, box: tuple[int, int, int, int], char: str, seed: int, scale: float, ink: int, card: int
) -> None:
    """Letter `char` in the centre of the card `box` (x0, y0, x1, y1; the card already drawn in grey `card`) as
    strokes: glyph height `scale` of the card, a random width/height ratio 0.5-0.85, slant -0.25..0.25, every
    point moved up to 4% of the height, stroke width 1-7 px (hairline to heavy); drawn 4x larger and scaled down
    (anti-aliased)."""
    rng = np.random.default_rng([seed, 31])
    x0, y0, x1, y1 = box
    w_card, h_card = x1 - x0 - 3, y1 - y0 - 3  # inside the 2 px outline
    h = scale * min(w_card, h_card)
    w = h * rng.uniform(0.5, 0.85)
    slant = rng.uniform(-0.25, 0.25)
    width = int(rng.integers(1, 8))
    k = SUPERSAMPLE
    r = width * k / 2  # round stroke ends
    tile = Image.new("L", (w_card * k, h_card * k), card)
    d = ImageDraw.Draw(tile)
    for stroke in GLYPHS[char]:
        pts = np.asarray(stroke) + rng.uniform(-0.04, 0.04, size=(len(stroke), 2))
        px = (w_card - w) / 2 + pts[:, 0] * w + slant * (0.5 - pts[:, 1]) * h
        py = (h_card - h) / 2 + pts[:, 1] * h
        d.line([(float(a) * k, float(b) * k) for a, b in zip(px, py)], fill=ink, width=width * k, joint="curve")
        for a, b in ((px[0], py[0]), (px[-1], py[-1])):
            d.ellipse([a * k - r, b * k - r, a * k + r, b * k + r], fill=ink)
    small = tile.resize((w_card, h_card), Image.LANCZOS).convert("RGB")
    img.paste(small, (x0 + 2, y0 + 2))
