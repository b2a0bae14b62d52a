"""The video run's own output files: ``frame.png`` (the chosen frame, its index and time in PNG text chunks) and
``track.webp`` (the mask over the sampled frames, animated, small); and the small frames a reviewer picks from."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, PngImagePlugin

from sam3d_pipeline.images import draw_label
from sam3d_pipeline.masks import overlay
from sam3d_pipeline.video.views import FrameView, VideoRun

TRACK_MAX_FRAMES = 120  # track.webp shows at most this many of the sampled frames, evenly spread
TRACK_MAX_SIDE_PX = 320
TRACK_QUALITY = 70
REVIEW_FRAME_MAX_SIDE_PX = 240  # the review's frame thumbnails


def frame_png(run: VideoRun) -> bytes:
    """The chosen frame (``(H, W, 3)`` RGB, as decoded) as PNG, with ``frame_index``, ``time_s`` and ``source``
    text chunks."""
    view = run.chosen
    frame = run.video.frames[view.position if view else 0]
    info = PngImagePlugin.PngInfo()
    info.add_text("frame_index", str(frame.index))
    info.add_text("time_s", f"{frame.time_s:.3f}")
    info.add_text("source", run.video.source)
    buf = io.BytesIO()
    Image.fromarray(frame.rgb).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def track_webp(run: VideoRun, *, max_frames: int = TRACK_MAX_FRAMES, max_side_px: int = TRACK_MAX_SIDE_PX) -> bytes:
    """An animated WebP of the mask over the sampled frames (at most ``max_frames``, long side ``max_side_px``),
    each labelled with its index and time; the chosen frame says so."""
    frames = run.video.frames
    positions = sorted(set(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int)))
    chosen = run.chosen.position if run.chosen else None
    if chosen is not None and chosen not in positions:  # the chosen frame takes its nearest neighbour's place
        nearest = min(positions, key=lambda p: abs(p - chosen))
        positions = sorted({*(p for p in positions if p != nearest), chosen})
    height, width = frames[0].rgb.shape[:2]
    scale = min(1.0, max_side_px / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    images = []
    for position in positions:
        frame, mask = frames[position], run.track.masks[position]
        small = frame.rgb if scale == 1.0 else cv2.resize(frame.rgb, size, interpolation=cv2.INTER_AREA)
        small_mask = mask if scale == 1.0 else cv2.resize(mask.astype(np.uint8), size,
                                                          interpolation=cv2.INTER_NEAREST) > 0
        label = f"#{frame.index} {frame.time_s:.2f}s" + (" chosen" if position == chosen else "")
        images.append(Image.fromarray(draw_label(overlay(small, small_mask), label)))
    step_ms = max(20, round(1000 * run.video.stride * len(frames) / max(1, len(positions)) / run.video.fps))
    buf = io.BytesIO()
    images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=step_ms, loop=0,
                   quality=TRACK_QUALITY, method=4)
    return buf.getvalue()


def view_overlay_png(run: VideoRun, view: FrameView, *, max_side_px: int = REVIEW_FRAME_MAX_SIDE_PX) -> bytes:
    """One tracked frame with its mask, long side at most ``max_side_px``, as PNG: a thumbnail the review shows."""
    frame, mask = run.video.frames[view.position], run.track.masks[view.position]
    height, width = mask.shape
    scale = min(1.0, max_side_px / max(height, width))
    rgb = frame.rgb
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    buf = io.BytesIO()
    Image.fromarray(overlay(rgb, mask)).save(buf, format="PNG")
    return buf.getvalue()
