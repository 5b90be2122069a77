"""Where each visual token of one request comes from: the views of the picture and the row-end newline tokens.

LLaVA-1.5 has one view: the picture's square input region (after the processor's crop or pad), one grid of
side x side patches, token j at cell (j // side, j % side). LLaVA-NeXT ("anyres") has several, built per request
from the picture's size:

- the **base** view: the whole picture resized to one tower input (336 x 336 on LLaVA-NeXT), its tokens first;
- the **tiles**: the picture resized into the best of the model's `image_grid_pinpoints` (aspect kept, padded to
  it, centred), cut into tower inputs. Their features are laid out as one big map (rows of every tile column side
  by side), the rows and columns that only saw padding removed ("unpadding"), and one **newline** token (the
  model's learned `image_newline`) ends each row of that map.

Every visual token is exactly one view cell or one newline. A view knows its box in the uploaded picture's
pixels (the box may reach past the edges where the processor padded), its grid (rows, cols), the token of each
cell in row-major order, the vision-tower crop it came from (`crop`: 0 = the base or single view, 1 + t = tile t,
as `pixel_values` orders them) and each cell's patch index inside that crop (`patches`), which is how a method
reading a crop's [CLS] attention finds the tokens its patches became.

The arithmetic follows transformers' `LlavaNextModel.pack_image_features` and `LlavaNextImageProcessor` exactly
(tested against the model's own token count and features); nothing here runs a model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class View:
    name: str  # "image" (the one view of LLaVA-1.5), "base", "tile r,c" (0-based tile row and column)
    box: Box  # [x0, y0, x1, y1] in the uploaded picture's pixels
    grid: tuple[int, int]  # (rows, cols)
    tokens: tuple[int, ...]  # visual-token index of each cell, row-major (0 = the first visual token)
    crop: int = 0  # the vision tower input this view's patches come from
    patches: tuple[int, ...] = ()  # each cell's patch index inside that crop (its side x side grid)

    def cell_box(self, k: int) -> Box:
        """The box of the view's k-th cell (row-major) in the upload's pixels."""
        rows, cols = self.grid
        r, c = divmod(k, cols)
        x0, y0, x1, y1 = self.box
        w, h = (x1 - x0) / cols, (y1 - y0) / rows
        return (x0 + c * w, y0 + r * h, x0 + (c + 1) * w, y0 + (r + 1) * h)

    def to_dict(self) -> dict:
        return {"name": self.name, "box": [round(v, 4) for v in self.box], "grid": list(self.grid),
                "tokens": list(self.tokens), "crop": self.crop, "patches": list(self.patches)}

    @classmethod
    def from_dict(cls, d: dict) -> View:
        return cls(d["name"], tuple(d["box"]), tuple(d["grid"]), tuple(d["tokens"]), int(d.get("crop", 0)),
                   tuple(d.get("patches", ())))


@dataclass(frozen=True)
class VisualLayout:
    views: tuple[View, ...]
    newlines: tuple[int, ...] = ()  # visual-token indices of the row-end newline tokens
    # for each newline, the view cell whose row it ends: (view index, row) - its place for the lower-half share
    newline_rows: tuple[tuple[int, int], ...] = ()
    image_size: tuple[int, int] = (0, 0)  # the upload's (width, height)

    @property
    def total(self) -> int:
        return sum(len(v.tokens) for v in self.views) + len(self.newlines)

    @property
    def single(self) -> bool:
        """One view and no newlines: LLaVA-1.5's layout, where token j is the grid's cell j."""
        return len(self.views) == 1 and not self.newlines

    def check(self) -> VisualLayout:
        """Views plus newlines cover the tokens 0..total-1 exactly once."""
        seen = sorted([t for v in self.views for t in v.tokens] + list(self.newlines))
        if seen != list(range(len(seen))):
            raise ValueError("the layout's views and newlines do not cover every visual token exactly once")
        for v in self.views:
            if len(v.tokens) != v.grid[0] * v.grid[1] or (v.patches and len(v.patches) != len(v.tokens)):
                raise ValueError(f"view {v.name}: {len(v.tokens)} tokens for a {v.grid[0]}x{v.grid[1]} grid")
        return self

    def token_boxes(self) -> tuple[Box | None, ...]:
        """Each visual token's box in the upload's pixels (None for a newline token); computed once per layout."""
        return self._token_boxes

    def token_views(self) -> tuple[int | None, ...]:
        """Each visual token's view index (None for a newline token); computed once per layout."""
        return self._token_views

    @functools.cached_property
    def _token_boxes(self) -> tuple[Box | None, ...]:
        out: list[Box | None] = [None] * self.total
        for v in self.views:
            for k, t in enumerate(v.tokens):
                out[t] = v.cell_box(k)
        return tuple(out)

    @functools.cached_property
    def _token_views(self) -> tuple[int | None, ...]:
        out: list[int | None] = [None] * self.total
        for i, v in enumerate(self.views):
            for t in v.tokens:
                out[t] = i
        return tuple(out)

    def lower_weights(self) -> list[float]:
        """Each visual token's weight on the picture's lower half: 1 below the middle, 0 above, 0.5 for a cell the
        middle line crosses (the middle row of an odd grid); a newline counts with the cell row it ends. Measured
        against the middle of the base (or single) view's box, so LLaVA-1.5's is the grid's lower half. Computed
        once per layout (every profile layer of every run of a request reads it)."""
        return list(self._lower_weights)

    @functools.cached_property
    def _lower_weights(self) -> tuple[float, ...]:
        mid = (self.views[0].box[1] + self.views[0].box[3]) / 2
        eps = 1e-9 * max(1.0, abs(mid))
        out = [0.0] * self.total

        def weight(y0: float, y1: float) -> float:
            if y0 < mid - eps and y1 > mid + eps:
                return 0.5
            return 1.0 if (y0 + y1) / 2 >= mid else 0.0

        for v in self.views:
            for k, t in enumerate(v.tokens):
                _, y0, _, y1 = v.cell_box(k)
                out[t] = weight(y0, y1)
        for t, (vi, r) in zip(self.newlines, self.newline_rows, strict=True):
            v = self.views[vi]
            _, y0, _, y1 = v.cell_box(r * v.grid[1])
            out[t] = weight(y0, y1)
        return tuple(out)

    def to_dict(self) -> dict:
        return {"views": [v.to_dict() for v in self.views], "newlines": list(self.newlines),
                "newline_rows": [list(x) for x in self.newline_rows], "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, d: dict) -> VisualLayout:
        return cls(tuple(View.from_dict(v) for v in d["views"]), tuple(d.get("newlines", ())),
                   tuple(tuple(x) for x in d.get("newline_rows", ())), tuple(d.get("image_size", (0, 0))))


def single(grid: tuple[int, int], box: Box, image_size: tuple[int, int] = (0, 0)) -> VisualLayout:
    """LLaVA-1.5's layout: one view over the processor's input region."""
    rows, cols = grid
    n = rows * cols
    return VisualLayout((View("image", tuple(box), (rows, cols), tuple(range(n)), 0, tuple(range(n))),),
                        image_size=tuple(image_size))


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """transformers' `select_best_resolution`: the (height, width) pinpoint that keeps the most of the picture's
    resolution when it is resized into it (aspect kept), and among those wastes the least area."""
    best, best_eff, best_waste = None, -1, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        dw, dh = int(width * scale), int(height * scale)
        eff = min(dw * dh, width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    return best


def _resized(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """transformers' `get_patch_output_size`: the picture's size resized into `target` with its aspect kept."""
    th, tw = target
    sw, sh = tw / width, th / height
    if sw < sh:
        return min(math.ceil(height * sw), th), tw
    return th, min(math.ceil(width * sh), tw)


def anyres(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile: int, side: int,
           newline: bool = True) -> VisualLayout:
    """LLaVA-NeXT's layout for an upload of `image_size` (width, height): the base view, the tiles of the best
    pinpoint with their padding rows / columns removed, and a newline token ending each row of the tiles' map.
    `tile` is the tower's input size in pixels (336), `side` its patch grid's side (24)."""
    width, height = image_size
    bh, bw = best_resolution(height, width, pinpoints)
    th, tw = bh // tile, bw // tile  # tiles down and across
    rows_all, cols_all = th * side, tw * side  # the tiles' feature map before unpadding
    # unpadding (pack_image_features -> unpad_image), on the feature map, from the upload's size
    top, left, rows, cols = 0, 0, rows_all, cols_all
    if width / height > cols_all / rows_all:
        new_h = int(round(height * (cols_all / width), 7))
        top = (rows_all - new_h) // 2
        rows = rows_all - 2 * top
    else:
        new_w = int(round(width * (rows_all / height), 7))
        left = (cols_all - new_w) // 2
        cols = cols_all - 2 * left
    # the processor's resize into the pinpoint and centred padding, to map the map's cells onto the upload
    rh, rw = _resized(height, width, (bh, bw))
    pad_y, pad_x = (bh - rh) // 2, (bw - rw) // 2
    sy, sx = rh / height, rw / width
    cell = tile / side  # pixels of the pinpoint canvas per feature cell

    def to_upload(r0: int, c0: int, r1: int, c1: int) -> Box:
        return ((c0 * cell - pad_x) / sx, (r0 * cell - pad_y) / sy, (c1 * cell - pad_x) / sx, (r1 * cell - pad_y) / sy)

    base = View("base", (0.0, 0.0, float(width), float(height)), (side, side), tuple(range(side * side)), 0,
                tuple(range(side * side)))
    start = side * side
    per_row = cols + (1 if newline else 0)

    def token(r: int, c: int) -> int:  # (r, c) in the unpadded map
        return start + r * per_row + c

    views = [base]
    for ti in range(th):
        for tj in range(tw):
            r0, r1 = max(ti * side, top), min((ti + 1) * side, top + rows)
            c0, c1 = max(tj * side, left), min((tj + 1) * side, left + cols)
            if r1 <= r0 or c1 <= c0:
                continue  # a tile that saw only padding keeps no token
            toks, patches = [], []
            for R in range(r0, r1):
                for C in range(c0, c1):
                    toks.append(token(R - top, C - left))
                    patches.append((R - ti * side) * side + (C - tj * side))
            views.append(View(f"tile {ti},{tj}", to_upload(r0, c0, r1, c1), (r1 - r0, c1 - c0), tuple(toks),
                              1 + ti * tw + tj, tuple(patches)))
    newlines, newline_rows = [], []
    if newline:
        by_crop = {v.crop: i for i, v in enumerate(views) if v.name != "base"}
        for r in range(rows):
            newlines.append(start + r * per_row + cols)
            R = r + top
            ti = R // side
            # the newline follows the row's last cell: in the rightmost tile of this tile row that kept tokens
            vi = max(i for tj, i in ((tj, by_crop.get(1 + ti * tw + tj)) for tj in range(tw)) if i is not None)
            newline_rows.append((vi, R - max(ti * side, top)))
    return VisualLayout(tuple(views), tuple(newlines), tuple(newline_rows), (width, height)).check()


def crops(height: int, width: int, pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """How many tower inputs LLaVA-NeXT's processor makes for a picture: the base view and every tile."""
    bh, bw = best_resolution(height, width, pinpoints)
    return 1 + (bh // tile) * (bw // tile)


def for_model(config, image_size: tuple[int, int]) -> VisualLayout:
    """The layout a LLaVA-NeXT model (its config) gives an upload of `image_size` (width, height)."""
    v = config.vision_config
    side = v.image_size // v.patch_size
    return anyres(image_size, config.image_grid_pinpoints, v.image_size, side)
