"""Synthetic test photos with known ground truth (deterministic, generated in memory)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def object_photo(width: int = 320, height: int = 240, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A red ellipse on a textured brown-grey background.

    Returns:
        ``(rgb, mask)``: ``(H, W, 3)`` uint8 and the ellipse's ``(H, W)`` bool ground truth.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    grain = 20 * np.sin(xx / 7.0 + 3 * np.sin(yy / 23.0)) + rng.normal(0, 6, (height, width))
    background = np.stack([120 + grain, 110 + grain, 95 + grain], axis=-1)
    cx, cy, rx, ry = width * 0.52, height * 0.48, width * 0.22, height * 0.28
    mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    shade = 1.0 - 0.25 * (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    obj = np.stack([200 * shade, 30 * shade, 40 * shade], axis=-1) + rng.normal(0, 4, (height, width, 1))
    rgb = np.where(mask[..., None], obj, background)
    return np.clip(rgb, 0, 255).astype(np.uint8), mask


def encode(rgb: np.ndarray, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **save_args)
    return buf.getvalue()


def uniform_photo(width: int = 200, height: int = 150, value: int = 128) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def two_objects_photo(width: int = 320, height: int = 240) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two separate discs (red on the left, blue on the right) on a textured background.

    Returns:
        ``(rgb, left_mask, right_mask)``.
    """
    rng = np.random.default_rng(9)
    yy, xx = np.mgrid[0:height, 0:width]
    grain = 20 * np.sin(xx / 7.0 + 3 * np.sin(yy / 23.0)) + rng.normal(0, 6, (height, width))
    out = np.clip(np.stack([120 + grain, 110 + grain, 95 + grain], axis=-1), 0, 255).astype(np.uint8)
    r = 0.11 * width
    left = np.hypot(xx - 0.36 * width, yy - 0.5 * height) <= r
    right = np.hypot(xx - 0.66 * width, yy - 0.5 * height) <= r * 0.8
    out[left] = (205, 35, 40)
    out[right] = (40, 60, 210)
    return out, left, right


def three_objects_photo(width: int = 360, height: int = 240) -> tuple[np.ndarray, list[np.ndarray],
                                                                        list[tuple[int, int, int, int]]]:
    """Three separate discs (red, green, blue from left to right, of different sizes) on a textured background.

    Returns:
        ``(rgb, masks, boxes)``: the photo, each disc's ground-truth mask and an xyxy box around it (pixels).
    """
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:height, 0:width]
    grain = 20 * np.sin(xx / 7.0 + 3 * np.sin(yy / 23.0)) + rng.normal(0, 6, (height, width))
    out = np.clip(np.stack([120 + grain, 110 + grain, 95 + grain], axis=-1), 0, 255).astype(np.uint8)
    masks, boxes = [], []
    for (cx, cy, r), colour in zip(((0.18, 0.5, 0.12), (0.5, 0.45, 0.09), (0.8, 0.55, 0.07)),
                                   ((205, 35, 40), (40, 170, 60), (40, 60, 210)), strict=True):
        x, y, rad = cx * width, cy * height, r * width
        mask = np.hypot(xx - x, yy - y) <= rad
        out[mask] = colour
        masks.append(mask)
        pad = 6
        boxes.append((int(x - rad - pad), int(y - rad - pad), int(x + rad + pad), int(y + rad + pad)))
    return out, masks, boxes
