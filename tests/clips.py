"""Clips the video tests generate: an object moving across a textured background, leaving the frame for a while.

``moving_object`` returns the frames and the true mask of every frame, so tests can check what a tracker found.
``encode`` writes frames as an MP4 / MOV / WebM in memory with PyAV.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class Clip:
    """Frames ``(H, W, 3)`` uint8, the true masks ``(H, W)`` bool, and which frames are blurred on purpose."""

    frames: list[np.ndarray]
    truth: list[np.ndarray]
    blurred: set[int]
    fps: float = 30.0

    def whole(self, index: int) -> bool:
        """The object is entirely inside frame ``index`` (at least 2 px from every edge)."""
        mask = self.truth[index]
        return bool(mask.any()) and not (mask[:2].any() or mask[-2:].any() or mask[:, :2].any() or mask[:, -2:].any())

    def absent(self, index: int) -> bool:
        return not self.truth[index].any()


def textured_background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Muted diagonal stripes plus smooth noise: texture everywhere, nothing that looks like the object."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = 0.5 + 0.5 * np.sin((xx + 0.6 * yy) / 3.0)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 2.0)
    base = np.stack([110 + 30 * stripes + 12 * noise, 120 + 24 * stripes + 12 * noise, 100 + 18 * stripes - 8 * noise],
                    axis=-1)
    return np.clip(base, 0, 255).astype(np.uint8)


def moving_object(frames: int = 240, width: int = 96, height: int = 72, radius: int = 11, seed: int = 0,
                  blur: tuple[int, int] | None = None) -> Clip:
    """A red disc crosses left to right and leaves the frame (about 40 % in), stays out for a while, comes back
    from the left and stops near the centre. Frames ``blur[0]..blur[1]`` (exclusive) are motion-blurred."""
    background = textured_background(width, height, seed)
    out, truth = [], []
    blurred = set(range(*blur)) if blur else set()
    for i in range(frames):
        t = i / max(1, frames - 1)
        if t < 0.45:  # enters at x=20, exits right around t=0.4
            cx = 20 + (width + 3 * radius - 20) * (t / 0.45)
        elif t < 0.6:  # out of view
            cx = -10 * radius
        else:  # back from the left, stops at the centre
            cx = -2 * radius + (width / 2 + 2 * radius) * min(1.0, (t - 0.6) / 0.3)
        cy = height / 2 + 6 * np.sin(2 * np.pi * t)
        frame = background.copy()
        mask = np.zeros((height, width), np.uint8)
        cv2.circle(mask, (int(round(cx)), int(round(cy))), radius, 1, -1)
        inside = mask.astype(bool)
        frame[inside] = (205, 35, 40)
        frame[inside & (np.add.outer(np.arange(height), np.arange(width)) % 6 < 2)] = (170, 25, 30)  # own texture
        if i in blurred:
            kernel = np.zeros((1, 9), np.float32)
            kernel[0, :] = 1.0 / 9
            frame = cv2.filter2D(frame, -1, kernel)
        out.append(frame)
        truth.append(inside)
    return Clip(out, truth, blurred)


def encode(frames: list[np.ndarray], fmt: str = "mp4", fps: int = 30) -> bytes:
    """Encode ``frames`` (RGB) as ``mp4`` (H.264), ``mov`` (H.264) or ``webm`` (VP9), near-lossless, in memory."""
    import av

    codec = {"mp4": "libx264", "mov": "libx264", "webm": "libvpx-vp9"}[fmt]
    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12"} if codec == "libx264" else {"crf": "10", "b": "0", "deadline": "realtime"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def audio_only(fmt: str = "mp4", seconds: float = 0.5) -> bytes:
    """A file with one AAC audio stream and no video."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(int(seconds * 16000 / 1024) + 1):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def zero_frames(fmt: str = "mp4") -> bytes:
    """A finished container with a video stream declared and no frame written."""
    import av

    buf = io.BytesIO()
    container = av.open(buf, "w", format=fmt)
    stream = container.add_stream("mpeg4" if fmt != "webm" else "libvpx-vp9", rate=30)
    stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
    container.start_encoding()
    container.close()
    return buf.getvalue()


def raw_h264(frames: list[np.ndarray], fps: int = 30) -> bytes:
    """Encode ``frames`` (RGB, one size) as a raw H.264 Annex-B elementary stream: no container, no header
    beyond the stream's own SPS/PPS, so nothing states the frame count, duration or any later frame size."""
    import av

    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def size_switch(first: tuple[int, int, int], then: tuple[int, int, int]) -> bytes:
    """A hostile clip: ``first = (frames, width, height)`` then ``then = (frames, width, height)``, two encoder
    outputs concatenated into one raw H.264 stream. A prober reading the start sees only the first size."""
    parts = []
    for count, width, height in (first, then):
        background = textured_background(width, height, seed=width)
        parts.append(raw_h264([np.roll(background, 2 * i, axis=1) for i in range(count)]))
    return b"".join(parts)
