"""Pictures drawn over the upload: what a decoder layer sees (kept patches clear, pruned ones dimmed, recycled
clusters tinted and outlined, the margin the processor cropped hatched, the evidence outlined), the score
heatmap, one question token's attention, the compare gallery, and the legend of their colours."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sparsevlm.trace import PruneTrace

from .geometry import DISPLAY_SIDE, GAP, display_size, panels, patch_box, patch_index_map, views_of
from .layers import (
    KEPT,
    PRUNED,
    SKIPPED,
    attendance_share,
    final_layer,
    heatmap_stage,
    patch_scores,
    patch_states,
    token_attention,
)
from .words import method_label

# Cluster outlines: a qualitative palette that stays readable on top of photos.
CLUSTER_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 64, 129),
    (0, 200, 255),
    (255, 196, 0),
    (118, 255, 3),
    (213, 0, 249),
    (255, 109, 0),
    (29, 233, 182),
    (255, 23, 68),
    (41, 121, 255),
    (198, 255, 0),
    (234, 128, 252),
    (255, 255, 255),
)


PRUNED_DIM = 0.22  # brightness a pruned patch keeps


CLUSTER_TINT = 0.42  # share of the cluster colour over a recycled patch (the picture stays readable)


OUTSIDE_DIM = 0.10  # brightness of image parts the model never saw (cropped away by the processor)


EVIDENCE_RGB = (255, 255, 255)  # evidence outlines: white over a dark rim, apart from every cluster colour


SKIPPED_TINT = (56, 132, 255)  # the blue a patch that skipped attention is tinted with (dimmed underneath)


def font(size: int) -> ImageFont.ImageFont:
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _fit(image: Image.Image, trace: PruneTrace, max_side: int) -> np.ndarray:
    """The upload as an RGB uint8 array at display size."""
    if trace.image_size == (0, 0):
        raise ValueError("the trace records no image size")
    if image.size != tuple(trace.image_size):
        # The app passes the very image it ran on; anything else is re-fitted to the recorded size.
        image = image.resize(tuple(trace.image_size), Image.BILINEAR)
    size = display_size(image.size, max_side)
    arr = np.ascontiguousarray(np.asarray(image.convert("RGB").resize(size, Image.LANCZOS), dtype=np.uint8))
    layout = views_of(trace)
    if layout is None:
        return arr
    # several views: the upload once per panel, side by side (the gap belongs to no view: drawn as margin)
    k = len(panels(layout))
    gap = np.full((arr.shape[0], GAP, 3), 255, dtype=np.uint8)
    parts = [arr]
    for _ in range(k - 1):
        parts += [gap, arr]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


VIEW_RGB = (255, 214, 0)  # the boxes of the tiles on a several-view picture


def draw_view_boxes(out: np.ndarray, trace: PruneTrace) -> np.ndarray:
    """On a several-view picture: each tile's box in the right panel, and a label on each panel naming its view(s)
    and grid; a one-view picture is returned as it is."""
    layout = views_of(trace)
    if layout is None:
        return out
    h, width = out.shape[:2]
    for k, views in enumerate(panels(layout)):
        for vi in views:
            x0, y0, x1, y1 = patch_box_of_view(trace, layout, vi, (width, h))
            if k > 0:
                cv2.rectangle(out, (round(x0), round(y0)), (round(x1) - 1, round(y1) - 1), VIEW_RGB, 2)
    img = Image.fromarray(out)
    d = ImageDraw.Draw(img)
    f = font(13)
    base = layout.views[0]
    tiles = layout.views[1:]
    w = (width - (len(panels(layout)) - 1) * GAP) // len(panels(layout))
    labels = [f"base view {base.grid[0]}x{base.grid[1]}"]
    if tiles:
        n = sum(len(v.tokens) for v in tiles)
        labels.append(f"{len(tiles)} tiles, {n} tokens + {len(layout.newlines)} newlines")
    for k, text in enumerate(labels):
        x = k * (w + GAP) + 4
        box = d.textbbox((x, 4), text, font=f)
        d.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
        d.text((x, 4), text, fill=(255, 255, 255), font=f)
    return np.ascontiguousarray(np.asarray(img))


def patch_box_of_view(trace: PruneTrace, layout, vi: int, size: tuple[int, int]) -> tuple[float, ...]:
    """A view's box on the canvas of `size` (in its panel)."""
    v = layout.views[vi]
    first = patch_box(trace, v.tokens[0], size)
    last = patch_box(trace, v.tokens[-1], size)
    return (first[0], first[1], last[2], last[3])


