"""Pure functions from a PruneTrace (and the user's image) to pictures, figures and tables.

Nothing here touches the model or Gradio: every function reads the recorded trace, so each is testable on a
hand-built trace and the CLI or a notebook can reuse them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw, ImageFont

from sparsevlm.evaluate import evidence_recall, evidence_recall_per_stage
from sparsevlm.methods import METHODS, get_method
from sparsevlm.trace import AttentionLayer, PruneTrace, Stage


class _RanksBy(Mapping[str, str]):
    """What ranks the visual tokens, per method: declared on each method class (`ranks_by`), read live from the
    engine's registry, so a newly registered method appears here with nothing else to edit."""

    def __getitem__(self, name: str) -> str:
        if name not in METHODS:
            raise KeyError(name)
        return get_method(name).ranks_by

    def __len__(self) -> int:
        return len(METHODS)

    def __iter__(self) -> Iterator[str]:
        return iter(METHODS)


RANKS_BY: Mapping[str, str] = _RanksBy()


def method_label(method: str, long: bool = False) -> str:
    """Short label ("FastV"), or with what ranks the tokens ("FastV (last-token attention)")."""
    if method not in METHODS:
        return method
    m = get_method(method)
    return f"{m.label} ({m.ranks_by})" if long and m.ranks_by else m.label


def config_option(trace: PruneTrace, name: str, default=None):
    """One of the method's options as the trace's config records it: under "options" (traces written since each
    method declares its own options), or as a flat key (traces and /run records written before)."""
    cfg = trace.config or {}
    options = cfg.get("options")
    if isinstance(options, dict) and name in options:
        return options[name]
    return cfg.get(name, default)


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
DISPLAY_SIDE = 512

# Patch states in a label grid. SKIPPED: still in the residual stream, but left out of attention at this layer (a
# method that decides attention per layer, ZipVL).
PRUNED, KEPT, SKIPPED = -1, -2, -4
SKIPPED_TINT = (56, 132, 255)  # the blue a patch that skipped attention is tinted with (dimmed underneath)


# --- geometry ------------------------------------------------------------------------------------------------
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


# --- per-layer state -----------------------------------------------------------------------------------------
def attention_at(trace: PruneTrace, layer: int) -> AttentionLayer | None:
    """The attention decision recorded for a decoder layer (None where the method decided none)."""
    return next((a for a in trace.attention if a.layer == layer), None)


def attended_patches(trace: PruneTrace, layer: int) -> list[int] | None:
    """The patches whose visual tokens took part in attention at `layer` (visual token j sits at position
    prefix_tokens + j of the prefill sequence); None where the method decided no attention there."""
    a = attention_at(trace, layer)
    if a is None:
        return None
    lo, n = trace.prefix_tokens, trace.grid[0] * trace.grid[1]
    return sorted(p - lo for p in a.attended if 0 <= p - lo < min(n, trace.visual_tokens or n))


def patch_states(trace: PruneTrace, layer: int) -> np.ndarray:
    """Per patch: KEPT, PRUNED, SKIPPED (left out of attention at this layer), or the index (>= 0) of the recycled
    cluster that represents it."""
    n = trace.grid[0] * trace.grid[1]
    attended = attended_patches(trace, layer)
    if attended is not None and trace.stage_for_layer(layer) is None:
        states = np.full(n, SKIPPED, dtype=np.int64)
        states[attended] = KEPT
        return states
    stage = trace.stage_for_layer(layer)
    if stage is None:
        return np.full(n, KEPT, dtype=np.int64)
    states = np.full(n, PRUNED, dtype=np.int64)
    for k, m in enumerate(stage.merged):
        states[[p for p in m.members if 0 <= p < n]] = k
    states[[p for p in stage.kept if 0 <= p < n]] = KEPT
    return states


def layer_counts(trace: PruneTrace, layer: int) -> dict:
    stage = trace.stage_for_layer(layer)
    attended = attended_patches(trace, layer)
    if stage is None and attended is not None:  # every token stays; `tokens` counts those that attended
        return {"tokens": len(attended), "kept": len(attended), "clusters": 0, "covered": 0}
    if stage is None:
        return {"tokens": trace.visual_tokens, "kept": trace.visual_tokens, "clusters": 0, "covered": 0}
    covered = sum(len(m.members) for m in stage.merged)
    return {"tokens": len(stage.kept) + len(stage.merged), "kept": len(stage.kept),
            "clusters": len(stage.merged), "covered": covered}


def num_layers(trace: PruneTrace) -> int:
    return len(trace.layers) or int(trace.model.get("decoder_layers", trace.model.get("num_layers", 1)))


def attention_caption(trace: PruneTrace, layer: int) -> str:
    """What a layer of an attention-deciding run (ZipVL) does: how many took part in attention, and how many of
    the patches left out at the layer before came back."""
    a = attention_at(trace, layer)
    total = trace.visual_tokens
    here = set(attended_patches(trace, layer) or [])
    tau = a.extras.get("tau") if a else None
    head = (f"**Decoder layer {layer}** (of {num_layers(trace)}): **{len(here)}** of {total} visual tokens took part "
            f"in attention (clear); the other {total - len(here)} (blue) skipped it here")
    rule = f" - p = {a.p} of the {a.n} tokens hold τ = {tau:g} of the probe attention mass" if a and tau else ""
    text = (f"{head}{rule}. Every token stays in the residual stream and goes through the MLP; the skipped ones leave "
            "this layer's KV cache.")
    before = attended_patches(trace, layer - 1) if layer > 0 else None
    if before is not None:
        back = len(here - set(before))
        text += (f" A patch left out at one layer can come back at the next: {back} of the patches left out at layer "
                 f"{layer - 1} attend again here.")
    else:
        text += " A patch left out at one layer can come back at the next: the set is chosen again at every layer."
    return text


def layer_caption(trace: PruneTrace, layer: int) -> str:
    if trace.attention and trace.stage_for_layer(layer) is None and attention_at(trace, layer) is not None:
        return attention_caption(trace, layer)
    c = layer_counts(trace, layer)
    total = trace.visual_tokens
    head = f"**Decoder layer {layer}** (of {num_layers(trace)}) processes **{c['tokens']}** of {total} visual tokens"
    if c["tokens"] == total and trace.stage_for_layer(layer) is None:
        nxt = next((s for s in trace.stages if s.after_layer >= layer), None)
        tail = f"nothing pruned yet; the first cut comes after layer {nxt.after_layer}." if nxt else "no pruning."
        if nxt is not None and nxt.after_layer < 0:
            tail = "pruned before the language model."
        return f"{head}: {tail}"
    parts = [f"{c['kept']} kept"]
    if c["clusters"]:
        parts.append(f"{c['clusters']} recycled tokens standing for {c['covered']} deleted patches")
    return f"{head}: " + ", ".join(parts) + "."


# --- pictures ------------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont:
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
    return np.ascontiguousarray(np.asarray(image.convert("RGB").resize(size, Image.LANCZOS), dtype=np.uint8))


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
    return (id(image), image.size, tuple(trace.image_size), tuple(trace.input_region), tuple(trace.grid), max_side)


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
            x0, y0, x1, y1 = patch_box(trace, m.center, (w, h))
            centre = (round((x0 + x1) / 2), round((y0 + y1) / 2))
            r = max(3, round((x1 - x0) / 5))
            cv2.circle(out, centre, r, CLUSTER_COLOURS[k % len(CLUSTER_COLOURS)], -1, cv2.LINE_AA)
            cv2.circle(out, centre, r, (0, 0, 0), 1, cv2.LINE_AA)
    ev = _evidence_mask(cv.pmap, evidence if evidence is not None else getattr(trace, "evidence", None))
    if ev is not None:
        out = draw_outline(np.ascontiguousarray(out), ev, EVIDENCE_RGB, 2, rim=True)
    return Image.fromarray(out)


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


