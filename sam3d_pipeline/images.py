"""Image intake: size limits before decoding, EXIF orientation, and every pixel format normalised to RGB."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .errors import ImageTooLargeError, InvalidImageError

# We enforce our own limit from the header; Pillow's global bomb check is disabled so that our
# message (naming the input and the limit) is the one users see.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class LoadedImage:
    """A decoded, validated photo.

    Attributes:
        rgb: ``(H, W, 3)`` uint8, EXIF orientation applied.
        source: where it came from (path or URI), used in messages.
        sha256: hex digest of the file bytes (the input's identity in output keys).
        format: container format reported by Pillow (``JPEG``, ``PNG``, ...).
        original_mode: Pillow mode before normalisation (``P``, ``I;16``, ``CMYK``, ...).
        exif_transposed: True when an EXIF orientation tag rotated or flipped the pixels.
        alpha: ``(H, W)`` uint8 alpha channel when the file had one, else None.
    """

    rgb: np.ndarray
    source: str
    sha256: str
    format: str
    original_mode: str
    exif_transposed: bool = False
    alpha: np.ndarray | None = None

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    def describe(self) -> dict:
        return {
            "uri": self.source,
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "original_mode": self.original_mode,
            "exif_transposed": self.exif_transposed,
        }


def _to_rgb(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalise any Pillow mode to ``(H, W, 3)`` uint8 RGB; return the alpha channel separately."""
    mode = im.mode
    alpha = None
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        arr = np.asarray(rgba)
        alpha = arr[..., 3].copy()
        # Composite over white so transparent regions read as plain background.
        a = alpha[..., None].astype(np.float32) / 255.0
        rgb = arr[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), alpha
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16"):
            scale = 65535.0
            arr = arr / scale * 255.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        gray = np.clip(arr + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), None
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im).copy(), None


def load_image(data: bytes, *, source: str, max_pixels: int) -> LoadedImage:
    """Decode and validate a photo.

    Args:
        data: the file's bytes.
        source: path or URI, named in every error message.
        max_pixels: largest accepted width x height, checked from the header before decoding.

    Returns:
        A ``LoadedImage`` with RGB pixels, EXIF orientation applied.

    Raises:
        InvalidImageError: empty, truncated, or not an image.
        ImageTooLargeError: larger than ``max_pixels``.
    """
    if not data:
        raise InvalidImageError(f"{source}: the file is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"{source}: not a recognised image ({len(data)} bytes; first bytes {data[:8]!r})"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"{source}: image header is truncated or corrupt: {exc}") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{source}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{source}: {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (SAM3D_MAX_PIXELS); refused before decoding"
        )
    fmt = im.format or "unknown"
    original_mode = im.mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            transposed = ImageOps.exif_transpose(im)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"{source}: image data is truncated or corrupt: {exc}") from None
    exif_transposed = transposed.size != im.size or _orientation(im) not in (None, 1)
    rgb, alpha = _to_rgb(transposed)
    return LoadedImage(
        rgb=rgb,
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        original_mode=original_mode,
        exif_transposed=exif_transposed,
        alpha=alpha,
    )


def _orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):  # a broken EXIF block: no orientation
        return None


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 or ``(H, W)`` uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as JPEG bytes (no EXIF: the pixels are already upright)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def draw_label(rgb: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` white on black in the top-left corner (used to say which backend made an image)."""
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = draw.textbbox((6, 6), text)
    draw.rectangle((left - 4, top - 3, right + 4, bottom + 3), fill=(0, 0, 0))
    draw.text((6, 6), text, fill=(255, 255, 255))
    return np.asarray(im)