def _patch_edges(pmap: np.ndarray) -> np.ndarray:
    """1-px lines where neighbouring pixels belong to different patches (the faint token grid)."""
    edge = np.zeros(pmap.shape, dtype=bool)
    edge[:, 1:] |= pmap[:, 1:] != pmap[:, :-1]
    edge[1:, :] |= pmap[1:, :] != pmap[:-1, :]
    return edge


def _hatch(shape: tuple[int, int], period: int = 10) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return ((xx + yy) % period) < 2


def _blend(base: np.ndarray, over: np.ndarray, alpha: float, where: np.ndarray) -> np.ndarray:
    """base with `over` blended in at `alpha`, only where the mask is set."""
    mixed = cv2.addWeighted(base, 1.0 - alpha, over, alpha, 0.0)
    return np.where(where[..., None], mixed, base)


def _dim(arr: np.ndarray, factor: float, lift: float = 0.0) -> np.ndarray:
    return cv2.convertScaleAbs(arr, alpha=factor, beta=lift)


def draw_outline(out: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], thickness: int = 2,
                 rim: bool = False) -> np.ndarray:
    """Draw the contours of a region (a boolean pixel mask) in place; holes get their own contour."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    if rim:  # a dark rim keeps a light outline readable on bright pictures
        cv2.drawContours(out, contours, -1, (0, 0, 0), thickness + 2, cv2.LINE_8)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in rgb), thickness, cv2.LINE_8)
    return out


def _evidence_mask(pmap: np.ndarray, evidence: Sequence[int] | None) -> np.ndarray | None:
    if not evidence:
        return None
    mask = np.isin(pmap, np.asarray(list(evidence), dtype=np.int64)) & (pmap >= 0)
    return mask if mask.any() else None


@dataclass(frozen=True)
class Canvas:
    """What every picture of one upload drawn at one size shares, whatever the method or layer: the upload at
    display size, its patch map, the dimmed copies and the hatched margin. Built once (`canvas`) and reused by
    render_layer, so ten methods' pictures or one picture per layer resize and map the upload once."""

    key: tuple
    arr: np.ndarray  # the upload, RGB uint8 at display size
    pmap: np.ndarray  # patch per pixel, -1 outside the model's input
    inside: np.ndarray  # pmap >= 0
    dimmed: np.ndarray  # the upload as a pruned patch shows it
    margin: np.ndarray  # the upload as the cropped-away margin shows it (dimmed, hatched)
    edges: np.ndarray  # 1-px lines between patches (the faint token grid)


def _canvas_key(image: Image.Image, trace: PruneTrace, max_side: int) -> tuple:
    return (id(image), image.size, tuple(trace.image_size), tuple(trace.input_region), tuple(trace.grid), max_side,
            trace.visual_tokens if views_of(trace) is not None else 0)


def canvas(image: Image.Image, trace: PruneTrace, max_side: int = DISPLAY_SIDE) -> Canvas:
    """The shared part of every picture of `image` under traces of this geometry (size, crop, grid)."""
    arr = _fit(image, trace, max_side)
    h, w = arr.shape[:2]
    pmap = patch_index_map(trace, (w, h))
    inside = pmap >= 0
    margin = _dim(arr, OUTSIDE_DIM)
    margin[_hatch((h, w))] = 70
    for a in (arr, pmap, inside, margin):
        a.setflags(write=False)
    return Canvas(key=_canvas_key(image, trace, max_side), arr=arr, pmap=pmap, inside=inside,
                  dimmed=_dim(arr, PRUNED_DIM, 18), margin=margin, edges=_patch_edges(np.where(inside, pmap, -3)))


