"""The page's pictures for a several-view trace (LLaVA-NeXT): the base view and the tiles side by side, every
token at its own view's place and resolution, clicks mapped per view; one-view traces drawn as before."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from app import render
from sparsevlm.config import PruneConfig
from sparsevlm.layout import VisualLayout
from sparsevlm.loading import from_objects
from sparsevlm.pipeline import run
from sparsevlm.testing import tiny_llava_next


@pytest.fixture(scope="module")
def traces():
    model, processor = tiny_llava_next(image_size=112)
    lm = from_objects(model, processor, "tiny-next")
    img = Image.new("RGB", (336, 224), (235, 238, 242))
    d = ImageDraw.Draw(img)
    d.ellipse((30, 30, 120, 120), fill=(220, 40, 40))
    d.rectangle((200, 120, 300, 200), fill=(40, 80, 220))
    out = {m: run(lm, img, "what colour is the circle ?", PruneConfig(method=m, budget=80), max_new_tokens=2).trace
           for m in ("sparsevlm", "visionzip", "dense")}
    return img, out


def test_the_canvas_is_two_panels_and_every_view_cell_maps_to_its_token(traces):
    img, trs = traces
    tr = trs["dense"]
    layout = VisualLayout.from_dict(tr.layout)
    w, h = render.display_size(img.size)
    assert render.canvas_size(tr) == (2 * w + render.geometry.GAP, h)
    size = render.canvas_size(tr)
    pmap = render.patch_index_map(tr, size)
    seen = set(np.unique(pmap[pmap >= 0]).tolist())
    cells = {t for v in layout.views for t in v.tokens}
    assert seen == cells and not seen & set(layout.newlines)
    # the base view's tokens fill the left panel only, the tiles' the right one only
    base = set(layout.views[0].tokens)
    left, right = pmap[:, :w], pmap[:, w + render.geometry.GAP:]
    assert set(np.unique(left[left >= 0]).tolist()) == base
    assert not base & set(np.unique(right[right >= 0]).tolist())
    # each token's box on the canvas holds that token's pixels
    for t in (0, layout.views[0].tokens[-1], layout.views[1].tokens[5], layout.views[-1].tokens[-1]):
        x0, y0, x1, y1 = render.patch_box(tr, t, size)
        assert pmap[int((y0 + y1) / 2), int((x0 + x1) / 2)] == t
    assert render.patch_box(tr, layout.newlines[0], size) is None


def test_a_click_names_the_view_and_its_cell(traces):
    _, trs = traces
    tr = trs["sparsevlm"]
    layout = VisualLayout.from_dict(tr.layout)
    size = render.canvas_size(tr)
    tile = layout.views[2]
    x0, y0, x1, y1 = render.patch_box(tr, tile.tokens[0], size)
    p = render.patch_at(tr, (x0 + x1) / 2, (y0 + y1) / 2, size)
    assert p == tile.tokens[0]
    assert f"of the {tile.name} view's {tile.grid[0]}×{tile.grid[1]} grid" in render.patch_fate_html(tr, p)
    assert "newline token" in render.patch_fate_html(tr, layout.newlines[0])


@pytest.mark.parametrize("method", ["sparsevlm", "visionzip"])
def test_the_layer_picture_shows_both_panels_and_what_was_kept(traces, method):
    img, trs = traces
    tr = trs[method]
    pic = np.asarray(render.render_layer(img, tr, render.default_layer(tr)).convert("RGB")).astype(int)
    size = render.canvas_size(tr)
    assert pic.shape[1::-1] == size
    w = render.display_size(img.size)[0]
    for panel in (pic[:, :w], pic[:, w + render.geometry.GAP:]):
        assert panel.std() > 10  # drawn, not blank
    # a kept tile token is shown clear (the upload's own colour), a pruned one dimmed
    states = render.patch_states(tr, render.default_layer(tr))
    layout = VisualLayout.from_dict(tr.layout)
    tile_tokens = [t for v in layout.views[1:] for t in v.tokens]
    kept = next(t for t in tile_tokens if states[t] == render.KEPT)
    pruned = next((t for t in tile_tokens if states[t] == render.PRUNED), None)
    if pruned is None:  # VisionZip merges every token it does not keep: each is tinted with its cluster
        assert all(states[t] >= 0 or states[t] == render.KEPT for t in tile_tokens)
        return
    heat = render.render_heatmap(img, tr, render.default_layer(tr))
    assert heat.size == size
    bright = []
    for t in (kept, pruned):
        x0, y0, x1, y1 = render.patch_box(tr, t, size)
        bright.append(pic[int(y0) + 3:int(y1) - 3, int(x0) + 3:int(x1) - 3].mean())
    assert bright[0] > bright[1] + 20


def test_the_profile_figure_marks_the_rows_of_every_view(traces):
    """Attention against token index on LLaVA-NeXT: the base view's rows, then each row of the tiles' map with the
    newline that ends it, cover every visual token once."""
    from app import profile_view

    _, trs = traces
    tr = trs["dense"]
    layout = VisualLayout.from_dict(tr.layout)
    segments = profile_view.row_segments(tr, tr.visual_tokens)
    covered = [t for a, b in segments for t in range(a, b)]
    assert covered == list(range(tr.visual_tokens))
    assert len(segments) == layout.views[0].grid[0] + len(layout.newlines)
    assert all(b - 1 in set(layout.newlines) for a, b in segments[layout.views[0].grid[0]:])
    fig = profile_view.index_figure(tr)
    assert len(fig.data) >= 4
