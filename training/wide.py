"""Whole-picture turns: questions and descriptions about the picture as a whole and about its empty parts.

LLaVA's instruction data asks about whole images (detailed descriptions, "what is in this picture", what is in a
part of it, several turns a picture). The v2 world's seven families each ask about one or two named objects, so
every answer is found on a few patches; the caption turn is the only one that needs the whole picture. These
turns widen the mix with the vocabulary the model already has (`world.vocabulary`), from the scene's geometry
alone:

- `whole count`: "how many objects are there ?" - every object, wherever it is;
- `region exist`: "is there an object at the bottom left ?" - a ninth of the picture (the position family's
  thirds), "no" when only background is there, so the answer depends on background patches as much as on
  objects;
- `region count`: "how many objects are in the bottom row ?" - a row or column of thirds;
- `region describe`: "describe the top right of the picture ." - the caption (`world.describe`'s phrasing) of
  the items in that ninth, in reading order, or "no objects ." when there are none.

A region is asked about only when no object's centre (nor the label card's) lies within `world.POSITION_MARGIN`
px of one of its borders, so every answer is plain to see. Reads no attention and nothing any method scores.
"""

from __future__ import annotations

import numpy as np

from sparsevlm.scenes import world

KINDS = ("whole count", "region exist", "region count", "region describe")
MARGIN = world.POSITION_MARGIN


def _centre(scene, i: int) -> tuple[float, float]:
    if i == -1:
        b = scene.label_box
        return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    return scene.objects[i].centre


def _span(k: int | None) -> tuple[float, float]:
    """The pixel span of third k (None: the whole side), borders of the picture extended outward."""
    if k is None:
        return -1e9, 1e9
    lo = -1e9 if k == 0 else k * world.THIRD
    hi = 1e9 if k == 2 else (k + 1) * world.THIRD
    return lo, hi


def _in(scene, i: int, row: int | None, col: int | None) -> bool | None:
    """Whether item i's centre is in the region (row / column of thirds; None: any); None when it lies within
    MARGIN px of one of the region's borders, so that a look would not settle it."""
    x, y = _centre(scene, i)
    (x0, x1), (y0, y1) = _span(col), _span(row)
    inner = x0 + MARGIN <= x < x1 - MARGIN and y0 + MARGIN <= y < y1 - MARGIN
    outer = x0 - MARGIN <= x < x1 + MARGIN and y0 - MARGIN <= y < y1 + MARGIN
    if inner:
        return True
    return None if outer else False


def _region_name(row: int | None, col: int | None) -> str:
    if row is not None and col is not None:
        if row == 1 and col == 1:
            return "the middle"
        return f"the {world.ROWS[row]} {world.COLUMNS[col]}"
    if row is not None:
        return f"the {world.ROWS[row]} row"
    return f"the {world.COLUMNS[col]} column"


def whole_turn(scene, rng: np.random.Generator) -> tuple[str, str, str] | None:
    """One whole-picture turn (question, answer, kind) about `scene`, or None when the drawn one cannot be asked
    plainly."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    objs = scene.objects
    if kind == "whole count":
        if len(objs) >= len(world.NUMBERS):
            return None
        what = world._pick(rng, ("objects", "things", "shapes"))
        q = world._pick(rng, (f"how many {what} are there ?", f"how many {what} are in the picture ?",
                              f"how many {what} are in the image ?", f"how many {what} can you see ?"))
        return q, world.NUMBERS[len(objs)], kind
    items = world.items(scene)
    if kind == "region count":
        row, col = (int(rng.integers(3)), None) if rng.random() < 0.5 else (None, int(rng.integers(3)))
    else:
        row, col = int(rng.integers(3)), int(rng.integers(3))
    inside = [_in(scene, i, row, col) for i in items]
    if any(v is None for v in inside):
        return None
    here = [i for i, v in zip(items, inside, strict=True) if v]
    name = _region_name(row, col)
    if kind == "region count":
        n = sum(1 for i in here if i != -1)
        if -1 in here or n >= len(world.NUMBERS):  # the label card is not an object: leave it out of counts
            return None
        q = world._pick(rng, (f"how many objects are in {name} ?", f"how many things are in {name} ?"))
        return q, world.NUMBERS[n], kind
    if kind == "region exist":
        if -1 in here:
            return None
        q = world._pick(rng, (f"is there an object at {name} ?", f"is there a thing at {name} ?",
                              f"do you see an object at {name} ?"))
        return q, "yes" if here else "no", kind
    # region describe
    q = world._pick(rng, (f"describe {name} of the picture .", f"what is at {name} of the image ?",
                          f"describe {name} of the image ."))
    if not here:
        return q, "no objects .", kind
    order = [i for i in world.reading_order(scene) if i in here]
    parts = []
    for i in order:
        w = world.item_words(scene, i)
        if i == -1:
            parts.append(f"a label with {w[1]} at the {w[2]} {w[3]}")
        else:
            parts.append(f"{world.article(w[0])} {w[0]} {w[1]} {w[2]} at the {w[3]} {w[4]}")
    return q, " , ".join(parts) + " .", kind


def whole_turns(scene, n: int, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Up to `n` distinct whole-picture turns about `scene`."""
    out: list[tuple[str, str, str]] = []
    for _ in range(n * 8):
        if len(out) >= n:
            break
        t = whole_turn(scene, rng)
        if t is not None and all(t[0] != o[0] for o in out):
            out.append(t)
    return out
