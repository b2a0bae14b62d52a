"""Image intake: size limits before decoding, EXIF orientation, and every pixel format normalised to RGB."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin, UnidentifiedImageError

from sam3d_pipeline.errors import ImageTooLargeError, InvalidImageError

# Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays on for every decode in the
# process. ``load_image`` checks SAM3D_MAX_PIXELS from the header first, so for a photo over our limit
# our message (naming the input and the setting) is the one people see.

# EXIF orientations that rotate or flip (1 is "as stored"; anything else is not a valid tag value).
_TRANSPOSING_ORIENTATIONS = frozenset(range(2, 9))


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
        notes: what intake did that a person should know (first frame of an animation used, an invalid
            orientation tag ignored); they go into the result's ``messages``.
    """

    rgb: np.ndarray
    source: str
    sha256: str
    format: str
    original_mode: str
    exif_transposed: bool = False
    alpha: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

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
        # Never quote the file's bytes: the input may be anything, and messages reach logs and reports.
        raise InvalidImageError(
            f"{source}: not a recognised image format ({len(data):,} bytes; "
            "this pipeline reads JPEG, PNG, WebP, TIFF, BMP and GIF)"
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{source}: {_bomb_reason(exc, max_pixels)}; refused before decoding") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"{source}: {_corrupt_reason(exc, 'image header')}") from None
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
    notes = []
    frames = int(getattr(im, "n_frames", 1) or 1)
    if frames > 1:
        kind = "animated" if getattr(im, "is_animated", False) and fmt in ("GIF", "PNG", "WEBP") else "multi-page"
        notes.append(f"{source}: {kind} {fmt} with {frames} frames; the first frame was used")
    orientation = _orientation(im)
    if orientation is not None and orientation not in _TRANSPOSING_ORIENTATIONS and orientation != 1:
        notes.append(f"{source}: EXIF orientation {orientation!r} is not a valid value (1-8); "
                     "the pixels were used as stored")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            transposed = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{source}: {_bomb_reason(exc, max_pixels)}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"{source}: {_corrupt_reason(exc, 'image data')}") from None
    rgb, alpha = _to_rgb(transposed)
    return LoadedImage(
        rgb=rgb,
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        original_mode=original_mode,
        exif_transposed=orientation in _TRANSPOSING_ORIENTATIONS,
        alpha=alpha,
        notes=notes,
    )


def _bomb_reason(exc: BaseException, max_pixels: int) -> str:
    """Pillow refuses a header over twice its own guard before we can read the size; say it our way."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "the image's pixel count"
    return f"{size} exceeds the limit of {max_pixels:,} (SAM3D_MAX_PIXELS) and the decoder's safety limit"


def _corrupt_reason(exc: BaseException, part: str) -> str:
    """What is actually wrong, in words: Pillow's messages name its internals and sometimes a stream object."""
    text = str(exc)
    if "MAX_TEXT" in text or "Decompressed data too large" in text:
        return (f"a text metadata chunk decompresses to more than the decoder's limit of "
                f"{PngImagePlugin.MAX_TEXT_CHUNK:,} bytes (a decompression bomb, or huge embedded text); "
                "strip the file's metadata and upload it again")
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return f"{part} is truncated (the file ends early): {_plain(text)}"
    return f"{part} is corrupt: {_plain(text)}"


def _plain(text: str) -> str:
    """Pillow's message without object reprs (``<_io.BytesIO object at 0x…>`` means nothing to a person)."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "the file", text).strip() or "no detail from the decoder"


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
