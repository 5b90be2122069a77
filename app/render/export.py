"""A run as a file to take away: one captioned picture per decoder layer, as an animated GIF or an MP4 that
browsers play."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from sparsevlm.trace import PruneTrace

from .layers import layer_counts, num_layers
from .overlays import font, render_layers


def caption_strip(img: Image.Image, text: str, height: int = 34) -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + height), (17, 24, 39))
    out.paste(img, (0, height))
    draw = ImageDraw.Draw(out)
    draw.text((10, height // 2), text, fill=(255, 255, 255), font=font(max(11, min(17, img.width // 34))),
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
