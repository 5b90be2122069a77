"""load_image: every kind of upload either becomes an RGB picture or fails with one clear line."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sparsevlm.errors import InputError
from sparsevlm.images import MAX_PIXELS, load_image


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid-header PNG claiming a huge size; the few bytes of data expand to nothing useful."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    data = zlib.compress(row * 64, 9)  # deliberately short: a bomb is mostly promise
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_rgb_png_path_roundtrip(tmp_path):
    src = Image.new("RGB", (40, 20), (10, 200, 30))
    p = tmp_path / "a.png"
    src.save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (40, 20)
    assert img.getpixel((5, 5)) == (10, 200, 30)


def test_bytes_and_file_object():
    data = _png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)))
    assert load_image(data).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(io.BytesIO(data)).size == (8, 8)


@pytest.mark.parametrize(
    "mode,colour",
    [("L", 128), ("LA", (128, 255)), ("RGBA", (255, 0, 0, 255)), ("CMYK", (0, 255, 255, 0)), ("1", 1)],
)
def test_modes_convert_to_rgb(mode, colour):
    img = load_image(_png_bytes(Image.new(mode, (6, 4), colour), "TIFF" if mode == "CMYK" else "PNG"))
    assert img.mode == "RGB" and img.size == (6, 4)


def test_rgba_transparent_becomes_white():
    img = load_image(_png_bytes(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_palette_png():
    p = Image.new("RGB", (10, 10), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    img = load_image(_png_bytes(p))
    assert img.mode == "RGB"
    r, _, b = img.getpixel((3, 3))
    assert b > 200 and r < 50


def test_sixteen_bit_grayscale_is_stretched_not_clipped():
    arr = np.zeros((4, 8), dtype=np.uint16)
    arr[:, 4:] = 40000
    img16 = Image.fromarray(arr)
    assert img16.mode.startswith("I;16")
    img = load_image(_png_bytes(img16))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((7, 0)) == (255, 255, 255)


def test_exif_rotation_is_honoured():
    src = Image.new("RGB", (60, 20), (0, 0, 0))
    src.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = load_image(_png_bytes(src, "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == (20, 60)
    r, g, _ = img.getpixel((10, 3))  # the left strip ends up on top
    assert r > 200 and g < 60


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = load_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (16, 16)
    r, g, b = img.getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50


def test_numpy_arrays():
    assert load_image(np.zeros((5, 7, 3), dtype=np.uint8)).size == (7, 5)
    assert load_image(np.ones((5, 7), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((5, 7, 4), dtype=np.uint8)).mode == "RGB"
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((5, 7, 2), dtype=np.uint8))


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is plain text, not a picture\n")
    with pytest.raises(InputError, match="not an image") as e:
        load_image(p)
    assert "\n" not in str(e.value)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_truncated_png():
    data = _png_bytes(Image.effect_noise((200, 200), 60).convert("RGB"))
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_truncated_jpeg():
    data = _png_bytes(Image.effect_noise((300, 300), 60).convert("RGB"), "JPEG")
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(data[: len(data) // 3])


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(bomb_png())


def test_huge_side_is_refused():
    # Under the pixel limit, but absurdly long.
    with pytest.raises(InputError, match="longest side"):
        load_image(bomb_png(20_000, 10))


def test_huge_pil_image_is_refused():
    big = Image.new("1", (8000, MAX_PIXELS // 8000 + 10))
    with pytest.raises(InputError, match="too large"):
        load_image(big)


def test_wrong_type():
    with pytest.raises(InputError, match="cannot read"):
        load_image(12345)
    with pytest.raises(InputError, match="no image"):
        load_image(None)
