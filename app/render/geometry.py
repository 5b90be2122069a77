"""Where a patch lies on the upload: the box of each patch in the picture's pixels, the patch under each pixel,
and the size the pictures are shown at. Read from the trace's grid, input region and image size."""

from __future__ import annotations

import numpy as np

from sparsevlm.trace import PruneTrace

DISPLAY_SIDE = 512


def display_size(image_size: tuple[int, int], max_side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """The image in its own aspect, scaled so the longer side is max_side."""
    w, h = image_size
    s = max_side / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def patch_box(trace: PruneTrace, patch: int, image_size: tuple[int, int] | None = None) -> tuple[float, ...]:
    """Box (x0, y0, x1, y1) of a patch in pixels of an image of image_size (default: the original upload).

    The processor turns trace.input_region of the upload into the model's square input; the grid tiles that.
    """
    rows, cols = trace.grid
    r, c = divmod(patch, cols)
    x0, y0, x1, y1 = trace.input_region
    sx = sy = 1.0
    if image_size is not None:
        sx = image_size[0] / trace.image_size[0]
        sy = image_size[1] / trace.image_size[1]
    pw, ph = (x1 - x0) / cols, (y1 - y0) / rows
    return ((x0 + c * pw) * sx, (y0 + r * ph) * sy, (x0 + (c + 1) * pw) * sx, (y0 + (r + 1) * ph) * sy)


def patch_index_map(trace: PruneTrace, size: tuple[int, int]) -> np.ndarray:
    """For each pixel of an image of `size` (w, h), the patch it belongs to, or -1 outside the model's input."""
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
