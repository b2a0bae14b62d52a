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


SHAPE_SCENES = (  # (kind, centre x, centre y, size) as fractions of the width / height, and the colour
    (("disc", 0.2, 0.3, 0.12, (200, 40, 40)), ("square", 0.62, 0.62, 0.16, (40, 90, 200)),
     ("triangle", 0.85, 0.25, 0.12, (40, 160, 60))),
    (("ellipse", 0.5, 0.5, 0.18, (230, 180, 30)), ("square", 0.08, 0.85, 0.14, (120, 50, 160))),
    (("disc", 0.15, 0.2, 0.1, (30, 30, 30)), ("square", 0.45, 0.3, 0.1, (210, 90, 20)),
     ("triangle", 0.8, 0.7, 0.14, (20, 140, 150)), ("ellipse", 0.3, 0.78, 0.12, (170, 30, 110)),
     ("disc", 0.95, 0.15, 0.09, (60, 120, 40))),
)


def shapes_photo(scene: int = 0, width: int = 400, height: int = 300) -> tuple[np.ndarray, list[np.ndarray]]:
    """Flat shapes of different colours on a plain, slightly noisy light background (``SHAPE_SCENES[scene]``:
    two to five shapes, some cut by the photo's border).

    Returns:
        ``(rgb, masks)``: the photo and each shape's ground-truth ``(H, W)`` bool mask, in scene order.
    """
    rng = np.random.default_rng(20 + scene)
    yy, xx = np.mgrid[0:height, 0:width]
    light = 225 + 10 * (yy / height)  # a soft fall-off, as on a paper backdrop
    out = np.stack([light, light - 2, light - 6], axis=-1) + rng.normal(0, 2.5, (height, width, 1))
    masks = []
    side = min(width, height)
    for kind, fx, fy, fs, colour in SHAPE_SCENES[scene]:
        cx, cy, r = fx * width, fy * height, fs * side
        if kind == "disc":
            mask = np.hypot(xx - cx, yy - cy) <= r
        elif kind == "ellipse":
            mask = ((xx - cx) / (1.5 * r)) ** 2 + ((yy - cy) / (0.8 * r)) ** 2 <= 1
        elif kind == "square":
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        else:  # an upward triangle
            mask = (yy <= cy + r) & (yy - (cy - r) >= 2 * np.abs(xx - cx))
        out[mask] = np.asarray(colour, np.float64) + rng.normal(0, 3, (int(mask.sum()), 1))
        masks.append(mask)
    return np.clip(out, 0, 255).astype(np.uint8), masks