def render_layer(image: Image.Image, trace: PruneTrace, layer: int, max_side: int = DISPLAY_SIDE,
                 evidence: Sequence[int] | None = None, shared: Canvas | None = None) -> Image.Image:
    """The upload in its own aspect as decoder layer `layer` sees it.

    Kept patches are clear, pruned ones dimmed, each recycled cluster tinted and outlined in its own colour (its
    center marked with a dot); parts of the picture the processor cropped away are hatched. `evidence` (patch
    indices, e.g. a generated scene's ground truth; default: the trace's own `evidence` if it has one) is
    outlined in white. `shared`: a Canvas of this image, trace geometry and size (built here when absent or
    built for another geometry); the picture is the same either way.
    """
    cv = shared if shared is not None and shared.key == _canvas_key(image, trace, max_side) else canvas(
        image, trace, max_side)
    h, w = cv.arr.shape[:2]
    states = patch_states(trace, layer)
    pix_state = np.where(cv.inside, states[np.clip(cv.pmap, 0, None)], -3)

    out = np.where((pix_state == PRUNED)[..., None], cv.dimmed, cv.arr)
    skipped = pix_state == SKIPPED
    if skipped.any():  # left out of attention here, still in the residual stream: dimmed and tinted blue
        out = np.where(skipped[..., None], cv.dimmed, out)
        out = _blend(np.ascontiguousarray(out), np.full_like(out, SKIPPED_TINT), 0.35, skipped)
    outside = ~cv.inside
    out[outside] = cv.margin[outside]

    # faint patch grid on the visible tokens, so "a token is a square" reads at a glance
    grid = cv.edges & (pix_state == KEPT)
    out = _blend(out, np.full_like(out, 255), 0.25, grid)

    stage = trace.stage_for_layer(layer)
    if stage is not None and stage.merged:
        cluster_px = pix_state >= 0
        colours = np.array(CLUSTER_COLOURS, dtype=np.uint8)
        tint = colours[np.where(cluster_px, pix_state % len(colours), 0)]
        out = _blend(out, tint, CLUSTER_TINT, cluster_px)
        out = np.ascontiguousarray(out)
        for k in range(len(stage.merged)):
            mask = pix_state == k
            if mask.any():
                draw_outline(out, mask, CLUSTER_COLOURS[k % len(CLUSTER_COLOURS)], 2)
        for k, m in enumerate(stage.merged):
            if m.center < 0:  # a token at no patch (VisionZip's [CLS]): nothing to mark on the image
                continue
            box = patch_box(trace, m.center, (w, h))
            if box is None:  # a newline token: at no place on the picture
                continue
            x0, y0, x1, y1 = box
            centre = (round((x0 + x1) / 2), round((y0 + y1) / 2))
            r = max(3, round((x1 - x0) / 5))
            cv2.circle(out, centre, r, CLUSTER_COLOURS[k % len(CLUSTER_COLOURS)], -1, cv2.LINE_AA)
            cv2.circle(out, centre, r, (0, 0, 0), 1, cv2.LINE_AA)
    ev = _evidence_mask(cv.pmap, evidence if evidence is not None else getattr(trace, "evidence", None))
    if ev is not None:
        out = draw_outline(np.ascontiguousarray(out), ev, EVIDENCE_RGB, 2, rim=True)
    return Image.fromarray(draw_view_boxes(np.ascontiguousarray(out), trace))


def render_layers(image: Image.Image, views: Sequence[tuple[PruneTrace, int]], max_side: int = DISPLAY_SIDE,
                  evidence: Sequence[int] | None = None) -> list[Image.Image]:
    """render_layer for each (trace, layer), the upload resized and mapped once for every trace of one geometry
    (the methods of one request, the layers of one trace)."""
    out: list[Image.Image] = []
    shared: Canvas | None = None
    for trace, layer in views:
        if shared is None or shared.key != _canvas_key(image, trace, max_side):
            shared = canvas(image, trace, max_side)
        out.append(render_layer(image, trace, layer, max_side, evidence, shared))
    return out


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB uint8 through OpenCV's perceptual inferno map."""
    grey = np.clip(np.nan_to_num(values) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(grey.reshape(1, -1), cv2.COLORMAP_INFERNO)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).reshape(*values.shape, 3)


