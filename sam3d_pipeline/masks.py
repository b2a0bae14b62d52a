"""Mask utilities: PNG encoding, boxes, IoU, overlays and instance selection.

Masks are ``(H, W)`` bool arrays at image size; boxes are xyxy pixels (x right, y down).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from sam3d_pipeline.errors import ImageTooLargeError, InputError, InvalidImageError
from sam3d_pipeline.images import draw_label
from sam3d_pipeline.types import Instance

OVERLAY_COLOUR = (30, 144, 255)
MAX_MASK_PIXELS = 60_000_000  # the default SAM3D_MAX_PIXELS: no photo, hence no mask, is larger

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Channels per pixel, and the bit depths the PNG specification allows, by colour type.
_PNG_COLOUR_TYPES = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8)), 4: (2, (8, 16)), 6: (4, (8, 16))}
# Chunks a mask's pixels need; everything else (text, ICC profiles, animation frames: data whose decompressed
# size the header does not bound) is dropped before Pillow sees the file.
_PIXEL_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
_MAX_SMALL_CHUNK_BYTES = 3 * 256  # PLTE holds at most 256 RGB entries; tRNS less
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_INFLATE_STEP = 1 << 20


@dataclass(frozen=True)
class PngHeader:
    """What a PNG's IHDR chunk declares, read without decoding anything.

    Attributes:
        width, height: pixels.
        bit_depth: bits per channel (1, 2, 4, 8 or 16).
        colour_type: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA.
        interlaced: Adam7 interlacing.
    """

    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def raw_bytes(self) -> int:
        """Size of the decompressed pixel stream (filter byte per row + packed samples), per the header."""
        bits = _PNG_COLOUR_TYPES[self.colour_type][0] * self.bit_depth
        passes = _ADAM7 if self.interlaced else ((0, 0, 1, 1),)
        total = 0
        for x0, y0, dx, dy in passes:
            cols = (self.width - x0 + dx - 1) // dx if self.width > x0 else 0
            rows = (self.height - y0 + dy - 1) // dy if self.height > y0 else 0
            if cols and rows:
                total += rows * (1 + (cols * bits + 7) // 8)
        return total


def png_header(data: bytes, *, source: str = "mask") -> PngHeader:
    """Read a PNG's dimensions and pixel format from its IHDR chunk (nothing is decompressed).

    Raises:
        InvalidImageError: not a PNG, or an IHDR that breaks the PNG specification.
    """
    if data[:8] != _PNG_SIGNATURE:
        raise InvalidImageError(f"{source}: not a readable mask image: not a PNG file ({len(data):,} bytes)")
    if len(data) < 33 or data[12:16] != b"IHDR" or struct.unpack(">I", data[8:12])[0] != 13:
        raise InvalidImageError(f"{source}: not a readable mask image: the PNG does not start with its header chunk")
    width, height, bit_depth, colour_type, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    channels_depths = _PNG_COLOUR_TYPES.get(colour_type)
    if (not width or not height or channels_depths is None or bit_depth not in channels_depths[1]
            or compression or filtering or interlace not in (0, 1)):
        raise InvalidImageError(f"{source}: not a readable mask image: invalid PNG header ({width}x{height}, "
                                f"bit depth {bit_depth}, colour type {colour_type})")
    return PngHeader(width, height, bit_depth, colour_type, bool(interlace))


def _pixel_chunks(data: bytes, header: PngHeader, source: str) -> bytes:
    """The PNG rebuilt from the chunks its pixels need, after checking that its pixel data decompresses to
    exactly the size its header declares (streamed: never more than ``_INFLATE_STEP`` bytes at a time).

    Raises:
        InvalidImageError: a malformed chunk layout, or pixel data that is corrupt, truncated, or larger than
            the header says.
    """
    kept = [data[:33]]
    inflater = zlib.decompressobj()
    inflated = 0
    pos = 33
    while True:
        if pos + 12 > len(data):
            raise InvalidImageError(f"{source}: not a readable mask image: the PNG is truncated (no IEND chunk)")
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise InvalidImageError(f"{source}: not a readable mask image: the PNG's {kind!r} chunk is truncated")
        if kind == b"IDAT":
            pending = data[pos + 8:pos + 8 + length]
            try:
                while True:
                    out = inflater.decompress(pending, _INFLATE_STEP)
                    inflated += len(out)
                    if inflated > header.raw_bytes:
                        raise InvalidImageError(
                            f"{source}: the mask's pixel data decompresses to more than the {header.raw_bytes:,} "
                            f"bytes its {header.width}x{header.height} header declares; refused")
                    pending = inflater.unconsumed_tail
                    if not pending and len(out) < _INFLATE_STEP:  # all input used, no output held back
                        break
            except zlib.error as exc:
                raise InvalidImageError(f"{source}: not a readable mask image: corrupt pixel data ({exc})") from None
        elif kind in _PIXEL_CHUNKS and kind != b"IEND" and length > _MAX_SMALL_CHUNK_BYTES:
            raise InvalidImageError(f"{source}: not a readable mask image: {kind.decode()} chunk of {length:,} bytes")
        if kind in _PIXEL_CHUNKS and kind != b"IHDR":
            kept.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    if inflated < header.raw_bytes:
        raise InvalidImageError(f"{source}: not a readable mask image: the pixel data is truncated "
                                f"({inflated:,} of {header.raw_bytes:,} bytes)")
    return b"".join(kept)


def mask_to_png(mask: np.ndarray) -> bytes:
    """Encode a bool mask as an 8-bit grayscale PNG (0 = background, 255 = object)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def mask_from_png(data: bytes, *, size: tuple[int, int] | None = None, source: str = "mask",
                  max_pixels: int = MAX_MASK_PIXELS) -> np.ndarray:
    """Decode a mask PNG (any PNG colour type; nonzero = object) as an ``(H, W)`` bool array.

    The dimensions are read from the header and checked before anything is decompressed; the pixel data
    must decompress to exactly the size the header declares; chunks the pixels do not need (text, ICC
    profiles, animation frames) are never decompressed. None of this relies on Pillow's process-wide
    decompression-bomb setting.

    Args:
        data: PNG bytes.
        size: expected ``(width, height)``; a different size is refused before decoding.
        source: named in error messages.
        max_pixels: largest accepted width x height.

    Raises:
        ImageTooLargeError: the header declares more than ``max_pixels`` pixels.
        InvalidImageError: not a PNG, malformed, or pixel data that does not match its header.
        InputError: wrong size, or empty mask.
    """
    header = png_header(data, source=source)
    if header.pixels > max_pixels:
        raise ImageTooLargeError(
            f"{source}: mask header declares {header.width}x{header.height} = {header.pixels:,} pixels, over the "
            f"limit of {max_pixels:,}; refused before decoding")
    if size is not None and (header.width, header.height) != tuple(size):
        raise InputError(f"{source}: mask is {header.width}x{header.height}, image is {size[0]}x{size[1]}; "
                         "refused before decoding")
    pixels = _pixel_chunks(data, header, source)
    try:
        with warnings.catch_warnings():  # the size was checked above, against our own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(pixels), formats=["PNG"])
            im.load()
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"{source}: mask of {header.width}x{header.height} pixels exceeds the decoder's "
                                 "safety limit") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"{source}: not a readable mask image: {exc}") from None
    if im.mode == "1":
        arr = np.asarray(im, dtype=bool)
    else:
        arr = np.asarray(im if im.mode == "L" else im.convert("L")) > 127
    if not arr.any():
        raise InputError(f"{source}: mask is empty (no object pixels)")
    return arr


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight xyxy box (pixel edges: x1/y1 exclusive) around the mask's pixels.

    Raises:
        ValueError: the mask is empty.
    """
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("empty mask has no box")
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def clip_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    """Clip an xyxy box to ``[0, width] x [0, height]``."""
    x0, y0, x1, y1 = box
    return (
        float(min(max(x0, 0), width)),
        float(min(max(y0, 0), height)),
        float(min(max(x1, 0), width)),
        float(min(max(y1, 0), height)),
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of equal shape (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def overlay(rgb: np.ndarray, mask: np.ndarray | None, *, label: str | None = None, alpha: float = 0.45) -> np.ndarray:
    """Tint the mask over the photo, outline it, and write ``label`` in the corner.

    Args:
        rgb: ``(H, W, 3)`` uint8 photo.
        mask: ``(H, W)`` bool, or None for "nothing found".
        label: text drawn top-left (e.g. which backend produced the mask).

    Returns:
        ``(H, W, 3)`` uint8 image.
    """
    out = rgb.astype(np.float32).copy()
    if mask is not None and mask.any():
        colour = np.array(OVERLAY_COLOUR, dtype=np.float32)
        out[mask] = out[mask] * (1 - alpha) + colour * alpha
        out = np.clip(out, 0, 255).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, round(max(rgb.shape[:2]) / 300))
        cv2.drawContours(out, contours, -1, (255, 255, 255), thickness + 1)
        cv2.drawContours(out, contours, -1, OVERLAY_COLOUR, thickness)
    else:
        out = out.astype(np.uint8)
    return draw_label(out, label) if label else out


def select_instance(instances: list[Instance], index: int | None) -> int | None:
    """Pick the instance to reconstruct.

    Args:
        instances: candidates, best first.
        index: explicit choice, or None for the highest score.

    Returns:
        The chosen index, or None when there are no instances.

    Raises:
        InputError: ``index`` is out of range.
    """
    if not instances:
        return None
    if index is None:
        return int(np.argmax([inst.score for inst in instances]))
    if not 0 <= index < len(instances):
        raise InputError(f"instance index {index} is out of range: {len(instances)} instance(s) found")
    return index


InstancesSpec = Literal["best", "all"] | list[int]


def choose_objects(instances: list[Instance], spec: InstancesSpec, selected: int | None) -> list[int]:
    """The instance indices that become objects (``instances``: best, all or indices), the selected one first.

    Args:
        instances: what the segmenter found, best first.
        spec: ``best``, ``all`` or indices.
        selected: the selected instance (``select_instance``), None when nothing was found.

    Raises:
        InputError: an index in ``spec`` that does not exist.
    """
    if selected is None or not instances:
        return []
    if spec == "best":
        return [selected]
    if spec == "all":
        wanted = list(range(len(instances)))
    else:
        bad = [i for i in spec if not 0 <= i < len(instances)]
        if bad:
            raise InputError(f"instances {bad} out of range: {len(instances)} instance(s) found")
        wanted = list(spec)
    return [selected] + [i for i in wanted if i != selected]


def primary_object(spec: InstancesSpec, selected: int | None, instance_index: int | None) -> int | None:
    """With a list of indices and no explicit ``instance_index``, the first listed one is the selected object."""
    if isinstance(spec, list) and instance_index is None and spec and selected is not None:
        return spec[0]
    return selected
