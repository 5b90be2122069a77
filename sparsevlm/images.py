"""Turn whatever a user hands us into one safe RGB picture, or say in one line why not.

The app and the CLI both call `load_image`; the engine only ever sees the RGB PIL image it returns.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InputError

# A LLaVA processor shrinks everything to a few hundred pixels, so large uploads buy nothing and a
# decompression bomb (a tiny file that expands to gigabytes) must be refused before it is decoded.
MAX_PIXELS = 40_000_000
MAX_SIDE = 12_000
MAX_FILE_BYTES = 50 * 1024 * 1024


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return Path(src).name
    return "the upload"


def _check_dimensions(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1:
        raise InputError(f"{what} has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{what} is too large to decode safely ({width}x{height} = {width * height / 1e6:.0f} megapixels; "
            f"the limit is {MAX_PIXELS / 1e6:.0f}) - it may be a decompression bomb; resize it first"
        )
    if max(width, height) > MAX_SIDE:
        raise InputError(f"{what} is {width}x{height} pixels; the longest side may be at most {MAX_SIDE}")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"an image array must be HxW, HxWx3 or HxWx4, not shape {tuple(arr.shape)}")
    _check_dimensions(arr.shape[1], arr.shape[0], "the image")
    if arr.dtype == np.uint8:
        return Image.fromarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        hi = 1.0 if float(np.nanmax(arr)) <= 1.0 else 255.0
        arr = np.clip(np.nan_to_num(arr) / hi * 255.0, 0, 255)
    elif np.issubdtype(arr.dtype, np.integer):
        hi = float(np.iinfo(arr.dtype).max) if arr.max() > 255 else 255.0
        arr = np.clip(arr.astype(np.float64) / hi * 255.0, 0, 255)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.float64) * 255.0
    else:
        raise InputError(f"an image array of dtype {arr.dtype} is not supported")
    return Image.fromarray(arr.round().astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Every mode PIL can open (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...) as 8-bit RGB on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        # 16-bit and float pictures use their own range; stretch it to 8 bits instead of clipping to white.
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src: object) -> Image.Image:
    """An RGB PIL image from a path, bytes, a file object, a PIL image or a numpy array.

    Raises InputError (one line, shown to the user) for anything that is not a usable picture.
    """
    if src is None:
        raise InputError("no image was given; upload a picture or pick an example")
    if isinstance(src, np.ndarray):
        return _to_rgb(_from_array(src))
    what = _describe(src)
    if isinstance(src, Image.Image):
        _check_dimensions(src.width, src.height, "the image")
        img = src
        if getattr(img, "is_animated", False):
            img.seek(0)
        return _to_rgb(_upright(img))

    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InputError(f"{what} is {path.stat().st_size / 2**20:.0f} MiB; images may be at most "
                             f"{MAX_FILE_BYTES // 2**20} MiB")
        data = path.read_bytes()
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif hasattr(src, "read"):
        data = src.read()
    else:
        raise InputError(f"cannot read an image from a {type(src).__name__}")
    if not data:
        raise InputError(f"{what} is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"{what} is larger than {MAX_FILE_BYTES // 2**20} MiB")

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:
                raise InputError(f"{what} is not an image (expected PNG, JPEG, GIF, WebP, BMP or TIFF)") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise InputError(f"{what} is too large to decode safely - it looks like a decompression bomb") from None
            # The header alone tells the size: refuse bombs before decoding a single pixel.
            _check_dimensions(img.width, img.height, what)
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF / APNG / WebP: the first frame is the picture
            try:
                img.load()
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise InputError(f"{what} is corrupt or truncated and cannot be decoded ({exc})") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise InputError(f"{what} is too large to decode safely - it looks like a decompression bomb") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return _to_rgb(_upright(img))


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block should not cost the user their picture."""
    try:
        return ImageOps.exif_transpose(img) or img
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        return img
