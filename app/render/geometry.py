"""Where a patch lies on the upload: the box of each patch in the picture's pixels, the patch under each pixel,
and the size the pictures are shown at. Read from the trace's grid, input region and image size, or, for a trace
with several views (LLaVA-NeXT: a base view and tiles), from its layout: such a picture is drawn as two panels of
the upload side by side, the base view's tokens on the left and the tiles' tokens on the right, each at its own
view's resolution (newline tokens sit at no place on the picture)."""

from __future__ import annotations

import numpy as np

from sparsevlm.layout import VisualLayout
from sparsevlm.trace import PruneTrace

DISPLAY_SIDE = 512
GAP = 8  # pixels between the panels of a several-view picture


def views_of(trace: PruneTrace) -> VisualLayout | None:
    """The trace's layout when it has several views (LLaVA-NeXT), else None (one grid: the code paths below that
    read `grid` and `input_region`)."""
    if not trace.layout:
        return None
    layout = trace.visual_layout()
    return None if layout.single else layout


def panels(layout: VisualLayout) -> list[list[int]]:
    """The views drawn in each panel: the base view, then every tile."""
    return [[0], list(range(1, len(layout.views)))] if len(layout.views) > 1 else [[0]]


def n_tokens(trace: PruneTrace) -> int:
    """The visual tokens a per-patch array covers: the grid's cells, or every visual token of a several-view
    trace (newlines included, at no place)."""
    return trace.visual_tokens if views_of(trace) is not None else trace.grid[0] * trace.grid[1]


def canvas_size(trace: PruneTrace, max_side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """The size the trace's pictures are drawn at: the upload at display size, or its panels side by side."""
    w, h = display_size(tuple(trace.image_size), max_side)
    layout = views_of(trace)
    if layout is None:
        return w, h
    k = len(panels(layout))
    return k * w + (k - 1) * GAP, h


def _panel_width(layout: VisualLayout, width: int) -> int:
    k = len(panels(layout))
    return (width - (k - 1) * GAP) // k


def token_place(trace: PruneTrace, patch: int) -> tuple[str, int, int, int, int] | None:
    """(view name, row, column, rows, cols) of a visual token; None for a newline token."""
    layout = views_of(trace)
    if layout is None:
        rows, cols = trace.grid
        return ("image", patch // cols, patch % cols, rows, cols)
    vi = layout.token_views()[patch]
    if vi is None:
        return None
    v = layout.views[vi]
    k = v.tokens.index(patch)
    return (v.name, k // v.grid[1], k % v.grid[1], v.grid[0], v.grid[1])


def display_size(image_size: tuple[int, int], max_side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """The image in its own aspect, scaled so the longer side is max_side."""
    w, h = image_size
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def patch_box(trace: PruneTrace, patch: int, image_size: tuple[int, int] | None = None) -> tuple[float, ...]:
    """Box (x0, y0, x1, y1) of a patch in pixels of an image of image_size (default: the original upload).

    The processor turns trace.input_region of the upload into the model's square input; the grid tiles that. A
    several-view trace: `image_size` is its canvas (`canvas_size`) and the box lies in its token's panel; None
    for a newline token.
    """
    layout = views_of(trace)
    if layout is not None:
        return _view_box(trace, layout, patch, image_size)
    rows, cols = trace.grid
    r, c = divmod(patch, cols)
    x0, y0, x1, y1 = trace.input_region
    sx = sy = 1.0
    if image_size is not None:
        sx = image_size[0] / trace.image_size[0]
        sy = image_size[1] / trace.image_size[1]
    pw, ph = (x1 - x0) / cols, (y1 - y0) / rows
    return ((x0 + c * pw) * sx, (y0 + r * ph) * sy, (x0 + (c + 1) * pw) * sx, (y0 + (r + 1) * ph) * sy)


def _view_box(trace: PruneTrace, layout: VisualLayout, patch: int,
              image_size: tuple[int, int] | None) -> tuple[float, ...] | None:
    box = layout.token_boxes()[patch]
    if box is None or image_size is None:
        return box
    view = layout.token_views()[patch]
    panel = next(i for i, vs in enumerate(panels(layout)) if view in vs)
    w = _panel_width(layout, image_size[0])
    sx, sy = w / trace.image_size[0], image_size[1] / trace.image_size[1]
    off = panel * (w + GAP)
    return (box[0] * sx + off, box[1] * sy, box[2] * sx + off, box[3] * sy)


def _views_index_map(trace: PruneTrace, layout: VisualLayout, size: tuple[int, int]) -> np.ndarray:
    width, h = size
    w = _panel_width(layout, width)
    out = np.full((h, width), -1, dtype=np.int64)
    sx, sy = w / trace.image_size[0], h / trace.image_size[1]
    px, py = (np.arange(w) + 0.5) / sx, (np.arange(h) + 0.5) / sy  # pixel centres in the upload's pixels
    for k, views in enumerate(panels(layout)):
        panel = out[:, k * (w + GAP): k * (w + GAP) + w]
        for vi in views:
            v = layout.views[vi]
            rows, cols = v.grid
            x0, y0, x1, y1 = v.box
            ci = np.floor((px - x0) / (x1 - x0) * cols).astype(np.int64)
            ri = np.floor((py - y0) / (y1 - y0) * rows).astype(np.int64)
            ok = ((ri >= 0) & (ri < rows))[:, None] & ((ci >= 0) & (ci < cols))[None, :]
            cells = np.clip(ri, 0, rows - 1)[:, None] * cols + np.clip(ci, 0, cols - 1)[None, :]
            tokens = np.asarray(v.tokens, dtype=np.int64)[cells]
            panel[ok] = tokens[ok]
    return out


def patch_index_map(trace: PruneTrace, size: tuple[int, int]) -> np.ndarray:
    """For each pixel of an image of `size` (w, h), the patch it belongs to, or -1 outside the model's input (for
    a several-view trace, `size` is its canvas and each panel maps to its views' tokens)."""
    layout = views_of(trace)
    if layout is not None:
        return _views_index_map(trace, layout, size)
    w, h = size
    rows, cols = trace.grid
    x0, y0, x1, y1 = trace.input_region
    sx, sy = w / trace.image_size[0], h / trace.image_size[1]
    xs = ((np.arange(w) + 0.5) / sx - x0) / (x1 - x0) * cols
    ys = ((np.arange(h) + 0.5) / sy - y0) / (y1 - y0) * rows
    ci = np.floor(xs).astype(np.int64)
    ri = np.floor(ys).astype(np.int64)
    valid = (ci >= 0) & (ci < cols)
    valid_r = (ri >= 0) & (ri < rows)
    idx = ri[:, None] * cols + ci[None, :]
    return np.where(valid_r[:, None] & valid[None, :], idx, -1)


def patch_at(trace: PruneTrace, x: float, y: float, size: tuple[int, int]) -> int | None:
    """The patch under pixel (x, y) of a picture of `size` drawn from this trace (None outside the model's input)."""
    w, h = size
    if not (0 <= x < w and 0 <= y < h):
        return None
    p = int(patch_index_map(trace, (w, h))[int(y), int(x)])
    return p if p >= 0 else None