def heatmap_stage(trace: PruneTrace, layer: int) -> Stage | None:
    """The scores that decided what `layer` sees; before the first cut, the scores of the first cut."""
    return trace.stage_for_layer(layer) or (trace.stages[0] if trace.stages else None)


def patch_scores(trace: PruneTrace, stage: Stage) -> np.ndarray:
    """Per patch significance at a stage (NaN where the patch was not a token entering it)."""
    n = trace.grid[0] * trace.grid[1]
    vals = np.full(n, np.nan, dtype=np.float64)
    for p, s in zip(stage.input_patches, stage.scores, strict=False):
        if 0 <= p < n:
            vals[p] = s
    return vals


def attendance_share(trace: PruneTrace) -> np.ndarray:
    """Per patch, the share of the layers with an attention decision at which its visual token took part."""
    n = trace.grid[0] * trace.grid[1]
    hits = np.zeros(n, dtype=np.float64)
    for a in trace.attention:
        hits[attended_patches(trace, a.layer) or []] += 1
    return hits / max(1, len(trace.attention))


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
    return Image.fromarray(out)


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


def caption_strip(img: Image.Image, text: str, height: int = 34) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + height), (17, 24, 39))
    out.paste(img, (0, height))
    draw = ImageDraw.Draw(out)
    draw.text((10, height // 2), text, fill=(255, 255, 255), font=_font(max(11, min(17, img.width // 34))),
              anchor="lm")
    return out


def animation_frames(image: Image.Image, trace: PruneTrace, max_side: int = 384,
                     evidence: Sequence[int] | None = None) -> list[Image.Image]:
    """One captioned picture per decoder layer: what it sees and how many visual tokens that is."""
    layers = range(num_layers(trace))
    pictures = render_layers(image, [(trace, layer) for layer in layers], max_side, evidence)
    what = "visual tokens attended" if trace.attention else "visual tokens"
    return [caption_strip(pic, f"layer {layer}: {layer_counts(trace, layer)['tokens']}/{trace.visual_tokens} {what}")
            for layer, pic in zip(layers, pictures, strict=True)]


def pruning_animation(image: Image.Image, trace: PruneTrace, max_side: int = 384, frame_ms: int = 700,
                      evidence: Sequence[int] | None = None) -> bytes:
    """An animated GIF: one frame per decoder layer, captioned with the token count."""
    frames = animation_frames(image, trace, max_side, evidence)
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0,
                   optimize=False, disposal=1)
    return buf.getvalue()