def render_heatmap(image: Image.Image, trace: PruneTrace, layer: int, max_side: int = DISPLAY_SIDE,
                   evidence: Sequence[int] | None = None) -> Image.Image:
    """Significance scores (mean attention the text raters pay each visual token) over the image."""
    arr = _fit(image, trace, max_side)
    h, w = arr.shape[:2]
    stage = heatmap_stage(trace, layer)
    pmap = patch_index_map(trace, (w, h))
    inside = pmap >= 0
    out = _dim(arr, OUTSIDE_DIM)
    if stage is None and trace.attention:  # no scores recorded per patch: how often each patch took part
        vals = attendance_share(trace)
    elif stage is None or not stage.scores:
        out[inside] = _dim(arr, PRUNED_DIM, 18)[inside]
        return Image.fromarray(out)
    else:
        vals = patch_scores(trace, stage)
    finite = vals[np.isfinite(vals)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    # sqrt spreads the many small attention shares over more of the colour ramp
    norm = np.sqrt(np.clip((vals - lo) / (hi - lo), 0, 1)) if hi > lo else np.ones_like(vals)
    pv = np.where(inside, norm[np.clip(pmap, 0, None)], np.nan)
    scored = np.isfinite(pv)
    out[inside & ~scored] = _dim(arr, PRUNED_DIM, 18)[inside & ~scored]
    out = _blend(out, colormap(pv), 0.65, scored)
    out[~inside & _hatch((h, w))] = 70
    ev = _evidence_mask(pmap, evidence if evidence is not None else getattr(trace, "evidence", None))
    if ev is not None:
        out = draw_outline(np.ascontiguousarray(out), ev, EVIDENCE_RGB, 2, rim=True)
    return Image.fromarray(draw_view_boxes(np.ascontiguousarray(out), trace))


def render_view(image: Image.Image, trace: PruneTrace, layer: int, view: str = "tokens",
                max_side: int = DISPLAY_SIDE, evidence: Sequence[int] | None = None) -> Image.Image:
    if view == "heatmap":
        return render_heatmap(image, trace, layer, max_side, evidence)
    return render_layer(image, trace, layer, max_side, evidence)


def legend_html() -> str:
    def sw(rgb: tuple[int, int, int], text: str, border: str = "none") -> str:
        return (f'<span class="sv-swatch"><i style="background:rgb{rgb};border:{border}"></i>{text}</span>')

    items = [
        sw((230, 230, 230), "kept token (clear)", "1px solid #999"),
        sw((40, 40, 46), "pruned token (dimmed)"),
        sw((48, 82, 140), "skipped attention at this layer, still in the residual stream (ZipVL)"),
        sw(CLUSTER_COLOURS[0], "recycled cluster: deleted patches merged into one token (dot = its center)"),
        sw((70, 70, 70), "cropped away by the processor (never seen)"),
        sw((40, 40, 46), "evidence (examples): the patches the answer depends on", "2px solid #fff"),
    ]
    return '<div class="sv-legend">' + "".join(items) + "</div>"


def token_attention_views(image: Image.Image, trace: PruneTrace, token: int,
                          max_side: int = 320) -> list[tuple[Image.Image, str]]:
    """One heatmap per pruning stage of `token`'s own attention over the patches, captioned (computed)."""
    views = []
    for st, vals in token_attention(trace, token):
        if vals is None:
            continue
        row = [float(vals[p]) if 0 <= p < len(vals) else 0.0 for p in st.input_patches]
        one = replace(trace, stages=[replace(st, scores=row)])
        where = f"after layer {st.after_layer}" if st.after_layer >= 0 else "before the LLM"
        views.append((render_heatmap(image, one, st.after_layer + 1, max_side),
                      f"{where}: its attention (computed), max {np.nanmax(vals):.3g}"))
    return views


COMPARE_SIDE = 256  # the compare gallery's pictures: the size a cell of its five columns shows on a wide page


def compare_pictures(image: Image.Image, results: Sequence[tuple[str, PruneTrace | None, str]],
                     evidence: Sequence[int] | None = None,
                     max_side: int = COMPARE_SIDE) -> list[tuple[Image.Image, str]]:
    """The compare gallery: per method that ran, what its last decoder layer sees, captioned with its label. The
    upload is resized and mapped once for all of them (render_layers)."""
    ran = [(m, tr) for m, tr, _ in results if tr is not None]
    pictures = render_layers(image, [(tr, final_layer(tr)) for _, tr in ran], max_side, evidence)
    return [(pic, method_label(m)) for (m, _), pic in zip(ran, pictures, strict=True)]
