"""Image intake: every pixel format normalised to RGB, EXIF orientation applied, bad files refused by name."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from sam3d_pipeline.errors import ImageTooLargeError, InvalidImageError
from sam3d_pipeline.images import load_image

from .photos import encode, object_photo

LIMIT = 50_000_000


def _load(data: bytes, **kw):
    return load_image(data, source="photos/p.img", max_pixels=kw.pop("max_pixels", LIMIT))


def test_rgb_png_round_trips():
    rgb, _ = object_photo(64, 48)
    img = _load(encode(rgb))
    assert img.rgb.dtype == np.uint8 and img.rgb.shape == (48, 64, 3)
    assert np.array_equal(img.rgb, rgb)
    assert img.format == "PNG" and img.original_mode == "RGB"
    assert len(img.sha256) == 64


def test_grayscale_and_bilevel_become_rgb():
    gray = (np.arange(48 * 64) % 256).astype(np.uint8).reshape(48, 64)
    img = _load(encode(gray))
    assert img.original_mode == "L" and img.rgb.shape == (48, 64, 3)
    assert np.array_equal(img.rgb[..., 0], gray) and np.array_equal(img.rgb[..., 2], gray)
    bilevel = Image.fromarray(gray > 128).convert("1")
    buf = io.BytesIO()
    bilevel.save(buf, format="PNG")
    out = _load(buf.getvalue())
    assert out.original_mode == "1" and set(np.unique(out.rgb)) <= {0, 255}


def test_palette_with_and_without_transparency():
    rgb, _ = object_photo(64, 48)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    img = _load(buf.getvalue())
    assert img.original_mode == "P" and img.rgb.shape == (48, 64, 3) and img.alpha is None
    assert np.abs(img.rgb.astype(int) - rgb.astype(int)).mean() < 12
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    img = _load(buf.getvalue())
    assert img.alpha is not None and img.alpha.shape == (48, 64)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")  # mode I;16
    img = _load(buf.getvalue())
    assert img.original_mode.startswith("I")
    assert img.rgb[0, 0, 0] == 0 and img.rgb[-1, -1, 0] == 255
    assert 100 < img.rgb[24, 32, 0] < 160  # mid-grey, not saturated at 255


def test_rgba_is_composited_over_white_and_alpha_kept():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:5, :, 3] = 255  # top half opaque red, bottom half transparent
    img = _load(encode(rgba))
    assert tuple(img.rgb[0, 0]) == (255, 0, 0)
    assert tuple(img.rgb[9, 9]) == (255, 255, 255)
    assert img.alpha[0, 0] == 255 and img.alpha[9, 9] == 0


def test_cmyk_jpeg_becomes_rgb():
    rgb, _ = object_photo(64, 48)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=95)
    img = _load(buf.getvalue())
    assert img.original_mode == "CMYK" and img.rgb.shape == (48, 64, 3)
    assert np.abs(img.rgb.astype(int) - rgb.astype(int)).mean() < 20


def test_exif_orientation_is_applied():
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    img = _load(buf.getvalue())
    assert img.exif_transposed
    assert img.rgb.shape == (40, 20, 3)  # portrait after rotation
    assert img.rgb[5, 10, 0] > 200 and img.rgb[35, 10, 0] < 60  # red ends up on top


def test_empty_file_is_refused_by_name():
    with pytest.raises(InvalidImageError, match=r"photos/p.img: the file is empty"):
        _load(b"")


def test_non_image_is_refused_by_name():
    with pytest.raises(InvalidImageError, match=r"photos/p.img: not a recognised image"):
        _load(b"%PDF-1.4 this is not a photo" * 10)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_refused(fmt):
    data = encode(object_photo(200, 150)[0], fmt)
    with pytest.raises(InvalidImageError, match=r"photos/p.img: .*(truncated|corrupt)"):
        _load(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with almost no pixel data (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding_quickly():
    bomb = _png_header_only(100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match=r"10,000,000,000 pixels exceeds the limit"):
        _load(bomb)
    assert time.perf_counter() - start < 1.0  # the header alone decides; pixels are never decoded


def test_pixel_limit_is_configurable():
    data = encode(object_photo(100, 100)[0])
    with pytest.raises(ImageTooLargeError, match="SAM3D_MAX_PIXELS"):
        _load(data, max_pixels=9_999)
    assert _load(data, max_pixels=10_000).width == 100
