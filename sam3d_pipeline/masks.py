"""Mask utilities: PNG encoding, boxes, IoU, overlays and instance selection.

Masks are ``(H, W)`` bool arrays at image size; boxes are xyxy pixels (x right, y down).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from .errors import InputError
from .images import draw_label
from .types import Instance

OVERLAY_COLOUR = (30, 144, 255)


def mask_to_png(mask: np.ndarray) -> bytes:
    """Encode a bool mask as an 8-bit grayscale PNG (0 = background, 255 = object)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def mask_from_png(data: bytes, *, size: tuple[int, int] | None = None, source: str = "mask") -> np.ndarray:
    """Decode a mask PNG (any mode; nonzero = object).

    Args:
        data: PNG bytes.
        size: expected ``(width, height)``; a different size is refused.
        source: named in error messages.

    Raises:
        InputError: undecodable, wrong size, or empty mask.
    """
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{source}: not a readable mask image: {exc}") from None
    if size is not None and im.size != tuple(size):
        raise InputError(f"{source}: mask is {im.size[0]}x{im.size[1]}, image is {size[0]}x{size[1]}")
    arr = np.asarray(im.convert("L")) > 127
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