def pruning_video(image: Image.Image, trace: PruneTrace, path: str, max_side: int = 384, fps: float = 1.5,
                  evidence: Sequence[int] | None = None) -> str:
    """An MP4 that browsers play: H.264 in yuv420p with the index up front, one frame per decoder layer."""
    import imageio_ffmpeg

    frames = animation_frames(image, trace, max_side, evidence)
    w, h = frames[0].size
    # H.264 4:2:0 needs even sides; 16 avoids encoder padding artefacts. Pad with the caption strip's colour.
    W, H = -(-w // 16) * 16, -(-h // 16) * 16  # noqa: N806 - frame sides
    writer = imageio_ffmpeg.write_frames(
        path, (W, H), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p", macro_block_size=1,
        quality=None, bitrate=None, output_params=["-crf", "20", "-movflags", "+faststart", "-an"],
        ffmpeg_log_level="error")
    writer.send(None)
    try:
        for f in frames:
            canvas = np.full((H, W, 3), (17, 24, 39), dtype=np.uint8)
            canvas[:h, :w] = np.asarray(f, dtype=np.uint8)
            writer.send(np.ascontiguousarray(canvas))
    finally:
        writer.close()
    return path


# --- one question token's own attention -----------------------------------------------------------------------
def token_attention(trace: PruneTrace, token: int) -> list[tuple[Stage, np.ndarray | None]]:
    """Per pruning stage that recorded its raters' rows (SparseVLM): the attention text token `token` (its index
    after the image, Rater.index) pays each patch, NaN where the patch was not a token entering the stage; None
    at a stage where the token was not a rater (its row played no part)."""
    n = trace.grid[0] * trace.grid[1]
    out = []
    for st in trace.stages:
        tokens, rows = st.extras.get("rater_tokens"), st.extras.get("rater_attention")
        if tokens is None or rows is None:
            continue
        if token not in tokens:
            out.append((st, None))
            continue
        vals = np.full(n, np.nan, dtype=np.float64)
        for p, a in zip(st.input_patches, rows[tokens.index(token)], strict=False):
            if 0 <= p < n:
                vals[p] = a
        out.append((st, vals))
    return out


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


def token_attention_note(trace: PruneTrace, token: int) -> str:
    rater = next((r for r in trace.raters if r.index == token), None)
    word = _esc(_display_token(rater.token).strip()) if rater else str(token)
    stages = token_attention(trace, token)
    if not stages:
        return (f"{_method(trace)} records no per-word attention rows: switch the method to SparseVLM to see each "
                "rater's own attention.")
    used = sum(v is not None for _, v in stages)
    if not used:
        return (f"“{word}” is not a text rater: its attention row played no part in what was pruned. Click a red "
                "token.")
    return (f"“{word}” is a text rater: its own attention over the patches at each of the {used} pruning steps "
            "(brighter = more attention; these rows, averaged, are the significance scores).")


# --- one patch through the stages ----------------------------------------------------------------------------
def patch_at(trace: PruneTrace, x: float, y: float, size: tuple[int, int]) -> int | None:
    """The patch under pixel (x, y) of a picture of `size` drawn from this trace (None outside the model's input)."""
    w, h = size
    if not (0 <= x < w and 0 <= y < h):
        return None
    p = int(patch_index_map(trace, (w, h))[int(y), int(x)])
    return p if p >= 0 else None


def patch_fate(trace: PruneTrace, patch: int) -> list[dict]:
    """What happened to one patch at every pruning stage, from the trace alone: its score and rank among the
    tokens entering the stage (rank 1 = highest score; None when it no longer entered as a token of its own),
    and its fate after the stage: kept, merged into cluster k (with which other patches, around which center),
    deleted, or gone already."""
    out = []
    for st in trace.stages:
        row: dict = {"after_layer": st.after_layer, "entering": len(st.input_patches), "score": None, "rank": None}
        if patch in st.input_patches and st.scores:
            i = st.input_patches.index(patch)
            if i < len(st.scores):
                row["score"] = float(st.scores[i])
                row["rank"] = 1 + sum(s > st.scores[i] for s in st.scores)
        cluster = next((k for k, m in enumerate(st.merged) if patch in m.members), None)
        if patch in st.kept:
            row["fate"] = "kept"
        elif cluster is not None:
            m = st.merged[cluster]
            row.update(fate="merged", cluster=cluster, center=m.center,
                       with_patches=[q for q in m.members if q != patch])
        else:
            row["fate"] = "deleted" if row["score"] is not None or patch in st.input_patches else "gone"
        out.append(row)
    return out


def patch_fate_html(trace: PruneTrace, patch: int | None) -> str:
    """The patch's fate at every stage as a small table (computed from the trace)."""
    if patch is None:
        return "<div class='sv-help'>Click the picture inside the model's input to follow one patch.</div>"
    rows, cols = trace.grid
    head = (f"<b>Patch {patch}</b> (row {patch // cols}, column {patch % cols} of the {rows}×{cols} grid) through "
            f"{_method(trace)}'s pruning steps (computed from the trace)")
    if not trace.stages and trace.attention:
        left_out = [a.layer for a in trace.attention if patch not in (attended_patches(trace, a.layer) or [])]
        n = len(trace.attention)
        text = (f"{head.replace('pruning steps', 'layers')}: it stays a token in every layer and took part in "
                f"attention at {n - len(left_out)} of {n} layers")
        if left_out:
            shown = ", ".join(map(str, left_out[:24])) + (" …" if len(left_out) > 24 else "")
            text += f"; left out at layer{'s' if len(left_out) > 1 else ''} {shown}"
        return f"<div class='sv-patch'>{text}.</div>"
    if not trace.stages:
        return f"<div class='sv-patch'>{head}: no pruning step; the patch stays a token in every layer.</div>"
    body = []
    for r in patch_fate(trace, patch):
        where = f"after layer {r['after_layer']}" if r["after_layer"] >= 0 else "before the LLM"
        score = "—" if r["score"] is None else f"{r['score']:.4g}"
        rank = "—" if r["rank"] is None else f"{r['rank']} of {r['entering']}"
        fate = {"kept": "kept", "deleted": "deleted", "gone": "already gone"}.get(r["fate"], "")
        if r["fate"] == "merged":
            others = ", ".join(str(q) for q in r["with_patches"][:12]) + (" …" if len(r["with_patches"]) > 12 else "")
            fate = (f"merged into cluster {r['cluster']} (center patch {r['center']}) with "
                    f"{len(r['with_patches'])} other patches: {others or 'none'}")
        body.append([where, score, rank, fate])
    return f"<div class='sv-patch'>{head}{table_html(PATCH_HEADERS, body)}</div>"


PATCH_HEADERS = ["step", "score (computed)", "rank by score", "fate"]


# --- text raters ---------------------------------------------------------------------------------------------
def rater_highlights(trace: PruneTrace) -> list[tuple[str, float | None]]:
    """Tokens after the image with a value in [-1, 1] for gr.HighlightedText's score mode.

    The value is the score's distance from the mean score, so raters (R > mean) come out red and the rest
    purple: the colour IS the rater rule, and its strength is how far above or below the mean a token lies.
    """
    if not trace.raters:
        return []
    scores = np.array([r.score for r in trace.raters], dtype=np.float64)
    mean = float(scores.mean())
    span = float(np.abs(scores - mean).max()) or 1.0
    out: list[tuple[str, float | None]] = []
    for r in trace.raters:
        v = (r.score - mean) / span
        if r.rater:
            v = max(v, 0.08)  # raters are always visibly red (the ">=" rule can put one at the mean)
        else:
            v = min(v, -0.08)
        out.append((_display_token(r.token), round(float(v), 3)))
    return out


def _display_token(tok: str) -> str:
    tok = tok.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\u21b5")
    return tok if tok.strip() else repr(tok)[1:-1] or "\u2423"


def raters_figure(trace: PruneTrace) -> go.Figure:
    """Bar chart of the text-relevance score R per token after the image, with the mean (the rater cut)."""
    fig = go.Figure()
    if not trace.raters:
        fig.add_annotation(text="this method does not use text raters", showarrow=False, font={"size": 14})
        fig.update_layout(height=220, xaxis={"visible": False}, yaxis={"visible": False}, **_layout_base())
        return fig
    toks = [f"{i}:{_display_token(r.token).strip() or '␣'}" for i, r in enumerate(trace.raters)]
    scores = [r.score for r in trace.raters]
    colours = ["rgb(239,68,60)" if r.rater else "rgb(148,163,184)" for r in trace.raters]
    fig.add_bar(x=toks, y=scores, marker_color=colours,
                hovertemplate="%{x}<br>R = %{y:.4f}<extra></extra>", name="R (computed)")
    mean = float(np.mean(scores))
    fig.add_hline(y=mean, line_dash="dash", line_color="#334155",
                  annotation_text=f"mean R = {mean:.4f}: tokens above it are raters",
                  annotation_position="top left")
    fig.update_layout(
        height=260, showlegend=False, title={"text": "Text relevance R per token (computed)", "x": 0.01},
        yaxis_title="R (softmax share, unitless)", xaxis={"tickangle": -45, "type": "category"}, **_layout_base())
    return fig


# --- counts --------------------------------------------------------------------------------------------------
def _layout_base() -> dict:
    return {"margin": {"l": 60, "r": 20, "t": 50, "b": 60}, "template": "plotly_white",
            "font": {"family": "Inter, system-ui, sans-serif", "size": 12}}


def counts_figure(trace: PruneTrace, budget: float | None = None) -> go.Figure:
    """Visual tokens each decoder layer processes (a step chart), annotated at every pruning step."""
    n_layers = num_layers(trace)
    xs = [rec.layer for rec in trace.layers] or list(range(n_layers))
    ys = [rec.visual_in for rec in trace.layers] or [trace.visual_tokens] * n_layers
    fig = go.Figure()
    fig.add_scatter(x=[-0.5, *xs, xs[-1] + 1] if xs else [], y=[trace.visual_tokens, *ys, ys[-1]] if ys else [],
                    mode="lines", line={"shape": "hv", "width": 3, "color": "rgb(99,102,241)"},
                    fill="tozeroy", fillcolor="rgba(99,102,241,0.12)", name="visual tokens per layer",
                    hoverinfo="skip")
    fig.add_scatter(x=xs, y=ys, mode="markers", marker={"size": 7, "color": "rgb(99,102,241)"},
                    hovertemplate="layer %{x}: %{y} visual tokens<extra></extra>", showlegend=False)
    if trace.attention:  # every token stays; attention shrinks
        ax = [a.layer for a in trace.attention]
        fig.add_scatter(x=ax, y=[a.visual for a in trace.attention], mode="lines+markers",
                        line={"width": 2, "color": "rgb(239,68,60)"}, marker={"size": 6},
                        name="visual tokens that took part in attention (the rest skip it there)",
                        hovertemplate="layer %{x}: %{y} visual tokens attended<extra></extra>")
    fig.add_hline(y=trace.visual_tokens, line_dash="dot", line_color="#94a3b8",
                  annotation_text=f"dense: {trace.visual_tokens}", annotation_position="top right")
    eq, eq_out = trace.cost.equal_tokens, trace.cost.equal_tokens_reference
    if eq:
        fig.add_hline(y=eq, line_dash="dash", line_color="rgb(234,88,12)",
                      annotation_text=f"equal tokens, input-counted = {eq:.1f}; output-counted = {eq_out:.1f}"
                      + (f"; {budget_line(trace)}" if budget else ""),
                      annotation_position="bottom right", annotation_font_color="rgb(194,65,12)")
    for i, st in enumerate(trace.stages):
        x = st.after_layer + 0.5
        lines = [f"after layer {st.after_layer}" if st.after_layer >= 0 else "before the LLM",
                 f"{st.visual_in} → {st.visual_out}"]
        if st.rank is not None:
            lines.append(f"rank(P) = {st.rank} ({st.raters} raters)")
        lines.append(f"deleted {st.deleted}")
        if st.recycled or st.clusters:
            lines.append(f"recycled {st.recycled} → {st.clusters} clusters")
        fig.add_vline(x=x, line_color="rgba(239,68,60,0.5)", line_width=1)
        fig.add_annotation(x=x, y=st.visual_in, text="<br>".join(lines), showarrow=True, arrowhead=2, ax=48,
                           ay=-35 - 55 * (i % 2), align="left", xanchor="left", bgcolor="rgba(255,255,255,0.9)",
                           bordercolor="rgb(239,68,60)",
                           font={"size": 11})
        fig.add_scatter(x=[x], y=[st.visual_out], mode="markers",
                        marker={"symbol": "x", "size": 10, "color": "rgb(239,68,60)"},
                        hovertemplate=f"{st.formula}<extra></extra>", showlegend=False)
    fig.update_layout(
        height=380, title={"text": f"Visual tokens per decoder layer ({_method(trace)}, computed from the trace)",
                           "x": 0.01},
        xaxis={"title": "decoder layer", "dtick": 1, "range": [-0.8, n_layers - 0.2]},
        yaxis={"title": "visual tokens processed", "range": [0, trace.visual_tokens * 1.55]},
        legend={"orientation": "h", "y": -0.25}, **_layout_base())
    return fig


def _method(trace: PruneTrace) -> str:
    return method_label(trace.method)


def formulas_markdown(trace: PruneTrace) -> str:
    """Each pruning step's count rule with its numbers, and what rank(P) means."""
    if not trace.stages and trace.attention:
        return attention_formulas_markdown(trace)
    if not trace.stages:
        return f"**{_method(trace)}** keeps all {trace.visual_tokens} visual tokens in every layer."
    rows = ["| step | tokens in → out | rank(P) | deleted | recycled → clusters | rule that produced the count |",
            "|---|---|---|---|---|---|"]
    for st in trace.stages:
        where = f"after layer {st.after_layer}" if st.after_layer >= 0 else "before the LLM"
        rank = f"{st.rank} (of {st.raters} raters)" if st.rank is not None else "—"
        rec = f"{st.recycled} → {st.clusters}" if (st.recycled or st.clusters) else "—"
        formula = st.formula.replace("|", "\\|")
        rows.append(f"| {where} | {st.visual_in} → {st.visual_out} | {rank} | {st.deleted} | {rec} | `{formula}` |")
    mode = config_option(trace, "count_mode", "fixed")
    notes = []
    if trace.method == "sparsevlm":
        notes.append(
            "P is the attention the text raters pay the visual tokens at that layer (rows = raters). rank(P) "
            "counts how many independent directions those rows span - a measure of how much of the image the "
            "question still needs. It can never exceed the number of raters, so it is small.")
        if mode == "paper":
            notes.append("Adaptive (paper eq. 8): delete N = ⌊λ·(tokens − rank(P))⌋; N = 0 skips the layer.")
        elif mode == "code":
            notes.append("Adaptive (reference code): keep min(⌊rank(P)·scale + bias⌋, tokens − 1).")
        else:
            notes.append("Fixed budget: counts chosen so the mean tokens per layer hits the budget; rank(P) is "
                         "computed and shown, but does not set the count in this mode.")
    if config_option(trace, "recycle") and trace.method == "sparsevlm":
        notes.append("Recycling: the top 30% of the deleted tokens (by score) are clustered (density peaks) and "
                     "each cluster is merged into one token, so their information is not entirely lost.")
    return "\n".join(rows) + ("\n\n" + "\n\n".join(notes) if notes else "")


# --- a method that decides attention per layer (ZipVL) ---------------------------------------------------------
def attention_formulas_markdown(trace: PruneTrace) -> str:
    """Per decoder layer: the count p the τ rule chose and who attended (prefix / visual / text), with the rule."""
    first = trace.attention[0]
    tau = first.extras.get("tau")
    rows = ["| layer | p (τ rule) | attended: prefix / visual / text | last position added | probe vs all rows |",
            "|---|---|---|---|---|"]
    for a in trace.attention:
        full = a.extras.get("full")
        agree = (f"p {full['p']} with all rows; recall {full['recall']:.0%}, Jaccard {full['jaccard']:.2f}"
                 if full else "—")
        rows.append(f"| {a.layer} | {a.p} of {a.n} | {len(a.attended)}: {a.prefix} / {a.visual} / {a.text} | "
                    f"{'yes' if a.extras.get('forced_last') else 'no'} | {agree} |")
    formula = (first.formula or "").replace("|", "\\|")
    notes = [f"Rule at every layer: `{formula}`" if formula else "",
             f"**{_method(trace)}** prunes nothing: all {trace.visual_tokens} visual tokens stay in every layer's "
             "residual stream and go through its MLP. At each layer, the tokens holding a share τ"
             + (f" = {tau:g}" if tau is not None else "") + " of the probe rows' attention mass (p of them, the "
             "rest ranked out by attention per query that can see them) take part in attention there, and only "
             "their keys and values stay in that layer's cache. The count adapts to the layer and the input: no "
             "budget sets it."]
    if trace.cost.budget_note:
        notes.append(f"Budget: {trace.cost.budget_note}.")
    return "\n".join(rows) + "\n\n" + "\n\n".join(n for n in notes if n)


def _curve_at(ranks: Sequence[int], mass: Sequence[float], p: int) -> float:
    """The curve's share at rank p (linear between the recorded ranks)."""
    if not ranks:
        return 0.0
    return float(np.interp(p, np.asarray(ranks, dtype=np.float64), np.asarray(mass, dtype=np.float64)))


def mass_curve_figure(trace: PruneTrace, layer: int) -> go.Figure:
    """At one decoder layer: the probe rows' accumulated attention per token, sorted largest first and summed
    (share of the total), with τ marked and the count p read off where the curve reaches it."""
    fig = go.Figure()
    a = attention_at(trace, layer)
    if a is None or not a.extras.get("curve_ranks"):
        fig.add_annotation(text=f"no attention decision recorded at layer {layer}", showarrow=False,
                           font={"size": 14})
        fig.update_layout(height=220, xaxis={"visible": False}, yaxis={"visible": False}, **_layout_base())
        return fig
    ranks, mass = a.extras["curve_ranks"], a.extras["curve_mass"]
    tau = float(a.extras.get("tau", 1.0))
    fig.add_scatter(x=ranks, y=mass, mode="lines", line={"width": 3, "color": "rgb(99,102,241)"},
                    fill="tozeroy", fillcolor="rgba(99,102,241,0.10)", name="share of the attention mass",
                    hovertemplate="the %{x} most-attended tokens hold %{y:.1%} of the mass<extra></extra>")
    fig.add_hline(y=tau, line_dash="dash", line_color="rgb(234,88,12)",
                  annotation_text=f"τ = {tau:g}", annotation_position="bottom right",
                  annotation_font_color="rgb(194,65,12)")
    at_p = _curve_at(ranks, mass, a.p)
    fig.add_vline(x=a.p, line_dash="dot", line_color="rgb(239,68,60)")
    fig.add_scatter(x=[a.p], y=[at_p], mode="markers", marker={"size": 11, "color": "rgb(239,68,60)"},
                    name=f"p = {a.p}", hovertemplate=f"p = {a.p}: the first rank reaching τ<extra></extra>")
    fig.add_annotation(x=a.p, y=min(at_p, tau), text=f"p = {a.p} of {a.n} tokens<br>reach τ = {tau:g}",
                       showarrow=True, arrowhead=2, ax=-80, ay=40, align="right", bgcolor="rgba(255,255,255,0.9)",
                       bordercolor="rgb(239,68,60)", font={"size": 11})
    probes = a.extras.get("probes")
    rows = "every row" if probes == "all" else f"{len(probes or [])} probe rows"
    fig.update_layout(
        height=300, showlegend=False,
        title={"text": f"Layer {layer}: attention mass of {rows}, tokens sorted by it (computed)", "x": 0.01,
               "font": {"size": 13}},
        xaxis={"title": "tokens, most-attended first (rank)", "range": [0, a.n * 1.02]},
        yaxis={"title": "share of the mass", "range": [0, 1.05], "tickformat": ".0%"},
        **{**_layout_base(), "margin": {"l": 60, "r": 20, "t": 45, "b": 50}})
    return fig


def count_kind(trace: PruneTrace) -> str:
    """Whether a run's per-layer count adapts to the input or follows a fixed schedule, in words."""
    if trace.attention:
        tau = trace.attention[0].extras.get("tau")
        return "adaptive: τ" + (f" = {tau:g}" if tau is not None else "")
    if trace.method == "sparsevlm" and config_option(trace, "count_mode", "fixed") in ("paper", "code"):
        return "adaptive: rank(P)"
    if trace.method == "dense":
        return "no pruning"
    return "fixed schedule"


COUNT_COLOURS = {"sparsevlm": "rgb(16,185,129)", "fastv": "rgb(234,88,12)", "pyramiddrop": "rgb(168,85,247)"}


def count_comparison_figure(trace: PruneTrace, references: Sequence[PruneTrace] = ()) -> go.Figure:
    """Each layer's count of an attention-deciding run (visual tokens attended, and p over the whole sequence)
    beside other runs of the same question: visual tokens each layer processes, adaptive or on a fixed schedule."""
    fig = go.Figure()
    depth = num_layers(trace)
    xs = [a.layer for a in trace.attention]
    fig.add_scatter(x=xs, y=[a.visual for a in trace.attention], mode="lines+markers",
                    line={"width": 3, "color": "rgb(99,102,241)"}, marker={"size": 6},
                    name=f"{_method(trace)}: visual tokens attended ({count_kind(trace)})",
                    hovertemplate="layer %{x}: %{y} visual tokens attended<extra></extra>")
    fig.add_scatter(x=xs, y=[a.p for a in trace.attention], mode="lines", line={"width": 1.5, "dash": "dot",
                                                                                 "color": "rgb(99,102,241)"},
                    name=f"{_method(trace)}: p, tokens of the whole sequence ({count_kind(trace)})",
                    hovertemplate="layer %{x}: p = %{y}<extra></extra>")
    for ref in references:
        rx = [r.layer for r in ref.layers] or list(range(depth))
        ry = [r.visual_in for r in ref.layers] or [ref.visual_tokens] * depth
        colour = COUNT_COLOURS.get(ref.method, "rgb(100,116,139)")
        fig.add_scatter(x=[*rx, rx[-1] + 1] if rx else [], y=[*ry, ry[-1]] if ry else [], mode="lines",
                        line={"shape": "hv", "width": 2, "color": colour,
                              "dash": "solid" if count_kind(ref).startswith("adaptive") else "dash"},
                        name=f"{_method(ref)}: visual tokens kept ({count_kind(ref)})",
                        hovertemplate=f"{_method(ref)}, layer %{{x}}: %{{y}} visual tokens<extra></extra>")
    fig.add_hline(y=trace.visual_tokens, line_dash="dot", line_color="#94a3b8",
                  annotation_text=f"dense: {trace.visual_tokens} visual tokens", annotation_position="top right")
    budget = trace.cost.budget or (trace.config or {}).get("budget")
    fig.update_layout(
        height=420,
        title={"text": f"Per-layer counts for this question (computed): {_method(trace)} beside "
                       + (", ".join(_method(r) for r in references) or "no other method")
                       + (f" at budget {budget}" if budget and references else ""), "x": 0.01, "font": {"size": 13}},
        xaxis={"title": "decoder layer", "dtick": 2 if depth > 16 else 1, "range": [-0.5, depth - 0.5]},
        yaxis={"title": "tokens", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.22, "x": 0, "font": {"size": 11}},
        **{**_layout_base(), "margin": {"l": 60, "r": 20, "t": 50, "b": 40}})
    return fig


def _where(trace: PruneTrace, positions: Sequence[int]) -> dict[str, int]:
    """How many of `positions` (prefill sequence) lie before the image, in it, after it."""
    lo, hi = trace.prefix_tokens, trace.prefix_tokens + trace.visual_tokens
    out = {"prefix": 0, "visual": 0, "text": 0}
    for p in positions:
        out["prefix" if p < lo else "visual" if p < hi else "text"] += 1
    return out


def _counted(where: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in where.items() if v) or "none"


def probe_strip_svg(trace: PruneTrace, a: AttentionLayer) -> str:
    """The prefill sequence as a strip [prefix | visual | text] with a tick at every probe row."""
    n = max(1, a.n)
    lo, hi = trace.prefix_tokens, trace.prefix_tokens + trace.visual_tokens
    parts = [f'<rect x="0" y="6" width="{lo}" height="18" fill="#cbd5e1"/>',
             f'<rect x="{lo}" y="6" width="{hi - lo}" height="18" fill="#c7d2fe"/>',
             f'<rect x="{hi}" y="6" width="{max(0, n - hi)}" height="18" fill="#fde68a"/>']
    probes = a.extras.get("probes")
    if isinstance(probes, list):
        for p in sorted(set(probes)):
            parts.append(f'<rect x="{p}" y="2" width="{max(1.0, n / 400):.2f}" height="26" fill="#111827"/>')
    return (f'<svg class="sv-probe-strip" viewBox="0 0 {n} 30" preserveAspectRatio="none" width="100%" height="30" '
            f'role="img" aria-label="probe rows over the sequence">{"".join(parts)}</svg>'
            '<div class="sv-legend"><span class="sv-swatch"><i style="background:#cbd5e1"></i>before the image</span>'
            '<span class="sv-swatch"><i style="background:#c7d2fe"></i>visual tokens</span>'
            '<span class="sv-swatch"><i style="background:#fde68a"></i>question and prompt</span>'
            '<span class="sv-swatch"><i style="background:#111827"></i>a probe row</span></div>')


def probes_html(trace: PruneTrace, layer: int) -> str:
    """The probe rows at one layer (which positions, how many visual / text) and how far the probe estimate of
    the attended set agrees with full attention (probes=both), or how to get that figure."""
    a = attention_at(trace, layer)
    if a is None:
        return f"<div class='sv-probes'>No attention decision recorded at layer {layer}.</div>"
    probes = a.extras.get("probes")
    if probes == "all":
        head = (f"<b>Probe rows at layer {layer}</b>: every one of the {a.n} rows (full attention), so the attended "
                "set is exact here.")
    else:
        probes = list(probes or [])
        recent_n = int(config_option(trace, "recent", 64) or 0)
        recent = [p for p in probes if p >= a.n - recent_n]
        drawn = [p for p in probes if p < a.n - recent_n]
        head = (f"<b>Probe rows at layer {layer}</b>: {len(probes)} query rows of the {a.n} score every key. The "
                f"{len(recent)} most recent (positions {min(recent, default=0)}–{max(recent, default=0)}: "
                f"{_counted(_where(trace, recent))})")
        if drawn:
            head += (f" and {len(drawn)} drawn at random before them ({len(set(drawn))} distinct: "
                     f"{_counted(_where(trace, sorted(set(drawn))))})")
        head += ". Only these rows' attention is computed in full; the rest of the layer keeps the fast kernel."
    full = a.extras.get("full")
    if full:
        rec = [x.extras["full"]["recall"] for x in trace.attention if "full" in x.extras]
        jac = [x.extras["full"]["jaccard"] for x in trace.attention if "full" in x.extras]
        agree = (f"<b>Probes against full attention</b> (every row, computed beside the run): at layer {layer} the "
                 f"probes chose p = {a.p}, all rows p = {full['p']}; {full['overlap']} tokens in both, so the probe "
                 f"set holds {full['recall']:.0%} of the full-attention set (Jaccard {full['jaccard']:.2f}). Over the "
                 f"{len(rec)} layers: recall {np.mean(rec):.0%} on average (lowest {min(rec):.0%}), Jaccard "
                 f"{np.mean(jac):.2f}.")
    elif probes == "all":
        agree = "The probe estimate is not in play: every row was computed."
    else:
        agree = ("How far the probes agree with full attention is not recorded for this run: choose <i>Probe rows → "
                 f"probes, compared with all rows</i> under {_method(trace)} options (API: "
                 "<code>zipvl_probes=\"both\"</code>) and run again.")
    forced = " The last position was not among the p and was added (it is always attended)." if a.extras.get(
        "forced_last") else ""
    return (f"<div class='sv-probes'><p>{head}{forced}</p>{probe_strip_svg(trace, a)}<p>{agree}</p>"
            "<p class='sv-help'>Heatmap view: how often each patch took part in attention over all layers.</p></div>")


# --- latency and cost ----------------------------------------------------------------------------------------
def _flops(v: float) -> tuple[float, str]:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if abs(v) >= scale:
            return v / scale, unit
    return v, "FLOPs"


def _bytes(v: float) -> tuple[float, str]:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= scale:
            return v / scale, unit
    return v, "B"


def format_bytes(v: float) -> str:
    n, unit = _bytes(v)
    return f"{n:.3g} {unit}"


def latency_rows(pruned: PruneTrace, dense: PruneTrace | None) -> list[list]:
    """[quantity, pruned, dense, change, unit, how it was obtained] rows."""
    tp, td = pruned.timings_ms, dense.timings_ms if dense else None
    rows: list[list] = []

    def add(name: str, a: float, b: float | None, unit: str, kind: str, digits: int = 1) -> None:
        change = ""
        if b not in (None, 0):
            change = f"{(a - b) / b * 100:+.0f}%"
        rows.append([name, round(a, digits), "" if b is None else round(b, digits), change, unit, kind])

    if td is None or "vision" not in tp.shared:
        add("vision tower + projector", tp.vision, td.vision if td else None, "ms", "measured")
    else:  # one measurement for both runs: the same figure, not a change
        add("vision tower + projector (runs once per request, shared by both runs)", tp.vision, td.vision, "ms",
            "measured")
    if td is not None:  # the same work in both runs: never a difference, whatever the two timings say
        rows[-1][3] = "same work, measured once" if "vision" in tp.shared else "same work in both runs"
    add("text raters", tp.raters, td.raters if td else None, "ms", "measured", 2)
    overhead = ("selection overhead (probe rows, count, selection)" if pruned.attention else
                "pruning overhead (scores, rank, clustering)")
    add(overhead, tp.prune_overhead, td.prune_overhead if td else None, "ms", "measured", 2)
    add("prefill = time to first token", tp.prefill, td.prefill if td else None, "ms", "measured")
    word = "selection" if pruned.attention else "pruning"  # a method that decides attention selects, prunes nothing
    add(f"  of which the decoder (incl. {word} overhead)", tp.llm_prefill, td.llm_prefill if td else None, "ms",
        "measured")
    add("decode, per new token", tp.decode_per_token, td.decode_per_token if td else None, "ms", "measured", 2)
    add("new tokens generated", tp.decode_tokens, td.decode_tokens if td else None, "tokens", "measured", 0)
    add("total", tp.total, td.total if td else None, "ms", "measured")
    cp, cd = pruned.cost, dense.cost if dense else None
    add("equal tokens, input-counted (mean visual tokens per layer; what FLOPs follow)", cp.equal_tokens,
        cd.equal_tokens if cd else float(pruned.visual_tokens), "tokens", "computed")
    add("equal tokens, output-counted (a pruning layer at its output; the papers' figure)",
        cp.equal_tokens_reference, cd.equal_tokens_reference if cd else float(pruned.visual_tokens), "tokens",
        "computed")
    if cp.attended_visual is not None:  # every token stays in the residual stream; attention shrinks
        add("visual tokens attended per layer (mean; the rest skip attention there and leave its cache)",
            cp.attended_visual, float(pruned.visual_tokens), "tokens", "computed")
        if cp.attended_share is not None:
            add("share of all tokens attended per layer (mean)", cp.attended_share * 100, 100.0, "%", "computed")
    dense_flops = cd.prefill_flops if cd else cp.prefill_flops_dense
    v, unit = _flops(max(cp.prefill_flops, dense_flops))
    scale = max(cp.prefill_flops, dense_flops) / v if v else 1.0
    add(f"prefill compute (incl. {word} overhead)", cp.prefill_flops / scale, dense_flops / scale, unit,
        "computed", 3)
    ov, ounit = _flops(cp.prune_overhead_flops)
    add(f"  of which {word} overhead" + (" (the probe rows)" if pruned.attention else ""), ov, None, ounit,
        "computed", 3)
    dense_kv = cd.kv_bytes if cd else cp.kv_bytes_dense
    v, unit = _bytes(max(cp.kv_bytes, dense_kv))
    scale = max(cp.kv_bytes, dense_kv) / v if v else 1.0
    add("KV cache after prefill", cp.kv_bytes / scale, dense_kv / scale, unit, "computed", 3)
    dense_vkv = cd.visual_kv_bytes if cd else cp.visual_kv_bytes_dense
    add("  of which visual tokens", cp.visual_kv_bytes / scale, dense_vkv / scale, unit, "computed", 3)
    mp, md = pruned.memory, dense.memory if dense else None
    if mp.kv_bytes_prefill is not None:
        add("KV cache after prefill, read from the cache object", mp.kv_bytes_prefill / scale,
            md.kv_bytes_prefill / scale if md and md.kv_bytes_prefill is not None else None, unit, "measured", 3)
    if mp.peak_gpu_bytes is not None:
        pv, punit = _bytes(max(mp.peak_gpu_bytes, md.peak_gpu_bytes or 0) if md else mp.peak_gpu_bytes)
        pscale = (max(mp.peak_gpu_bytes, md.peak_gpu_bytes or 0) if md else mp.peak_gpu_bytes) / pv if pv else 1.0
        add("peak GPU memory (CUDA allocator)", mp.peak_gpu_bytes / pscale,
            md.peak_gpu_bytes / pscale if md and md.peak_gpu_bytes is not None else None, punit, "measured", 3)
    return rows


LABEL_HEADROOM = 0.22  # room above a bar chart's tallest bar for the value label printed over it
LATENCY_HEADERS = ["quantity", "with pruning", "dense", "change", "unit", "how obtained"]


def latency_figure(pruned: PruneTrace, dense: PruneTrace | None) -> go.Figure:
    """Side-by-side bars: measured prefill / decode / total, and computed prefill FLOPs and KV cache."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, column_widths=[0.5, 0.25, 0.25], horizontal_spacing=0.09,
                        subplot_titles=("measured wall-clock (ms)", "computed prefill compute",
                                        "computed KV cache"))
    tp = pruned.timings_ms
    names = ["prefill", "decode / token", "total"]
    runs = [(f"{_method(pruned)}", pruned, "rgb(99,102,241)")]
    if dense is not None:
        runs.append(("dense", dense, "rgb(148,163,184)"))
    for label, tr, colour in runs:
        t = tr.timings_ms
        fig.add_bar(x=names, y=[t.prefill, t.decode_per_token, t.total], name=label, marker_color=colour,
                    legendgroup=label, row=1, col=1, texttemplate="%{y:.0f}", textposition="outside",
                    cliponaxis=False, hovertemplate="%{x}: %{y:.1f} ms (measured)<extra>" + label + "</extra>")
    tops = {1: max(max(t.timings_ms.prefill, t.timings_ms.decode_per_token, t.timings_ms.total) for _, t, _ in runs)}
    del tp
    for col, field, dense_field, fmt in ((2, "prefill_flops", "prefill_flops_dense", _flops),
                                         (3, "kv_bytes", "kv_bytes_dense", _bytes)):
        bars = [(lbl, getattr(tr.cost, field), c) for lbl, tr, c in runs]
        if dense is None:
            bars.append(("dense", getattr(pruned.cost, dense_field), "rgb(148,163,184)"))
        top = max(b for _, b, _ in bars) or 1
        v, unit = fmt(top)
        scale = top / (v or 1)
        for lbl, b, c in bars:
            fig.add_bar(x=[lbl], y=[b / scale], marker_color=c, showlegend=False, row=1, col=col,
                        texttemplate="%{y:.3g}", textposition="outside", cliponaxis=False,
                        hovertemplate="%{y:.4g} " + unit + " (computed)<extra></extra>")
        tops[col] = top / scale
        fig.update_yaxes(title_text=unit, row=1, col=col)
    fig.update_yaxes(title_text="ms", row=1, col=1)
    # a taller top margin: the page's label badge sits over the chart's top-left corner, above the subplot titles
    fig.update_layout(height=360, barmode="group", legend={"orientation": "h", "y": -0.18},
                      **{**_layout_base(), "margin": {"l": 60, "r": 20, "t": 80, "b": 60}})
    # the value labels sit above the bars: each axis reaches LABEL_HEADROOM above its tallest bar
    for col, top in tops.items():
        fig.update_yaxes(range=[0, (top or 1.0) * (1 + LABEL_HEADROOM)], autorange=False, row=1, col=col)
    return fig


def answer_markdown(pruned: PruneTrace, dense: PruneTrace | None) -> str:
    a = pruned.answer.strip() or "(empty answer)"
    if dense is None or pruned.method == "dense":
        return f"### {a}\n\n{_method(pruned)}, {pruned.visual_tokens} visual tokens."
    d = dense.answer.strip() or "(empty answer)"
    agree = _normalise(a) == _normalise(d)
    badge = ('<span class="sv-badge sv-agree">✓ same answer as dense</span>' if agree else
             '<span class="sv-badge sv-differ">≠ differs from dense</span>')
    return (
        f"<div class='sv-answers'><div class='sv-answer'><div class='sv-k'>{_method(pruned)} · "
        f"{_esc(budget_line(pruned))}</div><div class='sv-v'>{_esc(a)}</div></div>"
        f"<div class='sv-answer sv-dense'><div class='sv-k'>Dense · {dense.visual_tokens} tokens</div>"
        f"<div class='sv-v'>{_esc(d)}</div></div></div>{badge}"
    )


def answers_agree(pruned: PruneTrace, dense: PruneTrace) -> bool:
    return _normalise(pruned.answer) == _normalise(dense.answer)


def _normalise(s: str) -> str:
    return " ".join(s.lower().strip().rstrip(".").split())


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --- compare ------------------------------------------------------------------------------------------------
COMPARE_HEADERS = ["method", "answer", "agrees with dense", "equal tokens in / out (computed)", "budget",
                   "prefill ms (measured)",
                   "total ms (measured)", "prefill compute (computed)", "KV cache (computed)",
                   "evidence recall at the last layer: kept / represented (computed, generated scenes)"]


def budget_line(trace: PruneTrace) -> str:
    """Which accounting met the budget, in which counting: "budget 64, paper accounting: output-counted 64.8"."""
    c = trace.cost
    if c.budget_note:  # a method without a budget says what its own rule amounted to (ZipVL: τ -> attended tokens)
        return c.budget_note
    if c.budget is None or c.budget_figure is None:
        return f"{c.equal_tokens:.0f} equal tokens (no budget: {'dense' if trace.method == 'dense' else 'adaptive'})"
    counted = {"input": "input-counted", "output": "output-counted", "kept": "tokens kept",
               "attended": "visual tokens attended per layer",
               "flops": "prefill FLOPs as equal tokens"}.get(c.budget_counting, c.budget_counting)
    met = "met" if c.budget_met else "NOT met"
    fitted = ", τ fitted to the budget" if config_option(trace, "fit") == "budget" else ""
    return f"budget {c.budget} {met} by {c.accounting} accounting{fitted} ({counted} {c.budget_figure:.1f})"


def compare_rows(results: Sequence[tuple[str, PruneTrace | None, str]],
                 evidence: Sequence[int] | None = None) -> list[list]:
    """results: (method, trace or None, error message) per method, dense included. `evidence`: a generated
    scene's evidence patches in the traces' grid (the last column stays empty without them, e.g. for uploads)."""
    dense = next((t for m, t, _ in results if m == "dense" and t is not None), None)
    rows = []
    for method, tr, err in results:
        label = method_label(method)
        if tr is None:
            rows.append([label, f"not available: {err}", "", "", "", "", "", "", "", ""])
            continue
        f, fu = _flops(tr.cost.prefill_flops)
        b, bu = _bytes(tr.cost.kv_bytes)
        agree = "" if dense is None or method == "dense" else ("yes" if answers_agree(tr, dense) else "no")
        equal = f"{tr.cost.equal_tokens:.1f} / {tr.cost.equal_tokens_reference:.1f}"
        if tr.cost.attended_visual is not None:
            equal += f" ({tr.cost.attended_visual:.1f} attended)"
        rows.append([label, tr.answer.strip(), agree, equal, budget_line(tr),
                     round(tr.timings_ms.prefill, 1), round(tr.timings_ms.total, 1), f"{f:.3g} {fu}",
                     f"{b:.3g} {bu}", recall_text(evidence_recall(tr, evidence)) if evidence is not None else ""])
    return rows


COMPARE_SIDE = 256  # the compare gallery's pictures: the size a cell of its five columns shows on a wide page


def compare_pictures(image: Image.Image, results: Sequence[tuple[str, PruneTrace | None, str]],
                     evidence: Sequence[int] | None = None,
                     max_side: int = COMPARE_SIDE) -> list[tuple[Image.Image, str]]:
    """The compare gallery: per method that ran, what its last decoder layer sees, captioned with its label. The
    upload is resized and mapped once for all of them (render_layers)."""
    ran = [(m, tr) for m, tr, _ in results if tr is not None]
    pictures = render_layers(image, [(tr, final_layer(tr)) for _, tr in ran], max_side, evidence)
    return [(pic, method_label(m)) for (m, _), pic in zip(ran, pictures, strict=True)]


# --- tables as the page shows them ----------------------------------------------------------------------------
# The page's table headers stay short so every row shows without scrolling inside the table; the long wording is
# the header's tooltip and a line of the legend under the table.
COMPARE_SHORT = {
    "evidence recall at the last layer: kept / represented (computed, generated scenes)":
        "evidence recall (computed)",
}
COMPARE_LEGEND = {
    "equal tokens in / out (computed)": "mean visual tokens per decoder layer, a pruning layer counted at its input "
                                        "(what FLOPs follow) / at its output (the papers' figure); for a method "
                                        "that keeps every token and shrinks attention (ZipVL), the mean visual "
                                        "tokens that took part in attention follow in brackets",
    "budget": "which accounting met the budget, and in which counting; a method without a budget (ZipVL) says "
              "what its own rule amounted to",
    "evidence recall (computed)": "evidence recall at the last layer: share of a generated scene's evidence patches "
                                  "kept directly / represented (kept or inside a recycled token); empty for uploads",
}


def table_html(headers: Sequence[str], rows: Sequence[Sequence], short: dict[str, str] | None = None,
               legend: dict[str, str] | None = None, elem_class: str = "sv-table") -> str:
    """A plain HTML table that grows with its rows (no scrolling box, no virtual rows): `short` maps a header to
    what the page prints (the full header becomes its tooltip); `legend` explains headers in lines beneath."""
    short, legend = short or {}, legend or {}
    shown = [short.get(h, h) for h in headers]
    head = "".join(f'<th title="{_esc(legend.get(s, h))}">{_esc(s)}</th>' for h, s in zip(headers, shown))
    body = []
    for row in rows:
        cells = []
        for v in row:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="sv-num">{v}</td>' if num else f"<td>{_esc(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<li><b>{_esc(s)}</b>: {_esc(legend[s])}</li>" for s in shown if s in legend)
    return (f'<table class="{elem_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + (f'<ul class="sv-table-legend">{notes}</ul>' if notes else ""))


def compare_table_html(rows: Sequence[Sequence]) -> str:
    """The compare rows (compare_rows) as the page shows them: short headers, the long wording in the legend."""
    return table_html(COMPARE_HEADERS, rows, COMPARE_SHORT, COMPARE_LEGEND)


def latency_table_html(rows: Sequence[Sequence]) -> str:
    """The latency rows (latency_rows) as the page shows them."""
    return table_html(LATENCY_HEADERS, rows)


def final_layer(trace: PruneTrace) -> int:
    return max(0, num_layers(trace) - 1)


def default_layer(trace: PruneTrace) -> int:
    """The first layer after the last pruning step: where the full effect of pruning is visible. A method that
    decides attention per layer (ZipVL): the layer where the fewest visual tokens attended."""
    if not trace.stages and trace.attention:
        return min(trace.attention, key=lambda a: (a.visual, a.layer)).layer
    if not trace.stages:
        return 0
    return min(final_layer(trace), max(0, trace.stages[-1].after_layer + 1))


# --- ground truth of generated scenes ---------------------------------------------------------------------------
def regrid_patches(patches: Sequence[int], from_grid: tuple[int, int], to_grid: tuple[int, int]) -> list[int]:
    """Patch indices of one grid mapped to another over the same square picture: every cell of `to_grid` that
    overlaps one of `patches` (the generator marks evidence on its 24x24 grid; a model may see 12x12)."""
    (fr, fc), (tr_, tc) = from_grid, to_grid
    if (fr, fc) == (tr_, tc):
        return sorted(set(int(p) for p in patches))
    out = set()
    for p in patches:
        r, c = divmod(int(p), fc)
        # the source cell spans [r/fr, (r+1)/fr) of the height: every target row it touches
        for rr in range(r * tr_ // fr, -(-(r + 1) * tr_ // fr)):
            for cc in range(c * tc // fc, -(-(c + 1) * tc // fc)):
                out.add(rr * tc + cc)
    return sorted(out)


def recall_text(recall: dict | None) -> str:
    if recall is None:
        return "no evidence patches"
    return (f"{recall['kept']:.0%} kept / {recall['represented']:.0%} represented "
            f"(of {recall['evidence_patches']} patches)")


def truth_html(truth: dict | None, pruned: PruneTrace | None = None) -> str:
    """The generated scene's true answer and, after a run, the evidence recall of the pruned run."""
    if not truth:
        return ""
    world = f"world {_esc(truth['world'])}, " if truth.get("world") else ""
    line = (f"Generated scene ({world}seed {truth['seed']}, {_esc(truth['family'])} question): true answer "
            f"<b>{_esc(str(truth['answer']))}</b>; {len(truth['evidence'])} evidence patches"
            + (f" of its {truth['grid'][0]}×{truth['grid'][1]} grid" if truth.get("grid") else "")
            + ", outlined in white")
    if pruned is not None:
        rec = evidence_recall(pruned, truth["evidence"])
        line += (f"<br>Evidence recall at the last layer (computed from the trace): {recall_text(rec)}"
                 + (f", {rec['merged_only']:.0%} only through recycled / merged tokens" if rec else ""))
        steps = evidence_recall_per_stage(pruned, truth["evidence"])
        if steps:
            line += "<br>After each pruning step (kept / represented): " + ", ".join(
                f"layer {s['after_layer']}: {s['kept']:.0%} / {s['represented']:.0%}" for s in steps)
        if truth.get("answer") is not None:
            right = _normalise(pruned.answer) == _normalise(str(truth["answer"]))
            line += f" · the {method_label(pruned.method)} answer is {'right' if right else 'wrong'}"
    return f"<div class='sv-truth'>{line}</div>"


def empty_answer_note(trace: PruneTrace) -> str:
    """Why an answer came out empty, when the trace shows the cause ('' otherwise): the method handed the language
    model the vision tower's [CLS] token (a merged token at no patch, VisionZip's dominant set). LLaVA trains its
    projector and language model on patch tokens only ([CLS] is dropped), so that token is out of distribution
    for the model; the small embedded model can answer nothing at all after it."""
    if trace.answer.strip() or not any(m.center < 0 for st in trace.stages for m in st.merged):
        return ""
    return (f"<div class='sv-unknown'>{_method(trace)} answered with an empty string on this model. It hands the "
            "language model the vision tower's [CLS] token as a visual token, and this model never saw that token "
            "in training (LLaVA feeds its projector patch tokens only): the [CLS] embedding is out of distribution "
            "here, and the answer stops at once. The other methods hand over patch tokens only.</div>")


def unknown_words_html(unknown: Sequence[tuple[str, str | None]]) -> str:
    """The vocabulary hint above the results ('' when the model knows every word)."""
    if not unknown:
        return ""
    parts = [f"<b>{_esc(w)}</b>" + (f" (did you mean <b>{_esc(s)}</b>?)" if s else "") for w, s in unknown]
    noun = "word" if len(unknown) == 1 else "words"
    return (f"<div class='sv-unknown'>The model does not know the {noun} {', '.join(parts)}: its tokenizer reads "
            f"{'it' if len(unknown) == 1 else 'them'} as &lt;unk&gt;, so the answer may be wrong. The run still "
            "happens.</div>")
